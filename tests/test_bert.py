"""BERT-family backbone against the PyTorch oracle (transformers) and known reference figures."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax.backbones import bert_weights, hf_io
from adapters_jax.backbones.bert import BertConfig, BertModel
from tests.conftest import SENTENCES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_hidden(model, enc, **extra):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc.input_ids).long(),
                    attention_mask=torch.tensor(enc.attention_mask).long(), **extra)
    return out.last_hidden_state.numpy()


def test_minilm_matches_transformers_with_padding(minilm, torch_minilm):
    enc = minilm.tokenizer(SENTENCES, max_length=64)
    assert enc.attention_mask.min() == 0, "the batch must contain padding"
    ours = np.asarray(minilm(SENTENCES, max_length=64)["last_hidden_state"])
    ref = _torch_hidden(torch_minilm, enc, token_type_ids=torch.tensor(enc.token_type_ids).long())
    real = enc.attention_mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    assert np.abs(ours - ref).max() <= 1e-4  # padded positions too: HF computes them the same way


def test_minilm_mean_pooled_cosine_reference(minilm):
    out = minilm(SENTENCES[:2])
    m = np.asarray(out["attention_mask"], np.float64)[..., None]
    e = (np.asarray(out["last_hidden_state"], np.float64) * m).sum(1) / m.sum(1)
    cos = e[0] @ e[1] / np.linalg.norm(e[0]) / np.linalg.norm(e[1])
    assert abs(cos - 0.755) <= 0.002


def test_bf16_compute_close_to_float32(minilm):
    ref = np.asarray(minilm(SENTENCES)["last_hidden_state"], np.float64)
    bf16 = BertModel(minilm.config, dtype=jnp.bfloat16)
    enc = minilm.tokenizer(SENTENCES)
    out = bf16.apply({"params": minilm.params}, enc.input_ids, enc.attention_mask, enc.token_type_ids)
    got = np.asarray(out["last_hidden_state"].astype(jnp.float32), np.float64)
    jaxpr = str(jax.make_jaxpr(bf16.apply)({"params": minilm.params}, enc.input_ids, enc.attention_mask))
    assert "dot_general" in jaxpr and "bf16[" in jaxpr, "the matmuls must run in bf16"
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-2


def _tiny_roberta(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37,
                                     max_position_embeddings=40, pad_token_id=1, type_vocab_size=1)
    model = transformers.RobertaModel(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def test_roberta_matches_transformers(tmp_path):
    ref_model = _tiny_roberta(tmp_path)
    config, params = bert_weights.load(str(tmp_path))
    assert config.roberta_positions and config.type_vocab_size == 1
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, size=(3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 1, 0  # right padding with RoBERTa's pad id
    ids[2, 3:], mask[2, 3:] = 1, 0
    ours = BertModel(config).apply({"params": params}, ids, mask)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    assert np.abs(np.asarray(ours["last_hidden_state"]) - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(ours["pooler_output"]) - ref.pooler_output.numpy()).max() <= 1e-4


def _rewrite(tmp_path, edit):
    from safetensors.numpy import load_file, save_file
    f = tmp_path / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f))


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("encoder.layer.1.attention.self.value.weight"), "missing tensor encoder.layer.1.attention.self.value.weight"),
    (lambda s: s.update({"encoder.layer.0.intermediate.dense.weight": np.zeros((5, 32), np.float32)}),
     "tensor encoder.layer.0.intermediate.dense.weight has shape (5, 32)"),
    (lambda s: s.update({"encoder.layer.9.extra.weight": np.zeros((2,), np.float32)}), "unexpected tensor encoder.layer.9.extra.weight"),
])
def test_bad_checkpoint_names_the_tensor_in_one_line(tmp_path, edit, needle):
    _tiny_roberta(tmp_path)
    _rewrite(tmp_path, edit)
    with pytest.raises(hf_io.CheckpointError) as err:
        bert_weights.load(str(tmp_path))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_pytorch_bin_read_with_weights_only(tmp_path):
    ref_model = _tiny_roberta(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref_model.state_dict(), tmp_path / "pytorch_model.bin")
    config, params = bert_weights.load(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(params["encoder"]["layer_0"]["attention"]["query"]["kernel"]),
                                  ref_model.encoder.layer[0].attention.self.query.weight.detach().numpy().T)


def test_export_round_trip_loads_in_transformers(minilm, torch_minilm):
    state = bert_weights.to_hf_state(minilm.config, minilm.params)
    ref = {k: v.numpy() for k, v in torch_minilm.state_dict().items() if k in state}
    assert set(ref) == set(state)
    for k in state:
        np.testing.assert_array_equal(state[k], ref[k])


def test_config_refuses_other_architectures():
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        BertConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible by num_heads=4"):
        BertConfig(hidden_size=30, num_heads=4)
