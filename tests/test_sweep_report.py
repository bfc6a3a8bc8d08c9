"""experiments.sweep and experiments.report: the smoke grid end to end (resume included), failures,
and the report's numbers against hand-made run directories."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = "configs/sweeps/bottleneck_placement.py"


def _sweep(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _read(path):
    with open(path) as f:
        return f.read()


# ------------------------------------------------------------------------------ the sweep file
def test_sweep_presets_grid():
    from configs.sweeps.bottleneck_placement import get_sweep
    sizes = {None: 9, "small": 9, "full": 81, "smoke": 6}
    for arg, n in sizes.items():
        trials = get_sweep(arg)
        assert len(trials) == n and len({t["name"] for t in trials}) == n
    full = get_sweep("full")
    assert {t["overrides"]["optim.lr"] for t in full} == {3e-4, 1e-3, 3e-3}
    assert {t["overrides"]["seed"] for t in full} == {0, 1, 2}
    assert {t["config"] for t in full} == {"configs/houlsby_r64.py", "configs/pfeiffer_r64.py", "configs/parallel.py"}
    assert "houlsby_r64_lr1e-3_s0" in {t["name"] for t in get_sweep()}
    small = get_sweep("small")
    assert {t["overrides"]["adapter.bottleneck_dim"] for t in small} == {8, 64, 256}
    assert all(t["overrides"]["train.num_steps"] == 150 for t in small)
    assert all(t["config"].endswith(":smoke") for t in get_sweep("smoke"))
    with pytest.raises(ValueError, match="unknown"):
        get_sweep("nope")


def test_resolved_config_applies_preset_and_overrides():
    from experiments.sweep import resolved_config
    c = resolved_config({"config": "configs/parallel.py:smoke", "overrides": {"optim.lr": 3e-3, "seed": 2}})
    assert (c["optim"]["lr"], c["seed"], c["model"]["name"], c["adapter"]["method"]) == (
        3e-3, 2, "tiny-random-bert", "parallel")
    assert resolved_config({"config": "configs/parallel.py", "overrides": {"optim.typo": 1}}) is None


def test_dry_run_prints_the_train_commands(tmp_path):
    out = _sweep(f"--sweep={SWEEP}:smoke", f"--root={tmp_path}", "--dry_run", "--only=^pfeiffer", "--limit=1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    cmd = lines[0].split()
    assert cmd[1:] == ["-m", "experiments.train", "--config=configs/pfeiffer_r64.py:smoke",
                       f"--workdir={tmp_path}/pfeiffer_r4_lr1e-3_s0", "--config.adapter.bottleneck_dim=4",
                       "--config.optim.lr=0.001", "--config.seed=0", "--config.train.num_steps=4"]
    assert not os.listdir(tmp_path)  # nothing run, nothing written


def test_bad_sweeps_fail_with_one_line(tmp_path):
    bad = tmp_path / "dup.py"
    bad.write_text("def get_sweep(arg=None):\n    return [{'name': 'a', 'config': 'configs/head_only.py'}] * 2\n")
    out = _sweep(f"--sweep={bad}", f"--root={tmp_path / 'r'}")
    assert out.returncode != 0 and "error:" in out.stderr and "repeated" in out.stderr
    out = _sweep(f"--sweep={SWEEP}:smoke", f"--root={tmp_path / 'r'}", "--only=nomatch")
    assert out.returncode != 0 and "no trial" in out.stderr


# --------------------------------------------------------------------------- sweep end to end
def test_smoke_sweep_end_to_end_then_resume(tmp_path):
    root = tmp_path / "sweep"
    args = [f"--sweep={SWEEP}:smoke", f"--root={root}", "--only=_r4_", "--parallel=3"]
    out = _sweep(*args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3/3 done (0 skipped)" in out.stdout and "ETA" in out.stdout
    names = ["houlsby_r4_lr1e-3_s0", "pfeiffer_r4_lr1e-3_s0", "parallel_r4_lr1e-3_s0"]
    status = {t["name"]: t for t in json.loads(_read(root / "sweep.json"))["trials"]}
    assert len(status) == 6  # the whole grid is listed, the r8 trials as not selected
    assert all(status[n]["status"] == "done" and status[n]["action"] == "ran" for n in names)
    assert status["houlsby_r8_lr1e-3_s0"]["action"] == "not selected"
    for f in ("report.md", "report.csv", "runs.csv", "metric_vs_params.png", "loss_curves.png"):
        assert (root / f).stat().st_size > 0, f
    trial = json.loads(_read(root / "pfeiffer_r4_lr1e-3_s0" / "trial.json"))
    assert trial["resolved_config"]["adapter"]["bottleneck_dim"] == 4
    assert trial["resolved_config"]["model"]["name"] == "tiny-random-bert"
    rows = _csv(root / "report.csv")
    assert [(r["method"], r["placement"], r["bottleneck"], r["n"]) for r in rows] == [
        ("houlsby", "attn+ffn", "4", "1"), ("pfeiffer", "ffn", "4", "1"), ("parallel", "ffn", "4", "1")]
    pct = {r["method"]: float(r["trainable_pct"]) for r in rows}
    assert pct["houlsby"] > pct["pfeiffer"] > 0  # two adapters per layer vs one
    assert all(0 <= float(r["mean"]) <= 1 for r in rows)
    assert "| houlsby | attn+ffn | 4 |" in out.stdout  # the table is printed

    # resume: pfeiffer lost its export (as if killed before the end); the others are finished
    logs = {n: _read(root / n / "train.log") for n in names}
    shutil.rmtree(root / "pfeiffer_r4_lr1e-3_s0" / "adapter")
    out = _sweep(*args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 selected, 1 to run" in out.stdout
    started = [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("start ")]
    assert started == ["pfeiffer_r4_lr1e-3_s0"]
    status = {t["name"]: t for t in json.loads(_read(root / "sweep.json"))["trials"]}
    assert status["pfeiffer_r4_lr1e-3_s0"]["action"] == "ran"
    assert status["houlsby_r4_lr1e-3_s0"]["action"] == status["parallel_r4_lr1e-3_s0"]["action"] == "skipped"
    assert _read(root / "houlsby_r4_lr1e-3_s0" / "train.log") == logs["houlsby_r4_lr1e-3_s0"]
    assert _read(root / "parallel_r4_lr1e-3_s0" / "train.log") == logs["parallel_r4_lr1e-3_s0"]
    rerun = _read(root / "pfeiffer_r4_lr1e-3_s0" / "train.log")
    assert rerun.startswith(logs["pfeiffer_r4_lr1e-3_s0"]) and rerun.count("# experiments.sweep") == 2
    assert "resuming from step 4" in rerun  # train.py picked up its checkpoint
    assert (root / "pfeiffer_r4_lr1e-3_s0" / "adapter" / "adapter_config.json").exists()
    assert len(_csv(root / "report.csv")) == 3


def test_failed_trials_are_reported_and_fail_the_sweep(tmp_path):
    sweep = tmp_path / "bad.py"
    sweep.write_text("def get_sweep(arg=None):\n"
                     "    return [{'name': 'nodata', 'config': 'configs/head_only.py:smoke',\n"
                     "             'overrides': {'data.name': 'nope'}}]\n")
    out = _sweep(f"--sweep={sweep}", f"--root={tmp_path / 'r'}")
    assert out.returncode == 1
    assert "1 trial(s) failed" in out.stdout
    assert "nodata (exit 1): error: data.name='nope': unknown dataset 'nope'" in out.stdout
    trial = json.loads(_read(tmp_path / "r" / "sweep.json"))["trials"][0]
    assert trial["status"] == "failed" and trial["last_line"].startswith("error: data.name='nope': unknown dataset")


# ----------------------------------------------------------------------- report on hand-made runs
BASE = 1_000_000
SPECS = {
    "houlsby": [("attn_adapter", {"original_ln_before": False, "is_parallel": False}),
                ("ffn_adapter", {"original_ln_before": False, "is_parallel": False})],
    "pfeiffer": [("ffn_adapter", {"original_ln_before": True, "is_parallel": False})],
    "parallel": [("ffn_adapter", {"original_ln_before": False, "is_parallel": True})],
}


def _make_run(d, method, dim, evals, train_time=None, trainable=None, finished=True, base_path=None):
    """A run directory as train_and_evaluate leaves it: metrics.jsonl, train.log, adapter/."""
    from safetensors.numpy import save_file
    os.makedirs(d / "adapter", exist_ok=True)
    with open(d / "metrics.jsonl", "w") as f:
        for i, acc in enumerate(evals):
            step = 100 * (i + 1)
            f.write(json.dumps({"step": step, "loss": 0.7 - 0.1 * i - 0.01 * dim ** 0.5, "lr": 1e-3,
                                "grad_norm": 1.0, "steps_per_sec": 10.0}) + "\n")
            f.write(json.dumps({"step": step, "eval_accuracy": acc, "eval_macro_f1": acc - 0.1}) + "\n")
    if train_time is not None:
        (d / "train.log").write_text(
            f"parameters: base {BASE:,} | adapters {trainable - 66:,} | head 66 | trainable {trainable:,} "
            f"({100 * trainable / BASE:.3f}% of the base, 0.01 MiB)\n"
            f"adapter export: x; best eval_accuracy={max(evals):.4f}; train time {train_time}s\n")
    if not finished:
        os.rmdir(d / "adapter")
        return
    spec = None if method in ("head_only", "full") else {"name": "t", "adapter_drop": 0, "placements": [
        {"site": site, "method": "bottleneck", "layers": None, "config": {"bottleneck_dim": dim, **cfg}}
        for site, cfg in SPECS[method]]}
    meta = {"format_version": 1, "spec": spec, "base_model": "tiny", "base_path": str(base_path or ""),
            "step": 100 * len(evals), "metrics": {"accuracy": evals[-1]}}
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(meta))
    tensors = {"head/kernel": np.zeros((32, 2), np.float32), "head/bias": np.zeros(2, np.float32)}
    if method == "full":
        tensors["encoder/w"] = np.zeros((BASE,), np.float32)
    save_file(tensors, str(d / "adapter" / "adapter.safetensors"))


def test_report_on_hand_made_runs(tmp_path):
    from safetensors.numpy import save_file
    root = tmp_path / "runs"
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({"emb": np.zeros((1000, 100), np.float32), "w": np.zeros(50, np.float32)},
              str(base_dir / "model.safetensors"))  # 100,050 parameters
    houlsby = {0: [0.70, 0.80, 0.75], 1: [0.82, 0.81], 2: [0.60, 0.85]}  # best: 0.80, 0.82, 0.85
    for seed, evals in houlsby.items():
        _make_run(root / f"houlsby_r16_lr1e-3_s{seed}", "houlsby", 16, evals, train_time=100 + seed, trainable=2066)
    for seed, evals in {0: [0.78], 1: [0.79, 0.77]}.items():
        _make_run(root / f"pfeiffer_r16_lr1e-3_s{seed}", "pfeiffer", 16, evals, train_time=50, trainable=1066)
    _make_run(root / "parallel_r64_lr3e-3_s0", "parallel", 64, [0.9], train_time=70, trainable=4066)
    _make_run(root / "baseline", "head_only", 0, [0.6, 0.65], base_path=base_dir)  # no train.log
    _make_run(root / "killed_r16_lr1e-3_s0", "houlsby", 16, [0.99], train_time=1, trainable=2066, finished=False)
    (root / "sweep.json").write_text(json.dumps({"trials": [
        {"name": "baseline", "overrides": {"optim.lr": 5e-3, "seed": 7}}]}))

    table = report.write_report([str(root)], str(tmp_path / "out"), quiet=True)
    out = tmp_path / "out"
    for f in ("report.md", "report.csv", "runs.csv", "metric_vs_params.png", "loss_curves.png"):
        assert (out / f).stat().st_size > (5000 if f.endswith(".png") else 100), f
    rows = {(r["method"], r["bottleneck"], r["lr"]): r for r in _csv(out / "report.csv")}
    assert list(rows) == [("houlsby", "16", "0.001"), ("pfeiffer", "16", "0.001"), ("parallel", "64", "0.003"),
                          ("head_only", "", "0.005")]
    h = rows[("houlsby", "16", "0.001")]
    best = np.array([0.80, 0.82, 0.85])
    assert h["n"] == "3" and h["seeds"] == "0,1,2" and h["placement"] == "attn+ffn"
    assert float(h["mean"]) == pytest.approx(best.mean()) and float(h["std"]) == pytest.approx(best.std(ddof=1))
    assert float(h["trainable_pct"]) == pytest.approx(100 * 2066 / BASE)
    assert float(h["train_time_s"]) == pytest.approx(101.0)
    p = rows[("pfeiffer", "16", "0.001")]
    assert float(p["mean"]) == pytest.approx(0.785) and float(p["std"]) == pytest.approx(np.std([0.78, 0.79], ddof=1))
    par = rows[("parallel", "64", "0.003")]
    assert par["placement"] == "ffn" and par["n"] == "1" and par["std"] == "" and float(par["mean"]) == 0.9
    b = rows[("head_only", "", "0.005")]  # lr and seed from sweep.json; trainable % from the safetensors headers
    assert b["seeds"] == "7" and float(b["mean"]) == pytest.approx(0.65)
    assert float(b["trainable_pct"]) == pytest.approx(100 * 66 / 100_050)
    assert float(b["train_time_s"]) == pytest.approx(20.0)  # no train.log: 2 x 100 steps at 10 steps/s

    assert f"{best.mean():.4f} ± {best.std(ddof=1):.4f}" in table
    assert "Unfinished (not in the table): killed_r16_lr1e-3_s0" in table
    runs = {r["name"]: r for r in _csv(out / "runs.csv")}
    assert len(runs) == 8 and runs["killed_r16_lr1e-3_s0"]["finished"] == "False"
    assert runs["houlsby_r16_lr1e-3_s2"]["best_step"] == "200"


def test_method_inference_from_specs():
    assert report.infer_method(None, ["head/kernel", "head/bias"], None)[0] == "head_only"
    assert report.infer_method(None, ["head/kernel", "encoder/layer_0/query/kernel"], None)[0] == "full"
    assert report.infer_method(None, None, 100.2)[0] == "full"
    lora = {"placements": [{"site": s, "method": "lora", "config": {"r": 8}} for s in ("query", "value")]}
    assert report.infer_method(lora, None, None) == ("lora", "query+value", 8)
    seq = {"placements": [{"site": "attn_adapter", "method": "bottleneck",
                           "config": {"bottleneck_dim": 4, "original_ln_before": True}}]}
    assert report.infer_method(seq, None, None) == ("bottleneck", "attn", 4)


def test_report_cli_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.report", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "error: no run directory" in out.stderr
