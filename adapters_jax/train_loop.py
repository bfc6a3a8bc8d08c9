"""train_and_evaluate(config, workdir): the whole run, from a config to an adapter export.

Resume order (as big_vision's): the workdir's own latest checkpoint, else
`config.init_from` (another run's adapter export), else fresh adapters on the pretrained
base. The loop never waits on the device between log steps.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from adapters_jax import (checkpoint, compile_options, host_memory, metrics, optim, parallel, peft, report, rules,
                          trainer)
from adapters_jax.adapters import AdapterSetup, FusionConfig, spec_from_config
from adapters_jax.adapters.from_exports import setup_from_exports
from adapters_jax.adapters.fusion import regularization as fusion_regularization
from adapters_jax.adapters.prefix import head_options
from adapters_jax.backbones import attention
from adapters_jax.data import make_datasets
from adapters_jax.heads import BackboneLogits, ClassificationHead, resolve_pooling
from adapters_jax.hub import adapter_sites, load_backbone
from adapters_jax.model import AdaptedModel, init_with_base
from adapters_jax.run_logging import RunLog

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def frozen_dtype(config):
    """The dtype the frozen base's matrices are stored in: model.frozen_dtype, where 'auto' is
    the compute dtype (a bf16 run keeps its frozen matrices in bf16)."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype={config.model.dtype!r} is not one of {sorted(DTYPES)}")
    name = config.model.get("frozen_dtype", "auto")
    if name == "auto":
        name = config.model.dtype
    if name not in DTYPES:
        raise ValueError(f"model.frozen_dtype={name!r} is not one of {sorted(DTYPES) + ['auto']}")
    return DTYPES[name]


def attention_backward(config) -> str:
    """model.attention_backward: what training attention keeps for its backward on XLA:CPU
    ('keep': the probabilities; 'recompute': nothing score-sized; see attention.set_training_backward)."""
    name = config.model.get("attention_backward", "keep")
    if name not in attention.BACKWARDS:
        raise ValueError(f"model.attention_backward={name!r} is not one of {list(attention.BACKWARDS)}")
    return name


