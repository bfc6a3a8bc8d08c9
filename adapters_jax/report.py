"""The parameter report: counts, % of the base and bytes, per adapter type and per site."""
from __future__ import annotations

import collections
import re
from typing import Any

import numpy as np
from flax import traverse_util

from adapters_jax import peft
from adapters_jax.backbones import sites

_SITE_RE = re.compile(rf"(?:^|/)({'|'.join(sites.ALL_SITES + (sites.SHARED,))})/([^/]+)/")


def _site_of(path: str) -> tuple[str, str] | None:
    m = _SITE_RE.search(path)
    return (m.group(1), m.group(2)) if m else None


def parameter_report(params: Any, labels: Any) -> dict:
    """Counts by group. Keys: base, trainable, frozen, total, trainable_pct (of the base),
    bytes_trainable, by_site {site: count}, by_adapter {name: count}, head."""
    flat = traverse_util.flatten_dict(dict(params))
    flat_l = traverse_util.flatten_dict(dict(labels))
    out = collections.Counter()
    by_site, by_adapter = collections.Counter(), collections.Counter()
    for path, leaf in flat.items():
        n = int(np.prod(np.shape(leaf)))
        nbytes = n * np.dtype(leaf.dtype).itemsize
        key = "/".join(path)
        site = _site_of(key)
        is_head = path[0] == "head"
        out["total"] += n
        if site:
            by_site[site[0]] += n
            by_adapter[site[1]] += n
        elif is_head:
            out["head"] += n
        else:
            out["base"] += n
        if flat_l[path] == peft.TRAINABLE:
            out["trainable"] += n
            out["bytes_trainable"] += nbytes
        else:
            out["frozen"] += n
    rep = dict(out)
    rep["trainable_pct"] = 100.0 * out["trainable"] / max(out["base"], 1)
    rep["by_site"], rep["by_adapter"] = dict(by_site), dict(by_adapter)
    return rep


def format_report(rep: dict) -> str:
    lines = [f"parameters: base {rep.get('base', 0):,} | adapters {sum(rep['by_adapter'].values()):,} | "
             f"head {rep.get('head', 0):,} | trainable {rep.get('trainable', 0):,} "
             f"({rep['trainable_pct']:.3f}% of the base, {rep.get('bytes_trainable', 0) / 2**20:.2f} MiB)"]
    for site, n in sorted(rep["by_site"].items()):
        lines.append(f"  site {site:<16} {n:>12,} ({100.0 * n / max(rep.get('base', 1), 1):.3f}%)")
    for name, n in sorted(rep["by_adapter"].items()):
        lines.append(f"  adapter {name:<14} {n:>12,}")
    return "\n".join(lines)
