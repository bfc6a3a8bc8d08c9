"""Scaled dot-product attention shared by the backbones, with optional prefixes (prefix tuning).

On XLA:CPU, with one key/value head per query head, training and inference run attention as
canonical batched dots (`_attend_canonical`, `_infer_canonical`). Elsewhere inference uses
`jax.nn.dot_product_attention` (XLA's fused path) and training an explicit softmax, so that
dropout can be applied to the probabilities as BERT does.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapters_jax.backbones import sites
from adapters_jax.backbones.mixed_dense import (bdot_f32, float32_bmm, materialized_permute, mixed_bmm,
                                                use_cpu_bf16_kernels)
from adapters_jax.backbones.recompute_attention import attention_recompute
from adapters_jax.backbones.softmax_pv import softmax_dropout_pv
from adapters_jax.dropout import keep_mask


def build_mask(query_len: int, key_mask: jnp.ndarray, causal: bool, n_prefix: int = 0) -> jnp.ndarray:
    """Boolean attention mask [B, 1, Tq, P+Tk]: True where a query may attend a key.

    Args:
      query_len: Tq.
      key_mask: [B, Tk] 1 for real tokens, 0 for padding; or a pair mask [B, 1, T, Tk] (packed rows:
        `segment_mask`), of which the first Tq query rows are used.
      causal: also hide keys that come after the query (decoders).
      n_prefix: P prefix keys that every query sees (prefix tuning).
    """
    if key_mask.ndim == 4:
        mask = key_mask.astype(bool)[:, :, :query_len]  # [B, 1, Tq, Tk]
    else:
        mask = key_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, Tk]
    b, tk = mask.shape[0], mask.shape[-1]
    if causal:
        offset = tk - query_len  # > 0 when a cache of earlier keys precedes the queries
        q_pos = jnp.arange(query_len)[:, None] + offset
        allowed = jnp.arange(tk)[None, :] <= q_pos  # [Tq, Tk]
        mask = mask & allowed[None, None]
    mask = jnp.broadcast_to(mask, (b, 1, query_len, tk))
    if n_prefix:
        mask = jnp.concatenate([jnp.ones((b, 1, query_len, n_prefix), bool), mask], axis=-1)
    return mask


def take_rows(x: jnp.ndarray, rows) -> jnp.ndarray:
    """x [B, T, ...] at `rows`: None (all), an int n (the first n) or positions [B, Tq]."""
    if rows is None:
        return x
    if isinstance(rows, int):
        return x[:, :rows]
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


def segment_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Pair mask [B, 1, T, T] of packed rows (segment_ids [B, T], 0 on padding): a token attends
    the tokens of its own example only; padding attends padding, so no query row is empty."""
    return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


def segment_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, T] each token's position inside its packed example (segment_ids [B, T], examples
    contiguous): the index minus that of the segment's first token."""
    t = jnp.arange(segment_ids.shape[1])
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)  # [B, T] a segment starts
    start = jax.lax.cummax(jnp.where(first, t, 0), axis=1)  # [B, T] its start
    return t - start


def packed_decoder_inputs(segment_ids: jnp.ndarray, position_ids, has_prompt: bool) -> tuple:
    """(pair mask [B, 1, T, T], positions [B, T]) for a decoder on packed rows: attention adds the
    causal part to the pair mask, and positions restart at each example's first token."""
    if position_ids is not None or has_prompt:
        raise ValueError("packed rows (segment_ids) set their own positions and take no prompt tokens")
    return segment_mask(segment_ids), segment_positions(segment_ids)


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray,
           dropout_rate: float, deterministic: bool, module: nn.Module,
           bias: Optional[jnp.ndarray] = None, scale: Optional[float] = None) -> jnp.ndarray:
    """Multi-head attention with grouped-query support.

    Args:
      q: [B, T, H, Dh]; k, v: [B, S, Hkv, Dh] with H a multiple of Hkv.
      mask: bool [B, 1, T, S].
      module: the calling module, whose 'dropout' rng stream feeds attention dropout.
      bias: optional additive logits bias [B or 1, H, T, S] (T5's relative positions).
      scale: logits scale; None means Dh**-0.5 (T5 uses 1.0: its init absorbs the scale).
    Returns:
      [B, T, H, Dh]
    """
    b, t, h, dh = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    canonical = g == 1 and (use_cpu_bf16_kernels(q.dtype) or _cpu_float32(q.dtype))
    if deterministic:
        if canonical:
            return _infer_canonical(q, k, v, mask, bias, dh ** -0.5 if scale is None else scale)
        # elsewhere the fused op (on XLA:CPU in float32 its forward was faster than the explicit
        # einsums, 45.7 vs 66.6 ms at 32 x 128 x 12 heads, but slower than _infer_canonical; the
        # einsums have the faster float32 gradient, 76.4 vs 102.6 ms)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    scale = dh ** -0.5 if scale is None else scale
    if canonical:
        return _attend_canonical(q, k, v, mask, dropout_rate, module, bias, scale)
    if g == 1:
        logits = jnp.einsum("bthd,bshd->bhts", q, k)  # [B, H, T, S]
    else:  # grouped-query attention: G = H / Hkv query heads per key/value head. Keys and values
        # are read in place; a repeat would be saved for the backward (2 (H - Hkv) Dh per token)
        logits = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, hkv, g, dh), k).reshape(b, h, t, s)
    probs = _dropped_probs(logits.astype(jnp.float32) * scale, mask, bias, dropout_rate, module).astype(v.dtype)
    if g == 1:
        return jnp.einsum("bhts,bshd->bthd", probs, v)  # [B, T, H, Dh]
    probs = probs.reshape(b, hkv, g, t, s)  # [B, Hkv, G, T, S]
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)


