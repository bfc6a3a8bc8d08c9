"""Named presets -> AdapterSpec, and building a spec from a flat config dict.

Bottleneck presets mirror AdapterHub's configs so that the same name means the same model:
houlsby = double_seq_bn, pfeiffer = seq_bn, parallel = par_bn (He et al. 2021).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from adapters_jax.adapters.bottleneck import BottleneckConfig
from adapters_jax.adapters.spec import AdapterSpec, Placement, parse_layers
from adapters_jax.backbones import sites

# Options every preset takes; the rest go to the method's config dataclass.
SPEC_KEYS = ("name", "layers", "adapter_drop")


def _bottleneck_cfg(overrides: Mapping[str, Any], **defaults) -> BottleneckConfig:
    return _make(BottleneckConfig, {**defaults, **overrides})


class UnknownOption(ValueError):
    """An adapter option the chosen method does not take."""


def _make(cls, options: Mapping[str, Any]):
    """cls(**options), with an unknown option named in a one-line error."""
    names = {f.name for f in dataclasses.fields(cls)}
    for k in options:
        if k not in names:
            raise UnknownOption(f"adapter.{k} is not an option of {cls.__name__} (options: {', '.join(sorted(names))})")
    return cls(**options)


def houlsby(layers=None, **kw) -> tuple[Placement, ...]:
    """Houlsby et al. 2019: after attention and after the FFN, before the residual + LN."""
    cfg = _bottleneck_cfg(kw, activation="swish", original_ln_before=False, residual_before_ln=True,
                          init="near_identity", init_std=1e-2)
    return (Placement(sites.ATTN_OUTPUT, "bottleneck", cfg, layers),
            Placement(sites.FFN_OUTPUT, "bottleneck", cfg, layers))


def pfeiffer(layers=None, **kw) -> tuple[Placement, ...]:
    """Pfeiffer et al. 2020: one adapter after the FFN's add & norm (AdapterHub seq_bn)."""
    cfg = _bottleneck_cfg(kw, activation="relu", original_ln_before=True, residual_before_ln=True,
                          init="near_identity", init_std=1e-2)
    return (Placement(sites.FFN_OUTPUT, "bottleneck", cfg, layers),)


def parallel(layers=None, parallel_sites=("ffn",), **kw) -> tuple[Placement, ...]:
    """He et al. 2021: beside attention and/or the FFN, reading the sub-layer input, scaled by s."""
    cfg = _bottleneck_cfg(kw, activation="relu", is_parallel=True, scaling=4.0, init="mam_adapter")
    where = {"attn": sites.ATTN_OUTPUT, "ffn": sites.FFN_OUTPUT}
    bad = [s for s in parallel_sites if s not in where]
    if bad or not parallel_sites:
        raise ValueError(f"adapter.parallel_sites={tuple(parallel_sites)!r}: choose from ('attn', 'ffn')")
    return tuple(Placement(where[s], "bottleneck", cfg, layers) for s in parallel_sites)


def bottleneck(layers=None, bottleneck_sites=("ffn_adapter",), **kw) -> tuple[Placement, ...]:
    """A bottleneck adapter at explicitly named sites, every flag from the config."""
    cfg = _bottleneck_cfg(kw)
    return tuple(Placement(s, "bottleneck", cfg, layers) for s in bottleneck_sites)


def _compacter_cfg(overrides: Mapping[str, Any], **defaults):
    from adapters_jax.adapters.compacter import CompacterConfig  # importing it registers 'compacter'
    return _make(CompacterConfig, {**defaults, **overrides})


def compacter(layers=None, **kw) -> tuple[Placement, ...]:
    """Mahabadi et al. 2021: PHM bottlenecks in Houlsby placement (AdapterHub `compacter`)."""
    cfg = _compacter_cfg(kw, activation="gelu", reduction_factor=32, original_ln_before=False)
    return (Placement(sites.ATTN_OUTPUT, "compacter", cfg, layers),
            Placement(sites.FFN_OUTPUT, "compacter", cfg, layers))


