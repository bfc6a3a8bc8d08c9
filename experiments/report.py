"""Results table and plots from run directories (a sweep root, or any runs of experiments.train).

    python -m experiments.report runs/sweeps/bottleneck_placement [MORE_DIRS...] [--out DIR] [--metric accuracy]

Every directory under the DIRs that holds a metrics.jsonl is a run. Writes to --out (default: the
first DIR): report.md (the table, also printed), report.csv (the same groups, numbers unformatted),
runs.csv (one row per run), metric_vs_params.png and loss_curves.png.

Per run: method and placement from adapter/adapter_config.json's spec (houlsby = sequential
bottleneck after attention and FFN, pfeiffer = after the FFN with original_ln_before, parallel =
is_parallel, else the method's name; no spec: full or head_only), bottleneck size from the spec,
lr and seed from the run's trial.json (written by experiments.sweep: overrides, resolved config), else
../sweep.json's overrides, else the run's name (`..._lr1e-3_s0`), trainable %
from train.log (else counted from the adapter's and the base model's safetensors headers), the best
validation metric from metrics.jsonl, train time from train.log ('train time Ns'; else summed from
steps_per_sec). Groups are (method, placement, bottleneck, lr) over seeds: mean ± sample std (n - 1).
Runs without adapter/adapter_config.json are unfinished and left out of the table.
"""
from __future__ import annotations

import csv
import json
import os
import re
import struct
import sys

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure  # no pyplot: no global figure state, PNGs through Agg

from adapters_jax.run_logging import best_of, read_metrics

flags.DEFINE_string("out", None, "output directory (default: the first DIR)")
flags.DEFINE_string("metric", "accuracy", "validation metric to report (eval_<metric> in metrics.jsonl)")
FLAGS = flags.FLAGS

METHOD_ORDER = ("houlsby", "pfeiffer", "parallel", "bottleneck", "compacter", "compacter++", "lora", "ia3",
                "prefix", "prompt", "head_only", "full")
SHORT_SITES = {"attn_adapter": "attn", "ffn_adapter": "ffn"}
_SKIP_DIRS = {"checkpoints", "tensorboard", "adapter", "adapter_best"}


# ---------------------------------------------------------------------------------- reading runs
def find_runs(dirs: list[str]) -> list[tuple[str, str]]:
    """(name, path) of every directory holding metrics.jsonl; name is relative to its DIR."""
    found = []
    for top in dirs:
        top = os.path.abspath(top)
        for path, subdirs, files in os.walk(top):
            subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS)
            if "metrics.jsonl" in files:
                rel = os.path.relpath(path, top)
                found.append((os.path.basename(top) if rel == "." else rel, path))
    return found


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def safetensors_count(path: str) -> tuple[int, list[str]] | None:
    """(number of parameters, tensor names) from a safetensors file's header, without its data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return sum(int(np.prod(v["shape"])) for v in tensors.values()), list(tensors)


def infer_method(spec: dict | None, tensor_names: list[str] | None, trainable_pct: float | None):
    """(method, placement, size) from an adapter export's spec."""
    if not spec:
        if tensor_names is not None:
            full = any(not n.startswith("head/") for n in tensor_names)
        else:
            full = trainable_pct is not None and trainable_pct > 50
        return ("full" if full else "head_only"), "-", None
    pls = spec.get("placements", [])
    methods = sorted({p["method"] for p in pls})
    sites = [p["site"] for p in pls]
    cfgs = [p.get("config") or {} for p in pls]
    placement = "+".join(SHORT_SITES.get(s, s) for s in sites)
    size = next((c.get(k) for c in cfgs for k in ("bottleneck_dim", "r", "prefix_length") if c.get(k)), None)
    if methods == ["bottleneck"]:
        if all(c.get("is_parallel") for c in cfgs):
            return "parallel", placement, size
        if sorted(sites) == ["attn_adapter", "ffn_adapter"] and not any(c.get("original_ln_before") for c in cfgs):
            return "houlsby", placement, size
        if sites == ["ffn_adapter"] and cfgs[0].get("original_ln_before"):
            return "pfeiffer", placement, size
        return "bottleneck", placement, size
    if methods == ["compacter"]:
        return ("compacter" if len(sites) > 1 else "compacter++"), placement, size
    return "+".join(methods), placement, size


