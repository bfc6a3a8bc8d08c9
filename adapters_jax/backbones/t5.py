"""T5 (original and v1.1) encoder-decoder in Flax linen, with named adapter sites.

Pre-norm blocks with T5's RMS-style LayerNorm (no mean, no bias), relative position biases
(bidirectional buckets in the encoder, causal ones in the decoder; only layer 0 of each
stack owns the table, later layers reuse its bias), unscaled attention, a ReLU or gated
FFN (v1.1 `gated-gelu`), and a tied head (scaled by d_model**-0.5, as HF does) or an
untied one, so that converted T5ForConditionalGeneration weights reproduce its logits.

**Layer numbering for adapter specs** (AdapterHub's for T5): encoder blocks are layers
0..L-1 and decoder blocks are layers L..L+Ld-1, with L = num_layers and Ld =
num_decoder_layers; `config.total_layers` is L+Ld. Parameter paths carry the same number:
`encoder/layer_1/...`, `decoder/layer_2/...` (the first decoder block when L = 2), so that
`spec.layers="2-3"` puts adapters in the decoder only and `adapter_drop=k` drops the first k
encoder blocks.

Sites per block: `attn_adapter` (after self-attention), `cross_attn_adapter` (decoder
blocks only, after cross-attention), `ffn_adapter`; the dense sites query/key/value/attn_out
in self- *and* cross-attention (as PEFT's `target_modules=["q", "v"]` hits both), ffn_in,
ffn_gate (gated FFNs only: wi_0 is the gate, wi_1 is ffn_in) and ffn_out; `prefix` in
self-attention (prefix keys get a zero position bias); `prompt` before the encoder.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapters_jax.backbones import sites
from adapters_jax.backbones.attention import attend, build_mask, with_prefix
from adapters_jax.backbones.bert import ACTIVATIONS
from adapters_jax.backbones.llama import RMSNorm  # T5LayerNorm is exactly RMSNorm with a scale
from adapters_jax.dropout import Dropout
from adapters_jax.param import param

IGNORE_INDEX = -100  # label value that the loss skips, as in HF


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 model (field names follow our code; HF's in comments)."""
    vocab_size: int = 32128
    hidden_size: int = 512          # d_model
    num_layers: int = 6             # encoder blocks
    num_decoder_layers: Optional[int] = None  # None: num_layers
    num_heads: int = 8
    head_dim: int = 64              # d_kv (need not be hidden_size // num_heads)
    intermediate_size: int = 2048   # d_ff
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    dropout_rate: float = 0.1
    hidden_act: str = "relu"        # dense_act_fn
    gated: bool = False             # feed_forward_proj "gated-*"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    initializer_factor: float = 1.0
    model_type: str = "t5"

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def total_layers(self) -> int:
        """Layers an adapter spec can address: encoder 0..L-1, then decoder L..L+Ld-1."""
        return self.num_layers + self.num_decoder_layers

    @classmethod
    def from_hf(cls, hf: dict) -> "T5Config":
        """From a Hugging Face config.json dict (model_type t5); parses feed_forward_proj as HF does."""
        model_type = hf.get("model_type", "t5")
        if model_type != "t5":
            raise ValueError(f"config.json: model_type={model_type!r} is not a T5 model")
        proj = hf.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        gated = parts[0] == "gated"
        if len(parts) > 2 or (len(parts) == 2 and not gated):
            raise ValueError(f"config.json: feed_forward_proj={proj!r} is not 'ACT' or 'gated-ACT'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # HF's backward-compatible rule
        pad = 0 if hf.get("pad_token_id") is None else hf["pad_token_id"]
        start = hf.get("decoder_start_token_id")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["d_model"], num_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers"), num_heads=hf["num_heads"],
            head_dim=hf["d_kv"], intermediate_size=hf["d_ff"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6), dropout_rate=hf.get("dropout_rate", 0.1),
            hidden_act=act, gated=gated, tie_word_embeddings=hf.get("tie_word_embeddings", True),
            pad_token_id=pad, eos_token_id=hf.get("eos_token_id", 1),
            decoder_start_token_id=pad if start is None else start,  # T5 starts from the pad id
            initializer_factor=hf.get("initializer_factor", 1.0), model_type=model_type)


