"""Image batches: a deterministic shuffled train stream and padded eval batches.

Batch i of the train stream is a pure function of (seed, i): epoch e = i // steps_per_epoch
is a permutation drawn from numpy's generator seeded with (seed, e), cut into global
batches; examples left over at the end of an epoch are dropped for that epoch only. Each
process keeps its own contiguous slice of rows. Pixels become float32 in [-1, 1]
((x / 255 - 0.5) / 0.5, the normalisation of HF's ViT image processor).
"""
from __future__ import annotations

import sys
from typing import Optional

import grain
import numpy as np

from adapters_jax.data import batching, pipeline


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1]."""
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5


class ImageBatches(grain.MapDataset):
    """Random access to this process's share of global train batch i:
    {'pixel_values': float32 [B_local, H, W, C], 'labels': int32 [B_local]}."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, global_batch_size: int, seed: int,
                 num_epochs: Optional[int] = None, process_index: int = 0, process_count: int = 1):
        super().__init__()
        batching.check_sharding(global_batch_size, process_index, process_count)
        if len(images) < global_batch_size:
            raise ValueError(f"the train split has {len(images)} examples, fewer than one global "
                             f"batch of {global_batch_size}")
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.images, self.labels = images, labels.astype(np.int32)
        self.num_examples, self.global_batch_size = len(images), global_batch_size
        self.steps_per_epoch = len(images) // global_batch_size
        self.seed, self.num_epochs = seed, num_epochs
        self.process_index, self.process_count = process_index, process_count

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def __str__(self) -> str:
        return f"ImageBatches(global_batch_size={self.global_batch_size}, n={self.num_examples})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, step = divmod(int(index), self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)  # [N]
        rows = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]  # [GB]
        mine = batching.local_rows(rows, self.process_index, self.process_count)
        return {"pixel_values": normalize(self.images[mine]), "labels": self.labels[mine]}


class ImageTrainIterator(pipeline.TrainIterator):
    """TrainIterator over ImageBatches; its state records the settings that fix the stream."""

    def _settings(self) -> dict:
        d = self.dataset
        return {"seed": d.seed, "global_batch_size": d.global_batch_size, "num_examples": d.num_examples}


def image_eval_batches(images: np.ndarray, labels: np.ndarray, *, global_batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> list:
    """Every example once, in order: pixel_values [B_local, H, W, C], labels, weights (0 on filler
    rows, copies of the batch's first row) and example_index (-1 on fillers) [B_local]."""
    batching.check_sharding(global_batch_size, process_index, process_count)
    n = len(images)
    n_batches = -(-n // global_batch_size)
    index = np.full(n_batches * global_batch_size, -1, np.int64)
    index[:n] = np.arange(n)
    out = []
    for b in range(n_batches):
        ids = index[b * global_batch_size:(b + 1) * global_batch_size]  # [GB]
        mine = batching.local_rows(ids, process_index, process_count)  # [B_local]
        picked = np.where(mine >= 0, mine, ids[0])
        out.append({"pixel_values": normalize(images[picked]), "labels": labels[picked].astype(np.int32),
                    "weights": (mine >= 0).astype(np.float32), "example_index": mine.astype(np.int32)})
    return out
