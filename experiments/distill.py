"""Distil an adapted teacher into a plain student: the seeds' way to remove adapter latency.

    python -m experiments.distill --teacher runs/houlsby_r64/adapter_best --workdir runs/distill

The student is the base architecture with no adapters, initialised from the pretrained base
(and the teacher's head), and trained on the task's training text to match the teacher's
logits (KL divergence at temperature T, scaled by T^2; labels are not used unless
--label_weight > 0). It then costs exactly the base model's latency. Reports the student's
and the teacher's validation accuracy and the forward latency of base, student and teacher,
prints a table and writes `results.json` and the student weights (safetensors) to --workdir.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import traverse_util

from adapters_jax import checkpoint, metrics, optim
from adapters_jax.compile_options import forward_jit, train_jit
from adapters_jax.data import make_datasets
from adapters_jax.distillation import distill_loss
from adapters_jax.heads import ClassificationHead
from adapters_jax.hub import load_backbone
from adapters_jax.model import AdaptedModel
from adapters_jax.run_logging import RunLog

flags.DEFINE_string("teacher", None, "the teacher's adapter export directory (experiments.train's adapter_best)")
flags.DEFINE_string("workdir", "runs/distill", "where metrics, results.json and the student go")
flags.DEFINE_string("data", "rotten_tomatoes", "dataset name (as data.name in the configs)")
flags.DEFINE_integer("epochs", 2, "passes over the training text")
flags.DEFINE_integer("steps", -1, "train steps (overrides --epochs when > 0)")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_integer("max_length", 128, "max tokens per row")
flags.DEFINE_float("lr", 5e-5, "peak learning rate (linear warm-up over 6%, then linear decay)")
flags.DEFINE_float("temperature", 2.0, "softmax temperature of the matched distributions")
flags.DEFINE_float("label_weight", 0.0, "weight of the cross-entropy on the gold labels (0: logits only)")
flags.DEFINE_integer("log_every", 20, "steps between progress lines")
flags.DEFINE_integer("seed", 0, "data order and dropout")
flags.mark_flag_as_required("teacher")
FLAGS = flags.FLAGS


def load_teacher(directory: str, backbone):
    """(teacher model, teacher params, head meta) from an adapter export made on this base."""
    meta, tree = checkpoint.read_adapter(directory)
    if meta.get("base_sha256") != checkpoint.base_fingerprint(backbone.path):
        raise ValueError(f"--teacher={directory}: the export was trained on a different base model")
    spec = checkpoint.spec_from_dict(meta.get("spec"), directory)
    head = meta["head"]
    model = AdaptedModel(backbone.model.clone(filler=spec),
                         ClassificationHead(head["num_labels"], pooling=head.get("pooling", "cls")))
    flat = traverse_util.flatten_dict({"backbone": backbone.params})
    flat.update(traverse_util.flatten_dict(tree))
    return model, traverse_util.unflatten_dict(flat), meta


def make_step(student, teacher, teacher_params, tx, temperature: float, label_weight: float):
    def step(params, opt_state, batch, rng):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        t_logits = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, inputs))

        def loss_fn(p):
            s_logits = student.apply({"params": p}, inputs, deterministic=False, rngs={"dropout": rng})
            return distill_loss(s_logits.astype(jnp.float32), t_logits.astype(jnp.float32), batch["labels"],
                                temperature, label_weight)

        (loss, kl), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "kl": kl}
    return train_jit(step, dtype=jnp.float32, donate_argnums=(0, 1))  # distillation runs in float32


def accuracy(model, params, eval_batches, num_labels: int) -> float:
    fwd = forward_jit(lambda p, b: jnp.argmax(model.apply({"params": p}, b), -1), dtype=jnp.float32)
    preds, labels, weights = [], [], []
    for b in eval_batches:
        inputs = {k: v for k, v in b.items() if k not in ("example_index", "labels", "weights")}
        preds.append(np.asarray(fwd(params, inputs)))
        labels.append(b["labels"])
        weights.append(b["weights"])
    return metrics.compute(np.concatenate(preds), np.concatenate(labels), np.concatenate(weights),
                           "classification", num_labels)["accuracy"]


def latency_ms(models: dict, batch: int, seq: int, reps: int = 10) -> dict:
    """Median forward latency of each (model, params), timed in alternation."""
    ids = np.random.default_rng(0).integers(1000, 2000, (batch, seq)).astype(np.int32)  # [B, T]
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    fns = {}
    for name, (model, params) in models.items():
        f = forward_jit(lambda p, m=model: m.apply({"params": p}, inputs), dtype=jnp.float32)
        f(params).block_until_ready()
        fns[name] = (f, params)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, (f, p) in fns.items():
            t = time.perf_counter()
            f(p).block_until_ready()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    meta, _ = checkpoint.read_adapter(FLAGS.teacher)
    backbone = load_backbone(meta.get("base_model") or "minilm-l6")  # the teacher's own base
    teacher, teacher_params, meta = load_teacher(FLAGS.teacher, backbone)
    data = make_datasets(FLAGS.data, backbone.tokenizer, FLAGS.batch, FLAGS.max_length, seed=FLAGS.seed,
                         eval_batch_size=64)
    if data.num_labels != meta["head"]["num_labels"]:
        raise ValueError(f"--data={FLAGS.data} has {data.num_labels} labels, the teacher's head "
                         f"{meta['head']['num_labels']}")
    head = meta["head"]
    student = AdaptedModel(backbone.model, ClassificationHead(head["num_labels"], pooling=head.get("pooling", "cls")))
    params = {"backbone": backbone.params, "head": teacher_params["head"]}  # the base, the teacher's head
    total = FLAGS.steps if FLAGS.steps > 0 else FLAGS.epochs * data.steps_per_epoch
    sched = optim.schedule(FLAGS.lr, total, int(0.06 * total), "linear")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01, mask=optim.decay_mask))
    params = jax.tree_util.tree_map(jnp.array, params)  # own copies: the step donates them
    opt_state = tx.init(params)
    step = make_step(student, teacher, teacher_params, tx, FLAGS.temperature, FLAGS.label_weight)

    teacher_acc = accuracy(teacher, teacher_params, data.eval_batches, data.num_labels)
    log = RunLog(FLAGS.workdir, total)
    log.message(f"teacher {FLAGS.teacher}: validation accuracy {teacher_acc:.4f}; distilling for {total} steps")
    rng = jax.random.PRNGKey(FLAGS.seed)
    pending = []
    for i in range(1, total + 1):
        batch = {k: v for k, v in next(data.train).items() if k != "example_index"}
        rng, sub = jax.random.split(rng)
        params, opt_state, m = step(params, opt_state, batch, sub)
        pending.append(m)
        if i % FLAGS.log_every == 0 or i == total:
            vals = {k: float(np.mean([float(x[k]) for x in pending])) for k in pending[0]}
            pending = []
            log.write(i, {**vals, "lr": float(sched(i - 1))})
            log.progress(i, vals["loss"])
        if i % data.steps_per_epoch == 0 or i == total:
            acc = accuracy(student, params, data.eval_batches, data.num_labels)
            log.write(i, {"eval_accuracy": acc})
            log.message(f"step {i}: student validation accuracy {acc:.4f} (teacher {teacher_acc:.4f})")
    student_acc = accuracy(student, params, data.eval_batches, data.num_labels)
    base = AdaptedModel(backbone.model, ClassificationHead(head["num_labels"], pooling=head.get("pooling", "cls")))
    lat = latency_ms({"base": (base, {"backbone": backbone.params, "head": teacher_params["head"]}),
                      "student": (student, params), "teacher": (teacher, teacher_params)}, 32, FLAGS.max_length)
    from safetensors.numpy import save_file
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}
    save_file(flat, os.path.join(FLAGS.workdir, "student.safetensors"))
    result = {"teacher": FLAGS.teacher, "data": FLAGS.data, "steps": total, "temperature": FLAGS.temperature,
              "label_weight": FLAGS.label_weight, "teacher_accuracy": teacher_acc, "student_accuracy": student_acc,
              "latency_ms_batch32": lat}
    with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    log.message(f"{'model':<8} {'val accuracy':>12} {'latency ms (32x' + str(FLAGS.max_length) + ')':>22}\n"
                f"{'teacher':<8} {teacher_acc:>12.4f} {lat['teacher']:>22.1f}\n"
                f"{'student':<8} {student_acc:>12.4f} {lat['student']:>22.1f}\n"
                f"{'base':<8} {'-':>12} {lat['base']:>22.1f}\n"
                f"student - teacher: {100 * (student_acc - teacher_acc):+.2f} points; "
                f"student latency {lat['student'] / lat['base']:.3f} x base, teacher {lat['teacher'] / lat['base']:.3f} x")
    log.close()


if __name__ == "__main__":
    app.run(main)