def _dropped_probs(logits, mask, bias, dropout_rate, module):
    """Float32 logits [B, H, T, S] (already scaled) -> masked softmax with probability dropout."""
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    if dropout_rate > 0.0:
        keep = keep_mask(module.make_rng("dropout"), probs.shape, 1.0 - dropout_rate)  # [B, H, T, S]
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return probs


def _attend_canonical(q, k, v, mask, dropout_rate, module, bias, scale):
    """Training attention on XLA:CPU as canonical batched dots with float32 accumulation (in bf16:
    its fast bf16 kernels, forward and backward); softmax and dropout in float32, with the lean
    backward of `softmax_dropout_pv`, which keeps the probabilities and the keep mask only.
    In float32 too: autodiff of the einsum path kept the probabilities twice (before and after
    dropout) and the unnormalised exponentials. Measured at MiniLM 32 x 128 float32 on a 2-core
    EPYC: XLA step memory Houlsby 882 -> 760 MiB, full 1372 -> 1228 MiB, step time within noise.
    With set_training_backward('recompute') nothing score-sized is kept (recompute_attention).
    Same shapes and semantics as `attend`'s general path with one key/value head per query head."""
    dot_dtype = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
    bmm = mixed_bmm if dot_dtype == jnp.bfloat16 else float32_bmm
    qh = materialized_permute(q, (0, 2, 1, 3))  # [B, H, T, Dh]
    kt = materialized_permute(k, (0, 2, 3, 1))  # [B, H, Dh, S]
    vh = materialized_permute(v, (0, 2, 1, 3))  # [B, H, S, Dh]
    if bias is None and _BACKWARD[0] == "recompute":
        rng = module.make_rng("dropout") if dropout_rate > 0.0 else None
        out = attention_recompute(qh, kt, vh, mask, rng, dropout_rate, scale, dot_dtype)  # [B, H, T, Dh]
        return materialized_permute(out, (0, 2, 1, 3)).astype(v.dtype)
    logits = bmm(qh, kt) * scale  # [B, H, T, S] float32
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    keep = (keep_mask(module.make_rng("dropout"), logits.shape, 1.0 - dropout_rate)
            if dropout_rate > 0.0 else None)  # [B, H, T, S]
    out = softmax_dropout_pv(logits, keep, vh, dropout_rate, dot_dtype)  # [B, H, T, Dh] float32
    # written out, so that its cotangent reaches the backward dots in a layout they take as bf16
    return materialized_permute(out, (0, 2, 1, 3)).astype(v.dtype)  # [B, T, H, Dh]


BACKWARDS = ("keep", "recompute")
_BACKWARD = ["keep"]  # read when a step is traced; set_training_backward changes later traces


def set_training_backward(name: str) -> str:
    """What training attention on XLA:CPU keeps for its backward; returns the previous setting.

    'keep' (default): the probabilities and the keep mask (`softmax_pv`; 3 bytes per score in
    bf16, 5 in float32), the faster choice at MiniLM 32 x 128. 'recompute': nothing score-sized;
    the backward recomputes them from Q and K (`recompute_attention`), for long sequences, where
    the scores grow with T^2. T5's biased attention and grouped-query heads keep their paths."""
    if name not in BACKWARDS:
        raise ValueError(f"attention backward {name!r} is not one of {list(BACKWARDS)}")
    previous, _BACKWARD[0] = _BACKWARD[0], name
    return previous


