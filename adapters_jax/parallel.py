"""Compiling the train step: jit over a (data, fsdp) mesh with NamedSharding, or pmap.

Under jit the batch is split over both mesh axes, trainable params (small) are replicated,
and frozen params are replicated or, with `shard_frozen`, split over `fsdp` along their
largest divisible dimension. The state is donated, so the step updates it in place.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adapters_jax import trainer

BATCH_AXES = ("data", "fsdp")


def set_cpu_devices(n: int) -> None:
    """Splits the host CPU into `n` XLA devices, over which the jit step then runs data parallel
    (0: JAX's default, one device unless XLA_FLAGS forces more). Call before anything starts
    JAX's CPU backend; GPU and TPU backends are unaffected.

    Why: one XLA:CPU device runs its elementwise and reduction kernels on one core at a time,
    so a 2-core host idles a core between dots; two devices run two half batches side by side.
    Measured on a 2-core EPYC: README, Performance (`--cpu_devices` / `mesh.cpu_devices`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"mesh.cpu_devices={n!r} must be an integer >= 0 (0: JAX's default)")
    if n == 0:
        return
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:  # the backend is up already
        raise ValueError(f"mesh.cpu_devices={n}: {str(e).splitlines()[0]}") from None


def make_mesh(fsdp: int = 1, count: Optional[int] = None) -> Mesh:
    """The first `count` devices (default all) as a [n / fsdp, fsdp] mesh named ('data', 'fsdp')."""
    devices = np.array(jax.devices()[:count])
    if fsdp < 1 or devices.size % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the device count {devices.size}")
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, field: str = "batch_size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"{field}={global_batch} is not divisible by the device count {n}")


def _fsdp_spec(shape: tuple, size: int) -> P:
    """Shard the largest dimension divisible by the fsdp size, else replicate."""
    if size == 1 or not shape:
        return P()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if shape[i] % size == 0:
            return P(*([None] * i + ["fsdp"]))
    return P()


def state_shardings(state: trainer.TrainState, mesh: Mesh, shard_frozen: bool = False):
    replicated = NamedSharding(mesh, P())
    fsdp = mesh.shape["fsdp"]
    frozen = jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp)) if shard_frozen else replicated,
        state.frozen)
    return trainer.TrainState(
        step=replicated, trainable=jax.tree_util.tree_map(lambda _: replicated, state.trainable),
        frozen=frozen, opt_state=jax.tree_util.tree_map(lambda _: replicated, state.opt_state),
        rng=replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def put_state(state, shardings):
    """Places the state; copies rather than aliases, because the step donates it."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(jnp.array(x, copy=True), s), state, shardings)


def put_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Global arrays from each process's local rows (the rows of its addressable devices)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def jit_step(step_fn: Callable, shardings, mesh: Mesh, compiler_options: Optional[dict] = None) -> Callable:
    """jit(step) with explicit in/out shardings and the state donated; `compiler_options` are
    per-program XLA options (`compile_options.train_compiler_options`)."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,),
                   compiler_options=compiler_options or None)


# --- pmap: the same step, with gradients averaged over the 'batch' axis -------------------

PMAP_AXIS = "batch"


def pmap_step(step_fn: Callable) -> Callable:
    return jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=(0,))


def replicate(tree: Any) -> Any:
    """One copy per local device, [devices, ...], for pmap. Through the host: a device array
    (e.g. one a checkpoint restore placed on device 0) would stay committed to its device, and
    pmap refuses it."""
    n = jax.local_device_count()
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def unreplicate(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def shard_for_pmap(local_batch: dict) -> dict:
    """[B, ...] -> [devices, B / devices, ...]."""
    n = jax.local_device_count()
    return {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:]) for k, v in local_batch.items()}