def relative_position_bucket(rel: jnp.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jnp.ndarray:
    """HF's T5 bucketing of rel = key_pos - query_pos (ints): exact buckets for small
    distances, log-spaced up to max_distance; the same float32 ops so buckets agree."""
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = (rel > 0).astype(rel.dtype) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)  # future keys fall into bucket 0 (they are masked anyway)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    ratio = jnp.maximum(rel, 1).astype(jnp.float32) / max_exact  # max(.,1): no log(0) (unused there)
    large = max_exact + (jnp.log(ratio) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(rel.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


class RelativeBias(nn.Module):
    """The table [num_buckets, H] owned by layer 0 of a stack -> bias [1, H, T, S]."""
    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_len: int, key_len: int):
        c = self.config
        rel = jnp.arange(key_len)[None, :] - jnp.arange(query_len)[:, None]  # [T, S]
        bucket = relative_position_bucket(rel, self.bidirectional, c.relative_attention_num_buckets,
                                          c.relative_attention_max_distance)
        table = param(self, "embedding", nn.initializers.normal(c.initializer_factor * c.hidden_size ** -0.5),
                           (c.relative_attention_num_buckets, c.num_heads), jnp.float32)
        return jnp.transpose(table[bucket], (2, 0, 1))[None]  # [T, S, H] -> [1, H, T, S]


class T5Attention(nn.Module):
    """Self- or cross-attention (no bias terms, no 1/sqrt(Dh) scaling)."""
    config: T5Config
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32
    causal: bool = False
    cross: bool = False
    owns_bias: bool = False  # layer 0's self-attention holds the relative position table

    @nn.compact
    def __call__(self, x, kv, key_mask, position_bias, deterministic: bool, ctx=None):
        """x [B, T, D] queries; kv [B, S, D] keys/values source; position_bias [1, H, T, S] or None;
        ctx: the per-call adapter context for the dense sites."""
        c = self.config
        b, t, _ = x.shape
        h, dh = c.num_heads, c.head_dim
        std = c.initializer_factor * c.hidden_size ** -0.5
        dense = lambda site, feats: sites.dense(self.filler, site, self.layer, ctx, features=feats, use_bias=False,
                                                dtype=self.dtype, kernel_init=nn.initializers.normal(std),
                                                name=site)
        q = dense(sites.QUERY, h * dh)(x).reshape(b, t, h, dh)  # [B, T, H, Dh]
        k = dense(sites.KEY, h * dh)(kv).reshape(b, kv.shape[1], h, dh)  # [B, S, H, Dh]
        v = dense(sites.VALUE, h * dh)(kv).reshape(b, kv.shape[1], h, dh)
        if self.owns_bias:
            position_bias = RelativeBias(c, not self.causal, name="relative_attention_bias")(t, kv.shape[1])
        bias, n_prefix = position_bias, 0
        if not self.cross:
            factory = sites.lookup(self.filler, sites.ATTN_PREFIX, self.layer)
            k, v, n_prefix = with_prefix(k, v, None if factory is None else factory(name=sites.ATTN_PREFIX)(b))
            if n_prefix and bias is not None:  # prefix keys have no position: zero bias
                bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (n_prefix, 0)))
        mask = build_mask(t, key_mask, causal=self.causal, n_prefix=n_prefix)  # [B, 1, T, P+S]
        if bias is not None:
            bias = bias.astype(q.dtype)
        heads = attend(q, k, v, mask, c.dropout_rate, deterministic, self, bias=bias, scale=1.0)
        return dense(sites.ATTN_OUT, c.hidden_size)(heads.reshape(b, t, h * dh)), position_bias


