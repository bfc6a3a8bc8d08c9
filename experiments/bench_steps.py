"""The train-step measurements behind `experiments.benchmark`, without its command-line flags
(so tests and other scripts can import them): model dimensions, methods, the measured matmul
peak, PEFT-aware FLOP accounting and one method's benchmark row."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from adapters_jax import host_memory, optim, parallel, peft, rules, trainer
from adapters_jax.adapters import spec_from_config
from adapters_jax.backbones import sites
from adapters_jax.compile_options import onednn_dot_options, train_compiler_options, train_jit
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.heads import ClassificationHead
from adapters_jax.model import AdaptedModel

MODELS = {
    "minilm": BertConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "bert-base": BertConfig(),
    "tiny": BertConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
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
    """Measured FLOP/s of a large square matmul (float32 accumulation): the best of XLA's default
    dot library and, where train steps use it, oneDNN's, so that MFU is against the faster."""
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    times = []
    onednn = onednn_dot_options(dtype)
    for options in [{}] + ([onednn] if onednn else []):
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32), compiler_options=options or None)
        f(a, a).block_until_ready()
        for _ in range(reps):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def gradient_depth(labels, num_layers: int) -> int:
    """How many encoder layers the backward pass must cross: from the top down to the lowest
    layer holding a trainable parameter (all of them if embeddings or a prompt train; 0 when
    only the head trains)."""
    lowest = num_layers
    for path, label in _flat(labels).items():
        if label != peft.TRAINABLE or path[0] != "backbone":
            continue
        layer = next((int(m.group(1)) for p in path if (m := re.fullmatch(r"layer_(\d+)", str(p)))), None)
        lowest = min(lowest, 0 if layer is None else layer)  # embeddings, prompt, shared: everything
    return num_layers - lowest


def analytic_flops(cfg: BertConfig, batch: int, seq: int, *, depth: int, adapter_params: int,
                   extra_tokens: int = 0, train_base: bool = False, first_token_only: bool = False,
                   row_adapter_params: int = 0) -> float:
    """PEFT-aware train-step FLOPs of the encoder (2 FLOPs per multiply-add).

    forward: 2·P_dense·tokens + attention (QKᵀ and PV: 4·T·d per token and layer) for every
    layer; backward: twice that for the activation gradients, but only through the `depth`
    layers above the lowest trainable one; the weight-gradient matmul (2·P·tokens) only for
    trained weights: the base when `train_base`, always the adapters' `adapter_params`.
    `extra_tokens` (a prompt's) lengthen the sequence. With `first_token_only` (a CLS head; see
    `BertLayer`) the last layer runs its key and value projections on every token and the rest
    on one row per example, as do its `row_adapter_params` (counted apart from `adapter_params`).
    """
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    t = seq + extra_tokens
    tokens = batch * t
    dense = 4 * d * d + 2 * d * f  # q, k, v, o and the two FFN matmuls, per layer
    attn = 4 * t * d               # per query row and layer
    kv = 2 * d * d                 # the key and value projections, per token
    # each layer's (dense params, attention) work, summed over the rows that run it
    if first_token_only:
        rows_dense = (L - 1) * dense * tokens + kv * tokens + (dense - kv) * batch
        rows_attn = ((L - 1) * tokens + batch) * attn
        top_dense, top_attn = kv * tokens + (dense - kv) * batch, batch * attn
    else:
        rows_dense, rows_attn = L * dense * tokens, L * tokens * attn
        top_dense, top_attn = dense * tokens, tokens * attn
    fwd = 2 * rows_dense + rows_attn
    # the backward crosses the top `depth` layers: the last one, then depth - 1 full ones
    bwd_act = (2 * top_dense + 2 * top_attn + max(depth - 1, 0) * (2 * dense + 2 * attn) * tokens) if depth else 0
    bwd_w = 2 * rows_dense if train_base else 0
    adapter = 6 * (adapter_params * tokens + row_adapter_params * batch)  # forward, activation and weight gradients
    return float(fwd + bwd_act + bwd_w + adapter)


def make_model(cfg: BertConfig, method: str, dtype, skip_unread_rows: bool = True):
    """The benchmarked model for `method` (a METHODS key) and its freezing rules."""
    adapter, freeze = METHODS[method]
    spec = None
    if adapter is not None:
        options = dict(adapter)
        if options["method"] == "prefix":
            options.update(num_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads)
        spec = spec_from_config(**options)
    model = AdaptedModel(BertModel(cfg, filler=spec, dtype=dtype), ClassificationHead(2, dtype=dtype),
                         skip_unread_rows=skip_unread_rows)
    return model, peft.make_rules([spec.name] if spec else [], **freeze)


def build(cfg: BertConfig, method: str, dtype, batch: int, seq: int, frozen_dtype=None,
          skip_unread_rows: bool = True):
    model, freezing = make_model(cfg, method, dtype, skip_unread_rows)
    rng = np.random.default_rng(0)
    inputs = {"input_ids": rng.integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32),  # [B, T]
              "attention_mask": np.ones((batch, seq), np.int32),
              "token_type_ids": np.zeros((batch, seq), np.int32),
              "labels": rng.integers(0, 2, batch).astype(np.int32)}  # [B]
    params = jax.jit(lambda r: model.init(r, inputs)["params"])(jax.random.PRNGKey(0))
    labels = rules.labels_for(params, freezing)
    tx, _ = optim.make(params, labels, lr=1e-4, total_steps=1000)
    state = trainer.create_state(params, labels, tx, jax.random.PRNGKey(1), frozen_dtype=frozen_dtype)
    return model, tx, state, inputs, labels, params


