"""Tokenization with the `tokenizers` library, from a checkpoint's tokenizer.json or vocab.txt.

Padding and truncation are always explicit: checkpoints such as all-MiniLM-L6-v2 ship a
tokenizer.json that forces padding and truncation to 128, which we switch off and replace
with the caller's own `max_length` and padding policy.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors


@dataclasses.dataclass
class Encoded:
    """A padded batch, every array [B, T]."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _wordpiece_from_vocab(vocab_path: str, lowercase: bool) -> tokenizers.Tokenizer:
    """Builds BERT's WordPiece tokenizer from a bare vocab.txt (as BertTokenizerFast does)."""
    tok = tokenizers.Tokenizer(models.WordPiece.from_file(vocab_path, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None,
                                                clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"{vocab_path}: vocab has no [CLS] or [SEP] token")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    return tok


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with explicit padding and truncation.

    Args:
      tok: the underlying tokenizer (its own padding/truncation settings are cleared).
      pad_id: id used for padding; taken from the tokenizer when it knows one.
    """

    def __init__(self, tok: tokenizers.Tokenizer, pad_id: Optional[int] = None,
                 eos_id: Optional[int] = None):
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.eos_id = None if eos_id is None else int(eos_id)  # ends LM training rows, stops generation
        if pad_id is None:
            for name in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
                pad_id = tok.token_to_id(name)
                if pad_id is not None:
                    break
        self.pad_id = 0 if pad_id is None else int(pad_id)

    @classmethod
    def from_dir(cls, path: str, lowercase: Optional[bool] = None) -> "Tokenizer":
        """Loads tokenizer.json if present, else vocab.txt (WordPiece, BERT style)."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        pad_id = eos_id = None
        cfg_path = os.path.join(path, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                hf_cfg = json.load(f)
            pad_id, eos_id = hf_cfg.get("pad_token_id"), hf_cfg.get("eos_token_id")
            eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if os.path.exists(tj):
            return cls(tokenizers.Tokenizer.from_file(tj), pad_id=pad_id, eos_id=eos_id)
        vocab = os.path.join(path, "vocab.txt")
        if os.path.exists(vocab):
            if lowercase is None:
                lowercase = True
                tc = os.path.join(path, "tokenizer_config.json")
                if os.path.exists(tc):
                    with open(tc) as f:
                        lowercase = bool(json.load(f).get("do_lower_case", True))
            return cls(_wordpiece_from_vocab(vocab, lowercase), pad_id=pad_id)
        raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt")

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        """The byte-level BPE tokenizer stored in a GGUF file's tokenizer.ggml.* metadata."""
        from adapters_jax.backbones import gguf_io
        path = os.fspath(path)
        tok, info = gguf_io.tokenizer_from_gguf(gguf_io.reader(path), path)
        return cls(tok, pad_id=info["pad_id"], eos_id=info["eos_id"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_ids(self, text: str, text_pair: Optional[str] = None,
                   max_length: Optional[int] = None,
                   add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """One example, unpadded: (ids, type_ids), truncated to `max_length` if given.

        Pairs are truncated longest-first, as transformers does by default.
        """
        if max_length is None:
            self._tok.no_truncation()
        else:
            self._tok.enable_truncation(max_length, strategy="longest_first")
        enc = self._tok.encode(text, text_pair, add_special_tokens=add_special_tokens)
        return list(enc.ids), list(enc.type_ids)

    def lengths(self, texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None,
                max_length: Optional[int] = None) -> np.ndarray:
        """[N] token counts of `encode_ids` for many rows at once (the Rust tokenizer's threads)."""
        if max_length is None:
            self._tok.no_truncation()
        else:
            self._tok.enable_truncation(max_length, strategy="longest_first")
        inputs = list(texts) if text_pairs is None else list(zip(texts, text_pairs))
        return np.asarray([len(e.ids) for e in self._tok.encode_batch(inputs)], np.int64)

    def __call__(self, texts: Sequence[str], text_pairs: Optional[Sequence[str]] = None,
                 max_length: int = 128, padding: str = "longest",
                 pad_to_multiple_of: Optional[int] = None) -> Encoded:
        """A padded batch.

        Args:
          texts: the first segments.
          text_pairs: optional second segments (sentence pairs), same length as `texts`.
          max_length: truncation length (special tokens included).
          padding: 'longest' (pad to the longest row) or 'max_length'.
          pad_to_multiple_of: round the padded length up to a multiple of this.
        """
        if isinstance(texts, str):
            texts = [texts]
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"text_pairs has {len(text_pairs)} rows but texts has {len(texts)}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        rows = [self.encode_ids(t, None if text_pairs is None else text_pairs[i], max_length)
                for i, t in enumerate(texts)]
        length = max_length if padding == "max_length" else max(len(r[0]) for r in rows)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        return pad_rows(rows, length, self.pad_id)


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], length: int, pad_id: int) -> Encoded:
    """Right-pads (ids, type_ids) rows to `length`: arrays [B, length]."""
    b = len(rows)
    ids = np.full((b, length), pad_id, np.int32)
    types = np.zeros((b, length), np.int32)
    mask = np.zeros((b, length), np.int32)
    for i, (r_ids, r_types) in enumerate(rows):
        n = min(len(r_ids), length)
        ids[i, :n] = r_ids[:n]
        types[i, :n] = r_types[:n]
        mask[i, :n] = 1
    return Encoded(input_ids=ids, attention_mask=mask, token_type_ids=types)
