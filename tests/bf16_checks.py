"""Shared checks of the bf16 CPU paths: which dots the compiled program runs, and gradients
against a float64 reference to bf16 rounding."""
import re

import jax
import numpy as np


def dot_operand_types(fn, *args) -> list[str]:
    """Element types of every dot's operands in fn's compiled HLO (inside any fusion), e.g.
    'bf16xbf16': XLA:CPU's fast bf16 kernels take only that, in row-major [M, K] @ [K, N]."""
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    shapes = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[", line)
        if m:
            shapes[m.group(1)] = m.group(2)
    types = []
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[[^\]]*\]\S* dot\(%(\S+), %(\S+)\)", line)
        if m:
            types.append(f"{shapes[m.group(1)]}x{shapes[m.group(2)]}")
    return types


def assert_tree_close_to_float64(got, want, rel: float = 2 ** -6) -> None:
    """Every leaf of got (bf16 computation) within rel x the largest |entry| of the matching
    leaf of want (float64), the leaf's path named on failure."""
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, atol=rel * np.abs(w).max(),
                                   err_msg=jax.tree_util.keystr(path))


def bf16_adapter_case(adapter, shape: tuple, seed: int, param_scale: float):
    """(z, x, cot, params) for an activation-site adapter in a bf16 backbone: a bf16 sublayer
    output z [B, T, D], the float32 block input x, a float64 cotangent of the output, and the
    adapter's initial parameters times param_scale (far from identity, so the bottleneck counts)."""
    rng = np.random.default_rng(seed)
    z = jax.numpy.asarray(rng.normal(size=shape), jax.numpy.bfloat16)
    x = jax.numpy.asarray(rng.normal(size=shape), jax.numpy.float32)
    cot = rng.normal(size=shape)
    params = adapter.init(jax.random.PRNGKey(0), z, x, None)["params"]
    return z, x, cot, jax.tree.map(lambda p: p * param_scale, params)
