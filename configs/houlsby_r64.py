"""Houlsby adapters (after attention and after the FFN), bottleneck 64, on MiniLM + Rotten Tomatoes.

    python -m experiments.train --config configs/houlsby_r64.py --workdir runs/houlsby_r64
    python -m experiments.train --config configs/houlsby_r64.py:smoke     # seconds, for CI
    python -m experiments.train --config configs/houlsby_r64.py:r=16      # other bottleneck sizes

Measured (seed 0, 3 epochs, batch 32, lr 1e-3, 2-core CPU, 2104 s): Rotten Tomatoes validation
accuracy 0.8376 (best and final), macro-F1 0.8311, MCC 0.6622; 595,970 trainable parameters
(2.62% of the base).
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="houlsby", name="rotten_tomatoes", bottleneck_dim=64, activation="swish",
                          init="near_identity", init_std=1e-2, layers="all", adapter_drop=0))
    c.optim.lr = 1e-3
    return apply_preset(c, arg)
