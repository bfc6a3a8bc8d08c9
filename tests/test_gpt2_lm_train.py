"""Causal-LM tuning of a GPT-2 checkpoint with adapters through experiments.train (issue 9)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpt2_lm_adapter_training_lowers_perplexity(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    from adapters_jax.hub import resolve
    tok_dir = resolve("tiny-random-llama")  # SmolLM2's byte-level BPE tokenizer, 49,152 ids
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    bos_token_id=1, eos_token_id=2))
    model_dir = tmp_path / "tiny-gpt2"
    hf.save_pretrained(model_dir, safe_serialization=True)
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), model_dir)
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=configs/smollm2_lm.py:smoke", f"--workdir={workdir}",
         f"--config.model.name={model_dir}", "--config.train.num_steps=12", "--config.train.eval_every=12",
         "--config.optim.lr=3e-3"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    evals = [json.loads(line) for line in open(workdir / "metrics.jsonl") if "eval_perplexity" in line]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]  # the adapters learned something
    meta = json.load(open(workdir / "adapter" / "adapter_config.json"))
    assert meta["task"] == "lm" and meta["base_model"] == str(model_dir)
