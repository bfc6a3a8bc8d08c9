"""AdapterFusion, stage two (Pfeiffer et al. 2021): fuse adapters trained on other tasks.

The adapters come from earlier runs' exports and stay frozen; only the fusion layers (query,
key, value at every fused site) and the new head train. Stage one is any adapter config run
per task, e.g.

    python -m experiments.train --config configs/pfeiffer_r64.py --workdir runs/mt/rt \\
        --config.adapter.name=rt --config.data.name=rotten_tomatoes
    python -m experiments.train --config configs/pfeiffer_r64.py --workdir runs/mt/bbc \\
        --config.adapter.name=bbc --config.data.name=bbc_news
    python -m experiments.train --config configs/pfeiffer_r64.py --workdir runs/mt/tw \\
        --config.adapter.name=tw --config.data.name=tweet_sentiment
    python -m experiments.train --config configs/fusion.py --workdir runs/mt/fusion_rt \\
        --config.fusion.adapters=runs/mt/rt/adapter,runs/mt/bbc/adapter,runs/mt/tw/adapter

Measured (MiniLM, Pfeiffer r = 64 task adapters, seeds 0-2; README "Multi-task results"),
fusion vs single on the three-seed means: Rotten Tomatoes (fusion 1 epoch, single 3) 0.8328 vs
0.8373; BBC News (3 epochs each) 0.9801 vs 0.9847; tweet_sentiment (250 vs 400 steps) 0.7664
vs 0.7635.
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.adapter.update(dict(method="fusion"))
    c.fusion = dict(adapters="", name="fusion", query=True, key=True, value=True, query_before_ln=False,
                    residual_before=False, value_before_softmax=True, value_initialized=True,
                    regularization=True, dropout=0.0)
    c.optim.lr = 5e-4  # AdapterHub used 5e-5 for 10 epochs on BERT-base; our budget is shorter
    return apply_preset(c, arg)
