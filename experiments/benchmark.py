"""Benchmark the train step of every method: compile time, step time, FLOPs, MFU, memory.

    python -m experiments.benchmark                       # MiniLM, batch 32 x 128, all methods
    python -m experiments.benchmark --methods full,houlsby,head_only --adapterhub --inference
    python -m experiments.benchmark --methods houlsby,full --flops_only
    python -m experiments.benchmark --model bert-base     # BERT-base dimensions, random weights

Each method runs in its own subprocess (--isolate, the default), so its peak host RSS is its
own. FLOPs come from XLA's cost analysis of the compiled step (what XLA will run) and from
an analytic count that knows a frozen weight has no weight-gradient matmul and that no
gradient flows below the lowest trainable layer; MFU is the analytic count per second over
the matmul peak the harness measures itself, before and after the methods run (the best
reading counts: a shared VM's peak moved 91-142 GFLOP/s within an hour). `--adapterhub` times PyTorch AdapterHub on the
same model, shapes and threads in the same run; `--inference` times forward latency of the
base vs adapted and merged-LoRA models; `--malloc tuned` runs every timed subprocess with
glibc settings that keep XLA:CPU's step temporaries resident (experiments/host_malloc.py).
Prints tables; writes JSON and a PNG (--out).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from adapters_jax.adapters import spec_from_config
from adapters_jax.backbones import attention
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.compile_options import SCHEDULERS, describe, forward_jit
from experiments import host_malloc
from experiments.bench_steps import METHODS, MODELS, bench, child_rows, matmul_peak

flags.DEFINE_string("methods", "full,head_only,houlsby,pfeiffer,parallel,compacter,lora,ia3,prefix,prompt",
                    "comma-separated methods")
flags.DEFINE_string("model", "minilm", "minilm (MiniLM-L6 dimensions), bert-base, or tiny (tests)")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_integer("seq", 128, "sequence length")
flags.DEFINE_integer("steps", 10, "timed steps (median reported)")
flags.DEFINE_bool("flops_only", False, "compile and count FLOPs, do not time")
flags.DEFINE_string("dtype", "float32", "compute dtype: float32 or bfloat16")
flags.DEFINE_enum("frozen_dtype", "auto", ["auto", "float32", "bfloat16"],
                  "storage of the frozen base's matrices (auto: the compute dtype), as train's model.frozen_dtype")
flags.DEFINE_enum("attention_backward", "keep", ["keep", "recompute"],
                  "what training attention keeps for its backward on XLA:CPU, as train's model.attention_backward")
flags.DEFINE_bool("skip_unread_rows", True, "the last layer computes only the row the CLS head reads "
                  "(AdaptedModel.skip_unread_rows); --noskip_unread_rows computes every row, as AdapterHub does")
flags.DEFINE_string("out", "runs/benchmark.json", "JSON output (the PNG goes beside it)")
flags.DEFINE_bool("isolate", True, "run each method in its own subprocess (its own peak RSS)")
flags.DEFINE_float("peak_gflops", 0.0, "matmul peak to use (0: measure it)")
flags.DEFINE_bool("adapterhub", False, "also time PyTorch AdapterHub (full/head_only/houlsby/pfeiffer/parallel)")
flags.DEFINE_bool("inference", False, "also time forward latency: base vs adapters vs merged LoRA")
flags.DEFINE_integer("mixed_tasks", 0, "if > 0: compare a mixed-task batch over this many Houlsby adapters "
                     "('select') with a single-adapter batch, forward only, and exit")
flags.DEFINE_enum("malloc", "default", host_malloc.MODES, "glibc malloc settings of the timed subprocesses "
                  "(ours and AdapterHub's): 'tuned' keeps XLA:CPU's step temporaries resident "
                  "(experiments/host_malloc.py)")
flags.DEFINE_integer("cpu_devices", 1, "split the CPU into this many XLA devices and run our train step data "
                     "parallel over them, as train's mesh.cpu_devices (AdapterHub keeps its threads)")
flags.DEFINE_integer("streams", 1, "split our batch into this many parts computed side by side in one program, "
                     "as train's train.streams (trainer.make_train_step)")
flags.DEFINE_integer("accum_steps", 1, "run our batch as this many micro-batches one after another, as train's "
                     "train.accum_steps (less memory)")
flags.DEFINE_enum("cpu_scheduler", "default", list(SCHEDULERS), "XLA:CPU's instruction scheduler for our train "
                  "step, as train's train.cpu_scheduler ('memory': fewer activations held at once)")
flags.DEFINE_integer("rounds", 1, "time every method (ours and AdapterHub's) this many times, in alternating "
                     "order (A B, B A, ...), each in a fresh process: a shared VM's speed drifts within "
                     "minutes, and one method timed after another would read the drift as a ratio")
flags.DEFINE_bool("child", False, "internal: benchmark one method and print its JSON row")
FLAGS = flags.FLAGS

def bench_isolated(method: str, peak: float) -> dict:
    """Runs `bench` for one method in a fresh interpreter, so that its peak RSS is its own."""
    cmd = [sys.executable, "-m", "experiments.benchmark", "--child", f"--methods={method}",
           f"--model={FLAGS.model}", f"--batch={FLAGS.batch}", f"--seq={FLAGS.seq}", f"--steps={FLAGS.steps}",
           f"--dtype={FLAGS.dtype}", f"--frozen_dtype={FLAGS.frozen_dtype}", f"--peak_gflops={peak / 1e9}",
           f"--attention_backward={FLAGS.attention_backward}", f"--skip_unread_rows={FLAGS.skip_unread_rows}",
           f"--flops_only={FLAGS.flops_only}", f"--cpu_devices={FLAGS.cpu_devices}", f"--streams={FLAGS.streams}",
           f"--accum_steps={FLAGS.accum_steps}", f"--cpu_scheduler={FLAGS.cpu_scheduler}"]
    return _child_rows(cmd, f"benchmark of {method}")[-1]


def _step_options() -> dict:
    """How our train step is built: the flags that match train's train.streams, accum_steps, cpu_scheduler."""
    return dict(streams=FLAGS.streams, accum_steps=FLAGS.accum_steps, scheduler=FLAGS.cpu_scheduler)


