"""A GPT-2 decoder in Flax linen, with named adapter sites.

Pre-LayerNorm blocks, learned absolute positions, gelu_new MLP and a head tied to the token
embedding (untied heads are read too), so that converted GPT2LMHeadModel weights reproduce
its logits. HF's fused `c_attn` projection is split into the `query`/`key`/`value` dense
sites by the converter (gpt2_weights.py), so that LoRA/IA3 can target them one by one as
they do in Llama. Parameter paths follow llama.py: `layers/layer_3/attention/query/kernel`,
`layers/layer_3/ffn_in/kernel`, `layers/layer_3/ffn_adapter/...`; the LayerNorms are
`attention_norm` (HF ln_1), `ffn_norm` (ln_2) and `norm` (ln_f).

The prompt site sits after the embedding sum (token + position) and its dropout, where it
sits in BERT: the real tokens keep their positions 0..T-1 and the prompt vectors carry none.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from adapters_jax.backbones import sites
from adapters_jax.backbones.attention import packed_decoder_inputs, self_attention
from adapters_jax.backbones.bert import ACTIVATIONS, LayerNorm
from adapters_jax.backbones.grad_barrier import grad_barrier
from adapters_jax.dropout import Dropout


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of a GPT-2 decoder (field names follow our code, not HF's)."""
    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: Optional[int] = None  # None: 4 * hidden_size (HF n_inner)
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    hidden_dropout: float = 0.1     # resid_pdrop
    embedding_dropout: float = 0.1  # embd_pdrop
    attention_dropout: float = 0.1  # attn_pdrop
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    model_type: str = "gpt2"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Config":
        """From a Hugging Face config.json dict (model_type gpt2)."""
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json: model_type={model_type!r} is not a GPT-2 decoder")
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("config.json: scale_attn_by_inverse_layer_idx=true is not supported (only false)")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"], num_layers=hf["n_layer"],
            num_heads=hf["n_head"], intermediate_size=hf.get("n_inner"),
            max_position_embeddings=hf.get("n_positions", 1024),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            hidden_act=hf.get("activation_function", "gelu_new"),
            hidden_dropout=hf.get("resid_pdrop", 0.1), embedding_dropout=hf.get("embd_pdrop", 0.1),
            attention_dropout=hf.get("attn_pdrop", 0.1),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.02), model_type=model_type)


def _dense(filler, layer, config, site, features, dtype, ctx=None):
    """One dense site of a GPT-2 block (every HF Conv1D has a bias)."""
    return sites.dense(filler, site, layer, ctx, features=features, use_bias=True, dtype=dtype,
                       kernel_init=nn.initializers.normal(config.initializer_range), name=site)


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, ctx=None):
        c = self.config
        b, t, d = x.shape
        h, dh = c.num_heads, c.head_dim
        dense = lambda site, feats: _dense(self.filler, self.layer, c, site, feats, self.dtype, ctx)
        heads = self_attention(self, x, key_mask, dense, num_heads=h, head_dim=dh, causal=True,
                             dropout_rate=c.attention_dropout, deterministic=deterministic,
                             scale=None if c.scale_attn_weights else 1.0)  # [B, T, D]
        out = dense(sites.ATTN_OUT, d)(heads)  # [B, T, D]
        return Dropout(c.hidden_dropout)(out, deterministic=deterministic)


