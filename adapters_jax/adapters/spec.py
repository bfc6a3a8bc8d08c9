"""The placement spec: which adapter fills which site in which layers.

An `AdapterSpec` is a hashable value (frozen dataclasses and tuples only), so it can be a
Flax module attribute; calling it as `spec(site, layer)` makes it the backbone's SiteFiller.
Methods register a (config class, module class, site kind) triple in `METHODS`; the backbone
never learns their names.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn

from adapters_jax.backbones import sites

# method name -> (config dataclass, module class, site kind: 'activation' | 'dense' | 'prefix' | 'prompt')
METHODS: dict[str, tuple[type, Callable[..., nn.Module], str]] = {}
# method name -> module class building its cross-layer parameters at `shared_adapters/<name>`,
# called with no arguments; its return value reaches the method's modules as `shared=`.
SHARED_MODULES: dict[str, Callable[..., nn.Module]] = {}
SITE_KIND = {**{s: "activation" for s in sites.ACTIVATION_SITES}, **{s: "dense" for s in sites.DENSE_SITES},
             sites.ATTN_PREFIX: "prefix", sites.EMBED_PROMPT: "prompt"}


def register(method: str, config_cls: type, module_cls, kind: str, shared_cls=None) -> None:
    METHODS[method] = (config_cls, module_cls, kind)
    if shared_cls is not None:
        SHARED_MODULES[method] = shared_cls


@dataclasses.dataclass(frozen=True)
class Placement:
    """One method at one site, in `layers` (None: every layer)."""
    site: str
    method: str
    config: Any
    layers: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        site = sites.PARALLEL_SITES.get(self.site, self.site)
        object.__setattr__(self, "site", site)
        if site not in SITE_KIND:
            raise ValueError(f"adapter site {self.site!r} is unknown; sites are "
                             f"{sorted(set(SITE_KIND) | set(sites.PARALLEL_SITES))}")
        if self.method not in METHODS:
            raise ValueError(f"adapter method {self.method!r} is unknown; methods are {sorted(METHODS)}")
        kind = METHODS[self.method][2]
        if SITE_KIND[site] != kind:
            raise ValueError(f"adapter method {self.method!r} fills {kind} sites, not {self.site!r}")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Named adapters for a whole model.

    Attributes:
      name: the adapter's name; parameters live at `.../<site>/<name>/...`.
      placements: what goes where.
      adapter_drop: AdapterDrop (Rücklé et al. 2021): no adapters in layers < adapter_drop,
        in training and in inference alike.
    """
    name: str = "adapter"
    placements: tuple[Placement, ...] = ()
    adapter_drop: int = 0

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", self.name):
            raise ValueError(f"adapter.name={self.name!r} must be an identifier (letters, digits, _ and -)")
        seen = {}
        for p in self.placements:
            for layer in (p.layers or (None,)):
                key = (p.site, layer)
                clash = [k for k in seen if k[0] == p.site and (k[1] is None or layer is None or k[1] == layer)]
                if clash:
                    raise ValueError(f"adapter site {p.site!r} is filled twice (by {seen[clash[0]]} and {p.method})")
                seen[key] = p.method

    def placement(self, site: str, layer: int) -> Optional[Placement]:
        if 0 <= layer < self.adapter_drop:
            return None
        for p in self.placements:
            if p.site == site and (p.layers is None or layer in p.layers):
                return p
        return None

    def __call__(self, site: str, layer: int):
        """SiteFiller: the module factory for `site` in `layer`, or None."""
        return site_factory((self,), site, layer)

    def validate(self, num_layers: int, d_model: int, available_sites: Sequence[str]) -> "AdapterSpec":
        """Raises a one-line ValueError for a site, layer or dimension this model cannot take."""
        for p in self.placements:
            if p.site not in available_sites:
                raise ValueError(f"adapter site {p.site!r} does not exist in this backbone "
                                 f"(it has {', '.join(available_sites)})")
            for layer in p.layers or ():
                if not 0 <= layer < num_layers:
                    raise ValueError(f"adapter.layers: adapter layer {layer} is out of range: the model has "
                                     f"{num_layers} layers (0..{num_layers - 1})")
            if hasattr(p.config, "dim"):
                p.config.dim(d_model)  # raises for bottleneck_dim > d_model
        if not 0 <= self.adapter_drop <= num_layers:
            raise ValueError(f"adapter.adapter_drop={self.adapter_drop} must be in 0..{num_layers}")
        return self


