"""Task heads that sit on a backbone's output dict.

Every head reads `last_hidden_state` [B, T, D] and `attention_mask` [B, T] (the mask the
backbone returns, which includes any prompt tokens) and is trained with the adapters.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from adapters_jax.dropout import Dropout

POOLINGS = ("cls", "mean", "pooler", "last")


def pool(outputs: dict, pooling: str) -> jnp.ndarray:
    """[B, D] sentence vector: the first token, the masked mean, BERT's tanh pooler, or the last
    real token (causal decoders, where only it has read the whole text; HF's
    *ForSequenceClassification pools it too). Left or right padding."""
    if "segment_starts" in outputs:
        return pool_packed(outputs, pooling)
    x, mask = outputs["last_hidden_state"], outputs["attention_mask"]
    if pooling == "cls":
        return x[:, 0]
    if pooling == "last":
        last = (mask.shape[1] - 1) - jnp.argmax(mask[:, ::-1] > 0, axis=1)  # [B] index of the last real token
        return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
        return (x.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    if pooling == "pooler":
        if "pooler_output" not in outputs:
            raise ValueError("head.pooling='pooler' but the backbone has no pooler; use 'cls' or 'mean'")
        return outputs["pooler_output"]
    raise ValueError(f"head.pooling={pooling!r} is not one of {POOLINGS}")


def pool_packed(outputs: dict, pooling: str) -> jnp.ndarray:
    """[B, S, D]: `pool` for each example of packed rows (segment_ids [B, T], segment_starts [B, S]);
    an empty slot gives the row's first vector (its weight is 0)."""
    x, seg, starts = outputs["last_hidden_state"], outputs["segment_ids"], outputs["segment_starts"]
    if pooling == "cls":
        return jnp.take_along_axis(x, starts[..., None], axis=1)  # [B, S, D]
    if pooling == "pooler":
        if "pooler_output" not in outputs:
            raise ValueError("head.pooling='pooler' but the backbone has no pooler; use 'cls' or 'mean'")
        return outputs["pooler_output"]
    member = seg[:, None, :] == jnp.arange(1, starts.shape[1] + 1)[None, :, None]  # [B, S, T]
    if pooling == "mean":
        m = member.astype(jnp.float32)
        return jnp.einsum("bst,btd->bsd", m, x.astype(jnp.float32)) / jnp.maximum(m.sum(-1, keepdims=True), 1.0)
    if pooling == "last":
        last = jnp.max(jnp.where(member, jnp.arange(seg.shape[1]), 0), axis=-1)  # [B, S]
        return jnp.take_along_axis(x, last[..., None], axis=1)
    raise ValueError(f"head.pooling={pooling!r} is not one of {POOLINGS}")


def default_pooling(backbone: nn.Module) -> str:
    """'last' for a causal decoder (GPT-2, Llama), 'cls' for an encoder."""
    return "last" if getattr(backbone, "causal", False) else "cls"


def resolve_pooling(pooling: str, backbone: nn.Module) -> str:
    """A config's head.pooling: 'auto' is the backbone's `default_pooling`; the others stay."""
    if pooling == "auto":
        return default_pooling(backbone)
    if pooling not in POOLINGS:
        raise ValueError(f"head.pooling={pooling!r} is not 'auto' or one of {POOLINGS}")
    return pooling


class ClassificationHead(nn.Module):
    """Sequence classification (num_labels > 1) or regression (num_labels == 1): [B, num_labels],
    or [B, S, num_labels] for packed rows (one per example slot)."""
    num_labels: int
    pooling: str = "cls"
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @property
    def reads_first_token_only(self) -> bool:
        """True when the logits depend on position 0 of the backbone's output alone."""
        return self.pooling in ("cls", "pooler")

    @nn.compact
    def __call__(self, outputs: dict, deterministic: bool = True):
        h = pool(outputs, self.pooling)
        h = Dropout(self.dropout)(h, deterministic=deterministic)
        logits = nn.Dense(self.num_labels, dtype=self.dtype, name="out",
                          kernel_init=nn.initializers.normal(0.02))(h)
        return logits.astype(jnp.float32)


class TokenClassificationHead(nn.Module):
    """One label per token: [B, T, num_labels]."""
    num_labels: int
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, outputs: dict, deterministic: bool = True):
        h = Dropout(self.dropout)(outputs["last_hidden_state"], deterministic=deterministic)
        return nn.Dense(self.num_labels, dtype=self.dtype, name="out",
                        kernel_init=nn.initializers.normal(0.02))(h).astype(jnp.float32)


class BackboneLogits(nn.Module):
    """The decoder's own LM head: passes its logits [B, T', V] through (no parameters).

    For causal-LM tuning of any backbone whose output dict has 'logits' (Llama, GPT-2).
    """

    @nn.compact
    def __call__(self, outputs: dict, deterministic: bool = True):
        if "logits" not in outputs:
            raise ValueError("task='lm' needs a decoder backbone whose output has 'logits' (e.g. Llama, GPT-2)")
        return outputs["logits"].astype(jnp.float32)


class LMHead(nn.Module):
    """Next-token logits [B, T, V]. Tied heads reuse the input embedding matrix passed in."""
    vocab_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, outputs: dict, embedding: jnp.ndarray | None = None, deterministic: bool = True):
        x = outputs["last_hidden_state"]
        if embedding is not None:  # tied: [V, D]
            return jnp.einsum("btd,vd->btv", x, embedding.astype(self.dtype)).astype(jnp.float32)
        return nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, name="out")(x).astype(jnp.float32)
