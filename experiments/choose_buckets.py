"""Measure the train step's compile and step time per padded length here, then pick the length
buckets that make the config's run fastest (adapters_jax/data/bucket_choice.py).

    python -m experiments.choose_buckets --config configs/houlsby_r64.py --config.model.dtype=bfloat16
    python -m experiments.choose_buckets --config configs/houlsby_r64.py --epochs 1 --out runs/buckets.json

Each bucket a run uses costs one compile, each batch runs at its bucket's length: for a short
run the compiles can outweigh the padding that fine buckets save. This reads the longest row
of every batch the run will see (the real pipeline, all epochs), times the step at a few
lengths (the others interpolated), and prints the predicted run time of the config's buckets,
the optimum, one bucket and every multiple of 8; it writes JSON, a markdown table and a PNG.
Copy the optimum into the config's `data.buckets`.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/houlsby_r64.py", "experiment config file", lock_config=False)
flags.DEFINE_integer("epochs", 0, "epochs of the run to plan for (0: the config's train.num_epochs/num_steps)")
flags.DEFINE_string("lengths", "16,32,48,64,96,128", "padded lengths to time (capped at data.max_length, "
                    "which is always timed); others are interpolated")
flags.DEFINE_integer("steps", 10, "timed steps per length (median), after 2 warm-up steps")
flags.DEFINE_integer("multiple", 8, "candidate buckets are multiples of this")
flags.DEFINE_string("out", "runs/choose_buckets.json", "JSON output (.md and .png go beside it)")
FLAGS = flags.FLAGS


def batch_lengths(data, steps: int) -> tuple:
    """([steps] the longest row of each batch the run will train on, in order; the first batch)."""
    out, first = [], None
    for _ in range(steps):
        batch = next(data.train)
        if "attention_mask" not in batch:
            raise ValueError("choose_buckets needs padded batches with an attention_mask (classification data)")
        out.append(int(np.asarray(batch["attention_mask"]).sum(1).max()))
        first = batch if first is None else first
    return np.asarray(out), first


def at_length(batch: dict, length: int) -> dict:
    """The batch cropped or right-padded with zeros to `length` tokens (timing only)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 2 and k != "example_index":
            v = v[:, :length] if v.shape[1] >= length else np.pad(v, ((0, 0), (0, length - v.shape[1])))
        out[k] = v
    return out


def length_timer(config, backbone, data, first: dict):
    """measure(length) -> (compile_s, step_s): trace + compile seconds, and the median step, of
    the config's train step on `first` cropped or padded to that length."""
    from adapters_jax import train_loop
    _, _, model, _, _, tx, _, state = train_loop.setup_state(config, backbone, data)
    step_fn, _, put_state, put_batch, _ = train_loop.make_steps(config, model, tx, state)
    holder = {"state": put_state(state)}

    def measure(length: int) -> tuple:
        batch = put_batch(at_length(first, length))
        t0 = time.perf_counter()
        compiled = step_fn.lower(holder["state"], batch).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(FLAGS.steps + 2):
            t0 = time.perf_counter()
            holder["state"], m = compiled(holder["state"], batch)
            jax.block_until_ready(m)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        print(f"  length {length:4d}: compile {compile_s:5.2f} s, step {statistics.median(times) * 1e3:7.1f} ms",
              flush=True)
        return compile_s, statistics.median(times)
    return measure


