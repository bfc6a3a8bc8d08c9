"""Hugging Face BERT / RoBERTa / MiniLM checkpoints <-> our BertModel parameters."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adapters_jax.backbones import hf_io
from adapters_jax.backbones.bert import BertConfig, BertModel

# Tensors a HF checkpoint may carry that the bare encoder does not use (buffers and heads).
IGNORED = (r"embeddings\.position_ids", r"cls\..*", r"lm_head\..*", r"classifier\..*",
           r"qa_outputs\..*", r"pooler\..*")
_PREFIXES = ("bert.", "roberta.", "xlm_roberta.", "model.")
_ANCHOR = "embeddings.word_embeddings.weight"


def name_map(config: BertConfig) -> dict:
    """flax path -> (HF name, transform) for every encoder parameter."""
    t, i_ = hf_io.transpose, hf_io.identity
    m = {}

    def ln(flax_prefix, hf_prefix):
        m[flax_prefix + ("scale",)] = (hf_prefix + ".weight", i_)
        m[flax_prefix + ("bias",)] = (hf_prefix + ".bias", i_)

    def dense(flax_prefix, hf_prefix):
        m[flax_prefix + ("kernel",)] = (hf_prefix + ".weight", t)
        m[flax_prefix + ("bias",)] = (hf_prefix + ".bias", i_)

    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        m[("embeddings", name, "embedding")] = (f"embeddings.{name}.weight", i_)
    ln(("embeddings", "norm"), "embeddings.LayerNorm")
    for i in range(config.num_layers):
        f, h = ("encoder", f"layer_{i}"), f"encoder.layer.{i}"
        for site in ("query", "key", "value"):
            dense(f + ("attention", site), f"{h}.attention.self.{site}")
        dense(f + ("attention", "attn_out"), f"{h}.attention.output.dense")
        ln(f + ("attention_norm",), f"{h}.attention.output.LayerNorm")
        dense(f + ("ffn_in",), f"{h}.intermediate.dense")
        dense(f + ("ffn_out",), f"{h}.output.dense")
        ln(f + ("ffn_norm",), f"{h}.output.LayerNorm")
    if config.add_pooler:
        dense(("pooler",), "pooler.dense")
    return m


def _legacy_names(state: dict) -> dict:
    """Old TF-converted checkpoints call LayerNorm parameters gamma/beta."""
    return {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
            for k, v in state.items()}


def abstract_base_params(config: BertConfig) -> dict:
    """Shapes and dtypes of the bare encoder's params, without allocating them."""
    model = BertModel(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]


def load(path: str, config: Optional[BertConfig] = None) -> tuple[BertConfig, dict]:
    """Reads a HF checkpoint directory: (config, params) with params as numpy float32 arrays."""
    path = str(path)
    hf_cfg = hf_io.read_config(path)
    state = _legacy_names(hf_io.read_state_dict(path))
    state = hf_io.strip_prefix(state, _ANCHOR, _PREFIXES)
    if config is None:
        config = BertConfig.from_hf(hf_cfg)
        if "pooler.dense.weight" not in state:
            config = BertConfig(**{**config.__dict__, "add_pooler": False})
    params = hf_io.convert(state, name_map(config), abstract_base_params(config),
                           ignore=IGNORED, source=path)
    return config, params


def to_hf_state(config: BertConfig, params: Any) -> dict[str, np.ndarray]:
    """Our encoder params -> HF BertModel state dict (numpy), the inverse of `load`."""
    return hf_io.to_hf_state(name_map(config), params)
