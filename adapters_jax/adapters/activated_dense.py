"""The bottleneck's up projection applied to f(pre), with a backward that keeps only `pre`.

Why: autodiff of `f(pre) @ W_up` keeps f(pre) for W_up's gradient and, for swish, the sigmoid
as well: two [B, T, r] float32 arrays per adapter beside `pre` (22 MiB of Houlsby's step memory
at MiniLM 32 x 128). The backward here recomputes f(pre), one elementwise pass over [B, T, r].
`jax.checkpoint` cannot do this on XLA:CPU: its scheduler runs the recomputation during the
forward (it depends only on `pre`) and keeps the results alive anyway, so the recomputation is
tied to the cotangent with `not_before`.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapters_jax.backbones import mixed_dense
from adapters_jax.backbones.grad_barrier import not_before


MATMULS: Dict[str, Callable] = {kind: functools.partial(mixed_dense.product_by_kind, kind)
                                for kind in ("dot", "float32", "mixed")}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def activated_matmul(activation: Callable, matmul: str, pre: jnp.ndarray, kernel: jnp.ndarray):
    """activation(pre) [..., r] @ kernel [r, D] -> [..., D] with `MATMULS[matmul]`."""
    return MATMULS[matmul](activation(pre), kernel)


def _fwd(activation, matmul, pre, kernel):
    return MATMULS[matmul](activation(pre), kernel), (pre, kernel)


def _bwd(activation, matmul, res, g):
    pre, kernel = res
    h, act_vjp = jax.vjp(activation, not_before(pre, g))  # [..., r], recomputed after g exists
    _, mm_vjp = jax.vjp(MATMULS[matmul], h, kernel)
    dh, dkernel = mm_vjp(g)
    (dpre,) = act_vjp(dh)
    return dpre, dkernel


activated_matmul.defvjp(_fwd, _bwd)


class ActivatedDense(mixed_dense.Dense):
    """mixed_dense.Dense (same parameters, same result) applied to activation(inputs), whose
    backward keeps `inputs` only (see the module doc). `activation` must be hashable (a module-
    level function): it keys the compiled backward."""
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        kernel, bias = self.parameters(jnp.shape(inputs)[-1])
        product = lambda kind, x, w, precision: activated_matmul(self.activation, kind, x, w)
        return mixed_dense.dense_apply(inputs, kernel, bias, self.dtype, self.precision, product)
