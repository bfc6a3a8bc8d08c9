"""Run logs: a progress line (steps/s, loss, ETA), DIR/metrics.jsonl and TensorBoard events.

Only process 0 writes. metrics.jsonl is appended line by line and flushed, so a killed
run keeps every line it logged; a resumed run drops lines past its restored step.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import jax


class RunLog:
    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True):
        self.primary = jax.process_index() == 0
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.primary:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Keeps the lines of steps <= `step` (a resumed run rewrites what came after)."""
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
        with open(self.path, "w") as f:
            f.writelines(keep)

    def write(self, step: int, values: dict) -> None:
        if not self.primary:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def progress(self, step: int, loss: float, extra: str = "") -> None:
        if not self.primary:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        bar_len = 24
        filled = int(bar_len * step / max(self.total, 1))
        line = (f"\r[{'#' * filled}{'.' * (bar_len - filled)}] {step}/{self.total} "
                f"{rate:.2f} steps/s loss {loss:.4f} ETA {_fmt(eta)} {extra}")
        sys.stdout.write(line)
        sys.stdout.flush()

    def message(self, text: str) -> None:
        if self.primary:
            print(("\n" if text else "") + text, flush=True)

    def close(self) -> None:
        if self.primary:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _plain(v):
    try:
        return float(v) if hasattr(v, "dtype") or isinstance(v, float) else v
    except TypeError:
        return v


def _fmt(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def best_of(records: list[dict], key: str, lower_is_better: bool = False) -> Optional[dict]:
    evals = [r for r in records if key in r]
    if not evals:
        return None
    return (min if lower_is_better else max)(evals, key=lambda r: r[key])
