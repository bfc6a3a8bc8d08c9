"""Evaluation batches: every example exactly once, in few padded shapes.

Examples are sorted by token length (stable), so each batch pads to a small bucket. The
last global batch is filled up with copies of a real row whose 'weights' are 0, so
metrics that weight by 'weights' ignore them (copies, not blank rows, so no row has an
all-zero attention mask). 'example_index' maps each row back to its position in the
split (-1 on filler rows), for writing predictions.
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from adapters_jax.data import batching


def eval_batches(source: Sequence[dict], tokenize: batching.Tokenize, *, global_batch_size: int,
                 buckets: tuple, pad_id: int, process_index: int = 0, process_count: int = 1
                 ) -> list:
    """This process's eval batches, each a dict:
      input_ids, attention_mask, token_type_ids: int32[B_local, T]; labels: int32[B_local];
      weights: float32[B_local] (1 real, 0 filler); example_index: int32[B_local].
    All processes get the same number of batches with the same T, batch by batch.
    """
    batching.check_sharding(global_batch_size, process_index, process_count)
    ds = grain.MapDataset.source(source).map(tokenize)
    rows = [ds[i] for i in range(len(ds))]
    if not rows:
        return []
    order = np.argsort([len(r["ids"]) for r in rows], kind="stable")
    n_batches = -(-len(rows) // global_batch_size)
    index = np.full(n_batches * global_batch_size, -1, np.int64)
    index[:len(rows)] = order  # [n_batches * GB], -1 = filler
    out = []
    for b in range(n_batches):
        ids = index[b * global_batch_size:(b + 1) * global_batch_size]
        real = ids >= 0
        picked = [rows[i] for i in np.where(real, ids, ids[0])]  # fillers copy the first row
        length = batching.bucket_for(max(len(r["ids"]) for r in picked), buckets)
        mine = batching.local_rows(picked, process_index, process_count)
        batch = batching.collate(mine, length, pad_id)
        batch["weights"] = batching.local_rows(real, process_index, process_count).astype(np.float32)
        batch["example_index"] = batching.local_rows(ids, process_index, process_count).astype(np.int32)
        out.append(batch)
    return out
