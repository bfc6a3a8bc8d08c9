"""End to end: one epoch of the default task, our training loop vs an AdapterHub loop.

    python -m experiments.bench_epoch                      # Houlsby r=64, Rotten Tomatoes, 1 epoch
    python -m experiments.bench_epoch --epochs 1 --out docs/results/epoch/houlsby_rt.json
    python -m experiments.bench_epoch --dtype bfloat16     # ours with bf16 matmuls
    python -m experiments.bench_epoch --malloc tuned       # both loops with experiments/host_malloc.py
    python -m experiments.bench_epoch --warm               # also ours with a filled compile cache
    python -m experiments.bench_epoch --cpu_devices 2      # ours data parallel over 2 CPU devices

Ours is `experiments.train --config configs/houlsby_r64.py` (the config's length buckets;
compiles included in its loop time, as the persistent compile cache is off; `--warm` adds a
rerun against a compile cache that an untimed run filled). Theirs is
experiments/epoch_adapterhub.py: the same rows, hyperparameters and thread count, batches
padded to their longest row as HF does. Each runs in its own process, one after the other.
Reports the training-loop seconds, the whole process wall time (imports, loading, tokenising,
compiling, evaluating) and the validation accuracy of both; writes JSON, a markdown table and
a PNG.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import host_malloc

flags.DEFINE_integer("epochs", 1, "epochs for both loops")
flags.DEFINE_integer("seed", 0, "seed for both loops")
flags.DEFINE_string("config", "configs/houlsby_r64.py", "our config (its method must exist in AdapterHub)")
flags.DEFINE_string("out", "runs/bench_epoch.json", "JSON output (.md and .png go beside it)")
flags.DEFINE_enum("malloc", "default", host_malloc.MODES, "glibc malloc settings of both loops' processes "
                  "(experiments/host_malloc.py)")
flags.DEFINE_bool("warm", False, "also time ours with a persistent compile cache that an untimed run filled "
                  "(what reruns and sweep trials pay; the cold run stays the headline)")
flags.DEFINE_string("dtype", "", "our compute dtype (float32 or bfloat16); empty: the config's")
flags.DEFINE_integer("cpu_devices", -1, "our mesh.cpu_devices (XLA devices the CPU is split into); -1: the config's")
flags.DEFINE_integer("streams", 0, "our train.streams (the batch's parts computed side by side); 0: the config's")
FLAGS = flags.FLAGS


def _last(path: str, key: str) -> dict:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if key in r][-1]


def run_ours(workdir: str, compile_cache: str = "") -> dict:
    """Our training run. compile_cache '' (cold: every compile counted) or a directory whose
    persistent XLA cache an earlier run filled (warm: what reruns and sweep trials pay)."""
    cmd = [sys.executable, "-m", "experiments.train", f"--config={FLAGS.config}", f"--workdir={workdir}",
           f"--config.train.num_epochs={FLAGS.epochs}", f"--config.seed={FLAGS.seed}",
           "--config.train.ckpt_every=1000000", f"--compile_cache={compile_cache}"]
    if FLAGS.dtype:
        cmd.append(f"--config.model.dtype={FLAGS.dtype}")
    if FLAGS.cpu_devices >= 0:
        cmd.append(f"--config.mesh.cpu_devices={FLAGS.cpu_devices}")
    if FLAGS.streams:
        cmd.append(f"--config.train.streams={FLAGS.streams}")
    t0 = time.perf_counter()
    env = {k: v for k, v in host_malloc.child_env(FLAGS.malloc).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"our training failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    metrics = os.path.join(workdir, "metrics.jsonl")
    train, ev = _last(metrics, "train_s"), _last(metrics, "eval_accuracy")
    name = "adapters_jax" + (" (warm compile cache)" if compile_cache else "")
    if FLAGS.cpu_devices > 1:
        name += f" ({FLAGS.cpu_devices} CPU devices)"
    if FLAGS.streams > 1:
        name += f" ({FLAGS.streams} streams)"
    return {"framework": name, "train_s": train["train_s"], "steps": train["step"],
            "steps_per_s": train["step"] / train["train_s"], "eval_accuracy": ev["eval_accuracy"], "wall_s": wall}


def run_adapterhub(method: str) -> dict:
    cmd = [sys.executable, "-m", "experiments.epoch_adapterhub", f"--method={method}",
           f"--epochs={FLAGS.epochs}", f"--seed={FLAGS.seed}", f"--threads={os.cpu_count() or 1}"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=host_malloc.child_env(FLAGS.malloc))
    wall = time.perf_counter() - t0
    rows = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not rows:
        raise RuntimeError(f"AdapterHub loop failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return {**json.loads(rows[-1]), "wall_s": wall}


def table(rows: list[dict]) -> str:
    lines = ["| loop | train s | steps | steps/s | process wall s | val accuracy |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['framework']} | {r['train_s']:.1f} | {r['steps']} | {r['steps_per_s']:.2f} | "
                     f"{r['wall_s']:.1f} | {r['eval_accuracy']:.4f} |")
    theirs = rows[-1]
    for ours in rows[:-1]:
        lines.append(f"\nspeed-up (AdapterHub / {ours['framework']}): train loop "
                     f"{theirs['train_s'] / ours['train_s']:.2f}x, "
                     f"process wall {theirs['wall_s'] / ours['wall_s']:.2f}x; "
                     f"accuracy difference {100 * (ours['eval_accuracy'] - theirs['eval_accuracy']):+.2f} points")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 1.5, 3))
    names = [r["framework"] for r in rows]
    ax.bar([n + "\nloop" for n in names], [r["train_s"] for r in rows], color="tab:blue")
    ax.bar([n + "\nprocess" for n in names], [r["wall_s"] for r in rows], color="tab:gray")
    ax.set_ylabel("seconds (lower is better)")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{FLAGS.epochs} epoch(s): {os.path.basename(FLAGS.config)} {FLAGS.dtype} "
                 f"malloc {FLAGS.malloc}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    method = os.path.basename(FLAGS.config).split("_")[0]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"ours: {FLAGS.config}, {FLAGS.epochs} epoch(s)...", flush=True)
        rows = [run_ours(os.path.join(tmp, "run"))]
        if FLAGS.warm:  # the cold run compiled into no cache: fill one, untimed, then time a rerun
            cache = os.path.join(tmp, "xla_cache")
            print("ours again, filling a compile cache (untimed), then timed with it...", flush=True)
            run_ours(os.path.join(tmp, "fill"), cache)
            rows.append(run_ours(os.path.join(tmp, "warm"), cache))
    print(f"AdapterHub: {method}, {FLAGS.epochs} epoch(s)...", flush=True)
    rows.append(run_adapterhub(method))
    text = table(rows)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"config": FLAGS.config, "epochs": FLAGS.epochs, "seed": FLAGS.seed,
                   "dtype": FLAGS.dtype or "config", "malloc": FLAGS.malloc, "rows": rows}, f, indent=1)
    base = os.path.splitext(FLAGS.out)[0]
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    plot(rows, base + ".png")


if __name__ == "__main__":
    app.run(main)
