"""LoRA (Hu et al. 2021) at the dense sites, with exact merge and unmerge.

A LoRA site computes  y = x W + b + s * dropout(x) A B  with A [in, r], B [r, out] and the
scaling s = alpha / r (alpha / sqrt(r) with `use_rslora`). B starts at zero, so an untrained
LoRA leaves the model's output bit-identical. `LoRADense` subclasses nn.Dense, so the base
weights keep their paths (`.../query/kernel`, `.../query/bias`) and the LoRA factors sit
beside them under the adapter's name: `.../query/<name>/lora_a`, `.../query/<name>/lora_b`.

Dropout on the LoRA input: a dense site is called like nn.Dense, with no `deterministic`
argument, so LoRA dropout is on exactly when the caller supplies a 'dropout' rng (flax's
convention: training applies pass `rngs={'dropout': key}`, evaluation passes none). The
backbones' own dropout draws from the same stream, so a training step needs it anyway.
An evaluation that passes a 'dropout' rng with deterministic=True would still drop LoRA
inputs: don't pass one there. With the default `dropout=0.0` the question does not arise.

`merge_lora` folds W + s A B into each kernel and drops the LoRA leaves and placements, so
the merged model is a plain model (no extra parameters, no extra FLOPs); `unmerge_lora`
undoes it given the LoRA factors.

Several LoRA adapters in one model (an `AdapterSetup` with composition 'select', PEFT's
mixed-batch `adapter_names=[...]`): each dense site becomes a `composition.SelectDense`,
which keeps these same parameter paths, computes x W + b once and adds to each row only its
own adapter's s * x A B, chosen by the `adapter_ids` [B] of the model call.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapters_jax.backbones import mixed_dense, sites
from adapters_jax.backbones.mixed_dense import (float32_matmul, mixed_matmul, use_cpu_bf16_kernels,
                                               use_cpu_float32_matmul)
from adapters_jax.dropout import Dropout
from adapters_jax.param import param

INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """One LoRA adapter; names follow PEFT's LoraConfig (r, lora_alpha, lora_dropout, use_rslora)."""
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init: str = "kaiming"  # A ~ U(±1/sqrt(in)) as PEFT's default; 'gaussian': A ~ N(0, 1/r). B = 0.
    use_rslora: bool = False  # scaling alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"adapter.r={self.r!r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if self.init not in INITS:
            raise ValueError(f"adapter.init={self.init!r} is not one of {INITS}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRAFactors(nn.Module):
    """The low-rank update s * dropout(x) A B; its params are `<site>/<name>/lora_{a,b}`."""
    config: LoRAConfig
    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        d_in = x.shape[-1]
        a_init = (nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform") if c.init == "kaiming"
                  else nn.initializers.normal(1.0 / c.r))
        a = param(self, "lora_a", a_init, (d_in, c.r), self.param_dtype)  # [in, r]
        b = param(self, "lora_b", nn.initializers.zeros, (c.r, self.features), self.param_dtype)  # [r, out]
        dtype = self.dtype or x.dtype
        train = c.dropout > 0.0 and self.has_rng("dropout") and not self.is_initializing()
        x = Dropout(c.dropout)(x, deterministic=not train)
        if use_cpu_bf16_kernels(dtype):  # canonical bf16 dots, float32 accumulation (mixed_dense)
            h = mixed_matmul(x, a).astype(dtype)  # [..., r]
            return (mixed_matmul(h, b) * c.scaling).astype(dtype)  # [..., out]
        # float32 on XLA:CPU: dA's [in, r] result as the transpose of an [r, in] dot (weight_gradient)
        dot = float32_matmul if use_cpu_float32_matmul(dtype) else jnp.dot
        h = dot(x.astype(dtype), a.astype(dtype))  # [..., r]
        return dot(h, b.astype(dtype)) * jnp.asarray(c.scaling, dtype)  # [..., out]


class LoRADense(mixed_dense.Dense):
    """The backbone's dense layer (`mixed_dense.Dense`: nn.Dense's parameters and results, with
    XLA:CPU's fast bf16 kernels in a bf16 backbone) plus a LoRA update; built by the spec as
    partial(LoRADense, adapter=, adapter_name=).

    Why mixed_dense: as a plain nn.Dense, a LoRA site in a bf16 backbone fell back to float32
    dots with converts (a bf16 result, and transposed operands in the backward), as did the
    factors' own dots. Measured at MiniLM 32 x 128 bf16 on the 2-core CPU (r=8 on query and
    value, in-process A/B): the train step 0.681 -> 0.602 s, XLA step memory 419 -> 398 MiB."""
    adapter: LoRAConfig = LoRAConfig()
    adapter_name: str = "adapter"

    @nn.compact
    def __call__(self, inputs):
        y = super().__call__(inputs)
        delta = LoRAFactors(self.adapter, self.features, self.dtype, self.param_dtype,
                            name=self.adapter_name)(inputs)
        return y + delta.astype(y.dtype)


# ---------------------------------------------------------------- merge / unmerge

def layer_of(path: tuple) -> int:
    for part in path:
        m = re.fullmatch(r"layer_(\d+)", str(part))
        if m:
            return int(m.group(1))
    return -1


def site_groups(params: Any, spec, method: str, leaf: str) -> dict:
    """{site path (tuple): config} for every dense site where `spec`'s `method` adapter lives.

    A site is found by its parameter `<site>/<spec.name>/<leaf>`; its config is the placement
    that fills that site in that layer (layer read from a `layer_<i>` path element).
    """
    out = {}
    for path in traverse_util.flatten_dict(dict(params)):
        if len(path) < 3 or path[-1] != leaf or path[-2] != spec.name or path[-3] not in sites.DENSE_SITES:
            continue
        site = path[-3]
        p = spec.placement(site, layer_of(path))
        if p is None:  # no layer index in the path: the one placement at this site
            p = next((q for q in spec.placements if q.site == site), None)
        if p is not None and p.method == method:
            out[path[:-2]] = p.config
    return out


def without_method(spec, method: str):
    return dataclasses.replace(spec, placements=tuple(p for p in spec.placements if p.method != method))


def _delta(flat: dict, site: tuple, name: str, cfg: LoRAConfig) -> np.ndarray:
    a = np.asarray(flat[site + (name, "lora_a")], np.float64)
    b = np.asarray(flat[site + (name, "lora_b")], np.float64)
    return cfg.scaling * (a @ b)  # [in, out]


def merge_lora(params: Any, spec) -> tuple[dict, Any]:
    """Folds every LoRA update of `spec` into its kernel: W <- W + s A B (computed in float64).

    Returns:
      (merged params without any `lora_a`/`lora_b` leaves, the spec without its LoRA
      placements). Build the serving model with the returned spec: it has no LoRA parameters
      and computes the plain dense layers.
    """
    flat = traverse_util.flatten_dict(dict(params))
    groups = site_groups(params, spec, "lora", "lora_a")
    for site, cfg in groups.items():
        kernel = flat[site + ("kernel",)]
        merged = np.asarray(kernel, np.float64) + _delta(flat, site, spec.name, cfg)
        flat[site + ("kernel",)] = jnp.asarray(merged, dtype=kernel.dtype)
        del flat[site + (spec.name, "lora_a")], flat[site + (spec.name, "lora_b")]
    return traverse_util.unflatten_dict(flat), without_method(spec, "lora")


def unmerge_lora(merged_params: Any, lora_params: Any, spec) -> dict:
    """The inverse of `merge_lora`: W <- W - s A B, and the LoRA leaves put back.

    Args:
      merged_params: what `merge_lora` returned.
      lora_params: any tree holding the LoRA leaves at their usual paths (the full adapted
        params, or only the trainable part).
      spec: the original spec, with its LoRA placements.
    Returns:
      params for the model built with `spec` (kernels equal to the originals up to float32
      rounding of W + s A B).
    """
    flat = traverse_util.flatten_dict(dict(merged_params))
    lora_flat = traverse_util.flatten_dict(dict(lora_params))
    groups = site_groups(lora_params, spec, "lora", "lora_a")
    if not groups:
        raise ValueError(f"unmerge_lora: lora_params holds no LoRA factors for adapter {spec.name!r}")
    for site, cfg in groups.items():
        kernel = flat[site + ("kernel",)]
        restored = np.asarray(kernel, np.float64) - _delta(lora_flat, site, spec.name, cfg)
        flat[site + ("kernel",)] = jnp.asarray(restored, dtype=kernel.dtype)
        for leaf in ("lora_a", "lora_b"):
            flat[site + (spec.name, leaf)] = lora_flat[site + (spec.name, leaf)]
    return traverse_util.unflatten_dict(flat)


def lora_param_count(d_in: int, d_out: int, r: int) -> int:
    """Parameters LoRA adds to one d_in x d_out dense layer: r (d_in + d_out)."""
    return r * (d_in + d_out)


def _register():
    from adapters_jax.adapters.spec import register
    register("lora", LoRAConfig, LoRADense, "dense")


_register()
