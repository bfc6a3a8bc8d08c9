"""A Vision Transformer encoder (Dosovitskiy et al.) in Flax linen, with named adapter sites.

Pre-LayerNorm blocks as in HF's ViTModel, so converted checkpoints reproduce its
last_hidden_state: the patch convolution is a Dense over flattened patches, a CLS token
is prepended, learned positions are added. Images come channels-last, pixel_values
[B, H, W, C] float32. Parameter paths read like `encoder/layer_3/attention/query/kernel`
and `encoder/layer_3/ffn_adapter/...`, the same names as BERT's and Llama's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from adapters_jax.backbones import sites
from adapters_jax.backbones.attention import self_attention
from adapters_jax.backbones.bert import ACTIVATIONS, LayerNorm
from adapters_jax.backbones.grad_barrier import grad_barrier
from adapters_jax.dropout import Dropout
from adapters_jax.param import param


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a ViT encoder (field names follow our code, not HF's)."""
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    qkv_bias: bool = True
    add_pooler: bool = True
    pooler_act: str = "tanh"
    initializer_range: float = 0.02
    model_type: str = "vit"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        for field in ("hidden_act", "pooler_act"):
            if getattr(self, field) not in ACTIVATIONS:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, hf: dict) -> "ViTConfig":
        """From a Hugging Face config.json dict (model_type vit)."""
        if hf.get("model_type", "vit") != "vit":
            raise ValueError(f"config.json: model_type={hf.get('model_type')!r} is not a ViT")
        for key in ("image_size", "patch_size"):
            if not isinstance(hf.get(key, 0), int):
                raise ValueError(f"config.json: {key}={hf[key]!r} must be one integer (square images only)")
        hidden = hf.get("hidden_size", 768)
        if hf.get("pooler_output_size", hidden) != hidden:
            raise ValueError(f"config.json: pooler_output_size={hf['pooler_output_size']} != hidden_size "
                             "is not supported")
        return cls(
            image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
            num_channels=hf.get("num_channels", 3), hidden_size=hidden,
            num_layers=hf.get("num_hidden_layers", 12), num_heads=hf.get("num_attention_heads", 12),
            intermediate_size=hf.get("intermediate_size", 3072),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.0),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
            qkv_bias=hf.get("qkv_bias", True), pooler_act=hf.get("pooler_act", "tanh"),
            initializer_range=hf.get("initializer_range", 0.02))

    def to_hf(self) -> dict:
        """The config.json dict that `from_hf` (and transformers' ViTConfig) read back."""
        return dict(model_type="vit", architectures=["ViTModel"], image_size=self.image_size,
                    patch_size=self.patch_size, num_channels=self.num_channels,
                    hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
                    layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act,
                    hidden_dropout_prob=self.hidden_dropout,
                    attention_probs_dropout_prob=self.attention_dropout, qkv_bias=self.qkv_bias,
                    pooler_act=self.pooler_act, initializer_range=self.initializer_range)


def patchify(pixel_values: jnp.ndarray, patch: int) -> jnp.ndarray:
    """[B, H, W, C] -> [B, N, p*p*C] with patches in row-major order, each flattened (ph, pw, c)."""
    b, h, w, c = pixel_values.shape
    x = pixel_values.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ViTEmbeddings(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool):
        c = self.config
        b, h, w, ch = pixel_values.shape
        if (h, w, ch) != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"pixel_values have shape (H, W, C)={(h, w, ch)}, the ViT expects "
                             f"{(c.image_size, c.image_size, c.num_channels)} (channels last)")
        init = nn.initializers.truncated_normal(c.initializer_range)
        patches = patchify(pixel_values.astype(self.dtype), c.patch_size)  # [B, N, p*p*C]
        x = nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=init, name="patch_embed")(patches)
        cls = param(self, "cls_token", init, (1, 1, c.hidden_size), jnp.float32)
        pos = param(self, "position_embeddings", init, (1, c.num_patches + 1, c.hidden_size), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)  # [B, N+1, D]
        return Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class ViTAttention(nn.Module):
    config: ViTConfig
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, ctx=None, query_rows=None):
        c = self.config
        b, t, d = x.shape
        h, dh = c.num_heads, d // c.num_heads
        dense = lambda site, feats, bias=c.qkv_bias: sites.dense(
            self.filler, site, self.layer, ctx, features=feats, use_bias=bias, dtype=self.dtype,
            kernel_init=nn.initializers.truncated_normal(c.initializer_range), name=site)
        heads = self_attention(self, x, key_mask, dense, num_heads=h, head_dim=dh, causal=False,
                             dropout_rate=c.attention_dropout, deterministic=deterministic,
                             query_rows=query_rows)  # [B, Tq, D]
        out = dense(sites.ATTN_OUT, d, True)(heads)
        return Dropout(c.hidden_dropout)(out, deterministic=deterministic)  # [B, Tq, D]


