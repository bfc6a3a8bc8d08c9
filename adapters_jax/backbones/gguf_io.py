"""GGUF files (llama.cpp's format) -> our LlamaModel params, LlamaConfig and tokenizer.

Quantized tensors are dequantized to float32 with `gguf.quants.dequantize`; after that the
model is an ordinary float32 Llama (the quantization error stays in the weights, no quantized
matmuls). llama.cpp's converter permutes the q/k projection rows for its interleaved RoPE;
`_unpermute` undoes it exactly as transformers' GGUF loader does, giving back Hugging Face's
rotate_half layout that `llama.rotary` expects. Every problem is one line naming the file.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from adapters_jax.backbones import hf_io

ARCHITECTURES = ("llama",)
# GGUF tensor name -> HF LlamaForCausalLM name ({i}: block index)
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def reader(path: str):
    """An opened `gguf.GGUFReader` (memory-mapped; nothing is dequantized yet)."""
    try:
        import gguf
    except ImportError:
        raise hf_io.CheckpointError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from None
    if not os.path.isfile(path):
        raise hf_io.CheckpointError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated file, ...
        raise hf_io.CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(r, key: str, path: str, default=None, required: bool = True):
    """A metadata value (scalar, string or list); missing required keys are one-line errors."""
    f = r.fields.get(key)
    if f is None:
        if required and default is None:
            raise hf_io.CheckpointError(f"{path}: GGUF metadata has no {key}")
        return default
    return f.contents()


def config_from_gguf(r, path: str):
    """LlamaConfig from the `llama.*` metadata; tied embeddings when there is no output.weight."""
    from adapters_jax.backbones.llama import LlamaConfig
    arch = field(r, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise hf_io.CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    if field(r, f"{arch}.rope.scaling.type", path, required=False) not in (None, "none"):
        raise hf_io.CheckpointError(f"{path}: {arch}.rope.scaling.type is not supported (only plain RoPE)")
    names = {t.name for t in r.tensors}
    if "rope_freqs.weight" in names:
        raise hf_io.CheckpointError(f"{path}: tensor rope_freqs.weight (Llama 3.1 rope scaling) is not supported")
    heads = int(field(r, f"{arch}.attention.head_count", path))
    hidden = int(field(r, f"{arch}.embedding_length", path))
    tokens = field(r, "tokenizer.ggml.tokens", path, required=False)
    vocab = field(r, f"{arch}.vocab_size", path, required=False) or (len(tokens) if tokens else None)
    if vocab is None:
        raise hf_io.CheckpointError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    head_dim = field(r, f"{arch}.attention.key_length", path, required=False)
    try:
        return LlamaConfig(
            vocab_size=int(vocab), hidden_size=hidden, num_layers=int(field(r, f"{arch}.block_count", path)),
            num_heads=heads, num_kv_heads=int(field(r, f"{arch}.attention.head_count_kv", path, default=heads)),
            head_dim=None if head_dim is None else int(head_dim),
            intermediate_size=int(field(r, f"{arch}.feed_forward_length", path)),
            max_position_embeddings=int(field(r, f"{arch}.context_length", path, default=2048)),
            rms_norm_eps=float(field(r, f"{arch}.attention.layer_norm_rms_epsilon", path, default=1e-5)),
            rope_theta=float(field(r, f"{arch}.rope.freq_base", path, default=10000.0)),
            attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
            tie_word_embeddings="output.weight" not in names, model_type="llama")
    except ValueError as e:
        raise hf_io.CheckpointError(f"{path}: {e}") from None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: [H*Dh, ...] interleaved -> rotate_half halves."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def hf_name(gguf_name: str, path: str) -> str:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK:
        raise hf_io.CheckpointError(f"{path}: unexpected GGUF tensor {gguf_name}")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def state_from_gguf(r, config, path: str) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 and renamed to HF's LlamaForCausalLM names.

    Shapes come out in torch's [out, in] layout (ggml lists dims fastest-first).
    """
    from gguf import quants
    state = {}
    for t in r.tensors:
        name = hf_name(t.name, path)
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError:
            raise hf_io.CheckpointError(f"{path}: tensor {t.name} has quantization type "
                                        f"{t.tensor_type.name}, which gguf cannot dequantize") from None
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            w = _unpermute(w, config.num_heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            w = _unpermute(w, config.num_kv_heads)
        state[name] = w
    return state


def tokenizer_from_gguf(r, path: str):
    """A `tokenizers.Tokenizer` from tokenizer.ggml.* (gpt2-style byte-level BPE only).

    Built as transformers' GGUF converter builds it (BPE over the stored vocab and merges,
    ByteLevel pre-tokenizer without a prefix space, special tokens from token_type == 3),
    but with no BOS template: the file's add_bos_token decides that, and is honoured.
    Returns (tokenizer, {'bos_id', 'eos_id', 'pad_id', 'add_bos'}).
    """
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    kind = field(r, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise hf_io.CheckpointError(f"{path}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2' "
                                    "byte-level BPE)")
    tokens = field(r, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in field(r, "tokenizer.ggml.merges", path)]
    unk = field(r, "tokenizer.ggml.unknown_token_id", path, required=False)
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False,
                     unk_token=None if unk is None else tokens[int(unk)])
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = field(r, "tokenizer.ggml.token_type", path, required=False)
    if types is not None:
        tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                                for i in np.where(np.asarray(types) == 3)[0]])
    ids = {k: field(r, f"tokenizer.ggml.{k}_token_id", path, required=False) for k in ("bos", "eos", "padding")}
    add_bos = bool(field(r, "tokenizer.ggml.add_bos_token", path, default=False, required=False))
    if add_bos and ids["bos"] is not None:
        bos = tokens[int(ids["bos"])]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                           special_tokens=[(bos, int(ids["bos"]))])
    info = {"bos_id": ids["bos"], "eos_id": ids["eos"], "pad_id": ids["padding"], "add_bos": add_bos}
    return tok, {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in info.items()}


def load(path: str, config=None):
    """(config, params) from a GGUF file: params as numpy float32 in our LlamaModel layout."""
    from adapters_jax.backbones import llama_weights
    path = os.fspath(path)
    r = reader(path)
    config = config or config_from_gguf(r, path)
    return config, llama_weights.convert_state(config, state_from_gguf(r, config, path), source=path)


def is_gguf(path: Optional[str]) -> bool:
    return bool(path) and str(path).endswith(".gguf") and os.path.isfile(str(path))


def load_with_tokenizer(path: str):
    """(config, params, Tokenizer) from one read of the file (opening one costs seconds)."""
    from adapters_jax.backbones import llama_weights
    from adapters_jax.tokenization import Tokenizer
    path = os.fspath(path)
    r = reader(path)
    config = config_from_gguf(r, path)
    params = llama_weights.convert_state(config, state_from_gguf(r, config, path), source=path)
    tok, info = tokenizer_from_gguf(r, path)
    return config, params, Tokenizer(tok, pad_id=info["pad_id"], eos_id=info["eos_id"])