class GPT2Layer(nn.Module):
    """One pre-LN block: h = x + attn(ln_1(x)) [attn site]; h + mlp(ln_2(h)) [ffn site]."""
    config: GPT2Config
    layer: int
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, ctx=None):
        c = self.config
        a = LayerNorm(c.layer_norm_eps, self.dtype, name="attention_norm")(x)
        a = GPT2Attention(c, self.layer, self.filler, self.dtype, name="attention")(a, key_mask, deterministic, ctx)
        h = sites.activation(self.filler, sites.ATTN_OUTPUT, self.layer, a, x, None,
                             deterministic, ctx)  # [B, T, D]
        y = LayerNorm(c.layer_norm_eps, self.dtype, name="ffn_norm")(h)
        y = _dense(self.filler, self.layer, c, sites.FFN_IN, c.intermediate_size, self.dtype, ctx)(y)
        y = ACTIVATIONS[c.hidden_act](y)  # [B, T, F]
        y = _dense(self.filler, self.layer, c, sites.FFN_OUT, c.hidden_size, self.dtype, ctx)(y)
        y = Dropout(c.hidden_dropout)(y, deterministic=deterministic)  # [B, T, D]
        return sites.activation(self.filler, sites.FFN_OUTPUT, self.layer, y, h, None, deterministic, ctx)


class GPT2Layers(nn.Module):
    """The stack of blocks, so that their params live under `layers/layer_i`."""
    config: GPT2Config
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, ctx=None):
        hidden = [x]
        for i in range(self.config.num_layers):
            x = GPT2Layer(self.config, i, self.filler, self.dtype, name=f"layer_{i}")(
                x, key_mask, deterministic, ctx)
            x = grad_barrier(x)  # the residual stream's gradient, computed once per layer
            hidden.append(x)
        return x, hidden


class GPT2Model(nn.Module):
    """The decoder with its LM head.

    Returns a dict with last_hidden_state [B, T', D] (after ln_f), logits [B, T', V],
    attention_mask [B, T'] (T' = T plus any prompt tokens) and, when asked, hidden_states:
    L+1 arrays laid out as HF's (embeddings, each block's output, the last one replaced by
    the ln_f-normed state). Positions default to arange(T), as GPT2LMHeadModel without a
    cache: with left padding pass position_ids yourself, as with HF.
    """
    config: GPT2Config
    filler: Optional[sites.SiteFiller] = None
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    causal = True  # a position sees only itself and earlier ones: classify from the last token

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None,
                 deterministic: bool = True, output_hidden_states: bool = False, adapter_ids=None,
                 segment_ids=None, segment_starts=None):
        """segment_ids [B, T], segment_starts [B, S]: packed rows (`adapters_jax.data.packing`).
        Each token attends the earlier tokens of its own example and reads the position
        embedding of its place in that example, so each example gets the logits it gets alone."""
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        packed = segment_ids is not None
        if packed:  # pair mask [B, 1, T, T], positions [B, T] restarting per example
            key_mask, position_ids = packed_decoder_inputs(
                segment_ids, position_ids, sites.lookup(self.filler, sites.EMBED_PROMPT, -1) is not None)
        else:
            key_mask = attention_mask  # [B, T]
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        emb = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name,
                                       embedding_init=nn.initializers.normal(c.initializer_range))
        wte = emb(c.vocab_size, "wte")
        x = wte(input_ids) + emb(c.max_position_embeddings, "wpe")(position_ids)  # [B, T, D]
        x = Dropout(c.embedding_dropout)(x, deterministic=deterministic)
        prompt = sites.lookup(self.filler, sites.EMBED_PROMPT, -1)
        if prompt is not None:
            x, attention_mask = prompt(name=sites.EMBED_PROMPT)(x, attention_mask)
            key_mask = attention_mask
        x, hidden = GPT2Layers(c, self.filler, self.dtype, name="layers")(
            x, key_mask, deterministic, sites.context(self.filler, adapter_ids))
        x = LayerNorm(c.layer_norm_eps, self.dtype, name="norm")(x)  # [B, T', D]
        if c.tie_word_embeddings:
            logits = wte.attend(x)  # x @ wte.T, [B, T', V]
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head",
                              kernel_init=nn.initializers.normal(c.initializer_range))(x)
        out = {"last_hidden_state": x, "logits": logits, "attention_mask": attention_mask}
        if packed:  # the head pools per example
            out.update(segment_ids=segment_ids, segment_starts=segment_starts)
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden[:-1]) + (x,)
        return out
