"""Run checkpoints (orbax) and the adapter export (JSON config + safetensors).

A run checkpoint holds what cannot be rebuilt: trainable params, optimizer state, step, rng
and the data iterator's position. The frozen base is referenced by path and content hash
in the export, never saved again. Orbax writes each step to a temporary directory and
renames it when complete, so a half-written step is never listed.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from adapters_jax.adapters.spec import METHODS, AdapterSpec, Placement

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1


# --- run checkpoints ------------------------------------------------------------------------

def manager(directory: str, max_to_keep: int = 2, interval: int = 1, async_save: bool = True
            ) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=interval,
                                           enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _saved_state(state) -> dict:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng}


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


def save(mngr: ocp.CheckpointManager, state, data_state: dict, extra: Optional[dict] = None,
         force: bool = False) -> bool:
    """Saves step `state.step` (asynchronously when the manager is async).

    Raises CheckpointSaveError (one line) if this save, or the previous asynchronous one, failed.
    """
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(_saved_state(state)),
                              data=ocp.args.JsonSave({"iterator": data_state, **(extra or {})}))
    try:
        return mngr.save(step, args=args, force=force)
    except Exception as e:  # disk full, read-only directory, ... (or the previous async save's failure)
        raise CheckpointSaveError(f"checkpoint save failed at step {step} in {mngr.directory} ({_reason(e)}); "
                                  f"{_kept(mngr)}") from None


def _reason(e: Exception) -> str:
    """One line; a long message keeps its end, where the OS error usually is (e.g. 'No space left')."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg if len(msg) <= 300 else msg[:120] + ' … ' + msg[-160:]}" if msg else type(e).__name__


def _kept(mngr: ocp.CheckpointManager) -> str:
    """What stays valid, read from the directory (the manager's own list may hold the failed step)."""
    try:
        steps = sorted(int(n) for n in os.listdir(mngr.directory) if n.isdigit())
    except OSError:
        steps = []
    return (f"the previous checkpoint (step {steps[-1]}) stays valid" if steps
            else "no earlier checkpoint exists")


