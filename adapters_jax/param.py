"""`param(module, name, init_fn, shape, dtype)`: flax's `module.param` for a known shape, minus
the per-trace cost of flax's shape check.

Why: when a stored parameter is read (apply), flax checks its shape by tracing the initialiser
with `jax.eval_shape`, about 3 ms per parameter and trace. That was 0.5 s of the 1.6 s it takes
to trace a MiniLM train step (153 parameters), paid again for every length bucket, every sweep
trial and every test program. Our modules know each parameter's shape, so it is compared
directly and a mismatch raises flax's own `ScopeParamShapeError`. Creation (init) is flax's.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import numpy as np
from flax import errors


def param(module: nn.Module, name: str, init_fn: Callable, shape: tuple, dtype: Optional[Any] = None):
    """The parameter `name` of `module` (called inside its compact method), of shape `shape`."""
    shape = tuple(int(s) for s in shape)
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if tuple(np.shape(value)) != shape:
            raise errors.ScopeParamShapeError(name, module.scope.path_text, tuple(np.shape(value)), shape)
        return value
    return module.param(name, init_fn, shape) if dtype is None else module.param(name, init_fn, shape, dtype)
