"""A Llama-family decoder (Llama 2/3, SmolLM) in Flax linen, with named adapter sites.

Pre-RMSNorm blocks, rotary positions in Hugging Face's rotate_half layout (HF checkpoints
store q/k projections already permuted for it), SwiGLU MLP and grouped-query attention,
so that converted LlamaForCausalLM weights reproduce its logits. Parameter paths read like
`layers/layer_3/attention/query/kernel` and `layers/layer_3/ffn_adapter/...`; the norms
keep Meta's names (`attention_norm`, `ffn_norm`) for HF's input/post_attention_layernorm.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapters_jax.backbones import sites
from adapters_jax.backbones.attention import packed_decoder_inputs, self_attention
from adapters_jax.backbones.bert import ACTIVATIONS
from adapters_jax.param import param


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (field names follow our code, not HF's).

    Only plain RoPE is supported: `from_hf` refuses a non-null `rope_scaling` (linear,
    dynamic, llama3, yarn ...) with a ValueError naming the field, rather than silently
    computing different positions than the checkpoint was trained with.
    """
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    intermediate_size: int = 11008
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    model_type: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """From a Hugging Face config.json dict (model_type llama)."""
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json: model_type={model_type!r} is not a Llama decoder")
        if hf.get("rope_scaling") is not None:
            raise ValueError(f"config.json: rope_scaling={hf['rope_scaling']!r} is not supported (only null)")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim"),
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=hf.get("rope_theta", 10000.0),
            hidden_act=hf.get("hidden_act", "silu"), attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False), attention_dropout=hf.get("attention_dropout", 0.0),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            initializer_range=hf.get("initializer_range", 0.02), model_type=model_type)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the compute dtype (bf16 squares overflow/lose bits)."""
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def rotary(x: jnp.ndarray, position_ids: jnp.ndarray, theta: float) -> jnp.ndarray:
    """Applies RoPE in HF's rotate_half layout: dims [0, Dh/2) pair with [Dh/2, Dh).

    Args:
      x: [B, T, H, Dh]; position_ids: [B, T] integers.
    """
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))  # [Dh/2]
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, position_ids, deterministic: bool, ctx=None):
        c = self.config
        h, hkv, dh = c.num_heads, c.num_kv_heads, c.head_dim
        dense = lambda site, feats: sites.dense(
            self.filler, site, self.layer, ctx, features=feats, use_bias=c.attention_bias, dtype=self.dtype,
            kernel_init=nn.initializers.normal(c.initializer_range), name=site)
        heads = self_attention(self, x, key_mask, dense, num_heads=h, num_kv_heads=hkv, head_dim=dh, causal=True,
                             dropout_rate=c.attention_dropout, deterministic=deterministic,
                             rotate=lambda z: rotary(z, position_ids, c.rope_theta))  # [B, T, H*Dh]
        return dense(sites.ATTN_OUT, c.hidden_size)(heads)  # [B, T, D]


class LlamaLayer(nn.Module):
    """One pre-LN block: h = x + attn(norm(x)) [attn site]; h + mlp(norm(h)) [ffn site]."""
    config: LlamaConfig
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, position_ids, deterministic: bool, ctx=None):
        c = self.config
        a = RMSNorm(c.rms_norm_eps, self.dtype, name="attention_norm")(x)
        a = LlamaAttention(c, self.layer, self.filler, self.dtype, name="attention")(
            a, key_mask, position_ids, deterministic, ctx)
        h = sites.activation(self.filler, sites.ATTN_OUTPUT, self.layer, a, x, None,
                             deterministic, ctx)  # [B, T, D]
        dense = lambda site, feats: sites.dense(
            self.filler, site, self.layer, ctx, features=feats, use_bias=c.mlp_bias, dtype=self.dtype,
            kernel_init=nn.initializers.normal(c.initializer_range), name=site)
        y = RMSNorm(c.rms_norm_eps, self.dtype, name="ffn_norm")(h)
        y = ACTIVATIONS[c.hidden_act](dense(sites.FFN_GATE, c.intermediate_size)(y)) * \
            dense(sites.FFN_IN, c.intermediate_size)(y)  # [B, T, F]
        y = dense(sites.FFN_OUT, c.hidden_size)(y)  # [B, T, D]
        return sites.activation(self.filler, sites.FFN_OUTPUT, self.layer, y, h, None, deterministic,
                                ctx)


class LlamaLayers(nn.Module):
    """The stack of blocks, so that their params live under `layers/layer_i`."""
    config: LlamaConfig
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, position_ids, deterministic: bool, ctx=None):
        hidden = [x]
        for i in range(self.config.num_layers):
            x = LlamaLayer(self.config, i, self.filler, self.dtype, name=f"layer_{i}")(
                x, key_mask, position_ids, deterministic, ctx)
            hidden.append(x)
        return x, hidden


class LlamaModel(nn.Module):
    """The decoder with its LM head.

    Returns a dict with last_hidden_state [B, T', D] (after the final norm), logits
    [B, T', V], attention_mask [B, T'] (T' = T plus any prompt tokens) and, when asked,
    hidden_states: L+1 arrays laid out as HF's (embeddings, each block's output, the last
    one replaced by the final-normed state).

    Positions default to arange(T') as in LlamaForCausalLM without a cache; prompt tokens
    take the first positions and explicit position_ids are shifted past them. Prefix keys
    are not rotated; HF PEFT prefix tuning places the real tokens at P..P+T-1, so pass
    `position_ids = arange(T) + P` to reproduce it.
    """
    config: LlamaConfig
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    causal = True  # a position sees only itself and earlier ones: classify from the last token

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False, adapter_ids=None,
                 segment_ids=None, segment_starts=None):
        """segment_ids [B, T], segment_starts [B, S]: packed rows (`adapters_jax.data.packing`).
        Each token attends the earlier tokens of its own example, so each example gets the
        logits it gets alone. Rotary positions restart at each example's first token: RoPE's
        scores depend only on position differences, so this changes nothing in exact arithmetic,
        but the rotations are then the very ones the example gets alone."""
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        packed = segment_ids is not None
        if packed:  # pair mask [B, 1, T, T], positions [B, T] restarting per example
            key_mask, position_ids = packed_decoder_inputs(
                segment_ids, position_ids, sites.lookup(self.filler, sites.EMBED_PROMPT, -1) is not None)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens",
                         embedding_init=nn.initializers.normal(c.initializer_range))
        x = embed(input_ids)  # [B, T, D]
        t = x.shape[1]
        prompt = sites.lookup(self.filler, sites.EMBED_PROMPT, -1)
        if prompt is not None:
            x, attention_mask = prompt(name=sites.EMBED_PROMPT)(x, attention_mask)
        n_prompt = x.shape[1] - t
        if not packed:  # (packed rows got both from packed_decoder_inputs)
            key_mask = attention_mask  # [B, T']
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            else:
                position_ids = jnp.broadcast_to(jnp.asarray(position_ids), input_ids.shape)
                if n_prompt:
                    head = jnp.broadcast_to(jnp.arange(n_prompt), (x.shape[0], n_prompt))
                    position_ids = jnp.concatenate([head, position_ids + n_prompt], axis=1)
        x, hidden = LlamaLayers(c, self.filler, self.dtype, name="layers")(
            x, key_mask, position_ids, deterministic, sites.context(self.filler, adapter_ids))
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)  # [B, T', D]
        if c.tie_word_embeddings:
            logits = embed.attend(x)  # x @ embedding.T, [B, T', V]
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head",
                              kernel_init=nn.initializers.normal(c.initializer_range))(x)
        out = {"last_hidden_state": x, "logits": logits, "attention_mask": attention_mask}
        if packed:  # the head pools per example
            out.update(segment_ids=segment_ids, segment_starts=segment_starts)
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden[:-1]) + (x,)
        return out
