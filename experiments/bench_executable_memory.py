"""What a compiled XLA:CPU program keeps resident in host memory: per program and per fused kernel.

    python -m experiments.bench_executable_memory        # MiniLM Houlsby and full, 3 step layouts, 2 chains
    python -m experiments.bench_executable_memory --methods houlsby --layouts 2x1 --chains ""

Why: at MiniLM size the compiled train step is one of the largest parts of a training process
besides the step's own temporaries, and it grows with the number of fused kernels, not with the
model's size: two streams (train.streams=2) write every kernel twice, micro-batches
(train.accum_steps) run one loop body. The synthetic chains (a tanh-sin-transpose chain of n
links on a 64 x 64 array) separate the per-kernel cost from everything else.

Each program is compiled in a fresh process under the tuned allocator (experiments/host_malloc.py).
Its RSS is read once the inputs are built, JAX's caches cleared and the heap trimmed, and again
after the compile, with the caches cleared (the process holds the executable) and the heap
trimmed: the difference is what the executable holds plus the compiler's freed pieces that
share pages with it, which no trim can return. Deleting the executable then shows what a trim
gets back. Prints a table; writes JSON and a PNG (MiB against fused kernels) beside --out.
"""
from __future__ import annotations

import gc
import json
import os
import re
import sys
import time

import numpy as np
from absl import app, flags

from experiments import host_malloc

def _define_flags() -> None:
    """The command line; defined only when run as a script, so that tests can import the helpers
    below beside other experiments' flags (absl refuses a flag name defined twice)."""
    flags.DEFINE_string("methods", "houlsby,full", "train steps to compile (experiments.bench_steps.METHODS)")
    flags.DEFINE_string("model", "minilm", "minilm, bert-base or tiny")
    flags.DEFINE_integer("batch", 32, "batch size")
    flags.DEFINE_integer("seq", 128, "sequence length")
    flags.DEFINE_string("layouts", "2x1,1x2,1x1", "comma-separated STREAMSxACCUM_STEPS train-step layouts")
    flags.DEFINE_enum("cpu_scheduler", "memory", ["default", "memory"], "as train.cpu_scheduler")
    flags.DEFINE_string("chains", "250,1000", "comma-separated link counts of the synthetic chains ('' for none)")
    flags.DEFINE_string("out", "runs/bench_executable_memory.json", "JSON output (the PNG goes beside it)")
    flags.DEFINE_string("child", "", "internal: measure one program ('step:METHOD:SxA' or 'chain:N') and print its row")


FLAGS = flags.FLAGS


def count_fusions(hlo_text: str) -> int:
    """Fusion instructions in an optimized HLO module's text: XLA:CPU emits one kernel for each."""
    return len(re.findall(r"\sfusion\(", hlo_text))


def parse_layout(text: str) -> tuple[int, int]:
    """'2x1' -> (streams=2, accum_steps=1)."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise ValueError(f"--layouts: {text!r} is not STREAMSxACCUM_STEPS with both >= 1, e.g. 2x1")
    return int(m.group(1)), int(m.group(2))


def chain(n: int):
    """A function of n links, each a few elementwise ops and a transpose or reversal that stops XLA
    fusing it with the next: about three fused kernels per link."""
    import jax.numpy as jnp

    def f(x):  # x [64, 64]
        sums = []
        for i in range(n):
            x = jnp.tanh(x * (1.0 + i * 1e-3)) + jnp.sin(x)
            x = x[:, ::-1] if i % 2 else x.T
            sums.append(x.sum())
        return x, jnp.stack(sums)
    return f, (jnp.ones((64, 64)),)


def train_step(method: str, layout: str):
    """The benchmark's train step for `method` (compiled as experiments.benchmark compiles it)."""
    import jax.numpy as jnp
    from experiments.bench_steps import MODELS, build, single_device_step
    streams, accum = parse_layout(layout)
    model, tx, state, inputs, _, params = build(MODELS[FLAGS.model], method, jnp.float32, FLAGS.batch, FLAGS.seq)
    del params  # the state holds what the step reads
    return single_device_step(model, tx, jnp.float32, streams, accum, FLAGS.cpu_scheduler), (state, inputs)


