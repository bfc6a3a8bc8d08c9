"""AdapterFusion's second stage: an AdapterSetup built from earlier runs' adapter exports.

The exports' adapters keep their names and weights (frozen by the rules, which train only
the fusion layers and the head); each must have been trained on this very base model.
"""
from __future__ import annotations

from typing import Sequence

from flax import traverse_util

from adapters_jax import checkpoint
from adapters_jax.adapters.composition import AdapterSetup
from adapters_jax.adapters.fusion import FusionConfig


def setup_from_exports(directories: Sequence[str], base_sha256: str, fusion: FusionConfig,
                       fusion_name: str = "fusion") -> tuple[AdapterSetup, dict]:
    """(AdapterSetup composing the exports with 'fuse', their adapter params under `backbone/`)."""
    if len(directories) < 2:
        raise ValueError(f"fusion.adapters needs at least two adapter export directories, got {list(directories)}")
    specs, flat = [], {}
    for d in directories:
        meta, tree = checkpoint.read_adapter(d)
        if meta.get("base_sha256") != base_sha256:
            raise ValueError(f"{d}: adapter was trained on a different base model (sha256 mismatch)")
        spec = checkpoint.spec_from_dict(meta.get("spec"), d)
        if spec is None:
            raise ValueError(f"{d}: export holds no adapter (full fine-tuning or head-only run)")
        specs.append(spec)
        for path, value in traverse_util.flatten_dict(tree).items():
            if path[0] == "backbone":  # the other task's head is not needed
                flat[path] = value
    setup = AdapterSetup(tuple(specs), composition="fuse", fusion=fusion, fusion_name=fusion_name)
    return setup, traverse_util.unflatten_dict(flat)
