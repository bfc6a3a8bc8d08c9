"""AdapterHub (`adapters` 1.x) bottleneck adapters <-> our specs and parameter trees.

A `model.save_adapter(dir, name)` directory holds `adapter_config.json` (top level: config,
hidden_size, model_class, model_name, model_type, name, version; `config` is the full BnConfig
dict) and `pytorch_adapter.bin` (or `adapter.safetensors` with `use_safetensors=True`).

Where the weights live (torch Linear weights are [out, in], our kernels [in, out]):

  AdapterHub (BERT family)                                 AdapterHub (Llama)
  encoder.layer.{i}.attention.output.adapters.{name}.*     model.layers.{i}.attention_adapters.adapters.{name}.*
  encoder.layer.{i}.output.adapters.{name}.*               model.layers.{i}.output_adapters.adapters.{name}.*
  ours: encoder/layer_i/attn_adapter/{name}/... and .../ffn_adapter/...; layers/layer_i/... for Llama

Inside an adapter: `adapter_down.0` is the down projection, or the `ln_before` LayerNorm (then
also saved as `adapter_norm_before`) with the projection at `adapter_down.1`; `adapter_up`,
`adapter_norm_after` (our ln_after) and `scaling` ('learned' / 'channel') follow.

Config options: mh_adapter / output_adapter choose our attn_adapter / ffn_adapter sites;
leave_out removes layers; a per-layer reduction_factor mapping becomes one placement per
factor. Refused with a one-line ValueError naming the option: phm_layer (Compacter),
use_gating, inv_adapter, stochastic_depth > 0, non-bottleneck architectures (LoRA, prefix,
unions), and non-linearities we do not have. Ignored: init_weights_seed, cross_adapter (no
cross-attention in these backbones), phm_* when phm_layer is false, and prediction heads
saved next to the adapter (a warning says so).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import warnings
from typing import Any, Mapping, Optional

import numpy as np
from flax import traverse_util

from adapters_jax.adapters.bottleneck import BottleneckConfig
from adapters_jax.adapters.spec import AdapterSpec, Placement
from adapters_jax.backbones import sites
from adapters_jax.interop import read_json, read_weights, strip_backbone, write_json

CONFIG_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_NAME = "adapter_config.json", "pytorch_adapter.bin", "adapter.safetensors"
HEAD_FILES = ("head_config.json", "pytorch_model_head.bin", "model_head.safetensors")
HUB_VERSION = "adapters.1.3.0"  # the library version whose files we write (and test against)
FAMILIES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "llama": "llama"}
_STACK = {"bert": ("encoder",), "llama": ("layers",)}
_KEY = {  # state-dict key -> (layer, location, adapter name, rest)
    "bert": re.compile(r"(?:(?:bert|roberta|xlm_roberta)\.)?encoder\.layer\.(\d+)\.(attention\.output|output)"
                       r"\.adapters\.([^.]+)\.(.+)"),
    "llama": re.compile(r"(?:model\.)?layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\.(.+)"),
}
_SITE_OF = {"bert": {"attention.output": sites.ATTN_OUTPUT, "output": sites.FFN_OUTPUT},
            "llama": {"attention_adapters": sites.ATTN_OUTPUT, "output_adapters": sites.FFN_OUTPUT}}
_EXPORT = {"bert": ("encoder.layer", "BertModel"), "llama": ("model.layers", "LlamaForCausalLM")}
_LOC_OF = {f: {v: k for k, v in m.items()} for f, m in _SITE_OF.items()}
_ACT_IN = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
           "swish": "swish", "silu": "silu", "tanh": "tanh", "linear": "identity"}
_ACT_OUT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "swish": "swish", "silu": "silu",
            "tanh": "tanh", "identity": "linear", "linear": "linear"}
_INIT_IN = {"bert": "bert", "houlsby": "houlsby", "mam_adapter": "mam_adapter"}
_INIT_OUT = {"bert": "bert", "houlsby": "houlsby", "mam_adapter": "mam_adapter", "near_identity": "bert",
             "zero_up": "bert"}  # only an initialisation: trained weights do not depend on it

# BnConfig's fields and defaults in adapters 1.3.0 (mh_adapter, output_adapter, reduction_factor
# and non_linearity are required there; configs saved by the library carry every field).
BN_DEFAULTS = dict(
    original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False, init_weights="bert",
    init_weights_seed=None, is_parallel=False, scaling=1.0, use_gating=False, residual_before_ln=True,
    adapter_residual_before_ln=False, inv_adapter=None, inv_adapter_reduction_factor=None, cross_adapter=False,
    leave_out=[], dropout=0.0, phm_layer=False, phm_dim=4, factorized_phm_W=True, shared_W_phm=False,
    shared_phm_rule=True, factorized_phm_rule=False, phm_c_init="normal", phm_init_range=0.0001,
    learn_phm=True, hypercomplex_nonlinearity="glorot-uniform", phm_rank=1, phm_bias=True, stochastic_depth=0.0)
_REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
_SEQ = dict(original_ln_before=True, mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=16)
_DOUBLE = dict(original_ln_before=False, mh_adapter=True, output_adapter=True, non_linearity="swish",
               reduction_factor=16)
_PAR = dict(mh_adapter=False, output_adapter=True, non_linearity="relu", reduction_factor=2,
            init_weights="mam_adapter", is_parallel=True, scaling=4.0)
NAMED_CONFIGS = {"seq_bn": _SEQ, "pfeiffer": _SEQ, "double_seq_bn": _DOUBLE, "houlsby": _DOUBLE,
                 "par_bn": _PAR, "parallel": _PAR, "scaled_par_bn": {**_PAR, "scaling": "learned"}}
# option -> (its harmless value, why another value is refused)
_REFUSED = {"phm_layer": (False, "Compacter PHM layers are not mapped"),
            "use_gating": (False, "gated adapters (UniPELT) have no equivalent here"),
            "inv_adapter": (None, "invertible adapters have no equivalent here"),
            "stochastic_depth": (0.0, "stochastic depth has no equivalent here")}


def _family(model_type: str, source: str) -> str:
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported (choose from {sorted(FAMILIES)})")
    return FAMILIES[model_type]


# ------------------------------------------------------------------------------ weights

def _leaf(rest: str, ln_before: bool) -> Optional[tuple]:
    """AdapterHub's name inside one adapter -> (our module path..., leaf, transposed?) or None."""
    if rest == "scaling":
        return ("scaling",), False
    m = re.fullmatch(r"(adapter_down\.(\d+)|adapter_up|adapter_norm_before|adapter_norm_after)\.(weight|bias)", rest)
    if not m:
        return None
    part, idx, kind = m.groups()
    norm = {"weight": "scale", "bias": "bias"}[kind]
    dense = {"weight": "kernel", "bias": "bias"}[kind]
    if part == "adapter_norm_before" or (idx == "0" and ln_before):
        return ("ln_before", norm), False
    if part == "adapter_norm_after":
        return ("ln_after", norm), False
    if part == "adapter_up" or (idx == "0" and not ln_before) or (idx == "1" and ln_before):
        return ("up" if part == "adapter_up" else "down", dense), kind == "weight"
    return None


