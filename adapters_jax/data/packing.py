"""Sequence packing: several examples share each row of one fixed [R, L] grid per step.

Length buckets pad every batch up to a bucket (a quarter of the tokens on Rotten Tomatoes) and
compile one program per bucket. Packed rows waste almost nothing and compile once. Inside a row,
each example attends only to itself (`segment_ids`), restarts its positions, and is pooled from its
own first token (`segment_starts`), so its logits are the ones it would get alone in a padded row
(tests/test_packing.py).

    PackedBatches: random access to grid i = (epoch, g). Each epoch the examples are permuted
    (seed, epoch), packed best-fit-decreasing into rows of L tokens (ties keep the permuted order),
    the rows permuted again and cut into grids of R rows. The row structure depends only on the
    multiset of lengths, so every epoch has the same number of grids and no example is dropped.
"""
from __future__ import annotations

from typing import Optional, Sequence

import grain
import numpy as np

from adapters_jax.data import batching
from adapters_jax.data.epoch_cache import PlannedBatches


def pack(lengths: np.ndarray, capacity: int, max_segments: int) -> list:
    """Best-fit decreasing: lists of indices into `lengths`, each list one row whose lengths sum to
    <= capacity and which holds <= max_segments examples. Longest first; equal lengths keep their
    order in `lengths`, which the caller permutes each epoch."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an example of {int(lengths.max())} tokens does not fit a packed row of {capacity}")
    rows, room = [], []
    open_by_room = [[] for _ in range(capacity + 1)]  # room left -> rows that still take an example
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        row = next((open_by_room[r].pop() for r in range(n, capacity + 1) if open_by_room[r]), None)
        if row is None:
            row = len(rows)
            rows.append([])
            room.append(capacity)
        rows[row].append(int(i))
        room[row] -= n
        if len(rows[row]) < max_segments and room[row] > 0:
            open_by_room[room[row]].append(row)
    return rows


def collate_packed(rows: Sequence[Sequence[dict]], length: int, max_segments: int, pad_id: int) -> dict:
    """Rows of tokenized examples -> the packed batch (R = len(rows), L = length, S = max_segments):

      input_ids, token_type_ids, attention_mask (1 on real tokens): int32 [R, L]
      segment_ids: int32 [R, L], k = 1..n for a row's k-th example, 0 on padding
      segment_starts: int32 [R, S], the position of each example's first token (0 when empty)
      labels: [R, S] (the examples' label dtype); weights: float32 [R, S], 1 for an example, 0 for an empty slot
    An empty row (the last grid of an epoch is filled up with them) has weight 0 everywhere.
    """
    r = len(rows)
    label_dtype = next((np.asarray(ex["label"]).dtype for row in rows for ex in row), np.int32)
    out = {"input_ids": np.full((r, length), pad_id, np.int32), "token_type_ids": np.zeros((r, length), np.int32),
           "attention_mask": np.zeros((r, length), np.int32), "segment_ids": np.zeros((r, length), np.int32),
           "segment_starts": np.zeros((r, max_segments), np.int32), "labels": np.zeros((r, max_segments), label_dtype),
           "weights": np.zeros((r, max_segments), np.float32)}
    for i, examples in enumerate(rows):
        if len(examples) > max_segments:
            raise ValueError(f"packed row {i} holds {len(examples)} examples, more than {max_segments}")
        at = 0
        for k, ex in enumerate(examples):
            n = len(ex["ids"])
            if at + n > length:
                raise ValueError(f"packed row {i} needs more than {length} tokens")
            out["input_ids"][i, at:at + n] = ex["ids"]
            out["token_type_ids"][i, at:at + n] = ex["type_ids"]
            out["attention_mask"][i, at:at + n] = 1
            out["segment_ids"][i, at:at + n] = k + 1
            out["segment_starts"][i, k] = at
            out["labels"][i, k] = ex["label"]
            out["weights"][i, k] = 1.0
            at += n
    return out


def row_length(lengths: np.ndarray, max_length: int) -> int:
    """Packed row length: the longest example rounded up to a multiple of 8, at most max_length
    (shorter rows make attention cheaper per token; every example still fits)."""
    return min(int(max_length), -(-int(np.max(lengths)) // 8) * 8)


def packed_eval_batches(rows: Sequence[dict], *, batch_size: int, max_length: int, max_segments: int, pad_id: int,
                        row_multiple: int = 1, process_index: int = 0, process_count: int = 1) -> list:
    """This process's eval batches on packed rows: every example once, all batches one shape (one
    compile). rows: tokenized examples in split order. Each batch is a `collate_packed` dict plus
    example_index int32 [R_local, S] (the example's position in the split, -1 on an empty slot).
    R holds `batch_size` examples of the mean length on average (`auto_rows`)."""
    if not rows:
        return []
    lengths = np.asarray([len(r["ids"]) for r in rows])  # [N]
    length = row_length(lengths, max_length)
    per_step = auto_rows(batch_size, float(lengths.mean()), length, int(np.lcm(max(1, row_multiple), process_count)))
    packed = pack(lengths, length, max_segments)
    packed += [[] for _ in range(-len(packed) % per_step)]
    out = []
    for start in range(0, len(packed), per_step):
        mine = batching.local_rows(packed[start:start + per_step], process_index, process_count)
        batch = collate_packed([[rows[i] for i in row] for row in mine], length, max_segments, pad_id)
        index = np.full((len(mine), max_segments), -1, np.int32)  # [R_local, S]
        for r, row in enumerate(mine):
            index[r, :len(row)] = row
        batch["example_index"] = index
        out.append(batch)
    return out


def auto_rows(batch_size: int, mean_length: float, length: int, multiple: int) -> int:
    """Rows per packed step holding `batch_size` examples of the mean length on average, rounded up
    to a multiple of `multiple` (processes, devices, accumulation steps must split the rows)."""
    rows = max(1, int(np.ceil(batch_size * mean_length / length)))
    return -(-rows // multiple) * multiple


class PackedBatches(PlannedBatches):
    """Random access to this process's rows of packed grid i: dict of [R_local, ...] arrays.

    Args:
      parent: tokenized examples in source order (random access; read again per grid).
      lengths: [N] token count of each example (a pass over the split before training).
      rows_per_step: R, rows per global grid.
      length: L, tokens per row (the config's max_length: every example fits).
      max_segments: S, most examples in one row.
      num_epochs: None repeats forever.
    """

    def __init__(self, parent: grain.MapDataset, *, lengths: np.ndarray, rows_per_step: int, length: int,
                 max_segments: int, pad_id: int, seed: int, num_epochs: Optional[int] = None,
                 process_index: int = 0, process_count: int = 1):
        super().__init__(parent)
        batching.check_sharding(rows_per_step, process_index, process_count)
        if max_segments < 1:
            raise ValueError(f"data.pack_segments={max_segments} must be >= 1")
        self.lengths = np.asarray(lengths, np.int64)  # [N]
        self.rows_per_step, self.length, self.max_segments = rows_per_step, length, max_segments
        self.pad_id, self.seed, self.num_epochs = pad_id, seed, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.num_rows = len(pack(self.lengths, length, max_segments))  # the same every epoch
        self.steps_per_epoch = -(-self.num_rows // rows_per_step)
        self.num_examples = len(self.lengths)
        self._init_cache()

    def __str__(self) -> str:
        return (f"PackedBatches(rows_per_step={self.rows_per_step}, length={self.length}, "
                f"max_segments={self.max_segments}, steps_per_epoch={self.steps_per_epoch})")

    def settings(self) -> dict:
        """What decides the stream (an iterator state taken with other settings is refused)."""
        return {"seed": self.seed, "packed_rows": self.rows_per_step, "packed_length": self.length,
                "pack_segments": self.max_segments, "num_examples": self.num_examples}

    def _plan(self, epoch: int) -> list:
        """The epoch's rows (lists of source indices), padded with empty rows to R * steps."""
        return self._cached(epoch, lambda: self._pack_epoch(epoch))

    def _pack_epoch(self, epoch: int) -> list:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.num_examples)  # [N] source indices in this epoch's order
        rows = [[int(perm[i]) for i in row] for row in pack(self.lengths[perm], self.length, self.max_segments)]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        return rows + [[] for _ in range(self.steps_per_epoch * self.rows_per_step - len(rows))]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, step = divmod(int(index), self.steps_per_epoch)
        grid = self._plan(epoch)[step * self.rows_per_step:(step + 1) * self.rows_per_step]
        mine = batching.local_rows(grid, self.process_index, self.process_count)
        flat = [i for row in mine for i in row]
        examples = iter(self._parent._getitems(flat) if flat else [])  # pylint: disable=protected-access
        rows = [[next(examples) for _ in row] for row in mine]
        return collate_packed(rows, self.length, self.max_segments, self.pad_id)
