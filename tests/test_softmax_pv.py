"""softmax_dropout_pv (attention's softmax, dropout and PV matmul with a lean backward, in bf16
and in float32) against float64 autodiff of the textbook formulas, what it keeps, and what
XLA:CPU holds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from adapters_jax.backbones.softmax_pv import softmax_dropout_pv

B, H, T, S, DH = 2, 3, 16, 24, 8
RATE = 0.25


def _inputs(seed=0, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, H, T, S)) * 2
    logits[..., -5:] = np.finfo(np.float32).min  # masked keys, as attention masks them
    keep = rng.random((B, H, T, S)) > RATE
    v = rng.normal(size=(B, H, S, DH))
    r = rng.normal(size=(B, H, T, DH))  # the loss's random projection
    return (jnp.asarray(logits, jnp.float32), jnp.asarray(keep), jnp.asarray(v, dtype),
            jnp.asarray(r, jnp.float32))


def _textbook(logits, keep, v, r, rate):
    p = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        p = jnp.where(keep, p / (1 - rate), 0.0)
    return jnp.sum(jnp.einsum("bhts,bhsd->bhtd", p, v) * r)


# bf16: P and P_drop are rounded to bf16 (relative 2^-9) and g to bf16 before the matmuls;
# float32: nothing is rounded below float32
TOLERANCE = {jnp.bfloat16: (2 ** -7, 2 ** -6), jnp.float32: (1e-5, 1e-5)}  # forward, gradients


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("dropout", [True, False])
def test_gradients_match_float64_textbook(dropout, dtype):
    logits, keep, v, r = _inputs(dtype=dtype)
    keep = keep if dropout else None
    rate = RATE if dropout else 0.0
    fwd_tol, grad_tol = TOLERANCE[dtype]
    ours = jax.grad(lambda l, v: jnp.sum(softmax_dropout_pv(l, keep, v, rate, dtype) * r),
                    argnums=(0, 1))(logits, v)
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
        ref = jax.grad(_textbook, argnums=(0, 2))(f64(logits), keep, f64(v), f64(r), rate)
        fwd_ref = np.asarray(jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(f64(logits), -1)
                                        * (1.0 if keep is None else jnp.where(keep, 1 / (1 - rate), 0.0)), f64(v)))
    np.testing.assert_allclose(np.asarray(softmax_dropout_pv(logits, keep, v, rate, dtype), np.float64), fwd_ref,
                               atol=fwd_tol * np.abs(fwd_ref).max())
    assert ours[1].dtype == dtype
    for got, want in zip(ours, ref):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=grad_tol * np.abs(want).max())
    assert np.all(np.asarray(ours[0])[..., -5:] == 0)  # masked keys get no gradient


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_keeps_the_probabilities_the_keep_mask_and_values_only(dtype):
    logits, keep, v, _ = _inputs(dtype=dtype)
    kept = saved_residuals(lambda l, v: jnp.sum(softmax_dropout_pv(l, keep, v, RATE, dtype)), logits, v)
    got = sorted((a.shape, str(a.dtype)) for a, _ in kept if a.size > 1)
    name = jnp.dtype(dtype).name
    assert got == sorted([((B, H, T, S), name), ((B, H, T, S), "bool"), ((B, H, S, DH), name)])


def _stack_step_bytes(layers: int, dtype) -> int:
    """XLA's temporary bytes for the gradient of `layers` chained attention ops (each layer's
    output is mixed back into the next layer's logits)."""
    t = 128
    logits = jnp.zeros((4, 4, t, t), jnp.float32)
    v = jnp.zeros((4, 4, t, 32), dtype)
    keeps = jnp.ones((layers, 4, 4, t, t), bool)

    def loss(v):
        x, l = v, logits
        for i in range(layers):
            out = softmax_dropout_pv(l, keeps[i], x, 0.1, dtype)  # [4, 4, T, 32]
            l = l + jnp.einsum("bhtd,bhsd->bhts", out, out)
            x = out.astype(dtype)
        return x.astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss)).lower(v).compile().memory_analysis().temp_size_in_bytes


# bytes per score: kept 2 (bf16 P) or 4 (float32 P) + 1 (mask), plus the f32 logits the next
# layer adds to and [.., T, 32] tensors (under 1 B per score). Measured 3.5 and 5.0; autodiff of
# the textbook formulas 10.1 and 9.1
PER_SCORE_BOUND = {jnp.bfloat16: 5.5, jnp.float32: 6.5}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_xla_holds_about_the_kept_bytes_per_layer(dtype):
    """On XLA:CPU each extra layer should cost what it keeps (P, the mask and the layer's
    small tensors), not the float32 and dropped copies of P its backward builds, which the
    scheduler would otherwise compute during the forward and hold (not_before prevents that)."""
    per_layer = (_stack_step_bytes(4, dtype) - _stack_step_bytes(2, dtype)) / 2
    scores = 4 * 4 * 128 * 128
    assert per_layer < PER_SCORE_BOUND[dtype] * scores, per_layer / scores
