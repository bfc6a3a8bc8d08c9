"""forward_jit: forward programs compiled with YNNPACK kept to dots on XLA:CPU, same results."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapters_jax.adapters import spec_from_config
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.compile_options import forward_compiler_options, forward_jit

CFG = BertConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


def _houlsby_forward(dtype, out_dtype=jnp.float32):
    model = BertModel(CFG, filler=spec_from_config(method="houlsby", bottleneck_dim=8), dtype=dtype)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CFG.vocab_size, (4, 24)).astype(np.int32)  # [B, T]
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # a padded row
    params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
    # weights well away from init (std 0.02): attention that is far from uniform, so that the mask
    # and the scores matter, and non-zero up projections, so that the adapters change the output
    noise = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda x: x + noise.normal(0, 0.15, x.shape).astype(x.dtype) if x.ndim == 2 else x, params)
    return (lambda p: model.apply({"params": p}, ids, mask)["last_hidden_state"].astype(out_dtype)), params


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_forward_jit_matches_float64(dtype, tol):
    """forward_jit's output against the same parameters evaluated in float64 (x64 mode, plain
    jit): float32 to its rounding, bf16 (whose forward runs XLA:CPU's bf16 kernels and the
    canonical-dot attention) to bf16's."""
    fn, params = _houlsby_forward(dtype)
    got = np.asarray(forward_jit(fn)(params), np.float64)
    with jax.enable_x64(True):
        fn64, _ = _houlsby_forward(jnp.float64, jnp.float64)
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        want = np.asarray(jax.jit(fn64)(p64))
    assert want.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the option is XLA:CPU's")
def test_forward_jit_keeps_ynnpack_to_dots():
    """The compiled forward has no YNNPACK fusion that reduces (LayerNorm, softmax): the
    option took effect."""
    assert forward_compiler_options()
    fn, params = _houlsby_forward(jnp.float32)
    hlo = forward_jit(fn).lower(params).compile().as_text()
    ynn = re.findall(r"calls=%([\w.\-]+), [^\n]*__ynn_fusion", hlo)
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S)}
    assert ynn, "no YNNPACK fusion at all: the dots should still use it"
    reducing = [c for c in ynn if " reduce(" in bodies.get(c, "")]
    assert not reducing, reducing
