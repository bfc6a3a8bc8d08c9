"""Houlsby adapters (after attention and after the FFN), bottleneck 64, on MiniLM + Rotten Tomatoes.

    python -m experiments.train --config configs/houlsby_r64.py --workdir runs/houlsby_r64
    python -m experiments.train --config configs/houlsby_r64.py:smoke     # seconds, for CI
    python -m experiments.train --config configs/houlsby_r64.py:r=16      # other bottleneck sizes

Result on the default task (validation accuracy): see the README's results table.
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="houlsby", name="rotten_tomatoes", bottleneck_dim=64, activation="swish",
                          init="near_identity", init_std=1e-2, layers="all", adapter_drop=0))
    c.optim.lr = 1e-3
    return apply_preset(c, arg)
