"""Prefix tuning (Li & Liang 2021) at the attention site `prefix`, AdapterHub semantics.

Every attention layer gets P learned key and value vectors per key/value head, prepended to
the sequence's keys and values; every query sees them (padding masks and causality apply to
the real tokens only; Llama's prefix keys carry no rotary position, as in AdapterHub/PEFT).

  flat=True:   keys, values [P, H_kv, Dh] are the parameters themselves.
  flat=False:  the reparametrisation MLP of Li & Liang, as AdapterHub's PrefixTuning:
               E [P, D_e] -> Linear(D_e, bottleneck_size) -> tanh -> Linear(bottleneck, 2 H_kv Dh)
               reshaped to [P, 2, H_kv, Dh] (keys first). Parameters: `embedding`, `down`, `up`.

One difference from AdapterHub: AdapterHub shares one MLP (and E) across layers, its last
Linear producing all L layers' keys and values at once; here every layer has its own MLP,
because the prefix site is per layer. AdapterHub's shared MLP is the special case where all
layers hold the same E and `down` and layer l's `up` is slice l of AdapterHub's last Linear,
so its weights import exactly. After training, `fold_prefix` evaluates the MLPs once and
keeps only the flat prefixes (AdapterHub's `eject`), with the same outputs.

The site calls `module(batch)` and knows nothing of the attention's head layout, so the
config must name it: num_heads, head_dim (and num_kv_heads for grouped-query attention).
`head_options(model_config)` reads them off a BertConfig or LlamaConfig.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from adapters_jax.adapters.lora import layer_of
from adapters_jax.backbones import sites
from adapters_jax.param import param

NON_LINEARITIES = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu, "swish": jax.nn.silu,
                   "silu": jax.nn.silu, "identity": lambda x: x}


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """One prefix-tuning adapter; names follow AdapterHub's PrefixTuningConfig where they overlap."""
    num_heads: Optional[int] = None      # the model's attention (query) heads: required
    head_dim: Optional[int] = None       # per-head size: required
    num_kv_heads: Optional[int] = None   # key/value heads (grouped-query attention); None: num_heads
    prefix_length: int = 10
    flat: bool = False
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    embed_dim: Optional[int] = None      # width of the MLP input E; None: num_heads * head_dim
    init_std: float = 1.0                # std of E (flat=False) or of the flat prefixes, as torch's randn

    def __post_init__(self):
        for field in ("num_heads", "head_dim"):
            v = getattr(self, field)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"adapter.{field}={v!r} must be a positive integer: prefix tuning needs the "
                                 "attention head layout (prefix.head_options(model_config) gives it)")
        kv = self.num_kv_heads
        if kv is not None and (not isinstance(kv, int) or kv <= 0 or self.num_heads % kv):
            raise ValueError(f"adapter.num_kv_heads={kv!r} must be a positive divisor of num_heads={self.num_heads}")
        if self.prefix_length <= 0:
            raise ValueError(f"adapter.prefix_length={self.prefix_length} must be > 0")
        if self.bottleneck_size <= 0:
            raise ValueError(f"adapter.bottleneck_size={self.bottleneck_size} must be > 0")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"adapter.non_linearity={self.non_linearity!r} is not one of {sorted(NON_LINEARITIES)}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def input_dim(self) -> int:
        return self.embed_dim or self.num_heads * self.head_dim


def head_options(model_config: Any) -> dict:
    """{'num_heads', 'head_dim', 'num_kv_heads'} of a BertConfig / LlamaConfig (any config with
    num_heads and hidden_size, and optionally head_dim and num_kv_heads)."""
    heads = model_config.num_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return {"num_heads": heads, "head_dim": head_dim,
            "num_kv_heads": getattr(model_config, "num_kv_heads", None) or heads}


def _torch_linear_bias(fan_in: int):
    """torch.nn.Linear's default bias init, U(±1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class PrefixTuning(nn.Module):
    """The module at `.../attention/prefix/<name>`: `module(batch)` -> (keys, values) [B, P, H_kv, Dh]."""
    config: PrefixConfig

    @nn.compact
    def __call__(self, batch: int):
        c = self.config
        shape = (c.prefix_length, c.kv_heads, c.head_dim)  # [P, H_kv, Dh]
        if c.flat:
            keys = param(self, "keys", nn.initializers.normal(c.init_std), shape)
            values = param(self, "values", nn.initializers.normal(c.init_std), shape)
        else:
            torch_kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # torch Linear default
            e = param(self, "embedding", nn.initializers.normal(c.init_std), (c.prefix_length, c.input_dim))
            h = nn.Dense(c.bottleneck_size, kernel_init=torch_kernel,
                         bias_init=_torch_linear_bias(c.input_dim), name="down")(e)
            h = NON_LINEARITIES[c.non_linearity](h)  # [P, bottleneck]
            kv = nn.Dense(2 * c.kv_heads * c.head_dim, kernel_init=torch_kernel,
                          bias_init=_torch_linear_bias(c.bottleneck_size), name="up")(h)
            kv = kv.reshape(c.prefix_length, 2, c.kv_heads, c.head_dim)  # keys first, as AdapterHub
            keys, values = kv[:, 0], kv[:, 1]
        expand = lambda a: jnp.broadcast_to(a[None], (batch,) + shape)
        return expand(keys), expand(values)


def fold_prefix(params: Any, spec) -> tuple[dict, Any]:
    """Evaluates every reparametrisation MLP of `spec` once and keeps only its output.

    Returns:
      (params whose `prefix/<name>` subtrees hold `keys` and `values` [P, H_kv, Dh] in place
      of `embedding`/`down`/`up`, the spec with flat=True prefix configs). The folded model's
      outputs equal the unfolded one's up to float rounding.
    """
    flat = traverse_util.flatten_dict(dict(params))
    if not any(p.method == "prefix" and not p.config.flat for p in spec.placements):
        return dict(params), spec
    roots = [path[:-1] for path in flat if len(path) >= 3 and path[-1] == "embedding"
             and path[-2] == spec.name and path[-3] == sites.ATTN_PREFIX]
    for root in roots:
        placement = spec.placement(sites.ATTN_PREFIX, layer_of(root)) or next(
            p for p in spec.placements if p.method == "prefix")
        if placement.method != "prefix" or placement.config.flat:
            continue
        sub = {path[len(root):]: v for path, v in flat.items() if path[:len(root)] == root}
        keys, values = PrefixTuning(placement.config).apply({"params": traverse_util.unflatten_dict(sub)}, 1)
        for path in sub:
            del flat[root + path]
        flat[root + ("keys",)], flat[root + ("values",)] = keys[0], values[0]
    placements = tuple(dataclasses.replace(p, config=dataclasses.replace(p.config, flat=True))
                       if p.method == "prefix" else p for p in spec.placements)
    return traverse_util.unflatten_dict(flat), dataclasses.replace(spec, placements=placements)


def _register():
    from adapters_jax.adapters.spec import register
    register("prefix", PrefixConfig, PrefixTuning, "prefix")


_register()
