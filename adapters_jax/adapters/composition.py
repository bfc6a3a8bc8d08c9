"""Several named adapters in one model, and how they combine at each site.

An `AdapterSetup` is a SiteFiller over several AdapterSpecs. Compositions (AdapterHub's
names in brackets):

* 'select' [BatchSplit]: each row uses its own adapter, chosen by `adapter_ids` [B] passed to
  the model call. Choosing another adapter is a change of data, not of program: nothing is
  re-initialised or recompiled. Every member runs on the batch and each row keeps its own
  member's output, so a mixed batch costs the base model once plus N small adapters.
* 'stack' [Stack]: the adapters run one after another, each from the previous one's output.
* 'fuse' [Fuse]: AdapterFusion attends over the adapters' outputs (adapters/fusion.py).

AdapterHub's Parallel (every adapter on a copy of the batch) is `parallel_apply` below.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from adapters_jax.adapters.bottleneck import post_forward, pre_forward
from adapters_jax.adapters.fusion import AdapterFusion, FusionConfig
from adapters_jax.adapters.spec import AdapterSpec, site_factory
from adapters_jax.backbones.sites import add_and_norm

COMPOSITIONS = ("select", "stack", "fuse")


@dataclasses.dataclass(frozen=True)
class AdapterSetup:
    """Named adapters and their composition; call it as a SiteFiller."""
    adapters: tuple[AdapterSpec, ...]
    composition: str = "select"
    fusion: Optional[FusionConfig] = None
    fusion_name: str = "fusion"

    def __post_init__(self):
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"composition={self.composition!r} is not one of {COMPOSITIONS}")
        names = [a.name for a in self.adapters]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique and non-empty, got {names}")
        if self.fusion_name in names:
            raise ValueError(f"fusion_name={self.fusion_name!r} clashes with an adapter name")
        if self.composition == "fuse" and self.fusion is None:
            object.__setattr__(self, "fusion", FusionConfig())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"adapter {name!r} is not in this setup (it has {', '.join(self.names)})")
        return self.names.index(name)

    def __call__(self, site: str, layer: int):
        return site_factory(self.adapters, site, layer, self.composition, self.fusion, self.fusion_name)

    def validate(self, num_layers: int, d_model: int, available_sites) -> "AdapterSetup":
        for a in self.adapters:
            a.validate(num_layers, d_model, available_sites)
        return self


def compose(site_module, modules: list, composition: str, context: Optional[dict], h_out, x, layer_norm,
            deterministic: bool = True):
    """Runs several adapters at one activation site. modules: [(module, shared params or None)]."""
    def shared_kw(sh):
        return {} if sh is None else {"shared": sh}

    if composition == "select":
        ids = None if context is None else context.get("adapter_ids")
        if ids is None:
            raise ValueError("composition 'select' needs adapter_ids [B] in the model call (or batch)")
        # Rows whose adapter has nothing at this site (other layers, AdapterDrop) pass straight through.
        out = add_and_norm(h_out, x, layer_norm)  # [B, T, D]
        for adapter_id, (module, sh) in zip(site_module.member_ids, modules):
            y = module(h_out, x, layer_norm, deterministic, **shared_kw(sh))
            out = jnp.where((ids == adapter_id)[:, None, None], y, out)
        return out
    last = modules[-1][0].config
    if composition == "stack":  # as AdapterHub: each adapter's own pre-step, one post-step at the end
        hidden = h_out
        for module, sh in modules:
            z, residual = pre_forward(module.config, hidden, x, layer_norm)
            hidden, _ = module.forward(z, residual, deterministic, **shared_kw(sh))
        return post_forward(last, hidden, h_out, x, layer_norm)
    if composition == "fuse":
        fusion = site_module.fusion
        z, residual = pre_forward(last, h_out, x, layer_norm)
        query = h_out if fusion.query_before_ln else z
        ups = [module.forward(z, residual, deterministic, **shared_kw(sh))[1] for module, sh in modules]
        fused = AdapterFusion(fusion, name=site_module.fusion_name)(
            query, jnp.stack(ups, axis=2), residual, deterministic)  # [B, T, D]
        return post_forward(last, fused, h_out, x, layer_norm)
    raise ValueError(f"composition={composition!r} is not one of {COMPOSITIONS}")


def parallel_apply(apply_fn: Callable, params: Any, batch: dict, num_adapters: int) -> Any:
    """AdapterHub's Parallel: outputs [N, ...] of every adapter on the same batch, via 'select'."""
    b = next(iter(batch.values())).shape[0]
    run = lambda i: apply_fn(params, {**batch, "adapter_ids": jnp.full((b,), i, jnp.int32)})
    return jax.vmap(run)(jnp.arange(num_adapters))
