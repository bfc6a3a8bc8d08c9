"""The hand-written backwards of exact GELU and LayerNorm against float64 autodiff of the
textbook formulas, and what each keeps for the backward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from adapters_jax.backbones.gelu import gelu_exact
from adapters_jax.backbones.layer_norm import layer_norm


def _f64(fn):
    """Runs fn with float64 enabled (the reference), restoring the setting after."""
    def wrapped(*args):
        with jax.enable_x64(True):
            return jax.tree.map(np.asarray, fn(*[jnp.asarray(np.asarray(a, np.float64)) for a in args]))
    return wrapped


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_gradient_matches_float64_and_keeps_only_its_input(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 96)) * 3, dtype)  # [B, T, F], tails included
    r = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    loss = lambda x: jnp.sum(gelu_exact(x).astype(jnp.float32) * r)
    # forward: computed in float32 and rounded once, so within half an ulp of float64's gelu, plus
    # the erf form's absolute error in the far negative tail (1 + erf(x) cancels there)
    y = np.asarray(gelu_exact(x), np.float64)
    assert gelu_exact(x).dtype == dtype
    y_ref = _f64(lambda x: x * 0.5 * (1 + jax.scipy.special.erf(x / jnp.sqrt(2.0))))(np.asarray(x, np.float32))
    ulp = 2.0 ** -23 if dtype == jnp.float32 else 2.0 ** -7
    np.testing.assert_allclose(y, y_ref, rtol=ulp, atol=4 * 2.0 ** -24 * np.abs(np.asarray(x, np.float64)).max())
    g = jax.grad(loss)(x)
    assert g.dtype == dtype

    def ref(x, r):
        return jax.grad(lambda x: jnp.sum(x * 0.5 * (1 + jax.scipy.special.erf(x / jnp.sqrt(2.0))) * r))(x)
    g_ref = _f64(ref)(np.asarray(x, np.float32), r)
    # float32: a few ulps; bf16: the gradient is rounded to bf16 once
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(np.asarray(g, np.float64), g_ref, rtol=tol, atol=tol * np.abs(g_ref).max())
    kept = [a for a, _ in saved_residuals(lambda x: jnp.sum(gelu_exact(x).astype(jnp.float32)), x) if a.size > 1]
    assert [(a.shape, a.dtype) for a in kept] == [(x.shape, x.dtype)]


def _ffn_stack_bytes(layers: int) -> int:
    """XLA's temporary bytes for the input gradient of `layers` bf16 FFN blocks with frozen
    weights (x + gelu(x W1) W2, float32 matmul results, as the bf16 backbones compute them)."""
    n, d, f = 512, 64, 256
    w1 = jnp.full((layers, d, f), 0.01, jnp.bfloat16)
    w2 = jnp.full((layers, f, d), 0.01, jnp.bfloat16)

    def loss(x):
        for i in range(layers):
            h = jnp.dot(x.astype(jnp.bfloat16), w1[i], preferred_element_type=jnp.float32)  # [N, F]
            y = gelu_exact(h.astype(jnp.bfloat16))
            x = x + jnp.dot(y, w2[i], preferred_element_type=jnp.float32)  # [N, D]
        return x.sum()
    x = jnp.zeros((n, d), jnp.float32)
    return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes


def test_gelu_backward_holds_only_its_bf16_input_per_layer():
    """Each extra layer should hold GELU's bf16 input (2 B per [N, F] element) and small [N, D]
    tensors. Without the backward's dependence on the cotangent, XLA merged the backward's erf
    with the forward's and held its float32 result too (4 B more per element)."""
    per_layer = (_ffn_stack_bytes(5) - _ffn_stack_bytes(3)) / 2
    elements = 512 * 256
    assert per_layer < 3.5 * elements, per_layer / elements


def test_float32_gelu_backward_writes_into_its_cotangent():
    """The input gradient of a float32 FFN with frozen weights, x [B, T, D] -> gelu(x W1) W2:
    XLA holds GELU's input and the cotangent g W2^T ([N, F] each) and writes GELU's backward
    into g's buffer. With a sliced read of g (`not_before`) or a [B, T, F] bitcast between the
    dot and the fusion, it allocated a third [N, F] array (3.1 against 2.25 of them here)."""
    d, f, shape = 64, 512, (4, 128)
    w1 = jnp.full((d, f), 0.01, jnp.float32)
    w2 = jnp.full((f, d), 0.01, jnp.float32)
    x = jnp.zeros(shape + (d,), jnp.float32)
    temp = jax.jit(jax.grad(lambda x: (gelu_exact(x @ w1) @ w2).sum())).lower(x).compile(
        ).memory_analysis().temp_size_in_bytes
    assert temp < 2.7 * 4 * shape[0] * shape[1] * f, temp / (4 * shape[0] * shape[1] * f)


def test_layer_norm_gradients_match_float64():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 5, 48)) * 2 + 1, jnp.float32)  # [B, T, D], non-zero mean
    scale = jnp.asarray(rng.normal(size=48), jnp.float32)
    bias = jnp.asarray(rng.normal(size=48), jnp.float32)
    r = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    eps = 1e-5

    def textbook(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + eps) * scale + bias

    loss = lambda f: lambda x, s, b: jnp.sum(f(x, s, b) * r)
    ours = jax.grad(loss(lambda x, s, b: layer_norm(x, s, b, eps)), argnums=(0, 1, 2))(x, scale, bias)
    ref = _f64(jax.grad(loss(textbook), argnums=(0, 1, 2)))(x, scale, bias)
    np.testing.assert_allclose(layer_norm(x, scale, bias, eps), _f64(textbook)(x, scale, bias), atol=1e-5)
    for got, want in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_layer_norm_keeps_normalised_values_and_one_scalar_per_row():
    x = jnp.ones((2, 7, 32), jnp.float32) * jnp.arange(32.0)
    scale, bias = jnp.ones(32), jnp.zeros(32)
    kept = [a for a, _ in saved_residuals(lambda x: layer_norm(x, scale, bias, 1e-5).sum(), x)]
    per_row = sorted(int(np.prod(a.shape)) // 14 for a in kept if a.shape[:2] == (2, 7))
    assert per_row == [1, 32]  # rstd and x_hat; autodiff of the textbook formula keeps 3 x [.., D]
