"""Freezing is data: (regex, label) rules over '/'-joined parameter paths.

`re.fullmatch`, first match wins, and every parameter must be matched: a parameter no rule
covers is an error that names it, never a silent default (big_vision's optax.py does the same).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from flax import traverse_util

Rule = tuple[str, str]


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def flat_paths(params: Any) -> list[str]:
    return [path_str(p) for p in traverse_util.flatten_dict(dict(params))]


def label_of(path: str, compiled: Sequence[tuple[re.Pattern, str]]) -> str | None:
    for pattern, label in compiled:
        if pattern.fullmatch(path):
            return label
    return None


def labels_for(params: Any, rules: Sequence[Rule]) -> dict:
    """A tree of labels with the structure of `params` (nested dicts of arrays).

    Raises:
      ValueError naming the parameters that no rule matches.
    """
    compiled = [(re.compile(rx), label) for rx, label in rules]
    flat = traverse_util.flatten_dict(dict(params))
    labels, unmatched = {}, []
    for path in flat:
        label = label_of(path_str(path), compiled)
        if label is None:
            unmatched.append(path_str(path))
        labels[path] = label
    if unmatched:
        more = f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else ""
        raise ValueError(f"no freezing rule matches parameter {', '.join(unmatched[:3])}{more}")
    return traverse_util.unflatten_dict(labels)
