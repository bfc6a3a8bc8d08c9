"""A BERT-family encoder (BERT, RoBERTa, MiniLM) in Flax linen, with named adapter sites.

Post-LayerNorm blocks as in Devlin et al.; RoBERTa differs only in its position ids
(offset past the padding index) and its config values. Parameter paths read like
`encoder/layer_3/attention/query/kernel` and `encoder/layer_3/ffn_adapter/...`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapters_jax.backbones import sites
from adapters_jax.backbones.attention import segment_mask, segment_positions, self_attention, take_rows
from adapters_jax.backbones.gelu import gelu_exact
from adapters_jax.backbones.grad_barrier import grad_barrier
from adapters_jax.backbones.layer_norm import layer_norm
from adapters_jax.dropout import Dropout
from adapters_jax.param import param

ACTIVATIONS = {
    "gelu": gelu_exact,  # jax.nn.gelu(approximate=False), keeping only x for the backward
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT-family encoder (field names follow our code, not HF's)."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    roberta_positions: bool = False  # position ids start after pad_token_id, skip padding
    add_pooler: bool = True
    model_type: str = "bert"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, hf: dict) -> "BertConfig":
        """From a Hugging Face config.json dict (model_type bert, roberta, xlm-roberta)."""
        model_type = hf.get("model_type", "bert")
        if model_type not in ("bert", "roberta", "xlm-roberta"):
            raise ValueError(f"config.json: model_type={model_type!r} is not a BERT-family encoder")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json: position_embedding_type={hf['position_embedding_type']!r} "
                             "is not supported (only 'absolute')")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            roberta_positions=model_type != "bert", model_type=model_type)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype.

    Its output stays float32 in mixed precision, so the residual stream is carried in
    float32 and only the matmul inputs are bf16 (this halves bf16 hidden-state error).
    """
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (d,), jnp.float32)
        bias = param(self, "bias", nn.initializers.zeros, (d,), jnp.float32)
        y = layer_norm(x.astype(jnp.float32), scale, bias, self.eps)  # [..., D] float32
        return grad_barrier(y)  # its gradient is computed once (see grad_barrier.py)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool, segment_ids=None):
        c = self.config
        if segment_ids is not None:  # packed rows: positions restart at each example's first token
            position_ids = segment_positions(segment_ids)  # [B, T]
            if c.roberta_positions:
                position_ids = jnp.where(segment_ids > 0, position_ids + c.pad_token_id + 1, c.pad_token_id)
        elif c.roberta_positions:  # RoBERTa: positions count real tokens, starting past the pad id
            real = (input_ids != c.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(real, axis=1) * real + c.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        emb = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name,
                                       embedding_init=nn.initializers.normal(0.02))
        x = (emb(c.vocab_size, "word_embeddings")(input_ids)
             + emb(c.max_position_embeddings, "position_embeddings")(position_ids)
             + emb(c.type_vocab_size, "token_type_embeddings")(token_type_ids))  # [B, T, D]
        x = LayerNorm(c.layer_norm_eps, self.dtype, name="norm")(x)
        return Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class BertAttention(nn.Module):
    config: BertConfig
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, ctx=None, query_rows=None):
        c = self.config
        b, t, d = x.shape
        h, dh = c.num_heads, d // c.num_heads
        dense = lambda site, feats: sites.dense(
            self.filler, site, self.layer, ctx, features=feats, use_bias=True, dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.02), name=site)
        heads = self_attention(self, x, key_mask, dense, num_heads=h, head_dim=dh, causal=False,
                             dropout_rate=c.attention_dropout, deterministic=deterministic,
                             query_rows=query_rows)  # [B, Tq, D]
        out = dense(sites.ATTN_OUT, d)(heads)
        return Dropout(c.hidden_dropout)(out, deterministic=deterministic)  # [B, Tq, D]


