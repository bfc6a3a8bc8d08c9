"""What the dropout mask costs: the train step with hash masks, threefry masks and no dropout.

    python -m experiments.bench_dropout                     # Houlsby and full, MiniLM dims, 32 x 128
    python -m experiments.bench_dropout --methods houlsby --rounds 8

All variants are compiled first, then timed in alternation in one process (round-robin, one
step each per round), so a noisy machine slows them alike; the median per variant is reported.
'no dropout' (every rate 0) is the floor that no mask implementation can beat. Prints a table
and writes JSON beside --out.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from adapters_jax import dropout, trainer
from adapters_jax.compile_options import train_jit
from experiments.bench_steps import MODELS, build

flags.DEFINE_string("methods", "houlsby,full", "comma-separated methods (experiments.bench_steps.METHODS)")
flags.DEFINE_string("model", "minilm", "minilm, bert-base or tiny")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_integer("seq", 128, "sequence length")
flags.DEFINE_integer("rounds", 8, "timed rounds (one step of every variant per round)")
flags.DEFINE_string("out", "runs/bench_dropout.json", "JSON output")
FLAGS = flags.FLAGS


def compiled_step(method: str, mask: str, drop: bool):
    """(compiled step, state, batch): the mask implementation is fixed when the step is traced."""
    cfg = MODELS[FLAGS.model]
    if not drop:
        cfg = dataclasses.replace(cfg, attention_dropout=0.0, hidden_dropout=0.0)
    model, tx, state, batch, _, _ = build(cfg, method, jnp.float32, FLAGS.batch, FLAGS.seq)
    previous = dropout.set_mask_impl(mask)
    try:
        step = train_jit(trainer.make_train_step(model, tx), dtype=jnp.float32,
                         donate_argnums=(0,)).lower(state, batch).compile()
    finally:
        dropout.set_mask_impl(previous)
    return step, state, batch


def main(argv):
    del argv
    variants = {}
    for method in FLAGS.methods.split(","):
        for label, mask, drop in (("hash", "hash", True), ("threefry", "threefry", True), ("no dropout", "hash", False)):
            variants[(method, label)] = [*compiled_step(method, mask, drop), []]
    for v in variants.values():  # warm-up
        v[1], m = v[0](v[1], v[2])
        jax.block_until_ready(m)
    for r in range(FLAGS.rounds):
        for v in variants.values():
            t = time.perf_counter()
            v[1], m = v[0](v[1], v[2])
            jax.block_until_ready(m)
            v[3].append(time.perf_counter() - t)
        print(f"round {r + 1}/{FLAGS.rounds}", flush=True)
    rows = [{"method": k[0], "dropout": k[1], "step_s": statistics.median(v[3]), "times": v[3]}
            for k, v in variants.items()]
    print(f"\n{FLAGS.model}, batch {FLAGS.batch} x {FLAGS.seq}, {os.cpu_count()} CPUs, "
          f"median of {FLAGS.rounds} alternating rounds")
    print("| method | dropout masks | step s | vs threefry |\n|---|---|---|---|")
    for r in rows:
        ref = next(x["step_s"] for x in rows if x["method"] == r["method"] and x["dropout"] == "threefry")
        print(f"| {r['method']} | {r['dropout']} | {r['step_s']:.3f} | {r['step_s'] / ref:.3f} |")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"model": FLAGS.model, "batch": FLAGS.batch, "seq": FLAGS.seq, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
