"""attention_recompute (training attention whose backward recomputes the probabilities) against
float64 autodiff of the textbook formulas, against the default 'keep' path through `attend`,
and what XLA:CPU holds per layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax.backbones import attention
from adapters_jax.backbones.recompute_attention import attention_recompute
from adapters_jax.dropout import keep_mask
from tests.attention_checks import Attend, per_score_temp_bytes

B, H, T, S, DH = 2, 3, 8, 12, 8
RATE = 0.25


def _inputs(dtype):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(B, H, n, DH)) for n in (T, S, S))
    mask = np.ones((B, 1, T, S), bool)
    mask[1, ..., 9:] = False  # padded keys in the second example
    mask[0, 0, 3] = False  # a query that may attend nothing: a uniform row, as jax.nn.softmax gives
    g = rng.normal(size=(B, H, T, DH))
    return [jnp.asarray(a, dtype) for a in (q, np.swapaxes(k, -1, -2), v)], jnp.asarray(mask), g


def _textbook(q, kt, v, mask, keep, rate, scale):
    logits = jnp.where(mask, q @ kt * scale, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(logits, axis=-1)
    if keep is not None:
        p = jnp.where(keep, p / (1 - rate), 0.0)
    return p @ v


# float32: nothing rounded below float32; bf16: q, k, v, P_drop, g and dL rounded to bf16
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 2 ** -5}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rate", [0.0, RATE])
def test_matches_float64_textbook(rate, dtype):
    (q, kt, v), mask, g = _inputs(dtype)
    rng = jax.random.PRNGKey(3)
    scale = DH ** -0.5
    f = lambda q, kt, v: attention_recompute(q, kt, v, mask, rng, rate, scale, dtype)
    out, vjp = jax.vjp(f, q, kt, v)
    grads = vjp(jnp.asarray(g, jnp.float32))
    keep = keep_mask(rng, (B, H, T, S), 1 - rate) if rate else None
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
        ref = lambda q, kt, v: _textbook(q, kt, v, mask, keep, rate, scale)
        want, vjp64 = jax.vjp(ref, f64(q), f64(kt), f64(v))
        want_grads = vjp64(f64(g))
    for got, ref_ in zip((out, *grads), (want, *want_grads)):
        ref_ = np.asarray(ref_)
        np.testing.assert_allclose(np.asarray(got, np.float64), ref_, atol=TOLERANCE[dtype] * np.abs(ref_).max())
    assert [a.dtype for a in grads] == [dtype] * 3
    np.testing.assert_array_equal(np.asarray(grads[1], np.float64)[1, ..., 9:], 0.0)  # padded keys


def _attend_with(backward, rate, dtype, q, k, v, mask, g):
    previous = attention.set_training_backward(backward)
    try:
        f = lambda q, k, v: Attend(rate).apply({}, q, k, v, mask, rngs={"dropout": jax.random.PRNGKey(5)})
        out, vjp = jax.vjp(f, q, k, v)
        return [np.asarray(a, np.float64) for a in (out, *vjp(g))]
    finally:
        attention.set_training_backward(previous)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="both backwards are XLA:CPU's canonical paths")
@pytest.mark.parametrize("rate", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_recompute_gives_what_keep_gives(dtype, rate):
    """Through `attend`: the same dropout mask (drawn from the module's rng in both; no key at
    rate 0), the same output and gradients as the default backward."""
    rng = np.random.default_rng(1)
    q, k, v, g = (jnp.asarray(rng.normal(size=(2, 16, 3, 8)), dtype) for _ in range(4))
    mask = jnp.ones((2, 1, 16, 16), bool).at[1, ..., 12:].set(False)
    keep = _attend_with("keep", rate, dtype, q, k, v, mask, g)
    recompute = _attend_with("recompute", rate, dtype, q, k, v, mask, g)
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -6  # bf16: P rounded before the softmax backward in 'keep'
    for a, b in zip(recompute, keep):
        np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max())


def test_unknown_backward_is_refused():
    with pytest.raises(ValueError, match="'flash' is not one of"):
        attention.set_training_backward("flash")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the canonical path is XLA:CPU's")
def test_keeps_nothing_score_sized_per_layer():
    """Per layer, in bytes per score: q, k and v (1 each at Dh/T = 1/4 in float32), nothing of
    the scores. Measured 1.06; 'keep' holds 7.0 (the probabilities and the mask besides). Without
    `not_before` XLA merged the backward's recomputation with the forward and kept its results."""
    per_score = per_score_temp_bytes("recompute")
    assert per_score < 2.0, per_score


def test_typed_and_raw_dropout_keys_give_the_same_gradients():
    """flax hands out raw uint32 keys or typed ones (jax.random.key): the backward's
    recomputed keep mask must be the forward's either way."""
    (q, kt, v), mask, g = _inputs(jnp.float32)
    grads = [jax.vjp(lambda q, kt, v: attention_recompute(q, kt, v, mask, key, RATE, 0.3, jnp.float32),
                     q, kt, v)[1](jnp.asarray(g, jnp.float32))
             for key in (jax.random.PRNGKey(3), jax.random.key(3))]
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(grads[0][2])).max() > 0
