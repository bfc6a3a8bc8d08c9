"""compile_options: forward programs with YNNPACK kept to dots, float32 dots in oneDNN (forward
and train), the same results as a float64 evaluation, and the options really in the program."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax.adapters import spec_from_config
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.compile_options import (ONEDNN_ENV, describe, forward_compiler_options, forward_jit,
                                          onednn_available, onednn_dot_options, onednn_enabled, train_compiler_options, train_jit)

CFG = BertConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                 attention_dropout=0.0, hidden_dropout=0.0)
ON_CPU = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """oneDNN dots are opt-in: these tests check them, so they turn them on."""
    monkeypatch.setenv(ONEDNN_ENV, "1")


def _houlsby(dtype, out_dtype=jnp.float32):
    """(forward fn, loss fn, params) of a 2-layer Houlsby model with weights well away from init."""
    model = BertModel(CFG, filler=spec_from_config(method="houlsby", bottleneck_dim=8), dtype=dtype)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CFG.vocab_size, (4, 24)).astype(np.int32)  # [B, T]
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # a padded row
    params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
    # attention far from uniform (so the mask and the scores matter), non-zero up projections
    # (so the adapters change the output)
    noise = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda x: x + noise.normal(0, 0.15, x.shape).astype(x.dtype) if x.ndim == 2 else x, params)
    target = rng.normal(size=(4, 24, CFG.hidden_size))  # [B, T, D]

    def forward(p):
        return model.apply({"params": p}, ids, mask)["last_hidden_state"].astype(out_dtype)

    def loss(p):  # every parameter gets a gradient: every dot of a full backward runs
        return jnp.mean((forward(p) - target.astype(out_dtype)) ** 2)
    return forward, loss, params


def _float64(fn_name, params):
    """The forward or the gradient at the same parameters, in float64 (x64 mode, plain jit)."""
    with jax.enable_x64(True):
        forward, loss, _ = _houlsby(jnp.float64, jnp.float64)
        fn = {"forward": forward, "grad": jax.grad(loss)}[fn_name]
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        return jax.tree_util.tree_map(np.asarray, jax.jit(fn)(p64))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_forward_jit_matches_float64(dtype, tol):
    """forward_jit's output against the same parameters evaluated in float64 (x64 mode, plain
    jit): float32 (oneDNN's dots on x86 CPUs) to its rounding, bf16 (XLA:CPU's bf16 kernels and
    the canonical-dot attention) to bf16's."""
    forward, _, params = _houlsby(dtype)
    got = np.asarray(forward_jit(forward, dtype=dtype)(params), np.float64)
    want = _float64("forward", params)
    assert want.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_train_jit_gradients_match_float64():
    """Every gradient of a float32 program compiled by train_jit against float64, to float32's
    rounding (absolute part relative to the largest gradient: some, like the key bias's, are 0
    in exact arithmetic)."""
    _, loss, params = _houlsby(jnp.float32)
    got = train_jit(jax.grad(loss), dtype=jnp.float32)(params)
    want = _float64("grad", params)
    flat_got, flat_want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(flat_got) == len(flat_want) > 20
    scale = max(np.abs(w).max() for w in flat_want)
    for g, w in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-4, atol=1e-6 * scale)


def _fusion_kinds(hlo: str) -> dict:
    """fusion computation name -> its library kind ('__ynn_fusion', '__onednn_fusion', ...)."""
    return dict(re.findall(r"calls=%([\w.\-]+), [^\n]*\"kind\":\"(__\w+_fusion)\"", hlo))


def _reducing(hlo: str, names) -> list:
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S)}
    return [c for c in names if " reduce(" in bodies.get(c, "")]


