"""Baseline: full fine-tuning of every MiniLM weight plus the head, on Rotten Tomatoes.

    python -m experiments.train --config configs/full_finetune.py --workdir runs/full_finetune
    python -m experiments.train --config configs/full_finetune.py:smoke

Result on the default task (validation accuracy): see the README's results table.
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.freeze.train_all = True
    c.optim.lr = 5e-5
    return apply_preset(c, arg)
