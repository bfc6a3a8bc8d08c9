"""T5 against transformers' T5ForConditionalGeneration (the oracle): logits, loss, greedy
decoding and the checkpoint round trip; and an adapter at the cross-attention site."""
import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import traverse_util  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from adapters_jax.adapters import spec_from_config  # noqa: E402
from adapters_jax.backbones import hf_io, sites, t5_weights  # noqa: E402
from adapters_jax.backbones.t5 import greedy_generate, relative_position_bucket, seq2seq_loss  # noqa: E402
from adapters_jax.hub import load_backbone  # noqa: E402
from tests.test_gpt2 import write_tokenizer  # noqa: E402

V = 64
# Few buckets and a short max_distance, so that the log-spaced buckets are used at T = 10.
TINY = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
CASES = {
    "relu_tied": dict(feed_forward_proj="relu"),
    "gated_gelu_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
}
rng = np.random.default_rng(0)
IDS = rng.integers(2, V, size=(3, 10)).astype(np.int32)
MASK = np.ones((3, 10), np.int32)
MASK[1, 7:] = 0  # right padding in the encoder input
MASK[2, 4:] = 0
LABELS = rng.integers(2, V, size=(3, 6)).astype(np.int32)
LABELS[0, 4:] = -100  # ignored positions, as a collator pads labels
DEC = rng.integers(0, V, size=(3, 6)).astype(np.int32)
DEC_MASK = np.ones((3, 6), np.int32)
DEC_MASK[2, 3:] = 0


