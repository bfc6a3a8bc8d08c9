"""The benchmark's FLOP accounting against XLA's own cost analysis, its gradient depth rule, and
the malloc settings its timed subprocesses can run with."""
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax import trainer
from experiments import bench_steps as B
from experiments import host_malloc

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


@pytest.mark.parametrize("first_token_only", [False, True])
def test_analytic_matmul_flops_match_xla_for_forward_and_full_gradient(first_token_only):
    """XLA counts every op; the analytic count only the matmuls, which dominate at width 256.
    With first_token_only the CLS head's model computes one row of its last layer, which the
    analytic count must follow (XLA sees what the compiled program really does)."""
    import dataclasses
    cfg = dataclasses.replace(CFG, hidden_size=256, intermediate_size=1024, num_heads=4,
                              hidden_dropout=0.0, attention_dropout=0.0)
    model, _, state, inputs, labels, params = B.build(cfg, "full", jnp.float32, BATCH, SEQ,
                                                      skip_unread_rows=first_token_only)
    x = {k: v for k, v in inputs.items() if k != "labels"}
    fwd = _xla_flops(lambda p: model.apply({"params": p}, x), params)
    loss = lambda p: trainer.task_loss(model.apply({"params": p}, x), inputs, "classification")[0]
    full = _xla_flops(jax.grad(loss), params)
    count = lambda **kw: B.analytic_flops(cfg, BATCH, SEQ, adapter_params=0, first_token_only=first_token_only, **kw)
    fwd_analytic = count(depth=0)
    full_analytic = count(depth=cfg.num_layers, train_base=True)
    assert fwd_analytic == pytest.approx(fwd, rel=0.10)
    assert full_analytic == pytest.approx(full, rel=0.10)
    # the frozen-base gradient skips the weight-gradient matmuls: about 2/3 of the full count
    act_only = count(depth=cfg.num_layers)
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


def test_micro_batches_count_every_micro_batch_and_hold_less():
    """--accum_steps: XLA's cost analysis counts the micro-batch scan's body once, so the row
    scales it back (the same FLOPs as one batch, within the accumulation's adds), while the step
    holds about one micro-batch's activations."""
    one = B.bench(CFG, "houlsby", jnp.float32, peak=1e9, batch=32, seq=SEQ, steps=0, flops_only=True)
    two = B.bench(CFG, "houlsby", jnp.float32, peak=1e9, batch=32, seq=SEQ, steps=0, flops_only=True,
                  accum_steps=2)
    assert two["accum_steps"] == 2 and two["analytic_gflop"] == one["analytic_gflop"]
    assert two["xla_gflop"] == pytest.approx(one["xla_gflop"], rel=0.02)
    assert two["xla_step_mib"] < 0.8 * one["xla_step_mib"]


@pytest.mark.parametrize("method", ["full", "houlsby", "pfeiffer"])
def test_adapterhub_bert_base_trains_what_ours_trains(method):
    """`--model bert-base --adapterhub`: both sides build BERT-base with random weights; the
    PyTorch side must train exactly as many parameters as ours, or the times compare other work."""
    from adapters_jax import peft, rules
    from experiments.benchmark_adapterhub import build as adapterhub_build
    model, freezing = B.make_model(B.MODELS["bert-base"], method, jnp.float32)
    inputs = {"input_ids": jnp.ones((1, 8), jnp.int32), "attention_mask": jnp.ones((1, 8), jnp.int32)}
    shapes = jax.eval_shape(lambda r: model.init(r, inputs)["params"], jax.random.PRNGKey(0))
    labels = rules.labels_for(shapes, freezing)
    ours = sum(int(np.prod(s.shape)) for s, label in zip(jax.tree.leaves(shapes), jax.tree.leaves(labels))
               if label == peft.TRAINABLE)
    torch_model, _, theirs = adapterhub_build(method, "bert-base", bottleneck=64)
    assert torch_model.config.hidden_size == 768 and torch_model.config.num_hidden_layers == 12
    assert theirs == ours


_FAULTS_CHILD = r"""
import ctypes, resource, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n, faults = 96 << 20, []
def steps():  # like XLA:CPU's worker: a fresh 96 MiB block per step, written, then freed
    for i in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=steps)
t.start(); t.join()
print(min(faults[1:]))
"""


@pytest.mark.parametrize("mode", host_malloc.MODES)
def test_tuned_malloc_stops_refaulting_a_freed_step_block(mode):
    """glibc's default mmaps (and faults in) a large block on every allocation from a worker
    thread; with the tuned settings the block is reused from the heap after the first step."""
    out = subprocess.run([sys.executable, "-c", _FAULTS_CHILD], capture_output=True, text=True,
                         env=host_malloc.child_env(mode), check=True)
    faults = int(out.stdout.strip())
    pages = (96 << 20) // resource.getpagesize()
    if mode == "tuned":
        assert faults < 0.05 * pages
    else:
        assert faults > 0.5 * pages


def test_unknown_malloc_mode_is_named():
    with pytest.raises(ValueError, match="--malloc='fast'"):
        host_malloc.child_env("fast")


def test_fusions_are_counted_with_tuple_shapes_and_not_by_name():
    from experiments.bench_executable_memory import count_fusions
    hlo = """
  %fusion.1 = f32[4,4]{1,0} fusion(f32[4,4]{1,0} %p0), kind=kLoop, calls=%fused_computation.1
  %fusion.2 = (f32[4]{0}, f32[4]{0}) fusion(f32[4,4]{1,0} %fusion.1), kind=kInput, calls=%fused_computation.2
  ROOT %tuple = (f32[4]{0}) tuple(f32[4]{0} %get-tuple-element.fusion.2)
"""
    assert count_fusions(hlo) == 2


def test_layouts_name_the_flag():
    from experiments.bench_executable_memory import parse_layout
    assert parse_layout("2x1") == (2, 1)
    with pytest.raises(ValueError, match="--layouts: '2x0'"):
        parse_layout("2x0")


def test_executable_memory_grows_with_fused_kernels(tmp_path):
    """Two synthetic chains, each compiled in a fresh process: the longer one has more fused
    kernels, and its executable holds memory that deleting it gives back (a measurement that
    dropped the executable before its second reading would read the same twice)."""
    import json
    out = tmp_path / "em.json"
    run = subprocess.run([sys.executable, "-m", "experiments.bench_executable_memory", "--methods=",
                          "--chains=40,400", f"--out={out}"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    small, big = json.loads(out.read_text())["rows"]
    assert big["fusions"] > 5 * small["fusions"] > 0
    assert big["resident_mib"] - big["after_delete_mib"] > 10
