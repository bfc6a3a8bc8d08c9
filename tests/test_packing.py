"""Sequence packing (`adapters_jax.data.packing`, BertModel's segment_ids). The reference for the
model is each example alone in an ordinary padded batch: packed logits, loss and gradients must
match it. The reference for the packer is its contract: every example once, no row over capacity."""
import dataclasses

import grain
import jax
import numpy as np
import pytest

from adapters_jax import trainer
from adapters_jax.adapters import presets
from adapters_jax.adapters.spec import AdapterSpec
from adapters_jax.backbones.attention import segment_positions
from adapters_jax.backbones.bert import BertModel
from adapters_jax.data import batching, packing, pipeline
from adapters_jax.heads import ClassificationHead
from adapters_jax.model import AdaptedModel
from experiments import bench_steps as B

CFG = dataclasses.replace(B.MODELS["tiny"], hidden_dropout=0.0, attention_dropout=0.0)
LENGTH, SEGMENTS = 24, 4


def test_pack_places_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 25, 300)
    rows = packing.pack(lengths, LENGTH, SEGMENTS)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(lengths[row].sum() <= LENGTH and len(row) <= SEGMENTS for row in rows)
    lower = max(-(-lengths.sum() // LENGTH), -(-300 // SEGMENTS))  # no packing can use fewer rows
    assert len(rows) <= 11 / 9 * lower + 1  # best-fit decreasing's bound
    # the row structure depends on the multiset of lengths only: every epoch has the same step count
    perm = rng.permutation(300)
    again = packing.pack(lengths[perm], LENGTH, SEGMENTS)
    assert sorted(sorted(lengths[perm][r].tolist()) for r in again) == sorted(sorted(lengths[r].tolist()) for r in rows)
    with pytest.raises(ValueError, match="25 tokens does not fit a packed row of 24"):
        packing.pack([3, 25], LENGTH, SEGMENTS)


def test_segment_positions_restart_at_each_example():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]], np.int32)
    want = np.array([[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(np.asarray(segment_positions(seg)), want)


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(2, LENGTH + 1))
        out.append({"ids": rng.integers(5, CFG.vocab_size, k).astype(np.int32),
                    "type_ids": (np.arange(k) >= k // 2).astype(np.int32),  # a pair's second part
                    "label": np.int32(rng.integers(0, 2))})
    return out


def _both(examples):
    """(padded batch [N, LENGTH], packed batch [R, ...], rows: example indices per packed row)."""
    rows = packing.pack([len(e["ids"]) for e in examples], LENGTH, SEGMENTS)
    packed = packing.collate_packed([[examples[i] for i in r] for r in rows], LENGTH, SEGMENTS, pad_id=0)
    return batching.collate(examples, LENGTH, pad_id=0), packed, rows


def _model(pooling, cfg=CFG, skip=True, prefix=False):
    """Houlsby and LoRA adapters (and prefix keys every example of a row sees, with `prefix`)."""
    placements = presets.houlsby(bottleneck_dim=8) + presets.lora(r=4, alpha=8)
    if prefix:
        placements += presets.prefix(prefix_length=3, num_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads)
    spec = AdapterSpec(placements=placements)
    return AdaptedModel(BertModel(cfg, filler=spec), ClassificationHead(2, pooling=pooling), skip_unread_rows=skip)


def _params(model, batch):
    params = jax.jit(lambda r: model.init(r, batch)["params"])(jax.random.PRNGKey(0))
    noise = jax.random.PRNGKey(1)  # adapters start near identity: move every leaf off it
    return jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(noise, p.shape, p.dtype), params)


def _unpack(packed_logits, rows, n):
    out = np.zeros((n,) + packed_logits.shape[2:], np.float32)
    for r, members in enumerate(rows):
        for k, i in enumerate(members):
            out[i] = packed_logits[r, k]
    return out


@pytest.mark.parametrize("pooling,skip,roberta,prefix", [("cls", True, False, False), ("cls", False, True, False),
                                                         ("mean", True, False, True), ("pooler", True, False, False)])
def test_packed_logits_match_each_example_alone(pooling, skip, roberta, prefix):
    """cls with skip: the last layer computes each example's first row only."""
    cfg = dataclasses.replace(CFG, roberta_positions=True, pad_token_id=1) if roberta else CFG
    examples = _examples(13)
    padded, packed, rows = _both(examples)
    assert len(rows) < len(examples)  # rows really are shared
    model = _model(pooling, cfg, skip, prefix)
    params = _params(model, padded)
    want = np.asarray(jax.jit(model.apply)({"params": params}, padded))  # [N, 2]
    got = np.asarray(jax.jit(model.apply)({"params": params}, packed))  # [R, S, 2]
    np.testing.assert_allclose(_unpack(got, rows, len(examples)), want, atol=2e-5, rtol=1e-4)


def _decoder_model(family, pooling):
    """A tiny Llama (grouped-query heads, RoPE) or GPT-2 (learned positions), with LoRA and a
    bottleneck adapter, classifying."""
    spec = AdapterSpec(placements=presets.pfeiffer(bottleneck_dim=8) + presets.lora(r=4, alpha=8))
    if family == "llama":
        from adapters_jax.backbones.llama import LlamaConfig, LlamaModel
        cfg = LlamaConfig(vocab_size=CFG.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=48, max_position_embeddings=64)
        backbone = LlamaModel(cfg, filler=spec)
    else:
        from adapters_jax.backbones.gpt2 import GPT2Config, GPT2Model
        cfg = GPT2Config(vocab_size=CFG.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                         max_position_embeddings=64, embedding_dropout=0.0, hidden_dropout=0.0,
                         attention_dropout=0.0)
        backbone = GPT2Model(cfg, filler=spec)
    return AdaptedModel(backbone, ClassificationHead(2, pooling=pooling))


@pytest.mark.parametrize("family,pooling", [("llama", "last"), ("llama", "mean"), ("gpt2", "last")])
def test_packed_decoder_matches_each_example_alone(family, pooling):
    """A causal decoder on packed rows: each token attends the earlier tokens of its own example,
    so logits, loss and gradients are each example's alone (right-padded, as `batching.collate`
    pads). Fails with the padding mask in place of the pair mask, and (GPT-2's learned positions)
    with unrestarted positions; RoPE, which sees only position differences, would pass those."""
    examples = _examples(11, seed=2)
    padded, packed, rows = _both(examples)
    model = _decoder_model(family, pooling)
    params = _params(model, padded)
    want = np.asarray(jax.jit(model.apply)({"params": params}, padded))  # [N, 2]
    got = np.asarray(jax.jit(model.apply)({"params": params}, packed))  # [R, S, 2]
    np.testing.assert_allclose(_unpack(got, rows, len(examples)), want, atol=2e-5, rtol=1e-4)
    _assert_loss_and_gradients_match(model, params, padded, packed)


def _assert_loss_and_gradients_match(model, params, padded, packed):
    """The packed batch's classification loss and every gradient leaf equal the padded batch's."""
    def loss(p, batch):
        return trainer.task_loss(model.apply({"params": p}, batch), batch, "classification")[0]

    grad = jax.jit(jax.value_and_grad(loss))
    (want, want_g), (got, got_g) = grad(params, padded), grad(params, packed)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_g), jax.tree_util.tree_leaves(want_g)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=2e-4, err_msg=jax.tree_util.keystr(path))


