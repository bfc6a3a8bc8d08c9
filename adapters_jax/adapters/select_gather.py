"""'select' over like bottleneck adapters, at the cost of one: each row gathers its own weights.

The general 'select' (composition.compose) runs every member on the whole batch and keeps
each row's own output, so a mixed batch costs the base plus N adapters. When the members at
a site are plain bottleneck adapters with one config (same r, activation and flags, as in a
multi-task setup trained from one config), they differ only in their weights. Then each row
takes its adapter's down/up matrices ([N, D, r] -> [B, D, r]) and one batched matmul runs
per projection, so the batch costs the base plus one adapter whatever N is.

The parameters are the members' own (`<site>/<name>/down/kernel`, ...), read from the
site's variables, so exports, freezing and gradients are unchanged; `init` takes the
general path, which creates them.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from adapters_jax.adapters.bottleneck import (ACTIVATIONS, BottleneckAdapter, adapter_output, post_forward,
                                              pre_forward)
from adapters_jax.backbones.sites import add_and_norm
from adapters_jax.dropout import Dropout


def gatherable(site_module, modules: list) -> bool:
    """True when the members can share one gathered pass (see module doc)."""
    if len(modules) < 2 or site_module.is_initializing():
        return False
    first = modules[0][0]
    return all(type(m) is BottleneckAdapter and m.config == first.config and m.dtype == first.dtype  # pylint: disable=unidiomatic-typecheck
               for m, _ in modules) and not (first.config.ln_before or first.config.ln_after)


def select_gathered(site_module, modules: list, ids, h_out, x, layer_norm, deterministic: bool):
    """Each row's own member on that row (rows of other adapters pass through), in one pass.

    ids [B]: adapter ids in the setup; site_module.member_ids maps members to them.
    """
    c, dtype = modules[0][0].config, modules[0][0].dtype
    params = site_module.variables["params"]
    names = [m.name for m, _ in modules]
    # adapter id -> member index at this site; rows whose adapter is absent here point at 0 and are masked
    table = np.full(site_module.num_adapters, -1, np.int32)  # member_ids index the setup's adapters
    table[list(site_module.member_ids)] = np.arange(len(names), dtype=np.int32)
    member = jnp.asarray(table)[jnp.clip(ids, 0, len(table) - 1)]  # [B]
    present = (member >= 0) & (ids >= 0) & (ids < len(table))  # [B]
    row = jnp.where(present, member, 0)  # [B]

    def gather(*path):  # the members' leaf at path, stacked and taken per row: [B, ...]
        leaves = []
        for n in names:
            leaf = params[n]
            for key in path:
                leaf = leaf[key]
            leaves.append(leaf)
        return jnp.take(jnp.stack(leaves), row, axis=0).astype(dtype)

    z, residual = pre_forward(c, h_out, x, layer_norm)
    z = z.astype(dtype)
    h = jnp.einsum("btd,bdr->btr", z, gather("down", "kernel"))  # [B, T, r]
    if c.use_bias:
        h = h + gather("down", "bias")[:, None, :]
    h = ACTIVATIONS[c.activation](h)
    up = jnp.einsum("btr,brd->btd", h, gather("up", "kernel"))  # [B, T, D]
    if c.use_bias:
        up = up + gather("up", "bias")[:, None, :]
    if c.scaling in ("learned", "channel"):
        up = up * gather("scaling")[:, None, :]  # [B, 1, 1] or [B, 1, D]
    elif c.scaling != 1.0:
        up = up * c.scaling
    up = Dropout(c.dropout)(up, deterministic=deterministic)
    y = adapter_output(c, up, residual, ln_after=None)
    out = post_forward(c, y, h_out, x, layer_norm)  # [B, T, D]
    return jnp.where(present[:, None, None], out, add_and_norm(h_out, x, layer_norm))
