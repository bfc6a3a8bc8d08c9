"""mixed_dense: float32 is nn.Dense exactly; bf16 matches a float64 reference of the rounded
operands, forward and backward; and every dot of its gradient stays a bf16 dot on XLA:CPU."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from adapters_jax.backbones import mixed_dense
from tests.attention_checks import Attend, per_score_temp_bytes
from tests.bf16_checks import dot_operand_types


def _bf16_round(a) -> np.ndarray:
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _operands(rng, shape=(3, 7, 48), features=40):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return x, features


def test_float32_is_nn_dense_exactly():
    rng = np.random.default_rng(0)
    x, n = _operands(rng)
    ours, ref = mixed_dense.Dense(n), nn.Dense(n)
    p = ours.init(jax.random.PRNGKey(3), x)
    p_ref = ref.init(jax.random.PRNGKey(3), x)
    jax.tree.map(np.testing.assert_array_equal, p, p_ref)  # same parameters, same init
    np.testing.assert_array_equal(ours.apply(p, x), ref.apply(p, x))
    g = jax.grad(lambda q: jnp.sum(ours.apply(q, x) ** 2))(p)
    g_ref = jax.grad(lambda q: jnp.sum(ref.apply(q, x) ** 2))(p)
    jax.tree.map(np.testing.assert_array_equal, g, g_ref)


def test_bf16_forward_and_gradients_match_float64_of_rounded_operands():
    rng = np.random.default_rng(1)
    x, n = _operands(rng)
    layer = mixed_dense.Dense(n, dtype=jnp.bfloat16)
    p = layer.init(jax.random.PRNGKey(0), x)
    p = jax.tree.map(lambda a: a + 0.1, p)  # a non-zero bias
    w, b = p["params"]["kernel"], p["params"]["bias"]
    r = jnp.asarray(rng.normal(size=x.shape[:-1] + (n,)), jnp.float32)

    y = layer.apply(p, x)
    assert y.dtype == jnp.bfloat16
    xr, wr = _bf16_round(x), _bf16_round(w)
    y_ref = xr @ wr + np.asarray(b, np.float64)  # float32 accumulation, one bf16 rounding at the end
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=2 ** -7, atol=1e-2)

    def loss(x, params):
        return jnp.sum(layer.apply(params, x).astype(jnp.float32) * r)
    gx, gp = jax.grad(loss, argnums=(0, 1))(x, p)
    rr = _bf16_round(r)  # the cotangent of the bf16 output is bf16
    gx_ref = rr @ wr.T
    gw_ref = xr.reshape(-1, x.shape[-1]).T @ rr.reshape(-1, n)
    scale = lambda a: np.abs(a).max()
    np.testing.assert_allclose(np.asarray(gx, np.float64), gx_ref, atol=1e-5 * scale(gx_ref) + 1e-6)
    np.testing.assert_allclose(np.asarray(gp["params"]["kernel"], np.float64), gw_ref,
                               atol=1e-5 * scale(gw_ref) + 1e-6)
    np.testing.assert_allclose(gp["params"]["bias"], rr.reshape(-1, n).sum(0), rtol=1e-5, atol=1e-5)
    assert gx.dtype == jnp.float32 and gp["params"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("wrt", ["x", "kernel", "both"])
def test_residuals_are_only_what_the_backward_uses(wrt):
    """A frozen kernel's input is not kept (no dW), a constant input keeps no kernel (no dx), and
    each one-sided gradient equals the matching half of the two-sided one."""
    from jax._src.ad_checkpoint import saved_residuals
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(5, 64, 96)), jnp.float32)  # [B, T, K]
    w = jnp.asarray(rng.normal(size=(96, 32)), jnp.float32)  # [K, N]
    r = jnp.asarray(rng.normal(size=(5, 64, 32)), jnp.float32)
    loss = lambda x, w: jnp.sum(mixed_dense.mixed_matmul(x, w) * r)
    argnums = {"x": (0,), "kernel": (1,), "both": (0, 1)}[wrt]
    f = lambda *diff: loss(*[diff[argnums.index(i)] if i in argnums else a for i, a in enumerate((x, w))])
    saved = [a for a, _ in saved_residuals(f, *[(x, w)[i] for i in argnums]) if a.size]
    kept = sorted(a.shape for a in saved if a.shape in (x.shape, w.shape))
    want = sorted({"x": [w.shape], "kernel": [x.shape], "both": [x.shape, w.shape]}[wrt])
    assert kept == want and all(a.dtype == jnp.bfloat16 for a in saved if a.shape in want)
    both = jax.grad(loss, argnums=(0, 1))(x, w)
    one = jax.grad(loss, argnums=argnums)(x, w)
    for got, i in zip(one, argnums):
        np.testing.assert_array_equal(got, both[i])


@pytest.mark.parametrize("layer_cls", [mixed_dense.Dense, nn.Dense])
def test_bf16_gradient_dots_stay_bf16(layer_cls):
    """XLA:CPU runs bf16 dots fast only in row-major [M, K] @ [K, N] form and upcasts any other
    form to float32. Our VJP keeps all three dots bf16; autodiff through nn.Dense does not
    (so this test can fail)."""
    x = jnp.ones((4, 16, 64), jnp.float32)
    layer = layer_cls(96, dtype=jnp.bfloat16)
    p = layer.init(jax.random.PRNGKey(0), x)
    grad = lambda p, x: jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2),
                                 argnums=(0, 1))(p, x)
    types = dot_operand_types(grad, p, x)
    assert len(types) == 3, types  # forward, dx, dW
    if layer_cls is mixed_dense.Dense:
        assert types == ["bf16xbf16"] * 3, types
    else:
        assert "f32xf32" in types, types


@pytest.mark.parametrize("name", ["mixed_bmm", "float32_bmm"])
def test_canonical_bmm_matches_float64_and_keeps_its_dot_dtype(name):
    """mixed_bmm against float64 on bf16-rounded operands, float32_bmm on the operands as they
    are; every dot of the gradient in the op's own dtype."""
    bmm = getattr(mixed_dense, name)
    rnd = _bf16_round if name == "mixed_bmm" else (lambda a: np.asarray(a, np.float64))
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.normal(size=(2, 3, 8, 16)), jnp.float32)  # [B, H, M, K]
    b = jnp.asarray(rng.normal(size=(2, 3, 16, 12)), jnp.float32)  # [B, H, K, N]
    r = jnp.asarray(rng.normal(size=(2, 3, 8, 12)), jnp.float32)
    ar, br, rr = rnd(a), rnd(b), rnd(r)
    np.testing.assert_allclose(bmm(a, b), ar @ br, rtol=1e-5, atol=1e-5)
    ga, gb = jax.grad(lambda a, b: jnp.sum(bmm(a, b) * r), argnums=(0, 1))(a, b)
    np.testing.assert_allclose(ga, rr @ np.swapaxes(br, -1, -2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb, np.swapaxes(ar, -1, -2) @ rr, rtol=1e-5, atol=1e-5)
    grad = lambda a, b: jax.grad(lambda a, b: jnp.sum(bmm(a, b) ** 2), argnums=(0, 1))(a, b)
    assert dot_operand_types(grad, a, b) == (["bf16xbf16"] if name == "mixed_bmm" else ["f32xf32"]) * 3


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_bf16_training_attention_matches_the_float32_path(rate):
    """The bf16 training path (canonical batched dots) against the float32 path (on XLA:CPU the
    same canonical path, checked against float64 below) on the same bf16-rounded inputs, with
    the same dropout mask and padded keys."""
    rng = np.random.default_rng(3)
    b, t, h, dh = 2, 6, 3, 8
    q, k, v, g = (jnp.asarray(_bf16_round(rng.normal(size=(b, t, h, dh))), jnp.float32) for _ in range(4))
    key_mask = np.ones((b, t), bool)
    key_mask[1, 4:] = False  # padding in the second row
    mask = jnp.asarray(np.broadcast_to(key_mask[:, None, None, :], (b, 1, t, t)))
    mod, rngs = Attend(rate), {"dropout": jax.random.PRNGKey(7)}

    def run(dtype):
        f = lambda q, k, v: mod.apply({}, q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, rngs=rngs)
        out, vjp = jax.vjp(f, q, k, v)
        return out.astype(jnp.float32), vjp(g.astype(dtype))
    out, grads = run(jnp.bfloat16)
    out_ref, grads_ref = run(jnp.float32)
    # bf16 roundings: the probabilities before PV, the output, the cotangents of the dots
    np.testing.assert_allclose(out, out_ref, atol=0.02 * float(jnp.abs(out_ref).max()))
    for got, ref in zip(grads, grads_ref):
        np.testing.assert_allclose(got, ref, atol=0.03 * float(jnp.abs(ref).max()))
    # padded keys get no gradient
    np.testing.assert_array_equal(np.asarray(grads[1])[1, 4:], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[2])[1, 4:], 0.0)


