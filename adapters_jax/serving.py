"""Serving many task adapters on one frozen base kept in memory.

Each loaded export is renamed to one canonical slot name, so adapters with the same
architecture share one parameter-tree structure and therefore one compiled program:
swapping is reading a small safetensors file and handing new arrays to the same function.
Mixed-task batches run the base once with 'select' composition (per-row adapter ids), for
bottleneck, Compacter, LoRA and IA3 exports alike.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapters_jax import checkpoint, host_memory
from adapters_jax.adapters import AdapterSetup
from adapters_jax.backbones import sites
from adapters_jax.compile_options import forward_jit
from adapters_jax.heads import POOLINGS, ClassificationHead
from adapters_jax.hub import load_backbone
from adapters_jax.model import AdaptedModel, backbone_inputs

SLOT = "active"
_SITES = set(sites.ALL_SITES) | {sites.SHARED}


def rename_adapter(tree: Any, old: str, new: str) -> dict:
    """Moves an adapter's leaves from `<site>/<old>/...` to `<site>/<new>/...`."""
    flat = traverse_util.flatten_dict(dict(tree))
    out = {}
    for path, v in flat.items():
        path = tuple(new if (i > 0 and p == old and path[i - 1] in _SITES) else p for i, p in enumerate(path))
        out[path] = v
    return traverse_util.unflatten_dict(out)


@dataclasses.dataclass
class LoadedAdapter:
    name: str
    spec: Any
    head: dict
    label_names: list
    params: dict  # trainable tree (backbone/... adapters, head/...), renamed to SLOT, on device
    load_ms: float


