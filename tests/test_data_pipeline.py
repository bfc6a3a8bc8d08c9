"""The grain pipeline: determinism, epochs, process sharding, bucketing, resume, eval."""
import json

import numpy as np
import pytest

from tests.test_data_shared import data_dir, rotten, synthetic, tok  # noqa: F401  (fixtures)

pytest.importorskip("grain")
from adapters_jax.data import batching, evaluation, pipeline  # noqa: E402

BUCKETS = (32, 64, 128)


def _train(tok, source, seed=0, gb=8, p=0, n=1, pool=4, max_length=128, epochs=None):
    tokenize = batching.Tokenize(tok, max_length)
    return pipeline.train_batches(source, tokenize, global_batch_size=gb, seed=seed,
                                  buckets=batching.bucket_lengths(BUCKETS, max_length),
                                  pad_id=tok.pad_id, pool_batches=pool, num_epochs=epochs,
                                  process_index=p, process_count=n)


def _rows(batch):
    """Each row as its unpadded token ids (rows of `synthetic` are unique)."""
    return [tuple(ids[m == 1]) for ids, m in zip(batch["input_ids"], batch["attention_mask"])]


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batch_layout(tok):
    b = next(iter(pipeline.TrainIterator(_train(tok, synthetic(64)))))
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert b[k].dtype == np.int32 and b[k].shape[0] == 8 and b[k].ndim == 2
    assert b["labels"].dtype == np.int32 and b["labels"].shape == (8,)


def test_same_seed_same_batches_other_seed_other_order(tok):
    src = synthetic(100)
    a = _take(pipeline.TrainIterator(_train(tok, src, seed=1)), 15)
    b = _take(pipeline.TrainIterator(_train(tok, src, seed=1)), 15)
    c = _take(pipeline.TrainIterator(_train(tok, src, seed=2)), 15)
    assert _same(a, b)
    assert [_rows(x) for x in a] != [_rows(x) for x in c]


def test_each_epoch_sees_distinct_examples_in_a_new_order(tok):
    src = synthetic(100)  # 12 steps of 8 per epoch, 4 left over each epoch
    ds = _train(tok, src, seed=3)
    assert ds.steps_per_epoch == 12
    epoch0 = [r for i in range(12) for r in _rows(ds[i])]
    epoch1 = [r for i in range(12, 24) for r in _rows(ds[i])]
    assert len(set(epoch0)) == len(epoch0) == 96 and len(set(epoch1)) == 96
    assert epoch0 != epoch1
    expect = {tuple(tok.encode_ids(r["text"].decode())[0]): r["label"] for r in src}
    for i in range(12):  # labels travel with their rows
        b = ds[i]
        assert [expect[row] for row in _rows(b)] == b["labels"].tolist()


def test_two_processes_split_the_global_batch(tok):
    src = synthetic(120)
    full = _train(tok, src, seed=5, gb=8, n=1)
    parts = [_train(tok, src, seed=5, gb=8, p=p, n=2) for p in (0, 1)]
    for i in range(20):
        g, a, b = full[i], parts[0][i], parts[1][i]
        assert a["input_ids"].shape == b["input_ids"].shape == (4, g["input_ids"].shape[1])
        assert not set(_rows(a)) & set(_rows(b))
        for k in g:
            assert np.array_equal(np.concatenate([a[k], b[k]]), g[k])


def test_batches_pad_to_the_smallest_bucket_that_fits(tok, rotten):
    ds = _train(tok, rotten.split("train"), gb=16, pool=8, max_length=100)
    buckets = batching.bucket_lengths(BUCKETS, 100)
    assert buckets == (32, 64, 100)
    seen = set()
    for i in range(40):
        b = ds[i]
        t, longest = b["input_ids"].shape[1], int(b["attention_mask"].sum(1).max())
        assert t in buckets and longest <= t
        assert buckets.index(t) == 0 or longest > buckets[buckets.index(t) - 1]
        seen.add(t)
    assert len(seen) >= 2


def test_length_grouping_cuts_padding(tok, rotten):
    def pad_fraction(pool):
        ds = _train(tok, rotten.split("train"), gb=16, pool=pool)
        masks = [ds[i]["attention_mask"] for i in range(64)]
        return 1 - sum(m.sum() for m in masks) / sum(m.size for m in masks)
    assert pad_fraction(16) < pad_fraction(1) - 0.05


def test_state_round_trip_resumes_at_the_next_batch(tok):
    src = synthetic(40)  # 5 steps per epoch: the resume crosses epochs
    it = pipeline.TrainIterator(_train(tok, src, seed=7))
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    assert state["next_index"] == 7
    expected = _take(it, 6)
    fresh = pipeline.TrainIterator(_train(tok, src, seed=7))
    fresh.set_state(state)
    assert _same(_take(fresh, 6), expected)
    it.set_state(state)  # rewinding a running iterator drops what it had prefetched
    assert _same(_take(it, 6), expected)
    other = pipeline.TrainIterator(_train(tok, src, seed=8))
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_num_epochs_ends_the_stream(tok):
    ds = _train(tok, synthetic(20), epochs=2)  # 2 steps per epoch
    assert len(list(pipeline.TrainIterator(ds))) == 4


def test_batch_size_must_split_over_processes(tok):
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        _train(tok, synthetic(20), gb=8, p=0, n=3)


def test_eval_keeps_every_example_once_with_weights(tok, rotten):
    src = rotten.split("validation")
    tokenize = batching.Tokenize(tok, 128)
    kw = dict(global_batch_size=64, buckets=BUCKETS, pad_id=tok.pad_id)
    one = evaluation.eval_batches(src, tokenize, **kw)
    two = [evaluation.eval_batches(src, tokenize, process_index=p, process_count=2, **kw)
           for p in (0, 1)]
    n = len(src)
    assert len(one) == len(two[0]) == len(two[1]) == -(-n // 64)
    idx = np.concatenate([b["example_index"][b["weights"] == 1] for b in one])
    assert sorted(idx.tolist()) == list(range(n))
    labels = np.concatenate([b["labels"][b["weights"] == 1] for b in one])
    assert np.array_equal(labels, np.asarray([src[int(i)]["label"] for i in idx]))
    assert sum(float(b["weights"].sum()) for b in one) == n
    assert (one[-1]["example_index"][one[-1]["weights"] == 0] == -1).all()
    assert one[-1]["weights"].dtype == np.float32
    for g, a, b in zip(one, *two):  # two processes: same shapes, together the global batch
        assert a["input_ids"].shape == b["input_ids"].shape
        assert np.array_equal(np.concatenate([a["example_index"], b["example_index"]]),
                              g["example_index"])
        assert g["input_ids"].shape[1] in BUCKETS
