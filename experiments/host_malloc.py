"""glibc malloc settings that keep XLA:CPU's per-step temporaries resident between steps.

Why: XLA:CPU allocates one block for a step's temporaries (906 MiB for the MiniLM Houlsby step
at 32 x 128 in bf16) and frees it when the step ends. glibc serves any block over 32 MiB with a
fresh mmap, and XLA's worker threads use their own arenas, whose heaps cannot hold it either;
so every step page-faults the whole block in again: about 230,000 minor faults and 0.4 s of
kernel time per 1.3 s step. With one arena, mmap off and trimming off, the block is reused
from the heap. These must be set before the process starts (glibc reads them once), so the
benchmarks pass them to the subprocesses they time, ours and AdapterHub's alike:

    python -m experiments.benchmark --malloc tuned
    python -m experiments.train --config configs/houlsby_r64.py --host_malloc tuned  # re-execs itself

The heap keeps what it once held, so two more things keep the peak RSS down (`configure_jax`,
which `experiments.train` and the benchmark call in a tuned process):
- CPU dispatch is synchronous. Dispatched ahead, XLA:CPU holds the temporaries of up to three
  steps at once, and the heap keeps all three resident (MiniLM Houlsby, 2 streams: 2235 against
  1252 MiB);
- the training loop hands the compiler's freed heap back after each compile
  (`adapters_jax.host_memory.release_free_heap`).
The README's performance section has the measurements on both sides of the trade.
"""
from __future__ import annotations

import os

TUNED = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 36)}
MODES = ("default", "tuned")


def active(environ: dict | None = None) -> bool:
    """Whether this process started with the tuned settings."""
    environ = os.environ if environ is None else environ
    return all(environ.get(k) == v for k, v in TUNED.items())


def child_env(mode: str, base: dict | None = None) -> dict:
    """The environment for a timed subprocess: `base` (os.environ) with the mode's settings."""
    if mode not in MODES:
        raise ValueError(f"--malloc={mode!r}: expected one of {', '.join(MODES)}")
    env = dict(os.environ if base is None else base)
    if mode == "tuned":
        env.update(TUNED)
    else:  # the default: glibc's own, even if the caller's shell set something
        for k in TUNED:
            env.pop(k, None)
    return env


def configure_jax() -> None:
    """In a tuned process, before the first computation: synchronous dispatch on the CPU, so each
    step's temporary block is freed before the next step allocates its own."""
    if active():
        import jax
        jax.config.update("jax_cpu_enable_async_dispatch", False)