def compacter_pp(layers=None, **kw) -> tuple[Placement, ...]:
    """Compacter++: one PHM bottleneck in Pfeiffer placement (AdapterHub `compacter++`)."""
    cfg = _compacter_cfg(kw, activation="gelu", reduction_factor=32, original_ln_before=True)
    return (Placement(sites.FFN_OUTPUT, "compacter", cfg, layers),)


def _dense_sites(option: str, names) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    bad = [n for n in names if n not in sites.DENSE_SITES]
    if bad or not names:
        raise ValueError(f"adapter.{option}={names!r}: choose from {sites.DENSE_SITES}")
    return names


def lora(layers=None, lora_sites=("query", "value"), **kw) -> tuple[Placement, ...]:
    """Hu et al. 2021: W + (alpha/r) A B at the named dense sites (PEFT's BERT default: query, value)."""
    from adapters_jax.adapters.lora import LoRAConfig  # importing it registers 'lora'
    cfg = _make(LoRAConfig, kw)
    return tuple(Placement(s, "lora", cfg, layers) for s in _dense_sites("lora_sites", lora_sites))


def ia3(layers=None, ia3_sites=("key", "value", "ffn_out"), feedforward_sites=("ffn_out",),
        **kw) -> tuple[Placement, ...]:
    """Liu et al. 2022: rescale key/value outputs and the FFN intermediate (the input of ffn_out)."""
    from adapters_jax.adapters.ia3 import IA3Config  # importing it registers 'ia3'
    if kw:
        raise UnknownOption(f"adapter.{next(iter(kw))} is not an option of ia3 (options: ia3_sites, feedforward_sites)")
    where, ff = _dense_sites("ia3_sites", ia3_sites), _dense_sites("feedforward_sites", feedforward_sites)
    if not set(ff) <= set(where):
        raise ValueError(f"adapter.feedforward_sites={ff!r} must be a subset of adapter.ia3_sites={where!r}")
    return tuple(Placement(s, "ia3", IA3Config(scale_input=s in ff), layers) for s in where)


def prefix(layers=None, **kw) -> tuple[Placement, ...]:
    """Li & Liang 2021: learned keys/values in every attention layer (needs num_heads, head_dim)."""
    from adapters_jax.adapters.prefix import PrefixConfig  # importing it registers 'prefix'
    return (Placement(sites.ATTN_PREFIX, "prefix", _make(PrefixConfig, kw), layers),)


def prompt(layers=None, **kw) -> tuple[Placement, ...]:
    """Lester et al. 2021: n_tokens soft prompt vectors prepended to the embedded input."""
    from adapters_jax.adapters.prompt import PromptConfig  # importing it registers 'prompt'
    if layers is not None:
        raise ValueError(f"adapter.layers={layers!r}: a soft prompt enters once, at the embeddings; use 'all'")
    return (Placement(sites.EMBED_PROMPT, "prompt", _make(PromptConfig, kw)),)


# preset name -> function(layers=..., **options) -> placements. Other method files add theirs.
PRESETS: dict[str, Callable[..., tuple[Placement, ...]]] = {
    "houlsby": houlsby, "pfeiffer": pfeiffer, "parallel": parallel, "bottleneck": bottleneck,
    "compacter": compacter, "compacter++": compacter_pp,
    "lora": lora, "ia3": ia3, "prefix": prefix, "prompt": prompt,
}


def spec_from_config(method: str, **options) -> AdapterSpec | None:
    """An AdapterSpec from a preset name and flat options (as in `config.adapter`).

    `method='none'` (full fine-tuning, head only) returns None: every site stays empty.
    """
    if method in ("none", "", None):
        return None
    if method not in PRESETS:
        raise ValueError(f"adapter.method={method!r} is unknown; choose from {sorted(PRESETS) + ['none']}")
    spec_kw = {k: options.pop(k) for k in SPEC_KEYS if k in options}
    layers = parse_layers(spec_kw.pop("layers", None))
    try:
        placements = PRESETS[method](layers=layers, **options)
    except UnknownOption as e:  # an option left over from another method: say which method refused it
        raise ValueError(f"{e} for adapter.method={method!r}") from None
    return AdapterSpec(placements=placements, **spec_kw)
