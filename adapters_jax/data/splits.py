"""Fixed, hash-based train/validation/test assignment.

A row's split is a pure function of a group key (a movie name, a file name, a normalised
tweet text) and a salt, so every row of a group lands in the same split (no leakage of a
movie's reviews, or of a retweeted text, across splits), the split never depends on row
order, and it is the same on every machine and Python version (sha256, not `hash()`).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

SPLITS = ("train", "validation", "test")
FRACTIONS = (0.8, 0.1, 0.1)


def unit_hash(key: str, salt: str) -> float:
    """A uniform number in [0, 1) from sha256(salt:key)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_of(key: str, salt: str, fractions: Sequence[float] = FRACTIONS,
             names: Sequence[str] = SPLITS) -> str:
    """The split name of group `key`; `fractions` must sum to 1."""
    if len(fractions) != len(names) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions {tuple(fractions)} must sum to 1 and match splits {tuple(names)}")
    u, edge = unit_hash(key, salt), 0.0
    for name, frac in zip(names, fractions):
        edge += frac
        if u < edge:
            return name
    return names[-1]


def normalise_key(text: str) -> str:
    """Group key for free text: lower case with runs of whitespace collapsed."""
    return " ".join(text.lower().split())
