"""User files, bad rows, the GLUE TSV layout, the registry and make_datasets end to end."""
import json
import os

import numpy as np
import pytest

from tests.test_data_shared import data_dir, tok  # noqa: F401  (pytest fixtures)

pytest.importorskip("tensorflow_datasets")
from adapters_jax.data import DEFAULT_BUCKETS, bucket_lengths, make_datasets, registry, sources  # noqa: E402
from adapters_jax.data.files import TableFormat, read_table  # noqa: E402
from adapters_jax.data.rows import BadRowError, RowChecker  # noqa: E402

GLUE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "glue")

GOOD = ["great film,pos", "dull and long,neg", "a delight,pos", "not for me,neg"]
BAD = {  # csv line -> reason; each bad line goes in as data row 3
    ",neg": "empty_text",
    "no label here,": "missing_label",
    "so so,meh": "unknown_label",
    "caf\xe9 au lait,pos": "non_utf8",  # a Latin-1 byte in a UTF-8 file
    "x" * 200 + ",pos": "too_long",
    "one,two,three": "malformed",
}


def _write_csv(path, bad_line):
    lines = ["text,label", GOOD[0], GOOD[1], bad_line, GOOD[2], GOOD[3]]
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return str(path)


@pytest.mark.parametrize("bad_line,reason", list(BAD.items()))
def test_bad_row_raises_with_file_and_row_or_is_counted(tmp_path, bad_line, reason):
    path = _write_csv(tmp_path / "data.csv", bad_line)
    strict = RowChecker(("neg", "pos"), max_chars=100)
    with pytest.raises(BadRowError) as err:
        list(read_table(path, strict))
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"{path}: row 3: ")
    lenient = RowChecker(("neg", "pos"), skip_bad_rows=True, max_chars=100)
    kept = [ex["text"] for _, ex in read_table(path, lenient)]
    assert kept == [line.split(",")[0] for line in GOOD]
    assert lenient.report.skipped == {reason: 1} and lenient.report.kept == 4
    assert lenient.report.examples[0].startswith(f"{path}: row 3: ")


