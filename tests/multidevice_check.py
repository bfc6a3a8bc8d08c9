"""Run as a script: splits the CPU into 8 devices (`parallel.set_cpu_devices`, as train's
mesh.cpu_devices does), trains a tiny adapted model 5 steps on 1 device, with jit over an
8-device mesh (plain and fsdp-sharded frozen params, with float32 dots in oneDNN, and in two
streams) and with pmap, and prints the max differences as JSON; likewise pmap against one device
for weighted rows, an LM and AdapterFusion; then runs the training loop under pmap and resumes it."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from adapters_jax import compile_options, optim, parallel, peft, rules, trainer
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.heads import ClassificationHead
from adapters_jax.model import AdaptedModel

CFG = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                 max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)


def main():
    parallel.set_cpu_devices(8)  # before any JAX op
    assert jax.device_count() == 8, jax.devices()
    try:  # the backend is up now: a second split must be refused, not ignored
        parallel.set_cpu_devices(2)
        refused = ""
    except ValueError as e:
        refused = str(e)
    model = AdaptedModel(BertModel(CFG, filler=spec_from_config("houlsby", bottleneck_dim=8)),
                         ClassificationHead(2, dropout=0.0))
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(1, 64, (16, 12)).astype(np.int32),
                "attention_mask": (rng.random((16, 12)) > 0.2).astype(np.int32),
                "labels": rng.integers(0, 2, 16).astype(np.int32)} for _ in range(5)]
    params = model.init(jax.random.PRNGKey(0), batches[0])["params"]
    labels = rules.labels_for(params, peft.make_rules(["adapter"]))
    tx, _ = optim.make(params, labels, lr=1e-2, total_steps=5)
    step = trainer.make_train_step(model, tx)
    fresh = lambda: trainer.create_state(params, labels, tx, jax.random.PRNGKey(1))

    one = jax.device_put(fresh(), jax.devices()[0])
    one_step = jax.jit(step)
    losses_one = []
    for b in batches:
        one, m = one_step(one, b)
        losses_one.append(float(m["loss"]))

    results = {}
    os.environ[compile_options.ONEDNN_ENV] = "1"  # the mesh step with float32 dots in oneDNN too (x86)
    onednn = compile_options.train_compiler_options(jnp.float32)
    streamed = trainer.make_train_step(model, tx, streams=2)  # rows i, i + 2, ... of each device's share
    for name, fsdp, shard_frozen, options, fn in (("jit_data8", 1, False, None, step),
                                                  ("jit_data4_fsdp2", 2, True, None, step),
                                                  ("jit_data8_onednn", 1, False, onednn, step),
                                                  ("jit_data8_streams2", 1, False, None, streamed)):
        mesh = parallel.make_mesh(fsdp)
        sh = parallel.state_shardings(fresh(), mesh, shard_frozen)
        state = parallel.put_state(fresh(), sh)
        jstep = parallel.jit_step(fn, sh, mesh, compiler_options=options)
        losses = []
        for b in batches:
            state, m = jstep(state, parallel.put_batch(b, mesh))
            losses.append(float(m["loss"]))
        results[name] = _diff(losses, losses_one, state.trainable, one.trainable)

    pstep = parallel.pmap_step(trainer.make_train_step(model, tx, axis_name=parallel.PMAP_AXIS))
    state = parallel.replicate(jax.device_put(fresh(), jax.devices()[0]))  # committed, as a restore leaves it
    losses = []
    for b in batches:
        state, m = pstep(state, parallel.shard_for_pmap(b))
        losses.append(float(m["loss"][0]))
    results["pmap8"] = _diff(losses, losses_one, parallel.unreplicate(state.trainable), one.trainable)
    results.update(_weighted_pmap_cases(model, batches))
    json.dump({"results": results, "late_split_error": refused, "pmap_run": _pmap_run_and_resume()}, sys.stdout)


def _pmap_against_one_device(model, batches, trainable: list, task="classification", regularizer=None,
                             lr=1e-2, eps=1e-8) -> dict:
    """3 steps of `model` under pmap over 8 devices against the same 3 on one device."""
    params = model.init(jax.random.PRNGKey(0), batches[0])["params"]
    labels = rules.labels_for(params, peft.make_rules(trainable))
    tx, _ = optim.make(params, labels, lr=lr, total_steps=len(batches), eps=eps)
    fresh = lambda: trainer.create_state(params, labels, tx, jax.random.PRNGKey(1))
    one, p8 = jax.device_put(fresh(), jax.devices()[0]), parallel.replicate(fresh())
    one_step = jax.jit(trainer.make_train_step(model, tx, task=task, regularizer=regularizer))
    pstep = parallel.pmap_step(trainer.make_train_step(model, tx, task=task, regularizer=regularizer,
                                                       axis_name=parallel.PMAP_AXIS))
    losses, losses_one = [], []
    for b in batches:
        one, m = one_step(one, b)
        losses_one.append(float(m["loss"]))
        p8, m = pstep(p8, parallel.shard_for_pmap(b))
        losses.append(float(m["loss"][0]))
    return _diff(losses, losses_one, parallel.unreplicate(p8.trainable), one.trainable)


def _weighted_pmap_cases(model, batches) -> dict:
    """pmap where the devices hold different weights: rows of weight 0 (padding, empty packed
    slots) on some devices, and an LM whose devices hold different numbers of real tokens. The
    batch's loss is a weighted mean over all its rows; a plain mean of each device's mean would
    weigh a device with one real row as much as one with two. Also AdapterFusion's regularizer,
    which must be added once, not once per device."""
    from adapters_jax.adapters import AdapterSetup
    from adapters_jax.adapters.fusion import regularization
    from adapters_jax.backbones.llama import LlamaConfig, LlamaModel
    from adapters_jax.heads import BackboneLogits
    rng = np.random.default_rng(1)
    out = {}
    weighted = [{**b, "weights": np.array([1, 0] * 4 + [1, 1] * 4, np.float32)} for b in batches[:3]]
    out["pmap8_weighted"] = _pmap_against_one_device(model, weighted, ["adapter"])
    llama = AdaptedModel(LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                                num_kv_heads=2, intermediate_size=64, max_position_embeddings=16),
                                    filler=spec_from_config("lora", r=4)), BackboneLogits())
    lengths = np.array([12, 3] * 4 + [12, 12] * 4)  # [16]: devices 0-3 hold 15 tokens, 4-7 hold 24
    lm = [{"input_ids": rng.integers(1, 64, (16, 12)).astype(np.int32),
           "attention_mask": (np.arange(12)[None] < lengths[:, None]).astype(np.int32)} for _ in range(3)]
    out["pmap8_lm"] = _pmap_against_one_device(llama, lm, ["adapter"], task="lm")
    setup = AdapterSetup((spec_from_config("pfeiffer", name="a", bottleneck_dim=8),
                          spec_from_config("pfeiffer", name="b", bottleneck_dim=8)), composition="fuse")
    fused = AdaptedModel(BertModel(CFG, filler=setup), ClassificationHead(2, dropout=0.0))
    # eps=1 makes Adam's update smooth in the gradient: at init the fusion's value gradients
    # nearly cancel the regularizer's, and with eps=1e-8 Adam turns their roundoff into 4e-3
    # moves of the value matrix (the losses still agree to 1e-7)
    out["pmap8_fusion"] = _pmap_against_one_device(fused, batches[:3], ["fusion"], lr=1.0, eps=1.0,
                                                   regularizer=lambda p: regularization(p, "fusion"))
    return out


def _pmap_run_and_resume() -> dict:
    """experiments.train's loop under parallelism=pmap: 2 steps with a checkpoint and an export,
    then the same command resumed to 3 steps (pmap holds one replica per device; checkpoints,
    exports and the resumed state must see one)."""
    import contextlib
    import importlib
    import io
    import tempfile

    from adapters_jax.train_loop import train_and_evaluate
    with tempfile.TemporaryDirectory() as workdir:
        logs = []
        for steps in (2, 3):
            config = importlib.import_module("configs.houlsby_r64").get_config("smoke")
            config.parallelism, config.train.num_steps, config.train.streams = "pmap", steps, 2
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                train_and_evaluate(config, workdir)
            logs.append(out.getvalue())
        return {"resumed": "resuming from step 2" in logs[1],
                "export": os.path.exists(os.path.join(workdir, "adapter", "adapter.safetensors")),
                "checkpoints": sorted(os.listdir(os.path.join(workdir, "checkpoints")))}


def _diff(losses, ref_losses, trainable, ref_trainable):
    dp = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(ref_trainable)))
    return {"loss": float(np.abs(np.array(losses) - np.array(ref_losses)).max()), "params": dp,
            "loss_moved": float(abs(ref_losses[-1] - ref_losses[0]))}


if __name__ == "__main__":
    main()
