"""LoRA (Hu et al. 2021) on query and value, r = 8, alpha = 16; merges exactly into the base for inference.

    python -m experiments.train --config configs/lora_r8.py --workdir runs/lora_r8
    python -m experiments.train --config configs/lora_r8.py:smoke

Result on the default task: not measured yet at this config's full budget (the bottleneck sweep in
the README has short-budget numbers for the bottleneck placements).
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="lora", name="rotten_tomatoes", r=8, alpha=16.0, dropout=0.1, lora_sites=("query", "value"), layers="all", adapter_drop=0))
    c.optim.lr = 1e-3
    return apply_preset(c, arg)
