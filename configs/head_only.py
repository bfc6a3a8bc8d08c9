"""Baseline: the frozen MiniLM with a trained linear head only (no adapters), on Rotten Tomatoes.

    python -m experiments.train --config configs/head_only.py --workdir runs/head_only
    python -m experiments.train --config configs/head_only.py:smoke

Result on the default task (validation accuracy): see the README's results table.
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.head.pooling = "mean"  # sentence-transformers' own pooling: the strongest frozen feature
    c.optim.lr = 5e-3
    return apply_preset(c, arg)
