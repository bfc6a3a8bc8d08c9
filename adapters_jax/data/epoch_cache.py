"""The shared base of the train-batch datasets: batches planned per epoch (or window), the last
few plans kept, and picklable for grain's worker processes (the lock and the plans are rebuilt)."""
from __future__ import annotations

import collections
import sys
import threading
from typing import Callable

import grain


class PlannedBatches(grain.MapDataset):
    """Subclasses set `num_epochs` (None: forever) and `steps_per_epoch`, call `_init_cache()` in
    __init__, and build their plans through `_cached(key, build)`."""
    _keep = 2  # plans kept: the current one and the next (grain's prefetch reaches ahead)

    def _init_cache(self):
        self._lock = threading.Lock()
        self._plans = collections.OrderedDict()  # key -> plan

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock"), state.pop("_plans")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def _cached(self, key, build: Callable[[], list]) -> list:
        """The plan for `key`, built once (under the lock) and kept among the last `_keep`."""
        with self._lock:
            if key not in self._plans:
                self._plans[key] = build()
                while len(self._plans) > self._keep:
                    self._plans.popitem(last=False)
            return self._plans[key]
