"""Reproduces the faults that keep XLA:CPU's oneDNN dots opt-in (`ADAPTERS_JAX_CPU_ONEDNN`).

    python -m experiments.repro_onednn_hang            # b = 1 2 3 4 8 16, 3 tries each
    python -m experiments.repro_onednn_hang --child 4  # one try, in this process

Each try runs a batched float32 dot [b, 384, 1024] @ [b, 1024, 64] compiled with the options
`compile_options.onednn_dot_options` gives, repeatedly, in a fresh process with a time limit, and
reports ok (with its time), hang (the limit passed) or crash (the exit status). On a 2-core AMD
EPYC with jaxlib 0.10.2 several b hung, not on every try, and one try aborted with "double free
or corruption". The same loop without the options never failed there.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_integer("child", 0, "run one try with this batch size in this process")
flags.DEFINE_string("batches", "1,2,3,4,8,16", "batch sizes to try")
flags.DEFINE_integer("tries", 3, "fresh processes per batch size")
flags.DEFINE_integer("limit_s", 30, "seconds before a try counts as hung")
flags.DEFINE_bool("onednn", True, "with the oneDNN options (False: XLA's default, the control)")
FLAGS = flags.FLAGS

M, K, N = 384, 1024, 64


def one_try(b: int, onednn: bool) -> float:
    """Runs the dot until about 100 MFLOP x 1200 is done; returns the seconds it took."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from adapters_jax.compile_options import ONEDNN_ENV, onednn_dot_options
    os.environ[ONEDNN_ENV] = "1" if onednn else "0"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, M, K)).astype(np.float32)  # [b, M, K]
    y = rng.normal(size=(b, K, N)).astype(np.float32)  # [b, K, N]
    f = jax.jit(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y),
                compiler_options=onednn_dot_options(jnp.float32) or None)
    t = time.perf_counter()
    for _ in range(max(5, 1200 // b)):
        f(x, y).block_until_ready()
    return time.perf_counter() - t


def main(argv):
    del argv
    if FLAGS.child:
        print(f"ok {one_try(FLAGS.child, FLAGS.onednn):.2f}s", flush=True)
        return
    print(f"batched float32 dot [b, {M}, {K}] @ [b, {K}, {N}], oneDNN {'on' if FLAGS.onednn else 'off'}, "
          f"{FLAGS.tries} fresh processes per b, limit {FLAGS.limit_s} s")
    print(f"{'b':>4}  results")
    for b in [int(v) for v in FLAGS.batches.split(",")]:
        results = []
        for _ in range(FLAGS.tries):
            cmd = [sys.executable, "-m", "experiments.repro_onednn_hang", f"--child={b}", f"--onednn={FLAGS.onednn}"]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.limit_s)
            except subprocess.TimeoutExpired:
                results.append("hang")
                continue
            last = (out.stdout.strip().splitlines() or [""])[-1]
            if out.returncode == 0 and last.startswith("ok"):
                results.append(last)
            else:
                tail = (out.stderr.strip().splitlines() or ["?"])[-1][:60]
                results.append(f"crash (exit {out.returncode}: {tail})")
        print(f"{b:>4}  " + " | ".join(results), flush=True)


if __name__ == "__main__":
    app.run(main)
