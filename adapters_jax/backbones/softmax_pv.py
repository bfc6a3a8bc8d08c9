"""softmax(logits), probability dropout and the probabilities @ values matmul as one op whose
backward keeps 3 bytes per attention score in bf16 (5 in float32).

Why: autodiff of the three steps keeps the float32 probabilities for the softmax backward
(4 bytes per score), the dropped bf16 probabilities for dV (2) and the keep mask (1), and on
XLA:CPU also a float32 copy of the dropped probabilities (4): at MiniLM 32 x 128 that is about
48 MiB per layer, the largest activation in a frozen-base backward. This op keeps the bf16
probabilities and the keep mask (18 MiB per layer) and rebuilds the rest in the backward:
    P_drop = keep * P / (1 - rate);  dV = P_drop^T g;  dP_drop = g V^T;
    dP = keep * dP_drop / (1 - rate);  dlogits = P * (dP - sum_s(dP * P)).
The price is the bf16 rounding of P inside the softmax backward (relative 2^-9 per score), the
same rounding the forward already gives P before the PV matmul. Measured at MiniLM 32 x 128
bf16 on the 2-core CPU, with `grad_barrier.not_before` (on P and V): Houlsby step memory
696 -> 503 MiB, full fine-tuning 994 -> 769 MiB, and both steps faster (less memory traffic).
With `dot_dtype=float32` the probabilities are kept in float32 and nothing is rounded: autodiff
kept P, P_drop, the keep mask and XLA:CPU's copies (see attention._attend_canonical).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from adapters_jax.backbones.grad_barrier import not_before
from adapters_jax.backbones.mixed_dense import bdot_f32, materialized_transpose


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def softmax_dropout_pv(logits: jnp.ndarray, keep: Optional[jnp.ndarray], v: jnp.ndarray,
                       rate: float, dot_dtype=jnp.bfloat16) -> jnp.ndarray:
    """logits [B, H, T, S] float32 (scaled and masked), keep bool [B, H, T, S] (None: no
    dropout), v [B, H, S, Dh] -> softmax(logits) with dropout at `rate`, @ v: [B, H, T, Dh]
    float32, with `dot_dtype` (bf16 or float32) inputs to the matmuls and float32 accumulation."""
    return _fwd(logits, keep, v, rate, dot_dtype)[0]


def dropped(p, keep, rate, dot_dtype):
    """[B, H, T, S] probabilities -> the dropped, rescaled probabilities in `dot_dtype`."""
    p = p.astype(jnp.float32)
    if keep is not None:
        p = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
    return p.astype(dot_dtype)


def _fwd(logits, keep, v, rate, dot_dtype):
    p = jax.nn.softmax(logits, axis=-1)  # [B, H, T, S] float32
    vd = v.astype(dot_dtype)
    out = bdot_f32(dropped(p, keep, rate, dot_dtype), vd)  # [B, H, T, Dh]
    return out, (p.astype(dot_dtype), keep, vd, jnp.zeros((0,), v.dtype))


def _bwd(rate, dot_dtype, res, g):
    pb, keep, vb, v_like = res  # P and V in dot_dtype
    pb, vb = not_before(pb, g, 2), not_before(vb, g, 2)  # see grad_barrier.not_before
    dlogits, dvt = backward_from_probs(pb.astype(jnp.float32), keep, vb, g.astype(dot_dtype), rate, dot_dtype)
    return dlogits, None, materialized_transpose(dvt).astype(v_like.dtype)


def backward_from_probs(p, keep, vd, gd, rate, dot_dtype):
    """The backward of softmax, dropout and PV from the probabilities p [B, H, T, S] float32,
    the keep mask (or None), vd [B, H, S, Dh] and the cotangent gd [B, H, T, Dh] (both in
    dot_dtype) -> (dlogits [B, H, T, S], dV^T [B, H, Dh, S]), float32. Shared with
    recompute_attention, which rebuilds p instead of keeping it."""
    # dV^T = g^T P_drop: P_drop is the right-hand operand as it is ([.., T, S]), so no transposed
    # copy of it is written. dV^T is transposed back by the caller, written out: XLA folds a plain
    # transpose into the dot, and that non-canonical bf16 dot has no XLA:CPU kernel (a runtime error)
    dvt = bdot_f32(materialized_transpose(gd), dropped(p, keep, rate, dot_dtype))  # [B, H, Dh, S]
    dp = bdot_f32(gd, materialized_transpose(vd))  # [B, H, T, S] float32
    if keep is not None:
        dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
    return p * (dp - (dp * p).sum(-1, keepdims=True)), dvt


softmax_dropout_pv.defvjp(_fwd, _bwd)
