"""A tfds builder for a user's own CSV / TSV / JSONL files (and GLUE's local TSVs).

The config name carries a digest of the files' contents and of every reading option, so
a build is cached under <data_dir>/text_files/<tag>-<digest>/ and redone only when a
file or an option changes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Mapping, Optional, Sequence

import tensorflow_datasets as tfds

from adapters_jax.data import files as files_lib
from adapters_jax.data.rows import DEFAULT_MAX_CHARS, RowChecker


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    """Everything that decides the built content. Build it with `text_files_config`."""
    files: tuple = ()  # ((split, absolute path), ...)
    table: files_lib.TableFormat = files_lib.TableFormat()
    label_names: tuple = ()
    has_pair: bool = False
    skip_bad_rows: bool = False
    max_chars: int = DEFAULT_MAX_CHARS


def _digest(files: Mapping[str, str], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for split, path in sorted(files.items()):
        h.update(split.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def _first_record_has_pair(path: str, table: files_lib.TableFormat) -> bool:
    if table.pair_column != "auto":
        return table.pair_column is not None
    for _, rec, _ in files_lib.records(path, table):
        if rec is not None:
            return "text_pair" in rec
    return False


def text_files_config(files: Mapping[str, str], *, label_names: Optional[Sequence[str]] = None,
                      table: files_lib.TableFormat = files_lib.TableFormat(),
                      skip_bad_rows: bool = False, max_chars: int = DEFAULT_MAX_CHARS,
                      tag: str = "files") -> TextFilesConfig:
    """A config for `files` = {split: path}; label names inferred (sorted) when not given."""
    files = files_lib.check_files(files)
    if label_names is None:
        label_names = files_lib.infer_label_names(list(files.values()), table)
    label_names = tuple(str(n) for n in label_names)
    has_pair = _first_record_has_pair(next(iter(files.values())), table)
    options = dict(table=dataclasses.asdict(table), label_names=label_names, has_pair=has_pair,
                   skip_bad_rows=skip_bad_rows, max_chars=max_chars, version=TextFiles.VERSION)
    name = re.sub(r"[^a-z0-9_]+", "_", tag.lower()) + "-" + _digest(files, options)
    return TextFilesConfig(name=name, files=tuple(sorted(files.items())), table=table,
                           label_names=label_names, has_pair=has_pair,
                           skip_bad_rows=skip_bad_rows, max_chars=max_chars,
                           description=f"{tag}: " + ", ".join(f"{s}={p}" for s, p in files.items()))


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Text classification from local files: features text, [text_pair], label."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        feats = {"text": tfds.features.Text(),
                 "label": tfds.features.ClassLabel(names=list(cfg.label_names))}
        if cfg.has_pair:
            feats["text_pair"] = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, description=cfg.description,
                                     features=tfds.features.FeaturesDict(feats),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        return {split: self._generate_examples(split, path) for split, path in self.builder_config.files}

    def _generate_examples(self, split, path):
        cfg = self.builder_config
        table = dataclasses.replace(cfg.table, pair_column=cfg.table.pair_column
                                    if cfg.table.pair_column != "auto" else
                                    ("text_pair" if cfg.has_pair else None))
        checker = RowChecker(cfg.label_names, skip_bad_rows=cfg.skip_bad_rows, max_chars=cfg.max_chars)
        yield from files_lib.read_table(path, checker, table)
        self.info.metadata.setdefault("rows", {})[split] = checker.report.as_dict()
