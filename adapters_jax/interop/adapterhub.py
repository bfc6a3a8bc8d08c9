"""AdapterHub (`adapters`) bottleneck adapters <-> our parameter trees.

AdapterHub keeps a BERT adapter at `encoder.layer.{i}.attention.output.adapters.{name}`
(after attention: our `attn_adapter`) or `encoder.layer.{i}.output.adapters.{name}` (after
the FFN: our `ffn_adapter`), with `adapter_down.0` the down projection (index 0 of its
Sequential; a `ln_before` LayerNorm shifts it to 1) and `adapter_up` the up projection.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
from flax import traverse_util

from adapters_jax.backbones import sites

_SITE_OF = {"attention.output": sites.ATTN_OUTPUT, "output": sites.FFN_OUTPUT}
_KEY = re.compile(r"(?:bert\.|roberta\.)?encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\."
                  r"([^.]+)\.(adapter_down\.(\d+)|adapter_up|adapter_norm_after|scaling)\.?(weight|bias)?")


def bottleneck_from_torch(state: Mapping[str, np.ndarray], name: str, prefix: tuple = ("encoder",),
                          ln_before: bool = False) -> dict:
    """Our adapter subtree (nested dict, paths `<prefix>/layer_i/<site>/<name>/...`) from an
    AdapterHub state dict (numpy arrays). Keys of other adapters are skipped."""
    flat = {}
    for key, value in state.items():
        m = _KEY.fullmatch(key)
        if not m or m.group(3) != name:
            continue
        layer, where, part, idx, kind = m.group(1), m.group(2), m.group(4), m.group(5), m.group(6)
        base = tuple(prefix) + (f"layer_{layer}", _SITE_OF[where], name)
        value = np.asarray(value, np.float32)
        if part.startswith("adapter_down"):
            is_norm = ln_before and idx == "0"
            mod = "ln_before" if is_norm else "down"
            leaf = ("scale" if kind == "weight" else "bias") if is_norm else ("kernel" if kind == "weight" else "bias")
            flat[base + (mod, leaf)] = value.T if leaf == "kernel" else value
        elif part == "adapter_up":
            flat[base + ("up", "kernel" if kind == "weight" else "bias")] = value.T if kind == "weight" else value
        elif part == "adapter_norm_after":
            flat[base + ("ln_after", "scale" if kind == "weight" else "bias")] = value
        else:  # learned scaling
            flat[base + ("scaling",)] = value.reshape(-1)
    if not flat:
        raise ValueError(f"no AdapterHub bottleneck weights for adapter {name!r} in the state dict")
    return traverse_util.unflatten_dict(flat)
