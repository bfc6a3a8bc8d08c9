"""The PyTorch side of the benchmark: AdapterHub `adapters` on the same MiniLM, shapes and threads.

    python -m experiments.benchmark_adapterhub --methods full,houlsby,pfeiffer --batch 32 --seq 128
    python -m experiments.benchmark_adapterhub --model bert-base  # BERT-base dimensions, random weights

`python -m experiments.benchmark --adapterhub` runs this in a subprocess in the same run and
prints both sides together. One JSON line per method on stdout. torch, transformers and
adapters are test-only dependencies (requirements-test.txt): this script is the oracle's
timing, never part of the library.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from adapters_jax import host_memory

# method -> AdapterHub config name (None: no adapter)
ADAPTERHUB = {"full": None, "head_only": None, "houlsby": "double_seq_bn", "pfeiffer": "seq_bn",
              "parallel": "par_bn"}

# models timed with random weights (no checkpoint), as `experiments.benchmark --model` names them:
# HF BertConfig's defaults are BERT-base's dimensions, as are our BertConfig's
RANDOM_MODELS = ("bert-base",)


def load_model(model: str, num_labels: int = 2):
    """BertForSequenceClassification: random weights for RANDOM_MODELS, else the offline checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification
    if model in RANDOM_MODELS:
        return BertForSequenceClassification(BertConfig(num_labels=num_labels))
    from adapters_jax.hub import resolve
    return BertForSequenceClassification.from_pretrained(resolve(model), num_labels=num_labels)


def build(method: str, model_name: str, bottleneck: int, num_labels: int = 2):
    """BertForSequenceClassification with AdapterHub's adapter and its freezing, + AdamW."""
    import adapters
    import torch
    model = load_model(model_name, num_labels)
    if ADAPTERHUB[method] is not None:
        adapters.init(model)
        config = adapters.AdapterConfig.load(ADAPTERHUB[method],
                                             reduction_factor=model.config.hidden_size / bottleneck)
        model.add_adapter("task", config=config)
        model.train_adapter("task")  # freezes the base, trains the adapter
    elif method == "head_only":
        for p in model.bert.parameters():
            p.requires_grad_(False)
    for p in model.classifier.parameters():  # every method trains its head
        p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def time_train_step(method: str, model_name: str, batch: int, seq: int, steps: int, bottleneck: int = 64) -> dict:
    import torch
    model, opt, n_trainable = build(method, model_name, bottleneck)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, model.config.vocab_size, (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long),
              "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
              "labels": torch.randint(0, 2, (batch,), generator=g)}

    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(2):  # warm-up
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"method": method, "framework": "adapterhub", "step_s": med, "step_times": times,
            "examples_per_s": batch / med,
            "trainable": n_trainable, "threads": torch.get_num_threads(),
            "peak_rss_mib": host_memory.peak_rss_mib()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="full,houlsby,pfeiffer")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", default="minilm-l6",
                    help=f"an offline checkpoint (adapters_jax.hub), or random weights: {', '.join(RANDOM_MODELS)}")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for method in args.methods.split(","):
        if method not in ADAPTERHUB:
            raise SystemExit(f"--methods: {method!r} has no AdapterHub counterpart here ({', '.join(ADAPTERHUB)})")
        print(json.dumps(time_train_step(method, args.model, args.batch, args.seq, args.steps)), flush=True)


if __name__ == "__main__":
    main()
