"""Training attention whose backward keeps no score-sized array: it recomputes the logits from Q
and K, the probabilities from each query's softmax max and sum, and the dropout keep mask from its
random key (FlashAttention's recomputation, as plain XLA ops on XLA:CPU).

Why: `softmax_pv` keeps the probabilities (bf16: 2 bytes per score, float32: 4) and the keep mask
(1 byte). At MiniLM 32 x 128 that is 19-31 MiB per layer; the scores grow with T^2, so at long
sequences they are most of a frozen-base backward's memory. This op keeps Q, K, V (which the
backward reads anyway) and each query row's softmax max and sum ([B, H, T, 1]). The price is one more QK^T dot, an exp
and the keep-mask hash per layer in the backward.

    forward:  L = scale * Q K^T (masked), m = max_s(L), z = sum_s(exp(L - m)),
              P = exp(L - m) / z, O = (keep * P / (1 - rate)) V
    backward: the same L and P again, then dV = P_drop^T g, dP = keep * (g V^T) / (1 - rate),
              dL = P * (dP - sum_s(dP * P)), dQ = scale * dL K, dK^T = scale * Q^T dL.

Every dot is canonical ([.., M, K] @ [.., K, N], float32 accumulation) in `dot_dtype`, as in
`mixed_dense`. `not_before` makes the recomputation depend on the cotangent: otherwise XLA's CSE
merges it with the forward's and keeps the forward's logits, probabilities and mask alive.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from adapters_jax.backbones.grad_barrier import not_before
from adapters_jax.backbones.mixed_dense import bdot_f32, materialized_transpose
from adapters_jax.backbones.softmax_pv import backward_from_probs, dropped
from adapters_jax.dropout import keep_mask


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def attention_recompute(qh: jnp.ndarray, kt: jnp.ndarray, vh: jnp.ndarray, mask: jnp.ndarray,
                        rng, rate: float, scale: float, dot_dtype) -> jnp.ndarray:
    """qh [B, H, T, Dh], kt [B, H, Dh, S], vh [B, H, S, Dh], mask bool [B, 1, T, S] (True: may
    attend), rng: the dropout key (unused when rate is 0) -> softmax attention with probability
    dropout at `rate`: [B, H, T, Dh] float32. Dots take `dot_dtype` (bf16 or float32) inputs."""
    return _fwd(qh, kt, vh, mask, rng, rate, scale, dot_dtype)[0]


def _logits(qd, ktd, mask, scale):
    logits = bdot_f32(qd, ktd) * scale  # [B, H, T, S] float32
    return jnp.where(mask, logits, jnp.finfo(jnp.float32).min)


def _keep(rng, shape, rate):
    return keep_mask(rng, shape, 1.0 - rate) if rate > 0.0 else None


def _fwd(qh, kt, vh, mask, rng, rate, scale, dot_dtype):
    qd, ktd, vd = qh.astype(dot_dtype), kt.astype(dot_dtype), vh.astype(dot_dtype)
    logits = _logits(qd, ktd, mask, scale)
    m = logits.max(-1, keepdims=True)  # [B, H, T, 1]
    e = jnp.exp(logits - m)
    s = e.sum(-1, keepdims=True)
    p = e / s
    out = bdot_f32(dropped(p, _keep(rng, logits.shape, rate), rate, dot_dtype), vd)  # [B, H, T, Dh]
    likes = tuple(jnp.zeros((0,), a.dtype) for a in (qh, kt, vh))
    # m and s, not m + log(s): a fully masked row (L = float32 min everywhere) would lose log(S)
    return out, (qd, ktd, vd, mask, rng, m, s, likes)


def _bwd(rate, scale, dot_dtype, res, g):
    qd, ktd, vd, mask, rng, m, s, (q_like, k_like, v_like) = res
    # see the module docstring: recomputed after the cotangent exists, not merged with the forward
    qd, ktd, vd, m, s = (not_before(a, g, 2) for a in (qd, ktd, vd, m, s))
    if rate > 0.0:
        rng = _not_before_key(rng, g)
    logits = _logits(qd, ktd, mask, scale)
    p = jnp.exp(logits - m) / s  # [B, H, T, S] float32, exactly the forward's
    dlogits, dvt = backward_from_probs(p, _keep(rng, p.shape, rate), vd, g.astype(dot_dtype), rate, dot_dtype)
    # masked logits are constants: no gradient (p = 0 there, except in a fully masked row)
    dlogits = jnp.where(mask, dlogits * scale, 0.0).astype(dot_dtype)  # [B, H, T, S]
    dq = bdot_f32(dlogits, materialized_transpose(ktd))  # [B, H, T, Dh]
    dkt = bdot_f32(materialized_transpose(qd), dlogits)  # [B, H, Dh, S]
    return (dq.astype(q_like.dtype), dkt.astype(k_like.dtype),
            materialized_transpose(dvt).astype(v_like.dtype), None, None)


def _not_before_key(rng, g):
    """The dropout key, made to depend on g (see not_before), raw or typed."""
    zero = (g.reshape(-1)[0] * 0).astype(jnp.uint32)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jax.random.key_data(rng) + zero, impl=jax.random.key_impl(rng))
    return rng + zero


attention_recompute.defvjp(_fwd, _bwd)