def build(config, backbone=None, base_sha256=None):
    """(backbone, spec, model, preloaded): the pretrained backbone with the config's adapters and
    head; `preloaded` holds adapter params read from earlier runs (AdapterFusion), else None.
    Also sets model.attention_backward for the steps traced after it."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype={config.model.dtype!r} is not one of {sorted(DTYPES)}")
    attention.set_training_backward(attention_backward(config))
    backbone = backbone or load_backbone(config.model.name, dtype=DTYPES[config.model.dtype])
    options = config.adapter.to_dict()
    preloaded = None
    if options.get("method") == "fusion":
        fusion = config.fusion.to_dict()
        dirs = [d for d in fusion.pop("adapters").split(",") if d]
        name = fusion.pop("name")
        spec, preloaded = setup_from_exports(dirs, base_sha256 or checkpoint.base_fingerprint(backbone.path),
                                             FusionConfig(**fusion), fusion_name=name)
    else:
        if options.get("method") == "prefix":  # the prefix layout follows the model's attention heads
            options = {**head_options(backbone.config), **options}
        spec = spec_from_config(**options)
    if spec is not None:
        num_layers, available = adapter_sites(backbone.config)
        spec.validate(num_layers, backbone.config.hidden_size, available)
    if config.task == "lm":  # causal LM: the decoder's own (frozen) LM head gives the logits
        head = BackboneLogits()
    else:
        head = ClassificationHead(config.data.num_labels, pooling=resolve_pooling(config.head.pooling, backbone.model),
                                  dropout=config.head.dropout, dtype=DTYPES[config.model.dtype])
    skip = config.model.get("skip_unread_rows", True)
    if not isinstance(skip, bool):
        raise ValueError(f"model.skip_unread_rows={skip!r} must be True or False")
    model = AdaptedModel(backbone.model.clone(filler=spec), head, skip_unread_rows=skip)
    return backbone, spec, model, preloaded


def _freeze_rules(config, spec):
    names = [spec.fusion_name] if isinstance(spec, AdapterSetup) else [spec.name] if spec else []
    return peft.make_rules(names, train_head=config.freeze.train_head,
                           train_layernorm=config.freeze.train_layernorm, train_bias=config.freeze.train_bias,
                           train_all=config.freeze.train_all)


def check_config(config) -> None:
    """Fields whose mistakes would otherwise surface only after an epoch of training."""
    task_metrics = {"classification": metrics.CLASSIFICATION, "regression": metrics.REGRESSION,
                    "lm": metrics.LM}
    if config.task not in task_metrics:
        raise ValueError(f"task={config.task!r} is not one of {tuple(task_metrics)}")
    if config.metric not in task_metrics[config.task]:
        raise ValueError(f"metric={config.metric!r} is not a {config.task} metric {task_metrics[config.task]}")
    for field in ("batch_size", "eval_batch_size", "accum_steps", "log_every", "ckpt_every", "max_to_keep"):
        if getattr(config.train, field) <= 0:
            raise ValueError(f"train.{field}={getattr(config.train, field)} must be > 0")
    if config.train.get("streams", 1) <= 0:
        raise ValueError(f"train.streams={config.train.streams} must be > 0")
    scheduler = compile_options.check_scheduler(config.train.get("cpu_scheduler", "default"))
    if scheduler != "default" and config.parallelism == "pmap":
        raise ValueError(f"train.cpu_scheduler={scheduler!r} needs parallelism='jit' (jax.pmap takes no "
                         "per-program compiler options)")
    if config.train.batch_size % config.train.accum_steps:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by "
                         f"train.accum_steps={config.train.accum_steps}")
    if config.train.num_steps <= 0 and config.train.num_epochs <= 0:
        raise ValueError("train.num_steps or train.num_epochs must be > 0")
    if config.optim.lr <= 0:
        raise ValueError(f"optim.lr={config.optim.lr} must be > 0")
    frozen_dtype(config)  # raises for an unknown model.frozen_dtype before anything loads
    attention_backward(config)
    if not 0 <= config.optim.get("warmup_ratio", 0.0) <= 1:
        raise ValueError(f"optim.warmup_ratio={config.optim.warmup_ratio} must be in [0, 1]")
    if "head" in config and not 0 <= config.head.get("dropout", 0.0) < 1:
        raise ValueError(f"head.dropout={config.head.dropout} must be in [0, 1)")
    if config.data.get("max_length", 2) < 2:
        raise ValueError(f"data.max_length={config.data.max_length} must be >= 2")
    _check_packing(config)
    from adapters_jax.data import registry
    try:
        registry.loader(config.data.name)
    except ValueError as e:
        raise ValueError(f"data.name={config.data.name!r}: {e}") from None


def _check_packing(config) -> None:
    d = config.data
    pack_mode(config)
    if d.get("pack_segments", 16) < 1:
        raise ValueError(f"data.pack_segments={d.pack_segments} must be >= 1")
    rows = d.get("pack_rows", 0)
    if rows < 0 or rows % config.train.accum_steps:
        raise ValueError(f"data.pack_rows={rows} must be 0 (auto) or a positive multiple of "
                         f"train.accum_steps={config.train.accum_steps}")


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs training with periodic eval and checkpoints; returns the final eval metrics."""
    check_config(config)
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    tr = config.train
    backbone = load_backbone(_model_path(config, workdir), dtype=DTYPES.get(config.model.dtype, jnp.float32))
    data = make_datasets(config.data.name, backbone.tokenizer, tr.batch_size, config.data.max_length,
                         seed=config.seed, eval_batch_size=tr.eval_batch_size,
                         buckets=tuple(config.data.buckets), max_eval_examples=config.data.get("max_eval_examples", 0),
                         **pack_kwargs(config, backbone.model), **source_kwargs(config))
    with config.unlocked():
        config.data.num_labels = data.num_labels
    base_sha256 = checkpoint.base_fingerprint(backbone.path)  # read once: fusion checks and the export
    backbone, spec, model, params, labels, tx, sched, state = setup_state(config, backbone, data, base_sha256)
    total = total_steps(config, data)
    eval_every = tr.eval_every if tr.eval_every > 0 else data.steps_per_epoch
    rep = report.parameter_report(params, labels)
    meta = export_meta(config, spec, backbone, data, base_sha256)

    # An asynchronous save writes while the next steps run, and its allocations then often take the
    # heap's hole that a step's temporaries reuse: default MiniLM epoch, tuned allocator, +90-130
    # MiB for the ~10 s the save takes, in 3 of 4 runs. So a save blocks unless asked otherwise
    mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), tr.max_to_keep, tr.ckpt_every,
                              async_save=tr.get("async_checkpoint", False))
    restored, data_meta = checkpoint.restore_latest(mngr, state)
    start = 0
    if restored is not None:
        state, start = restored, int(restored.step)
        data.train.set_state(data_meta["iterator"])
    log = RunLog(workdir, total, start)
    log.message(report.format_report(rep))
    log.message(f"workdir {workdir}: {'resuming from step ' + str(start) if start else 'starting'}; "
                f"{total} steps, {data.steps_per_epoch} per epoch, {jax.device_count()} devices")
    log.message(compile_options.describe(DTYPES[config.model.dtype]))
    log.message(f"train batches: {getattr(data.train, 'dataset', data.train)}")

    step_fn, eval_fn, put_state, put_batch, get_metrics = make_steps(config, model, tx, state, data.train_rows)
    state = put_state(state)
    # The device state holds the base now. The host copies (the loaded checkpoint's arrays and the
    # initial params) held it twice more through training: MiniLM's peak RSS 1148 / 1170 MiB with
    # them, 997 / 1018 MiB without (40 steps, tuned allocator, two runs each)
    del params
    backbone = dataclasses.replace(backbone, params=None)
    # Building the state filled JAX's tracing and op-by-op caches (init's jaxprs, eager ops: about
    # 50 MiB at MiniLM size) that nothing reads again; no step is compiled yet, so clearing costs
    # nothing. 40-step MiniLM run, tuned allocator: peak RSS 982 / 990 -> 968 / 970 MiB
    jax.clear_caches()  # the freed heap goes back before the first compile (host_memory.CompiledAhead)
    # what checkpoints and exports read: pmap holds one replica of the state per device
    host = parallel.unreplicate if config.parallelism == "pmap" else (lambda s: s)
    best_key = f"eval_{config.metric}"
    best = _best_so_far(workdir, best_key)
    if start == 0 and tr.get("eval_at_start", False):  # the "before" number: base + adapters at init
        ev0 = evaluate(eval_fn, state, data.eval_batches, config, data.num_labels, put_batch)
        log.write(0, {f"eval_{k}": v for k, v in ev0.items()})
        log.message("step 0: " + ", ".join(f"eval_{k}={v:.4f}" for k, v in ev0.items()))
        if metrics.better(config.metric, ev0[config.metric], best):  # training must beat the start
            best = ev0[config.metric]
            _export(os.path.join(workdir, "adapter_best"), host(state), config, meta, 0, ev0)
    pending, t_log, last_log = [], time.perf_counter(), start
    t_loop = t_log  # train_s in the log: this session's loop time so far (compiles included)
    try:
        for step in range(start + 1, total + 1):
            batch = next(data.train)
            state, m = step_fn(state, put_batch(batch))  # a new shape compiles first (CompiledAhead)
            pending.append(m)  # device arrays: no host sync until the log step
            if step % tr.log_every == 0 or step == total or step % tr.ckpt_every == 0:  # never save unchecked
                vals = get_metrics(pending)
                pending = []
                if vals["nonfinite"] and not tr.skip_nonfinite:
                    raise FloatingPointError(f"step {step}: loss is {vals['loss']} (NaN/inf); stopping without "
                                             "saving. Set train.skip_nonfinite=True to skip such steps")
                now = time.perf_counter()
                sps = (step - last_log) / max(now - t_log, 1e-9)
                t_log, last_log = now, step
                log.write(step, {"loss": vals["loss"], "lr": float(sched(step - 1)), "grad_norm": vals["grad_norm"],
                                 "steps_per_sec": sps, "skipped": vals["nonfinite"], "train_s": now - t_loop})
                log.progress(step, vals["loss"])
            if step % eval_every == 0 or step == total:
                final = ev = evaluate(eval_fn, state, data.eval_batches, config, data.num_labels, put_batch)
                host_memory.release_free_heap()  # the eval compiles' and batches' freed heap
                log.write(step, {f"eval_{k}": v for k, v in ev.items()})
                log.message(f"step {step}: " + ", ".join(f"eval_{k}={v:.4f}" for k, v in ev.items()))
                if metrics.better(config.metric, ev[config.metric], best):  # perplexity: lower wins
                    best = ev[config.metric]
                    _export(os.path.join(workdir, "adapter_best"), host(state), config, meta, step, ev)
            if step % tr.ckpt_every == 0 or step == total:
                checkpoint.save(mngr, host(state), data.train.get_state(), force=step == total)
        checkpoint.finish(mngr)
    except BaseException:
        checkpoint.finish(mngr, quiet=True)  # a save under way completes; nothing new is written
        log.close()
        raise
    if start == total:  # resumed a finished run: nothing trained, evaluate what was restored
        final = evaluate(eval_fn, state, data.eval_batches, config, data.num_labels, put_batch)
    size = _export(os.path.join(workdir, "adapter"), host(state), config, meta, total, final)
    if config.model.get("export_backbone"):  # e.g. a ViT pretrained here: the base of a later adapter run
        log.message(f"backbone export: {_export_backbone(os.path.join(workdir, 'backbone'), host(state), config, backbone)}")
    log.message(f"adapter export: {os.path.join(workdir, 'adapter')} ({size / 2**20:.2f} MiB); "
                f"best {best_key}={best:.4f}; train time {time.perf_counter() - t_start:.0f}s; "
                f"peak host RSS {host_memory.peak_rss_mib():.0f} MiB")
    log.message(f"final {data.eval_split} " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
    log.close()
    return {**final, "best": best, "trainable": rep["trainable"], "trainable_pct": rep["trainable_pct"]}


def total_steps(config, data) -> int:
    """train.num_steps if set, else train.num_epochs epochs of the data."""
    tr = config.train
    return tr.num_steps if tr.num_steps > 0 else tr.num_epochs * data.steps_per_epoch


def setup_state(config, backbone, data, base_sha256=None):
    """(backbone, spec, model, params, labels, tx, schedule, state): the config's model on the
    loaded backbone, its freezing labels, optimiser and fresh train state (host arrays)."""
    backbone, spec, model, preloaded = build(config, backbone, base_sha256)
    sample = {k: v for k, v in next(iter(data.eval_batches)).items() if k != "example_index"}
    params = init_with_base(model, backbone.params, jax.random.PRNGKey(config.seed), sample)
    if preloaded is not None:  # AdapterFusion: the trained adapters, frozen by the rules
        params = _place(params, preloaded, "fusion.adapters")
    labels = rules.labels_for(params, _freeze_rules(config, spec))
    if config.init_from:
        params = _load_init(params, config.init_from)
    total = total_steps(config, data)
    warmup = int(config.optim.warmup_ratio * total)
    tx, sched = optim.make(params, labels, lr=config.optim.lr, total_steps=total, warmup_steps=warmup,
                           schedule_kind=config.optim.schedule, weight_decay=config.optim.weight_decay,
                           clip_norm=config.optim.clip_norm or None)
    state = trainer.create_state(params, labels, tx, jax.random.PRNGKey(config.seed + 1),
                                 frozen_dtype=frozen_dtype(config))
    return backbone, spec, model, params, labels, tx, sched, state


def packing_unsupported(config, backbone_model) -> str:
    """Why this run cannot train on packed rows ('' when it can)."""
    from adapters_jax.data import images
    from adapters_jax.model import accepts
    if config.task == "lm":
        return "task='lm' (packing is for classification and regression rows)"
    if config.data.name in images.IMAGE_DATASETS:
        return f"data.name={config.data.name!r} is an image dataset"
    if config.adapter.get("method") == "prompt":
        return "prompt tuning puts its tokens in front of the row, not of each packed example"
    if not accepts(backbone_model, "segment_ids"):
        return f"{type(backbone_model).__name__} does not take packed rows (segment_ids); BERT-family encoders, GPT-2 and Llama do"
    return ""


PACK_MODES = {"auto": "auto", "true": True, "false": False}


def pack_mode(config):
    """config.data.pack as 'auto', True or False (the field is a string: 'auto', 'true', 'false')."""
    value = config.data.get("pack", "false")
    mode = value if isinstance(value, bool) else PACK_MODES.get(str(value).lower())
    if mode is None:
        raise ValueError(f"data.pack={value!r} must be 'auto', 'true' or 'false'")
    return mode


def pack_kwargs(config, backbone_model) -> dict:
    """make_datasets' packing arguments from config.data: pack 'auto' packs where the task, data,
    method and backbone allow it, 'true' insists (one-line error otherwise), 'false' never packs.
    Packed rows split evenly over the devices and the accumulation steps (streams need not divide them)."""
    d = config.data
    mode = pack_mode(config)
    if mode is False:
        return {}
    why = packing_unsupported(config, backbone_model)
    if why:
        if mode is True:
            raise ValueError(f"data.pack=true: {why}; set data.pack to 'false' or 'auto'")
        return {}
    return {"pack": True, "pack_rows": d.get("pack_rows", 0), "pack_segments": d.get("pack_segments", 16),
            "pack_row_multiple": jax.device_count() * config.train.accum_steps}  # pmap splits per device


def source_kwargs(config) -> dict:
    kw = {}
    if config.data.data_dir:
        kw["data_dir"] = config.data.data_dir
    if config.data.get("files"):
        try:
            kw["files"] = dict(part.split("=", 1) for part in config.data.files.split(","))
        except ValueError:
            raise ValueError(f"data.files={config.data.files!r}: use 'train=PATH,validation=PATH'") from None
    if config.data.get("glue_dir"):
        kw["glue_dir"] = config.data.glue_dir
    if config.data.get("skip_bad_rows"):
        kw["skip_bad_rows"] = True
    for field in ("classes", "idx_dir"):  # image datasets: a label subset, a folder of IDX files
        if config.data.get(field):
            kw[field] = config.data[field]
    return kw


def make_steps(config, model, tx, state, train_rows: int = 0):
    """(step, eval, put_state, put_batch, get_metrics) for config.parallelism 'jit' or 'pmap'.
    train_rows: the global train batch's leading dimension when it is not train.batch_size (packed rows).
    The step and eval compile each new batch shape before running it (host_memory.CompiledAhead)."""
    tr = config.train
    kw = dict(task=config.task, accum_steps=tr.accum_steps, streams=tr.get("streams", 1),
              skip_nonfinite=tr.skip_nonfinite)
    setup = model.backbone.filler
    if isinstance(setup, AdapterSetup) and setup.fusion is not None and setup.fusion.regularization:
        kw["regularizer"] = lambda params: fusion_regularization(params, setup.fusion_name)
    eval_step = trainer.make_eval_step(model, config.task)
    if config.parallelism == "pmap":
        step = host_memory.CompiledAhead(parallel.pmap_step(trainer.make_train_step(
            model, tx, axis_name=parallel.PMAP_AXIS, **kw)))
        ev = host_memory.CompiledAhead(jax.pmap(eval_step))
        return (step, lambda s, b: ev(s.trainable, s.frozen, b), parallel.replicate,
                parallel.shard_for_pmap, lambda ms: _mean([jax.tree_util.tree_map(lambda x: x[0], m) for m in ms]))
    if config.parallelism != "jit":
        raise ValueError(f"parallelism={config.parallelism!r} must be 'jit' or 'pmap'")
    want = config.mesh.get("cpu_devices", 0)
    if want and jax.default_backend() == "cpu" and jax.local_device_count() != want:
        raise ValueError(f"mesh.cpu_devices={want} but JAX's CPU backend has {jax.local_device_count()} devices: "
                         "split it before JAX starts (experiments.train does; from Python, call "
                         "parallel.set_cpu_devices first)")
    mesh = parallel.make_mesh(config.mesh.fsdp)
    if train_rows and train_rows != tr.batch_size:
        parallel.check_batch(train_rows, mesh, "data.pack_rows")
    else:
        parallel.check_batch(tr.batch_size, mesh, "train.batch_size")
    parallel.check_batch(tr.eval_batch_size, mesh, "train.eval_batch_size")
    sh = parallel.state_shardings(state, mesh, config.mesh.shard_frozen)
    dtype = DTYPES[config.model.dtype]
    step = host_memory.CompiledAhead(parallel.jit_step(trainer.make_train_step(model, tx, **kw), sh, mesh,
                                                       compiler_options=compile_options.train_compiler_options(
                                                           dtype, tr.get("cpu_scheduler", "default"))))
    ev = host_memory.CompiledAhead(compile_options.forward_jit(eval_step, dtype=dtype))
    return (step, lambda s, b: ev(s.trainable, s.frozen, b), lambda s: parallel.put_state(s, sh),
            lambda b: parallel.put_batch(b, mesh), _mean)


def _mean(ms: list) -> dict:
    host = jax.device_get(ms)
    return {"loss": float(np.mean([m["loss"] for m in host])),
            "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
            "nonfinite": int(np.sum([m["nonfinite"] for m in host]))}


def evaluate(eval_fn, state, eval_batches, config, num_labels: int, put_batch) -> dict:
    from jax.experimental import multihost_utils
    preds, labs, weights = [], [], []
    for b in eval_batches:
        inputs = {k: v for k, v in b.items() if k not in ("example_index",)}
        p = eval_fn(state, put_batch(inputs))
        if jax.process_count() > 1:
            p = multihost_utils.process_allgather(p, tiled=True)
            lab = multihost_utils.process_allgather(b["labels"], tiled=True)
            w = multihost_utils.process_allgather(b["weights"], tiled=True)
        else:
            lab, w = b["labels"], b["weights"]
        preds.append(np.asarray(p).reshape((-1, 2) if config.task == "lm" else (-1,)))  # lm: [B, 2]
        labs.append(np.asarray(lab).reshape(-1))
        weights.append(np.asarray(w).reshape(-1))
    return metrics.compute(np.concatenate(preds), np.concatenate(labs), np.concatenate(weights),
                           config.task, num_labels)


def _best_so_far(workdir: str, key: str):
    from adapters_jax.run_logging import best_of, read_metrics
    rec = best_of(read_metrics(workdir), key, lower_is_better=key[len("eval_"):] in metrics.LOWER_IS_BETTER)
    return None if rec is None else rec[key]


def export_meta(config, spec, backbone, data, base_sha256: str) -> dict:
    """What an adapter export records besides its weights (computed once per run)."""
    return {"spec": checkpoint.spec_to_dict(spec), "base_model": config.model.name,
            "base_path": backbone.path, "base_sha256": base_sha256,
            "head": {"num_labels": data.num_labels, "pooling": resolve_pooling(config.head.pooling, backbone.model)},
            "label_names": list(data.label_names), "task": config.task}


def _model_path(config, workdir: str) -> str:
    """config.model.name; for 'vit-scratch' a fresh ViT (config.model.vit) written into the
    workdir as a checkpoint directory, so the run reads it like any pretrained base."""
    if config.model.name != "vit-scratch":
        return config.model.name
    from adapters_jax.backbones import vit_weights
    return vit_weights.scratch_dir(os.path.join(workdir, "scratch_backbone"), config.model.get("vit"), config.seed)


def _export_backbone(directory, state, config, backbone) -> str:
    """The trained base (adapters left out) as a HF checkpoint directory, from process 0."""
    from adapters_jax.hub import save_backbone
    if jax.process_index() != 0:
        return directory
    params = jax.device_get(state.params)
    if config.parallelism == "pmap":
        params = jax.tree_util.tree_map(lambda x: x[0], params)
    return save_backbone(backbone, params["backbone"], directory)


def _export(directory, state, config, meta, step, ev) -> int:
    if jax.process_index() != 0:
        return 0
    trainable = state.trainable
    if config.parallelism == "pmap":
        trainable = jax.tree_util.tree_map(lambda x: x[0], trainable)
    meta = {**meta, "step": int(step), "metrics": {k: float(v) for k, v in ev.items()}}
    return checkpoint.export_adapter(directory, jax.device_get(trainable), meta)


def _load_init(params: dict, directory: str) -> dict:
    """Starts from another run's trainable params (its adapter export)."""
    try:
        _, loaded = checkpoint.read_adapter(directory)
        return _place(params, loaded, directory)
    except ValueError as e:
        raise ValueError(f"init_from: {e}") from None


def _place(params: dict, loaded: dict, source: str) -> dict:
    from flax import traverse_util
    checkpoint.check_fits(params, loaded, source)
    flat = traverse_util.flatten_dict(dict(params))
    flat.update({k: jnp.asarray(v) for k, v in traverse_util.flatten_dict(loaded).items()})
    return traverse_util.unflatten_dict(flat)
