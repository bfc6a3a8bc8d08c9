"""Compacter and Compacter++ (Mahabadi et al. 2021): bottleneck adapters with PHM projections.

Each projection is a parameterized hypercomplex multiplication (PHM) layer, as in AdapterHub's
`PHMLayer` (weights copy over unchanged, same names and shapes):

  y = x H + b,   H = sum_{i=1..n} A_i (x) W_i  in R^{d_in x d_out}   (Kronecker product, A_i on the left)
  A   = phm_rule [n, n, n]: one set for the whole model (`shared_adapters/<name>/phm_rule`),
        shared by every layer and by both projections
  W_i = W_left[i] @ W_right[i], W_left [n, d_in/n, k], W_right [n, k, d_out/n], k = phm_rank

so one projection holds k (d_in + d_out) weights plus d_out biases, and the model n^3 more.
Everything around the two projections (LayerNorms, residuals, scaling, parallel or
sequential) follows the BottleneckConfig flags exactly as BottleneckAdapter does.
Compacter = Houlsby placement (AdapterHub `compacter`), Compacter++ = Pfeiffer (`compacter++`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from adapters_jax.adapters.bottleneck import BottleneckAdapter, BottleneckConfig, bottleneck
from adapters_jax.backbones.mixed_dense import (float32_matmul, is_bf16, mixed_matmul, use_cpu_bf16_kernels,
                                               use_cpu_float32_matmul)
from adapters_jax.param import param

W_INITS = ("glorot-uniform", "glorot-normal", "normal")
C_INITS = ("normal", "uniform")


@dataclasses.dataclass(frozen=True)
class CompacterConfig(BottleneckConfig):
    """A bottleneck adapter whose down/up projections are PHM layers (AdapterHub BnConfig phm_*).

    `use_bias` is AdapterHub's `phm_bias`. `init`/`init_std` do not apply (as in AdapterHub, where
    the PHM layers keep their own init): the rule A is drawn by `phm_c_init` (normal with std
    `phm_init_range`, or uniform(-1, 1)); the W factors by `hypercomplex_nonlinearity`.
    AdapterHub's `learn_phm=False` is a freezing rule here (`.*/phm_rule`), and `shared_W_phm`
    is not offered.
    """
    activation: str = "gelu"
    reduction_factor: float = 32
    phm_dim: int = 4                 # n
    phm_rank: int = 1                # k, the rank of each W_i (factorized_phm_W)
    factorized_phm_W: bool = True    # W_i = W_left[i] @ W_right[i]; else one full W [n, d_in/n, d_out/n]
    shared_phm_rule: bool = True     # one rule for the whole model; else one per projection
    factorized_phm_rule: bool = False  # A_i = left_i right_i^T (rank one), [n, n, 1] @ [n, 1, n]
    phm_c_init: str = "normal"
    phm_init_range: float = 1e-4
    hypercomplex_nonlinearity: str = "glorot-uniform"

    def __post_init__(self):
        super().__post_init__()
        if self.init != "bert" or self.init_std != 1e-2:
            raise ValueError("adapter.init/init_std do not apply to compacter: set phm_c_init, "
                             "phm_init_range and hypercomplex_nonlinearity instead")
        if self.phm_dim < 1 or self.phm_rank < 1:
            raise ValueError(f"adapter.phm_dim={self.phm_dim} and adapter.phm_rank={self.phm_rank} must be >= 1")
        if self.phm_c_init not in C_INITS:
            raise ValueError(f"adapter.phm_c_init={self.phm_c_init!r} is not one of {C_INITS}")
        if self.hypercomplex_nonlinearity not in W_INITS:
            raise ValueError(f"adapter.hypercomplex_nonlinearity={self.hypercomplex_nonlinearity!r} "
                             f"is not one of {W_INITS}")

    def dim(self, d_model: int) -> int:
        """The bottleneck size r; both d_model and r must be multiples of phm_dim."""
        r = super().dim(d_model)
        if d_model % self.phm_dim or r % self.phm_dim:
            raise ValueError(f"adapter.phm_dim={self.phm_dim} must divide both the model width "
                             f"d_model={d_model} and the bottleneck size r={r}")
        return r


def _rule_init(c: CompacterConfig, shared: bool):
    # AdapterHub: the model-level rule draws N(0, phm_init_range) or U(-1, 1); a per-layer rule
    # draws N(0, 0.01) or U(-0.01, 0.01) (as in the Compacter authors' code).
    if c.phm_c_init == "normal":
        return nn.initializers.normal(c.phm_init_range if shared else 1e-2)
    bound = 1.0 if shared else 1e-2
    return lambda key, shape, dtype=jnp.float32: nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound


def phm_rule(module: nn.Module, c: CompacterConfig, shared: bool):
    """The rule A [n, n, n], as parameters of `module` (call from its compact method)."""
    n, init = c.phm_dim, _rule_init(c, shared)
    if c.factorized_phm_rule:
        left = param(module, "phm_rule_left", init, (n, n, 1))
        right = param(module, "phm_rule_right", init, (n, 1, n))
        return jnp.einsum("ipk,iks->ips", left, right)
    return param(module, "phm_rule", init, (n, n, n))


def _w_init(c: CompacterConfig):
    """Per-slice (fan over the last two axes, axis 0 indexes i) as torch's xavier on W[i]."""
    if c.hypercomplex_nonlinearity == "normal":
        return nn.initializers.normal(c.phm_init_range)
    dist = "uniform" if c.hypercomplex_nonlinearity == "glorot-uniform" else "normal"
    return nn.initializers.variance_scaling(1.0, "fan_avg", dist, in_axis=-2, out_axis=-1, batch_axis=(0,))


