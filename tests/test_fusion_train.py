"""AdapterFusion's two stages through experiments' own entry points: adapters trained apart,
then fused with the adapters frozen and only the fusion layers and the head trained."""
import importlib

import numpy as np
import pytest
from flax import traverse_util

from adapters_jax import checkpoint
from adapters_jax.train_loop import train_and_evaluate


def test_two_stage_fusion_trains_only_fusion_and_head(tmp_path):
    exports = []
    for name, lr in (("alpha", 1e-2), ("beta", 3e-2)):
        c = importlib.import_module("configs.pfeiffer_r64").get_config("smoke")
        c.adapter.name, c.optim.lr = name, lr
        train_and_evaluate(c, str(tmp_path / name))
        exports.append(str(tmp_path / name / "adapter"))
    c = importlib.import_module("configs.fusion").get_config("smoke")
    c.fusion.adapters = ",".join(exports)
    result = train_and_evaluate(c, str(tmp_path / "fused"))
    assert 0.0 <= result["accuracy"] <= 1.0

    meta, tree = checkpoint.read_adapter(str(tmp_path / "fused" / "adapter"))
    setup = checkpoint.spec_from_dict(meta["spec"])
    assert setup.composition == "fuse" and setup.names == ("alpha", "beta")
    trained = traverse_util.flatten_dict(tree)
    assert trained and all(k[0] == "head" or "fusion" in k for k in trained)  # only fusion + head exported
    assert any(k[-2:] == ("value", "kernel") for k in trained)
    # the trained fusion moved away from its identity init
    value = next(v for k, v in trained.items() if k[-2:] == ("value", "kernel"))
    assert not np.allclose(value, np.eye(value.shape[0]), atol=1e-6)


def test_fusion_needs_two_exports_of_this_base(tmp_path):
    c = importlib.import_module("configs.fusion").get_config("smoke")
    c.fusion.adapters = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="at least two adapter export directories"):
        train_and_evaluate(c, str(tmp_path / "f"))
