"""Adapters in the formats of other libraries: AdapterHub (`adapters`) bottlenecks, HF PEFT LoRA.

    spec, subtree = import_adapterhub("dir")                 # a `model.save_adapter` directory
    export_adapterhub(spec, subtree, "out", model_config)    # `model.load_adapter("out")` reads it
    spec, subtree = import_peft_lora("dir", "llama")          # a `PeftModel.save_pretrained` directory
    export_peft_lora(spec, subtree, "out", "llama", "HuggingFaceTB/SmolLM2-135M")
    params = place_adapter(params, subtree)                   # into a model built with `spec`

Adapter subtrees are rooted at the backbone: `encoder/layer_i/...` (BERT family) or
`layers/layer_i/...` (Llama), without the `backbone/` root of `AdaptedModel`'s parameters
(`place_adapter(params, subtree, prefix=("backbone",))` puts them there).

Weights are never unpickled: safetensors files are parsed here (float32, float16 and bfloat16,
without torch), and a `.bin` file goes only through `torch.load(weights_only=True)`.
The helpers below are defined before the submodules are imported, which use them.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from adapters_jax.backbones import hf_io

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _bf16():
    import ml_dtypes  # shipped with jax
    return ml_dtypes.bfloat16


def read_safetensors(file: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (floats as float32); bf16 needs no torch."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _bf16() if info["dtype"] == "BF16" else _ST_DTYPES[info["dtype"]]
            lo, hi = info["data_offsets"]
            arr = np.frombuffer(data[lo:hi], dtype=dtype).reshape(info["shape"])
            out[name] = arr.astype(np.float32) if info["dtype"] in ("BF16", "F16", "F64") else arr.copy()
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def read_torch_bin(file: str) -> dict[str, np.ndarray]:
    """A torch state dict read with `torch.load(weights_only=True)` only (floats as float32)."""
    return hf_io.read_torch_bin(file)


def read_weights(directory: str, safetensors_name: str, bin_name: str) -> tuple[str, dict]:
    """(file read, tensors) from `directory`: the safetensors file if present, else the .bin."""
    st, bn = os.path.join(directory, safetensors_name), os.path.join(directory, bin_name)
    if os.path.exists(st):
        return st, read_safetensors(st)
    if os.path.exists(bn):
        return bn, read_torch_bin(bn)
    raise ValueError(f"{directory}: no {safetensors_name} or {bin_name}")


def read_json(file: str) -> dict:
    if not os.path.exists(file):
        raise ValueError(f"{file}: missing")
    try:
        with open(file, encoding="utf-8") as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{file}: not a JSON object")
    return out


def write_json(file: str, obj: dict) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def strip_backbone(tree: Any) -> dict:
    """The flat tree, from below its `backbone/` root when it has one (AdaptedModel's params)."""
    flat = traverse_util.flatten_dict(dict(tree))
    if any(p[0] == "backbone" for p in flat):
        flat = {p[1:]: v for p, v in flat.items() if p[0] == "backbone"}
    return flat


def place_adapter(params: Any, subtree: Any, prefix: tuple = ()) -> dict:
    """`params` with every leaf of an imported adapter `subtree` written in (under `prefix`).

    Each leaf must land on a model leaf of the same shape (build the model with the imported
    spec); a one-line ValueError names the first one that does not.
    """
    import jax.numpy as jnp
    flat = traverse_util.flatten_dict(dict(params))
    for path, value in traverse_util.flatten_dict(dict(subtree)).items():
        full, name = tuple(prefix) + path, "/".join(tuple(prefix) + path)
        if full not in flat:
            raise ValueError(f"adapter parameter {name} has no place in the model (build it with the imported spec)")
        if tuple(flat[full].shape) != tuple(np.shape(value)):
            raise ValueError(f"adapter parameter {name} has shape {tuple(np.shape(value))}, "
                             f"the model expects {tuple(flat[full].shape)}")
        flat[full] = jnp.asarray(value, flat[full].dtype)
    return traverse_util.unflatten_dict(flat)


from adapters_jax.interop.adapterhub import export_adapterhub, import_adapterhub  # noqa: E402
from adapters_jax.interop.peft_lora import export_peft_lora, import_peft_lora  # noqa: E402

__all__ = ["import_adapterhub", "export_adapterhub", "import_peft_lora", "export_peft_lora",
           "place_adapter", "read_safetensors", "read_torch_bin"]