class _AttendBias(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, q, k, v, mask, bias):
        from adapters_jax.backbones.attention import attend
        return attend(q, k, v, mask, self.rate, False, self, bias=bias, scale=1.0)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_float32_training_attention_matches_float64(rate, with_bias):
    """Float32 training attention (on XLA:CPU the canonical path with the lean softmax_pv
    backward) against the general einsum path run on float64 inputs (its logits and softmax in
    float32, everything else float64), with the same dropout mask, padded keys, and T5's form
    (an additive bias, scale 1): output and the gradients of q, k and v."""
    rng = np.random.default_rng(4)
    b, t, h, dh = 2, 6, 3, 8
    q, k, v, g = (rng.normal(size=(b, t, h, dh)) for _ in range(4))
    key_mask = np.ones((b, t), bool)
    key_mask[1, 4:] = False
    mask = jnp.asarray(np.broadcast_to(key_mask[:, None, None, :], (b, 1, t, t)))
    bias = rng.normal(size=(1, h, t, t)) if with_bias else None
    rngs = {"dropout": jax.random.PRNGKey(7)}

    def run(dtype):
        if with_bias:
            mod = _AttendBias(rate)
            f = lambda q, k, v: mod.apply({}, q, k, v, mask, jnp.asarray(bias, jnp.float32), rngs=rngs)
        else:
            mod = Attend(rate)
            f = lambda q, k, v: mod.apply({}, q, k, v, mask, rngs=rngs)
        out, vjp = jax.vjp(f, *(jnp.asarray(a, dtype) for a in (q, k, v)))
        return [np.asarray(a, np.float64) for a in (out, *vjp(jnp.asarray(g, dtype)))]
    got = run(jnp.float32)
    with jax.enable_x64(True):
        want = run(jnp.float64)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, atol=2e-6 * np.abs(w).max())
    for grad in got[2:]:  # padded keys and values get no gradient
        np.testing.assert_array_equal(grad[1, 4:], 0.0)
    if jax.default_backend() == "cpu" and not with_bias:
        grad = lambda q, k, v: jax.grad(lambda *a: jnp.sum(Attend(rate).apply({}, *a, mask, rngs=rngs) ** 2),
                                        argnums=(0, 1, 2))(q, k, v)
        types = dot_operand_types(grad, *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
        assert types == ["f32xf32"] * 6, types  # QK^T and PV, and four in the backward


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the canonical path is XLA:CPU's")
def test_float32_training_attention_holds_the_lean_residuals_per_layer():
    """What XLA holds per float32 attention layer for the backward, in bytes per score: the
    float32 probabilities (4) and the keep mask (1), plus q, k and v (1 each at Dh/T = 1/4).
    Measured 7.0; the einsum path under autodiff held 11.1 (the probabilities before and after
    dropout, and the unnormalised exponentials)."""
    per_score = per_score_temp_bytes("keep")
    assert per_score < 9.0, per_score


def test_bf16_training_attention_gradient_dots_stay_bf16():
    """All six batched dots of bf16 training attention (QK^T and PV forward, four in the
    backward) stay bf16 x bf16 when the cotangent arrives as the model sends it: bf16, [B, T,
    H, Dh]. A plain transpose of the output let XLA fold the cotangent's transpose into the dP
    dot, which then ran in float32."""
    b, t, h, dh = 2, 16, 3, 8
    q = k = v = jnp.ones((b, t, h, dh), jnp.bfloat16)
    mask = jnp.ones((b, 1, t, t), bool)
    mod, rngs = Attend(0.1), {"dropout": jax.random.PRNGKey(0)}

    w = jnp.ones((h * dh, 4), jnp.float32)

    def loss(q, k, v):  # the output projection, as in the model: its dx is the cotangent
        ctx = mod.apply({}, q, k, v, mask, rngs=rngs).reshape(b, t, h * dh)
        return jnp.sum(mixed_dense.mixed_matmul(ctx, w) ** 2)
    grad = lambda q, k, v: jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    types = dot_operand_types(grad, q, k, v)
    assert len(types) == 8 and set(types) == {"bf16xbf16"}, types  # 6 attention dots + projection, dx


class _AttendInfer(nn.Module):
    scale: float = None

    @nn.compact
    def __call__(self, q, k, v, mask, bias=None):
        from adapters_jax.backbones.attention import attend
        return attend(q, k, v, mask, 0.1, True, self, bias=bias, scale=self.scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_inference_attention_matches_float64(with_bias, dtype):
    """The inference path on XLA:CPU (canonical dots, softmax normalised after PV) against
    float64 softmax attention on the same (bf16-rounded) inputs, with padded keys; T5's form
    too (an additive bias, scale 1). Its two dots are bf16 x bf16 in bf16, float32 in float32."""
    rng = np.random.default_rng(5)
    b, t, h, dh = 2, 7, 3, 8
    q, k, v = (_bf16_round(rng.normal(size=(b, t, h, dh))) for _ in range(3))
    key_mask = np.ones((b, t), bool)
    key_mask[1, 5:] = False
    mask = np.broadcast_to(key_mask[:, None, None, :], (b, 1, t, t))
    bias = rng.normal(size=(1, h, t, t)) if with_bias else None
    scale = 1.0 if with_bias else dh ** -0.5
    mod = _AttendInfer(scale=1.0 if with_bias else None)
    f = lambda q, k, v: mod.apply({}, q, k, v, jnp.asarray(mask), None if bias is None else jnp.asarray(bias, jnp.float32))
    cast = lambda a: jnp.asarray(a, dtype)
    got = np.asarray(f(cast(q), cast(k), cast(v)).astype(jnp.float32), np.float64)
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale + (0.0 if bias is None else bias)
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p, v)
    # bf16 roundings: the unnormalised probabilities before PV, and the output
    np.testing.assert_allclose(got, want, atol=(0.02 if dtype == "bfloat16" else 1e-5) * np.abs(want).max())
    if jax.default_backend() == "cpu":
        short = {"bfloat16": "bf16", "float32": "f32"}[dtype]
        assert dot_operand_types(f, cast(q), cast(k), cast(v)) == [f"{short}x{short}"] * 2


@pytest.mark.parametrize("k,n", [(96, 8), (8, 96), (48, 48)])
def test_float32_matmul_matches_float64_and_keeps_autodiffs_residuals(k, n):
    """`float32_matmul` (float32 Dense layers on XLA:CPU): dx and dW of a [B, T, K] input match
    float64 autodiff, and as with autodiff a frozen kernel keeps no input, a constant input no
    kernel."""
    from jax._src.ad_checkpoint import saved_residuals
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 40, k)), jnp.float32)  # [B, T, K]
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)  # [K, N]
    r = rng.normal(size=(40, n))  # broadcast over the batch (a shape no residual has)
    loss = lambda x, w: jnp.sum(mixed_dense.float32_matmul(x, w) * jnp.asarray(r, jnp.float32))
    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    with jax.enable_x64(True):
        x64, w64 = jnp.asarray(np.asarray(x, np.float64)), jnp.asarray(np.asarray(w, np.float64))
        gx_ref, gw_ref = jax.grad(lambda x, w: jnp.sum((x @ w) * r), argnums=(0, 1))(x64, w64)
    for got, want in ((gx, gx_ref), (gw, gw_ref)):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5 * np.abs(want).max())
    kept = lambda f, *a: sorted(s.shape for s, _ in saved_residuals(f, *a) if s.shape in (x.shape, w.shape))
    assert kept(lambda w: loss(x, w), w) == [x.shape]
    assert kept(lambda x: loss(x, w), x) == [w.shape]


