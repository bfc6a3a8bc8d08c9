"""Hugging Face Llama checkpoints (LlamaForCausalLM / LlamaModel) <-> our LlamaModel parameters.

HF q/k projection weights are already permuted for the rotate_half RoPE layout that
`llama.rotary` uses, so every Linear converts by a plain transpose. Meta's original
(interleaved-RoPE) consolidated.*.pth files are not read here.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adapters_jax.backbones import hf_io
from adapters_jax.backbones.llama import LlamaConfig, LlamaModel

# Buffers older checkpoints saved that carry no learned state (recomputed from rope_theta).
IGNORED = (r"(model\.)?rotary_emb\.inv_freq", r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_ANCHOR = "embed_tokens.weight"
_LM_HEAD = "lm_head.weight"


def name_map(config: LlamaConfig, prefix: str = "model.") -> dict:
    """flax path -> (HF name, transform) for every parameter.

    `prefix` is "model." for LlamaForCausalLM files and "" for bare LlamaModel ones; the
    names stay those of the file so that errors name the tensor as the user sees it.
    """
    t, i_ = hf_io.transpose, hf_io.identity
    m = {("embed_tokens", "embedding"): (prefix + "embed_tokens.weight", i_),
         ("norm", "scale"): (prefix + "norm.weight", i_)}

    def dense(flax_prefix, hf_prefix, bias):
        m[flax_prefix + ("kernel",)] = (hf_prefix + ".weight", t)
        if bias:
            m[flax_prefix + ("bias",)] = (hf_prefix + ".bias", i_)

    for i in range(config.num_layers):
        f, h = ("layers", f"layer_{i}"), f"{prefix}layers.{i}"
        for site, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                           ("attn_out", "o_proj")):
            dense(f + ("attention", site), f"{h}.self_attn.{proj}", config.attention_bias)
        for site, proj in (("ffn_gate", "gate_proj"), ("ffn_in", "up_proj"), ("ffn_out", "down_proj")):
            dense(f + (site,), f"{h}.mlp.{proj}", config.mlp_bias)
        m[f + ("attention_norm", "scale")] = (f"{h}.input_layernorm.weight", i_)
        m[f + ("ffn_norm", "scale")] = (f"{h}.post_attention_layernorm.weight", i_)
    if not config.tie_word_embeddings:
        m[("lm_head", "kernel")] = (_LM_HEAD, t)
    return m


def abstract_base_params(config: LlamaConfig) -> dict:
    """Shapes and dtypes of the bare decoder's params, without allocating them."""
    model = LlamaModel(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]


def convert_state(config: LlamaConfig, state: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """HF tensors (with or without the `model.` prefix) -> our params as numpy arrays.

    Useful on its own for weights that did not come from a directory (e.g. dequantized GGUF).
    With tied embeddings a saved lm_head.weight must equal the embedding: HF would tie the
    embedding over a different one, and we would rather say so than quietly change the logits.
    """
    prefix = "" if _ANCHOR in state else "model."
    if config.tie_word_embeddings and _LM_HEAD in state:
        head, emb = np.asarray(state[_LM_HEAD]), state.get(prefix + _ANCHOR)
        if emb is not None and (head.shape != emb.shape or not np.array_equal(head, emb)):
            raise hf_io.CheckpointError(f"{source}: tensor {_LM_HEAD} differs from {prefix}{_ANCHOR} "
                                        "although tie_word_embeddings is true")
        state = {k: v for k, v in state.items() if k != _LM_HEAD}
    return hf_io.convert(state, name_map(config, prefix), abstract_base_params(config),
                         ignore=IGNORED, source=source)


def load(path: str, config: Optional[LlamaConfig] = None) -> tuple[LlamaConfig, dict]:
    """Reads a HF checkpoint directory: (config, params) with params as numpy float32 arrays."""
    path = str(path)
    hf_cfg = hf_io.read_config(path)
    if config is None:
        try:
            config = LlamaConfig.from_hf(hf_cfg)
        except KeyError as e:
            raise hf_io.CheckpointError(f"{path}/config.json: missing field {e}") from None
        except ValueError as e:  # from_hf's messages start with "config.json: "
            raise hf_io.CheckpointError(f"{path}/{e}") from None
    return config, convert_state(config, hf_io.read_state_dict(path), source=path)


def to_hf_state(config: LlamaConfig, params: Any) -> dict[str, np.ndarray]:
    """Our params -> HF LlamaForCausalLM state dict (numpy), the inverse of `load`.

    A tied head is left out, as HF's save_pretrained does.
    """
    return hf_io.to_hf_state(name_map(config), params)
