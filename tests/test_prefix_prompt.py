"""Prefix tuning and prompt tuning: shapes, masks, folding, and AdapterHub / PEFT as oracles."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from adapters_jax.adapters import prefix as prefix_lib
from adapters_jax.adapters import prompt as prompt_lib
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.backbones import bert_weights, llama_weights
from adapters_jax.backbones.bert import BertModel
from adapters_jax.backbones.llama import LlamaModel
from tests.oracle_models import tiny_llama
from tests.test_lora_ia3 import BERT, MODELS, adapted, batch, flat, graft, out_of, trainable_count

P = 5


def prefix_options(kind, **kw):
    return {**prefix_lib.head_options(MODELS[kind][1]), "prefix_length": P, "bottleneck_size": 16, **kw}


# ------------------------------------------------------------------ prefix tuning

@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prefix_shapes_counts_and_effect(kind):
    plain, base, model, params, spec = adapted(kind, "prefix", **prefix_options(kind))
    cfg = MODELS[kind][1]
    d, layers = cfg.hidden_size, cfg.num_layers
    kv = prefix_lib.head_options(cfg)["num_kv_heads"] * prefix_lib.head_options(cfg)["head_dim"]
    # reparametrised: E [P, D], down D->16, up 16->2*kv per layer
    assert trainable_count(params) == layers * (P * d + d * 16 + 16 + 16 * 2 * kv + 2 * kv)
    stack = "encoder" if kind == "bert" else "layers"
    sub = params[stack]["layer_0"]["attention"]["prefix"]["adapter"]
    pconfig = spec.placements[0].config
    keys, values = prefix_lib.PrefixTuning(pconfig).apply({"params": sub}, 3)
    h_kv, dh = pconfig.kv_heads, pconfig.head_dim
    assert keys.shape == values.shape == (3, P, h_kv, dh)
    ids, mask = batch()
    out = out_of(model, params, ids, mask)
    assert out.shape == out_of(plain, base, ids, mask).shape  # the sequence keeps its length
    assert np.abs(out - out_of(plain, base, ids, mask)).max() > 1e-2
    *_, flat_params, _ = adapted(kind, "prefix", **prefix_options(kind, flat=True))
    assert trainable_count(flat_params) == layers * 2 * P * kv  # L * 2 * P * D when H_kv * Dh = D


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prefix_respects_padding(kind):
    """A padded row gives, at its real positions, what the same tokens give alone."""
    _, _, model, params, _ = adapted(kind, "prefix", **prefix_options(kind))
    ids, mask = batch()
    out = out_of(model, params, ids, mask)
    for row in (1, 2):
        n = int(mask[row].sum())
        alone = out_of(model, params, ids[row:row + 1, :n], mask[row:row + 1, :n])
        assert np.abs(out[row, :n] - alone[0]).max() <= 1e-5


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_fold_prefix_keeps_outputs(kind):
    _, _, model, params, spec = adapted(kind, "prefix", **prefix_options(kind))
    folded, flat_spec = prefix_lib.fold_prefix(params, spec)
    assert all(p.config.flat for p in flat_spec.placements)
    *_, fresh_flat, _ = adapted(kind, "prefix", **prefix_options(kind, flat=True))
    assert {k: v.shape for k, v in flat(folded).items()} == {k: v.shape for k, v in flat(fresh_flat).items()}
    ids, mask = batch()
    cls = MODELS[kind][0]
    got = out_of(cls(MODELS[kind][1], filler=flat_spec), folded, ids, mask)
    assert np.abs(got - out_of(model, params, ids, mask)).max() <= 1e-5


def test_prefix_needs_the_head_layout():
    with pytest.raises(ValueError, match="adapter.num_heads"):
        spec_from_config("prefix", prefix_length=4)


def _ahub_bert(tmp_path, config, attn="sdpa"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    adapters = pytest.importorskip("adapters")
    torch.manual_seed(0)
    hf = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=40, attn_implementation=attn)
    model = transformers.BertModel(hf).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    _, base = bert_weights.load(str(tmp_path))
    adapters.init(model)
    model.add_adapter("a", config=config)
    model.set_active_adapters("a")
    return model.eval(), base


def _torch_hidden(model, ids, mask):
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("flat_prefix", [True, False])
def test_prefix_matches_adapterhub_bert(tmp_path, flat_prefix):
    """AdapterHub's one MLP for all layers imports exactly: same E and `down` in every layer,
    and layer l's `up` is rows [2Dl, 2D(l+1)) of AdapterHub's last Linear."""
    adapters = pytest.importorskip("adapters")
    torch = pytest.importorskip("torch")
    ahub, base = _ahub_bert(tmp_path, adapters.PrefixTuningConfig(flat=flat_prefix, prefix_length=P,
                                                                  bottleneck_size=16))
    torch.manual_seed(2)
    theirs = {}
    for n, p in ahub.named_parameters():
        if "prefix_tunings.a." in n:
            with torch.no_grad():
                p.normal_(0.0, 0.5)
            theirs[n.split("prefix_tunings.a.self_prefix.")[1]] = p.detach().numpy()
    spec = spec_from_config("prefix", **prefix_options("bert", flat=flat_prefix))
    model = BertModel(BERT, filler=spec)
    params = graft(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"], base)
    d, layers = BERT.hidden_size, BERT.num_layers
    h, dh = BERT.num_heads, d // BERT.num_heads
    f = flat(params)
    for layer in range(layers):
        root = ("encoder", f"layer_{layer}", "attention", "prefix", "adapter")
        if flat_prefix:
            kv = theirs["control_trans"].reshape(P, layers * 2, h, dh)
            f[root + ("keys",)], f[root + ("values",)] = kv[:, 2 * layer], kv[:, 2 * layer + 1]
        else:
            rows = slice(2 * d * layer, 2 * d * (layer + 1))
            f[root + ("embedding",)] = theirs["wte.weight"]
            f[root + ("down", "kernel")] = theirs["control_trans.0.weight"].T
            f[root + ("down", "bias")] = theirs["control_trans.0.bias"]
            f[root + ("up", "kernel")] = theirs["control_trans.2.weight"][rows].T
            f[root + ("up", "bias")] = theirs["control_trans.2.bias"][rows]
    ids, mask = batch()
    got = out_of(model, traverse_util.unflatten_dict(f), ids, mask)
    ref = _torch_hidden(ahub, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got - ref)[real].max() <= 1e-4


def test_prefix_matches_peft_llama_gqa(tmp_path):
    """PEFT prefix tuning on a GQA Llama: its past_key_values place the real tokens at positions
    P..P+T-1, which our LlamaModel reproduces with position_ids = arange(T) + P."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    model, config, base = tiny_llama(tmp_path)
    pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    table = pm.prompt_encoder["default"].embedding.weight  # [P, L * 2 * H_kv * Dh]
    torch.manual_seed(1)
    with torch.no_grad():
        table.normal_(0.0, 1.0)
    h_kv, dh = config.num_kv_heads, config.head_dim
    kv = table.detach().numpy().reshape(P, config.num_layers * 2, h_kv, dh)
    spec = spec_from_config("prefix", **prefix_options("llama", flat=True))
    jmodel = LlamaModel(config, filler=spec)
    f = flat(graft(jmodel.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"], base))
    for layer in range(config.num_layers):
        root = ("layers", f"layer_{layer}", "attention", "prefix", "adapter")
        f[root + ("keys",)], f[root + ("values",)] = kv[:, 2 * layer], kv[:, 2 * layer + 1]
    ids = batch()[0]
    mask = np.ones_like(ids)
    got = out_of(jmodel, traverse_util.unflatten_dict(f), ids, mask, position_ids=np.arange(ids.shape[1]) + P)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).logits.numpy()
        plain = model(input_ids=torch.tensor(ids).long()).logits.numpy()
    assert np.abs(ref - plain).max() > 1e-2  # the prefix really acts
    assert np.abs(got - ref).max() <= 1e-4


# ------------------------------------------------------------------ prompt tuning

@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prompt_extends_sequence_and_mask(kind):
    plain, base, model, params, _ = adapted(kind, "prompt", n_tokens=P)
    assert trainable_count(params) == P * MODELS[kind][1].hidden_size
    ids, mask = batch()
    out = model.apply({"params": params}, ids, mask)
    assert out["last_hidden_state"].shape[1] == ids.shape[1] + P
    assert np.array_equal(np.asarray(out["attention_mask"]), np.concatenate([np.ones((3, P), mask.dtype), mask], 1))
    # the real tokens attend to the prompt: moving the prompt moves their outputs
    f = flat(params)
    key = ("prompt", "adapter", "embedding")
    f[key] = f[key] + 1.0
    moved = out_of(model, traverse_util.unflatten_dict(f), ids, mask)
    real = mask.astype(bool)
    assert np.abs(moved[:, P:] - np.asarray(out["logits" if kind == "llama" else "last_hidden_state"])[:, P:])[
        real].max() > 1e-3
    # padding still hides padded tokens: a padded row equals the same tokens alone
    n = int(mask[2].sum())
    alone = out_of(model, params, ids[2:3, :n], mask[2:3, :n])
    assert np.abs(out_of(model, params, ids, mask)[2, :P + n] - alone[0]).max() <= 1e-5


def test_prompt_from_vocab_equals_those_tokens_in_llama():
    """Llama has no embedding norm: a prompt set to the rows of ids A, before input X, is the
    plain model on A + X (same positions), so the prompt's logits are the plain model's."""
    plain, base, model, params, spec = adapted("llama", "prompt", n_tokens=P)
    prompt_ids = [7, 8, 9]  # cycled to P = 5: 7 8 9 7 8
    params = prompt_lib.prompt_from_vocab(params, spec, prompt_ids)
    ids = batch()[0]
    full = np.concatenate([np.broadcast_to(np.resize(prompt_ids, P), (3, P)), ids], 1).astype(np.int32)
    got = out_of(model, params, ids, np.ones_like(ids))
    assert np.abs(got - out_of(plain, base, full, np.ones_like(full))).max() <= 1e-5


def test_prompt_from_vocab_bert_norm():
    _, base, model, params, spec = adapted("bert", "prompt", n_tokens=2)
    table = np.asarray(base["embeddings"]["word_embeddings"]["embedding"])
    raw = prompt_lib.prompt_from_vocab(params, spec, [4, 5])
    assert np.array_equal(np.asarray(raw["prompt"]["adapter"]["embedding"]), table[[4, 5]])
    normed = prompt_lib.prompt_from_vocab(params, spec, [4, 5], norm_eps=1e-12)
    normed = np.asarray(normed["prompt"]["adapter"]["embedding"])
    scale, bias = (np.asarray(base["embeddings"]["norm"][k]) for k in ("scale", "bias"))
    rows = table[[4, 5]]
    ref = (rows - rows.mean(-1, keepdims=True)) / np.sqrt(rows.var(-1, keepdims=True) + 1e-12) * scale + bias
    assert np.abs(normed - ref).max() <= 1e-5


def test_prompt_matches_adapterhub_bert(tmp_path):
    """Against AdapterHub with eager attention. (With transformers' default sdpa attention,
    AdapterHub 1.3.0 extends a [B, 1, T, T] mask that no longer fits the P+T queries, and its
    padded rows differ from the same tokens run alone by ~3e-2; eager extends [B, 1, 1, T].)"""
    adapters = pytest.importorskip("adapters")
    ahub, base = _ahub_bert(tmp_path, adapters.PromptTuningConfig(prompt_length=P), attn="eager")
    weight = next(p for n, p in ahub.named_parameters() if "prompt_tunings.a." in n).detach().numpy()
    spec = spec_from_config("prompt", n_tokens=P)
    model = BertModel(BERT, filler=spec)
    f = flat(graft(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"], base))
    f[("prompt", "adapter", "embedding")] = weight
    ids, mask = batch()
    got = out_of(model, traverse_util.unflatten_dict(f), ids, mask)
    ref = _torch_hidden(ahub, ids, mask)
    assert got.shape == ref.shape == (3, P + ids.shape[1], BERT.hidden_size)
    real = np.concatenate([np.ones((3, P), bool), mask.astype(bool)], 1)
    assert np.abs(got - ref)[real].max() <= 1e-4


def test_prompt_takes_no_layers():
    with pytest.raises(ValueError, match="adapter.layers"):
        spec_from_config("prompt", layers="0-1")