@pytest.mark.parametrize("k,n", [(96, 8), (8, 96)])
def test_float32_weight_gradient_dot_has_the_narrow_side_as_rows(k, n):
    """XLA:CPU ran [4096, 384]^T [4096, 64] at half the rate of its transpose [64, 384]: the
    weight-gradient dot's result is [min(K, N), max(K, N)] either way round (autodiff's is
    [K, N])."""
    if jax.default_backend() != "cpu":
        pytest.skip("the layout is chosen for XLA:CPU")
    x, w = jnp.ones((4, 64, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    text = jax.jit(jax.grad(lambda w: mixed_dense.float32_matmul(x, w).sum())).lower(w).compile().as_text()
    shapes = re.findall(r"= f32\[(\d+),(\d+)\]\{1,0\} dot\(", text)
    assert shapes == [(str(min(k, n)), str(max(k, n)))], shapes


def test_float32_trained_ffn_frees_its_gelu_output_before_dx():
    """The gradient of both kernels of gelu(x W1) W2 ([4, 128] rows, F = 512): the backward
    computes dW2 before dx, so GELU's output (W2's input) is freed before the [N, F] dx is
    written. XLA's scheduler wrote dx first (3.0 against 2.25 [N, F] arrays here)."""
    from adapters_jax.backbones.gelu import gelu_exact
    d, f, shape = 64, 512, (4, 128)
    w1, w2 = jnp.full((d, f), 0.01, jnp.float32), jnp.full((f, d), 0.01, jnp.float32)
    x = jnp.zeros(shape + (d,), jnp.float32)
    loss = lambda w1, w2: mixed_dense.float32_matmul(gelu_exact(mixed_dense.float32_matmul(x, w1)), w2).sum()
    temp = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w1, w2).compile().memory_analysis().temp_size_in_bytes
    nf = 4 * shape[0] * shape[1] * f
    assert temp < 2.6 * nf, temp / nf
