"""Runs a sweep grid, one `experiments.train` subprocess per trial, N at a time; then the report.

    python -m experiments.sweep --sweep configs/sweeps/bottleneck_placement.py[:preset] \
        [--root runs/sweeps/NAME] [--parallel N] [--only REGEX] [--limit N] [--dry_run] [--noreport]

A sweep file defines `get_sweep(arg=None)` -> [{'name', 'config', 'overrides'[, 'params']}]. Trial
NAME runs in ROOT/NAME (default root: runs/sweeps/<file>[_<preset>]) with its output in
ROOT/NAME/train.log (appended to, one header line per attempt) and its description (name, config,
overrides, command, and the config as train.py will see it) in ROOT/NAME/trial.json.
Rerunning the same command resumes the sweep: a trial whose ROOT/NAME/adapter/adapter_config.json
exists is skipped; any other one runs again, and experiments.train resumes it from its checkpoint.
ROOT/sweep.json lists every trial with its status (pending | running | done | failed | interrupted)
and what this invocation did with it (action: ran | skipped | not selected). Exit status: 0, or 1 if a trial failed, 130 if interrupted.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("sweep", None, "sweep file, optionally with a preset: FILE.py[:preset]")
flags.DEFINE_string("root", None, "directory of the trial workdirs (default runs/sweeps/<file>[_<preset>])")
flags.DEFINE_integer("parallel", 1, "trials run at the same time")
flags.DEFINE_string("only", None, "run only the trials whose name matches this regex (re.search)")
flags.DEFINE_integer("limit", None, "run at most this many of the selected trials (grid order)")
flags.DEFINE_bool("dry_run", False, "print the commands, run nothing")
flags.DEFINE_bool("report", True, "write the report (experiments.report) on the root at the end")
flags.DEFINE_float("status_every", 30.0, "seconds between progress lines while nothing changes")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE_MARKER = os.path.join("adapter", "adapter_config.json")
_PROGRESS_RE = re.compile(r"\] (\d+)/(\d+) ")  # the training progress bar: '[###...] 40/150 ...'


def load_sweep(spec: str) -> tuple[list[dict], str, str]:
    """(trials, file, preset) from 'FILE.py[:preset]'; raises ValueError on a malformed sweep."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"sweep file {path} not found")
    mod_spec = importlib.util.spec_from_file_location("_sweep_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg=None)")
    trials = list(module.get_sweep(arg or None))
    seen = set()
    for t in trials:
        missing = {"name", "config"} - set(t)
        if missing:
            raise ValueError(f"{path}: trial {t!r} lacks {sorted(missing)}")
        if t["name"] in seen or not re.fullmatch(r"[\w.+=-]+", t["name"]):
            raise ValueError(f"{path}: trial name {t['name']!r} is repeated or not a plain directory name")
        seen.add(t["name"])
        if not os.path.isfile(os.path.join(REPO, t["config"].split(":")[0])):
            raise ValueError(f"{path}: trial {t['name']}: config file {t['config']} not found")
    return trials, path, arg


def default_root(path: str, arg: str) -> str:
    name = os.path.splitext(os.path.basename(path))[0]
    if arg:
        name += "_" + re.sub(r"[^\w.-]+", "_", arg)
    return os.path.join("runs", "sweeps", name)


def override_arg(key: str, value) -> str:
    """--config.KEY=VALUE as config_flags parses it (tuples as Python literals)."""
    text = repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)
    return f"--config.{key}={text}"


def trial_command(trial: dict, workdir: str) -> list[str]:
    return ([sys.executable, "-m", "experiments.train", f"--config={trial['config']}", f"--workdir={workdir}"]
            + [override_arg(k, v) for k, v in trial.get("overrides", {}).items()])