def trial_params(name: str, path: str) -> dict:
    """lr and seed of a run: from its trial.json, ../sweep.json, else its name (`..._lr1e-3_s0`)."""
    trial = _read_json(os.path.join(path, "trial.json"))
    if trial is None:
        sweep = _read_json(os.path.join(os.path.dirname(path), "sweep.json")) or {}
        trial = next((t for t in sweep.get("trials", []) if t.get("name") == os.path.basename(path)), None)
    if trial:
        ov, cfg = trial.get("overrides") or {}, trial.get("resolved_config") or {}
        return {"lr": ov.get("optim.lr", cfg.get("optim", {}).get("lr")), "seed": ov.get("seed", cfg.get("seed"))}
    base = os.path.basename(name)
    lr = re.search(r"(?:^|_)lr(\d+(?:\.\d+)?(?:e-?\d+)?)(?=_|$)", base)
    seed = re.search(r"(?:^|_)(?:s|seed)(\d+)$", base)
    return {"lr": float(lr.group(1)) if lr else None, "seed": int(seed.group(1)) if seed else None}


def read_run(name: str, path: str, metric: str = "accuracy") -> dict:
    records = read_metrics(path)
    meta = _read_json(os.path.join(path, "adapter", "adapter_config.json"))
    log = _read_text(os.path.join(path, "train.log"))
    run = {"name": name, "dir": path, "finished": meta is not None, **trial_params(name, path)}
    m = re.findall(r"parameters: base ([\d,]+) .*?trainable ([\d,]+) \(([\d.]+)% of the base", log)
    weights = safetensors_count(os.path.join(path, "adapter", "adapter.safetensors"))
    if m:
        base, trainable = (int(v.replace(",", "")) for v in m[-1][:2])
        run["trainable"] = trainable
        run["trainable_pct"] = 100.0 * trainable / base if base else float(m[-1][2])
    elif weights is not None:  # count the base from its own file (embeddings + encoder; may include a pooler)
        base = _base_count(meta or {})
        run["trainable"] = weights[0]
        run["trainable_pct"] = 100.0 * weights[0] / base if base else None
    described = meta or _read_json(os.path.join(path, "adapter_best", "adapter_config.json"))
    if described is None:  # killed before its first eval: nothing says what it trains
        run["method"], run["placement"], run["bottleneck"] = "?", "?", None
    else:
        run["method"], run["placement"], run["bottleneck"] = infer_method(
            described.get("spec"), weights[1] if weights else None, run.get("trainable_pct"))
    best = best_of(records, f"eval_{metric}")
    run["best"] = best[f"eval_{metric}"] if best else (meta or {}).get("metrics", {}).get(metric)
    run["best_step"] = best["step"] if best else None
    run["steps"] = max((r["step"] for r in records), default=0)
    t = re.findall(r"train time (\d+(?:\.\d+)?)s", log)
    if t:
        run["train_time_s"] = float(t[-1])
    else:  # the loop's time only (no start-up, compilation or eval): sum of interval / steps_per_sec
        logged = [r for r in records if r.get("steps_per_sec")]
        steps = [0] + [r["step"] for r in logged]
        run["train_time_s"] = round(sum((b - a) / r["steps_per_sec"] for a, b, r in zip(steps, steps[1:], logged)),
                                    1) if logged else None
    run["loss_curve"] = [(r["step"], r["loss"]) for r in records if "loss" in r]
    return run


def _base_count(meta: dict) -> int | None:
    base_path = meta.get("base_path")
    if not base_path or not os.path.isdir(base_path):
        return None
    counts = [safetensors_count(os.path.join(base_path, f)) for f in sorted(os.listdir(base_path))
              if f.endswith(".safetensors")]
    counts = [c[0] for c in counts if c]
    return sum(counts) or None