def site_factory(specs: Sequence[AdapterSpec], site: str, layer: int, composition: str = "select",
                 fusion: Any = None, fusion_name: str = "fusion"):
    """The module factory for `site` in `layer` given one or more adapters (None: empty site)."""
    if site == sites.SHARED:
        shared = {}  # one entry per adapter name: its first placement that has shared params
        for s in specs:
            for p in s.placements:
                if p.method in SHARED_MODULES and s.name not in shared:
                    shared[s.name] = (s.name, p.method, p.config)
        return functools.partial(SharedSite, members=tuple(shared.values())) if shared else None
    present = [(i, s.name, p) for i, s in enumerate(specs) if (p := s.placement(site, layer)) is not None]
    if not present:
        return None
    members = tuple((name, p.method, p.config) for _, name, p in present)
    member_ids = tuple(i for i, _, _ in present)
    kind = SITE_KIND[site]
    if len(specs) > 1 and composition == "select" and kind not in ("activation", "dense"):
        raise ValueError(f"composition 'select' chooses adapters per row at activation and dense sites only; "
                         f"{members[0][0]!r} fills the {kind} site {site!r}")
    if kind == "dense":  # replaces nn.Dense, keeping its kernel/bias paths
        if len(specs) > 1 and composition == "select":  # per-row LoRA/IA3 (see composition.SelectDense)
            from adapters_jax.adapters.composition import SelectDense
            return functools.partial(SelectDense, members=members, member_ids=member_ids)
        if len(members) > 1:
            raise ValueError(f"adapters {', '.join(m[0] for m in members)} all fill the dense site {site!r}: "
                             f"composition {composition!r} of several LoRA/IA3 adapters at one site is not "
                             "supported; use 'select' (per row) or merge them")
        name, method, config = members[0]
        return functools.partial(METHODS[method][1], adapter=config, adapter_name=name)
    if len(members) > 1 and kind != "activation":
        raise ValueError(f"adapters {', '.join(m[0] for m in members)} all fill the {kind} site {site!r}: "
                         "only activation-site adapters (bottleneck, compacter) can be composed")
    return functools.partial(NamedSite, members=members, composition=composition, fusion=fusion,
                             fusion_name=fusion_name, member_ids=member_ids,
                             num_adapters=len(specs))


class NamedSite(nn.Module):
    """The module at an activation/prefix/prompt site: holds adapters by name (`<site>/<name>`)
    and composes them (see adapters/composition.py) when there are several."""
    members: tuple  # ((name, method, config), ...)
    composition: str = "select"
    fusion: Any = None
    fusion_name: str = "fusion"
    member_ids: tuple = (0,)  # each member's index among all the setup's adapters (its adapter id)
    num_adapters: int = 1     # adapters in the whole setup, present at this site or not

    @nn.compact
    def __call__(self, *args, context=None, **kwargs):
        shared = (context or {}).get("shared") or {}
        modules = [(METHODS[m][1](cfg, name=n), shared.get(n)) for n, m, cfg in self.members]
        if self.num_adapters == 1 and self.composition != "fuse":
            module, sh = modules[0]
            return module(*args, **kwargs, **({} if sh is None else {"shared": sh}))
        from adapters_jax.adapters import composition
        return composition.compose(self, modules, self.composition, context, *args, **kwargs)


class SharedSite(nn.Module):
    """Cross-layer parameters at `shared_adapters/<name>/...`: {name: params} for every site."""
    members: tuple  # ((name, method, config), ...)

    @nn.compact
    def __call__(self):
        return {name: SHARED_MODULES[method](config, name=name)() for name, method, config in self.members}


def parse_layers(value: Union[None, str, int, Sequence[int]]) -> Optional[tuple[int, ...]]:
    """'all' / None -> every layer; 3 -> (3,); '2-5' -> (2, 3, 4, 5); [0, 2] -> (0, 2)."""
    if value is None or value == "all" or value == "":
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        out = []
        for part in value.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise ValueError(f"adapter.layers={value!r}: use 'all', '2-5', '0,3,5' or a list of ints")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            out.extend(range(lo, hi + 1))
        return tuple(sorted(set(out)))
    try:
        return tuple(sorted({int(v) for v in value}))
    except (TypeError, ValueError):
        raise ValueError(f"adapter.layers={value!r}: use 'all', '2-5', '0,3,5' or a list of ints") from None
