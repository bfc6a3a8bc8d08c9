"""Prefix tuning (Li and Liang 2021): 10 learned key/value prefixes per layer through a reparametrisation MLP.

    python -m experiments.train --config configs/prefix.py --workdir runs/prefix
    python -m experiments.train --config configs/prefix.py:smoke

Result on the default task: not measured yet at this config's full budget (the bottleneck sweep in
the README has short-budget numbers for the bottleneck placements).
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="prefix", name="rotten_tomatoes", prefix_length=10, flat=False, bottleneck_size=512, layers="all", adapter_drop=0))
    c.optim.lr = 1e-3
    return apply_preset(c, arg)
