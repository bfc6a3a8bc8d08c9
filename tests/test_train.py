"""The training entry point: every config's smoke preset and init_from (bad configs:
tests/test_bad_inputs.py; kill -9 and resume: tests/test_kill_trials.py)."""
import glob
import importlib
import re
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py", "fusion.py",  # fusion: tests/test_fusion_train.py
                                                "smollm2_lm.py"))  # causal LM (perplexity): tests/test_lm_train.py


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_preset_trains_evaluates_and_exports(name, tmp_path):
    from adapters_jax.train_loop import train_and_evaluate
    config = importlib.import_module(f"configs.{name}").get_config("smoke")
    result = train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= result["accuracy"] <= 1.0
    assert os.path.exists(tmp_path / "adapter" / "adapter.safetensors")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any('"loss"' in l for l in lines) and any('"eval_accuracy"' in l for l in lines)
    assert glob.glob(str(tmp_path / "tensorboard" / "events.*"))


def test_init_from_starts_from_another_runs_adapters(tmp_path):
    from adapters_jax.train_loop import train_and_evaluate
    first = importlib.import_module("configs.houlsby_r64").get_config("smoke")
    first.optim.lr = 1e-2
    train_and_evaluate(first, str(tmp_path / "a"))
    second = importlib.import_module("configs.houlsby_r64").get_config("smoke")
    second.init_from = str(tmp_path / "a" / "adapter")
    second.optim.lr, second.train.num_steps = 1e-12, 2  # (almost) no movement: the start must show
    train_and_evaluate(second, str(tmp_path / "b"))
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    # Both runs share the seed, so without init_from run b would start from run a's *initial*
    # adapters, which 4 steps at lr 1e-2 moved by far more than 1e-6.
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def test_host_malloc_tuned_restarts_training_with_the_glibc_settings(tmp_path):
    """`--host_malloc tuned` re-executes the entry point with experiments/host_malloc.TUNED in its
    environment (glibc reads them at start) and then trains as usual; here with train.streams=3
    (each step's packed rows in three streams) and XLA:CPU's memory-optimized scheduler."""
    import subprocess
    import sys

    from experiments import host_malloc
    env = host_malloc.child_env("default", dict(os.environ, JAX_PLATFORMS="cpu"))
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/houlsby_r64.py:smoke",
                          f"--workdir={tmp_path}", "--config.train.num_steps=2", "--host_malloc=tuned",
                          "--config.train.streams=3", "--config.train.cpu_scheduler=memory"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    started = [line for line in out.stdout.splitlines() if line.startswith("host malloc: tuned")]
    assert started == ["host malloc: tuned (" + " ".join(f"{k}={v}" for k, v in host_malloc.TUNED.items())
                       + "), synchronous CPU dispatch"]
    assert os.path.exists(tmp_path / "adapter" / "adapter.safetensors")
    assert re.search(r"peak host RSS \d+ MiB", out.stdout + out.stderr)
    assert "train batches: PackedBatches(" in out.stdout + out.stderr


def test_attention_backward_recompute_trains_to_the_same_adapters(tmp_path):
    """model.attention_backward='recompute' reaches attention (build sets it for the steps it
    traces), draws the same dropout masks and gives the adapters 'keep' gives."""
    from adapters_jax.backbones import attention
    from adapters_jax.train_loop import train_and_evaluate
    results = {}
    try:
        for backward in ("keep", "recompute"):
            config = importlib.import_module("configs.houlsby_r64").get_config("smoke")
            config.model.attention_backward = backward
            config.optim.lr, config.train.num_steps = 1e-2, 4
            train_and_evaluate(config, str(tmp_path / backward))
            assert attention.set_training_backward("keep") == backward  # what the run traced with
            results[backward] = load_file(str(tmp_path / backward / "adapter" / "adapter.safetensors"))
    finally:
        attention.set_training_backward("keep")
    assert results["keep"].keys() == results["recompute"].keys()
    for k in results["keep"]:
        np.testing.assert_allclose(results["recompute"][k], results["keep"][k], atol=1e-5, err_msg=k)


def test_each_train_and_eval_shape_compiles_once(tmp_path):
    """The loop compiles a new batch shape ahead of its first step or evaluation
    (host_memory.CompiledAhead, to trim the compiler's heap before the activations); jit's cache
    must then reuse that executable, not compile again when it is called. Read from JAX's own
    compile log, whose lines name the shapes: no shape may compile twice."""
    import logging

    from adapters_jax import train_loop
    config = importlib.import_module("configs.houlsby_r64").get_config("smoke")
    config.train.num_steps = 3
    compiles = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith(("Compiling jit(train_step) with", "Compiling jit(eval_step) with")):
                compiles.append(record.getMessage())

    handler = Count()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            train_loop.train_and_evaluate(config, str(tmp_path))
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert len(set(compiles)) == len(compiles), compiles
    assert {c.split(" with")[0] for c in compiles} == {"Compiling jit(train_step)", "Compiling jit(eval_step)"}


def test_training_keeps_no_host_copy_of_the_base(tmp_path, monkeypatch):
    """Once the train state is on the device, the loop holds the base only there: while it
    evaluates, no loaded backbone still holds its host arrays, and one array (the state's) holds
    the word embeddings. Nor does it keep what building the state compiled: a function compiled
    before the run is no longer cached (the loop clears JAX's caches before its first compile).
    `evaluate` is wrapped, not replaced, to look."""
    import gc

    from adapters_jax import train_loop
    from adapters_jax.backbones import hf_io
    from adapters_jax.hub import Backbone, resolve
    config = importlib.import_module("configs.houlsby_r64").get_config("smoke")
    config.train.num_steps = 2
    hf = hf_io.read_config(resolve(config.model.name))
    vocab, width = hf["vocab_size"], hf["hidden_size"]

    def held():
        """(backbones holding params, word-embedding-shaped arrays) alive now."""
        gc.collect()
        live = gc.get_objects()
        return ([o for o in live if isinstance(o, Backbone) and o.params is not None],
                [o for o in live if isinstance(o, jax.Array) and o.shape == (vocab, width)])

    before = held()  # other tests' objects in this process (kept alive here, so their ids stay theirs)
    probe = jax.jit(lambda x: x + 1)
    probe(np.float32(1))
    assert probe._cache_size() == 1
    seen = []
    evaluate = train_loop.evaluate

    def looking(*args, **kwargs):
        backbones, arrays = held()
        seen.append((sum(not any(b is o for o in before[0]) for b in backbones),
                     sum(not any(a is o for o in before[1]) for a in arrays), probe._cache_size()))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_loop, "evaluate", looking)
    train_loop.train_and_evaluate(config, str(tmp_path))
    assert seen and seen == [(0, 1, 0)] * len(seen), seen
