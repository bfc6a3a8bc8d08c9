"""Greedy decoding for decoders that return next-token logits, one buffer shape for all steps.

No KV cache: every step reruns the model over a fixed-length buffer [B, L] (L = longest
prompt + max_new_tokens, or `length`). Causal attention makes the logits at position t
depend only on tokens <= t, so the unwritten tail of the buffer never changes what is read,
and the one buffer shape means a jitted `logits_fn` compiles once. Fine for tests, demos
and short continuations.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np


def greedy(logits_fn: Callable[[np.ndarray], jnp.ndarray], prompts: Sequence[Sequence[int]],
           max_new_tokens: int, eos_id: Optional[int] = None, pad_id: int = 0,
           length: Optional[int] = None) -> list[list[int]]:
    """The greedy continuation (new tokens only, stopping after eos) of each prompt.

    Args:
      logits_fn: ids [B, L] int32 -> logits [B, L', V] with L' >= L (any prompt-tuning tokens
        in front are dropped by taking the last L positions). Pass a jitted function.
      prompts: token ids per row (each non-empty).
      max_new_tokens: how many tokens to add at most.
      eos_id: stop a row once it emits this id (the id is kept in its output).
      pad_id: fills the unwritten buffer (never attended to by written positions).
      length: buffer length L, to share one compiled shape with other calls (default: the least).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy: every prompt needs at least one token")
    need = max(len(p) for p in prompts) + max_new_tokens
    if length is not None and length < need:
        raise ValueError(f"greedy: length={length} is shorter than prompt + max_new_tokens = {need}")
    b, length = len(prompts), length or need
    buf = np.full((b, length), pad_id, np.int32)  # [B, L]
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    cur = np.asarray([len(p) for p in prompts])  # [B] next write position
    out = [[] for _ in prompts]
    done = np.zeros(b, bool)
    for _ in range(max_new_tokens):
        logits = np.asarray(logits_fn(buf))[:, -length:]  # [B, L, V]
        nxt = logits[np.arange(b), cur - 1].argmax(-1)  # [B]
        for i in np.where(~done)[0]:
            buf[i, cur[i]] = nxt[i]
            out[i].append(int(nxt[i]))
            cur[i] += 1
            done[i] = eos_id is not None and nxt[i] == eos_id
        if done.all():
            break
    return out
