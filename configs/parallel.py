"""Parallel adapters (He et al. 2021) beside the FFN, scaled by s = 4 (AdapterHub par_bn), bottleneck 64.

    python -m experiments.train --config configs/parallel.py --workdir runs/parallel
    python -m experiments.train --config configs/parallel.py --config.adapter.scaling=learned
    python -m experiments.train --config configs/parallel.py --config.adapter.parallel_sites="('attn','ffn')"
    python -m experiments.train --config configs/parallel.py:smoke

Result on the default task: not measured yet at this config's full budget (the bottleneck sweep in
the README has short-budget numbers for the bottleneck placements).
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="parallel", name="rotten_tomatoes", bottleneck_dim=64, activation="relu",
                          scaling=4.0, parallel_sites=("ffn",), layers="all", adapter_drop=0))
    c.optim.lr = 1e-3
    return apply_preset(c, arg)
