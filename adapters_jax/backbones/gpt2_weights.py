"""Hugging Face GPT-2 checkpoints (GPT2LMHeadModel / GPT2Model) <-> our GPT2Model parameters.

HF GPT-2 stores its projections as Conv1D weights [in, out], the layout of a flax kernel, so
they convert without a transpose. The fused `c_attn` ([D, 3D] and bias [3D], columns q|k|v)
is split into the query/key/value sites on the way in and concatenated on the way out.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapters_jax.backbones import hf_io
from adapters_jax.backbones.gpt2 import GPT2Config, GPT2Model

# Causal-mask buffers that older checkpoints saved (the original OpenAI files among them).
IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",)
_ANCHOR = "wte.weight"
_LM_HEAD = "lm_head.weight"
_QKV = ("query", "key", "value")


def _columns(j: int, d: int):
    """Takes slice j (of 3) of a fused c_attn tensor's last axis. A tensor whose last axis is
    not 3*d is passed through whole, so that the shape check names it."""
    def take(x: np.ndarray) -> np.ndarray:
        return x[..., j * d:(j + 1) * d] if x.shape[-1] == 3 * d else x
    return take


def name_map(config: GPT2Config, prefix: str = "transformer.") -> dict:
    """flax path -> (HF name, transform) for every parameter.

    `prefix` is "transformer." for GPT2LMHeadModel files and "" for bare GPT2Model ones (the
    original OpenAI checkpoints); names stay those of the file so that errors name them.
    """
    i_, d = hf_io.identity, config.hidden_size
    m = {("wte", "embedding"): (prefix + "wte.weight", i_),
         ("wpe", "embedding"): (prefix + "wpe.weight", i_),
         ("norm", "scale"): (prefix + "ln_f.weight", i_),
         ("norm", "bias"): (prefix + "ln_f.bias", i_)}
    for i in range(config.num_layers):
        f, h = ("layers", f"layer_{i}"), f"{prefix}h.{i}"
        for j, site in enumerate(_QKV):
            m[f + ("attention", site, "kernel")] = (f"{h}.attn.c_attn.weight", _columns(j, d))
            m[f + ("attention", site, "bias")] = (f"{h}.attn.c_attn.bias", _columns(j, d))
        for flax_path, hf_name in ((("attention", "attn_out"), "attn.c_proj"), (("ffn_in",), "mlp.c_fc"),
                                   (("ffn_out",), "mlp.c_proj")):
            m[f + flax_path + ("kernel",)] = (f"{h}.{hf_name}.weight", i_)  # Conv1D: already [in, out]
            m[f + flax_path + ("bias",)] = (f"{h}.{hf_name}.bias", i_)
        for norm, ln in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            m[f + (norm, "scale")] = (f"{h}.{ln}.weight", i_)
            m[f + (norm, "bias")] = (f"{h}.{ln}.bias", i_)
    if not config.tie_word_embeddings:
        m[("lm_head", "kernel")] = (_LM_HEAD, hf_io.transpose)  # an nn.Linear, [V, D]
    return m


def abstract_base_params(config: GPT2Config) -> dict:
    """Shapes and dtypes of the bare decoder's params, without allocating them."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: GPT2Model(config).init(jax.random.PRNGKey(0), ids))["params"]


def convert_state(config: GPT2Config, state: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """HF tensors (with or without the `transformer.` prefix) -> our params as numpy arrays.

    With tied embeddings a saved lm_head.weight must equal wte: we refuse rather than
    quietly compute other logits than the file's head would.
    """
    prefix = "" if _ANCHOR in state else "transformer."
    if config.tie_word_embeddings and _LM_HEAD in state:
        head, emb = np.asarray(state[_LM_HEAD]), state.get(prefix + _ANCHOR)
        if emb is not None and (head.shape != emb.shape or not np.array_equal(head, emb)):
            raise hf_io.CheckpointError(f"{source}: tensor {_LM_HEAD} differs from {prefix}{_ANCHOR} "
                                        "although tie_word_embeddings is true")
        state = {k: v for k, v in state.items() if k != _LM_HEAD}
    return hf_io.convert(state, name_map(config, prefix), abstract_base_params(config),
                         ignore=IGNORED, source=source)


def load(path: str, config: Optional[GPT2Config] = None) -> tuple[GPT2Config, dict]:
    """Reads a HF checkpoint directory: (config, params) with params as numpy float32 arrays."""
    path = str(path)
    if config is None:
        hf_cfg = hf_io.read_config(path)
        try:
            config = GPT2Config.from_hf(hf_cfg)
        except KeyError as e:
            raise hf_io.CheckpointError(f"{path}/config.json: missing field {e}") from None
        except ValueError as e:  # from_hf's messages start with "config.json: "
            raise hf_io.CheckpointError(f"{path}/{e}") from None
    return config, convert_state(config, hf_io.read_state_dict(path), source=path)


def to_hf_state(config: GPT2Config, params: Any) -> dict[str, np.ndarray]:
    """Our params -> HF GPT2LMHeadModel state dict (numpy), the inverse of `load`.

    query/key/value are concatenated back into c_attn; a tied head is left out, as HF's
    save_pretrained does.
    """
    full = name_map(config)
    plain = {p: v for p, v in full.items() if not (len(p) > 3 and p[-2] in _QKV)}
    out = hf_io.to_hf_state(plain, params)
    flat = traverse_util.flatten_dict(dict(params))
    for i in range(config.num_layers):
        f = ("layers", f"layer_{i}", "attention")
        for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
            parts = [np.asarray(flat[f + (site, leaf)], np.float32) for site in _QKV]
            out[f"transformer.h.{i}.attn.c_attn.{suffix}"] = np.concatenate(parts, axis=-1)
    return out
