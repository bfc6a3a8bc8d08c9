"""The training pipeline: grain shuffle per epoch, length-bucketed global batches, sharding.

    source -> map(Tokenize) -> shuffle(seed) -> repeat     (grain MapDataset, element = example)
           -> LengthBucketedBatches                        (element = this process's batch)
           -> to_iter_dataset (threads, prefetch)          (state = {'next_index': step})

Batch i is a pure function of (seed, i): epoch e = i // steps_per_epoch is shuffled by
grain with seed + e; the epoch is cut into windows of `pool_batches` global batches;
inside a window examples are sorted by token length, cut into global batches, and the
batches (and rows within each) are permuted with a generator seeded by (seed, e, window).
Every process computes the same global batch (so all agree on its padded length without
communicating) and keeps its own contiguous slice of rows. Examples left over at the
end of an epoch (fewer than a global batch) are dropped for that epoch only.
"""
from __future__ import annotations

from typing import Optional

import grain
import numpy as np

from adapters_jax.data import batching, packing
from adapters_jax.data.epoch_cache import PlannedBatches


class LengthBucketedBatches(PlannedBatches):
    """Random access to this process's share of global batch i: dict of [B_local, T] arrays.

    Args:
      parent: tokenized examples in epoch order, index e * num_examples + k.
      num_examples: examples per epoch.
      global_batch_size: rows per global batch (all processes together).
      buckets: sorted padded lengths; the last one is max_length.
      pad_id: token id used for padding.
      seed: seeds the within-window permutations (grain's shuffle has its own).
      pool_batches: global batches per sorting window (bigger: less padding, less mixing).
      num_epochs: None repeats forever.
    """

    def __init__(self, parent: grain.MapDataset, *, num_examples: int, global_batch_size: int,
                 buckets: tuple, pad_id: int, seed: int, pool_batches: int = 32,
                 num_epochs: Optional[int] = None, process_index: int = 0, process_count: int = 1):
        super().__init__(parent)
        batching.check_sharding(global_batch_size, process_index, process_count)
        if num_examples < global_batch_size:
            raise ValueError(f"the train split has {num_examples} examples, fewer than one global "
                             f"batch of {global_batch_size}")
        self.num_examples, self.global_batch_size = num_examples, global_batch_size
        self.steps_per_epoch = num_examples // global_batch_size
        self.buckets, self.pad_id, self.seed = tuple(buckets), pad_id, seed
        self.pool_batches, self.num_epochs = max(1, pool_batches), num_epochs
        self.process_index, self.process_count = process_index, process_count
        self._init_cache()

    def __str__(self) -> str:
        return f"LengthBucketedBatches(global_batch_size={self.global_batch_size}, buckets={self.buckets})"

    def settings(self) -> dict:
        """What decides the stream (an iterator state taken with other settings is refused)."""
        return {"seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_examples": self.num_examples, "pool_batches": self.pool_batches,
                "buckets": list(self.buckets)}

    def _window(self, epoch: int, window: int) -> list:
        """The window's global batches: [(rows in final order, padded length)]."""
        return self._cached((epoch, window), lambda: self._plan_window(epoch, window))

    def _plan_window(self, epoch: int, window: int) -> list:
        gb, first = self.global_batch_size, window * self.pool_batches
        n_batches = min(self.pool_batches, self.steps_per_epoch - first)
        start = epoch * self.num_examples + first * gb
        rows = list(self._parent._getitems(list(range(start, start + n_batches * gb))))  # pylint: disable=protected-access
        lengths = np.asarray([len(r["ids"]) for r in rows])
        order = np.argsort(lengths, kind="stable").reshape(n_batches, gb)  # [n_batches, GB]
        rng = np.random.default_rng([self.seed, epoch, window])
        batches = []
        for b in rng.permutation(n_batches):
            idx = order[b][rng.permutation(gb)]
            length = batching.bucket_for(int(lengths[idx].max()), self.buckets)
            batches.append(([rows[i] for i in idx], length))
        return batches

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, step = divmod(int(index), self.steps_per_epoch)
        rows, length = self._window(epoch, step // self.pool_batches)[step % self.pool_batches]
        mine = batching.local_rows(rows, self.process_index, self.process_count)
        return batching.collate(mine, length, self.pad_id)


class TrainIterator:
    """Iterates local train batches; its state is a small JSON-serialisable dict.

    `get_state()` -> {'next_index': step of the next batch, plus the settings that decide
    the stream}; `set_state` refuses a state taken with different settings, since it would
    resume a different stream without any error.
    """

    def __init__(self, dataset: grain.MapDataset, read_options: Optional[grain.ReadOptions] = None):
        self.dataset = dataset
        read_options = read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
        self._it = iter(dataset.to_iter_dataset(read_options))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def _settings(self) -> dict:
        return self.dataset.settings()

    def get_state(self) -> dict:
        return {"next_index": int(self._it.get_state()["next_index"]), **self._settings()}

    def set_state(self, state: dict) -> None:
        mine = self._settings()  # a key missing from the state (packed vs bucketed) differs too
        diff = [k for k, v in mine.items() if state.get(k) != v]
        if diff:
            hint = ""
            if ("packed_rows" in state) != ("packed_rows" in mine):
                hint = (f"; the run was saved {'with' if 'packed_rows' in state else 'without'} packed rows: resume "
                        f"it with data.pack='{'true' if 'packed_rows' in state else 'false'}'")
            raise ValueError("iterator state was saved with different " + ", ".join(
                f"{k} ({state.get(k)} != {mine[k]})" for k in diff) + hint)
        self._it.set_state({"next_index": int(state["next_index"])})

    @property
    def step(self) -> int:
        return int(self._it.get_state()["next_index"])


def train_batches(source, tokenize: batching.Tokenize, *, global_batch_size: int, seed: int,
                  buckets: tuple, pad_id: int, pool_batches: int = 32,
                  num_epochs: Optional[int] = None, process_index: int = 0, process_count: int = 1
                  ) -> LengthBucketedBatches:
    """The grain MapDataset of local train batches (see the module docstring)."""
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    examples = grain.MapDataset.source(source).map(tokenize).shuffle(seed=seed).repeat(None)
    return LengthBucketedBatches(examples, num_examples=len(source), global_batch_size=global_batch_size,
                                 buckets=buckets, pad_id=pad_id, seed=seed, pool_batches=pool_batches,
                                 num_epochs=num_epochs, process_index=process_index,
                                 process_count=process_count)


def packed_train_batches(source, tokenize: batching.Tokenize, *, batch_size: int, seed: int, pad_id: int,
                         rows_per_step: int = 0, max_segments: int = 16, row_multiple: int = 1,
                         num_epochs: Optional[int] = None, process_index: int = 0, process_count: int = 1
                         ) -> packing.PackedBatches:
    """The grain MapDataset of local packed grids (see `packing`). Tokenizes the split once to learn
    its lengths; rows are `packing.row_length` long. rows_per_step 0 picks
    enough rows for `batch_size` examples of the mean length, rounded up to a multiple of
    row_multiple and process_count."""
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    examples = grain.MapDataset.source(source).map(tokenize)
    lengths = batching.token_lengths(source, tokenize)  # [N]
    if not len(lengths):
        raise ValueError("the train split is empty")
    length = packing.row_length(lengths, tokenize.max_length)
    if rows_per_step <= 0:
        multiple = int(np.lcm(max(1, row_multiple), process_count))
        rows_per_step = packing.auto_rows(batch_size, float(lengths.mean()), length, multiple)
    return packing.PackedBatches(examples, lengths=lengths, rows_per_step=rows_per_step,
                                 length=length, max_segments=max_segments, pad_id=pad_id, seed=seed,
                                 num_epochs=num_epochs, process_index=process_index, process_count=process_count)
