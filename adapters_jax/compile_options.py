"""XLA options for forward-only programs (inference, evaluation, serving).

Why: XLA:CPU hands dots to YNNPACK and, by default, also fuses reductions and elementwise work
around them into YNNPACK fusions. In a forward pass nothing is kept for a backward, so XLA
fuses whole chains (a dot, the bias add, GELU, the next dot, the residual add and LayerNorm's
reductions, and a bottleneck adapter's small ops) into such fusions, which ran slower than
XLA's own loops. Keeping YNNPACK to dots (`forward_jit`) measured, MiniLM at 32 x 128 on the
2-core CPU, in one process, base / Houlsby r=64 forward: bf16 398 / 445 -> 384 / 397 ms
(Houlsby's overhead over the base 11.7% -> 3.5%), float32 635 / 690 -> 633 / 667 ms. In a train
step the default was faster (dots only: 1.19x slower), so train steps keep it.
Other backends ignore the option and get plain `jax.jit`.
"""
from __future__ import annotations

from typing import Callable

import jax

# the YNNPACK fusion kinds XLA:CPU may form in a forward program: dots only
FORWARD_YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_DOT"


def forward_compiler_options() -> dict:
    """Per-program XLA options for forward-only programs on the default backend ({} off CPU)."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_experimental_ynn_fusion_type": FORWARD_YNN_FUSION_TYPES}


def forward_jit(fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` with `forward_compiler_options()`: for inference and eval
    programs, never for train steps."""
    return jax.jit(fn, compiler_options=forward_compiler_options() or None, **jit_kwargs)