def _state_to_tree(state: Mapping[str, Any], name: str, family: str, ln_before: bool, prefix: tuple,
                   strict: bool, source: str, as_name: Optional[str] = None) -> dict:
    flat = {}
    for key, value in state.items():
        m = _KEY[family].fullmatch(key)
        if not m or m.group(3) != name:
            if strict:
                raise ValueError(f"{source}: tensor {key} is not part of a bottleneck adapter {name!r}")
            continue
        layer, where, _, rest = m.groups()
        got = _leaf(rest, ln_before)
        if got is None:
            raise ValueError(f"{source}: tensor {key} is not a bottleneck adapter weight we can map")
        path, transpose = got
        value = np.asarray(value, np.float32)
        value = np.ascontiguousarray(value.T) if transpose else value
        if path == ("scaling",):
            value = value.reshape(-1)
        flat[tuple(prefix) + (f"layer_{layer}", _SITE_OF[family][where], as_name or name) + path] = value
    if not flat:
        raise ValueError(f"{source}: no AdapterHub bottleneck weights for adapter {name!r}")
    return traverse_util.unflatten_dict(flat)


def bottleneck_from_torch(state: Mapping[str, np.ndarray], name: str, prefix: tuple = ("encoder",),
                          ln_before: bool = False) -> dict:
    """Our adapter subtree (nested dict, paths `<prefix>/layer_i/<site>/<name>/...`) from an
    AdapterHub BERT state dict (numpy arrays). Keys of other adapters and modules are skipped."""
    return _state_to_tree(state, name, "bert", ln_before, prefix, strict=False, source="state dict")


