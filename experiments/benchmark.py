"""Benchmark the train step of every method: compile time, step time, FLOPs, MFU, memory.

    python -m experiments.benchmark                       # MiniLM, batch 32 x 128, all methods
    python -m experiments.benchmark --methods houlsby,full --flops_only
    python -m experiments.benchmark --model bert-base     # BERT-base dimensions, random weights

FLOPs come from XLA's cost analysis of the compiled step (what XLA will actually run) and
from an analytic count that knows a frozen weight has no weight-gradient matmul. MFU is
achieved FLOP/s over the matmul peak the harness measures itself on this machine.
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from adapters_jax import optim, peft, rules, trainer
from adapters_jax.adapters import spec_from_config
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.heads import ClassificationHead
from adapters_jax.model import AdaptedModel

flags.DEFINE_string("methods", "full,head_only,houlsby,pfeiffer,parallel,compacter,lora,ia3,prefix,prompt",
                    "comma-separated methods")
flags.DEFINE_string("model", "minilm", "minilm (MiniLM-L6 dimensions) or bert-base")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_integer("seq", 128, "sequence length")
flags.DEFINE_integer("steps", 10, "timed steps (median reported)")
flags.DEFINE_bool("flops_only", False, "compile and count FLOPs, do not time")
flags.DEFINE_string("dtype", "float32", "compute dtype: float32 or bfloat16")
flags.DEFINE_string("out", "runs/benchmark.json", "JSON output")
flags.DEFINE_integer("mixed_tasks", 0, "if > 0: compare a mixed-task batch over this many Houlsby adapters "
                     "('select') with a single-adapter batch, forward only, and exit")
FLAGS = flags.FLAGS

MODELS = {
    "minilm": BertConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "bert-base": BertConfig(),
}
# method -> (adapter preset options or None, freeze options)
METHODS = {
    "full": (None, dict(train_all=True)),
    "head_only": (None, {}),
    "houlsby": (dict(method="houlsby", bottleneck_dim=64), {}),
    "pfeiffer": (dict(method="pfeiffer", bottleneck_dim=64), {}),
    "parallel": (dict(method="parallel", bottleneck_dim=64), {}),
    "compacter": (dict(method="compacter", reduction_factor=16), {}),
    "lora": (dict(method="lora", r=8, alpha=16), {}),
    "ia3": (dict(method="ia3"), {}),
    "prefix": (dict(method="prefix", prefix_length=10), {}),
    "prompt": (dict(method="prompt", n_tokens=10), {}),
}


def matmul_peak(dtype=jnp.float32, n: int = 2048, reps: int = 5) -> float:
    """Measured FLOP/s of a large square matmul (float32 accumulation)."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def analytic_flops(cfg: BertConfig, batch: int, seq: int, trainable_base: bool) -> float:
    """Train-step FLOPs of the encoder: forward 2·P·tokens for the dense layers plus attention;
    backward 2x forward for activations, plus 2·P·tokens more only if the base is trained."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    tokens = batch * seq
    dense = L * (4 * d * d + 2 * d * f)  # q, k, v, o and the two FFN matmuls
    attn = L * 2 * 2 * seq * d           # QK^T and PV per token
    fwd = 2 * dense * tokens + attn * tokens
    bwd_act = 2 * dense * tokens + 2 * attn * tokens
    bwd_w = 2 * dense * tokens if trainable_base else 0
    return fwd + bwd_act + bwd_w


def build(cfg: BertConfig, method: str, dtype):
    adapter, freeze = METHODS[method]
    spec = None
    if adapter is not None:
        options = dict(adapter)
        if options["method"] == "prefix":
            options.update(num_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads)
        spec = spec_from_config(**options)
    model = AdaptedModel(BertModel(cfg, filler=spec, dtype=dtype), ClassificationHead(2, dtype=dtype))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1, cfg.vocab_size, (FLAGS.batch, FLAGS.seq)).astype(np.int32),
             "attention_mask": np.ones((FLAGS.batch, FLAGS.seq), np.int32),
             "token_type_ids": np.zeros((FLAGS.batch, FLAGS.seq), np.int32),
             "labels": rng.integers(0, 2, FLAGS.batch).astype(np.int32)}
    params = jax.jit(lambda r: model.init(r, batch)["params"])(jax.random.PRNGKey(0))
    labels = rules.labels_for(params, peft.make_rules([spec.name] if spec else [], **freeze))
    tx, _ = optim.make(params, labels, lr=1e-4, total_steps=1000)
    state = trainer.create_state(params, labels, tx, jax.random.PRNGKey(1))
    return model, tx, state, batch, labels, params


def bench(cfg: BertConfig, method: str, dtype, peak: float) -> dict:
    model, tx, state, batch, labels, params = build(cfg, method, dtype)
    step = jax.jit(trainer.make_train_step(model, tx), donate_argnums=(0,))
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_tr = sum(int(np.prod(v.shape)) for k, v in _flat(params).items() if _flat(labels)[k] == peft.TRAINABLE)
    row = {"method": method, "compile_s": compile_s, "xla_gflop": cost.get("flops", 0.0) / 1e9,
           "analytic_gflop": analytic_flops(cfg, FLAGS.batch, FLAGS.seq, method == "full") / 1e9,
           "trainable": n_tr}
    if FLAGS.flops_only:
        return row
    for _ in range(2):  # warm-up
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(FLAGS.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    row.update(step_s=med, examples_per_s=FLAGS.batch / med,
               achieved_gflops=row["analytic_gflop"] / med, mfu=row["analytic_gflop"] * 1e9 / med / peak,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(dict(tree))


def mixed_vs_single(cfg: BertConfig, n_tasks: int) -> dict:
    """Forward throughput of a batch whose rows use n_tasks different adapters vs one adapter.

    The two are timed in alternation, so that load from other processes hits both alike.
    """
    from adapters_jax.adapters import AdapterSetup
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (FLAGS.batch, FLAGS.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    task_ids = (np.arange(FLAGS.batch) % n_tasks).astype(np.int32)
    single = BertModel(cfg, filler=spec_from_config("houlsby", name="t0", bottleneck_dim=64))
    setup = AdapterSetup(tuple(spec_from_config("houlsby", name=f"t{i}", bottleneck_dim=64)
                               for i in range(n_tasks)), composition="select")
    mixed = BertModel(cfg, filler=setup)
    p1 = jax.jit(lambda r: single.init(r, ids, mask)["params"])(jax.random.PRNGKey(0))
    pn = jax.jit(lambda r: mixed.init(r, ids, mask, adapter_ids=task_ids)["params"])(jax.random.PRNGKey(0))
    f1 = jax.jit(lambda p: single.apply({"params": p}, ids, mask)["last_hidden_state"])
    fn = jax.jit(lambda p: mixed.apply({"params": p}, ids, mask, adapter_ids=task_ids)["last_hidden_state"])
    f1(p1).block_until_ready(), fn(pn).block_until_ready()
    t1, tn = [], []
    for _ in range(FLAGS.steps):
        for f, p, times in ((f1, p1, t1), (fn, pn, tn)):
            t = time.perf_counter()
            f(p).block_until_ready()
            times.append(time.perf_counter() - t)
    s1, sn = statistics.median(t1), statistics.median(tn)
    return {"single_s": s1, "mixed_s": sn, "single_ex_per_s": FLAGS.batch / s1,
            "mixed_ex_per_s": FLAGS.batch / sn, "throughput_ratio": s1 / sn, "tasks": n_tasks}


def main(argv):
    del argv
    if FLAGS.mixed_tasks:
        r = mixed_vs_single(MODELS[FLAGS.model], FLAGS.mixed_tasks)
        print(f"{FLAGS.model} batch {FLAGS.batch} x {FLAGS.seq}, forward, median of {FLAGS.steps}: single adapter "
              f"{r['single_s'] * 1e3:.0f} ms ({r['single_ex_per_s']:.0f} ex/s); mixed over {r['tasks']} adapters "
              f"{r['mixed_s'] * 1e3:.0f} ms ({r['mixed_ex_per_s']:.0f} ex/s); throughput ratio "
              f"{r['throughput_ratio']:.2f}")
        return
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    cfg = MODELS[FLAGS.model]
    peak = 0.0 if FLAGS.flops_only else matmul_peak(dtype)
    rows = []
    for method in FLAGS.methods.split(","):
        rows.append(bench(cfg, method, dtype, peak))
        print(json.dumps(rows[-1]), flush=True)
    full = next((r for r in rows if r["method"] == "full"), None)
    print(f"\n{FLAGS.model} batch {FLAGS.batch} x {FLAGS.seq}, {FLAGS.dtype}, "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), matmul peak {peak / 1e9:.0f} GFLOP/s")
    head = f"{'method':<10} {'trainable':>11} {'compile s':>9} {'XLA GFLOP':>10} {'vs full':>8}"
    if not FLAGS.flops_only:
        head += f" {'step s':>8} {'ex/s':>7} {'GFLOP/s':>8} {'MFU':>6} {'RSS MiB':>8}"
    print(head)
    for r in rows:
        line = (f"{r['method']:<10} {r['trainable']:>11,} {r['compile_s']:>9.1f} {r['xla_gflop']:>10.1f} "
                f"{(r['xla_gflop'] / full['xla_gflop'] if full else float('nan')):>8.3f}")
        if not FLAGS.flops_only:
            line += (f" {r['step_s']:>8.3f} {r['examples_per_s']:>7.1f} {r['achieved_gflops']:>8.1f} "
                     f"{r['mfu']:>6.1%} {r['peak_rss_mib']:>8.0f}")
        print(line)
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"model": FLAGS.model, "batch": FLAGS.batch, "seq": FLAGS.seq, "dtype": FLAGS.dtype,
                   "matmul_peak_gflops": peak / 1e9, "rows": rows}, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
