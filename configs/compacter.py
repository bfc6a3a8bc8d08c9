"""Compacter (Mahabadi et al. 2021): PHM bottlenecks, n = 4, shared rules, Houlsby placement.

    python -m experiments.train --config configs/compacter.py --workdir runs/compacter
    python -m experiments.train --config configs/compacter.py --config.adapter.method=compacter++
    python -m experiments.train --config configs/compacter.py:smoke

Result on the default task: not measured yet at this config's full budget (the bottleneck sweep in
the README has short-budget numbers for the bottleneck placements).
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="compacter", name="rotten_tomatoes", reduction_factor=16, phm_dim=4,
                          phm_rank=1, layers="all", adapter_drop=0))
    c.optim.lr = 3e-3
    return apply_preset(c, arg)