def _child_rows(cmd: list[str], what: str) -> list[dict]:
    """Runs a timed child process (with --malloc's settings) and returns the JSON rows it printed."""
    return child_rows(cmd, what, host_malloc.child_env(FLAGS.malloc))


def adapterhub_rows(methods: list[str]) -> list[dict]:
    """PyTorch AdapterHub on the same model, shapes and thread count (experiments.benchmark_adapterhub),
    each method in its own process, as ours, so that its peak RSS is its own."""
    from experiments.benchmark_adapterhub import ADAPTERHUB
    # MiniLM: the real checkpoint; BERT-base: random weights on both sides
    model = {"minilm": "minilm-l6", "bert-base": "bert-base"}.get(FLAGS.model)
    if model is None:
        raise ValueError(f"--adapterhub needs --model=minilm or bert-base, not {FLAGS.model!r}")
    rows = []
    for method in (m for m in methods if m in ADAPTERHUB):
        cmd = [sys.executable, "-m", "experiments.benchmark_adapterhub", f"--methods={method}",
               f"--batch={FLAGS.batch}", f"--seq={FLAGS.seq}", f"--steps={FLAGS.steps}",
               f"--threads={os.cpu_count() or 1}", f"--model={model}"]
        rows += _child_rows(cmd, f"AdapterHub benchmark of {method}")
    return rows


def merge_rounds(rounds: list[dict], peak: float, batch: int) -> dict:
    """One method's rows from several rounds -> one row: the median over every timed step of
    every round, the largest peak RSS, the median compile time; `round_step_s` keeps each
    round's median so that the drift stays visible."""
    row = dict(rounds[0])
    if len(rounds) == 1 or "step_s" not in row:
        return row
    times = [t for r in rounds for t in r["step_times"]]
    med = statistics.median(times)
    row.update(step_s=med, step_times=times, examples_per_s=batch / med, round_step_s=[r["step_s"] for r in rounds],
               peak_rss_mib=max(r["peak_rss_mib"] for r in rounds))
    if "compile_s" in row:
        row["compile_s"] = statistics.median(r["compile_s"] for r in rounds)
    if "analytic_gflop" in row:
        row["achieved_gflops"] = row["analytic_gflop"] / med
        row["mfu"] = row["achieved_gflops"] * 1e9 / peak if peak else None
    return row