class ViTLayer(nn.Module):
    """One pre-LN block: h = x + attn(norm(x)) [attn site]; h + mlp(norm(h)) [ffn site].

    With `first_token_only` it returns only the CLS row [B, 1, D] (as `bert.BertLayer`)."""
    config: ViTConfig
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, ctx=None, first_token_only: bool = False):
        c = self.config
        a = LayerNorm(c.layer_norm_eps, self.dtype, name="attention_norm")(x)  # every row: keys, values
        a = ViTAttention(c, self.layer, self.filler, self.dtype, name="attention")(
            a, key_mask, deterministic, ctx, query_rows=1 if first_token_only else None)  # [B, Tq, D]
        x = x[:, :1] if first_token_only else x  # the residual rows that attention answered
        h = sites.activation(self.filler, sites.ATTN_OUTPUT, self.layer, a, x, None, deterministic, ctx)
        dense = lambda site, feats: sites.dense(
            self.filler, site, self.layer, ctx, features=feats, use_bias=True, dtype=self.dtype,
            kernel_init=nn.initializers.truncated_normal(c.initializer_range), name=site)
        y = LayerNorm(c.layer_norm_eps, self.dtype, name="ffn_norm")(h)
        y = ACTIVATIONS[c.hidden_act](dense(sites.FFN_IN, c.intermediate_size)(y))  # [B, T, F]
        y = dense(sites.FFN_OUT, c.hidden_size)(y)
        y = Dropout(c.hidden_dropout)(y, deterministic=deterministic)  # [B, T, D]
        return sites.activation(self.filler, sites.FFN_OUTPUT, self.layer, y, h, None, deterministic, ctx)


class ViTEncoder(nn.Module):
    config: ViTConfig
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, output_hidden_states: bool = False, ctx=None,
                 first_token_only: bool = False):
        hidden = [x]
        last = self.config.num_layers - 1
        for i in range(self.config.num_layers):
            x = ViTLayer(self.config, i, self.filler, self.dtype, name=f"layer_{i}")(
                x, key_mask, deterministic, ctx, first_token_only and i == last)
            x = grad_barrier(x)  # the residual stream's gradient, computed once per layer
            hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None)


class ViTModel(nn.Module):
    """The encoder. Returns a dict with last_hidden_state [B, T', D] (after the final norm;
    T' = 1 + num_patches plus any prompt tokens), attention_mask [B, T'] (all ones unless a
    prompt extends it), pooler_output [B, D] (if the config has a pooler), and hidden_states
    (L+1 arrays, as HF's: embeddings, then each block's output before the final norm).
    """
    config: ViTConfig
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True, output_hidden_states: bool = False,
                 adapter_ids=None, first_token_only: bool = False):
        """pixel_values: [B, H, W, C] float; adapter_ids: [B] ints for 'select' composition;
        first_token_only: the last block computes only the CLS row (last_hidden_state [B, 1, D])."""
        c = self.config
        if first_token_only and output_hidden_states:
            raise ValueError("first_token_only=True computes one row of the last layer; "
                             "it cannot return output_hidden_states")
        x = ViTEmbeddings(c, self.dtype, name="embeddings")(pixel_values, deterministic)  # [B, N+1, D]
        mask = jnp.ones(x.shape[:2], jnp.int32)  # [B, N+1]: images have no padding
        prompt = sites.lookup(self.filler, sites.EMBED_PROMPT, -1)
        if prompt is not None:
            x, mask = prompt(name=sites.EMBED_PROMPT)(x, mask)
        x, hidden = ViTEncoder(c, self.filler, self.dtype, name="encoder")(
            x, mask, deterministic, output_hidden_states, sites.context(self.filler, adapter_ids),
            first_token_only)
        mask = mask[:, :1] if first_token_only else mask
        x = LayerNorm(c.layer_norm_eps, self.dtype, name="norm")(x)  # [B, T', D], or [B, 1, D]
        out = {"last_hidden_state": x, "attention_mask": mask}
        if hidden is not None:
            out["hidden_states"] = hidden
        if c.add_pooler:
            pooled = nn.Dense(c.hidden_size, dtype=self.dtype, name="pooler")(x[:, 0])
            out["pooler_output"] = ACTIVATIONS[c.pooler_act](pooled)  # [B, D]
        return out
