"""Prompt tuning (Lester et al. 2021) at the model-level embedding site `prompt`.

n_tokens learned vectors [P, D] are prepended to the embedded sequence, and the attention
mask gets P ones in front: `module(x [B, T, D], mask [B, T]) -> (x' [B, P+T, D], mask' [B, P+T])`.
In BERT the site sits after the embeddings' LayerNorm and dropout (where AdapterHub's
`post_embedding_forward` puts it), in Llama right after the token embedding. The parameter
is `prompt/<name>/embedding`.

Outputs then have P+T positions and the prompt takes positions 0..P-1: read token outputs
at P: (and BERT's pooler reads position 0, the first prompt vector, as in AdapterHub).

Init: 'normal' N(0, init_scale) (default 0.02), 'uniform' U(±init_scale) (AdapterHub's
random_uniform with init_scale=0.5), or from vocabulary ids with `prompt_from_vocab` after
`model.init` (AdapterHub's from_string: the word-embedding rows, cycled to P).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapters_jax.backbones import sites
from adapters_jax.param import param

INITS = ("normal", "uniform")
WORD_TABLES = (("embeddings", "word_embeddings", "embedding"), ("embed_tokens", "embedding"))


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """One soft prompt; AdapterHub's PromptTuningConfig calls n_tokens prompt_length."""
    n_tokens: int = 10
    init: str = "normal"
    init_scale: float = 0.02

    def __post_init__(self):
        if not isinstance(self.n_tokens, int) or self.n_tokens <= 0:
            raise ValueError(f"adapter.n_tokens={self.n_tokens!r} must be a positive integer")
        if self.init not in INITS:
            raise ValueError(f"adapter.init={self.init!r} is not one of {INITS}")


class PromptTuning(nn.Module):
    """The module at `prompt/<name>`: prepends the soft prompt and extends the mask with ones."""
    config: PromptConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        b, d = x.shape[0], x.shape[-1]
        if c.init == "normal":
            init = nn.initializers.normal(c.init_scale)
        else:
            init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -c.init_scale,
                                                                            c.init_scale)
        prompt = param(self, "embedding", init, (c.n_tokens, d))  # [P, D]
        prompt = jnp.broadcast_to(prompt.astype(x.dtype)[None], (b, c.n_tokens, d))
        x = jnp.concatenate([prompt, x], axis=1)  # [B, P+T, D]
        mask = jnp.concatenate([jnp.ones((b, c.n_tokens), mask.dtype), mask], axis=1)  # [B, P+T]
        return x, mask


def prompt_from_vocab(params: Any, spec, token_ids: Sequence[int], norm_eps: Optional[float] = None) -> dict:
    """params with the prompt set to word-embedding rows of `token_ids` (cycled to n_tokens).

    Args:
      params: the adapted model's params (holding the word embedding table and the prompt).
      spec: the spec with the prompt placement.
      token_ids: vocabulary ids, e.g. a tokenized task description (Lester et al.'s init).
      norm_eps: if given and the backbone normalises its embeddings (BERT's
        `embeddings/norm`), pass the rows through that LayerNorm with this epsilon, so they
        sit on the scale of what the site sees; None keeps the raw rows, as AdapterHub does.
    """
    placement = next((p for p in spec.placements if p.method == "prompt"), None)
    if placement is None:
        raise ValueError("prompt_from_vocab: the spec has no prompt placement")
    if len(token_ids) == 0:
        raise ValueError("prompt_from_vocab: token_ids is empty")
    flat = traverse_util.flatten_dict(dict(params))
    table_path = next((t for t in WORD_TABLES if t in flat), None)
    if table_path is None:
        raise ValueError(f"prompt_from_vocab: no word embedding table among {['/'.join(t) for t in WORD_TABLES]}")
    n = placement.config.n_tokens
    ids = np.resize(np.asarray(token_ids, np.int64), n)  # cycles the ids to length n
    rows = jnp.asarray(flat[table_path])[ids]  # [P, D]
    norm = ("embeddings", "norm")
    if norm_eps is not None and norm + ("scale",) in flat:
        mean = rows.mean(-1, keepdims=True)
        var = jnp.square(rows - mean).mean(-1, keepdims=True)
        rows = (rows - mean) * jax.lax.rsqrt(var + norm_eps) * flat[norm + ("scale",)] + flat[norm + ("bias",)]
    target = (sites.EMBED_PROMPT, spec.name, "embedding")
    if target not in flat:
        raise ValueError(f"prompt_from_vocab: params have no {'/'.join(target)} (call model.init first)")
    flat[target] = rows.astype(flat[target].dtype)
    return traverse_util.unflatten_dict(flat)


def _register():
    from adapters_jax.adapters.spec import register
    register("prompt", PromptConfig, PromptTuning, "prompt")


_register()
