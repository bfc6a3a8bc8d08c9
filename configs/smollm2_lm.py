"""Causal-LM tuning of SmolLM2-135M (GGUF Q4_1, dequantized, frozen) with Houlsby adapters on
Rotten Tomatoes reviews rendered as "Review (fresh): <text>" / "Review (rotten): <text>".

    python -m experiments.train --config configs/smollm2_lm.py --workdir runs/smollm2_lm
    python -m experiments.train --config configs/smollm2_lm.py:smoke   # tiny random Llama, seconds (CI)
    python -m experiments.generate --adapter runs/smollm2_lm/adapter_best --prompt "Review (rotten):"

The metric is validation perplexity per token (best checkpoint = lowest); the LM loss is the
mean next-token NLL over real (non-padding) tokens, EOS included.

Measured (seed 0, 150 steps at batch 8, seq <= 64, lr 1e-3, Houlsby r = 64: 4,462,080 trainable,
3.3% of the base; 1490 s on the shared 2-core CPU): perplexity on 256 evenly spaced validation
reviews (7,427 target tokens) 170.6 at step 0 (adapters at near-identity init) -> 35.8 at step
75 -> 33.7 at step 150. Greedy continuations with adapter_best:
    Review (fresh): A great film.
    Review (rotten): A movie that's about as good as a movie about as good as a movie.
    Review (rotten): The new Pixar film is a mess.
The base alone continues "Review (rotten):" with a quiz about food-poisoning bacteria.
"""
from configs.common import apply_preset, base_config


def get_config(arg=None):
    c = base_config()
    c.task, c.metric = "lm", "perplexity"
    c.model.name = "smollm2-135m"
    c.adapter.update(dict(method="houlsby", name="reviews", bottleneck_dim=64, activation="swish",
                          init="near_identity", init_std=1e-2, layers="all", adapter_drop=0))
    c.data.update(dict(name="rotten_tomatoes_lm", max_length=64, buckets=(32, 64)))
    c.data.max_eval_examples = 256  # evenly spaced validation rows: a 135M decoder on a CPU is slow
    c.train.update(dict(batch_size=8, eval_batch_size=16, num_epochs=-1, num_steps=150, eval_every=75,
                        log_every=10, ckpt_every=75))
    c.train.eval_at_start = True  # the step-0 eval gives the "before" perplexity
    c.optim.update(dict(lr=1e-3, warmup_ratio=0.06))
    smoke = arg is not None and "smoke" in str(arg).split(",")
    c = apply_preset(c, arg)
    if smoke:  # the common smoke preset picks a tiny BERT; an LM needs a decoder
        c.model.name = "tiny-random-llama"
        c.data.max_length, c.data.buckets = 32, (32,)
        c.train.eval_batch_size, c.data.max_eval_examples = 32, 64
    return c
