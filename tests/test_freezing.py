"""Freezing: labels from rules, bit-identical frozen leaves, no optimizer state for them."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from adapters_jax import optim, peft, rules, trainer
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.heads import ClassificationHead
from adapters_jax.model import AdaptedModel

TINY = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=16)


def _setup(method="houlsby", **rule_kw):
    spec = spec_from_config(method, bottleneck_dim=8) if method != "none" else None
    model = AdaptedModel(BertModel(TINY, filler=spec), ClassificationHead(3))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1, 50, (8, 10)).astype(np.int32),
             "attention_mask": np.ones((8, 10), np.int32), "labels": rng.integers(0, 3, 8).astype(np.int32)}
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    labels = rules.labels_for(params, peft.make_rules(["adapter"] if spec else [], **rule_kw))
    return model, params, labels, batch


def test_twenty_steps_leave_frozen_leaves_bit_identical_and_train_the_rest():
    model, params, labels, batch = _setup()
    tx, _ = optim.make(params, labels, lr=1e-2, total_steps=20, warmup_steps=2)
    state = trainer.create_state(params, labels, tx, jax.random.PRNGKey(1))
    step = jax.jit(trainer.make_train_step(model, tx))
    for _ in range(20):
        state, metrics = step(state, batch)
    before = traverse_util.flatten_dict(params)
    after = traverse_util.flatten_dict(state.params)
    flat_labels = traverse_util.flatten_dict(labels)
    frozen = [k for k, v in flat_labels.items() if v == peft.FROZEN]
    trained = [k for k, v in flat_labels.items() if v == peft.TRAINABLE]
    assert frozen and trained
    assert all(np.array_equal(before[k], after[k]) for k in frozen)
    assert all(not np.array_equal(before[k], after[k]) for k in trained if k[-1] == "kernel")
    assert all("adapter" in "/".join(k) or k[0] == "head" for k in trained)


def test_optimizer_state_has_no_leaf_for_frozen_params():
    model, params, labels, _ = _setup()
    tx, _ = optim.make(params, labels, lr=1e-3, total_steps=10)
    opt_state = tx.init(params)
    n_trainable = sum(v == peft.TRAINABLE for v in traverse_util.flatten_dict(labels).values())
    # AdamW keeps mu and nu for each trainable leaf and nothing for frozen ones.
    sizes = sorted(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(opt_state) if x.ndim > 0)
    trainable_sizes = sorted(int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(params).items()
                             if traverse_util.flatten_dict(labels)[k] == peft.TRAINABLE)
    assert optim.count_state_leaves(opt_state) == 2 * n_trainable
    assert sizes == sorted(trainable_sizes * 2)


def test_uncovered_parameter_is_named():
    _, params, _, _ = _setup()
    with pytest.raises(ValueError, match=r"no freezing rule matches parameter backbone/embeddings"):
        rules.labels_for(params, [(r"head/.*", "trainable"), (r"backbone/encoder/.*", "frozen")])


def test_first_match_wins_and_fullmatch():
    tree = {"a": {"kernel": 1, "bias": 2}, "ab": {"kernel": 3}}
    labels = rules.labels_for(tree, [(r"a/kernel", "x"), (r"a.*", "y"), (r".*", "z")])
    assert labels == {"a": {"kernel": "x", "bias": "y"}, "ab": {"kernel": "y"}}
    labels = rules.labels_for(tree, [(r"a", "x"), (r".*", "z")])  # 'a' alone matches no full path
    assert labels["a"]["kernel"] == "z"


@pytest.mark.parametrize("option, extra_path", [
    (dict(train_layernorm=True), ("backbone", "encoder", "layer_0", "ffn_norm", "scale")),
    (dict(train_bias=True), ("backbone", "encoder", "layer_1", "attention", "query", "bias")),
])
def test_layernorm_and_bitfit_options(option, extra_path):
    _, _, labels, _ = _setup(**option)
    flat = traverse_util.flatten_dict(labels)
    assert flat[extra_path] == peft.TRAINABLE
    assert flat[("backbone", "encoder", "layer_0", "attention", "query", "kernel")] == peft.FROZEN


@pytest.mark.parametrize("accum_steps,streams", [(4, 1), (1, 3), (2, 2)])
def test_split_batches_equal_one_big_batch(accum_steps, streams):
    """Micro-batches (scan) and streams (side by side) give the whole batch's weighted mean loss
    and gradient, also when the parts hold different total weights (padding rows weigh 0) and
    different row counts (3 streams of 8 rows: 3, 3 and 2)."""
    model, params, labels, batch = _setup()
    batch = dict(batch, weights=np.array([1, 1, 0, 1, 0, 0, 1, 0.5], np.float32))  # uneven per part
    tx, _ = optim.make(params, labels, lr=1e-2, total_steps=5)
    s1 = s2 = trainer.create_state(params, labels, tx, jax.random.PRNGKey(1))
    cfg_nodrop = BertConfig(**{**TINY.__dict__, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    model = AdaptedModel(BertModel(cfg_nodrop, filler=model.backbone.filler), ClassificationHead(3, dropout=0.0))
    big = jax.jit(trainer.make_train_step(model, tx))
    split = jax.jit(trainer.make_train_step(model, tx, accum_steps=accum_steps, streams=streams))
    for _ in range(3):
        s1, m1 = big(s1, batch)
        s2, m2 = split(s2, batch)
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
        np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1.trainable), jax.tree_util.tree_leaves(s2.trainable)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_nonfinite_step_is_skipped_when_configured():
    model, params, labels, batch = _setup()
    tx, _ = optim.make(params, labels, lr=1e-2, total_steps=5)
    state = trainer.create_state(params, labels, tx, jax.random.PRNGKey(1))
    bad = dict(batch, weights=np.full(8, np.nan, np.float32))
    step = jax.jit(trainer.make_train_step(model, tx, skip_nonfinite=True))
    new, metrics = step(state, bad)
    assert int(metrics["nonfinite"]) == 1 and int(new.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(state.trainable), jax.tree_util.tree_leaves(new.trainable)):
        assert np.array_equal(a, b)


def test_parameter_report_counts_match_the_formulas():
    from adapters_jax import report
    model, params, labels, _ = _setup()  # Houlsby r=8 on the tiny model, head of 3 labels
    rep = report.parameter_report(params, labels)
    d, r, n_layers = TINY.hidden_size, 8, TINY.num_layers
    per_adapter = 2 * d * r + d + r
    assert rep["by_site"] == {"attn_adapter": n_layers * per_adapter, "ffn_adapter": n_layers * per_adapter}
    assert rep["by_adapter"] == {"adapter": 2 * n_layers * per_adapter}
    assert rep["head"] == d * 3 + 3
    assert rep["trainable"] == 2 * n_layers * per_adapter + d * 3 + 3
    assert rep["base"] + rep["trainable"] == rep["total"]
    assert abs(rep["trainable_pct"] - 100 * rep["trainable"] / rep["base"]) < 1e-9
    assert "site attn_adapter" in report.format_report(rep)


def test_frozen_matrices_stored_in_bf16_train_a_bf16_model_identically():
    """A bf16 model reads its frozen matrices in bf16 anyway, so storing them in bf16
    (create_state's frozen_dtype) halves their memory and leaves every step unchanged;
    vectors (LayerNorm, biases) and the trainable float32 masters are not touched."""
    spec = spec_from_config("houlsby", bottleneck_dim=8)
    model = AdaptedModel(BertModel(TINY, filler=spec, dtype=jnp.bfloat16), ClassificationHead(3, dtype=jnp.bfloat16))
    _, params, labels, batch = _setup()
    tx, _ = optim.make(params, labels, lr=1e-2, total_steps=5)
    step = jax.jit(trainer.make_train_step(model, tx))
    states = {d: trainer.create_state(params, labels, tx, jax.random.PRNGKey(1), frozen_dtype=d)
              for d in (None, jnp.bfloat16)}
    frozen = traverse_util.flatten_dict(states[jnp.bfloat16].frozen)
    assert {str(v.dtype) for v in frozen.values() if v.ndim >= 2} == {"bfloat16"}
    assert {str(v.dtype) for v in frozen.values() if v.ndim < 2} == {"float32"}
    assert {str(v.dtype) for v in jax.tree.leaves(states[jnp.bfloat16].trainable)} == {"float32"}
    losses = {}
    for d, state in states.items():
        losses[d] = []
        for _ in range(5):
            state, m = step(state, batch)
            losses[d].append(float(m["loss"]))
        states[d] = state
    np.testing.assert_allclose(losses[jnp.bfloat16], losses[None], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(states[jnp.bfloat16].trainable), jax.tree.leaves(states[None].trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