def measure(program: str) -> dict:
    """One program's row, in this (fresh) process."""
    import jax
    from adapters_jax import host_memory
    kind, *rest = program.split(":")
    if kind == "chain":
        f, args = chain(int(rest[0]))
        fn = jax.jit(f)
    elif kind == "step":
        fn, args = train_step(*rest)
    else:
        raise ValueError(f"--child={program!r}: expected 'step:METHOD:SxA' or 'chain:N'")
    jax.block_until_ready(args)

    def settle():
        jax.clear_caches()
        gc.collect()
        host_memory.release_free_heap()
        return host_memory.rss_mib()

    before = settle()
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t
    held = settle() - before
    fusions = count_fusions(compiled.as_text())
    del compiled
    return {"program": program, "fusions": fusions, "compile_s": compile_s, "resident_mib": held,
            "after_delete_mib": settle() - before}


def run_child(program: str) -> dict:
    from experiments.bench_steps import child_rows
    cmd = [sys.executable, "-m", "experiments.bench_executable_memory", f"--child={program}", f"--model={FLAGS.model}",
           f"--batch={FLAGS.batch}", f"--seq={FLAGS.seq}", f"--cpu_scheduler={FLAGS.cpu_scheduler}"]
    return child_rows(cmd, f"measuring {program}", host_malloc.child_env("tuned"))[-1]


def per_fusion_kib(rows: list[dict]) -> float | None:
    """The least-squares slope of resident MiB over fused kernels across the chains, in KiB."""
    chains = [r for r in rows if r["program"].startswith("chain:")]
    if len(chains) < 2:
        return None
    slope = np.polyfit([r["fusions"] for r in chains], [r["resident_mib"] for r in chains], 1)[0]
    return float(slope * 1024)


def format_table(rows: list[dict], slope_kib: float | None) -> str:
    lines = ["| program | fused kernels | compile s | resident after compile, MiB | KiB per kernel | "
             "after deleting it, MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['program']} | {r['fusions']} | {r['compile_s']:.1f} | {r['resident_mib']:.0f} | "
                     f"{r['resident_mib'] * 1024 / max(r['fusions'], 1):.0f} | {r['after_delete_mib']:.0f} |")
    if slope_kib is not None:
        lines.append(f"\nchains: {slope_kib:.0f} KiB resident per extra fused kernel (least squares)")
    return "\n".join(lines)


def plot(path: str, rows: list[dict], title: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for r in rows:
        ax.scatter(r["fusions"], r["resident_mib"], color="C1" if r["program"].startswith("chain:") else "C0")
        ax.annotate(r["program"], (r["fusions"], r["resident_mib"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xlabel("fused kernels in the compiled program")
    ax.set_ylabel("resident after compile and trim, MiB")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    del argv
    if FLAGS.child:
        host_malloc.configure_jax()
        print(json.dumps(measure(FLAGS.child)), flush=True)
        return
    layouts = [lay for lay in FLAGS.layouts.split(",") if lay]
    for lay in layouts:
        try:
            parse_layout(lay)
        except ValueError as e:
            raise app.UsageError(str(e))
    programs = [f"step:{m}:{lay}" for m in FLAGS.methods.split(",") if m for lay in layouts]
    programs += [f"chain:{int(n)}" for n in FLAGS.chains.split(",") if n]
    rows = []
    for i, program in enumerate(programs):
        rows.append(run_child(program))
        print(f"[{i + 1}/{len(programs)}] {program}: {rows[-1]['fusions']} fused kernels, "
              f"{rows[-1]['resident_mib']:.0f} MiB resident", flush=True)
    slope = per_fusion_kib(rows)
    title = (f"{FLAGS.model} train steps at {FLAGS.batch} x {FLAGS.seq} (float32, scheduler {FLAGS.cpu_scheduler}; "
             f"layout STREAMSxACCUM), synthetic chains; tuned malloc, {os.cpu_count()} CPUs")
    print("\n" + title + "\n" + format_table(rows, slope))
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"model": FLAGS.model, "batch": FLAGS.batch, "seq": FLAGS.seq,
                   "cpu_scheduler": FLAGS.cpu_scheduler, "per_fusion_kib": slope, "rows": rows}, f, indent=1)
    png = os.path.splitext(FLAGS.out)[0] + ".png"
    plot(png, rows, title)
    print(f"wrote {FLAGS.out} and {png}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
