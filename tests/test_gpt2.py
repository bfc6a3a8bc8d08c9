"""GPT-2 against transformers' GPT2LMHeadModel (the oracle), and adapters at its sites."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from adapters_jax import peft, rules  # noqa: E402
from adapters_jax.adapters import AdapterSpec, spec_from_config  # noqa: E402
from adapters_jax.adapters.prefix import head_options  # noqa: E402
from adapters_jax.backbones import gpt2_weights, hf_io  # noqa: E402
from adapters_jax.hub import load_backbone  # noqa: E402

V = 64
TINY = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)
IDS = np.random.default_rng(0).integers(0, V, size=(3, 10)).astype(np.int32)
MASK = np.ones((3, 10), np.int32)
MASK[1, 7:] = 0  # right padding
MASK[2, 4:] = 0


def write_tokenizer(path, vocab_size):
    """A word-level tokenizer.json ('t0' .. 't{V-1}'), so that hub.load_backbone finds one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def _save(path, seed=0, **overrides):
    """A random GPT2LMHeadModel (LayerNorms and biases randomized too) saved with save_pretrained."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)  # HF inits them to ones, which would hide a swapped mapping
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, V)
    return model


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(torch model, our backbone, our base outputs with hidden states), computed once."""
    path = tmp_path_factory.mktemp("gpt2_tied")
    ref, bb = _save(path), load_backbone(str(path))
    return ref, bb, _logits(bb.model, bb.params, output_hidden_states=True)


def _logits(model, params, ids=IDS, mask=MASK, **kw):
    """model's output dict, jitted: one compile beats eager dispatch of every op."""
    return jax.jit(lambda p: model.apply({"params": p}, ids, mask, **kw))(params)


def _init(model, seed=0):
    return jax.jit(model.init)(jax.random.PRNGKey(seed), IDS[:1])["params"]


def _random_adapters(model, base, seed=1, std=0.5):
    """base params plus every adapter leaf drawn N(0, std), shapes from eval_shape (no init compile)."""
    from flax import traverse_util
    shapes = traverse_util.flatten_dict(dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), IDS[:1])["params"]))
    flat = traverse_util.flatten_dict(dict(base))
    rng = np.random.default_rng(seed)
    extra = {k: rng.normal(0, std, v.shape).astype(np.float32) for k, v in shapes.items() if k not in flat}
    return traverse_util.unflatten_dict({**flat, **extra})


def _max_err(a, b, mask=MASK):
    keep = mask.astype(bool)
    return float(np.abs(np.asarray(a, np.float32)[keep] - np.asarray(b, np.float32)[keep]).max())


def _hf(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def test_logits_match_hf_tied(tied):
    ref, bb, out = tied
    assert bb.config.model_type == "gpt2" and bb.config.tie_word_embeddings and "lm_head" not in bb.params
    assert sum(x.size for x in jax.tree_util.tree_leaves(bb.params)) == sum(p.numel() for p in ref.parameters())
    logits, hidden = _hf(ref)
    assert _max_err(out["logits"], logits) <= 1e-4
    assert len(out["hidden_states"]) == len(hidden) == TINY["n_layer"] + 1
    for ours, theirs in zip(out["hidden_states"], hidden):
        assert _max_err(ours, theirs) <= 1e-4


def test_logits_match_hf_untied_and_round_trip(tmp_path):
    ref = _save(tmp_path, seed=1, tie_word_embeddings=False, n_inner=48, activation_function="relu")
    config, params = gpt2_weights.load(tmp_path)
    assert not config.tie_word_embeddings and config.intermediate_size == 48
    out = _logits(load_backbone(str(tmp_path)).model, params)
    assert _max_err(out["logits"], _hf(ref)[0]) <= 1e-4
    saved = load_file(str(tmp_path / "model.safetensors"))
    ours = gpt2_weights.to_hf_state(config, params)
    assert set(ours) == set(saved)
    for name, arr in saved.items():
        np.testing.assert_array_equal(ours[name], arr, err_msg=name)


def test_to_hf_state_inverts_load_tied(tied):
    _, bb, _ = tied
    saved = load_file(str(bb.path) + "/model.safetensors")
    ours = gpt2_weights.to_hf_state(bb.config, bb.params)
    assert set(ours) == set(saved)  # the fused c_attn is rebuilt; the tied head stays out
    for name, arr in saved.items():
        np.testing.assert_array_equal(ours[name], arr, err_msg=name)


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.pop("transformer.h.1.attn.c_attn.weight"), "missing tensor transformer.h.1.attn.c_attn.weight"),
    (lambda s: s.update({"transformer.h.0.attn.c_attn.weight": np.zeros((32, 64), np.float32)}),
     "tensor transformer.h.0.attn.c_attn.weight has shape (32, 64)"),
    (lambda s: s.update({"transformer.h.0.mlp.c_fc.weight": np.zeros((128, 32), np.float32)}),
     "tensor transformer.h.0.mlp.c_fc.weight has shape (128, 32)"),
    (lambda s: s.update({"transformer.h.0.mlp.extra": np.zeros((2,), np.float32)}),
     "unexpected tensor transformer.h.0.mlp.extra"),
    (lambda s: s.update({"lm_head.weight": np.ones((V, 32), np.float32)}), "lm_head.weight differs"),
])
def test_bad_checkpoint_names_the_tensor(tied, tmp_path, edit, needle):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{tied[1].path}/{name}", tmp_path / name)
    state = load_file(str(tmp_path / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointError) as err:
        gpt2_weights.load(tmp_path)
    assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)