class T5Block(nn.Module):
    """x + self-attn [attn site] (+ cross-attn [cross site] in the decoder) + FFN [ffn site]."""
    config: T5Config
    layer: int
    decoder: bool = False
    first: bool = False
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, position_bias, enc, enc_mask, deterministic: bool, ctx=None):
        c, det = self.config, deterministic
        drop = lambda y: Dropout(c.dropout_rate)(y, deterministic=det)
        norm = lambda name: RMSNorm(c.layer_norm_eps, self.dtype, name=name)
        act = lambda site, out, res: sites.activation(self.filler, site, self.layer, out, res, None, det, ctx)
        a = norm("attention_norm")(x)
        a, position_bias = T5Attention(c, self.layer, self.filler, self.dtype, causal=self.decoder,
                                       owns_bias=self.first, name="self_attention")(a, a, mask, position_bias, det, ctx)
        h = act(sites.ATTN_OUTPUT, drop(a), x)  # [B, T, D]
        if self.decoder:
            y = norm("cross_attention_norm")(h)
            y, _ = T5Attention(c, self.layer, self.filler, self.dtype, cross=True,
                               name="cross_attention")(y, enc, enc_mask, None, det, ctx)
            h = act(sites.CROSS_ATTN_OUTPUT, drop(y), h)
        std = c.initializer_factor * c.hidden_size ** -0.5
        dense = lambda site, feats: sites.dense(self.filler, site, self.layer, ctx, features=feats, use_bias=False,
                                                dtype=self.dtype, kernel_init=nn.initializers.normal(std),
                                                name=site)
        y = norm("ffn_norm")(h)
        up = ACTIVATIONS[c.hidden_act](dense(sites.FFN_GATE if c.gated else sites.FFN_IN, c.intermediate_size)(y))
        if c.gated:  # v1.1: act(wi_0 y) * wi_1 y
            up = up * dense(sites.FFN_IN, c.intermediate_size)(y)  # [B, T, F]
        y = dense(sites.FFN_OUT, c.hidden_size)(drop(up))
        return act(sites.FFN_OUTPUT, drop(y), h), position_bias


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks, then the final norm."""
    config: T5Config
    decoder: bool = False
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, enc, enc_mask, deterministic: bool, ctx=None):
        c = self.config
        x = Dropout(c.dropout_rate)(x, deterministic=deterministic)
        offset, n = (c.num_layers, c.num_decoder_layers) if self.decoder else (0, c.num_layers)
        bias = None
        for i in range(offset, offset + n):
            x, bias = T5Block(c, i, self.decoder, i == offset, self.filler, self.dtype, name=f"layer_{i}")(
                x, mask, bias, enc, enc_mask, deterministic, ctx)
        x = RMSNorm(c.layer_norm_eps, self.dtype, name="final_norm")(x)
        return Dropout(c.dropout_rate)(x, deterministic=deterministic)  # [B, T, D]


class T5Model(nn.Module):
    """Encoder, decoder and LM head.

    Without decoder_input_ids it runs the encoder only and returns {'last_hidden_state'
    [B, T', D], 'attention_mask' [B, T']} (T' = T plus any prompt tokens). With them it
    also runs the decoder and returns logits [B, Td, V], last_hidden_state (the decoder's,
    final-normed), encoder_last_hidden_state and encoder_attention_mask. Pass
    `encoder_outputs` (that first dict) to skip the encoder, as greedy decoding does.
    """
    config: T5Config
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, encoder_outputs=None, deterministic: bool = True,
                 adapter_ids=None):
        c = self.config
        shared = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="shared",
                          embedding_init=nn.initializers.normal(c.initializer_factor))
        ctx = sites.context(self.filler, adapter_ids)
        if encoder_outputs is None:
            mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
            x = shared(input_ids)  # [B, T, D]
            prompt = sites.lookup(self.filler, sites.EMBED_PROMPT, -1)
            if prompt is not None:
                x, mask = prompt(name=sites.EMBED_PROMPT)(x, mask)
            x = T5Stack(c, False, self.filler, self.dtype, name="encoder")(x, mask, None, None, deterministic, ctx)
            encoder_outputs = {"last_hidden_state": x, "attention_mask": mask}
        if decoder_input_ids is None:
            return encoder_outputs
        enc, enc_mask = encoder_outputs["last_hidden_state"], encoder_outputs["attention_mask"]
        dec_mask = jnp.ones_like(decoder_input_ids) if decoder_attention_mask is None else decoder_attention_mask
        y = T5Stack(c, True, self.filler, self.dtype, name="decoder")(
            shared(decoder_input_ids), dec_mask, enc, enc_mask, deterministic, ctx)  # [B, Td, D]
        if c.tie_word_embeddings:
            logits = shared.attend(y * c.hidden_size ** -0.5)  # [B, Td, V]
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head",
                              kernel_init=nn.initializers.normal(c.initializer_factor))(y)
        return {"logits": logits, "last_hidden_state": y, "encoder_last_hidden_state": enc,
                "encoder_attention_mask": enc_mask}


def shift_right(labels: jnp.ndarray, decoder_start_token_id: int, pad_token_id: int) -> jnp.ndarray:
    """decoder_input_ids [B, Td] from labels [B, Td]: start token first, -100 read as padding."""
    labels = jnp.asarray(labels)
    start = jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
    return jnp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Mean token cross-entropy over labels != -100 (HF's CrossEntropyLoss(ignore_index=-100))."""
    valid = labels != IGNORE_INDEX  # [B, Td]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, Td, V]
    nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1)


