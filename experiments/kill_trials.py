"""Kill campaign: `kill -9` training runs at random points, restart them, compare with a clean run.

    python -m experiments.kill_trials                       # 10 trials, 40 steps, a save every 2 steps
    python -m experiments.kill_trials --trials 3 --steps 12 --out /tmp/kt

First an uninterrupted reference run. Then each trial starts `python -m experiments.train` in
a fresh workdir and kills it with SIGKILL 1-3 times (seeded RNG) before letting it finish.
A kill is either at a random time since the start, or inside an asynchronous checkpoint
save: the moment an orbax `<step>.orbax-checkpoint-tmp` directory appears. A trial passes when
- every restart resumed from the newest committed step on disk (or started fresh when there
  was none) and never warned about an unreadable checkpoint, i.e. no half-written step was read;
- no run exited other than by our SIGKILL or with status 0;
- the final adapter export equals the reference's within `tol`.
Writes `kill_trials.md` and `kill_trials.json` to --out. Kills only its own subprocesses.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _cmd(config: str, workdir: str, steps: int, ckpt_every: int) -> list:
    return [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={workdir}",
            f"--config.train.num_steps={steps}", f"--config.train.ckpt_every={ckpt_every}",
            f"--config.train.log_every={ckpt_every}", "--config.train.max_to_keep=2",
            "--config.train.async_checkpoint=true"]  # the harder case: a save still writing as steps run


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _ckpt_entries(workdir: str) -> tuple[list, list]:
    """(committed steps, tmp directory names) under workdir/checkpoints."""
    try:
        names = os.listdir(os.path.join(workdir, "checkpoints"))
    except FileNotFoundError:
        return [], []
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if n.endswith(TMP_SUFFIX)]


def _tmp_times(workdir: str) -> dict:
    """{tmp directory name: mtime} under workdir/checkpoints."""
    out = {}
    for t in _ckpt_entries(workdir)[1]:
        try:
            out[t] = os.path.getmtime(os.path.join(workdir, "checkpoints", t))
        except FileNotFoundError:  # committed (renamed) meanwhile
            pass
    return out


def _fresh_tmps(workdir: str, stale: dict) -> list:
    """Tmp directories written by the current run: new, or rewritten since the `stale` snapshot."""
    return [t for t, m in _tmp_times(workdir).items() if t not in stale or m > stale[t]]


def _weights(workdir: str) -> dict:
    from safetensors.numpy import load_file
    return load_file(os.path.join(workdir, "adapter", "adapter.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over all tensors (inf when the names or shapes differ)."""
    import numpy as np
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max(float(np.max(np.abs(a[k] - b[k]))) if a[k].size else 0.0 for k in a)


