"""The CLS-only last layer (`AdaptedModel.skip_unread_rows`, `BertLayer` and `ViTLayer` with
first_token_only) against the model that computes every row: same logits, same gradient for every
parameter, for each kind of adapter site, with padded rows. The reference is the unchanged full
computation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax import trainer
from adapters_jax.adapters import presets, spec_from_config
from adapters_jax.adapters.spec import AdapterSpec
from adapters_jax.backbones.bert import BertModel
from adapters_jax.backbones.vit import ViTConfig, ViTModel
from adapters_jax.heads import ClassificationHead
from adapters_jax.model import AdaptedModel
from experiments import bench_steps as B

CFG = dataclasses.replace(B.MODELS["tiny"], hidden_dropout=0.0, attention_dropout=0.0)
BATCH, SEQ = 3, 12


def _padded(inputs):
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[1, 7:] = 0  # a padded row: its CLS must not see the padding either way
    mask[2, 3:] = 0
    return dict(inputs, attention_mask=mask)


def _logits_and_grads(model, params, inputs):
    x = {k: v for k, v in inputs.items() if k != "labels"}

    def loss(p):
        logits = model.apply({"params": p}, x)  # [B, 2]
        return trainer.task_loss(logits, inputs, "classification")[0], logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def _model(method):
    """A tiny BERT with a CLS head, params perturbed so that every leaf's gradient path matters
    (adapters start near identity). 'every_site': bottleneck adapters at both activation sites,
    LoRA at every dense site (the last layer's key and value see every row, the rest one row),
    prefix keys and values, and prompt tokens (position 0 is then a prompt vector), in one model."""
    spec = None
    if method == "every_site":
        spec = AdapterSpec(placements=(
            presets.houlsby(bottleneck_dim=8)
            + presets.lora(r=4, alpha=8, lora_sites=("query", "key", "value", "attn_out", "ffn_in", "ffn_out"))
            + presets.prefix(prefix_length=3, num_heads=CFG.num_heads, head_dim=CFG.hidden_size // CFG.num_heads)
            + presets.prompt(n_tokens=2)))
    model = AdaptedModel(BertModel(CFG, filler=spec), ClassificationHead(2))
    rng = np.random.default_rng(0)
    inputs = {"input_ids": rng.integers(1, CFG.vocab_size, (BATCH, SEQ)).astype(np.int32),
              "token_type_ids": np.zeros((BATCH, SEQ), np.int32),
              "labels": rng.integers(0, 2, BATCH).astype(np.int32)}
    params = jax.jit(lambda r: model.init(r, inputs)["params"])(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.05, p.shape).astype(np.float32), params)
    return model, params, _padded(inputs)


@pytest.mark.parametrize("method", ["full", "every_site"])
def test_cls_only_last_layer_matches_every_row(method):
    model, params, inputs = _model(method)
    assert model.skip_unread_rows and model.head.reads_first_token_only
    _assert_same(model, params, inputs)


def _assert_same(model, params, inputs):
    logits, grads = _logits_and_grads(model, params, inputs)
    want, want_grads = _logits_and_grads(model.clone(skip_unread_rows=False), params, inputs)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
    flat, want_flat = (dict(jax.tree_util.tree_leaves_with_path(g)) for g in (grads, want_grads))
    assert flat.keys() == want_flat.keys()
    for path, g in flat.items():
        np.testing.assert_allclose(g, want_flat[path], atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_vit_cls_only_last_block_matches_every_row():
    """The pre-LN ViT: the last block's norm still sees every patch (its keys and values)."""
    cfg = ViTConfig.from_hf(dict(image_size=12, patch_size=4, num_channels=3, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=48))
    model = AdaptedModel(ViTModel(cfg, filler=spec_from_config("houlsby", bottleneck_dim=8)), ClassificationHead(3))
    rng = np.random.default_rng(0)
    inputs = {"pixel_values": rng.normal(size=(BATCH, 12, 12, 3)).astype(np.float32),
              "labels": rng.integers(0, 3, BATCH).astype(np.int32)}
    params = jax.jit(lambda r: model.init(r, inputs)["params"])(jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.05, p.shape).astype(np.float32), params)
    _assert_same(model, params, inputs)


def test_the_backbone_returns_one_row_and_refuses_hidden_states():
    backbone = BertModel(CFG)
    ids = jnp.ones((BATCH, SEQ), jnp.int32)
    params = jax.jit(backbone.init)(jax.random.PRNGKey(0), ids)["params"]
    out = jax.jit(lambda p: backbone.apply({"params": p}, ids, first_token_only=True))(params)
    full = jax.jit(lambda p: backbone.apply({"params": p}, ids))(params)
    assert out["last_hidden_state"].shape == (BATCH, 1, CFG.hidden_size)
    assert out["attention_mask"].shape == (BATCH, 1)
    np.testing.assert_allclose(out["pooler_output"], full["pooler_output"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="output_hidden_states"):
        backbone.apply({"params": params}, ids, first_token_only=True, output_hidden_states=True)


@pytest.mark.parametrize("pooling,first_only", [("cls", True), ("pooler", True), ("mean", False)])
def test_only_heads_that_read_the_first_token_skip_rows(pooling, first_only):
    """Mean pooling reads every row, so its backbone must return them all."""
    head = ClassificationHead(2, pooling=pooling)
    assert head.reads_first_token_only is first_only
    seen = {}

    class Probe(ClassificationHead):
        def __call__(self, outputs, deterministic=True):
            seen["rows"] = outputs["last_hidden_state"].shape[1]
            return super().__call__(outputs, deterministic)

    model = AdaptedModel(BertModel(CFG), Probe(2, pooling=pooling))
    batch = {"input_ids": jnp.ones((BATCH, SEQ), jnp.int32)}
    jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)  # traces the model; runs nothing
    assert seen["rows"] == (1 if first_only else SEQ)