@ON_CPU
def test_forward_jit_keeps_ynnpack_to_dots():
    """The bf16 forward still runs its dots in YNNPACK, and no YNNPACK fusion reduces
    (LayerNorm, softmax): the option took effect."""
    forward, _, params = _houlsby(jnp.bfloat16)
    hlo = forward_jit(forward, dtype=jnp.bfloat16).lower(params).compile().as_text()
    ynn = [c for c, k in _fusion_kinds(hlo).items() if k == "__ynn_fusion"]
    assert ynn, "no YNNPACK fusion at all: the dots should still use it"
    assert not _reducing(hlo, ynn), _reducing(hlo, ynn)


@pytest.mark.skipif(not onednn_available(), reason="XLA:CPU has oneDNN on x86-64 only")
@pytest.mark.parametrize("kind", ["forward", "train"])
def test_float32_dots_run_in_onednn(kind):
    """In float32 programs the dots are oneDNN fusions and none of them reduces; bf16 programs
    have none (measured slower or unchanged there)."""
    assert onednn_dot_options(jnp.float32)
    forward, loss, params = _houlsby(jnp.float32)
    fn, jit = (forward, forward_jit) if kind == "forward" else (jax.grad(loss), train_jit)
    hlo = jit(fn, dtype=jnp.float32).lower(params).compile().as_text()
    onednn = [c for c, k in _fusion_kinds(hlo).items() if k == "__onednn_fusion"]
    assert len(onednn) >= 2 * CFG.num_layers, onednn  # at least the attention's dots per layer
    assert not _reducing(hlo, onednn)
    assert "onednn" not in str(train_compiler_options(jnp.bfloat16)) + str(forward_compiler_options(jnp.bfloat16))


def test_onednn_switch_off(monkeypatch):
    """ADAPTERS_JAX_CPU_ONEDNN=0 leaves every program on XLA's default dot library."""
    monkeypatch.setenv(ONEDNN_ENV, "0")
    assert onednn_dot_options(jnp.float32) == {} == train_compiler_options(jnp.float32)
    assert "xla_cpu_use_onednn" not in forward_compiler_options(jnp.float32)
    assert "XLA's default" in describe(jnp.float32) and describe(jnp.float32).endswith(f"{ONEDNN_ENV}=0")


def test_onednn_is_opt_in(monkeypatch):
    """Unset, the variable leaves oneDNN off (its fusions are experimental: see compile_options)."""
    monkeypatch.delenv(ONEDNN_ENV)
    assert not onednn_enabled() and onednn_dot_options(jnp.float32) == {}
    monkeypatch.setenv(ONEDNN_ENV, "1")
    assert onednn_enabled()


def test_onednn_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(ONEDNN_ENV, "yes")
    with pytest.raises(ValueError, match=f"^{ONEDNN_ENV}='yes' must be"):
        onednn_enabled()


@ON_CPU
def test_memory_scheduler_holds_fewer_activations_for_the_same_step(monkeypatch):
    """train.cpu_scheduler='memory' reaches XLA:CPU: a 2-stream Houlsby train step holds less
    temporary memory (one stream's activations at a time instead of both) and computes the same
    new state and metrics as the default schedule."""
    from adapters_jax import trainer
    from experiments.bench_steps import MODELS, build
    monkeypatch.setenv(ONEDNN_ENV, "0")  # XLA's default dots, as training runs by default
    model, tx, state, inputs, _, _ = build(MODELS["tiny"], "houlsby", jnp.float32, 32, 64)
    step = trainer.make_train_step(model, tx, streams=2)
    temp, result = {}, {}
    for scheduler in ("default", "memory"):
        compiled = train_jit(step, dtype=jnp.float32, scheduler=scheduler).lower(state, inputs).compile()
        temp[scheduler] = compiled.memory_analysis().temp_size_in_bytes
        result[scheduler] = jax.device_get(compiled(state, inputs))
    assert temp["memory"] < 0.8 * temp["default"], temp
    for a, b in zip(jax.tree_util.tree_leaves(result["default"]), jax.tree_util.tree_leaves(result["memory"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
