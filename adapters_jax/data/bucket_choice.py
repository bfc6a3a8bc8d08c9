"""Length buckets that minimise a run's time: one compile per bucket used vs padded steps.

Every bucket a run uses costs one compile of the train step (4-5 s for MiniLM on a 2-core
CPU), and every batch runs at its bucket's padded length. Fine buckets cut padding but add
compiles; for a one-epoch run the compiles can cost more than the padding they save.
`choose_buckets` finds the exact optimum by dynamic programming over the candidate lengths:

    cost(buckets) = compile_s * #buckets used + sum over batches of step_s(bucket of the batch)

where a batch's bucket is the smallest bucket >= its longest row. `experiments.choose_buckets`
measures step_s and compile_s on the current machine and feeds this.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def run_cost(buckets: Sequence[int], batch_lengths: Sequence[int], step_s: Callable[[int], float],
             compile_s: float) -> float:
    """Predicted seconds of a run whose batches' longest rows are `batch_lengths`."""
    b = np.asarray(sorted(set(int(x) for x in buckets)))
    lengths = np.asarray(batch_lengths, dtype=np.int64)
    if lengths.size and lengths.max() > b[-1]:
        raise ValueError(f"a batch of {int(lengths.max())} tokens exceeds the largest bucket {int(b[-1])}")
    used = b[np.searchsorted(b, lengths)]  # [num_batches] padded length of each batch
    values, counts = np.unique(used, return_counts=True)
    return float(compile_s * len(values) + sum(c * step_s(int(v)) for v, c in zip(values, counts)))


def choose_buckets(batch_lengths: Sequence[int], step_s: Callable[[int], float], compile_s: float,
                   max_length: int, multiple: int = 8) -> tuple:
    """The buckets (sorted, ending at max_length) with the least `run_cost`.

    Candidates are the multiples of `multiple` below max_length, and max_length itself, which
    is always the last bucket (rows up to max_length must fit); it costs nothing if no batch
    needs it. step_s must be non-decreasing in the length for the result to be meaningful.
    """
    if multiple < 1 or max_length < 1:
        raise ValueError(f"multiple={multiple} and max_length={max_length} must be >= 1")
    lengths = np.asarray(batch_lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > max_length):
        raise ValueError(f"batch lengths must be in [1, max_length={max_length}]; got "
                         f"{int(lengths.min())}..{int(lengths.max())}")
    cands = [c for c in range(multiple, max_length, multiple)] + [max_length]  # [m] increasing
    hist = np.bincount(lengths, minlength=max_length + 1)  # hist[L]: batches whose longest row is L
    below = np.concatenate([[0], np.cumsum(hist)])  # below[L]: batches with longest row < L
    edges = [0] + cands
    # best[j]: least cost of the batches with longest row <= edges[j], with edges[j] a bucket
    best, prev = [0.0] + [np.inf] * len(cands), [0] * (len(cands) + 1)
    for j in range(1, len(edges)):
        step = step_s(edges[j])
        for i in range(j):
            n = below[edges[j] + 1] - below[edges[i] + 1]  # batches in (edges[i], edges[j]]
            cost = best[i] + (compile_s + n * step if n else 0.0)
            if cost < best[j]:
                best[j], prev[j] = cost, i
    chosen, j = {max_length}, len(edges) - 1
    while j:
        if below[edges[j] + 1] > below[edges[prev[j]] + 1]:  # drop buckets no batch uses
            chosen.add(edges[j])
        j = prev[j]
    return tuple(sorted(chosen))
