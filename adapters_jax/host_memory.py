"""Host (CPU) memory: hand freed heap pages back to the OS, and read the process's peak RSS.

Why: compiling a train step frees a few hundred MiB in small pieces, which glibc keeps resident.
XLA:CPU's step temporaries come as one large block (about 500 MiB for the MiniLM Houlsby step at
32 x 128) that cannot reuse those scattered pieces, so the block lands beside them and the peak
RSS carries both. glibc's `malloc_trim(0)` releases every free page in place, inside the heap
as well as at its top (glibc >= 2.8); measured on that step: 745 -> 546 MiB after compiling,
and a steady 1222 -> 1066 MiB while training (README, Performance).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys

import jax
import numpy as np


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Returns the heap's free pages to the OS; False where that is not possible here.
    Cheap (milliseconds), but a freed block that is reused later is faulted in again, so call it
    after compiles, not every step."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def peak_rss_mib() -> float:
    """The process's peak resident set so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rss_mib() -> float:
    """The process's resident set now (not its peak), in MiB, from /proc (Linux only)."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


class CompiledAhead:
    """Calls `fn` (a jit or pmap function). A call whose last argument (the batch) has shapes not
    seen before hands the free heap back (say, the last train step's temporaries), compiles
    `fn` for them, hands the compiler's freed heap back, and only then runs: otherwise the
    compiler's garbage is still resident under the first call's temporaries (default MiniLM
    epoch: 954 -> 852-875 MiB at the train step's first call, 876-936 -> 774 MiB at the
    evaluation's). jit's and pmap's own caches keep the executable: the call compiles nothing."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled_for = set()

    def __call__(self, *args):
        leaves, treedef = jax.tree_util.tree_flatten(args[-1])
        shapes = (treedef, tuple(np.shape(x) for x in leaves))
        if shapes not in self.compiled_for:
            self.compiled_for.add(shapes)
            release_free_heap()  # e.g. the last train step's temporaries, before an eval compiles
            self.fn.lower(*args).compile()
            release_free_heap()
        return self.fn(*args)

    def lower(self, *args):
        """`fn.lower`: for callers that time or keep the compiled program themselves."""
        return self.fn.lower(*args)