def seq2seq_loss(model: T5Model, params, input_ids, attention_mask, labels, deterministic: bool = True,
                 rngs=None, adapter_ids=None) -> jnp.ndarray:
    """The loss HF's T5ForConditionalGeneration computes from `labels` (decoder inputs by shift_right)."""
    c = model.config
    dec = shift_right(labels, c.decoder_start_token_id, c.pad_token_id)
    out = model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids=dec,
                      deterministic=deterministic, rngs=rngs, adapter_ids=adapter_ids)
    return cross_entropy(out["logits"], labels)


def greedy_generate(model: T5Model, params, input_ids, attention_mask, max_new_tokens: int,
                    adapter_ids=None) -> jnp.ndarray:
    """Greedy decoding: [B, 1 + max_new_tokens] ids starting with decoder_start_token_id.

    Matches HF `generate(do_sample=False, num_beams=1)`: rows that emitted eos get
    pad_token_id afterwards. HF stops once every row is done, so its output may be shorter;
    ours always has max_new_tokens steps (pad HF's with pad_token_id to compare).

    No KV cache: the encoder runs once, and each step reruns the decoder over a fixed
    [B, 1 + max_new_tokens] buffer (causal masking hides the not-yet-written positions), so
    one compiled program serves all steps; the cost is O(N^2) decoder work for N tokens.
    Each call compiles anew (the program closes over `model` and `max_new_tokens`).
    """
    c = model.config

    @jax.jit
    def run(params, input_ids, attention_mask, adapter_ids):
        apply = lambda **kw: model.apply({"params": params}, adapter_ids=adapter_ids, **kw)
        enc = apply(input_ids=input_ids, attention_mask=attention_mask)
        b = input_ids.shape[0]
        tokens = jnp.full((b, max_new_tokens + 1), c.pad_token_id, jnp.int32)
        tokens = tokens.at[:, 0].set(c.decoder_start_token_id)

        def step(i, carry):
            tokens, done = carry
            logits = apply(decoder_input_ids=tokens, encoder_outputs=enc)["logits"]  # [B, N+1, V]
            nxt = jnp.argmax(logits[:, i], axis=-1).astype(jnp.int32)  # [B]
            nxt = jnp.where(done, c.pad_token_id, nxt)
            return tokens.at[:, i + 1].set(nxt), done | (nxt == c.eos_token_id)

        tokens, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, jnp.zeros((b,), bool)))
        return tokens

    return run(params, jnp.asarray(input_ids), jnp.asarray(attention_mask), adapter_ids)
