"""Crash safety: a corrupted latest checkpoint falls back to the previous one; a NaN loss stops
the run naming the step, and no NaN reaches a checkpoint."""
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


def test_failed_save_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import importlib
    import pytest
    from adapters_jax import checkpoint
    from adapters_jax.train_loop import train_and_evaluate
    config = importlib.import_module("configs.houlsby_r64").get_config("smoke")
    config.train.num_steps, config.train.ckpt_every = 6, 2
    real_save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step >= 4:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointSaveError) as err:
        train_and_evaluate(config, str(tmp_path))
    msg = str(err.value)
    assert "step 4" in msg and "No space left" in msg and "previous checkpoint stays valid" in msg
    assert "\n" not in msg
    monkeypatch.undo()
    restored = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / "2" / "state"))
    assert int(restored["step"]) == 2
