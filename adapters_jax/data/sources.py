"""Builds (once, cached under data_dir) and opens datasets as random-access tfds sources.

Every loader returns a `SourceSet`: per-split `tfds` data sources (random access, read
with `as_data_source`, so TensorFlow is not needed), the label names, the record field
names, and the row reports written at build time.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Mapping, Optional, Sequence

import tensorflow_datasets as tfds

from adapters_jax.data import builders, glue
from adapters_jax.data.files import TableFormat
from adapters_jax.data.rows import DEFAULT_MAX_CHARS

CORPUS_BUILDERS = {"rotten_tomatoes": builders.RottenTomatoes, "bbc_news": builders.BbcNews,
                   "tweet_sentiment": builders.TweetSentiment}


@dataclasses.dataclass(frozen=True)
class SourceSet:
    """Random-access splits (records are dicts of bytes / ints) plus what reads them."""
    splits: Mapping[str, Sequence[dict]]
    label_names: tuple
    text_key: str = "text"
    pair_key: Optional[str] = None
    label_key: str = "label"
    rows: Mapping[str, dict] = dataclasses.field(default_factory=dict)  # split -> RowReport dict
    location: str = ""
    render: Optional[Callable[[dict], str]] = None  # LM sources: record -> one text (data/lm.py)

    def split(self, name: str) -> Sequence[dict]:
        if name not in self.splits:
            raise ValueError(f"no split {name!r} in {self.location}; splits: {', '.join(self.splits)}")
        return self.splits[name]


def default_data_dir(data_dir: Optional[str] = None) -> str:
    """data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    d = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(os.fspath(d))


def _prepared(builder: tfds.core.DatasetBuilder, pair_key: Optional[str] = None) -> SourceSet:
    """download_and_prepare is a no-op once the dataset is built."""
    builder.download_and_prepare()
    rows = dict(builder.info.metadata.get("rows", {})) if builder.info.metadata else {}
    for split, rep in rows.items():
        if sum(rep.get("skipped", {}).values()):
            logging.warning("%s %s: skipped bad rows %s, e.g. %s", builder.info.full_name, split,
                            rep["skipped"], rep.get("examples", [])[:3])
    names = tuple(builder.info.features["label"].names)
    return SourceSet(splits=builder.as_data_source(), label_names=names, pair_key=pair_key,
                     rows=rows, location=os.fspath(builder.data_dir))


def load_corpus(name: str, *, data_dir: Optional[str] = None) -> SourceSet:
    """rotten_tomatoes, bbc_news or tweet_sentiment: splits train/validation/test."""
    cls = CORPUS_BUILDERS[name]
    return _prepared(cls(data_dir=default_data_dir(data_dir), file_format="array_record"))


def load_files(files: Mapping[str, str], *, data_dir: Optional[str] = None,
               label_names: Optional[Sequence[str]] = None, table: TableFormat = TableFormat(),
               skip_bad_rows: bool = False, max_chars: int = DEFAULT_MAX_CHARS,
               tag: str = "files") -> SourceSet:
    """A user's CSV/TSV/JSONL files, files = {'train': path, 'validation': path, ...}."""
    cfg = builders.text_files_config(files, label_names=label_names, table=table,
                                     skip_bad_rows=skip_bad_rows, max_chars=max_chars, tag=tag)
    builder = builders.TextFiles(config=cfg, data_dir=default_data_dir(data_dir),
                                 file_format="array_record")
    return _prepared(builder, pair_key="text_pair" if cfg.has_pair else None)


def load_glue_tsv(task: str, *, glue_dir: str, data_dir: Optional[str] = None,
                  skip_bad_rows: bool = False, max_chars: int = DEFAULT_MAX_CHARS) -> SourceSet:
    """GLUE from a local folder in GLUE's layout (see `adapters_jax.data.glue`)."""
    spec = glue.task(task)
    return load_files(glue.tsv_files(task, glue_dir), data_dir=data_dir, label_names=spec.label_names,
                      table=spec.table_format(), skip_bad_rows=skip_bad_rows, max_chars=max_chars,
                      tag=f"glue_{task}")


def load_glue_tfds(task: str, *, data_dir: Optional[str] = None) -> SourceSet:
    """GLUE through `tfds.data_source('glue/<task>')`: downloads once, so it needs internet.

    tfds does not import its GLUE module without TensorFlow, so it is imported here.
    The test splits have label -1 (hidden by GLUE): evaluate on the validation split(s).
    """
    spec = glue.task(task)
    import tensorflow_datasets.text.glue  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    splits = tfds.data_source(f"glue/{task}", data_dir=default_data_dir(data_dir))
    return SourceSet(splits=splits, label_names=spec.label_names, text_key=spec.tfds_text,
                     pair_key=spec.tfds_pair, location=f"glue/{task}")