def collect(dirs: list[str], metric: str = "accuracy") -> list[dict]:
    return [read_run(name, path, metric) for name, path in find_runs(dirs)]


# ------------------------------------------------------------------------------------ grouping
def _order(v):
    return (v is None, v if v is not None else 0)


def group_key(run: dict) -> tuple:
    return run["method"], run["placement"], run["bottleneck"], run["lr"]


def _sort_key(key: tuple):
    method, placement, size, lr = key
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, method, placement, _order(size), _order(lr)


def group(runs: list[dict]) -> list[dict]:
    """Finished runs grouped over seeds: mean and sample std (ddof=1; None for a single run)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["finished"] and r["best"] is not None:
            groups.setdefault(group_key(r), []).append(r)
    out = []
    for key in sorted(groups, key=_sort_key):
        rs = sorted(groups[key], key=lambda r: _order(r["seed"]))
        vals = np.array([r["best"] for r in rs], dtype=float)
        pct = [r["trainable_pct"] for r in rs if r.get("trainable_pct") is not None]
        times = [r["train_time_s"] for r in rs if r.get("train_time_s") is not None]
        out.append({"method": key[0], "placement": key[1], "bottleneck": key[2], "lr": key[3], "n": len(rs),
                    "seeds": ",".join("?" if r["seed"] is None else str(r["seed"]) for r in rs),
                    "trainable_pct": float(np.mean(pct)) if pct else None,
                    "mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else None,
                    "train_time_s": float(np.mean(times)) if times else None,
                    "runs": " ".join(r["name"] for r in rs)})
    return out


# ------------------------------------------------------------------------------------- writing
def _fmt(v, spec="") -> str:
    return "–" if v is None else format(v, spec)


def markdown(groups: list[dict], runs: list[dict], metric: str) -> str:
    lines = [f"| method | placement | bottleneck | lr | seeds | trainable % | best val {metric} (mean ± std) "
             "| train time (s) |", "|---|---|---:|---:|---|---:|---|---:|"]
    for g in groups:
        score = f"{g['mean']:.4f}" + (f" ± {g['std']:.4f}" if g["std"] is not None else "")
        lines.append(f"| {g['method']} | {g['placement']} | {_fmt(g['bottleneck'])} | "
                     f"{lr_text(g['lr']) if g['lr'] is not None else '–'} | "
                     f"{g['seeds']} | {_fmt(g['trainable_pct'], '.3f')} | {score} | "
                     f"{_fmt(g['train_time_s'], '.0f')} |")
    n_fin = sum(r["finished"] for r in runs)
    lines.append(f"\n{n_fin} finished runs in {len(groups)} groups; std is the sample std over seeds (n - 1).")
    unfinished = [r["name"] for r in runs if not r["finished"]]
    if unfinished:
        lines.append(f"Unfinished (not in the table): {', '.join(unfinished)}")
    return "\n".join(lines) + "\n"


def _write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})


GROUP_FIELDS = ["method", "placement", "bottleneck", "lr", "n", "seeds", "trainable_pct", "mean", "std",
                "train_time_s", "runs"]
RUN_FIELDS = ["name", "method", "placement", "bottleneck", "lr", "seed", "trainable", "trainable_pct", "best",
              "best_step", "steps", "train_time_s", "finished", "dir"]


def write_report(dirs: list[str], out: str | None = None, metric: str = "accuracy", quiet: bool = False) -> str:
    """Writes report.md, report.csv, runs.csv and the two plots; returns (and prints) the table."""
    out = out or dirs[0]
    runs = collect(dirs, metric)
    if not runs:
        raise ValueError(f"no run directory (one holding metrics.jsonl) under {', '.join(dirs)}")
    groups = group(runs)
    os.makedirs(out, exist_ok=True)
    table = markdown(groups, runs, metric)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# Results: {', '.join(dirs)}\n\n{table}\n![metric vs parameters](metric_vs_params.png)\n\n"
                "![loss curves](loss_curves.png)\n")
    _write_csv(os.path.join(out, "report.csv"), groups, GROUP_FIELDS)
    _write_csv(os.path.join(out, "runs.csv"), runs, RUN_FIELDS)
    plot_metric_vs_params(groups, metric, os.path.join(out, "metric_vs_params.png"))
    plot_loss_curves(runs, os.path.join(out, "loss_curves.png"))
    if not quiet:
        print(table + f"written: {os.path.join(out, 'report.md')}, report.csv, runs.csv, metric_vs_params.png, "
              "loss_curves.png", flush=True)
    return table


# --------------------------------------------------------------------------------------- plots
CMAPS = {"houlsby": "Blues", "pfeiffer": "Oranges", "parallel": "Greens", "bottleneck": "Purples",
         "compacter": "Reds", "compacter++": "RdPu", "lora": "PuBu", "ia3": "YlOrBr"}
FIXED_COLORS = {"head_only": "0.45", "full": "0.0"}
_OTHER_CMAPS = ("BuGn", "YlGn", "OrRd", "Greys")
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LABEL_OFFSETS = ((7, 5, "left"), (7, -13, "left"), (-7, 5, "right"), (-7, -13, "right"))


def _color(method: str, i: int, shade: float = 0.75):
    if method in FIXED_COLORS:
        return FIXED_COLORS[method]
    from matplotlib import colormaps
    return colormaps[CMAPS.get(method, _OTHER_CMAPS[i % len(_OTHER_CMAPS)])](shade)


def lr_text(lr) -> str:
    """0.001 -> '1e-3', 0.0003 -> '3e-4' (as the sweep names them)."""
    if lr is None:
        return "?"
    mantissa, exp = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def plot_metric_vs_params(groups: list[dict], metric: str, path: str) -> None:
    """Best validation metric vs trainable % (log x): a line per (method, placement) through its sizes,
    each point labelled with its size, error bars = std over seeds. Several lrs: the best lr per point."""
    from matplotlib.ticker import FuncFormatter
    best: dict[tuple, dict] = {}  # (method, placement, size) -> the group with the best lr
    for g in groups:
        k = (g["method"], g["placement"], g["bottleneck"])
        if g["trainable_pct"] and (k not in best or g["mean"] > best[k]["mean"]):
            best[k] = g
    several_lrs = len({g["lr"] for g in groups}) > 1
    fig = Figure(figsize=(8.5, 5.5))
    ax = fig.subplots()
    lines = sorted({k[:2] for k in best}, key=lambda k: _sort_key(k + (None, None)))
    for i, line in enumerate(lines):
        pts = sorted((g for k, g in best.items() if k[:2] == line), key=lambda g: g["trainable_pct"])
        color = _color(line[0], i)
        label = line[0] if line[1] == "-" else f"{line[0]} ({line[1]})"
        ax.errorbar([g["trainable_pct"] for g in pts], [g["mean"] for g in pts], yerr=[g["std"] or 0.0 for g in pts],
                    color=color, marker=_MARKERS[i % len(_MARKERS)], ms=7, alpha=0.9, capsize=4, lw=1.8, label=label)
        for g in pts:
            text = f"r={g['bottleneck']}" if g["bottleneck"] is not None else ""
            if several_lrs:
                text += f" ({lr_text(g['lr'])})" if text else lr_text(g["lr"])
            dx, dy, ha = _LABEL_OFFSETS[i % len(_LABEL_OFFSETS)]  # lines label on different sides
            ax.annotate(text, (g["trainable_pct"], g["mean"]), textcoords="offset points", xytext=(dx, dy), ha=ha,
                        fontsize=8, color=color, bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.6))
    ax.set_xscale("log")
    ax.margins(x=0.1, y=0.08)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    lo, hi = ax.get_xlim()
    shown = "123456789" if hi / lo < 10 else "25" if hi / lo < 100 else ""  # which minor ticks get a label
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}%" if f"{v:.1e}"[0] in shown else ""))
    ax.set_xlabel("trainable parameters (% of the base model, log scale)")
    ax.set_ylabel(f"best validation {metric}")
    ax.set_title(f"Validation {metric} vs trainable parameters (mean over seeds, error bars: std)"
                 + ("\neach point at its best lr (in brackets)" if several_lrs else ""), fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.1)
    if lines:
        ax.legend(title="method (placement)", fontsize=9, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _smooth(values: list[float]) -> list[float]:
    """An exponential moving average (weight 0.9) for curves with many points, as TensorBoard's."""
    if len(values) < 50:
        return values
    out, acc = [], values[0]
    for v in values:
        acc = 0.9 * acc + 0.1 * v
        out.append(acc)
    return out


