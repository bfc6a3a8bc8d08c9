"""Row validation shared by every reader: one place decides what a bad row is.

A bad row (empty text, missing label, label outside the label set, bytes that are not
UTF-8, text longer than `max_chars`) either raises a one-line `ValueError` that names the
file and the row, or, with `skip_bad_rows=True`, is skipped and counted in a `RowReport`.
Rows are never dropped without a count.

Row numbers are 1-based and count data rows only (a header line is not a row).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Sequence

# Longer than any real sentence or news article; a field this long is almost always an
# unbalanced quote in a CSV file that swallowed the rows after it.
DEFAULT_MAX_CHARS = 100_000

REASONS = ("empty_text", "missing_label", "unknown_label", "non_utf8", "too_long", "malformed")


class BadRowError(ValueError):
    """A bad row, raised when `skip_bad_rows` is False. The message is one line."""


@dataclasses.dataclass
class RowReport:
    """Counts what a reader kept, skipped (by reason) and filtered on purpose.

    `filtered` holds rows dropped by design (e.g. Rotten Tomatoes 'plot' rows), `recoded`
    rows that were read with a documented fallback encoding.
    """
    kept: int = 0
    skipped: dict = dataclasses.field(default_factory=collections.Counter)
    filtered: dict = dataclasses.field(default_factory=collections.Counter)
    recoded: dict = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)  # first few "file: row n: why"

    @property
    def num_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def as_dict(self) -> dict:
        """JSON-serialisable summary (stored in the tfds metadata of a built dataset)."""
        return {"kept": self.kept, "skipped": dict(self.skipped), "filtered": dict(self.filtered),
                "recoded": dict(self.recoded), "examples": list(self.examples)}


def _has_bad_bytes(s: str) -> bool:
    """True when `s` holds lone surrogates, i.e. bytes decoded with 'surrogateescape'."""
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


@dataclasses.dataclass
class RowChecker:
    """Validates (text, text_pair, label) rows against a fixed label list.

    Args:
      label_names: the label list; a label value is matched by name first, then as an
        integer index into this list.
      skip_bad_rows: skip and count bad rows instead of raising.
      max_chars: longest text (and text_pair) accepted, in characters.
      report: where counts go.
    """
    label_names: Sequence[str]
    skip_bad_rows: bool = False
    max_chars: int = DEFAULT_MAX_CHARS
    report: RowReport = dataclasses.field(default_factory=RowReport)

    def __post_init__(self):
        self.label_names = tuple(str(n) for n in self.label_names)
        self._index = {n: i for i, n in enumerate(self.label_names)}
        # With integer names ('1', '2', '5') an integer value is a name, never an index.
        self._by_position = not all(n.lstrip("-").isdigit() for n in self.label_names)

    def bad(self, where: str, row: int, reason: str, detail: str) -> None:
        """Raises, or counts a skipped row. `reason` is one of REASONS."""
        msg = f"{where}: row {row}: {detail}"
        if not self.skip_bad_rows:
            raise BadRowError(msg + " (pass skip_bad_rows=True to skip and count bad rows)")
        self.report.skipped[reason] = self.report.skipped.get(reason, 0) + 1
        if len(self.report.examples) < 10:
            self.report.examples.append(msg)

    def label_index(self, value: Any) -> Optional[int]:
        """Name lookup first ('positive'), then an integer index ('1', 1); None if neither.

        The index fallback is off when the names are themselves integers.
        """
        if isinstance(value, bool):
            return None
        key = str(value).strip()
        if key in self._index:
            return self._index[key]
        if not self._by_position:
            return None
        try:
            i = int(key)
        except ValueError:
            return None
        return i if 0 <= i < len(self.label_names) else None

    def check(self, where: str, row: int, text: Any, label: Any,
              text_pair: Any = None, has_pair: bool = False) -> Optional[dict]:
        """Returns {'text', 'label'[, 'text_pair']} or None for a skipped row."""
        fields = [("text", text)] + ([("text_pair", text_pair)] if has_pair else [])
        for name, value in fields:
            if value is None or not isinstance(value, str) or not value.strip():
                self.bad(where, row, "empty_text", f"empty or missing {name}")
                return None
            if _has_bad_bytes(value):
                self.bad(where, row, "non_utf8", f"{name} holds bytes that are not UTF-8")
                return None
            if len(value) > self.max_chars:
                self.bad(where, row, "too_long",
                         f"{name} has {len(value)} characters > max_chars={self.max_chars}")
                return None
        if label is None or (isinstance(label, str) and not label.strip()):
            self.bad(where, row, "missing_label", "missing label")
            return None
        index = self.label_index(label)
        if index is None:
            self.bad(where, row, "unknown_label",
                     f"label {str(label)[:40]!r} is not in {list(self.label_names)}")
            return None
        self.report.kept += 1
        out = {"text": text, "label": index}
        if has_pair:
            out["text_pair"] = text_pair
        return out