class AdapterServer:
    """One base in memory; adapters loaded from export directories and swapped per request."""

    def __init__(self, model: str = "minilm-l6", max_length: int = 128):
        backbone = load_backbone(model)
        self.base_sha = checkpoint.base_fingerprint(backbone.path)
        self.base = jax.device_put(backbone.params)
        # the device copy is what runs: keep no second, host copy of the base (MiniLM: the
        # process held 415 MiB after start with it, 345 without)
        self.backbone = dataclasses.replace(backbone, params=None)
        self.max_length = max_length
        self.adapters: dict[str, LoadedAdapter] = {}
        self._programs: dict = {}
        self.compiles = 0

    def load(self, directory: str, name: Optional[str] = None) -> LoadedAdapter:
        """Reads an export (JSON + safetensors only), checks it was made for this base, stores it."""
        t = time.perf_counter()
        meta, tree = checkpoint.read_adapter(directory)
        if meta.get("base_sha256") != self.base_sha:
            raise ValueError(f"{directory}: adapter was trained on a different base model "
                             f"(sha256 {str(meta.get('base_sha256'))[:12]}…, this base {self.base_sha[:12]}…)")
        spec = checkpoint.spec_from_dict(meta.get("spec"), directory)
        if spec is None:
            raise ValueError(f"{directory}: export has no adapter spec (a full fine-tuning export?)")
        head = meta.get("head")
        if not (isinstance(head, dict) and isinstance(head.get("num_labels"), int) and head["num_labels"] > 0
                and head.get("pooling", "cls") in POOLINGS):
            raise ValueError(f"{directory}: adapter_config.json 'head' must be {{'num_labels': int > 0, "
                             f"'pooling': {' | '.join(repr(p) for p in POOLINGS)}}}, got {str(head)[:80]}")
        name, own = name or spec.name, spec.name
        tree = rename_adapter(tree, spec.name, SLOT)
        spec = dataclasses.replace(spec, name=SLOT)
        abstract = self._abstract(spec, head)
        checkpoint.check_fits(abstract, tree, directory)
        have, base = traverse_util.flatten_dict(tree), traverse_util.flatten_dict({"backbone": self.base})
        missing = [k for k in traverse_util.flatten_dict(abstract) if k not in have and k not in base]
        if missing:
            raise ValueError(f"{directory}: {len(missing)} tensors missing from the export, e.g. "
                             f"{'/'.join(own if p == SLOT else p for p in missing[0])}")
        params = jax.device_put(tree)
        jax.block_until_ready(params)
        loaded = LoadedAdapter(name, spec, head, meta.get("label_names", []), params,
                               (time.perf_counter() - t) * 1e3)
        self.adapters[name] = loaded
        return loaded

    def _model(self, spec, head: dict) -> AdaptedModel:
        return AdaptedModel(self.backbone.model.clone(filler=spec),
                            ClassificationHead(head["num_labels"], pooling=head.get("pooling", "cls")))

    def _abstract(self, spec, head: dict) -> dict:
        """The parameter shapes an adapter of this architecture must have (traced once, cached)."""
        key = ("shapes", spec, _key(head))
        if key not in self._programs:
            model = self._model(spec, head)
            batch = {"input_ids": jnp.zeros((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4), jnp.int32)}
            self._programs[key] = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]
        return self._programs[key]

    def _program(self, key, model):
        if key not in self._programs:
            def run(params, batch):
                self.compiles += 1  # counts traces: once per architecture and padded input shape
                return model.apply({"params": params}, batch)
            self._programs[key] = forward_jit(run, dtype=self.backbone.model.dtype)
        return self._programs[key]

    def _encode(self, texts: Sequence[str]) -> dict:
        enc = self.backbone.tokenizer(list(texts), max_length=self.max_length, pad_to_multiple_of=32)
        return {k: jnp.asarray(v) for k, v in enc.as_dict().items()}

    def predict(self, texts: Sequence[str], adapter: str) -> np.ndarray:
        """Logits [B, num_labels] for every text with one adapter."""
        a = self.adapters[adapter]
        model = self._model(a.spec, a.head)
        params = {"backbone": _merge(self.base, a.params["backbone"]), "head": a.params["head"]}
        return np.asarray(self._run(self._program((a.spec, _key(a.head)), model), params, self._encode(texts)))

    def _run(self, program, *args):
        """Calls a program; after a call that compiled, hands the compiler's freed heap back, as
        training does (MiniLM server, 3 input shapes, default allocator: 499-508 -> 437 MiB
        resident after them, peak 507 -> 473 MiB)."""
        before = self.compiles
        out = program(*args)
        if self.compiles != before:
            host_memory.release_free_heap()
        return out

    def predict_mixed(self, texts: Sequence[str], adapters: Sequence[str]) -> list[np.ndarray]:
        """One forward pass for a batch whose rows use different adapters; per-row logits."""
        names = sorted(set(adapters))
        loaded = [self.adapters[n] for n in names]
        specs = tuple(dataclasses.replace(a.spec, name=f"task{i}") for i, a in enumerate(loaded))
        setup = AdapterSetup(specs, composition="select")
        backbone = self.backbone.model.clone(filler=setup)
        adapter_tree = {}
        for i, a in enumerate(loaded):
            adapter_tree = _merge(adapter_tree, rename_adapter(a.params["backbone"], SLOT, f"task{i}"))
        params = _merge(self.base, adapter_tree)
        batch = self._encode(texts)
        ids = jnp.asarray([names.index(n) for n in adapters], jnp.int32)
        key = ("mixed", setup)
        if key not in self._programs:
            def run(p, b, adapter_ids):
                self.compiles += 1
                return backbone.apply({"params": p}, **backbone_inputs(backbone, {**b, "adapter_ids": adapter_ids}))
            self._programs[key] = forward_jit(run, dtype=self.backbone.model.dtype)
        outputs = self._run(self._programs[key], params, batch, ids)
        logits = []
        for row, n in enumerate(adapters):
            a = self.adapters[n]
            head = ClassificationHead(a.head["num_labels"], pooling=a.head.get("pooling", "cls"))
            one = {k: v[row:row + 1] for k, v in outputs.items() if k != "hidden_states"}
            logits.append(np.asarray(head.apply({"params": a.params["head"]}, one))[0])
        return logits


def _merge(a: dict, b: dict) -> dict:
    flat = traverse_util.flatten_dict(dict(a))
    flat.update(traverse_util.flatten_dict(dict(b)))
    return traverse_util.unflatten_dict(flat)


def _key(head: dict) -> tuple:
    return (head["num_labels"], head.get("pooling", "cls"))