def main(argv):
    del argv
    from adapters_jax import train_loop
    from adapters_jax.data import make_datasets
    from adapters_jax.data.batching import bucket_lengths
    from adapters_jax.data.bucket_choice import choose_buckets, run_cost
    from adapters_jax.hub import load_backbone
    config = FLAGS.config
    train_loop.check_config(config)
    max_length, tr = config.data.max_length, config.train
    backbone = load_backbone(config.model.name, dtype=train_loop.DTYPES[config.model.dtype])
    data = make_datasets(config.data.name, backbone.tokenizer, tr.batch_size, max_length, seed=config.seed,
                         eval_batch_size=tr.eval_batch_size, buckets=(max_length,),
                         **train_loop.source_kwargs(config))
    with config.unlocked():
        config.data.num_labels = data.num_labels
    steps = FLAGS.epochs * data.steps_per_epoch if FLAGS.epochs > 0 else train_loop.total_steps(config, data)
    lengths, first = batch_lengths(data, steps)
    print(f"{steps} steps; longest row per batch: median {np.median(lengths):.0f}, max {lengths.max()}")
    measure = length_timer(config, backbone, data, first)
    measured = {n: measure(n) for n in sorted({min(int(x), max_length) for x in FLAGS.lengths.split(",") if x}
                                             | {max_length})}
    while True:  # until every bucket of the optimum was timed, not interpolated
        xs = sorted(measured)
        step_s = lambda n, xs=xs: float(np.interp(n, xs, [measured[x][1] for x in xs]))  # noqa: E731
        compile_s = statistics.median(m[0] for m in measured.values())
        best = choose_buckets(lengths, step_s, compile_s, max_length, FLAGS.multiple)
        missing = [n for n in best if n not in measured]
        if not missing:
            break
        print(f"timing the optimum's interpolated buckets {missing}", flush=True)
        measured.update({n: measure(n) for n in missing})
    sets = {"config": bucket_lengths(config.data.buckets, max_length), "optimum": best, "one bucket": (max_length,),
            f"every {FLAGS.multiple}": tuple(range(FLAGS.multiple, max_length, FLAGS.multiple)) + (max_length,)}
    rows = []
    for name, buckets in sets.items():
        b = np.asarray(buckets)
        used = b[np.searchsorted(b, lengths)]
        n_used = len(set(used.tolist()))
        total = run_cost(buckets, lengths, step_s, compile_s)
        rows.append({"name": name, "buckets": [int(x) for x in buckets], "compiles": n_used,
                     "compile_s": n_used * compile_s, "steps_s": total - n_used * compile_s, "total_s": total,
                     "mean_padded_length": float(used.mean())})
    lines = [f"{steps} steps, {config.model.name} {config.model.dtype}, {config.data.name}, batch {tr.batch_size}", "",
             "| set | buckets | compiles | compile s | steps s | predicted s | mean padded length |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {','.join(map(str, r['buckets']))} | {r['compiles']} | {r['compile_s']:.1f} | "
                     f"{r['steps_s']:.1f} | {r['total_s']:.1f} | {r['mean_padded_length']:.1f} |")
    lines += ["", "| length | compile s | step ms |", "|---|---|---|"]
    lines += [f"| {x} | {measured[x][0]:.2f} | {measured[x][1] * 1e3:.1f} |" for x in sorted(measured)]
    lines += ["", f"set `data.buckets = {tuple(best)}` for this run (predicted {rows[1]['total_s']:.1f} s vs "
              f"{rows[0]['total_s']:.1f} s with the config's)"]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"steps": steps, "model": config.model.name, "dtype": config.model.dtype,
                   "data": config.data.name, "compile_s": compile_s,
                   "measured": {str(k): {"compile_s": v[0], "step_s": v[1]} for k, v in measured.items()},
                   "rows": rows}, f, indent=1)
    base = os.path.splitext(FLAGS.out)[0]
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    _plot(rows, measured, base + ".png", steps)


def _plot(rows: list, measured: dict, path: str, steps: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    xs = sorted(measured)
    a.plot(xs, [measured[x][1] * 1e3 for x in xs], "o-")
    a.set_xlabel("padded length")
    a.set_ylabel("train step ms")
    a.set_title("measured step time", fontsize=9)
    names = [f"{r['name']}\n({r['compiles']} compiles)" for r in rows]
    b.bar(names, [r["compile_s"] for r in rows], label="compiles", color="tab:gray")
    b.bar(names, [r["steps_s"] for r in rows], bottom=[r["compile_s"] for r in rows], label="steps", color="tab:blue")
    b.set_ylabel("predicted seconds (lower is better)")
    b.set_title(f"{steps} steps", fontsize=9)
    b.tick_params(axis="x", labelsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app.run(main)