class BertLayer(nn.Module):
    """One post-LN block: attention -> [attn site] -> FFN -> [ffn site].

    With `query_rows` the block returns only those rows: 1 (position 0, [B, 1, D]) or positions
    [B, S] (each packed example's first token, [B, S, D]). Keys and values still come from every
    position, but the query, the attention output, the adapters, the norms and the FFN run on
    those rows instead of T. Every op after attention is per token, so the rows are the ones the
    full block computes (`tests/test_first_token_only.py`, `tests/test_packing.py`)."""
    config: BertConfig
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, ctx=None, query_rows=None):
        c = self.config
        attn = BertAttention(c, self.layer, self.filler, self.dtype, name="attention")(
            x, key_mask, deterministic, ctx, query_rows=query_rows)  # [B, Tq, D]
        x = take_rows(x, query_rows)  # the residual rows that attention answered
        attn_norm = LayerNorm(c.layer_norm_eps, self.dtype, name="attention_norm")
        h = sites.activation(self.filler, sites.ATTN_OUTPUT, self.layer, attn, x, attn_norm,
                             deterministic, ctx)  # [B, Tq, D]
        dense = lambda site, feats: sites.dense(
            self.filler, site, self.layer, ctx, features=feats, use_bias=True, dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.02), name=site)
        y = ACTIVATIONS[c.hidden_act](dense(sites.FFN_IN, c.intermediate_size)(h))  # [B, T, F]
        y = dense(sites.FFN_OUT, c.hidden_size)(y)
        y = Dropout(c.hidden_dropout)(y, deterministic=deterministic)
        ffn_norm = LayerNorm(c.layer_norm_eps, self.dtype, name="ffn_norm")
        return sites.activation(self.filler, sites.FFN_OUTPUT, self.layer, y, h, ffn_norm,
                                deterministic, ctx)


class BertEncoder(nn.Module):
    config: BertConfig
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, output_hidden_states: bool = False,
                 ctx=None, last_rows=None):
        """last_rows: the rows the last layer computes (None: all; see BertLayer's query_rows)."""
        hidden = [x]
        last = self.config.num_layers - 1
        for i in range(self.config.num_layers):
            x = BertLayer(self.config, i, self.filler, self.dtype, name=f"layer_{i}")(
                x, key_mask, deterministic, ctx, last_rows if i == last else None)
            hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None)


class BertModel(nn.Module):
    """The encoder. Returns a dict with last_hidden_state [B, T', D], attention_mask [B, T']
    (T' = T plus any prompt tokens), pooler_output [B, D] (if the config has a pooler), and
    hidden_states (a tuple of L+1 arrays) when asked for.
    """
    config: BertConfig
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False, adapter_ids=None,
                 first_token_only: bool = False, segment_ids=None, segment_starts=None):
        """adapter_ids: [B] ints choosing each row's adapter when several are composed by 'select'.

        first_token_only: the caller reads only position 0 (a CLS or pooler head), so the last
        layer computes only that row: last_hidden_state is [B, 1, D] and attention_mask [B, 1].
        At MiniLM 32 x 128 this removes most of one layer's work from a train step (see
        BertLayer).

        segment_ids [B, T], segment_starts [B, S]: packed rows (`adapters_jax.data.packing`). Each
        example attends to itself only and restarts its positions; the output also carries both
        arrays, and pooler_output is [B, S, D], one vector per example. With first_token_only the
        last layer computes each example's first row: last_hidden_state [B, S, D], whose
        segment_starts are then 0..S-1."""
        if first_token_only and output_hidden_states:
            raise ValueError("first_token_only=True computes one row of the last layer; "
                             "it cannot return output_hidden_states")
        packed = segment_ids is not None
        if packed and segment_starts is None:
            raise ValueError("packed rows (segment_ids) need segment_starts")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, attention_mask, deterministic, segment_ids)  # [B, T, D]
        prompt = sites.lookup(self.filler, sites.EMBED_PROMPT, -1)
        if prompt is not None:
            if packed:
                raise ValueError("prompt tuning puts its tokens in front of the row, not of each packed "
                                 "example; set data.pack=False")
            x, attention_mask = prompt(name=sites.EMBED_PROMPT)(x, attention_mask)
        key_mask = segment_mask(segment_ids) if packed else attention_mask  # [B, 1, T, T] or [B, T]
        last_rows = (segment_starts if packed else 1) if first_token_only else None
        x, hidden = BertEncoder(self.config, self.filler, self.dtype, name="encoder")(
            x, key_mask, deterministic, output_hidden_states, sites.context(self.filler, adapter_ids),
            last_rows)  # [B, T', D]; first_token_only: [B, 1, D], packed [B, S, D]
        if first_token_only:
            attention_mask = attention_mask[:, :1]
        out = {"last_hidden_state": x, "attention_mask": attention_mask}
        if packed:  # x's rows of each example's first token: all of them, or just those (then 0..S-1)
            starts = (jnp.broadcast_to(jnp.arange(segment_starts.shape[1]), segment_starts.shape)
                      if first_token_only else segment_starts)  # [B, S]
            out.update(segment_ids=segment_ids, segment_starts=starts)
        if hidden is not None:
            out["hidden_states"] = hidden
        if self.config.add_pooler:
            first = (jnp.take_along_axis(x, out["segment_starts"][..., None], axis=1) if packed
                     else x[:, 0])  # [B, S, D] or [B, D]
            pooled = nn.Dense(self.config.hidden_size, dtype=self.dtype, name="pooler")(first)
            out["pooler_output"] = jnp.tanh(pooled)
        return out
