"""Pfeiffer adapters (one per layer, after the FFN's add & norm; AdapterHub seq_bn), bottleneck 64.

    python -m experiments.train --config configs/pfeiffer_r64.py --workdir runs/pfeiffer_r64
    python -m experiments.train --config configs/pfeiffer_r64.py:smoke

Result on the default task: not measured yet at this config's full budget (the bottleneck sweep in
the README has short-budget numbers for the bottleneck placements).
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="pfeiffer", name="rotten_tomatoes", bottleneck_dim=64, activation="relu",
                          init="near_identity", init_std=1e-2, layers="all", adapter_drop=0))
    c.optim.lr = 1e-3
    return apply_preset(c, arg)