# ------------------------------------------------------------------------------ config -> spec

def _hub_config(cfg: Any, source: str) -> dict:
    if isinstance(cfg, str):
        if cfg not in NAMED_CONFIGS:
            raise ValueError(f"{source}: config={cfg!r} is not a bottleneck config we know "
                             f"({', '.join(sorted(NAMED_CONFIGS))}); save the full config dict")
        cfg = NAMED_CONFIGS[cfg]
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{source}: 'config' must be a dict or a config name, not {type(cfg).__name__}")
    if cfg.get("architecture") not in (None, "bottleneck"):
        raise ValueError(f"{source}: architecture={cfg['architecture']!r} is not a bottleneck adapter "
                         "(only BnConfigs such as seq_bn, double_seq_bn, par_bn are mapped)")
    for key in _REQUIRED:
        if key not in cfg:
            raise ValueError(f"{source}: config has no {key!r}")
    unknown = [k for k in cfg if k not in BN_DEFAULTS and k not in _REQUIRED and k != "architecture"
               and cfg[k] not in (None, False, 0, 0.0, [], {})]
    if unknown:
        raise ValueError(f"{source}: option {unknown[0]}={cfg[unknown[0]]!r} is not a BnConfig option we know")
    out = {**BN_DEFAULTS, **cfg}
    for key, (neutral, why) in _REFUSED.items():
        if out[key] not in (None, neutral):
            raise ValueError(f"{source}: option {key}={out[key]!r} is not supported ({why})")
    return out


def _options(cfg: dict, source: str) -> dict:
    """BottleneckConfig keyword arguments (all but the size) from a full BnConfig dict."""
    act = str(cfg["non_linearity"]).lower()
    if act not in _ACT_IN:
        raise ValueError(f"{source}: option non_linearity={cfg['non_linearity']!r} is not supported "
                         f"(choose from {sorted(_ACT_IN)})")
    scaling = cfg["scaling"]
    if not isinstance(scaling, (int, float)) and scaling not in ("learned", "channel"):
        raise ValueError(f"{source}: option scaling={scaling!r} must be a number, 'learned' or 'channel'")
    return dict(activation=_ACT_IN[act], use_bias=True, init=_INIT_IN.get(cfg["init_weights"], "bert"),
                ln_before=bool(cfg["ln_before"]), ln_after=bool(cfg["ln_after"]),
                original_ln_before=bool(cfg["original_ln_before"]), original_ln_after=bool(cfg["original_ln_after"]),
                residual_before_ln=cfg["residual_before_ln"],
                adapter_residual_before_ln=bool(cfg["adapter_residual_before_ln"]),
                is_parallel=bool(cfg["is_parallel"]), scaling=scaling, dropout=float(cfg["dropout"]))


def _factor(rf: Any, layer: int, source: str):
    value = rf.get(str(layer), rf.get("default")) if isinstance(rf, Mapping) else rf
    if value is None:
        raise ValueError(f"{source}: option reduction_factor={dict(rf)!r} gives no value for layer {layer} "
                         "and no 'default'")
    return value


def spec_from_hub_config(cfg: dict, name: str, layers_by_site: Mapping[str, set], source: str) -> AdapterSpec:
    """Our spec for a full BnConfig dict; `layers_by_site` says which layers hold weights."""
    options = _options(cfg, source)
    wanted = [s for s, on in ((sites.ATTN_OUTPUT, cfg["mh_adapter"]), (sites.FFN_OUTPUT, cfg["output_adapter"])) if on]
    if not wanted:
        raise ValueError(f"{source}: options mh_adapter and output_adapter are both false: the adapter is empty")
    placements = []
    for site in wanted:
        layers = sorted(layers_by_site.get(site, ()))
        if not layers:
            raise ValueError(f"{source}: no weights for the {site} adapters that the config asks for")
        if set(layers) & set(cfg["leave_out"] or ()):
            raise ValueError(f"{source}: weights for layer(s) in leave_out={cfg['leave_out']}")
        rf = cfg["reduction_factor"]
        if not cfg["leave_out"] and not isinstance(rf, Mapping):
            if layers != list(range(len(layers))):
                missing = sorted(set(range(layers[-1] + 1)) - set(layers))[0]
                raise ValueError(f"{source}: no {site} weights for layer {missing}")
            placements.append(Placement(site, "bottleneck", BottleneckConfig(reduction_factor=rf, **options)))
            continue
        groups: dict = {}
        for layer in layers:
            groups.setdefault(_factor(rf, layer, source), []).append(layer)
        for factor, group in groups.items():
            placements.append(Placement(site, "bottleneck", BottleneckConfig(reduction_factor=factor, **options),
                                        tuple(group)))
    return AdapterSpec(name=name, placements=tuple(placements))


