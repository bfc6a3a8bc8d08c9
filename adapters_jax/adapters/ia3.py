"""(IA)^3 (Liu et al. 2022): learned vectors that rescale dense layers, at the dense sites.

Two placements, as in PEFT's IA3:
  output scaling (key, value):          y = (x W + b) * l      l [out]
  input scaling (feedforward, ffn_out): y = (x * l) W + b      l [in]
The FFN's input scaling multiplies the *input* of ffn_out, i.e. the intermediate activation
after the non-linearity (and, in Llama, after the SwiGLU gate product), which is the paper's
l_ff. Vectors start at ones, which leaves the output bit-identical (x * 1 == x in floating
point). The vector lives at `<site>/<name>/scale`; `IA3Dense` subclasses (mixed_dense's)
nn.Dense so the base keeps `<site>/kernel` and `<site>/bias`.
Under 'select' composition (several adapters, one per row) `composition.SelectDense` picks
each row's own vector, with the same parameter paths.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.custom_derivatives import SymbolicZero

from adapters_jax.adapters.lora import without_method, site_groups
from adapters_jax.backbones import mixed_dense
from adapters_jax.param import param


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """One IA3 vector. scale_input=True is PEFT's `feedforward_modules` behaviour."""
    scale_input: bool = False

    def __post_init__(self):
        if not isinstance(self.scale_input, bool):
            raise ValueError(f"adapter.scale_input={self.scale_input!r} must be True or False")


class IA3Scale(nn.Module):
    """The learned vector, `<site>/<name>/scale`, initialised to ones."""
    size: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return param(self, "scale", nn.initializers.ones, (self.size,), self.param_dtype)


@jax.custom_vjp
def scale_features(x: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """x [..., F] * scale [F], in x's dtype, whose scale gradient sums x * g in float32.

    Why: autodiff of a bf16 product sums x * g over the rows in bf16, which XLA:CPU rewrites
    into a tree of reduce-windows: at MiniLM's [32, 128, 1536] 18.3 ms and, against float64,
    5% of the largest entry off. This sum in float32 takes 1.9 ms and is exact to float32.
    In the bf16 IA3 train step (MiniLM 32 x 128) the 18 column sums took 147 ms of a 0.73 s
    step (profile); with this op the step went 0.765 -> 0.657 s (in-process A/B). The price:
    x is kept for the backward (XLA had recomputed the FFN site's x, the GELU output, inside
    its reduction), +107 MiB of step memory (480 -> 587 MiB).
    """
    return x * scale.astype(x.dtype)


def _scale_fwd(x, scale):
    # the zero-size array carries the scale's dtype to the backward
    return x.value * scale.value.astype(x.value.dtype), (x.value if scale.perturbed else None,
                                                          scale.value, jnp.zeros((0,), scale.value.dtype))


def _scale_bwd(res, g):
    x, scale, scale_like = res
    if isinstance(g, SymbolicZero):
        return None, None
    dx = g * scale.astype(g.dtype)  # [..., F]
    if x is None:  # a frozen vector
        return dx, None
    rows = tuple(range(x.ndim - 1))
    return dx, jnp.sum(x.astype(jnp.float32) * g.astype(jnp.float32), axis=rows).astype(scale_like.dtype)


scale_features.defvjp(_scale_fwd, _scale_bwd, symbolic_zeros=True)


class IA3Dense(mixed_dense.Dense):
    """The backbone's dense layer (`mixed_dense.Dense`: nn.Dense's parameters and results, with
    XLA:CPU's fast bf16 kernels in a bf16 backbone) with an IA3 vector on its input or output;
    built as partial(IA3Dense, adapter=, adapter_name=)."""
    adapter: IA3Config = IA3Config()
    adapter_name: str = "adapter"

    @nn.compact
    def __call__(self, inputs):
        if self.adapter.scale_input:
            scale = IA3Scale(inputs.shape[-1], self.param_dtype, name=self.adapter_name)()
            return super().__call__(scale_features(inputs, scale))
        y = super().__call__(inputs)
        scale = IA3Scale(self.features, self.param_dtype, name=self.adapter_name)()
        return scale_features(y, scale)


def merge_ia3(params: Any, spec) -> tuple[dict, Any]:
    """Folds every IA3 vector into its dense layer (W * l[None] and b * l, or W * l[:, None]).

    Returns (params without `scale` leaves, the spec without IA3 placements). Unlike LoRA
    this is not undone without the vectors, and a zero entry of l loses that row/column.
    """
    flat = traverse_util.flatten_dict(dict(params))
    for site, cfg in site_groups(params, spec, "ia3", "scale").items():
        scale = np.asarray(flat.pop(site + (spec.name, "scale")), np.float64)
        kernel = flat[site + ("kernel",)]
        k = np.asarray(kernel, np.float64)
        flat[site + ("kernel",)] = jnp.asarray(k * (scale[:, None] if cfg.scale_input else scale[None, :]),
                                               dtype=kernel.dtype)
        bias = flat.get(site + ("bias",))
        if bias is not None and not cfg.scale_input:
            flat[site + ("bias",)] = jnp.asarray(np.asarray(bias, np.float64) * scale, dtype=bias.dtype)
    return traverse_util.unflatten_dict(flat), without_method(spec, "ia3")


def _register():
    from adapters_jax.adapters.spec import register
    register("ia3", IA3Config, IA3Dense, "dense")


_register()
