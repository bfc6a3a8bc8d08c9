"""Bad adapter files are refused in one line, and nothing from a file is ever executed:
through checkpoint.read_adapter, serving.AdapterServer, config.init_from and experiments.predict."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adapters_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, C = checkpoint.ADAPTER_WEIGHTS, checkpoint.ADAPTER_CONFIG


class Boom:
    """Unpickling this runs `touch MARKER`."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy(export, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(export, d)
    return d


def _edit_meta(d, fn):
    meta = json.loads((d / C).read_text())
    fn(meta)
    (d / C).write_text(json.dumps(meta))


def _edit_weights(d, fn):
    flat = load_file(str(d / W))
    fn(flat)
    save_file(flat, str(d / W))


def _bad_exports(export, tmp_path):
    """name -> (directory, text the one-line error must hold)."""
    out = {}
    d = _copy(export, tmp_path, "truncated")
    data = (d / W).read_bytes()
    (d / W).write_bytes(data[: len(data) // 2])
    out["truncated safetensors"] = (d, "not a readable safetensors file")
    d = _copy(export, tmp_path, "bad_json")
    (d / C).write_text('{"format_version": 1, "spec": ')
    out["invalid JSON"] = (d, "not valid JSON")
    d = _copy(export, tmp_path, "version_as_string")
    _edit_meta(d, lambda m: m.update(format_version="1"))
    out["format_version of the wrong type"] = (d, "format_version must be 1")
    d = _copy(export, tmp_path, "spec_wrong_type")
    _edit_meta(d, lambda m: m.update(spec={"name": "x", "placements": "all"}))
    out["spec of the wrong type"] = (d, "invalid adapter spec")
    d = _copy(export, tmp_path, "head_wrong_type")
    _edit_meta(d, lambda m: m.update(head={"num_labels": "two"}))
    out["head of the wrong type"] = (d, "'head' must be")
    d = _copy(export, tmp_path, "no_weights")
    os.remove(d / W)
    out["weights missing"] = (d, f"{W}: missing")
    d = _copy(export, tmp_path, "wrong_shape")
    _edit_weights(d, lambda f: f.update({k: np.zeros((3, 3), np.float32) for k in list(f) if k.endswith("down/kernel")}))
    out["shapes that do not fit this base"] = (d, "has shape (3, 3), this model needs")
    d = _copy(export, tmp_path, "foreign_tensor")
    _edit_weights(d, lambda f: f.update({"backbone/encoder/layer_9/ffn_adapter/rotten_tomatoes/down/kernel":
                                         np.zeros((32, 8), np.float32)}))
    out["a tensor with no place in the model"] = (d, "has no place in this model")
    d = _copy(export, tmp_path, "integer_tensor")  # what a header flipped from F32 to U32 loads as
    _edit_weights(d, lambda f: f.update({k: f[k].view(np.uint32) for k in list(f) if k.endswith("down/kernel")}))
    out["integer bits where the model has floats"] = (d, "has dtype uint32, this model needs a floating point dtype")
    return out


def test_read_adapter_refuses_a_pickle_in_every_guise_and_never_runs_it(export, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Boom(marker))
    for name in (W, "adapter.bin", "pytorch_model.bin", "adapter_model.pt", "adapter.pkl"):
        d = _copy(export, tmp_path, name.replace(".", "_"))
        os.remove(d / W)
        (d / name).write_bytes(payload)
        with pytest.raises(ValueError) as err:
            checkpoint.read_adapter(str(d))
        msg = str(err.value)
        assert "\n" not in msg
        assert ("not a readable safetensors file" if name == W else f"{W}: missing") in msg, msg
    assert not marker.exists()


def test_server_refuses_bad_exports_in_one_line(export, tmp_path, server):
    server.load(export)  # the untouched export loads
    for what, (d, needle) in _bad_exports(export, tmp_path).items():
        with pytest.raises(ValueError) as err:
            server.load(str(d))
        assert needle in str(err.value) and "\n" not in str(err.value), (what, str(err.value))
    d = _copy(export, tmp_path, "missing_keys")
    _edit_weights(d, lambda f: [f.pop(k) for k in [k for k in f if "attn_adapter" in k and "layer_1" in k]])
    with pytest.raises(ValueError, match=r"tensors missing from the export, e.g. backbone/encoder/layer_1/attn_adapter"):
        server.load(str(d))
    d = _copy(export, tmp_path, "other_base")
    _edit_meta(d, lambda m: m.update(base_sha256="0" * 64))
    with pytest.raises(ValueError, match="trained on a different base model"):
        server.load(str(d))


def test_init_from_refuses_an_export_that_does_not_fit(export, tmp_path):
    import importlib
    from adapters_jax.train_loop import train_and_evaluate
    bad = _bad_exports(export, tmp_path)["shapes that do not fit this base"][0]
    config = importlib.import_module("configs.houlsby_r64").get_config("smoke")
    config.init_from, config.train.num_steps = str(bad), 2
    with pytest.raises(ValueError, match=r"^init_from: .*wrong_shape: tensor .*has shape \(3, 3\)"):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_predict_cli_refuses_a_pickled_adapter_without_running_it(export, tmp_path):
    marker = tmp_path / "pwned"
    d = _copy(export, tmp_path, "pickled")
    (d / W).write_bytes(pickle.dumps(Boom(marker)))
    out = subprocess.run([sys.executable, "-m", "experiments.predict", "--model=tiny-random-bert", f"--adapter={d}",
                          "--text=fine"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: {d / W}: not a readable safetensors file (SafetensorError)"
    assert not marker.exists()
