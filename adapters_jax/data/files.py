"""Reader for a user's own CSV, TSV or JSONL files (and GLUE's TSV layout).

Columns are named `text`, optional `text_pair`, and `label` by default; other names (or
0-based column indices for files without a header, as CoLA's train.tsv) can be given.
Labels may be names or integer indices into the label list. When no label list is given
it is inferred as the sorted set of label values across all files (numerically sorted
when every value is an integer).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Iterator, Mapping, Optional, Sequence, Union

from adapters_jax.data.corpora import decoded_lines
from adapters_jax.data.rows import RowChecker

Column = Union[str, int]


@dataclasses.dataclass(frozen=True)
class TableFormat:
    """How to read one family of files.

    Attributes:
      fmt: 'csv', 'tsv' or 'jsonl'; None infers it from each file's extension.
      text_column, pair_column, label_column: names (or indices without a header).
        pair_column None means single-sentence; 'auto' uses 'text_pair' when present.
      has_header: whether the first line names the columns (csv/tsv only).
      quoting: False reads TSV without quote handling (csv.QUOTE_NONE), as GLUE requires:
        its sentences hold unbalanced quotes.
    """
    fmt: Optional[str] = None
    text_column: Column = "text"
    pair_column: Optional[Column] = "auto"
    label_column: Column = "label"
    has_header: bool = True
    quoting: bool = True

    def file_format(self, path: str) -> str:
        if self.fmt:
            return self.fmt
        ext = os.path.basename(path).lower().rsplit(".", 1)[-1]
        found = {"csv": "csv", "tsv": "tsv", "txt": "tsv", "jsonl": "jsonl", "json": "jsonl"}.get(ext)
        if found is None:
            raise ValueError(f"{path}: cannot infer the format from '.{ext}'; pass fmt='csv', 'tsv' or 'jsonl'")
        return found


def records(path: str, form: TableFormat) -> Iterator[tuple[int, Optional[dict], str]]:
    """Yields (row, record or None, error); row n is the n-th line after any header."""
    fmt = form.file_format(path)
    with open(path, "rb") as raw:
        lines = decoded_lines(raw)
        if fmt == "jsonl":
            for row, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield row, None, f"invalid JSON ({e.msg})"
                    continue
                yield (row, rec, "") if isinstance(rec, dict) else (row, None, "not a JSON object")
            return
        kw = {"delimiter": "\t" if fmt == "tsv" else ","}
        if not form.quoting:
            kw["quoting"] = csv.QUOTE_NONE
        # Long fields are judged by max_chars, not by csv's 131,072 default (idempotent).
        csv.field_size_limit(max(csv.field_size_limit(), 2 ** 31 - 1))
        reader = csv.reader(lines, **kw)
        header = next(reader, None) if form.has_header else None
        row = 0
        while True:
            row += 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. a NUL byte; the reader goes on at the next line
                yield row, None, f"unreadable ({e})"
                continue
            if not values:
                continue
            if header is None:
                yield row, dict(enumerate(values)), ""
            elif len(values) != len(header):
                yield row, None, f"has {len(values)} fields, the header has {len(header)}"
            else:
                yield row, dict(zip(header, values)), ""


def _pair_column(form: TableFormat, first: Optional[dict]) -> Optional[Column]:
    if form.pair_column != "auto":
        return form.pair_column
    return "text_pair" if first is not None and "text_pair" in first else None


def read_table(path: str, checker: RowChecker, form: TableFormat = TableFormat()
               ) -> Iterator[tuple[str, dict]]:
    """Yields (key, {'text', 'label'[, 'text_pair']}) for every good row of `path`."""
    pair_col, has_pair = None, None
    for row, rec, error in records(path, form):
        if rec is None:
            checker.bad(path, row, "malformed", error)
            continue
        if has_pair is None:
            pair_col = _pair_column(form, rec)
            has_pair = pair_col is not None
            for col in (form.text_column, form.label_column) + ((pair_col,) if has_pair else ()):
                if col not in rec:
                    raise ValueError(f"{path}: no column {col!r}; found {sorted(map(str, rec))}")
        label = rec.get(form.label_column)
        label = label if label is None or isinstance(label, (str, int)) else str(label)
        ex = checker.check(path, row, rec.get(form.text_column), label,
                           rec.get(pair_col) if has_pair else None, has_pair)
        if ex is not None:
            yield str(row), ex


def infer_label_names(paths: Sequence[str], form: TableFormat = TableFormat()) -> tuple[str, ...]:
    """Sorted distinct label values over `paths` (integers sorted numerically)."""
    values = set()
    for path in paths:
        for _, rec, _ in records(path, form):
            if rec is not None:
                v = rec.get(form.label_column)
                if v is not None and str(v).strip():
                    values.add(str(v).strip())
    if not values:
        raise ValueError(f"no labels found in column {form.label_column!r} of {list(paths)}")
    if all(v.lstrip("-").isdigit() for v in values):
        return tuple(str(v) for v in sorted(int(v) for v in values))
    return tuple(sorted(values))


def check_files(files: Mapping[str, str]) -> dict:
    """{split: absolute path}; raises one line naming a missing file."""
    out = {}
    for split, path in files.items():
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{split} file {path} does not exist")
        out[split] = path
    if not out:
        raise ValueError("files is empty; give {'train': path, 'validation': path, ...}")
    return out
