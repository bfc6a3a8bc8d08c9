"""Sequence classification on causal decoders: pool the last real token, refuse the first.

A causal decoder's first position has attended to nothing after it, so CLS pooling there would
classify from the first token alone; HF's *ForSequenceClassification pools the last real token.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax.backbones.gpt2 import GPT2Config, GPT2Model
from adapters_jax.backbones.llama import LlamaConfig, LlamaModel
from adapters_jax.heads import ClassificationHead, default_pooling, pool, resolve_pooling
from adapters_jax.model import AdaptedModel

LLAMA = LlamaConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    intermediate_size=32, max_position_embeddings=32)


def test_last_pooling_reads_the_last_real_token_with_either_padding_side():
    x = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)  # [B, T, D]
    mask = np.array([[1, 1, 1, 0, 0],   # right padding: token 2
                     [0, 0, 1, 1, 1],   # left padding: token 4
                     [1, 1, 1, 1, 1],   # no padding: token 4
                     [1, 0, 0, 0, 0]])  # one token: token 0
    got = pool({"last_hidden_state": jnp.asarray(x), "attention_mask": jnp.asarray(mask)}, "last")
    np.testing.assert_array_equal(np.asarray(got), x[[0, 1, 2, 3], [2, 4, 4, 0]])


@pytest.mark.parametrize("backbone", [LlamaModel(LLAMA), GPT2Model(GPT2Config(
    vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=32))],
    ids=["llama", "gpt2"])
def test_causal_decoders_refuse_first_token_pooling(backbone):
    ids = np.ones((2, 6), np.int32)
    model = AdaptedModel(backbone, ClassificationHead(2))  # pooling 'cls'
    with pytest.raises(ValueError, match="head.pooling='cls' reads the first token"):
        model.init(jax.random.PRNGKey(0), {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert default_pooling(backbone) == "last"


def test_auto_pooling_is_last_for_decoders_and_cls_for_encoders():
    from adapters_jax.backbones.bert import BertConfig, BertModel
    assert resolve_pooling("auto", LlamaModel(LLAMA)) == "last"
    assert resolve_pooling("auto", BertModel(BertConfig(num_layers=1))) == "cls"
    assert resolve_pooling("mean", LlamaModel(LLAMA)) == "mean"  # an explicit choice stays
    with pytest.raises(ValueError, match="head.pooling='first' is not 'auto' or one of"):
        resolve_pooling("first", LlamaModel(LLAMA))


def test_last_token_logits_ignore_padding_and_see_the_whole_text():
    model = AdaptedModel(LlamaModel(LLAMA), ClassificationHead(3, pooling="last", dropout=0.0))
    rng = np.random.default_rng(1)
    ids = rng.integers(1, LLAMA.vocab_size, (2, 8)).astype(np.int32)  # [B, T]
    mask = np.array([[1] * 5 + [0] * 3, [1] * 8], np.int32)  # row 0: 5 real tokens, right padding
    params = model.init(jax.random.PRNGKey(0), {"input_ids": ids, "attention_mask": mask})["params"]
    apply = jax.jit(lambda i: model.apply({"params": params}, {"input_ids": i, "attention_mask": mask}))
    logits = lambda i: np.asarray(apply(i))
    base = logits(ids)
    repadded = ids.copy()
    repadded[0, 5:] = rng.integers(1, LLAMA.vocab_size, 3)  # other ids under the padding
    np.testing.assert_allclose(logits(repadded), base, rtol=0, atol=1e-6)
    first_changed = ids.copy()
    first_changed[:, 0] = (ids[:, 0] % (LLAMA.vocab_size - 1)) + 1  # the first token reaches the last one
    assert np.all(np.abs(logits(first_changed) - base).max(axis=1) > 1e-4)


def test_last_pooling_matches_hf_llama_for_sequence_classification(tmp_path):
    """The oracle: transformers' LlamaForSequenceClassification, whose head reads the last
    non-pad token through a bias-free score layer (ours gets that kernel and a zero bias)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from adapters_jax.backbones import llama_weights
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                   num_labels=3, pad_token_id=0, tie_word_embeddings=False)
    ref = transformers.LlamaForSequenceClassification(cfg).eval()
    causal = transformers.LlamaForCausalLM(cfg)  # the same decoder, saved the way our loader reads it
    causal.model.load_state_dict(ref.model.state_dict())
    causal.save_pretrained(tmp_path, safe_serialization=True)
    config, backbone = llama_weights.load(tmp_path)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 60, (3, 9)).astype(np.int32)  # [B, T], no pad id among real tokens
    mask = np.ones_like(ids)
    ids[0, 6:], mask[0, 6:] = 0, 0  # right padding with the pad id, as HF's head finds it
    ids[1, 2:], mask[1, 2:] = 0, 0
    with torch.no_grad():
        want = ref(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    model = AdaptedModel(LlamaModel(config), ClassificationHead(3, pooling="last", dropout=0.0))
    head = {"out": {"kernel": ref.score.weight.detach().numpy().T, "bias": np.zeros(3, np.float32)}}
    got = model.apply({"params": {"backbone": backbone, "head": head}}, {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
