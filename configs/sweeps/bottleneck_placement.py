"""Bottleneck size × placement (Houlsby / Pfeiffer / parallel) × lr × seed, on MiniLM + Rotten Tomatoes.

    python -m experiments.sweep --sweep configs/sweeps/bottleneck_placement.py            # 9 runs
    python -m experiments.sweep --sweep configs/sweeps/bottleneck_placement.py:small --parallel 2
    python -m experiments.sweep --sweep configs/sweeps/bottleneck_placement.py:full       # 81 runs
    python -m experiments.sweep --sweep configs/sweeps/bottleneck_placement.py:smoke      # tiny model, seconds a run
    python -m experiments.sweep --sweep configs/sweeps/bottleneck_placement.py --dry_run  # print the commands
    python -m experiments.report runs/sweeps/bottleneck_placement                          # table + plots again

Presets (the `:arg`):
  (none)  bottleneck {16, 64, 256} × 3 placements × lr 1e-3 × seed 0, each config's own budget (3 epochs)
  small   bottleneck {8, 64, 256} × 3 placements × lr 1e-3 × seed 0, 150 steps, one eval at the end
  full    bottleneck {16, 64, 256} × 3 placements × lr {3e-4, 1e-3, 3e-3} × seeds {0, 1, 2}
  smoke   the configs' smoke preset (tiny random BERT), bottleneck {4, 8} × 3 placements, 4 steps

A trial is {'name', 'config', 'overrides'}: `experiments.sweep` runs
`python -m experiments.train --config=<config> --workdir=<root>/<name> --config.<k>=<v> ...`.
"""
import itertools

import ml_collections

PLACEMENTS = {  # placement -> the config file that sets it up
    "houlsby": "configs/houlsby_r64.py",
    "pfeiffer": "configs/pfeiffer_r64.py",
    "parallel": "configs/parallel.py",
}


def _grid(arg):
    g = ml_collections.ConfigDict()
    g.bottleneck_dim = (16, 64, 256)
    g.placement = tuple(PLACEMENTS)
    g.lr = (1e-3,)
    g.seed = (0,)
    g.preset = ""      # the config files' own preset (e.g. 'smoke')
    fixed = {}         # overrides every trial gets (dotted names: not ConfigDict keys)
    if arg in (None, ""):
        pass
    elif arg == "small":
        g.bottleneck_dim = (8, 64, 256)
        fixed = {"train.num_steps": 150, "train.eval_every": 150}
    elif arg == "full":
        g.lr = (3e-4, 1e-3, 3e-3)
        g.seed = (0, 1, 2)
    elif arg == "smoke":
        g.bottleneck_dim = (4, 8)
        g.preset = "smoke"
        fixed = {"train.num_steps": 4}
    else:
        raise ValueError(f"sweep preset {arg!r} is unknown (known: small, full, smoke)")
    return g, fixed


def lr_tag(lr: float) -> str:
    """1e-3 -> '1e-3', 3e-4 -> '3e-4', 2.5e-4 -> '2.5e-4'."""
    mantissa, exp = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def get_sweep(arg=None):
    g, fixed = _grid(arg)
    trials = []
    for placement, dim, lr, seed in itertools.product(g.placement, g.bottleneck_dim, g.lr, g.seed):
        config = PLACEMENTS[placement] + (f":{g.preset}" if g.preset else "")
        overrides = {"adapter.bottleneck_dim": dim, "optim.lr": lr, "seed": seed, **fixed}
        trials.append({"name": f"{placement}_r{dim}_lr{lr_tag(lr)}_s{seed}", "config": config,
                       "overrides": overrides,
                       "params": {"placement": placement, "bottleneck_dim": dim, "lr": lr, "seed": seed}})
    return trials