def _check_shapes(spec: AdapterSpec, tree: dict, prefix: tuple, d_model: int, source: str) -> None:
    flat = traverse_util.flatten_dict(tree)
    for path, value in flat.items():
        layer, site = int(path[len(prefix)][len("layer_"):]), path[len(prefix) + 1]
        p = spec.placement(site, layer)
        if p is None:
            raise ValueError(f"{source}: weights for {'/'.join(path)} but the config puts no adapter there")
        r = p.config.dim(d_model)
        want = {("down", "kernel"): (d_model, r), ("down", "bias"): (r,), ("up", "kernel"): (r, d_model),
                ("up", "bias"): (d_model,)}.get(path[len(prefix) + 3:])
        if want is not None and tuple(value.shape) != want:
            raise ValueError(f"{source}: {'/'.join(path)} has shape {tuple(value.shape)}, the config "
                             f"(reduction_factor={p.config.reduction_factor}, hidden_size={d_model}) gives {want}")


def import_adapterhub(directory: str, name: Optional[str] = None) -> tuple[AdapterSpec, dict]:
    """(spec, params subtree) from an AdapterHub `save_adapter` directory.

    The subtree is rooted at the backbone (`encoder/layer_i/<site>/<name>/...` for the BERT
    family, `layers/layer_i/...` for Llama), as numpy float32 arrays. `name` renames the
    adapter (default: the saved name). Weights come from adapter.safetensors when present,
    else pytorch_adapter.bin through torch.load(weights_only=True).
    """
    directory = str(directory)
    cfg_file = os.path.join(directory, CONFIG_NAME)
    meta = read_json(cfg_file)
    if "format_version" in meta and "config" not in meta:
        raise ValueError(f"{cfg_file}: an adapters_jax export, not AdapterHub's; read it with "
                         "adapters_jax.checkpoint.read_adapter")
    if "config" not in meta or "name" not in meta:
        raise ValueError(f"{cfg_file}: not an AdapterHub adapter config (needs 'config' and 'name')")
    family = _family(meta.get("model_type", "bert"), cfg_file)
    cfg = _hub_config(meta["config"], cfg_file)
    w_file, state = read_weights(directory, SAFE_WEIGHTS_NAME, WEIGHTS_NAME)
    heads = [f for f in HEAD_FILES if os.path.exists(os.path.join(directory, f))]
    if heads:
        warnings.warn(f"{directory}: AdapterHub prediction head ({', '.join(heads)}) ignored; "
                      "only the adapter is imported", stacklevel=2)
    prefix = _STACK[family]
    name = name or meta["name"]
    tree = _state_to_tree(state, meta["name"], family, bool(cfg["ln_before"]), prefix, strict=True, source=w_file,
                          as_name=name)
    layers_by_site: dict = {}
    for path in traverse_util.flatten_dict(tree):
        layers_by_site.setdefault(path[len(prefix) + 1], set()).add(int(path[len(prefix)][len("layer_"):]))
    spec = spec_from_hub_config(cfg, name, layers_by_site, cfg_file)
    d_model = meta.get("hidden_size") or next(
        v.shape[0] for p, v in traverse_util.flatten_dict(tree).items() if p[-2:] == ("down", "kernel"))
    _check_shapes(spec, tree, prefix, int(d_model), w_file)
    return spec, tree


# ------------------------------------------------------------------------------ spec -> AdapterHub

