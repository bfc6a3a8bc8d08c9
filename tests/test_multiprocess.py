"""The training entry point as 2 jax.distributed processes on localhost (CPU, gloo): each feeds
its half of the global batch, and the losses match a 1-process run of the same global batch."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# packed rows (the default) pinned: 'auto' rounds the rows up to the device count, which differs here
COMMON = ["--config=configs/houlsby_r64.py:smoke", "--config.train.num_steps=5", "--config.train.log_every=1",
          "--config.train.ckpt_every=5", "--config.data.pack_rows=6"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Dropout stays on: JAX's random bits do not depend on how an array is sharded, so both
    # runs draw the same masks.
    one = subprocess.run([sys.executable, "-m", "experiments.train", *COMMON, f"--workdir={tmp_path / 'one'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *COMMON, f"--workdir={tmp_path / 'two'}",
                               "--multihost", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 devices" in outs[0][0]  # one CPU device per process, two in the global mesh
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    assert os.path.exists(tmp_path / "two" / "adapter" / "adapter.safetensors")
