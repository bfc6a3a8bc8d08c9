"""Distillation: the loss against a float64 formula, and a short run on a smoke teacher."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from adapters_jax.distillation import distill_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_distill_loss_is_temperature_scaled_kl():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    labels = np.array([0, 1, 2, 1, 0])
    T = 2.0

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    pt, ls = np.exp(log_softmax(t / T)), log_softmax(s / T)
    kl = (pt * (np.log(pt) - ls)).sum(-1).mean() * T ** 2
    ce = -log_softmax(s)[np.arange(5), labels].mean()
    loss, got_kl = distill_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), labels, T, 0.5)
    assert np.isclose(float(got_kl), kl, rtol=1e-5)
    assert np.isclose(float(loss), kl + 0.5 * ce, rtol=1e-5)
    zero, _ = distill_loss(jnp.asarray(t), jnp.asarray(t), labels, T, 0.0)
    assert abs(float(zero)) < 1e-6


def test_distill_runs_from_a_smoke_teacher_and_reports(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=900)
    out = run("experiments.train", "--config=configs/houlsby_r64.py:smoke", f"--workdir={tmp_path / 'teacher'}")
    assert out.returncode == 0, out.stderr[-2000:]
    out = run("experiments.distill", f"--teacher={tmp_path / 'teacher' / 'adapter'}", f"--workdir={tmp_path / 'd'}",
              "--steps=4", "--batch=8", "--max_length=32", "--log_every=2")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.load(open(tmp_path / "d" / "results.json"))
    assert 0 <= result["student_accuracy"] <= 1 and 0 <= result["teacher_accuracy"] <= 1
    assert set(result["latency_ms_batch32"]) == {"base", "student", "teacher"}
    assert "student - teacher" in out.stdout
    assert os.path.getsize(tmp_path / "d" / "student.safetensors") > 0