def _model_info(model_config: Any) -> tuple[str, int, int]:
    """(model_type, hidden_size, num_layers) from our BertConfig/LlamaConfig, an HF config or its dict."""
    if hasattr(model_config, "to_dict") and not dataclasses.is_dataclass(model_config):
        model_config = model_config.to_dict()
    if isinstance(model_config, Mapping):
        get = model_config.get
        return get("model_type", "bert"), int(get("hidden_size")), int(get("num_hidden_layers", get("num_layers")))
    return model_config.model_type, int(model_config.hidden_size), int(model_config.num_layers)


def _reduction_factor(cfg: BottleneckConfig, d: int, where: str) -> float:
    r = cfg.dim(d)
    if cfg.reduction_factor is not None:
        return cfg.reduction_factor
    rf = d / r
    if int(d // rf) != r:  # float rounding of d / r: nudge it down to the exact factor's side
        rf = math.nextafter(rf, 0.0)
    if max(int(d // rf), 1) != r:
        raise ValueError(f"export_adapterhub: bottleneck_dim={r} at {where} has no AdapterHub reduction_factor "
                         f"(hidden_size {d} // factor must give {r})")
    return int(rf) if float(rf).is_integer() else rf


def hub_config_from_spec(spec: AdapterSpec, d_model: int, num_layers: int) -> tuple[dict, dict]:
    """(BnConfig dict, {site: [layers]}) for a spec of bottleneck adapters, or a one-line ValueError."""
    for p in spec.placements:
        if p.method != "bottleneck":
            raise ValueError(f"export_adapterhub: the {p.method!r} adapter at {p.site!r} is not a bottleneck "
                             "adapter (AdapterHub export covers seq_bn / double_seq_bn / par_bn-style configs)")
    cover: dict = {}
    for site in (sites.ATTN_OUTPUT, sites.FFN_OUTPUT):
        for layer in range(num_layers):
            p = spec.placement(site, layer)
            if p is not None:
                cover.setdefault(site, {})[layer] = p.config
    if not cover:
        raise ValueError(f"export_adapterhub: adapter {spec.name!r} places nothing in layers 0..{num_layers - 1}")
    layer_sets = {site: sorted(by_layer) for site, by_layer in cover.items()}
    if len({tuple(v) for v in layer_sets.values()}) > 1:
        raise ValueError(f"export_adapterhub: the attn_adapter and ffn_adapter layers differ {layer_sets}; "
                         "AdapterHub has one leave_out list for both")
    configs = [c for by_layer in cover.values() for c in by_layer.values()]
    strip = lambda c: dataclasses.replace(c, bottleneck_dim=None, reduction_factor=None, init="bert", init_std=0.0)
    if len({strip(c) for c in configs}) > 1:
        raise ValueError(f"export_adapterhub: adapter {spec.name!r} mixes bottleneck configs that differ in more "
                         "than their size; AdapterHub has one config per adapter")
    c = configs[0]
    if not c.use_bias:
        raise ValueError("export_adapterhub: use_bias=False has no AdapterHub equivalent (its projections have biases)")
    layers = next(iter(layer_sets.values()))
    factors = {}
    for layer in layers:
        per_site = {_reduction_factor(by_layer[layer], d_model, f"{site} layer {layer}")
                    for site, by_layer in cover.items()}
        if len(per_site) > 1:
            raise ValueError(f"export_adapterhub: layer {layer} has different bottleneck sizes at attn_adapter and "
                             "ffn_adapter; AdapterHub uses one reduction_factor per layer")
        factors[layer] = per_site.pop()
    values = list(factors.values())
    if len(set(values)) == 1:
        rf: Any = values[0]
    else:
        rf = {"default": max(set(values), key=values.count), **{str(k): v for k, v in factors.items()}}
    bn = {**BN_DEFAULTS,
          "mh_adapter": sites.ATTN_OUTPUT in cover, "output_adapter": sites.FFN_OUTPUT in cover,
          "reduction_factor": rf, "non_linearity": _ACT_OUT[c.activation],
          "original_ln_before": c.original_ln_before, "original_ln_after": c.original_ln_after,
          "ln_before": c.ln_before, "ln_after": c.ln_after, "init_weights": _INIT_OUT[c.init],
          "is_parallel": c.is_parallel, "residual_before_ln": c.residual_before_ln,
          "adapter_residual_before_ln": c.adapter_residual_before_ln,
          "scaling": float(c.scaling) if isinstance(c.scaling, (int, float)) else c.scaling,
          "dropout": float(c.dropout), "leave_out": [i for i in range(num_layers) if i not in layers]}
    return bn, layer_sets


def _hub_state(spec: AdapterSpec, subtree: dict, family: str, layer_sets: dict, cfg: dict) -> dict:
    flat = strip_backbone(subtree)
    stack, name, hf_stack = _STACK[family], spec.name, _EXPORT[family][0]
    parts = [("down", "kernel", "adapter_down.{d}.weight"), ("down", "bias", "adapter_down.{d}.bias"),
             ("up", "kernel", "adapter_up.weight"), ("up", "bias", "adapter_up.bias")]
    if cfg["ln_before"]:
        parts += [("ln_before", leaf, f"{hub}.{kind}") for hub in ("adapter_norm_before", "adapter_down.0")
                  for leaf, kind in (("scale", "weight"), ("bias", "bias"))]
    if cfg["ln_after"]:
        parts += [("ln_after", "scale", "adapter_norm_after.weight"), ("ln_after", "bias", "adapter_norm_after.bias")]
    state, used = {}, set()
    for site, layers in layer_sets.items():
        for layer in layers:
            base = stack + (f"layer_{layer}", site, name)
            leaves = parts + ([("scaling", None, "scaling")] if cfg["scaling"] in ("learned", "channel") else [])
            for mod, leaf, hub in leaves:
                path = base + ((mod,) if leaf is None else (mod, leaf))
                if path not in flat:
                    raise ValueError(f"export_adapterhub: the parameter tree has no {'/'.join(path)}")
                value = np.asarray(flat[path], np.float32)
                hub = hub.format(d=1 if cfg["ln_before"] else 0)
                key = f"{hf_stack}.{layer}.{_LOC_OF[family][site]}.adapters.{name}.{hub}"
                state[key] = np.ascontiguousarray(value.T if leaf == "kernel" else value)
                used.add(path)
            extra = [p for p in flat if p[:len(base)] == base and p not in used]
            if extra:
                raise ValueError(f"export_adapterhub: {'/'.join(extra[0])} has no AdapterHub equivalent")
    return state


def export_adapterhub(spec: AdapterSpec, params_subtree: Any, directory: str, model_config: Any,
                      torch_bin: bool = True) -> list[str]:
    """Writes an AdapterHub adapter directory that `model.load_adapter(directory)` accepts.

    Args:
      spec: bottleneck placements only (attn_adapter -> mh_adapter, ffn_adapter -> output_adapter),
        one config for the adapter (sizes may differ per layer); adapter_drop becomes leave_out.
      params_subtree: a tree holding `<stack>/layer_i/<site>/<name>/...` (an optional `backbone/`
        root is stripped; other leaves are ignored).
      model_config: our BertConfig / LlamaConfig, an HF config or its dict (model_type, hidden_size,
        number of layers).
      torch_bin: also write pytorch_adapter.bin with torch.save (AdapterHub's default reader) when
        torch is installed. adapter.safetensors is always written; AdapterHub reads it with
        `load_adapter(directory, use_safetensors=True)`.
    Returns:
      the files written.
    """
    model_type, d_model, num_layers = _model_info(model_config)
    family = _family(model_type, "export_adapterhub")
    bn, layer_sets = hub_config_from_spec(spec, d_model, num_layers)
    state = _hub_state(spec, params_subtree, family, layer_sets, bn)
    os.makedirs(directory, exist_ok=True)
    meta = {"config": bn, "hidden_size": d_model, "model_class": _EXPORT[family][1], "model_name": "",
            "model_type": model_type, "name": spec.name, "version": HUB_VERSION}
    written = [os.path.join(directory, CONFIG_NAME), os.path.join(directory, SAFE_WEIGHTS_NAME)]
    write_json(written[0], meta)
    from safetensors.numpy import save_file
    save_file(state, written[1])
    if torch_bin and importlib.util.find_spec("torch") is not None:
        import torch
        written.append(os.path.join(directory, WEIGHTS_NAME))
        torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, written[-1])
    return written
