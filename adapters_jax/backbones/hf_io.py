"""Reading Hugging Face checkpoint directories (config.json + weights) into Flax params.

Weights come from model.safetensors (or a sharded safetensors index). pytorch_model.bin is
read only through `torch.load(weights_only=True)`, never by unpickling arbitrary objects,
and only if torch is installed. Every problem is one line that names the tensor or file.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

# flax path (tuple of names) -> (HF tensor name, transform applied to the HF array)
NameMap = Mapping[tuple, tuple[str, Callable[[np.ndarray], np.ndarray]]]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message is one line naming the culprit."""


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
    return np.ascontiguousarray(x.T)


def read_config(path: str) -> dict:
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        raise CheckpointError(f"{cfg}: file not found (a Hugging Face checkpoint directory needs config.json)")
    try:
        with open(cfg) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as float32/int numpy arrays, keyed by HF name."""
    from safetensors.numpy import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return _safetensors(single, load_file)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_safetensors(os.path.join(path, shard), load_file))
        return state
    bin_path = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(bin_path):
        return read_torch_bin(bin_path)
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _safetensors(file: str, load_file) -> dict[str, np.ndarray]:
    try:
        return dict(load_file(file))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: unreadable safetensors file ({type(e).__name__}: {e})") from None


def read_torch_bin(file: str) -> dict[str, np.ndarray]:
    """A torch state dict read with `torch.load(weights_only=True)` only (floats as float32)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{file}: reading a .bin file needs torch (torch.load(weights_only=True)); "
                              "install torch or give the weights as safetensors") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickles that hold more than tensors, and others
        raise CheckpointError(f"{file}: refused by torch.load(weights_only=True) ({type(e).__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def to_hf_state(name_map: NameMap, params: Mapping) -> dict[str, np.ndarray]:
    """Our params -> a HF state dict (numpy float32): `convert` run backwards."""
    flat = traverse_util.flatten_dict(dict(params))
    out = {}
    for path, (hf_name, fn) in name_map.items():
        arr = np.asarray(flat[path], np.float32)
        out[hf_name] = np.ascontiguousarray(arr.T) if fn is transpose else arr
    return out


def strip_prefix(state: Mapping[str, np.ndarray], anchor: str, prefixes: Iterable[str]) -> dict:
    """Drops a model prefix ('bert.', 'model.', ...) found in front of the `anchor` tensor."""
    if anchor in state:
        return dict(state)
    for p in prefixes:
        if p + anchor in state:
            return {k[len(p):] if k.startswith(p) else k: v for k, v in state.items()}
    return dict(state)


def convert(state: Mapping[str, np.ndarray], name_map: NameMap, abstract_params: Mapping,
            ignore: Iterable[str] = (), source: str = "checkpoint") -> dict:
    """Builds the Flax param tree from HF tensors, checking names and shapes.

    Args:
      state: HF name -> array.
      name_map: flax path -> (HF name, transform), covering every expected parameter.
      abstract_params: the model's parameter tree (shapes and dtypes; e.g. from jax.eval_shape).
      ignore: regexes (fullmatch) of HF tensors that may be present without being used.
      source: file or directory named in error messages.
    Raises:
      CheckpointError naming the first missing, mis-shaped or unexpected tensor.
    """
    flat = traverse_util.flatten_dict(dict(abstract_params))
    out, used = {}, set()
    for path, leaf in flat.items():
        if path not in name_map:
            raise CheckpointError(f"{source}: the model parameter {'/'.join(path)} has no checkpoint name")
        hf_name, fn = name_map[path]
        if hf_name not in state:
            raise CheckpointError(f"{source}: missing tensor {hf_name} (for {'/'.join(path)})")
        arr = fn(np.asarray(state[hf_name]))
        if tuple(arr.shape) != tuple(leaf.shape):
            raise CheckpointError(f"{source}: tensor {hf_name} has shape {tuple(state[hf_name].shape)}, "
                                  f"expected {tuple(leaf.shape)} after conversion (for {'/'.join(path)})")
        out[path] = arr.astype(leaf.dtype)
        used.add(hf_name)
    patterns = [re.compile(p) for p in ignore]
    for name in state:
        if name not in used and not any(p.fullmatch(name) for p in patterns):
            raise CheckpointError(f"{source}: unexpected tensor {name} (shape {tuple(state[name].shape)})")
    return traverse_util.unflatten_dict(out)
