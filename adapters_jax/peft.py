"""Rules -> labels -> optax.multi_transform, and the trainable/frozen split.

The train step differentiates `loss(trainable, frozen, batch)` with respect to `trainable`
alone, so XLA never builds the frozen base's weight-gradient matmuls, and the optimizer
keeps state only for trainable leaves (`set_to_zero` is stateless, and multi_transform hands
the inner optimizer MaskedNodes in place of frozen leaves).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import optax
from flax import traverse_util

from adapters_jax import rules as rules_lib
from adapters_jax.backbones import sites

TRAINABLE, FROZEN = "trainable", "frozen"
_SITE_NAMES = "|".join(sites.ALL_SITES)


def adapter_rules(adapter_names: Sequence[str]) -> list[rules_lib.Rule]:
    """Rules that train the named adapters' own parameters wherever they sit."""
    names = "|".join(re.escape(n) for n in adapter_names)
    return [(rf"(.*/)?({_SITE_NAMES})/({names})/.*", TRAINABLE),
            (rf"(.*/)?shared_adapters/({names})/.*", TRAINABLE)]


def make_rules(adapter_names: Sequence[str] = (), *, train_head: bool = True,
               train_layernorm: bool = False, train_bias: bool = False,
               train_all: bool = False, extra: Sequence[rules_lib.Rule] = ()) -> list[rules_lib.Rule]:
    """The standard rule list: extra rules first, then adapters, options, and 'freeze the rest'.

    Args:
      adapter_names: adapters to train.
      train_head: train the task head (`head/...`).
      train_layernorm: also train the base's LayerNorms (as Houlsby et al. did).
      train_bias: also train every bias (BitFit).
      train_all: full fine-tuning.
    """
    out = list(extra)
    if train_all:
        return out + [(r".*", TRAINABLE)]
    if adapter_names:
        out += adapter_rules(adapter_names)
    if train_head:
        out.append((r"head/.*", TRAINABLE))
    if train_layernorm:
        out.append((r".*(norm|LayerNorm)[^/]*/(scale|bias)", TRAINABLE))
    if train_bias:
        out.append((r".*/bias", TRAINABLE))
    return out + [(r".*", FROZEN)]


def split(params: Any, labels: Any) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts that together hold every leaf once."""
    flat_p = traverse_util.flatten_dict(dict(params))
    flat_l = traverse_util.flatten_dict(dict(labels))
    tr = {k: v for k, v in flat_p.items() if flat_l[k] == TRAINABLE}
    fr = {k: v for k, v in flat_p.items() if flat_l[k] != TRAINABLE}
    return traverse_util.unflatten_dict(tr), traverse_util.unflatten_dict(fr)


def merge(trainable: Any, frozen: Any) -> dict:
    """The inverse of `split`."""
    flat = traverse_util.flatten_dict(dict(frozen))
    flat.update(traverse_util.flatten_dict(dict(trainable)))
    return traverse_util.unflatten_dict(flat)


def optimizer(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
    """`tx` on trainable leaves, `set_to_zero` on frozen ones."""
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
