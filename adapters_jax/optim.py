"""AdamW with warmup and linear or cosine decay, a weight-decay mask, clipping, and freezing.

The decay mask spares biases and norm scales (as BERT's recipe does). The whole optimizer is
wrapped in `peft.optimizer`, so frozen leaves get `set_to_zero` and no optimizer state.
"""
from __future__ import annotations

import jax
import optax

from adapters_jax import peft

SCHEDULES = ("linear", "cosine", "constant")


def schedule(lr: float, total_steps: int, warmup_steps: int, kind: str = "linear") -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then `kind` decay to 0 at `total_steps`."""
    if lr <= 0:
        raise ValueError(f"optim.lr={lr} must be > 0")
    if kind not in SCHEDULES:
        raise ValueError(f"optim.schedule={kind!r} is not one of {SCHEDULES}")
    warmup_steps = min(max(int(warmup_steps), 0), max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def decay_mask(params):
    """True for leaves that take weight decay: kernels and embeddings, not biases or norms.

    A function of the tree it is given, so that it also works on the MaskedNode-holed tree
    that multi_transform hands the inner optimizer.
    """
    def decays(path, _):
        keys = [str(getattr(k, "key", k)) for k in path]
        return not (keys[-1] in ("bias", "scaling") or "norm" in "/".join(keys[-2:]).lower())
    return jax.tree_util.tree_map_with_path(decays, params)


def make(params, labels, *, lr: float, total_steps: int, warmup_steps: int = 0,
         schedule_kind: str = "linear", weight_decay: float = 0.01, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, clip_norm: float | None = 1.0):
    """(optimizer over the full param tree, lr schedule)."""
    sched = schedule(lr, total_steps, warmup_steps, schedule_kind)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return peft.optimizer(optax.chain(*parts), labels), sched


def count_state_leaves(opt_state) -> int:
    """Array leaves in an optimizer state (MaskedNode placeholders of frozen params hold none)."""
    return len([x for x in jax.tree_util.tree_leaves(opt_state) if hasattr(x, "shape") and x.ndim > 0])