def test_jsonl_bad_line_is_reported_by_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{not json\n')
    with pytest.raises(ValueError, match=r"d\.jsonl: row 3: invalid JSON"):
        list(read_table(str(path), RowChecker(("0", "1"))))


def test_user_files_build_with_inferred_labels_and_pairs(tmp_path, data_dir):
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.tsv"
    rows = [("a man eats", "someone eats", "yes"), ("a dog runs", "a cat sleeps", "no"),
            ("it rains", "the ground is wet", "yes"), ("he left", "he stayed", "no")]
    train.write_text("".join(json.dumps({"text": a, "text_pair": b, "label": c}) + "\n"
                             for a, b, c in rows))
    dev.write_text("text\ttext_pair\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows[:2]))
    src = sources.load_files({"train": str(train), "validation": str(dev)}, data_dir=data_dir)
    assert src.label_names == ("no", "yes") and src.pair_key == "text_pair"
    assert len(src.split("train")) == 4 and len(src.split("validation")) == 2
    got = sorted((r["text"].decode(), r["text_pair"].decode(), src.label_names[r["label"]])
                 for r in (src.split("train")[i] for i in range(4)))
    assert got == sorted(rows)


def test_user_files_skip_bad_rows_through_the_builder(tmp_path, data_dir):
    path = _write_csv(tmp_path / "train.csv", "so so,meh")
    with pytest.raises(ValueError, match=r"train\.csv: row 3: label 'meh' is not in"):
        sources.load_files({"train": path}, data_dir=data_dir, label_names=("neg", "pos"))
    src = sources.load_files({"train": path}, data_dir=data_dir, label_names=("neg", "pos"),
                             skip_bad_rows=True)
    assert len(src.split("train")) == 4
    assert src.rows["train"]["skipped"] == {"unknown_label": 1}


def test_integer_label_names_are_never_read_as_indices(tmp_path):
    path = tmp_path / "stars.csv"
    path.write_text("text,label\ngood,5\nbad,1\nmeh,3\nodd,0\n")
    checker = RowChecker(("1", "3", "5"), skip_bad_rows=True)
    labels = [ex["label"] for _, ex in read_table(str(path), checker)]
    assert labels == [2, 0, 1] and checker.report.skipped == {"unknown_label": 1}


def test_glue_tsv_sst2_fixture(data_dir):
    src = registry.load("glue_tsv/sst2", glue_dir=GLUE_DIR, data_dir=data_dir)
    with open(os.path.join(GLUE_DIR, "SST-2", "train.tsv"), encoding="utf-8") as f:
        lines = [ln.rstrip("\n").split("\t") for ln in f][1:]
    assert len(src.split("train")) == len(lines) and src.label_names == ("negative", "positive")
    got = sorted((r["text"].decode(), int(r["label"])) for r in
                 (src.split("train")[i] for i in range(len(lines))))
    assert got == sorted((s, int(l)) for s, l in lines)  # stray quotes kept verbatim
    assert any('"' in s for s, _ in got)
    assert len(src.split("validation")) == 4


def test_glue_tsv_pair_and_headerless_tasks(tok, data_dir):
    ds = make_datasets("glue_tsv/rte", tok, batch_size=2, max_length=32, seed=0,
                       glue_dir=GLUE_DIR, data_dir=data_dir, process_index=0, process_count=1)
    assert ds.label_names == ("entailment", "not_entailment") and ds.eval_size == 3
    assert (next(ds.train)["token_type_ids"] == 1).any()  # the second sentence is segment 1
    assert sum(float(b["weights"].sum()) for b in ds.eval_batches) == 3
    cola = registry.load("glue_tsv/cola", glue_dir=os.path.join(GLUE_DIR, "CoLA"), data_dir=data_dir)
    texts = {cola.split("train")[i]["text"].decode(): int(cola.split("train")[i]["label"])
             for i in range(4)}
    assert texts["The book was read by the students."] == 1
    assert texts["The students was reading book the."] == 0


def test_glue_tfds_names_match_the_tfds_builder(tmp_path):
    """The online path's field names and label order, checked without downloading."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text.glue  # noqa: F401
    from adapters_jax.data import glue
    for name, task in glue.TASKS.items():
        feats = tfds.builder(f"glue/{name}", data_dir=str(tmp_path)).info.features
        assert tuple(feats["label"].names) == task.label_names
        assert task.tfds_text in feats and (task.tfds_pair is None or task.tfds_pair in feats)


def test_unknown_dataset_names_the_known_ones(tok):
    with pytest.raises(ValueError) as err:
        make_datasets("rotten_potatoes", tok, batch_size=8, process_index=0, process_count=1)
    msg = str(err.value)
    assert "\n" not in msg and "'rotten_potatoes'" in msg
    for known in ("rotten_tomatoes", "bbc_news", "tweet_sentiment", "files", "glue/sst2",
                  "glue_tsv/mnli"):
        assert known in msg


def test_make_datasets_rotten_tomatoes_end_to_end(tok, data_dir):
    ds = make_datasets("rotten_tomatoes", tok, batch_size=32, max_length=64, seed=0,
                       data_dir=data_dir)  # process index/count from jax (1 process here)
    assert (ds.num_labels, ds.train_size, ds.eval_size) == (2, 10347, 1453)
    assert ds.steps_per_epoch == 10347 // 32
    b = next(ds.train)
    lengths = bucket_lengths(DEFAULT_BUCKETS, 64)  # (16, 32, 48, 64)
    assert b["input_ids"].shape[0] == 32 and b["input_ids"].shape[1] in lengths
    assert all(e["input_ids"].shape[1] in lengths for e in ds.eval_batches)
    assert ds.train.get_state()["next_index"] == 1
    assert np.isin(b["labels"], [0, 1]).all()
