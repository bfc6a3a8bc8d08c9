"""Train state and the pure train/eval steps.

Only the trainable tree is differentiated: `jax.grad` of `loss(trainable, frozen, batch)`
with respect to `trainable`, so XLA never builds the frozen base's weight-gradient matmuls.
The steps are plain functions of (state, batch); `parallel.py` compiles them with jit over
a mesh, or with pmap.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from adapters_jax import peft

TASKS = ("classification", "regression", "lm")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array

    @property
    def params(self) -> dict:
        return peft.merge(self.trainable, self.frozen)


def create_state(params: dict, labels: dict, tx: optax.GradientTransformation, rng: jax.Array,
                 frozen_dtype: Optional[Any] = None) -> TrainState:
    """Splits the params by label; optimizer state exists for trainable leaves only.

    frozen_dtype: store the frozen matrices (kernels, embedding tables: 2-D and up) in this
    dtype, e.g. bf16 for a bf16 run, whose matmuls and lookups read them in bf16 anyway: half
    the base's memory, same steps (BERT, GPT-2, Llama, ViT; T5 reads its relative-position
    table in float32, which is then bf16-rounded). Vectors (biases, norms) stay as they are.
    Trainable leaves keep their float32 masters, so full fine-tuning is unaffected.
    """
    trainable, frozen = peft.split(params, labels)
    if frozen_dtype is not None:
        frozen = jax.tree_util.tree_map(lambda a: a.astype(frozen_dtype) if a.ndim >= 2 else a, frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(params), rng=rng)


def lm_token_nll(logits: jnp.ndarray, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(next-token NLL [B, T-1], target weights [B, T-1]) of a decoder's logits [B, T', V].

    Position t predicts token t+1; padding targets (attention_mask 0) and filler rows
    (weights 0) weigh 0. Logits of prompt-tuning tokens in front (T' > T) are dropped.
    """
    ids = batch["input_ids"]  # [B, T]
    t = ids.shape[1]
    logits = logits[:, -t:-1].astype(jnp.float32)  # [B, T-1, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:].astype(jnp.int32))  # [B, T-1]
    w = batch.get("attention_mask", jnp.ones_like(ids))[:, 1:].astype(jnp.float32)
    w = w * batch.get("weights", jnp.ones(ids.shape[0], jnp.float32)).astype(jnp.float32)[:, None]
    return nll, w