class PHMDense(nn.Module):
    """y = x (sum_i A_i (x) W_i) + b; the rule A comes from the shared site or is its own."""
    features: int
    config: CompacterConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, rule=None):
        c, n = self.config, self.config.phm_dim
        d_in = x.shape[-1]
        a, b = d_in // n, self.features // n
        if rule is None:
            rule = phm_rule(self, c, shared=False)
        w_init = _w_init(c)
        if c.factorized_phm_W:
            left = param(self, "W_left", w_init, (n, a, c.phm_rank))
            right = param(self, "W_right", w_init, (n, c.phm_rank, b))
            w = jnp.einsum("iak,ikb->iab", left, right)  # [n, d_in/n, d_out/n]
        else:
            w = param(self, "W", w_init, (n, a, b))
        # kron(A_i, W_i)[p*a + q, s*b + t] = A_i[p, s] W_i[q, t], summed over i
        h = jnp.einsum("ips,iqt->pqst", rule, w).reshape(d_in, self.features)
        if use_cpu_bf16_kernels(self.dtype):  # bf16 backbone on CPU: canonical bf16 dots (mixed_dense)
            y = mixed_matmul(x, h)  # [..., out] float32
            if c.use_bias:
                y = y + param(self, "bias", nn.initializers.zeros, (self.features,)).astype(jnp.float32)
            return y
        x, h = x.astype(self.dtype), h.astype(self.dtype)
        # float32 on XLA:CPU: dW on 2-D rows, the narrower side as rows (mixed_dense.weight_gradient)
        y = float32_matmul(x, h) if use_cpu_float32_matmul(self.dtype) else jnp.dot(x, h)
        if c.use_bias:
            y = y + param(self, "bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class CompacterAdapter(BottleneckAdapter):
    """A Compacter at an activation site: a bottleneck whose projections are PHM layers;
    `shared` is the model-level rule (shared_phm_rule)."""
    config: CompacterConfig
    dtype: Any = jnp.float32

    def core(self, z, deterministic: bool, shared, compute_dtype=None):
        c = self.config
        if c.shared_phm_rule and shared is None:
            raise ValueError("compacter with shared_phm_rule=True needs the model-level rule: the backbone "
                             "must build the shared_adapters site and pass shared= to its activation sites")
        rule = shared if c.shared_phm_rule else None
        # in a bf16 backbone the PHM products multiply in bf16 with float32 accumulation, as the
        # bottleneck's own projections do (bottleneck.py)
        dtype = jnp.bfloat16 if is_bf16(z.dtype if compute_dtype is None else compute_dtype) else self.dtype
        proj = lambda feats, name: (lambda v: PHMDense(feats, c, dtype, name=name)(v, rule))
        return bottleneck(self, c, z, deterministic, self.dtype, proj=proj)


class CompacterShared(nn.Module):
    """The rule shared by all layers, at `shared_adapters/<name>/phm_rule`; None if not shared."""
    config: CompacterConfig

    @nn.compact
    def __call__(self):
        return phm_rule(self, self.config, shared=True) if self.config.shared_phm_rule else None


def _register():
    from adapters_jax.adapters.spec import register
    register("compacter", CompacterConfig, CompacterAdapter, "activation", shared_cls=CompacterShared)


_register()
