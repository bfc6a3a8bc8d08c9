"""Causal-LM tuning (task='lm'): the loss against transformers, the LM data, a smoke run and generation."""
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from adapters_jax import metrics, trainer
from adapters_jax.heads import BackboneLogits
from adapters_jax.model import AdaptedModel
from adapters_jax.run_logging import best_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lm_loss_and_eval_match_transformers(tmp_path):
    """Mean next-token NLL over real tokens = LlamaForCausalLM's loss with padding labels at -100."""
    torch = pytest.importorskip("torch")
    from tests.oracle_models import tiny_llama
    from adapters_jax.backbones.llama import LlamaModel
    hf, config, base = tiny_llama(tmp_path)
    ids = np.random.default_rng(0).integers(3, 99, size=(3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    model = AdaptedModel(LlamaModel(config), BackboneLogits())
    params = {"backbone": base}
    batch = {"input_ids": ids, "attention_mask": mask, "weights": np.ones(3, np.float32)}
    logits = model.apply({"params": params}, batch)  # [3, 12, 99]
    loss, count = trainer.task_loss(logits, batch, "lm")
    labels = torch.tensor(np.where(mask == 1, ids, -100), dtype=torch.long)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), labels=labels).loss.item()
    assert abs(float(loss) - ref) <= 1e-5 and float(count) == mask[:, 1:].sum() == 11 + 7 + 4
    rows = np.asarray(trainer.make_eval_step(model, "lm")(params, {}, batch))  # [3, 2]
    np.testing.assert_allclose(rows[:, 1], mask[:, 1:].sum(1))
    ev = metrics.compute(rows, np.zeros(3), np.ones(3), "lm", 0)
    assert abs(ev["loss"] - ref) <= 1e-5 and abs(ev["perplexity"] - np.exp(ref)) <= 1e-3 * np.exp(ref)
    ev = metrics.compute(rows, np.zeros(3), np.array([1.0, 1.0, 0.0]), "lm", 0)  # filler rows drop out
    assert ev["tokens"] == 11 + 7


def test_lower_is_better_metrics():
    assert metrics.better("perplexity", 5.0, 6.0) and not metrics.better("perplexity", 7.0, 6.0)
    assert metrics.better("accuracy", 0.7, 0.6) and metrics.better("loss", 1.0, None)
    recs = [{"step": 1, "eval_perplexity": 9.0}, {"step": 2, "eval_perplexity": 4.0}, {"step": 3, "eval_perplexity": 6.0}]
    assert best_of(recs, "eval_perplexity", lower_is_better=True)["step"] == 2
    assert best_of(recs, "eval_perplexity")["step"] == 1


def test_rows_are_rendered_reviews_ending_with_eos():
    from adapters_jax.data import make_datasets
    from adapters_jax.hub import load_backbone
    tok = load_backbone("tiny-random-llama").tokenizer
    ds = make_datasets("rotten_tomatoes_lm", tok, batch_size=8, max_length=32, seed=0, buckets=(32,),
                       max_eval_examples=16, process_index=0, process_count=1)
    assert ds.label_names == ("rotten", "fresh") and ds.eval_size == 16
    batch = next(ds.train)
    for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = ids[mask == 1].tolist()
        assert tok.decode(real).startswith(f"Review ({ds.label_names[label]}): ")
        assert real[-1] == tok.eos_id and tok.eos_id not in real[:-1]
        assert len(real) <= 32


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from adapters_jax.train_loop import train_and_evaluate
    workdir = tmp_path_factory.mktemp("lm")
    config = importlib.import_module("configs.smollm2_lm").get_config("smoke")
    config.train.eval_every, config.optim.lr = 2, 3e-2
    return workdir, train_and_evaluate(config, str(workdir))


def test_smoke_run_tracks_perplexity_and_keeps_the_lowest(smoke_run):
    workdir, result = smoke_run
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    evals = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if "eval_perplexity" in l]
    assert [e["step"] for e in evals] == [0, 2, 4]  # eval_at_start, then every 2 steps
    best = min(evals, key=lambda e: e["eval_perplexity"])
    meta = json.loads((workdir / "adapter_best" / "adapter_config.json").read_text())
    assert meta["step"] == best["step"] and meta["metrics"]["perplexity"] == pytest.approx(best["eval_perplexity"])
    assert result["best"] == pytest.approx(best["eval_perplexity"]) and meta["task"] == "lm"
    assert evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]  # lr 3e-2 moves even a random base


def test_generate_cli_continues_prompts_with_the_export(smoke_run):
    workdir, _ = smoke_run
    out = subprocess.run([sys.executable, "-m", "experiments.generate", f"--adapter={workdir / 'adapter'}",
                          "--max_new_tokens=4", "--prompt=Review (rotten):"],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("Review (rotten):")
    bad = subprocess.run([sys.executable, "-m", "experiments.generate", f"--adapter={workdir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "adapter_config.json: missing" in bad.stderr


def test_lm_task_on_an_encoder_fails_in_one_line(tmp_path):
    from adapters_jax.train_loop import train_and_evaluate
    config = importlib.import_module("configs.houlsby_r64").get_config("smoke")
    config.task, config.metric, config.data.name = "lm", "perplexity", "rotten_tomatoes_lm"
    with pytest.raises(ValueError, match="needs a decoder backbone whose output has 'logits'"):
        train_and_evaluate(config, str(tmp_path))
