"""The PyTorch side of the end-to-end epoch comparison: an AdapterHub training loop as HF writes it.

    python -m experiments.epoch_adapterhub --method houlsby --epochs 1

Same MiniLM, same Rotten Tomatoes rows (read through adapters_jax.data, so both sides see the
same text), same hyperparameters as configs/houlsby_r64.py: batch 32, AdamW lr 1e-3, weight
decay 0.01, linear schedule with 6% warm-up, gradient clipping at 1.0, max length 128. Batches
are padded to their longest row (DataCollatorWithPadding), as HF's Trainer does. Prints one
JSON line: train seconds, steps/s, validation accuracy. `experiments/bench_epoch.py` runs it
beside our own loop. Test-only dependencies (torch, transformers, adapters): never the library.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _rows(split) -> tuple:
    texts = [r["text"].decode("utf-8") if isinstance(r["text"], bytes) else r["text"] for r in split]
    return texts, [int(r["label"]) for r in split]


def run(method: str, model_name: str, dataset: str, epochs: int, batch: int, lr: float, max_length: int,
        bottleneck: int, seed: int) -> dict:
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup
    from adapters_jax.data import registry
    from adapters_jax.hub import resolve
    from experiments.benchmark_adapterhub import build

    torch.manual_seed(seed)
    path = resolve(model_name)
    source = registry.load(dataset)
    tokenizer = AutoTokenizer.from_pretrained(path)
    collate = DataCollatorWithPadding(tokenizer)

    def encode(split):
        texts, labels = _rows(source.split(split))
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "token_type_ids": enc["token_type_ids"][i], "labels": labels[i]} for i in range(len(texts))]

    t0 = time.perf_counter()
    train, val = encode("train"), encode(registry.default_eval_split(dataset))
    tokenize_s = time.perf_counter() - t0
    model, _, n_trainable = build(method, model_name, bottleneck, num_labels=len(source.label_names))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    total = epochs * (len(train) // batch)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * total), total)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, drop_last=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    model.train()
    t0 = time.perf_counter()
    step, loss_sum = 0, 0.0
    for _ in range(epochs):
        for b in loader:
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum += float(loss)
            if step % 20 == 0:
                el = time.perf_counter() - t0
                print(f"adapterhub step {step}/{total}: loss {loss_sum / step:.4f}, {step / el:.2f} steps/s, "
                      f"eta {(total - step) * el / step:.0f} s", file=__import__("sys").stderr, flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val), 64):
            b = collate(val[i:i + 64])
            labels = b.pop("labels")
            correct += int((model(**b).logits.argmax(-1) == labels).sum())
    return {"framework": "adapterhub", "method": method, "train_s": train_s, "steps": step,
            "steps_per_s": step / train_s, "tokenize_s": tokenize_s, "eval_accuracy": correct / len(val),
            "trainable": n_trainable, "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="houlsby")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--dataset", default="rotten_tomatoes")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    print(json.dumps(run(args.method, args.model, args.dataset, args.epochs, args.batch, args.lr,
                         args.max_length, args.bottleneck, args.seed)), flush=True)


if __name__ == "__main__":
    main()
