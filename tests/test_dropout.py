"""The counter-hash dropout mask: Bernoulli rates, independence and scaling, checked against the
binomial formulas, and the threefry switch against flax's own nn.Dropout."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax import dropout


@pytest.fixture(autouse=True)
def _hash_masks():
    previous = dropout.set_mask_impl("hash")
    yield
    dropout.set_mask_impl(previous)


def _z(observed: float, p: float, n: int) -> float:
    """How many binomial standard deviations a frequency is from p."""
    return abs(observed - p) / np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_keep_rate_is_binomial(keep):
    shape = (32, 12, 64, 64)  # an attention-probability shape, 1.6 M elements
    m = np.asarray(dropout.keep_mask(jax.random.PRNGKey(3), shape, keep))
    assert m.shape == shape and m.dtype == bool
    assert _z(m.mean(), keep, m.size) < 5
    # No striping: per-position rates along every axis scatter like independent binomials.
    for axis in range(4):
        rates = m.mean(axis=tuple(a for a in range(4) if a != axis))  # [shape[axis]]
        n = m.size // shape[axis]
        chi2 = (((rates - keep) ** 2) / (keep * (1 - keep) / n)).sum()
        dof = shape[axis]
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (axis, chi2, dof)


def test_neighbours_distant_elements_and_calls_are_independent():
    keep, n = 0.5, 1 << 21
    a = np.asarray(dropout.keep_mask(jax.random.PRNGKey(0), (n,), keep))
    b = np.asarray(dropout.keep_mask(jax.random.PRNGKey(1), (n,), keep))
    both = keep * keep
    assert _z((a[:-1] & a[1:]).mean(), both, n - 1) < 5  # adjacent elements
    assert _z((a[: n // 2] & a[n // 2:]).mean(), both, n // 2) < 5  # far apart
    assert _z((a & b).mean(), both, n) < 5  # two keys


def test_seeds_one_index_apart_do_not_give_shifted_copies():
    """With a single additive round, seed s + G would reproduce seed s's stream shifted by one
    element; the second (xor-keyed) round must make the two unrelated."""
    n = 1 << 16
    s0 = jnp.uint32(12345)
    g = jnp.uint32(dropout._GOLDEN)
    i = jax.lax.iota(jnp.uint32, n)
    one_round = lambda s: dropout._fmix32(i * g + s)
    assert np.array_equal(np.asarray(one_round(s0 + g))[:-1], np.asarray(one_round(s0))[1:])
    two = lambda s, t: np.asarray(dropout._fmix32(dropout._fmix32(i * g + s) ^ t)) < 2 ** 31
    x, y = two(s0, jnp.uint32(7)), two(s0 + g, jnp.uint32(99))
    assert _z((x[1:] == y[:-1]).mean(), 0.5, n - 1) < 5


def test_dropout_scales_kept_values_and_is_unbiased():
    rate = 0.25
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 64)), jnp.float32)
    y = np.asarray(dropout.dropout(x, rate, jax.random.PRNGKey(5)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    assert _z(kept.mean(), 1 - rate, kept.size) < 5
    g = np.asarray(jax.grad(lambda v: dropout.dropout(v, rate, jax.random.PRNGKey(5)).sum())(x))
    np.testing.assert_allclose(g, kept / (1 - rate), rtol=1e-6)  # the same mask in the backward


def test_module_is_identity_when_deterministic_and_draws_from_the_dropout_stream():
    x = jnp.ones((8, 16))
    m = dropout.Dropout(0.5)
    np.testing.assert_array_equal(m.apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(dropout.Dropout(1.0).apply({}, x, deterministic=False,
                                                             rngs={"dropout": jax.random.PRNGKey(0)}), 0 * x)
    a = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    b = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.array_equal(a, b)


def test_threefry_switch_reproduces_flax_dropout_exactly():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 32)), jnp.float32)
    rngs = {"dropout": jax.random.PRNGKey(9)}
    dropout.set_mask_impl("threefry")
    ours = dropout.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs)
    flax_out = nn.Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(ours, flax_out)
    with pytest.raises(ValueError, match="'philox' is not 'hash' or 'threefry'"):
        dropout.set_mask_impl("philox")