def _flat(tree):
    from flax import traverse_util
    return {rules.path_str(p): v for p, v in traverse_util.flatten_dict(dict(tree)).items()}


def _graft(adapted, base):
    """The adapted model's params with every base leaf taken from the checkpoint."""
    from flax import traverse_util
    fa, fb = traverse_util.flatten_dict(dict(adapted)), traverse_util.flatten_dict(dict(base))
    return traverse_util.unflatten_dict({k: fb.get(k, v) for k, v in fa.items()})


def test_adapters_identity_at_init_then_train(tied):
    """Houlsby (zero up-projection) + LoRA (B = 0) + IA3 (ones) leave the logits unchanged;
    then training moves the adapters only, and the LM loss falls."""
    _, bb, base = tied
    placements = (spec_from_config("houlsby", bottleneck_dim=8, init="zero_up").placements
                  + spec_from_config("lora", r=4, alpha=8, lora_sites=("query", "value")).placements
                  + spec_from_config("ia3", ia3_sites=("key", "ffn_out"), feedforward_sites=("ffn_out",)).placements)
    spec = AdapterSpec(name="task", placements=placements).validate(
        bb.config.num_layers, bb.config.hidden_size, ("attn_adapter", "ffn_adapter", "query", "key", "value",
                                                      "ffn_out"))
    model = bb.model.clone(filler=spec)
    params = _graft(_init(model), bb.params)
    lab = rules.labels_for(params, peft.make_rules(["task"], train_head=False))
    trainable, frozen = peft.split(params, lab)
    names = set(_flat(trainable))
    assert names and all("/task/" in n for n in names)
    assert any("/attn_adapter/task/" in n for n in names) and any("/query/task/lora_b" in n for n in names)

    def loss_fn(tr, fr):
        logits = model.apply({"params": peft.merge(tr, fr)}, IDS, MASK)["logits"]  # [B, T, V]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), IDS[:, 1:, None], -1)[..., 0]
        keep = MASK[:, 1:]
        return jnp.sum(nll * keep) / keep.sum(), logits

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # the one compiled program
    (loss0, logits0), grads = grad_fn(trainable, frozen)
    # The base's logits up to float rounding: the programs differ, so XLA may fuse differently.
    assert _max_err(logits0, base["logits"]) <= 1e-6
    g = _flat(grads)
    for site in ("ffn_adapter/task/up", "query/task/lora_b", "key/task/scale"):  # the zero/one-init leaves move
        assert max(float(jnp.abs(v).max()) for k, v in g.items() if site in k) > 0, site
    tx = optax.adam(1e-2)
    state = tx.init(trainable)
    for _ in range(3):
        (loss, _), grads = grad_fn(trainable, frozen)
        updates, state = tx.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    assert float(grad_fn(trainable, frozen)[0][0]) < float(loss0)
    for k, v in _flat(frozen).items():  # the base is untouched
        np.testing.assert_array_equal(v, _flat(bb.params)[k])


def test_prefix_and_prompt_sites(tied):
    """A soft prompt adds P positions and P mask ones; prefix keys reach every query."""
    _, bb, base = tied
    placements = (spec_from_config("prefix", **head_options(bb.config), prefix_length=3, flat=True).placements
                  + spec_from_config("prompt", n_tokens=2).placements)
    model = bb.model.clone(filler=AdapterSpec(name="task", placements=placements))
    params = _random_adapters(model, bb.params)
    assert params["layers"]["layer_1"]["attention"]["prefix"]["task"]["keys"].shape == (3, 4, 8)
    assert params["prompt"]["task"]["embedding"].shape == (2, 32)
    out = _logits(model, params)
    assert out["logits"].shape == (3, 12, V)
    np.testing.assert_array_equal(out["attention_mask"], np.concatenate([np.ones((3, 2), np.int32), MASK], 1))
    assert _max_err(out["logits"][:, 2:], base["logits"]) > 1e-3  # the adapters act
