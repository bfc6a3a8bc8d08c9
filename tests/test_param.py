"""adapters_jax.param: flax's parameter semantics without its per-trace shape check."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors

from adapters_jax.param import param


class Affine(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = param(self, "w", nn.initializers.normal(1.0), (x.shape[-1], 3))  # [D, 3]
        b = param(self, "b", nn.initializers.zeros, (3,), jnp.bfloat16)
        return x @ w + b


class FlaxAffine(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 3)) + \
            self.param("b", nn.initializers.zeros, (3,), jnp.bfloat16)


def test_init_and_apply_match_flax_param():
    x = jnp.ones((2, 4))
    ours, theirs = Affine().init(jax.random.PRNGKey(0), x), FlaxAffine().init(jax.random.PRNGKey(0), x)
    for k in ("w", "b"):  # the same initialiser draws, shapes and dtypes as self.param
        np.testing.assert_array_equal(ours["params"][k], theirs["params"][k])
        assert ours["params"][k].dtype == theirs["params"][k].dtype
    np.testing.assert_array_equal(Affine().apply(ours, x), FlaxAffine().apply(theirs, x))


def test_a_stored_parameter_of_another_shape_is_refused_as_flax_refuses_it():
    x = jnp.ones((2, 4))
    bad = {"params": {"w": jnp.ones((3, 4)), "b": jnp.zeros((3,), jnp.bfloat16)}}
    with pytest.raises(errors.ScopeParamShapeError, match=r"\(3, 4\).*\(4, 3\)|\(4, 3\).*\(3, 4\)"):
        Affine().apply(bad, x)
    with pytest.raises(errors.ScopeParamShapeError):
        FlaxAffine().apply(bad, x)
    with pytest.raises(errors.ScopeParamNotFoundError):  # a missing one, as flax
        Affine().apply({"params": {"w": jnp.ones((4, 3))}}, x)