def finish(mngr: ocp.CheckpointManager, quiet: bool = False) -> None:
    """Waits for asynchronous saves and closes the manager (quiet: report, do not raise)."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        if not quiet:
            raise CheckpointSaveError(f"finishing checkpoint saves in {mngr.directory} failed ({_reason(e)}); "
                                      f"{_kept(mngr)}") from None
        print(f"WARNING: an unfinished checkpoint save failed ({_reason(e)}); it will not be used")
    finally:
        mngr.close()


def restore_latest(mngr: ocp.CheckpointManager, state):
    """(state, data dict) from the newest complete step that restores, or (None, None).

    A step that fails to restore (truncated or corrupted files) is skipped with a warning,
    and the previous one is tried.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _saved_state(state))
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged files
            print(f"WARNING: checkpoint step {step} in {mngr.directory} is unreadable "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying an older one")
            continue
        s = got["state"]
        return state.replace(step=s["step"], trainable=s["trainable"], opt_state=s["opt_state"],
                             rng=s["rng"]), got["data"]
    return None, None


# --- adapter export ---------------------------------------------------------------------------

def file_hash(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file (the base checkpoint's content hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def base_fingerprint(model_dir: str) -> str:
    if os.path.isfile(model_dir):  # a single-file base, e.g. a .gguf
        return file_hash(model_dir)
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        p = os.path.join(model_dir, name)
        if os.path.exists(p):
            return file_hash(p)
    raise FileNotFoundError(f"{model_dir}: no weights file to fingerprint")


def spec_to_dict(spec) -> Optional[dict]:
    """An AdapterSpec (or an AdapterSetup of several) as JSON-ready data."""
    if spec is None:
        return None
    if hasattr(spec, "adapters"):  # AdapterSetup
        import dataclasses
        return {"setup": [spec_to_dict(a) for a in spec.adapters], "composition": spec.composition,
                "fusion": None if spec.fusion is None else dataclasses.asdict(spec.fusion),
                "fusion_name": spec.fusion_name}
    return {"name": spec.name, "adapter_drop": spec.adapter_drop,
            "placements": [{"site": p.site, "method": p.method,
                            "layers": None if p.layers is None else list(p.layers),
                            "config": _config_dict(p.config)} for p in spec.placements]}


def _config_dict(cfg) -> dict:
    import dataclasses
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def spec_from_dict(d: Optional[dict], source: str = "adapter config"):
    """The inverse of spec_to_dict: an AdapterSpec, an AdapterSetup, or None."""
    if d is None:
        return None
    if "setup" in d:
        from adapters_jax.adapters.composition import AdapterSetup
        from adapters_jax.adapters.fusion import FusionConfig
        try:
            return AdapterSetup(tuple(spec_from_dict(a, source) for a in d["setup"]), d["composition"],
                                None if d.get("fusion") is None else FusionConfig(**d["fusion"]),
                                d.get("fusion_name", "fusion"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: invalid adapter setup ({type(e).__name__}: {e})") from None
    try:
        placements = []
        for p in d["placements"]:
            if p["method"] not in METHODS:
                raise ValueError(f"unknown adapter method {p['method']!r}")
            cfg_cls = METHODS[p["method"]][0]
            cfg = cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in p["config"].items()})
            placements.append(Placement(p["site"], p["method"], cfg,
                                        None if p["layers"] is None else tuple(p["layers"])))
        return AdapterSpec(name=d["name"], placements=tuple(placements), adapter_drop=d.get("adapter_drop", 0))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid adapter spec ({type(e).__name__}: {e})") from None


def export_adapter(directory: str, trainable: Any, meta: dict) -> int:
    """Writes `adapter_config.json` (meta + format version) and `adapter.safetensors`
    (the trainable leaves, '/'-joined names). Returns the total size in bytes."""
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    flat = {"/".join(k): np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32))
            for k, v in traverse_util.flatten_dict(dict(trainable)).items()}
    tmp_w = os.path.join(directory, ADAPTER_WEIGHTS + ".tmp")
    save_file(flat, tmp_w)
    tmp_c = os.path.join(directory, ADAPTER_CONFIG + ".tmp")
    with open(tmp_c, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **meta}, f, indent=2)
    os.replace(tmp_w, os.path.join(directory, ADAPTER_WEIGHTS))  # whole files or nothing
    os.replace(tmp_c, os.path.join(directory, ADAPTER_CONFIG))
    return sum(os.path.getsize(os.path.join(directory, n)) for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))


def read_adapter(directory: str) -> tuple[dict, dict]:
    """(meta, nested params) from an export directory. Never unpickles: JSON + safetensors only.

    Raises a one-line ValueError naming the file for anything unreadable.
    """
    from safetensors.numpy import load_file
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise ValueError(f"{p}: missing (an adapter export holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: not an adapters_jax export (format_version must be {FORMAT_VERSION})")
    try:
        flat = load_file(w_path)
    except Exception as e:  # safetensors raises its own types for bad headers
        raise ValueError(f"{w_path}: not a readable safetensors file ({type(e).__name__})") from None
    return meta, traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def check_fits(params: dict, loaded: dict, source: str) -> None:
    """Every loaded leaf must exist in `params` with the same shape, and be floating point where
    the model's is (one-line error otherwise): a header whose dtype was changed from F32 to U32 or
    I32 keeps the byte size and parses, and its bits would load as integers."""
    flat = traverse_util.flatten_dict(dict(params))
    for path, v in traverse_util.flatten_dict(dict(loaded)).items():
        name = "/".join(path)
        if path not in flat:
            raise ValueError(f"{source}: tensor {name} has no place in this model")
        if tuple(flat[path].shape) != tuple(v.shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(v.shape)}, this model needs "
                             f"{tuple(flat[path].shape)}")
        want = flat[path].dtype
        if jnp.issubdtype(want, jnp.floating) and not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"{source}: tensor {name} has dtype {v.dtype}, this model needs a floating "
                             f"point dtype ({want})")
