"""Serving: one base in memory, adapters swapped from export directories without recompiling."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from adapters_jax.serving import AdapterServer

TEXTS = ["a warm, funny film", "tedious and overlong", "the plot never lands", "great cast", "meh"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two short smoke runs (tiny random BERT) with different adapters, and their exports."""
    import importlib
    from adapters_jax.train_loop import train_and_evaluate
    out = {}
    for name, cfg_name, lr in (("pos", "houlsby_r64", 1e-2), ("neg", "houlsby_r64", 3e-2)):
        config = importlib.import_module(f"configs.{cfg_name}").get_config("smoke")
        config.adapter.name = name
        config.optim.lr = lr
        work = tmp_path_factory.mktemp(name)
        train_and_evaluate(config, str(work))
        out[name] = str(work / "adapter")
    return out


def test_swapping_adapters_does_not_recompile_and_mixed_batches_match(exports, monkeypatch):
    import jax

    from adapters_jax import host_memory
    trims = []
    release = host_memory.release_free_heap

    def counting():  # wraps the real trim, to see that it follows each compile and nothing else
        trims.append(1)
        return release()

    monkeypatch.setattr(host_memory, "release_free_heap", counting)
    server = AdapterServer("tiny-random-bert", max_length=32)
    base_leaves = jax.tree_util.tree_leaves(server.base)
    server.load(exports["pos"])
    server.load(exports["neg"])
    # Swapping reads only the adapter files: the base's device arrays are the very same objects.
    # (Load time is reported by `experiments.predict --swaps`, not asserted here: CI machines vary.)
    assert all(x is y for x, y in zip(jax.tree_util.tree_leaves(server.base), base_leaves, strict=True))
    la = server.predict(TEXTS, "pos")
    lb = server.predict(TEXTS, "neg")
    la2 = server.predict(TEXTS, "pos")
    assert server.compiles == 1  # same architecture: one program for both adapters
    assert len(trims) == 1  # the compile's freed heap is handed back once, not on every call
    np.testing.assert_array_equal(la, la2)
    assert not np.allclose(la, lb)
    which = ["pos", "neg", "neg", "pos", "neg"]
    mixed = server.predict_mixed(TEXTS, which)
    for row, name in enumerate(which):
        want = la[row] if name == "pos" else lb[row]
        np.testing.assert_allclose(mixed[row], want, atol=1e-5)
    assert (server.compiles, len(trims)) == (2, 2)


def test_exports_for_another_base_or_with_pickles_are_refused(exports, tmp_path):
    server = AdapterServer("tiny-random-bert", max_length=32)
    other = tmp_path / "other_base"
    shutil.copytree(exports["pos"], other)
    meta = json.loads((other / "adapter_config.json").read_text())
    meta["base_sha256"] = "0" * 64
    (other / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different base model"):
        server.load(str(other))
    pickled = tmp_path / "pickled"
    shutil.copytree(exports["pos"], pickled)

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (pickled / "adapter.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="adapter.safetensors: not a readable safetensors file"):
        server.load(str(pickled))
    assert not (tmp_path / "pwned").exists()


def _random_export(server, spec, directory, seed, pooling="cls"):
    """An export as training writes it (JSON + safetensors), with random adapter and head leaves."""
    import jax
    from flax import traverse_util
    from adapters_jax import checkpoint
    head = {"num_labels": 3, "pooling": pooling}
    shapes = traverse_util.flatten_dict(server._abstract(spec, head))
    rng = np.random.default_rng(seed)
    trainable = {k: (1.0 if k[-1] == "scale" else 0.0) + 0.3 * rng.standard_normal(v.shape).astype(np.float32)
                 for k, v in shapes.items() if k[0] == "head" or spec.name in k}
    meta = {"base_sha256": server.base_sha, "spec": checkpoint.spec_to_dict(spec), "head": head,
            "label_names": ["a", "b", "c"]}
    checkpoint.export_adapter(str(directory), jax.device_get(traverse_util.unflatten_dict(trainable)), meta)
    return str(directory)


def test_mixed_batches_of_lora_and_ia3_exports_match_each_adapter_alone(tmp_path):
    from adapters_jax.adapters import spec_from_config
    server = AdapterServer("tiny-random-bert", max_length=32)
    specs = {"lora_qv": spec_from_config("lora", name="lora_qv", r=4, alpha=8),
             "lora_ffn": spec_from_config("lora", name="lora_ffn", r=2, lora_sites=("ffn_out",), layers="1"),
             "ia3": spec_from_config("ia3", name="ia3")}
    for i, (name, spec) in enumerate(specs.items()):
        server.load(_random_export(server, spec, tmp_path / name, seed=i))
    alone = {name: server.predict(TEXTS, name) for name in specs}
    assert not np.allclose(alone["lora_qv"], alone["lora_ffn"])
    which = ["ia3", "lora_qv", "lora_ffn", "lora_ffn", "lora_qv"]
    mixed = server.predict_mixed(TEXTS, which)
    for row, name in enumerate(which):
        np.testing.assert_allclose(mixed[row], alone[name][row], atol=1e-5)


def test_mixed_batches_on_a_decoder_match_each_adapter_alone(tmp_path):
    """A Llama's third argument is position_ids, not token_type_ids: the mixed path passes the
    batch by keyword (it once passed token_type_ids by position, which moved every row to position 0)."""
    from adapters_jax.adapters import spec_from_config
    server = AdapterServer("tiny-random-llama", max_length=32)
    specs = {"lora": spec_from_config("lora", name="lora", r=4, alpha=8),
             "houlsby": spec_from_config("houlsby", name="houlsby", bottleneck_dim=8)}
    for i, (name, spec) in enumerate(specs.items()):
        server.load(_random_export(server, spec, tmp_path / name, seed=i, pooling="last"))
    alone = {name: server.predict(TEXTS, name) for name in specs}
    assert not np.allclose(alone["lora"], alone["houlsby"])
    which = ["houlsby", "lora", "houlsby", "lora", "lora"]
    mixed = server.predict_mixed(TEXTS, which)
    for row, name in enumerate(which):
        np.testing.assert_allclose(mixed[row], alone[name][row], atol=1e-5)
