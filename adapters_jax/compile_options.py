"""Per-program XLA:CPU options for forward-only programs and for train steps.

Why, forward programs: XLA:CPU hands dots to YNNPACK and, by default, also fuses reductions and
elementwise work around them into YNNPACK fusions. In a forward pass nothing is kept for a
backward, so XLA fuses whole chains (a dot, the bias add, GELU, the next dot, the residual add
and LayerNorm's reductions, and a bottleneck adapter's small ops) into such fusions, which ran
slower than XLA's own loops. Keeping YNNPACK to dots (`forward_jit`) measured, MiniLM at 32 x 128
on a 2-core CPU, in one process, base / Houlsby r=64 forward: bf16 398 / 445 -> 384 / 397 ms,
float32 635 / 690 -> 633 / 667 ms. In a train step that default was faster (dots only: 1.19x
slower), so train steps keep it.

Why, oneDNN for float32 dots: on the 2-core AVX2 EPYC, XLA's batched attention dots ran at 24-57
GFLOP/s where PyTorch's oneDNN reached 75-95. Handing every float32 dot (dense and batched) to
oneDNN's library fusions measured, in one process: Houlsby r=64 train step 1.944 -> 1.637 s,
full fine-tuning 3.204 -> 2.559 s, float32 forward at 32 x 128 base / Houlsby 878 / 929 -> 726 /
797 ms; batch 1 and bf16 programs were unchanged or slower (bf16 forward +2-4%), so bf16 keeps
the default. At 32 x 32 and 32 x 64 the train step gained only 4% and 2%.
It is opt-in (`ADAPTERS_JAX_CPU_ONEDNN=1`; default off) for two reasons. XLA's oneDNN fusions
are experimental, and in this jaxlib (0.10.2) isolated batched float32 dots such as
[b, 384, 1024] @ [b, 1024, 64] hung for several b and once aborted with "double free or
corruption" (2-core EPYC; the MiniLM train and forward programs ran hundreds of steps without
a fault, but an arbitrary model's dots are not those). And XLA cannot write a program with
oneDNN fusions to JAX's persistent compilation cache ("ToProto is not implemented for thunk
kind: onednn-fusion"): on the default bucketed Rotten Tomatoes run (1 epoch) the lost cache cost
more than the dots gained, 194 s warm without oneDNN against 202-212 s with it.
x86-64 only (XLA's oneDNN build). Other backends ignore all of this and get plain `jax.jit`.
"""
from __future__ import annotations

import os
import platform
from typing import Any, Callable

import jax
import jax.numpy as jnp

# the library fusion kinds that hold dots alone: YNNPACK's in a forward program, oneDNN's for float32
DOT_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT"
ONEDNN_ENV = "ADAPTERS_JAX_CPU_ONEDNN"  # "1": float32 dots in oneDNN (experimental); "0" or unset: off


def onednn_enabled() -> bool:
    """Whether float32 CPU programs hand their dots to oneDNN (opt-in: see the module docstring)."""
    setting = os.environ.get(ONEDNN_ENV, "0")
    if setting not in ("0", "1"):
        raise ValueError(f"{ONEDNN_ENV}={setting!r} must be '1' (oneDNN dots) or '0' (XLA's default)")
    return setting == "1"


def onednn_available() -> bool:
    """XLA:CPU ships oneDNN on x86-64 only."""
    return jax.default_backend() == "cpu" and platform.machine().lower() in ("x86_64", "amd64")


def onednn_dot_options(dtype: Any) -> dict:
    """XLA:CPU options that run a program's dots in oneDNN: float32 programs on x86-64, else {}."""
    if not onednn_available() or jnp.dtype(dtype) != jnp.float32 or not onednn_enabled():
        return {}
    return {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": DOT_FUSION_TYPES}


def describe(dtype: Any) -> str:
    """One line for run logs: which library runs this run's dots on CPU."""
    if jax.default_backend() != "cpu":
        return f"dots: {jax.default_backend()} backend"
    lib = "oneDNN (experimental)" if onednn_dot_options(dtype) else "XLA's default (YNNPACK/Eigen)"
    return f"CPU dots ({jnp.dtype(dtype).name}): {lib}, {ONEDNN_ENV}={os.environ.get(ONEDNN_ENV, '0')}"


def forward_compiler_options(dtype: Any) -> dict:
    """Options for a forward-only program computing in `dtype` ({} off CPU)."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": DOT_FUSION_TYPES, **onednn_dot_options(dtype)}


# train.cpu_scheduler -> XLA:CPU's instruction scheduler for train steps
SCHEDULERS = {"default": None, "memory": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def check_scheduler(name: str, field: str = "train.cpu_scheduler") -> str:
    if name not in SCHEDULERS:
        raise ValueError(f"{field}={name!r} is not one of {list(SCHEDULERS)}")
    return name


def train_compiler_options(dtype: Any, scheduler: str = "default") -> dict:
    """Options for a train step computing in `dtype` ({} off CPU and for bf16 with the default
    scheduler). scheduler 'memory': XLA:CPU orders the step's ops to hold fewer activations at
    once (same ops, same numbers). With train.streams > 1 it runs one stream's forward and
    backward before the next instead of side by side; measured at 32 x 128 (2 streams, float32):
    MiniLM Houlsby XLA step memory 597 -> 401 MiB for +10% step time, full 1063 -> 889 MiB for
    +6%; BERT-base Houlsby 2437 -> 1661 MiB, full 4196 -> 3957 MiB, for no measured step time
    (README, Performance)."""
    options = onednn_dot_options(dtype)
    kind = SCHEDULERS[check_scheduler(scheduler)]
    if kind and jax.default_backend() == "cpu":
        options = {**options, "xla_cpu_scheduler_type": kind}
    return options


def forward_jit(fn: Callable, *, dtype: Any, **jit_kwargs) -> Callable:
    """`jax.jit` with `forward_compiler_options(dtype)`: inference and eval, never train steps."""
    return jax.jit(fn, compiler_options=forward_compiler_options(dtype) or None, **jit_kwargs)


def train_jit(fn: Callable, *, dtype: Any, scheduler: str = "default", **jit_kwargs) -> Callable:
    """`jax.jit` with `train_compiler_options(dtype, scheduler)`: for train steps."""
    return jax.jit(fn, compiler_options=train_compiler_options(dtype, scheduler) or None, **jit_kwargs)