def _attempt(cmd, workdir, log_path, kill, deadline_s) -> dict:
    """Runs one process; `kill` is None (run to the end), ('time', seconds) or ('save', min_step).

    Returns what happened: rc, whether we killed it, when, and whether the kill hit a save.
    """
    before, _ = _ckpt_entries(workdir)
    stale = _tmp_times(workdir)  # left by an earlier killed run
    t0 = time.time()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    rec = {"committed_before": before[-1] if before else None, "killed": False}
    try:
        while proc.poll() is None:
            elapsed = time.time() - t0
            if elapsed > deadline_s:
                raise TimeoutError(f"{cmd} ran past {deadline_s}s")
            if kill is not None:
                if kill[0] == "time":
                    fire = elapsed >= kill[1]
                else:  # a save of a step >= min_step is under way
                    fire = any(int(t.split(".")[0]) >= kill[1] for t in _fresh_tmps(workdir, stale))
                if fire:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rec.update(killed=True, kill_at_s=round(elapsed, 3))
                    break
            time.sleep(0.001 if kill is not None and kill[0] == "save" else 0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    rec["rc"] = proc.returncode
    committed, _ = _ckpt_entries(workdir)
    # A save was cut when its tmp directory (written during this attempt) is left and its step never committed.
    cut = [t for t in _fresh_tmps(workdir, stale) if int(t.split(".")[0]) not in committed]
    rec["hit_save"] = bool(rec["killed"] and cut)
    rec["cut_saves"] = sorted(int(t.split(".")[0]) for t in cut) if rec["killed"] else []
    text = open(log_path, errors="replace").read()
    m = re.search(r"resuming from step (\d+)", text)
    rec["resumed_from"] = int(m.group(1)) if m else (0 if re.search(r": starting;", text) else None)
    rec["unreadable_warning"] = "unreadable" in text
    if not rec["killed"] and rec["rc"] != 0:
        rec["error_tail"] = text.strip().splitlines()[-1][:300] if text.strip() else ""
    return rec


def run_trial(index: int, rng: random.Random, config: str, steps: int, ckpt_every: int, workdir: str,
              ref: dict, ref_seconds: float, tol: float, max_kills: int = 3, kinds=None, log=print) -> dict:
    """One trial: 1..max_kills kills (each 'time' or 'save', or as `kinds` says), then a run to the end."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir + "_logs", exist_ok=True)
    n = len(kinds) if kinds else rng.randint(1, max_kills)
    kinds = list(kinds) if kinds else [rng.choice(("time", "save")) for _ in range(n)]
    cmd = _cmd(config, workdir, steps, ckpt_every)
    attempts = []
    for i, kind in enumerate(kinds + [None]):
        kill = None
        if kind == "time":
            kill = ("time", round(rng.uniform(1.0, ref_seconds), 2))
        elif kind == "save":
            kill = ("save", rng.randrange(ckpt_every, steps + 1, ckpt_every))
        rec = _attempt(cmd, workdir, os.path.join(workdir + "_logs", f"attempt{i}.log"), kill,
                       deadline_s=max(600.0, 20 * ref_seconds))
        rec["plan"] = None if kill is None else list(kill)
        attempts.append(rec)
        log(f"  trial {index} run {i}: plan {rec['plan']}, "
            + (f"killed at {rec['kill_at_s']}s{' inside a save of step ' + str(rec['cut_saves']) if rec['hit_save'] else ''}"
               if rec["killed"] else f"exit {rec['rc']}")
            + f"; resumed from {rec['resumed_from']} (newest committed before: {rec['committed_before']})")
        if not rec["killed"]:
            break  # it finished (or crashed) before the planned kill
    final = attempts[-1]
    problems = []
    for i, a in enumerate(attempts):
        want = a["committed_before"] or 0
        if a["resumed_from"] is None:
            if not a["killed"]:
                problems.append(f"run {i} never said where it started")
            # else: killed while starting up, before it read any checkpoint
        elif a["resumed_from"] != want:
            problems.append(f"run {i} resumed from {a['resumed_from']}, newest committed step was {want}")
        if a["unreadable_warning"]:
            problems.append(f"run {i} found an unreadable checkpoint")
        if not a["killed"] and a["rc"] != 0:
            problems.append(f"run {i} exited {a['rc']}: {a.get('error_tail', '')}")
    diff = float("inf")
    if final["rc"] == 0 and not final["killed"]:
        diff = max_diff(ref, _weights(workdir))
        if not diff <= tol:
            problems.append(f"final params differ from the reference by {diff:.3g} > {tol}")
    kills = [a for a in attempts if a["killed"]]
    return {"trial": index, "kills": len(kills), "kill_plans": [a["plan"] for a in kills],
            "kill_times_s": [a["kill_at_s"] for a in kills],
            "resumed_from": [a["resumed_from"] for a in attempts[1:]],  # None: killed before it said
            "kill_hit_save": [a["hit_save"] for a in kills], "cut_save_steps": [a["cut_saves"] for a in kills],
            "max_param_diff": diff, "pass": not problems, "problems": problems}


def run_campaign(trials: int = 10, steps: int = 40, ckpt_every: int = 2, seed: int = 0,
                 config: str = "configs/houlsby_r64.py:smoke", workdir: str = "runs/kill_trials",
                 out: str | None = None, tol: float = 1e-6, kinds=None, log=print) -> dict:
    """The reference run, then `trials` kill trials; returns (and with `out`, writes) the summary."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    ref_dir = os.path.join(workdir, "reference")
    os.makedirs(ref_dir + "_logs")
    t = time.time()
    rec = _attempt(_cmd(config, ref_dir, steps, ckpt_every), ref_dir, os.path.join(ref_dir + "_logs", "run.log"),
                   None, deadline_s=600)
    ref_seconds = time.time() - t
    if rec["rc"] != 0:
        raise RuntimeError(f"the reference run failed: {rec.get('error_tail')}")
    ref = _weights(ref_dir)
    log(f"reference: {steps} steps, a checkpoint every {ckpt_every}, {ref_seconds:.1f}s")
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        trial_dir = os.path.join(workdir, f"trial{i}")
        os.makedirs(trial_dir + "_logs", exist_ok=True)
        r = run_trial(i, rng, config, steps, ckpt_every, trial_dir, ref, ref_seconds, tol,
                      kinds=kinds[i] if kinds else None, log=log)
        results.append(r)
        log(f"trial {i} ({i + 1}/{trials}): {'PASS' if r['pass'] else 'FAIL'}: {r['kills']} kills "
            f"({sum(r['kill_hit_save'])} inside a save), resumed from {r['resumed_from']}, "
            f"max |diff| {r['max_param_diff']:.2g}" + ("" if r["pass"] else f"; {r['problems']}"))
    summary = {"config": config, "steps": steps, "ckpt_every": ckpt_every, "seed": seed, "tol": tol,
               "reference_seconds": round(ref_seconds, 1), "trials": results,
               "passed": sum(r["pass"] for r in results), "kills": sum(r["kills"] for r in results),
               "kills_inside_save": sum(sum(r["kill_hit_save"]) for r in results)}
    if out:
        write_report(summary, out)
    return summary


def write_report(summary: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kill_trials.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = ["# Kill campaign: `kill -9` during training, then resume",
             "",
             f"`python -m experiments.kill_trials --trials {len(summary['trials'])} --steps {summary['steps']} "
             f"--ckpt_every {summary['ckpt_every']} --seed {summary['seed']}` on `{summary['config']}`.",
             f"Reference (uninterrupted) run: {summary['reference_seconds']} s. "
             f"**{summary['passed']}/{len(summary['trials'])} trials passed; {summary['kills']} kills, "
             f"{summary['kills_inside_save']} of them inside an asynchronous checkpoint save** "
             "(its `.orbax-checkpoint-tmp` directory left behind, never committed).",
             "",
             "| trial | kills | kill plans (kind, s or min step) | kill times (s) | inside a save (cut step) "
             "| resumed from | max abs param diff | pass |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["trials"]:
        plans = ", ".join(f"{p[0]} {p[1]}" for p in r["kill_plans"])
        saves = ", ".join(f"yes ({c[0]})" if h else "no" for h, c in zip(r["kill_hit_save"], r["cut_save_steps"]))
        lines.append(f"| {r['trial']} | {r['kills']} | {plans} | {', '.join(map(str, r['kill_times_s']))} | {saves} "
                     f"| {', '.join(map(str, r['resumed_from']))} | {r['max_param_diff']:.2g} "
                     f"| {'yes' if r['pass'] else 'NO: ' + '; '.join(r['problems'])} |")
    lines += ["", "A restart resumes from the newest committed step (0 = started fresh, no step was committed; "
              "None = killed again while starting up, before it read a checkpoint); "
              "each restart's step equals the newest committed step on disk before it, and no restart warned "
              "about an unreadable checkpoint. The final adapter export is compared with the reference run's."]
    with open(os.path.join(out, "kill_trials.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ckpt_every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="configs/houlsby_r64.py:smoke")
    p.add_argument("--workdir", default="runs/kill_trials")
    p.add_argument("--out", default="docs/results/kill_trials")
    p.add_argument("--tol", type=float, default=1e-6)
    a = p.parse_args(argv)
    s = run_campaign(a.trials, a.steps, a.ckpt_every, a.seed, a.config, a.workdir, a.out, a.tol)
    print(f"{s['passed']}/{a.trials} trials passed; {s['kills']} kills, {s['kills_inside_save']} inside a save; "
          f"report in {a.out}")
    return 0 if s["passed"] == a.trials else 1


if __name__ == "__main__":
    sys.exit(main())
