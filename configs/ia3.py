"""IA3 (Liu et al. 2022): learned rescaling of keys, values and the FFN intermediate; ones at init.

    python -m experiments.train --config configs/ia3.py --workdir runs/ia3
    python -m experiments.train --config configs/ia3.py:smoke

Result on the default task: not measured yet at this config's full budget (the bottleneck sweep in
the README has short-budget numbers for the bottleneck placements).
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="ia3", name="rotten_tomatoes", ia3_sites=("key", "value", "ffn_out"), feedforward_sites=("ffn_out",), layers="all", adapter_drop=0))
    c.optim.lr = 3e-3
    return apply_preset(c, arg)
