"""launch.sh: --dry-run prints the exact commands; bad arguments print the usage and fail."""
import os
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, env=None):
    return subprocess.run(["bash", "launch.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=60)


def test_tpu_dry_run_prints_a_correct_gcloud_command():
    out = _launch("tpu", "--dry-run", "--name", "pod-1", "--zone", "us-central2-b", "--project", "my-proj",
                  "configs/houlsby_r64.py", "--config.train.batch_size=256",
                  env={"REPO_URL": "https://example.org/adapters_jax.git"})
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert "--zone=us-central2-b" in argv and "--worker=all" in argv and "--project=my-proj" in argv
    remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    steps = [s.strip() for s in remote.replace("&&", ";").split(";")]
    assert any("git clone https://example.org/adapters_jax.git adapters_jax_repo" in s for s in steps)
    assert any("pip install" in s and "-r requirements.txt" in s and "jax[tpu]==0.10.2" in s for s in steps)
    assert any("--no-deps -r requirements-assets.txt" in s for s in steps)
    train = shlex.split(next(s for s in steps if "experiments.train" in s))
    assert train == ["python", "-m", "experiments.train", "--config=configs/houlsby_r64.py", "--multihost",
                     "--config.train.batch_size=256"]


def test_local_and_sweep_dry_runs():
    out = _launch("local", "--dry-run", "configs/houlsby_r64.py", "--workdir", "runs/x")
    assert shlex.split(out.stdout) == ["python", "-m", "experiments.train", "--config=configs/houlsby_r64.py",
                                       "--workdir", "runs/x"]
    out = _launch("gpu", "--dry-run", "configs/lora_r8.py", env={"JAX_NUM_PROCESSES": "2"})
    assert "--multihost" in shlex.split(out.stdout)


def test_bad_arguments_print_usage_and_fail():
    for args in (("bogus",), ("tpu", "--name", "x", "configs/houlsby_r64.py"), ("local",),
                 ("local", "configs/missing.py"), ()):
        out = _launch(*args)
        assert out.returncode != 0, args
        assert "error" in out.stderr.lower() or "launch.sh local CONFIG" in out.stderr, args