def plot_loss_curves(runs: list[dict], path: str) -> None:
    """Training loss vs step, one line per run, one panel per method (shared y): shade = size,
    line style = lr; the seeds of a group share a colour and one legend entry."""
    runs = sorted((r for r in runs if r["loss_curve"]), key=lambda r: _sort_key(group_key(r)) + (_order(r["seed"]),))
    panel = {id(r): "unfinished" if r["method"] == "?" else r["method"] if r["bottleneck"] is not None
             else "baselines" for r in runs}
    methods = list(dict.fromkeys(panel[id(r)] for r in runs)) or ["-"]
    lrs = sorted({r["lr"] for r in runs if r["lr"] is not None})
    cols = min(len(methods), 3)
    nrows = -(-len(methods) // cols)
    fig = Figure(figsize=(5 * cols + 1, 4.2 * nrows))
    axes = fig.subplots(nrows, cols, sharey=True, squeeze=False)
    smoothed = False
    for i, method in enumerate(methods):
        ax = axes[i // cols][i % cols]
        mine = [r for r in runs if panel[id(r)] == method]
        sizes = sorted({r["bottleneck"] for r in mine}, key=_order)
        labelled = set()
        for r in mine:
            shade = 0.4 + 0.55 * sizes.index(r["bottleneck"]) / (len(sizes) - 1) if len(sizes) > 1 else 0.75
            key = group_key(r)
            label = None
            if key not in labelled:
                labelled.add(key)
                n_seeds = sum(group_key(q) == key for q in mine)
                what = f"r={r['bottleneck']}" if r["bottleneck"] is not None else \
                    r["name"] if r["method"] == "?" else r["method"]
                label = what + (f" lr={lr_text(r['lr'])}" if len(lrs) > 1 or r["bottleneck"] is None else "") \
                    + (f" ({n_seeds} seeds)" if n_seeds > 1 else "")
            steps, losses = zip(*r["loss_curve"])
            smoothed |= len(losses) >= 50
            ax.plot(steps, _smooth(list(losses)), color=_color(r["method"], i, shade), lw=1.3, alpha=0.85,
                    label=label, marker="o" if len(steps) < 3 else None, ms=4,
                    ls=_LINESTYLES[lrs.index(r["lr"]) % len(_LINESTYLES)] if r["lr"] in lrs else "-")
        placements = sorted({r["placement"] for r in mine} - {"-", "?"})
        ax.set_title(method + (f" ({', '.join(placements)})" if placements else ""), fontsize=11)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper right", ncol=2 if len(labelled) > 9 else 1)
    for j in range(len(methods), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    for row in axes:
        row[0].set_ylabel("training loss" + (" (EMA 0.9)" if smoothed else ""))
    fig.suptitle("Training loss, one line per run", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    dirs = argv[1:]
    if not dirs:
        sys.exit("error: give one or more run or sweep directories")
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:
        sys.exit(f"error: not a directory: {', '.join(missing)}")
    try:
        write_report(dirs, FLAGS.out, FLAGS.metric)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