def mixed_vs_single(cfg: BertConfig, n_tasks: int) -> dict:
    """Forward throughput of a batch whose rows use n_tasks different adapters vs one adapter.

    The two are timed in alternation, so that load from other processes hits both alike.
    """
    from adapters_jax.adapters import AdapterSetup
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (FLAGS.batch, FLAGS.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    task_ids = (np.arange(FLAGS.batch) % n_tasks).astype(np.int32)
    single = BertModel(cfg, filler=spec_from_config("houlsby", name="t0", bottleneck_dim=64))
    setup = AdapterSetup(tuple(spec_from_config("houlsby", name=f"t{i}", bottleneck_dim=64)
                               for i in range(n_tasks)), composition="select")
    mixed = BertModel(cfg, filler=setup)
    p1 = jax.jit(lambda r: single.init(r, ids, mask)["params"])(jax.random.PRNGKey(0))
    pn = jax.jit(lambda r: mixed.init(r, ids, mask, adapter_ids=task_ids)["params"])(jax.random.PRNGKey(0))
    f1 = forward_jit(lambda p: single.apply({"params": p}, ids, mask)["last_hidden_state"], dtype=jnp.float32)
    fn = forward_jit(lambda p: mixed.apply({"params": p}, ids, mask, adapter_ids=task_ids)["last_hidden_state"],
                     dtype=jnp.float32)
    f1(p1).block_until_ready(), fn(pn).block_until_ready()
    t1, tn = [], []
    for _ in range(FLAGS.steps):
        for f, p, times in ((f1, p1, t1), (fn, pn, tn)):
            t = time.perf_counter()
            f(p).block_until_ready()
            times.append(time.perf_counter() - t)
    s1, sn = statistics.median(t1), statistics.median(tn)
    return {"single_s": s1, "mixed_s": sn, "single_ex_per_s": FLAGS.batch / s1,
            "mixed_ex_per_s": FLAGS.batch / sn, "throughput_ratio": s1 / sn, "tasks": n_tasks}


def format_train_table(rows: list[dict], flops_only: bool) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    head = f"{'method':<10} {'trainable':>11} {'compile s':>9} {'XLA GFLOP':>10} {'PEFT GFLOP':>10} {'vs full':>8}"
    if not flops_only:
        head += f" {'step s':>8} {'ex/s':>7} {'GFLOP/s':>8} {'MFU':>6} {'RSS MiB':>8} {'XLA MiB':>8}"
    lines = [head]
    for r in rows:
        line = (f"{r['method']:<10} {r['trainable']:>11,} {r['compile_s']:>9.1f} {r['xla_gflop']:>10.1f} "
                f"{r['analytic_gflop']:>10.1f} {(r['xla_gflop'] / full['xla_gflop'] if full else float('nan')):>8.3f}")
        if not flops_only:
            line += (f" {r['step_s']:>8.3f} {r['examples_per_s']:>7.1f} {r['achieved_gflops']:>8.1f} "
                     f"{(r['mfu'] or 0):>6.1%} {r['peak_rss_mib']:>8.0f} {(r['xla_step_mib'] or 0):>8.0f}")
        lines.append(line)
    return "\n".join(lines)


def comparisons(rows: list[dict], torch_rows: list[dict]) -> list[str]:
    """The ratios issue 7 asks for, from this run's rows."""
    ours = {r["method"]: r for r in rows if "step_s" in r}
    out = []
    for t in torch_rows:
        if t["method"] in ours:
            out.append(f"{t['method']:<10} AdapterHub {t['step_s']:.3f} s/step ({t['peak_rss_mib']:.0f} MiB RSS), "
                       f"ours {ours[t['method']]['step_s']:.3f} s: {t['step_s'] / ours[t['method']]['step_s']:.2f}x faster")
    if "full" in ours:
        for m, r in ours.items():
            if m != "full":
                out.append(f"{m:<10} step time {r['step_s'] / ours['full']['step_s']:.3f} x full fine-tuning; "
                           f"peak RSS {r['peak_rss_mib'] / ours['full']['peak_rss_mib']:.3f} x; "
                           f"XLA step memory {(r['xla_step_mib'] or 0) / (ours['full']['xla_step_mib'] or 1):.3f} x")
    torch_by = {t["method"]: t for t in torch_rows}
    for m, r in ours.items():  # each round's medians: the drift the alternating order averages out
        if "round_step_s" in r:
            t = torch_by.get(m, {}).get("round_step_s")
            out.append(f"{m:<10} round medians: ours {', '.join(f'{x:.3f}' for x in r['round_step_s'])} s"
                       + (f"; AdapterHub {', '.join(f'{x:.3f}' for x in t)} s" if t else ""))
    return out


def plot(path: str, rows: list[dict], torch_rows: list[dict], title: str) -> None:
    """Step time per method (ours, and AdapterHub's where timed) and peak RSS, as a PNG."""
    from matplotlib.figure import Figure
    timed = [r for r in rows if "step_s" in r]
    if not timed:
        return
    torch_by = {r["method"]: r for r in torch_rows}
    fig = Figure(figsize=(10, 4.6))
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(timed))
    ax1.bar(x - 0.2, [r["step_s"] for r in timed], 0.4, label="adapters_jax")
    ax1.bar(x + 0.2, [torch_by[r["method"]]["step_s"] if r["method"] in torch_by else 0 for r in timed], 0.4,
            label="AdapterHub (PyTorch)")
    ax1.set_xticks(x, [r["method"] for r in timed], rotation=45, ha="right")
    ax1.set_ylabel("train step, s (median)")
    ax1.legend()
    ax2.bar(x, [r["peak_rss_mib"] for r in timed])
    ax2.set_xticks(x, [r["method"] for r in timed], rotation=45, ha="right")
    ax2.set_ylabel("peak host RSS, MiB")
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)  # the title names every setting: wrap it
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    del argv
    if FLAGS.cpu_devices < 1:
        raise app.UsageError(f"--cpu_devices={FLAGS.cpu_devices} must be >= 1")
    if FLAGS.rounds < 1:
        raise app.UsageError(f"--rounds={FLAGS.rounds} must be >= 1")
    for name in ("streams", "accum_steps"):
        if FLAGS[name].value < 1:
            raise app.UsageError(f"--{name}={FLAGS[name].value} must be >= 1")
    if FLAGS.batch % FLAGS.accum_steps:
        raise app.UsageError(f"--batch={FLAGS.batch} is not divisible by --accum_steps={FLAGS.accum_steps}")
    if FLAGS.child or not FLAGS.isolate:  # before any JAX op starts the backend
        from adapters_jax import parallel
        parallel.set_cpu_devices(FLAGS.cpu_devices)
        host_malloc.configure_jax()  # as experiments.train does in a tuned process
    cfg = MODELS[FLAGS.model]
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    dtype = dtypes[FLAGS.dtype]
    frozen = dtypes[FLAGS.dtype if FLAGS.frozen_dtype == "auto" else FLAGS.frozen_dtype]
    methods = FLAGS.methods.split(",")
    attention.set_training_backward(FLAGS.attention_backward)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown} (known: {', '.join(METHODS)})")
    if FLAGS.malloc != "default" and not FLAGS.isolate:
        raise app.UsageError("--malloc=tuned needs --isolate: glibc reads its settings at process start")
    if FLAGS.child:
        print(json.dumps(bench(cfg, methods[0], dtype, FLAGS.peak_gflops * 1e9, FLAGS.batch, FLAGS.seq,
                               FLAGS.steps, FLAGS.flops_only, frozen_dtype=frozen,
                               skip_unread_rows=FLAGS.skip_unread_rows, devices=FLAGS.cpu_devices,
                               **_step_options())), flush=True)
        return
    if FLAGS.mixed_tasks:
        r = mixed_vs_single(cfg, FLAGS.mixed_tasks)
        print(f"{FLAGS.model} batch {FLAGS.batch} x {FLAGS.seq}, forward, median of {FLAGS.steps}: single adapter "
              f"{r['single_s'] * 1e3:.0f} ms ({r['single_ex_per_s']:.0f} ex/s); mixed over {r['tasks']} adapters "
              f"{r['mixed_s'] * 1e3:.0f} ms ({r['mixed_ex_per_s']:.0f} ex/s); throughput ratio "
              f"{r['throughput_ratio']:.2f}")
        return
    peak = FLAGS.peak_gflops * 1e9 or (0.0 if FLAGS.flops_only else matmul_peak(dtype))
    readings = [peak / 1e9] if peak and not FLAGS.peak_gflops else []
    title = (f"{FLAGS.model} batch {FLAGS.batch} x {FLAGS.seq}, {FLAGS.dtype}, {jax.device_count()} "
             f"{jax.devices()[0].platform} device(s), {os.cpu_count()} CPU threads, "
             f"matmul peak {peak / 1e9:.0f} GFLOP/s, frozen base {jnp.dtype(frozen).name}, malloc {FLAGS.malloc}, "
             f"attention backward {FLAGS.attention_backward}, "
             f"{'last layer: CLS row only' if FLAGS.skip_unread_rows else 'last layer: every row'}, {describe(dtype)}"
             + (f", our train step data parallel over {FLAGS.cpu_devices} CPU devices" if FLAGS.cpu_devices > 1 else "")
             + (f", our batch in {FLAGS.streams} streams" if FLAGS.streams > 1 else "")
             + (f", {FLAGS.accum_steps} micro-batches one after another" if FLAGS.accum_steps > 1 else "")
             + (f", XLA:CPU scheduler {FLAGS.cpu_scheduler}" if FLAGS.cpu_scheduler != "default" else "")
             + (f", {FLAGS.rounds} rounds in alternating order" if FLAGS.rounds > 1 else ""))
    print(title, flush=True)
    by_method, torch_by = {m: [] for m in methods}, {}
    for r in range(FLAGS.rounds):
        order = methods if r % 2 == 0 else methods[::-1]  # A B, B A: drift hits both alike
        for i, method in enumerate(order):
            t = time.perf_counter()
            by_method[method].append(bench_isolated(method, peak) if FLAGS.isolate else
                                     bench(cfg, method, dtype, peak, FLAGS.batch, FLAGS.seq, FLAGS.steps,
                                           FLAGS.flops_only, frozen_dtype=frozen,
                                           skip_unread_rows=FLAGS.skip_unread_rows, devices=FLAGS.cpu_devices,
                                           **_step_options()))
            row = by_method[method][-1]
            print(f"[round {r + 1}/{FLAGS.rounds}, {i + 1}/{len(order)}] {method}: {time.perf_counter() - t:.0f}s "
                  + (f"step {row['step_s']:.3f}s" if "step_s" in row else ""), flush=True)
        if FLAGS.adapterhub and not FLAGS.flops_only:
            for t_row in adapterhub_rows(order):
                torch_by.setdefault(t_row["method"], []).append(t_row)
                print(f"[round {r + 1}/{FLAGS.rounds}] AdapterHub {t_row['method']}: step {t_row['step_s']:.3f}s",
                      flush=True)
    if readings:  # a shared VM's peak moves within minutes: measure again, keep the best reading
        readings.append(matmul_peak(dtype) / 1e9)
        peak = max(readings) * 1e9
    rows = [merge_rounds(by_method[m], peak, FLAGS.batch) for m in methods]
    torch_rows = [merge_rounds(torch_by[m], 0.0, FLAGS.batch) for m in methods if m in torch_by]
    if readings:
        for r in rows:
            if r.get("achieved_gflops") is not None:
                r["mfu"] = r["achieved_gflops"] * 1e9 / peak
        title = title.replace(f"matmul peak {readings[0]:.0f} GFLOP/s",
                              f"matmul peak {peak / 1e9:.0f} GFLOP/s (best of {', '.join(f'{x:.0f}' for x in readings)})")
    print("\n" + title + "\n" + format_train_table(rows, FLAGS.flops_only))
    for line in comparisons(rows, torch_rows):
        print(line)
    result = {"model": FLAGS.model, "batch": FLAGS.batch, "seq": FLAGS.seq, "dtype": FLAGS.dtype,
              "cpu_threads": os.cpu_count(), "matmul_peak_gflops": peak / 1e9,
              "matmul_peak_readings_gflops": readings, "malloc": FLAGS.malloc,
              "frozen_dtype": jnp.dtype(frozen).name, "attention_backward": FLAGS.attention_backward,
              "skip_unread_rows": FLAGS.skip_unread_rows, "cpu_devices": FLAGS.cpu_devices, "streams": FLAGS.streams,
              "accum_steps": FLAGS.accum_steps, "cpu_scheduler": FLAGS.cpu_scheduler, "rounds": FLAGS.rounds, "dots": describe(dtype), "rows": rows, "adapterhub": torch_rows}
    if FLAGS.inference:
        from experiments import bench_inference
        inf = bench_inference.latency_table(cfg, seq=FLAGS.seq, reps=FLAGS.steps, dtype=dtype)
        print("\nforward latency (median, timed in alternation)\n" + bench_inference.format_table(inf))
        result["inference"] = inf
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)
    png = os.path.splitext(FLAGS.out)[0] + ".png"
    plot(png, rows, torch_rows, title)
    print(f"wrote {FLAGS.out}" + (f" and {png}" if os.path.exists(png) else ""))


if __name__ == "__main__":
    app.run(main)
