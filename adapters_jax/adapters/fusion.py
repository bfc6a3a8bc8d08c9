"""AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of N trained adapters.

At each fused site, with z the adapters' common input, A_i(z) their bottleneck outputs and
r the residual:  out = softmax_i( (z Wq) · (A_i(z) Wk) ) · (A_i(z) Wv) + r.
Wv starts at the identity (plus 1e-6 off the diagonal, as AdapterHub), so at init the fused
output is an average of the adapters' outputs. Parameter names follow AdapterHub's BertFusion
(query, key, value) so weights move across unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from adapters_jax.dropout import Dropout


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """AdapterHub's AdapterFusionConfig ('dynamic' defaults)."""
    query: bool = True
    key: bool = True
    value: bool = True
    query_before_ln: bool = False
    residual_before: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True
    regularization: bool = True  # 0.01 * ||I - Wv||^2 added to the loss, per fused site
    dropout: float = 0.0         # on the attention scores

    def __post_init__(self):
        if self.dropout < 0 or self.dropout >= 1:
            raise ValueError(f"fusion.dropout={self.dropout} must be in [0, 1)")


def _identity_init(key, shape, dtype=jnp.float32):
    del key
    return (jnp.full(shape, 1e-6, dtype) + (1.0 - 1e-6) * jnp.eye(shape[0], shape[1], dtype=dtype)).astype(dtype)


class AdapterFusion(nn.Module):
    config: FusionConfig = FusionConfig()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query, values, residual, deterministic: bool = True):
        """query [B, T, D], values [B, T, N, D] (the adapters' A_i(z)), residual [B, T, D]."""
        c = self.config
        d = query.shape[-1]
        dense = lambda name, **kw: nn.Dense(d, dtype=self.dtype, name=name,
                                            kernel_init=kw.pop("kernel_init", nn.initializers.normal(0.02)), **kw)
        if c.residual_before:
            values = values + residual[:, :, None, :]
        q = dense("query")(query) if c.query else query
        k = dense("key")(values) if c.key else values
        value_init = _identity_init if c.value_initialized else nn.initializers.normal(0.02)
        value = dense("value", use_bias=False, kernel_init=value_init) if c.value else None
        v = value(values) if (c.value and c.value_before_softmax) else values
        scores = jnp.einsum("btd,btnd->btn", q, k).astype(jnp.float32)  # [B, T, N]
        scores = Dropout(c.dropout)(scores, deterministic=deterministic)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("btn,btnd->btd", probs, v)  # [B, T, D]
        if c.value and not c.value_before_softmax:
            out = value(out)
        return out if c.residual_before else out + residual


def regularization(params: Any, fusion_name: str) -> jnp.ndarray:
    """AdapterHub's fusion regularizer: 0.01 * sum over fused sites of ||I - Wv||^2."""
    total = jnp.zeros((), jnp.float32)
    for path, w in traverse_util.flatten_dict(dict(params)).items():
        if len(path) >= 3 and path[-3:] == (fusion_name, "value", "kernel"):
            total = total + 0.01 * jnp.sum(jnp.square(jnp.eye(w.shape[0], w.shape[1]) - w))
    return total
