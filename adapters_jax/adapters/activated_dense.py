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
from jax import lax

from adapters_jax.backbones import mixed_dense
from adapters_jax.backbones.grad_barrier import not_before


def _dot(h: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """h [..., r] @ kernel [r, D], as nn.Dense computes it."""
    return lax.dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())))


MATMULS: Dict[str, Callable] = {"dot": _dot, "float32": mixed_dense.float32_matmul,
                                "mixed": mixed_dense.mixed_matmul}


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
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        if not mixed_dense.use_cpu_bf16_kernels(self.dtype):
            inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
            matmul = "float32" if mixed_dense.use_cpu_float32_matmul(inputs.dtype, self.precision) else "dot"
            y = activated_matmul(self.activation, matmul, inputs, kernel)
            return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        y = activated_matmul(self.activation, "mixed", inputs, kernel)  # [..., D] float32
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)
