"""Crash safety: a corrupted latest checkpoint falls back to the previous one; a NaN loss stops
the run naming the step, and no NaN reaches a checkpoint; a failed checkpoint write (file-size
limit, full disk) stops the run in one line and the previous checkpoint stays restorable.
Kills at random points: tests/test_kill_trials.py and experiments/kill_trials.py."""
import glob
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *extra):
    return subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/houlsby_r64.py:smoke",
                           f"--workdir={workdir}", "--config.train.ckpt_every=2", "--config.train.log_every=2",
                           *extra], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=600)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_step(tmp_path):
    out = _train(tmp_path, "--config.train.num_steps=4", "--config.train.max_to_keep=3")
    assert out.returncode == 0, out.stderr[-2000:]
    files = [f for f in glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**" / "*"), recursive=True)
             if os.path.isfile(f) and os.path.getsize(f) > 0]
    assert files
    for f in files:  # truncate every data file of the newest step
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 3, 1))
    out = _train(tmp_path, "--config.train.num_steps=6", "--config.train.max_to_keep=3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "checkpoint step 4" in out.stdout and "unreadable" in out.stdout
    assert "resuming from step 2" in out.stdout


def test_nan_loss_stops_the_run_naming_the_step_and_saves_no_nan(tmp_path):
    # lr warms up from 0 to 1e6 over the run, so the first steps are finite and checkpointed
    out = _train(tmp_path, "--config.train.num_steps=40", "--config.optim.lr=1e6",
                 "--config.optim.clip_norm=0", "--config.optim.warmup_ratio=1.0")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "NaN" in last
    assert not os.path.exists(tmp_path / "adapter")  # the export happens only at the end
    steps = sorted(int(os.path.basename(d)) for d in glob.glob(str(tmp_path / "checkpoints" / "[0-9]*")))
    failed_at = int(last.split("step ")[1].split(":")[0])
    assert steps and all(s < failed_at for s in steps)
    for s in steps:
        restored = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / str(s) / "state"))
        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(restored)]
        assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")


def _assert_save_failed_keeping_step_4(out, workdir, reason):
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    # orbax/tensorstore background threads may log their own errors; no traceback comes from our code
    assert "adapters_jax/" not in out.stderr and "experiments/" not in out.stderr, out.stderr[-3000:]
    last = [line for line in out.stderr.strip().splitlines() if line.startswith("error:")][-1]  # orbax threads may report the failed write after us
    assert last.startswith("error: checkpoint save failed at step ") and reason in last, last
    assert "the previous checkpoint (step 4) stays valid" in last, last
    restored = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / "4" / "state"))
    assert int(restored["step"]) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored["trainable"]))


def test_write_error_stops_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure: RLIMIT_FSIZE makes the kernel refuse the checkpoint's larger files (EFBIG)."""
    assert _train(tmp_path, "--config.train.num_steps=4").returncode == 0
    # `ulimit -f 48` (48 KiB) in a shell that then execs the run: no Python between fork and exec
    cmd = (f"ulimit -f 48 && exec {sys.executable} -m experiments.train --config=configs/houlsby_r64.py:smoke "
           f"--workdir={tmp_path} --config.train.ckpt_every=2 --config.train.num_steps=8")
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=600)
    _assert_save_failed_keeping_step_4(out, tmp_path, "File too large")


def test_disk_full_stops_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk: the checkpoint directory is a small tmpfs, filled after step 4 (needs mount rights)."""
    import pytest
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ckpts)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        assert _train(tmp_path, "--config.train.num_steps=4").returncode == 0
        with open(ckpts / "filler", "wb") as f:  # leave a few KiB: less than one checkpoint needs
            free = os.statvfs(ckpts).f_bavail * os.statvfs(ckpts).f_frsize
            f.write(b"\0" * max(free - 8192, 0))
        out = _train(tmp_path, "--config.train.num_steps=8")
        _assert_save_failed_keeping_step_4(out, tmp_path, "No space left on device")
    finally:
        subprocess.run(["umount", str(ckpts)], check=True)
