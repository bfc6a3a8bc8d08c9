"""Tiny random PyTorch oracle models, saved as HF checkpoints and loaded into our backbones."""
import pytest


def tiny_llama(tmp_path, seed: int = 0):
    """(torch LlamaForCausalLM with GQA, our LlamaConfig, our base params), saved in tmp_path."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from adapters_jax.backbones import llama_weights
    torch.manual_seed(seed)
    hf = transformers.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(hf).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, base = llama_weights.load(str(tmp_path))
    return model, config, base
