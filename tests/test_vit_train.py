"""Two-stage ViT run on digits: pretrain from scratch (all weights, classes 0-4), export the base as a
HF directory, then adapt it with frozen weights to the held-out classes 5-9 through experiments.train."""
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from adapters_jax import checkpoint
from adapters_jax.hub import load_backbone
from adapters_jax.train_loop import train_and_evaluate
from configs import vit_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pre"))
    config = vit_fashion_mnist.get_config("pretrain,smoke")
    config.optim.lr = 1e-2  # the exported weights must visibly differ from their init
    result = train_and_evaluate(config, workdir)
    return workdir, result


def test_pretrain_trains_everything_and_exports_the_trained_base(pretrained):
    workdir, result = pretrained
    assert result["trainable_pct"] > 100  # base + head
    trained = load_file(os.path.join(workdir, "adapter", "adapter.safetensors"))  # train_all: every param
    backbone = load_backbone(os.path.join(workdir, "backbone"))
    assert backbone.config.image_size == 8 and backbone.config.num_layers == 2
    init = load_backbone(os.path.join(workdir, "scratch_backbone")).params
    flat, flat_init = traverse_util.flatten_dict(backbone.params), traverse_util.flatten_dict(init)
    for path, value in flat.items():
        np.testing.assert_array_equal(value, trained["/".join(("backbone",) + path)], err_msg=str(path))
    moved = np.abs(flat[("encoder", "layer_0", "ffn_in", "kernel")] - flat_init[("encoder", "layer_0", "ffn_in", "kernel")])
    assert moved.max() > 1e-3


def test_adapt_on_held_out_classes_freezes_the_pretrained_base(pretrained, tmp_path):
    pre, _ = pretrained
    base = os.path.join(pre, "backbone")
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/vit_fashion_mnist.py:adapt,smoke",
                          f"--workdir={tmp_path}", f"--config.model.name={base}"],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "final validation accuracy=" in out.stdout
    config, weights = checkpoint.read_adapter(str(tmp_path / "adapter"))
    paths = list(traverse_util.flatten_dict(weights))
    assert paths and all(p[0] == "head" or any(s in p for s in ("attn_adapter", "ffn_adapter")) for p in paths)
    assert weights["head"]["out"]["kernel"].shape == (16, 5)  # classes 5-9, renumbered 0..4
    assert config["base_sha256"] == checkpoint.base_fingerprint(base)
    assert config["label_names"] == ["5", "6", "7", "8", "9"]


def test_scratch_without_its_sizes_fails_in_one_line(tmp_path):
    """A bad label subset or image size is checked in tests/test_data_images.py and tests/test_vit.py."""
    config = vit_fashion_mnist.get_config("smoke")
    with config.unlocked():
        config.model.vit = None
    with pytest.raises(ValueError, match=r"^model.name='vit-scratch' needs model.vit=dict\(image_size=") as err:
        train_and_evaluate(config, str(tmp_path))
    assert "\n" not in str(err.value)
