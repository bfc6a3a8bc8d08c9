"""Several named adapters in one model, and how they combine at each site.

An `AdapterSetup` is a SiteFiller over several AdapterSpecs. Compositions (AdapterHub's
names in brackets):

* 'select' [BatchSplit]: each row uses its own adapter, chosen by `adapter_ids` [B] passed to
  the model call. Choosing another adapter is a change of data, not of program: nothing is
  re-initialised or recompiled. Like bottleneck members (one config, different weights)
  run once, each row with its own gathered weights (select_gather.py): base + 1 adapter.
  Otherwise every member runs on the batch and each row keeps its own member's output, so a
  mixed batch costs the base model once plus N small adapters.
  It works at activation sites (bottleneck, Compacter) and at dense sites (`SelectDense`:
  LoRA and IA3, PEFT's mixed-batch `adapter_names=[...]`); a row whose adapter has nothing
  at a site (other layers, other sites, AdapterDrop) gets that site's plain output.
* 'stack' [Stack]: the adapters run one after another, each from the previous one's output.
* 'fuse' [Fuse]: AdapterFusion attends over the adapters' outputs (adapters/fusion.py).

AdapterHub's Parallel (every adapter on a copy of the batch) is `parallel_apply` below.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapters_jax.adapters import select_gather
from adapters_jax.adapters.bottleneck import post_forward, pre_forward
from adapters_jax.adapters.fusion import AdapterFusion, FusionConfig
from adapters_jax.adapters.ia3 import IA3Scale
from adapters_jax.adapters.lora import LoRAFactors
from adapters_jax.adapters.spec import AdapterSpec, site_factory
from adapters_jax.backbones import mixed_dense
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
        if select_gather.gatherable(site_module, modules):  # like bottlenecks: base + 1 adapter, any N
            return select_gather.select_gathered(site_module, modules, ids, h_out, x, layer_norm, deterministic)
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
            hidden, _ = module.forward(z, residual, deterministic, compute_dtype=h_out.dtype, **shared_kw(sh))
        return post_forward(last, hidden, h_out, x, layer_norm)
    if composition == "fuse":
        fusion = site_module.fusion
        z, residual = pre_forward(last, h_out, x, layer_norm)
        query = h_out if fusion.query_before_ln else z
        ups = [module.forward(z, residual, deterministic, compute_dtype=h_out.dtype, **shared_kw(sh))[1]
               for module, sh in modules]
        fused = AdapterFusion(fusion, name=site_module.fusion_name)(
            query, jnp.stack(ups, axis=2), residual, deterministic)  # [B, T, D]
        return post_forward(last, fused, h_out, x, layer_norm)
    raise ValueError(f"composition={composition!r} is not one of {COMPOSITIONS}")


class SelectDense(mixed_dense.Dense):
    """'select' at a dense site: the backbone's dense layer (`mixed_dense.Dense`) plus each row's own
    adapter's LoRA update or IA3 vector.

    The base keeps nn.Dense's `kernel`/`bias` and each member's leaves sit under its name as
    in the single-adapter modules (`<site>/<name>/lora_a`, `lora_b`, `<site>/<name>/scale`),
    so the same params serve one adapter alone or many mixed. The base matmul runs once;
    IA3 vectors are chosen per row, and every LoRA member runs on the whole batch with each
    row keeping only its own update (N rank-r matmuls, as at activation sites). Built by
    `spec.site_factory`; `sites.dense` binds the per-call context, whose `adapter_ids` [B]
    are data, so switching adapters does not recompile.
    """
    members: tuple = ()     # ((name, method, config), ...) present at this site in this layer
    member_ids: tuple = ()  # each member's index among all the setup's adapters (its adapter id)
    takes_context = True    # class attribute, not a field: sites.dense passes context=

    @nn.compact
    def __call__(self, inputs, context=None):  # inputs [B, ..., in]
        ids = None if context is None else context.get("adapter_ids")
        if ids is None:
            raise ValueError("composition 'select' needs adapter_ids [B] in the model call (or batch)")
        rows = lambda i: (ids == i).reshape(ids.shape + (1,) * (inputs.ndim - 1))  # [B, 1, ..., 1]
        in_scale = out_scale = None  # per-row IA3 vectors, [B, 1, in] / [B, 1, out]; None: all ones
        loras = []
        for adapter_id, (name, method, cfg) in zip(self.member_ids, self.members):
            if method == "lora":
                loras.append((adapter_id, LoRAFactors(cfg, self.features, self.dtype, self.param_dtype, name=name)))
            elif method == "ia3" and cfg.scale_input:
                scale = IA3Scale(inputs.shape[-1], self.param_dtype, name=name)().astype(inputs.dtype)  # [in]
                in_scale = jnp.where(rows(adapter_id), scale, 1.0 if in_scale is None else in_scale)
            elif method == "ia3":
                scale = IA3Scale(self.features, self.param_dtype, name=name)()  # [out]
                out_scale = jnp.where(rows(adapter_id), scale, 1.0 if out_scale is None else out_scale)
            else:
                raise ValueError(f"composition 'select' at dense sites takes LoRA and IA3 adapters, "
                                 f"not {method!r} ({name!r})")
        y = super().__call__(inputs if in_scale is None else inputs * in_scale)  # [B, T, out], once
        if out_scale is not None:
            y = y * out_scale.astype(y.dtype)
        for adapter_id, lora in loras:  # each row adds only its own member's update
            y = y + jnp.where(rows(adapter_id), lora(inputs).astype(y.dtype), 0)
        return y


def parallel_apply(apply_fn: Callable, params: Any, batch: dict, num_adapters: int) -> Any:
    """AdapterHub's Parallel: outputs [N, ...] of every adapter on the same batch, via 'select'."""
    b = next(iter(batch.values())).shape[0]
    run = lambda i: apply_fn(params, {**batch, "adapter_ids": jnp.full((b,), i, jnp.int32)})
    return jax.vmap(run)(jnp.arange(num_adapters))