def single_device_step(model, tx, dtype, streams: int = 1, accum_steps: int = 1, scheduler: str = "default"):
    """The benchmarked one-device train step, built as training's jit path builds it (state donated)."""
    return train_jit(trainer.make_train_step(model, tx, streams=streams, accum_steps=accum_steps), dtype=dtype,
                     scheduler=scheduler, donate_argnums=(0,))


def child_rows(cmd: list[str], what: str, env: dict) -> list[dict]:
    """Runs a measuring child process with `env` and returns the JSON rows it printed; a failed or
    silent child raises with `what` and the last line of its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not rows:
        raise RuntimeError(f"{what} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return rows


def bench(cfg: BertConfig, method: str, dtype, peak: float, batch: int, seq: int, steps: int,
          flops_only: bool = False, frozen_dtype=None, skip_unread_rows: bool = True, devices: int = 1,
          streams: int = 1, accum_steps: int = 1, scheduler: str = "default") -> dict:
    """One method's row: compile time, XLA and analytic FLOPs, memory, and (unless flops_only)
    the median step time over `steps` after two warm-up steps. With `devices` > 1 the batch is
    split over that many devices as training's jit step splits it (`parallel.set_cpu_devices`);
    XLA's FLOPs and step memory are then the sum over the devices. `streams`: as train.streams
    (the batch's parts computed side by side in one program); `accum_steps`: as train.accum_steps
    (micro-batches one after another); `scheduler`: as train.cpu_scheduler."""
    model, tx, state, inputs, labels, params = build(cfg, method, dtype, batch, seq, frozen_dtype,
                                                     skip_unread_rows)
    jax.clear_caches()  # as the training loop does once its state is built (init's tracing caches)
    if devices > 1:
        mesh = parallel.make_mesh(count=devices)
        shardings = parallel.state_shardings(state, mesh)
        step = parallel.jit_step(trainer.make_train_step(model, tx, streams=streams, accum_steps=accum_steps),
                                 shardings, mesh, compiler_options=train_compiler_options(dtype, scheduler))
        state, inputs = parallel.put_state(state, shardings), parallel.put_batch(inputs, mesh)
    else:
        step = single_device_step(model, tx, dtype, streams, accum_steps, scheduler)
    t = time.perf_counter()
    compiled = step.lower(state, inputs).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flat_p, flat_l = _flat(params), _flat(labels)
    n_tr = sum(int(np.prod(v.shape)) for k, v in flat_p.items() if flat_l[k] == peft.TRAINABLE)
    first_only = model.skip_unread_rows and model.head.reads_first_token_only
    adapter_sizes = {k: int(np.prod(v.shape)) for k, v in flat_p.items()
                     if flat_l[k] == peft.TRAINABLE and k[0] == "backbone" and method != "full"}
    n_row_adapter = sum(n for k, n in adapter_sizes.items() if first_only and _on_first_row(k, cfg.num_layers))
    n_adapter = sum(adapter_sizes.values()) - n_row_adapter
    del params, flat_p  # the state holds what the step reads (its frozen base maybe in bf16)
    adapter, _ = METHODS[method]
    extra = adapter.get("n_tokens", 0) if adapter and adapter["method"] == "prompt" else 0
    analytic = analytic_flops(cfg, batch, seq, depth=gradient_depth(labels, cfg.num_layers),
                              adapter_params=n_adapter, extra_tokens=extra, train_base=method == "full",
                              first_token_only=first_only, row_adapter_params=n_row_adapter)
    mem = compiled.memory_analysis()
    # as the training loop does after a compile; after the analyses, which training never runs
    # (their freed heap stayed resident under the steps: about +15 MiB of peak RSS, either method)
    host_memory.release_free_heap()
    # XLA's cost analysis counts a loop body once: the micro-batch scan runs it accum_steps times
    row = {"method": method, "framework": "adapters_jax", "compile_s": compile_s, "devices": devices, "streams": streams,
           "accum_steps": accum_steps, "scheduler": scheduler,
           "xla_gflop": devices * accum_steps * cost.get("flops", 0.0) / 1e9, "analytic_gflop": analytic / 1e9,
           "trainable": n_tr, "xla_step_mib": devices * step_memory_bytes(mem) / 2**20 if mem is not None else None}
    if flops_only:
        return row
    for _ in range(2):  # warm-up
        state, m = compiled(state, inputs)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, inputs)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    row.update(step_s=med, step_times=times, examples_per_s=batch / med, achieved_gflops=analytic / 1e9 / med,
               mfu=analytic / med / peak if peak else None,
               peak_rss_mib=host_memory.peak_rss_mib(),
               device_peak_mib=_device_peak_mib())
    return row


def _on_first_row(path: tuple, num_layers: int) -> bool:
    """Whether a parameter works on the first row only under `first_token_only`: anything in the
    last layer except what builds its keys and values (those still see every token)."""
    names = [str(p) for p in path]
    return (f"layer_{num_layers - 1}" in names and "encoder" in names
            and not any(n in (sites.KEY, sites.VALUE, sites.ATTN_PREFIX) for n in names))


def step_memory_bytes(mem) -> int:
    """Bytes one compiled step holds at once: its arguments, its temporaries and any outputs
    that do not reuse (alias) an argument. XLA:CPU's `peak_memory_in_bytes` counts only the
    arguments, which hid the activations (1.1 GiB of temporaries for Houlsby at 32 x 128)."""
    return (mem.argument_size_in_bytes + mem.temp_size_in_bytes
            + mem.output_size_in_bytes - mem.alias_size_in_bytes)


def _device_peak_mib():
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return stats.get("peak_bytes_in_use", 0) / 2**20 if stats else None


def _flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(dict(tree))
