"""Prompt tuning (Lester et al. 2021): 20 soft prompt tokens prepended to the embeddings.

    python -m experiments.train --config configs/prompt.py --workdir runs/prompt
    python -m experiments.train --config configs/prompt.py:smoke

Result on the default task: not measured yet at this config's full budget (the bottleneck sweep in
the README has short-budget numbers for the bottleneck placements).
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="prompt", name="rotten_tomatoes", n_tokens=20, init="normal", init_scale=0.02))
    c.head.pooling = "mean"  # position 0 holds the first prompt vector, not [CLS]
    c.optim.lr = 3e-2
    return apply_preset(c, arg)
