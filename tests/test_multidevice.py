"""jit over an 8-device CPU mesh and pmap give the single-device losses and params, also where
the devices hold different weights (padding rows, LM tokens) and with AdapterFusion's
regularizer; the CPU is split by `parallel.set_cpu_devices` (train's mesh.cpu_devices), which
refuses a late call."""
import json
import os
import subprocess
import sys


def test_jit_and_pmap_on_8_cpu_devices_match_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-m", "tests.multidevice_check"], env=env, capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    out = json.loads(out.stdout.strip().splitlines()[-1])
    assert out["late_split_error"].startswith("mesh.cpu_devices=2: "), out["late_split_error"]
    results = out["results"]
    assert set(results) == {"jit_data8", "jit_data4_fsdp2", "jit_data8_onednn", "jit_data8_streams2", "pmap8",
                            "pmap8_weighted", "pmap8_lm", "pmap8_fusion"}
    for name, r in results.items():
        assert r["loss_moved"] > 1e-4, (name, r)  # the runs really trained
        assert r["loss"] <= 1e-5 and r["params"] <= 1e-5, (name, r)
    # the training loop under pmap saves, exports and resumes (replicated state, one copy saved)
    assert out["pmap_run"]["resumed"] and out["pmap_run"]["export"], out["pmap_run"]
    assert out["pmap_run"]["checkpoints"][-1] == "3", out["pmap_run"]
