"""Hugging Face ViTModel checkpoints <-> our ViTModel parameters, and writing such directories.

`save` writes config.json + model.safetensors that both `load` and transformers'
ViTModel.from_pretrained read, so a ViT trained here from scratch becomes an ordinary
pretrained base for a later adapter run (`load_backbone(directory)`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adapters_jax.backbones import hf_io
from adapters_jax.backbones.vit import ViTConfig, ViTModel

# Tensors a HF checkpoint may carry that the bare encoder does not use (heads, mask token).
IGNORED = (r"classifier\..*", r"embeddings\.mask_token", r"decoder\..*")
_PREFIXES = ("vit.",)
_ANCHOR = "embeddings.cls_token"


def conv_to_dense(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [D, C, p, p] -> Dense kernel [p*p*C, D] in `patchify`'s (ph, pw, c) order."""
    if w.ndim != 4:
        return w  # the shape check in hf_io.convert then names the tensor
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]))


def name_map(config: ViTConfig) -> dict:
    """flax path -> (HF name, transform) for every encoder parameter."""
    t, i_ = hf_io.transpose, hf_io.identity
    m = {}

    def ln(flax_prefix, hf_prefix):
        m[flax_prefix + ("scale",)] = (hf_prefix + ".weight", i_)
        m[flax_prefix + ("bias",)] = (hf_prefix + ".bias", i_)

    def dense(flax_prefix, hf_prefix, bias=True):
        m[flax_prefix + ("kernel",)] = (hf_prefix + ".weight", t)
        if bias:
            m[flax_prefix + ("bias",)] = (hf_prefix + ".bias", i_)

    m[("embeddings", "cls_token")] = ("embeddings.cls_token", i_)  # [1, 1, D] on both sides
    m[("embeddings", "position_embeddings")] = ("embeddings.position_embeddings", i_)  # [1, N+1, D]
    m[("embeddings", "patch_embed", "kernel")] = ("embeddings.patch_embeddings.projection.weight",
                                                  conv_to_dense)
    m[("embeddings", "patch_embed", "bias")] = ("embeddings.patch_embeddings.projection.bias", i_)
    for i in range(config.num_layers):
        f, h = ("encoder", f"layer_{i}"), f"encoder.layer.{i}"
        ln(f + ("attention_norm",), f"{h}.layernorm_before")
        for site in ("query", "key", "value"):
            dense(f + ("attention", site), f"{h}.attention.attention.{site}", config.qkv_bias)
        dense(f + ("attention", "attn_out"), f"{h}.attention.output.dense")
        ln(f + ("ffn_norm",), f"{h}.layernorm_after")
        dense(f + ("ffn_in",), f"{h}.intermediate.dense")
        dense(f + ("ffn_out",), f"{h}.output.dense")
    ln(("norm",), "layernorm")
    if config.add_pooler:
        dense(("pooler",), "pooler.dense")
    return m


def abstract_base_params(config: ViTConfig) -> dict:
    """Shapes and dtypes of the bare encoder's params, without allocating them."""
    model = ViTModel(config)
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))["params"]


def load(path: str, config: Optional[ViTConfig] = None) -> tuple[ViTConfig, dict]:
    """Reads a HF ViT checkpoint directory: (config, params) with params as numpy float32 arrays."""
    path = str(path)
    state = hf_io.strip_prefix(hf_io.read_state_dict(path), _ANCHOR, _PREFIXES)
    if config is None:
        config = ViTConfig.from_hf(hf_io.read_config(path))
        if "pooler.dense.weight" not in state:
            config = ViTConfig(**{**config.__dict__, "add_pooler": False})
    params = hf_io.convert(state, name_map(config), abstract_base_params(config),
                           ignore=IGNORED, source=path)
    return config, params


def to_hf_state(config: ViTConfig, params: Any) -> dict[str, np.ndarray]:
    """Our encoder params -> HF ViTModel state dict (numpy float32), the inverse of `load`."""
    state = hf_io.to_hf_state({k: v for k, v in name_map(config).items() if k[-2] != "patch_embed"}, params)
    kernel = np.asarray(params["embeddings"]["patch_embed"]["kernel"], np.float32)  # [p*p*C, D]
    p, ch = config.patch_size, config.num_channels
    state["embeddings.patch_embeddings.projection.weight"] = np.ascontiguousarray(
        kernel.reshape(p, p, ch, -1).transpose(3, 2, 0, 1))  # [D, C, p, p]
    state["embeddings.patch_embeddings.projection.bias"] = np.asarray(
        params["embeddings"]["patch_embed"]["bias"], np.float32)
    return state


def save(directory: str, config: ViTConfig, params: Any) -> str:
    """Writes config.json + model.safetensors (HF ViTModel layout); returns the directory.

    Written to a temporary sibling and renamed, so a reader never sees half a checkpoint.
    """
    from safetensors.numpy import save_file
    import shutil
    directory = os.path.abspath(directory)
    tmp = f"{directory}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(to_hf_state(config, jax.device_get(params)), os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)
    return directory


def scratch_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int, mlp: int,
                   channels: int = 1, dropout: float = 0.0) -> ViTConfig:
    """A ViTConfig from the short names configs use (`model.vit=dict(...)`), without a pooler."""
    return ViTConfig(image_size=image_size, patch_size=patch_size, num_channels=channels,
                     hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=mlp,
                     layer_norm_eps=1e-6, hidden_dropout=dropout, add_pooler=False)


SCRATCH_FIELDS = ("image_size", "patch_size", "hidden", "layers", "heads", "mlp", "channels", "dropout")


def scratch_dir(directory: str, options, seed: int = 0) -> str:
    """`write_scratch` from config options (model.vit); a missing or unknown field is one line."""
    if not options:
        raise ValueError("model.name='vit-scratch' needs model.vit=dict(image_size=, patch_size=, hidden=, "
                         "layers=, heads=, mlp=)")
    options = dict(options)
    unknown = sorted(set(options) - set(SCRATCH_FIELDS))
    missing = [k for k in SCRATCH_FIELDS[:6] if k not in options]
    if unknown or missing:
        raise ValueError(f"model.vit: {'unknown field ' + unknown[0] if unknown else 'missing field ' + missing[0]}"
                         f" (fields: {', '.join(SCRATCH_FIELDS)})")
    return write_scratch(directory, scratch_config(**options), seed)


def write_scratch(directory: str, config: ViTConfig, seed: int = 0) -> str:
    """A freshly initialised ViT (our own init, seeded) saved as a HF checkpoint directory.

    Rewritten only when missing or when its config differs, so a resumed run finds the same
    base (and the same content hash) it started from.
    """
    cfg_file = os.path.join(directory, "config.json")
    if os.path.exists(os.path.join(directory, "model.safetensors")) and os.path.exists(cfg_file):
        with open(cfg_file) as f:
            if json.load(f) == json.loads(json.dumps(config.to_hf())):
                return directory
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    params = jax.jit(ViTModel(config).init)(jax.random.PRNGKey(seed), x)["params"]
    return save(directory, config, params)