def _cpu_float32(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu"


def _infer_canonical(q, k, v, mask, bias, scale):
    """Inference attention on XLA:CPU as canonical batched dots (in bf16: its fast bf16 kernels),
    with the softmax normalised after the PV product: the division runs over [B, H, T, Dh]
    instead of the [B, H, T, S] scores. In a profile, `jax.nn.dot_product_attention`'s bf16
    forward wrote a transposed float32 copy of every score and ran its dots in a fusion with
    converts. Measured at MiniLM 32 x 128 with `compile_options.forward_jit`: bf16, one layer
    29.1 -> 15.2 ms and the whole forward 388 -> 335 ms; float32, the whole forward
    487 -> 468 and 493 -> 455 ms (two runs, in-process alternation).
    q [B, T, H, Dh] (bf16 or float32), k, v [B, S, H, Dh], mask bool [B, 1, T, S] -> [B, T, H, Dh]."""
    dot_dtype = jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32
    qh = materialized_permute(q, (0, 2, 1, 3))  # [B, H, T, Dh]
    kt = materialized_permute(k, (0, 2, 3, 1))  # [B, H, Dh, S]
    vh = materialized_permute(v, (0, 2, 1, 3))  # [B, H, S, Dh]
    logits = bdot_f32(qh.astype(dot_dtype), kt.astype(dot_dtype)) * scale  # [B, H, T, S] float32
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    e = jnp.exp(logits - logits.max(-1, keepdims=True))  # [B, H, T, S]; a fully masked row is uniform
    out = bdot_f32(e.astype(dot_dtype), vh.astype(dot_dtype)) / e.sum(-1, keepdims=True)  # [B, H, T, Dh]
    return materialized_permute(out, (0, 2, 1, 3)).astype(v.dtype)  # [B, T, H, Dh]


def with_prefix(k: jnp.ndarray, v: jnp.ndarray, prefix: Optional[tuple]) -> tuple:
    """Prepends prefix keys/values ([B, P, Hkv, Dh] each) to k, v ([B, S, Hkv, Dh])."""
    if prefix is None:
        return k, v, 0
    pk, pv = prefix
    return (jnp.concatenate([pk.astype(k.dtype), k], axis=1),
            jnp.concatenate([pv.astype(v.dtype), v], axis=1), pk.shape[1])


def self_attention(module: nn.Module, x: jnp.ndarray, key_mask: jnp.ndarray, dense, *, num_heads: int,
                   head_dim: int, num_kv_heads: Optional[int] = None, causal: bool, dropout_rate: float,
                   deterministic: bool, rotate=None, scale: Optional[float] = None,
                   query_rows: Optional[int] = None) -> jnp.ndarray:
    """The self-attention every backbone shares, with its adapter sites: query/key/value dense
    sites, the prefix site (prefix keys are not rotated) and grouped-query heads.

    Args:
      module: the calling attention module (its filler and layer pick the prefix site; its
        'dropout' stream feeds attention dropout).
      x: [B, T, D]; key_mask: [B, T] 1 for real tokens.
      dense: (site, features) -> a dense site of the backbone, called as `(x)` (the backbone binds
        its bias, init and the per-call adapter context, which per-row LoRA/IA3 sites read).
      rotate: optional [B, T, H, Dh] -> same (Llama's RoPE), applied to queries and keys.
      query_rows: only these positions ask: an int (the first `query_rows`, Tq = query_rows) or
        positions [B, Tq] (packed rows: each example's first token). Every key and value is still
        computed, but the query projection, the scores and the context cover only those rows. For
        an encoder's last layer when the head reads only the first token.
    Returns:
      the attention context [B, Tq, H * Dh] (Tq = T unless query_rows), before the output projection.
    """
    b, t, _ = x.shape
    hkv = num_kv_heads or num_heads
    if query_rows is not None and (causal or rotate is not None):
        raise ValueError("query_rows is for non-causal attention without rotary positions")
    xq = take_rows(x, query_rows)  # [B, Tq, D]
    tq = xq.shape[1]
    if key_mask.ndim == 4 and query_rows is not None:  # a pair mask keeps the rows that ask
        key_mask = take_rows(key_mask[:, 0], query_rows)[:, None]  # [B, 1, Tq, T]
    q = dense(sites.QUERY, num_heads * head_dim)(xq).reshape(b, tq, num_heads, head_dim)  # [B, Tq, H, Dh]
    k = dense(sites.KEY, hkv * head_dim)(x).reshape(b, t, hkv, head_dim)  # [B, T, Hkv, Dh]
    v = dense(sites.VALUE, hkv * head_dim)(x).reshape(b, t, hkv, head_dim)
    if rotate is not None:
        q, k = rotate(q), rotate(k)
    prefix_factory = sites.lookup(module.filler, sites.ATTN_PREFIX, module.layer)
    prefix = None if prefix_factory is None else prefix_factory(name=sites.ATTN_PREFIX)(b)
    k, v, n_prefix = with_prefix(k, v, prefix)
    mask = build_mask(tq, key_mask, causal=causal, n_prefix=n_prefix)  # [B, 1, Tq, P+T]
    ctx = attend(q, k, v, mask, dropout_rate, deterministic, module, scale=scale)  # [B, Tq, H, Dh]
    return ctx.reshape(b, tq, num_heads * head_dim)
