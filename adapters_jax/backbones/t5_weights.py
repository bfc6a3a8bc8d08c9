"""Hugging Face T5 checkpoints (T5ForConditionalGeneration) <-> our T5Model parameters.

Every Linear converts by a transpose. HF ties encoder.embed_tokens and decoder.embed_tokens
to `shared`; files that still hold them must hold the same table. Decoder block numbers are
shifted past the encoder's on our side (see t5.py): HF `decoder.block.0` is our
`decoder/layer_<num_layers>`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adapters_jax.backbones import hf_io
from adapters_jax.backbones.t5 import T5Config, T5Model

# The original t5-small/base files carry a cross-attention bias table that HF never uses.
IGNORED = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)
_SHARED = "shared.weight"
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_ATTN = (("query", "q"), ("key", "k"), ("value", "v"), ("attn_out", "o"))


def name_map(config: T5Config) -> dict:
    """flax path -> (HF name, transform) for every parameter."""
    t, i_ = hf_io.transpose, hf_io.identity
    m = {("shared", "embedding"): (_SHARED, i_)}
    for stack, offset, n in (("encoder", 0, config.num_layers),
                             ("decoder", config.num_layers, config.num_decoder_layers)):
        m[(stack, "final_norm", "scale")] = (f"{stack}.final_layer_norm.weight", i_)
        for i in range(n):
            f, h = (stack, f"layer_{offset + i}"), f"{stack}.block.{i}.layer"
            subs = [("self_attention", "attention_norm", f"{h}.0", "SelfAttention")]
            if stack == "decoder":
                subs.append(("cross_attention", "cross_attention_norm", f"{h}.1", "EncDecAttention"))
            for attn, norm, hf_layer, hf_attn in subs:
                for site, proj in _ATTN:
                    m[f + (attn, site, "kernel")] = (f"{hf_layer}.{hf_attn}.{proj}.weight", t)
                m[f + (norm, "scale")] = (f"{hf_layer}.layer_norm.weight", i_)
            if i == 0:
                m[f + ("self_attention", "relative_attention_bias", "embedding")] = (
                    f"{h}.0.SelfAttention.relative_attention_bias.weight", i_)  # [buckets, H]
            ff = f"{h}.{len(subs)}"
            wi = (("ffn_gate", "wi_0"), ("ffn_in", "wi_1")) if config.gated else (("ffn_in", "wi"),)
            for site, proj in wi + (("ffn_out", "wo"),):
                m[f + (site, "kernel")] = (f"{ff}.DenseReluDense.{proj}.weight", t)
            m[f + ("ffn_norm", "scale")] = (f"{ff}.layer_norm.weight", i_)
    if not config.tie_word_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", t)
    return m


def abstract_base_params(config: T5Config) -> dict:
    """Shapes and dtypes of the model's params (encoder and decoder), without allocating them."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: T5Model(config).init(jax.random.PRNGKey(0), ids,
                                                       decoder_input_ids=ids))["params"]


def convert_state(config: T5Config, state: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """HF tensors -> our params as numpy arrays; tied copies of `shared` are checked, then dropped."""
    state = dict(state)
    shared = state.get(_SHARED)
    for name in _TIED_COPIES + (("lm_head.weight",) if config.tie_word_embeddings else ()):
        if name in state:
            copy = np.asarray(state.pop(name))
            if shared is not None and (copy.shape != shared.shape or not np.array_equal(copy, shared)):
                raise hf_io.CheckpointError(f"{source}: tensor {name} differs from {_SHARED} although "
                                            "they are tied")
    return hf_io.convert(state, name_map(config), abstract_base_params(config), ignore=IGNORED, source=source)


def load(path: str, config: Optional[T5Config] = None) -> tuple[T5Config, dict]:
    """Reads a HF checkpoint directory: (config, params) with params as numpy float32 arrays."""
    path = str(path)
    if config is None:
        hf_cfg = hf_io.read_config(path)
        try:
            config = T5Config.from_hf(hf_cfg)
        except KeyError as e:
            raise hf_io.CheckpointError(f"{path}/config.json: missing field {e}") from None
        except ValueError as e:  # from_hf's messages start with "config.json: "
            raise hf_io.CheckpointError(f"{path}/{e}") from None
    return config, convert_state(config, hf_io.read_state_dict(path), source=path)


def to_hf_state(config: T5Config, params: Any) -> dict[str, np.ndarray]:
    """Our params -> HF T5ForConditionalGeneration state dict (numpy), the inverse of `load`.

    Tied tables (embed_tokens copies, a tied lm_head) are left out, as HF's save_pretrained does.
    """
    return hf_io.to_hf_state(name_map(config), params)