def task_loss(logits: jnp.ndarray, batch: dict, task: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(weighted mean loss, total weight). logits [B, C] (classification), [B, 1] (regression), or
    [B, T, V] (lm: mean next-token NLL over real target tokens; the weight is their count).
    Packed rows: logits [B, S, C or 1] with labels and weights [B, S] (0 on empty slots)."""
    if task == "lm":
        nll, w = lm_token_nll(logits, batch)
        total = w.sum()
        return (nll * w).sum() / jnp.maximum(total, 1.0), total
    labels = batch["labels"]
    weights = batch.get("weights", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)  # [B] or [B, S]
    if task == "classification":
        per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    elif task == "regression":
        per_row = jnp.square(logits[..., 0] - labels.astype(jnp.float32))
    else:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    total = weights.sum()
    return (per_row * weights).sum() / jnp.maximum(total, 1.0), total


def make_train_step(model, tx: optax.GradientTransformation, *, task: str = "classification",
                    accum_steps: int = 1, streams: int = 1, skip_nonfinite: bool = False,
                    axis_name: Optional[str] = None, regularizer: Optional[Callable] = None) -> Callable:
    """Returns train_step(state, batch) -> (state, metrics).

    Args:
      model: an AdaptedModel (or anything whose apply(params, batch, deterministic) -> logits).
      tx: the full-tree optimizer from `optim.make` (multi_transform with frozen = set_to_zero).
      accum_steps: split the batch into this many micro-batches, run one after the other (a
        scan: the activations of one micro-batch at a time), and combine their gradients.
      streams: split each (micro-)batch into this many interleaved parts (rows i, i + S, ...;
        at most one per row, and they need not divide the rows) whose gradients are computed
        side by side in one program (unrolled, independent), then combined. About the memory of
        the whole batch; on XLA:CPU the parts' ops overlap on the cores, which the ops of one
        batch leave idle between them (see README, Performance).
      skip_nonfinite: on a NaN/inf loss or gradient keep the old state (metrics['nonfinite']=1)
        instead of applying the update.
      axis_name: the pmap axis to combine gradients over (None under jit, where XLA's SPMD
        partitioner inserts the reductions itself).
      regularizer: params -> scalar added to the loss (AdapterFusion's value regularizer), once
        per step.

    Split batches give the whole batch's weighted mean loss and gradient: each part's sum
    over its weights is added up and divided by the total weight, so parts holding padding
    rows (weight 0) or fewer tokens count for what they hold. Under pmap each device's share is
    such a part (its sums are psum-ed), as under jit, where the batch is one mean.
    """
    if accum_steps < 1 or streams < 1:
        raise ValueError(f"accum_steps={accum_steps} and streams={streams} must be >= 1")

    def loss_fn(trainable, frozen, batch, rng):
        params = peft.merge(trainable, frozen)
        logits = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        return task_loss(logits, batch, task)  # (weighted mean, total weight)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def summed(trainable, frozen, batch, rng):
        """(loss sum, weight, gradient of the loss sum) over `streams` parts of the batch."""
        rows = jax.tree_util.tree_leaves(batch)[0].shape[0]
        n_parts = min(streams, rows)  # parts may differ by a row: the weights make up for it
        total = None
        for i, r in enumerate(jax.random.split(rng, n_parts)):
            part = jax.tree_util.tree_map(lambda x: x[i::n_parts], batch)  # rows i, i + S, ...
            (loss, weight), grads = grad_fn(trainable, frozen, part, r)
            n = jnp.maximum(weight, 1.0)  # task_loss's divisor: loss * n is the part's sum
            term = (loss * n, weight, jax.tree_util.tree_map(lambda g: g * n, grads))
            total = term if total is None else jax.tree_util.tree_map(jnp.add, total, term)
        return total

    def accumulated(trainable, frozen, batch, rng):
        """`summed` over `accum_steps` micro-batches, one after the other (a scan)."""
        split = jax.tree_util.tree_map(
            lambda x: x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:]), batch)

        def body(carry, xs):
            mb, r = xs
            return jax.tree_util.tree_map(jnp.add, carry, summed(trainable, frozen, mb, r)), None

        zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                jax.tree_util.tree_map(jnp.zeros_like, trainable))
        return jax.lax.scan(body, zero, (split, jax.random.split(rng, accum_steps)))[0]

    def micro(trainable, frozen, batch, rng):
        if accum_steps == 1 and streams == 1 and axis_name is None:
            (loss, _), grads = grad_fn(trainable, frozen, batch, rng)
        else:
            loss, weight, grads = (summed if accum_steps == 1 else accumulated)(trainable, frozen, batch, rng)
            if axis_name is not None:  # pmap: the whole batch's sums, so that each device counts for its weight
                loss, weight, grads = jax.lax.psum((loss, weight, grads), axis_name)
            d = jnp.maximum(weight, 1.0)
            loss, grads = loss / d, jax.tree_util.tree_map(lambda g: g / d, grads)
        if regularizer is not None:  # once per step, on the parameters alone
            reg, reg_grads = jax.value_and_grad(lambda t: regularizer(peft.merge(t, frozen)))(trainable)
            loss, grads = loss + reg, jax.tree_util.tree_map(jnp.add, grads, reg_grads)
        return loss, grads

    def train_step(state: TrainState, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        if axis_name is not None:  # different dropout masks on each device
            step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
        loss, grads = micro(state.trainable, state.frozen, batch, step_rng)  # the same on every device
        params = peft.merge(state.trainable, state.frozen)
        # Frozen leaves stand in for their own (never computed) gradients: set_to_zero ignores them.
        updates, opt_state = tx.update(peft.merge(grads, state.frozen), state.opt_state, params)
        new_trainable = optax.apply_updates(state.trainable, _like(updates, state.trainable))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(step=state.step + 1, trainable=new_trainable, opt_state=opt_state, rng=rng)
        if skip_nonfinite:
            new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state,
                                               state.replace(step=state.step + 1, rng=rng))
        metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": 1 - finite.astype(jnp.int32)}
        return new_state, metrics

    return train_step


def _like(full: dict, subset: dict) -> dict:
    """The leaves of `full` at the paths that `subset` has."""
    from flax import traverse_util
    flat_full = traverse_util.flatten_dict(dict(full))
    return traverse_util.unflatten_dict({k: flat_full[k] for k in traverse_util.flatten_dict(dict(subset))})


def make_eval_step(model, task: str = "classification") -> Callable:
    """eval_step(trainable, frozen, batch) -> predictions [B] (class ids or regression values), or
    for lm [B, 2]: each row's summed next-token NLL and its number of target tokens."""
    def eval_step(trainable, frozen, batch):
        logits = model.apply({"params": peft.merge(trainable, frozen)}, batch, deterministic=True)
        if task == "lm":
            nll, w = lm_token_nll(logits, {**batch, "weights": jnp.ones(logits.shape[0], jnp.float32)})
            return jnp.stack([(nll * w).sum(-1), w.sum(-1)], axis=-1)  # [B, 2]; metrics apply row weights
        return jnp.argmax(logits, -1) if task == "classification" else logits[:, 0]
    return eval_step