def test_packed_loss_and_gradients_match_the_padded_batch():
    examples = _examples(11, seed=1)
    padded, packed, _ = _both(examples)
    model = _model("cls")
    _assert_loss_and_gradients_match(model, _params(model, padded), padded, packed)


def _dataset(examples, seed=3, **kw):
    lengths = np.array([len(e["ids"]) for e in examples])
    return packing.PackedBatches(grain.MapDataset.source(examples), lengths=lengths, rows_per_step=4,
                                 length=LENGTH, max_segments=SEGMENTS, pad_id=0, seed=seed, **kw)


def _signatures(batch):
    """Each example of a packed batch as (label, its token ids)."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        for k in np.flatnonzero(batch["weights"][r]):
            ids = batch["input_ids"][r][batch["segment_ids"][r] == k + 1]
            out.append((int(batch["labels"][r, k]), tuple(ids.tolist())))
    return out


def test_an_epoch_of_packed_batches_holds_every_example_once():
    examples = _examples(60, seed=2)
    ds = _dataset(examples)
    want = sorted((int(e["label"]), tuple(e["ids"].tolist())) for e in examples)
    epochs = [[ds[e * ds.steps_per_epoch + s] for s in range(ds.steps_per_epoch)] for e in range(2)]
    for batches in epochs:
        assert sorted(x for b in batches for x in _signatures(b)) == want
    assert _signatures(epochs[0][0]) != _signatures(epochs[1][0])  # reshuffled each epoch
    assert _signatures(_dataset(examples)[5]) == _signatures(ds[5])  # a pure function of (seed, index)
    halves = [_dataset(examples, process_index=p, process_count=2)[1] for p in range(2)]
    assert _signatures(halves[0]) + _signatures(halves[1]) == _signatures(ds[1])


def test_packed_iterator_resumes_and_refuses_a_bucketed_state():
    examples = _examples(60, seed=2)
    it = pipeline.TrainIterator(_dataset(examples))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = next(it)
    again = pipeline.TrainIterator(_dataset(examples))
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["input_ids"], want["input_ids"])
    bucketed = {"next_index": 3, "seed": 3, "global_batch_size": 8, "num_examples": 60, "pool_batches": 32,
                "buckets": [LENGTH]}
    with pytest.raises(ValueError, match="iterator state was saved with different .*packed_rows.*"
                                         "saved without packed rows: resume it with data.pack='false'"):
        again.set_state(bucketed)


def test_auto_rows_hold_the_batch_size_on_average():
    assert packing.auto_rows(32, 27.0, 80, 1) == 11  # 32 * 27 / 80 = 10.8
    assert packing.auto_rows(32, 27.0, 80, 8) == 16
    assert packing.auto_rows(2, 3.0, 80, 1) == 1


def test_packed_eval_batches_give_every_example_its_own_logits_once():
    examples = _examples(29, seed=4)
    padded, _, _ = _both(examples)
    model = _model("cls")
    params = _params(model, padded)
    want = np.asarray(jax.jit(model.apply)({"params": params}, padded))  # [N, 2]
    batches = packing.packed_eval_batches(examples, batch_size=8, max_length=LENGTH, max_segments=SEGMENTS,
                                          pad_id=0, row_multiple=2)
    assert len({b["input_ids"].shape for b in batches}) == 1  # one shape: one compile
    got, seen = np.zeros_like(want), []
    for b in batches:
        logits = np.asarray(jax.jit(model.apply)({"params": params}, b))  # [R, S, 2]
        real = b["example_index"] >= 0
        np.testing.assert_array_equal(real, b["weights"] > 0)
        got[b["example_index"][real]] = logits[real]
        seen += b["example_index"][real].tolist()
    assert sorted(seen) == list(range(len(examples)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("pair_key", [None, "pair"])
def test_token_lengths_in_one_batch_match_tokenizing_each_row(pair_key):
    from adapters_jax.hub import resolve
    from adapters_jax.tokenization import Tokenizer
    tok = Tokenizer.from_dir(resolve("tiny-random-bert"))
    words = "the film was a long slow and quite wonderful mess of ideas".split()
    records = [{"text": " ".join(words[:k]), "pair": " ".join(words[:k // 2]).encode(), "label": k % 2}
               for k in range(1, len(words))]  # the long ones are truncated (longest first for pairs)
    tokenize = batching.Tokenize(tok, 12, "text", pair_key, "label")
    want = [len(tokenize(r)["ids"]) for r in records]
    assert max(want) == 12 and min(want) < 12
    np.testing.assert_array_equal(batching.token_lengths(records, tokenize), want)
