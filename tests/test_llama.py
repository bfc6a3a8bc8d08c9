"""Parity of our Llama decoder with transformers' LlamaForCausalLM (the independent oracle)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from adapters_jax.backbones import hf_io, llama_weights  # noqa: E402
from adapters_jax.backbones.llama import LlamaConfig, LlamaModel  # noqa: E402

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
            rms_norm_eps=1e-5)
CASES = {  # name -> overrides of TINY
    "gqa_untied": dict(tie_word_embeddings=False),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_tied_bias_headdim": dict(num_key_value_heads=1, tie_word_embeddings=True, head_dim=32,
                                  attention_bias=True, mlp_bias=True, rope_theta=500000.0),
}
IDS = np.random.default_rng(0).integers(0, 100, size=(3, 10)).astype(np.int32)
MASK = np.ones((3, 10), np.int32)
MASK[1, 7:] = 0  # padding at the right end
MASK[2, 4:] = 0


def _save(tmp_path, overrides, seed=0):
    """A random LlamaForCausalLM (norms and biases randomized too) saved as safetensors."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # HF inits them to ones, which would hide a swapped mapping
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _torch_out(model, ids=IDS, mask=MASK, position_ids=None):
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=None if position_ids is None else torch.tensor(position_ids),
                    output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def _max_err(a, b, mask=MASK):
    keep = mask.astype(bool)
    return float(np.abs(np.asarray(a, np.float32)[keep] - np.asarray(b, np.float32)[keep]).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(tmp_path, case):
    ref = _save(tmp_path, CASES[case])
    config, params = llama_weights.load(tmp_path)
    assert config.tie_word_embeddings == CASES[case]["tie_word_embeddings"]
    assert ("lm_head" in params) != config.tie_word_embeddings
    n_ours = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n_ours == sum(p.numel() for p in ref.parameters())  # tied params count once in both
    out = LlamaModel(config).apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK),
                                   output_hidden_states=True)
    logits, hidden = _torch_out(ref)
    assert out["logits"].shape == (3, 10, TINY["vocab_size"])
    assert _max_err(out["logits"], logits) <= 1e-4
    assert len(out["hidden_states"]) == len(hidden) == TINY["num_hidden_layers"] + 1
    for ours, theirs in zip(out["hidden_states"], hidden):
        assert _max_err(ours, theirs) <= 1e-4
    np.testing.assert_array_equal(out["attention_mask"], MASK)


def test_explicit_position_ids_match_hf(tmp_path):
    ref = _save(tmp_path, CASES["gqa_untied"], seed=1)
    config, params = llama_weights.load(tmp_path)
    # A constant shift would change nothing (RoPE scores depend on distances): use gaps.
    pos = (np.arange(10) * 2 + np.arange(3)[:, None] * 7).astype(np.int32)
    out = LlamaModel(config).apply({"params": params}, IDS, MASK, position_ids=pos)
    logits, _ = _torch_out(ref, position_ids=pos)
    assert _max_err(out["logits"], logits) <= 1e-4
    default = LlamaModel(config).apply({"params": params}, IDS, MASK)
    assert _max_err(default["logits"], out["logits"]) > 1e-3  # positions do matter


def test_to_hf_state_inverts_load(tmp_path):
    for case in ("gqa_untied", "mha_tied"):
        _save(tmp_path / case, CASES[case])
        config, params = llama_weights.load(tmp_path / case)
        saved = load_file(str(tmp_path / case / "model.safetensors"))
        ours = llama_weights.to_hf_state(config, params)
        if config.tie_word_embeddings:
            saved.pop("lm_head.weight", None)
        assert set(ours) == set(saved)
        for name, arr in saved.items():
            np.testing.assert_array_equal(ours[name], arr, err_msg=name)


def _edit(tmp_path, fn):
    file = str(tmp_path / "model.safetensors")
    state = load_file(file)
    fn(state)
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}),
     "tensor model.layers.0.self_attn.k_proj.weight has shape (64, 64)"),
    (lambda s: s.update({"model.layers.0.mlp.extra.weight": np.zeros((2,), np.float32)}),
     "unexpected tensor model.layers.0.mlp.extra.weight"),
])
def test_bad_checkpoint_names_the_tensor(tmp_path, edit, needle):
    _save(tmp_path, CASES["gqa_untied"])
    _edit(tmp_path, edit)
    with pytest.raises(hf_io.CheckpointError) as err:
        llama_weights.load(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and needle in msg, msg


def test_tied_head_that_differs_is_refused(tmp_path):
    _save(tmp_path, CASES["mha_tied"])
    _edit(tmp_path, lambda s: s.update({"lm_head.weight": np.ones((100, 64), np.float32)}))
    with pytest.raises(hf_io.CheckpointError, match="lm_head.weight differs"):
        llama_weights.load(tmp_path)


def test_rope_scaling_is_refused(tmp_path):
    _save(tmp_path, CASES["gqa_untied"])
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_scaling") as err:
        llama_weights.load(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_hf(cfg)


def test_bf16_compute_close_to_f32(tmp_path):
    _save(tmp_path, CASES["gqa_untied"])
    config, params = llama_weights.load(tmp_path)
    f32 = LlamaModel(config).apply({"params": params}, IDS, MASK)["last_hidden_state"]
    bf16 = LlamaModel(config, dtype=jnp.bfloat16).apply({"params": params}, IDS, MASK)
    assert bf16["last_hidden_state"].dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    keep = MASK.astype(bool)
    a = np.asarray(bf16["last_hidden_state"], np.float32)[keep]
    b = np.asarray(f32, np.float32)[keep]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 2e-2