def _forward_and_loss(model, params):
    """Our outputs on (IDS, DEC) and our loss on LABELS, in one compiled program."""
    def run(p):
        out = model.apply({"params": p}, IDS, MASK, decoder_input_ids=DEC, decoder_attention_mask=DEC_MASK)
        return out, seq2seq_loss(model, p, IDS, MASK, LABELS)
    return jax.jit(run)(params)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, torch model, our backbone, our base outputs and loss) for one tiny random config
    saved with save_pretrained."""
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, **CASES[request.param])).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)  # HF inits them to ones, which would hide a swapped mapping
            elif name.endswith(("wo.weight", ".o.weight")):
                p.mul_(3.0)  # sublayers outweigh the residual embedding: greedy outputs vary
    ref.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, V)
    bb = load_backbone(str(path))
    return request.param, ref, bb, _forward_and_loss(bb.model, bb.params)


def _err(a, b, mask):
    keep = mask.astype(bool)
    return float(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep]).max())


def test_relative_position_buckets_match_hf():
    rel = np.arange(-300, 301)[None, :]
    hf_bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    combos = [(b, n, dist) for b in (True, False) for n, dist in ((32, 128), (8, 20))]
    ours = jax.jit(lambda r: [relative_position_bucket(r, *args) for args in combos])(rel)  # one compile
    for args, mine in zip(combos, ours):
        np.testing.assert_array_equal(mine, hf_bucket(torch.tensor(rel), *args).numpy(), err_msg=str(args))


def test_logits_and_loss_match_hf(case):
    name, ref, bb, (out, loss) = case
    c = bb.config
    assert c.tie_word_embeddings == (name == "relu_tied") and c.gated == (name != "relu_tied")
    assert sum(x.size for x in jax.tree_util.tree_leaves(bb.params)) == sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK),
                     decoder_input_ids=torch.tensor(DEC, dtype=torch.long),
                     decoder_attention_mask=torch.tensor(DEC_MASK))
        hf_loss = ref(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK),
                      labels=torch.tensor(LABELS, dtype=torch.long)).loss.item()
    assert _err(out["encoder_last_hidden_state"], theirs.encoder_last_hidden_state.numpy(), MASK) <= 1e-4
    assert _err(out["logits"], theirs.logits.numpy(), DEC_MASK) <= 1e-4
    assert abs(float(loss) - hf_loss) <= 1e-5 * max(1.0, abs(hf_loss))


def test_greedy_matches_hf_generate(case):
    _, ref, bb, _ = case
    n, pad = 8, bb.config.pad_token_id

    def hf_generate(**kw):  # use_cache=False: HF's cache breaks when decoder depth != encoder's
        with torch.no_grad():
            return ref.generate(input_ids=torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK),
                                do_sample=False, num_beams=1, max_new_tokens=n, use_cache=False, **kw).numpy()

    # Make a token that row 0 emits early the eos, so that finished rows (padded) and running
    # rows meet in one batch.
    eos = int(hf_generate()[0, 2])
    theirs = hf_generate(eos_token_id=eos)
    assert len(np.unique(theirs[:, 1:])) > 2  # not a degenerate repeat
    model = bb.model.clone(config=dataclasses.replace(bb.config, eos_token_id=eos))
    ours = np.asarray(greedy_generate(model, bb.params, IDS, MASK, max_new_tokens=n))
    first = int(np.argmax(ours[0] == eos))
    assert 0 < first < n and (ours[0, first + 1:] == pad).all()
    # HF stops once every row has emitted eos; the rest of our fixed-length output is padding.
    theirs = np.pad(theirs, ((0, 0), (0, n + 1 - theirs.shape[1])), constant_values=pad)
    np.testing.assert_array_equal(ours, theirs)


def test_to_hf_state_inverts_load(case):
    _, _, bb, _ = case
    saved = load_file(f"{bb.path}/model.safetensors")
    ours = t5_weights.to_hf_state(bb.config, bb.params)
    assert set(ours) == set(saved)
    for name, arr in saved.items():
        np.testing.assert_array_equal(ours[name], arr, err_msg=name)
    # Decoder blocks are numbered after the encoder's (the spec's layer numbers).
    L = bb.config.num_layers
    assert set(bb.params["decoder"]) == {f"layer_{L + i}" for i in range(bb.config.num_decoder_layers)} | {"final_norm"}
    assert "relative_attention_bias" in bb.params["decoder"][f"layer_{L}"]["self_attention"]
    assert "relative_attention_bias" not in bb.params["decoder"][f"layer_{L + 1}"]["self_attention"]


def test_tied_copy_that_differs_is_refused(case):
    _, _, bb, _ = case
    state = load_file(f"{bb.path}/model.safetensors")
    state["decoder.embed_tokens.weight"] = state["shared.weight"] + 1.0
    with pytest.raises(hf_io.CheckpointError, match="decoder.embed_tokens.weight differs") as err:
        t5_weights.convert_state(bb.config, state, source="x")
    assert "\n" not in str(err.value)
    state["decoder.embed_tokens.weight"] = state["shared.weight"]  # an equal copy is accepted
    state.pop("decoder.final_layer_norm.weight")
    with pytest.raises(hf_io.CheckpointError, match="missing tensor decoder.final_layer_norm.weight"):
        t5_weights.convert_state(bb.config, state, source="x")


def test_cross_attention_adapter_acts_only_through_its_up_projection(case):
    name, _, bb, (base, _) = case
    if name != "gated_gelu_untied":
        pytest.skip("one case is enough: the site code is shared")
    c = bb.config
    decoder_layers = f"{c.num_layers}-{c.total_layers - 1}"
    spec = spec_from_config("bottleneck", name="xa", bottleneck_sites=(sites.CROSS_ATTN_OUTPUT,),
                            bottleneck_dim=4, layers=decoder_layers)
    spec.validate(c.total_layers, c.hidden_size, sites.ALL_SITES)
    with pytest.raises(ValueError, match="out of range"):
        spec_from_config("bottleneck", bottleneck_sites=(sites.CROSS_ATTN_OUTPUT,),
                         layers=str(c.total_layers)).validate(c.total_layers, c.hidden_size, sites.ALL_SITES)
    model = bb.model.clone(filler=spec)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), IDS[:1], decoder_input_ids=DEC[:1])["params"]
    flat = traverse_util.flatten_dict(dict(bb.params))
    new = {k: v for k, v in traverse_util.flatten_dict(dict(shapes)).items() if k not in flat}
    assert sorted({"/".join(k[:3]) for k in new}) == [f"decoder/layer_{i}/cross_attn_adapter"
                                                    for i in range(c.num_layers, c.total_layers)]
    draw = np.random.default_rng(3)
    flat.update({k: draw.normal(0, 0.5, v.shape).astype(np.float32) for k, v in new.items()})
    fwd = jax.jit(lambda p: model.apply({"params": p}, IDS, MASK, decoder_input_ids=DEC,
                                        decoder_attention_mask=DEC_MASK))
    out1 = fwd(traverse_util.unflatten_dict(flat))  # up-projection non-zero: the decoder changes
    assert _err(out1["logits"], base["logits"], DEC_MASK) > 1e-3
    assert float(np.abs(out1["encoder_last_hidden_state"] - base["encoder_last_hidden_state"]).max()) <= 1e-6
    for k in new:
        if k[-2] == "up":  # down-projection still random, up-projection zero: the base again
            flat[k] = np.zeros_like(flat[k])
    out0 = fwd(traverse_util.unflatten_dict(flat))
    assert _err(out0["logits"], base["logits"], DEC_MASK) <= 1e-6  # up to float rounding of another program
