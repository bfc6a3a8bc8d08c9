"""The benchmark's FLOP accounting against XLA's own cost analysis, and its gradient depth rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax import trainer
from experiments import bench_steps as B

CFG = B.MODELS["tiny"]
BATCH, SEQ = 4, 32


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("method,depth", [("full", 2), ("head_only", 0), ("houlsby", 2), ("lora", 2),
                                          ("prompt", 2), ("ia3", 2)])
def test_gradient_depth_follows_the_lowest_trainable_layer(method, depth):
    *_, labels, _ = B.build(CFG, method, jnp.float32, BATCH, SEQ)
    assert B.gradient_depth(labels, CFG.num_layers) == depth


def test_gradient_depth_of_adapters_in_the_top_layer_only():
    B.METHODS["top_only"] = (dict(method="pfeiffer", bottleneck_dim=8, layers=[1]), {})
    try:
        *_, labels, _ = B.build(CFG, "top_only", jnp.float32, BATCH, SEQ)
    finally:
        del B.METHODS["top_only"]
    assert B.gradient_depth(labels, CFG.num_layers) == 1


def test_analytic_matmul_flops_match_xla_for_forward_and_full_gradient():
    """XLA counts every op; the analytic count only the matmuls, which dominate at width 256."""
    import dataclasses
    cfg = dataclasses.replace(CFG, hidden_size=256, intermediate_size=1024, num_heads=4,
                              hidden_dropout=0.0, attention_dropout=0.0)
    model, _, state, inputs, labels, params = B.build(cfg, "full", jnp.float32, BATCH, SEQ)
    x = {k: v for k, v in inputs.items() if k != "labels"}
    fwd = _xla_flops(lambda p: model.apply({"params": p}, x), params)
    loss = lambda p: trainer.task_loss(model.apply({"params": p}, x), inputs, "classification")[0]
    full = _xla_flops(jax.grad(loss), params)
    fwd_analytic = B.analytic_flops(cfg, BATCH, SEQ, depth=0, adapter_params=0)
    full_analytic = B.analytic_flops(cfg, BATCH, SEQ, depth=cfg.num_layers, adapter_params=0, train_base=True)
    assert fwd_analytic == pytest.approx(fwd, rel=0.10)
    assert full_analytic == pytest.approx(full, rel=0.10)
    # the frozen-base gradient skips the weight-gradient matmuls: about 2/3 of the full count
    act_only = B.analytic_flops(cfg, BATCH, SEQ, depth=cfg.num_layers, adapter_params=0)
    assert act_only / full_analytic == pytest.approx(2 / 3, abs=0.03)


def test_bench_row_reports_flops_memory_and_time():
    row = B.bench(CFG, "houlsby", jnp.float32, peak=1e9, batch=BATCH, seq=SEQ, steps=2)
    assert row["trainable"] > 0 and row["xla_gflop"] > 0 and row["analytic_gflop"] > 0
    assert row["step_s"] > 0 and row["peak_rss_mib"] > 0 and row["xla_step_mib"] > 0
    assert np.isclose(row["mfu"], row["analytic_gflop"] * 1e9 / row["step_s"] / 1e9)
    # the step's memory holds the train state, the batch and the activations kept for the backward
    _, _, state, inputs, _, _ = B.build(CFG, "houlsby", jnp.float32, BATCH, SEQ)
    held = sum(np.asarray(x).nbytes for x in jax.tree.leaves((state, inputs)))
    act = 4 * BATCH * SEQ * CFG.hidden_size * CFG.num_layers  # at least one [B, T, D] float32 per layer
    assert row["xla_step_mib"] * 2**20 >= held + act
