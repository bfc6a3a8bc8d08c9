"""Inference latency of the plain base vs adapted models (the seeds' inference-overhead trade-off).

Bottleneck adapters add layers to the forward pass; LoRA and IA3 fold into the base weights
and then cost nothing. Variants are timed in alternation (a round of each, repeated) so that
load from other processes hits all of them alike; the median is reported.
"""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from adapters_jax.adapters import spec_from_config
from adapters_jax.adapters.lora import merge_lora
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.compile_options import forward_jit

# variant -> adapter options (None: the plain base); "*_merged" variants fold the adapter first
VARIANTS = {
    "base": None,
    "houlsby": dict(method="houlsby", bottleneck_dim=64),
    "pfeiffer": dict(method="pfeiffer", bottleneck_dim=64),
    "lora": dict(method="lora", r=8, alpha=16),
    "lora_merged": dict(method="lora", r=8, alpha=16),
}


def _forward(cfg: BertConfig, options, batch: int, seq: int, dtype):
    """(jitted forward, params, inputs) for one variant, with non-zero adapter weights."""
    spec = None if options is None else spec_from_config(name="task", **options)
    model = BertModel(cfg, filler=spec, dtype=dtype)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32)  # [B, T]
    mask = np.ones_like(ids)
    params = jax.jit(lambda r: model.init(r, ids, mask)["params"])(jax.random.PRNGKey(0))
    # make LoRA's B (zero at init) non-zero, so the unmerged path really computes the update
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if getattr(p[-1], "key", "") == "lora_b" else x, params)
    return model, spec, params, ids, mask


def build_variant(cfg: BertConfig, name: str, batch: int, seq: int, dtype):
    model, spec, params, ids, mask = _forward(cfg, VARIANTS[name], batch, seq, dtype)
    if name.endswith("_merged"):
        params, spec = merge_lora(params, spec)
        model = BertModel(cfg, filler=spec if spec.placements else None, dtype=dtype)
    fn = forward_jit(lambda p: model.apply({"params": p}, ids, mask, deterministic=True)["last_hidden_state"],
                     dtype=dtype)
    fn(params).block_until_ready()  # compile
    return lambda: fn(params).block_until_ready()


def latency_table(cfg: BertConfig, batch_sizes=(1, 32), seq: int = 128, reps: int = 10,
                  dtype=jax.numpy.float32, variants=tuple(VARIANTS)) -> list[dict]:
    """Median forward latency per (variant, batch size), and its overhead over the base."""
    rows = []
    for b in batch_sizes:
        runs = {v: build_variant(cfg, v, b, seq, dtype) for v in variants}
        times = {v: [] for v in variants}
        for _ in range(reps):
            for v, run in runs.items():
                t = time.perf_counter()
                run()
                times[v].append(time.perf_counter() - t)
        base = statistics.median(times["base"]) if "base" in times else float("nan")
        for v in variants:
            med = statistics.median(times[v])
            rows.append({"variant": v, "batch": b, "seq": seq, "latency_ms": med * 1e3,
                         "overhead": med / base - 1.0})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'variant':<12} {'batch':>5} {'seq':>4} {'latency ms':>11} {'vs base':>8}"]
    lines += [f"{r['variant']:<12} {r['batch']:>5} {r['seq']:>4} {r['latency_ms']:>11.2f} {r['overhead']:>+8.1%}"
              for r in rows]
    return "\n".join(lines)