def resolved_config(trial: dict) -> dict | None:
    """The trial's config after its preset and overrides, as train.py will see it (None if that fails:
    train.py then reports the error itself). Saved in trial.json for the report (lr, seed, metric)."""
    path, _, arg = trial["config"].partition(":")
    try:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        spec = importlib.util.spec_from_file_location("_config", os.path.join(REPO, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(arg or None)
        config.lock()  # as train.py's lock_config=True: a misspelt override fails
        for key, value in trial.get("overrides", {}).items():
            *parents, leaf = key.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
        return json.loads(json.dumps(config.to_dict(), default=str))
    except Exception:  # noqa: BLE001 (any error here is train.py's to report)
        return None


def is_done(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, DONE_MARKER))


def _tail(log_path: str, size: int = 16384) -> str:
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def last_line(log_path: str) -> str:
    """The last non-empty line of a log (progress bars rewrite their line with '\\r')."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", _tail(log_path)) if ln.strip()]
    return lines[-1] if lines else "(empty or no log)"


def step_fraction(log_path: str) -> float:
    """How far a running trial is, from its last progress bar (0 before the first log step)."""
    m = list(_PROGRESS_RE.finditer(_tail(log_path)))
    return min(int(m[-1].group(1)) / max(int(m[-1].group(2)), 1), 1.0) if m else 0.0


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class Sweep:
    """The state of one invocation: which trials run, which are running, what came of them."""

    def __init__(self, trials, root, sweep_spec, selected):
        self.root, self.spec = root, sweep_spec
        self.records = []
        for t in trials:
            wd = os.path.join(root, t["name"])
            done = is_done(wd)
            chosen = t["name"] in selected
            self.records.append({**t, "workdir": wd, "status": "done" if done else "pending",
                                 "action": ("skipped" if done else None) if chosen else "not selected",
                                 "returncode": None, "seconds": None, "last_line": None})
        self.todo = [r for r in self.records if r["action"] is None]
        self.running: dict[str, tuple[subprocess.Popen, float, object]] = {}
        self.t0 = time.time()

    def save(self) -> None:
        keys = ("name", "config", "overrides", "params", "workdir", "status", "action", "returncode",
                "seconds", "last_line")
        command = ["python", "-m", "experiments.sweep", *sys.argv[1:]]
        _write_json(os.path.join(self.root, "sweep.json"), {
            "sweep": self.spec, "root": self.root, "command": " ".join(map(shlex.quote, command)),
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
            "trials": [{k: r.get(k) for k in keys} for r in self.records]})

    def start(self, rec: dict) -> None:
        os.makedirs(rec["workdir"], exist_ok=True)
        cmd = trial_command(rec, rec["workdir"])
        _write_json(os.path.join(rec["workdir"], "trial.json"),
                    {k: rec.get(k) for k in ("name", "config", "overrides", "params")}
                    | {"command": cmd, "resolved_config": resolved_config(rec)})
        log = open(os.path.join(rec["workdir"], "train.log"), "a")
        log.write(f"# experiments.sweep {datetime.datetime.now().isoformat(timespec='seconds')}: "
                  f"{' '.join(map(shlex.quote, cmd))}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.running[rec["name"]] = (proc, time.time(), log)
        rec.update(status="running", action="ran")
        print(f"start   {rec['name']}  (log: {os.path.join(rec['workdir'], 'train.log')})", flush=True)

    def reap(self) -> bool:
        """Collects finished trials; True when one finished."""
        changed = False
        for name, (proc, t_start, log) in list(self.running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            log.close()
            del self.running[name]
            rec = next(r for r in self.records if r["name"] == name)
            ok = rc == 0 and is_done(rec["workdir"])
            rec.update(status="done" if ok else "failed", returncode=rc, seconds=round(time.time() - t_start, 1),
                       last_line=None if ok else last_line(os.path.join(rec["workdir"], "train.log")))
            print(f"{'done   ' if ok else 'FAILED '} {name} in {fmt_time(rec['seconds'])}"
                  + ("" if ok else f" (exit {rc}): {rec['last_line']}"), flush=True)
            changed = True
        return changed

    def progress(self) -> str:
        selected = [r for r in self.records if r["action"] != "not selected"]
        done = sum(r["status"] == "done" for r in selected)
        failed = sum(r["status"] == "failed" for r in selected)
        skipped = sum(r["action"] == "skipped" for r in selected)
        elapsed = time.time() - self.t0
        fracs = {n: step_fraction(os.path.join(self.root, n, "train.log")) for n in self.running}
        finished_now = sum(r["status"] in ("done", "failed") for r in self.todo)
        work_done = finished_now + sum(fracs.values())
        eta = elapsed * (len(self.todo) - work_done) / work_done if work_done > 0 else None
        running = ", ".join(f"{n} {100 * f:.0f}%" for n, f in fracs.items())
        return (f"[sweep] {done}/{len(selected)} done ({skipped} skipped), {len(self.running)} running, "
                f"{failed} failed | elapsed {fmt_time(elapsed)} | ETA {fmt_time(eta)}"
                + (f" | {running}" if running else ""))

    def run(self, parallel: int, status_every: float) -> None:
        queue = list(self.todo)
        self.save()
        last_status = time.time()
        while queue or self.running:
            while queue and len(self.running) < parallel:
                self.start(queue.pop(0))
                self.save()
            time.sleep(0.5)
            if self.reap():
                self.save()
                print(self.progress(), flush=True)
                last_status = time.time()
            elif time.time() - last_status >= status_every:
                print(self.progress(), flush=True)
                last_status = time.time()

    def stop(self) -> None:
        """Ends the trials this sweep started (each by its own pid) and marks them interrupted."""
        for name, (proc, _, log) in list(self.running.items()):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            rec = next(r for r in self.records if r["name"] == name)
            rec.update(status="interrupted", returncode=proc.returncode)
        self.running.clear()
        self.save()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    try:
        trials, path, arg = load_sweep(FLAGS.sweep)
        only = re.compile(FLAGS.only) if FLAGS.only else None
    except (ValueError, re.error) as e:
        sys.exit(f"error: {e}")
    if FLAGS.parallel < 1:
        sys.exit("error: --parallel must be >= 1")
    root = os.path.abspath(FLAGS.root or default_root(path, arg))
    chosen = [t["name"] for t in trials if only is None or only.search(t["name"])]
    if FLAGS.limit is not None:
        chosen = chosen[:max(FLAGS.limit, 0)]
    if not chosen:
        sys.exit(f"error: no trial of {FLAGS.sweep} is selected (--only {FLAGS.only!r}, --limit {FLAGS.limit})")
    if FLAGS.dry_run:
        for t in trials:
            if t["name"] in chosen:
                wd = os.path.join(root, t["name"])
                print(("# done: " if is_done(wd) else "") + " ".join(map(shlex.quote, trial_command(t, wd))))
        return
    os.makedirs(root, exist_ok=True)
    sweep = Sweep(trials, root, FLAGS.sweep, set(chosen))
    print(f"sweep {FLAGS.sweep}: {len(trials)} trials, {len(chosen)} selected, {len(sweep.todo)} to run, "
          f"{FLAGS.parallel} at a time; root {root}", flush=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        sweep.run(FLAGS.parallel, FLAGS.status_every)
    except KeyboardInterrupt:
        sweep.stop()
        print(f"\n{sweep.progress()}\ninterrupted: run the same command again to resume", flush=True)
        sys.exit(130)
    failed = [r for r in sweep.records if r["status"] == "failed"]
    if FLAGS.report and any(r["status"] == "done" for r in sweep.records):
        from experiments import report
        try:
            report.write_report([root], root)
        except Exception as e:  # the trials' results stay on disk; the sweep's own outcome decides the exit
            print(f"report failed: {type(e).__name__}: {e}", flush=True)
    if failed:
        print(f"\n{len(failed)} trial(s) failed:")
        for r in failed:
            print(f"  {r['name']} (exit {r['returncode']}): {r['last_line']}\n"
                  f"    log: {os.path.join(r['workdir'], 'train.log')}")
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flag_as_required("sweep")
    app.run(main)
