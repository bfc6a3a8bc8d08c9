"""Host memory: the freed heap goes back to the OS, the peak RSS reading, and synchronous CPU
dispatch in a tuned process (one step's temporaries resident at a time, not several)."""
import subprocess
import sys

import pytest

from adapters_jax import host_memory
from experiments import host_malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc")

# Fragments the heap as a compile does: 192 MiB in 64 KiB pieces (below any mmap threshold),
# written, then all freed except the last piece, which pins the heap's top so glibc cannot
# shrink it from the end. RSS before and after release_free_heap, in MiB.
_FRAGMENTS_CHILD = r"""
import ctypes
from adapters_jax import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
piece = 64 << 10
ptrs = [libc.malloc(piece) for _ in range(3072)]
for p in ptrs:
    ctypes.memset(p, 1, piece)
for p in ptrs[:-1]:
    libc.free(p)
before = rss()
ok = host_memory.release_free_heap()
print(before, rss(), ok)
"""


def test_release_free_heap_returns_freed_pieces_inside_the_heap():
    out = subprocess.run([sys.executable, "-c", _FRAGMENTS_CHILD], capture_output=True, text=True,
                         env=host_malloc.child_env("tuned"), check=True)  # tuned: glibc never trims by itself
    before, after, ok = out.stdout.split()
    assert ok == "True"
    assert float(before) - float(after) > 150  # of the 192 MiB freed


def test_peak_rss_matches_the_kernels_high_water_mark():
    big = bytearray(64 << 20)  # touch 64 MiB, so the peak is at least this process's size with it
    hwm = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 1024
    assert host_memory.peak_rss_mib() == pytest.approx(hwm, abs=8)
    del big


# Whether a slow jitted call (about 0.1-0.5 s of matmuls) has finished when it returns, after
# host_malloc.configure_jax: synchronous dispatch returns finished arrays, asynchronous does not.
_DISPATCH_CHILD = r"""
import jax, jax.numpy as jnp
from experiments import host_malloc
host_malloc.configure_jax()
@jax.jit
def slow(x):  # [1536, 1536]
    for _ in range(8):
        x = jnp.tanh(x @ x)
    return x
x = jnp.full((1536, 1536), 1e-3, jnp.float32)
slow(x).block_until_ready()  # compiled
y = slow(x + 1e-3)
print(y.is_ready())
"""


@pytest.mark.parametrize("mode", host_malloc.MODES)
def test_tuned_process_dispatches_synchronously(mode):
    """Dispatched ahead, XLA:CPU holds several steps' temporaries at once and the tuned heap keeps
    them all resident (MiniLM Houlsby: 2235 against 1252 MiB), so a tuned process waits for
    each step; a default one keeps JAX's asynchronous dispatch."""
    out = subprocess.run([sys.executable, "-c", _DISPATCH_CHILD], capture_output=True, text=True,
                         env=host_malloc.child_env(mode), check=True)
    assert out.stdout.split()[-1] == ("True" if mode == "tuned" else "False")
