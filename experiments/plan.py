"""Plan a PEFT run on a TPU/GPU slice: per-chip memory, FLOPs, step time, sharding, communication.

    python -m experiments.plan --model llama2-7b --mesh data=2,fsdp=8 --chip v5e --batch 64 --seq 2048 --remat full
    python -m experiments.plan --model path/to/config.json --mesh data=8,fsdp=1 --chip h100 --json

Exact (no allocation): parameter counts and bytes, the trainable/frozen split (the model is built
with jax.eval_shape and labelled by adapters_jax.peft rules), the optimizer state (jax.eval_shape
of optim.make's init) and the fsdp layout (parallel.py's rule: each frozen leaf split over `fsdp`
along its largest divisible dimension). Estimated: activation memory, FLOPs, step time at an
assumed MFU and communication. docs/scaling.md states the formulas; tests/test_plan.py checks
bytes against real arrays and FLOPs against XLA's cost analysis of the compiled train step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from adapters_jax import optim, peft, rules
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.backbones.llama import LlamaConfig, LlamaModel
from adapters_jax.heads import ClassificationHead, default_pooling
from adapters_jax.model import AdaptedModel

GiB = 2 ** 30
# family, config fields. Llama-2 shapes from Touvron et al. 2023 / the HF config.json files.
MODELS = {
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                                intermediate_size=11008, max_position_embeddings=4096)),
    "llama2-13b": ("llama", dict(vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                                 intermediate_size=13824, max_position_embeddings=4096)),
    "llama2-70b": ("llama", dict(vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                 intermediate_size=28672, max_position_embeddings=4096)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                   intermediate_size=1536, tie_word_embeddings=True)),
    "tiny-llama": ("llama", dict(vocab_size=999, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=344, max_position_embeddings=512)),
    "minilm": ("bert", dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)),
    "bert-base": ("bert", {}),
}


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16: float  # dense matmul FLOP/s, vendor datasheet
    peak_f32: float   # what an f32 matmul gets by default (see docs/scaling.md)
    hbm: float        # bytes
    link: float       # bytes/s per chip for collectives (datasheet, optimistic)


CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 197e12, 16 * GiB, 1600e9 / 8),
    "h100": Chip("H100 SXM", 989e12, 494.7e12, 80 * GiB, 450e9),
}
SITE_POS = {"query": 0, "key": 0, "value": 0, "attn_out": 0, "prefix": 0, "attn_adapter": 1,
            "ffn_in": 2, "ffn_gate": 2, "ffn_out": 2, "ffn_adapter": 3}
ADAPTERS = ("houlsby", "pfeiffer", "parallel", "lora", "ia3", "none")  # whose FLOPs/activations are modelled


# ----------------------------------------------------------------------------- model and params

def load_config(name_or_path: str):
    """(family, config) from a named shape or an HF config.json path."""
    if name_or_path in MODELS:
        family, fields = MODELS[name_or_path]
        return family, (LlamaConfig if family == "llama" else BertConfig)(**fields)
    try:
        with open(name_or_path) as f:
            hf = json.load(f)
    except OSError:
        raise ValueError(f"--model={name_or_path!r} is neither a known shape ({', '.join(MODELS)}) "
                         "nor a readable config.json") from None
    if hf.get("model_type", "bert") == "llama":
        return "llama", LlamaConfig.from_hf(hf)
    return "bert", BertConfig.from_hf(hf)


def build_model(family: str, cfg, spec, head: str, dtype):
    """head 'lm': the decoder with its own (frozen) LM head; 'cls': AdaptedModel + a 2-way head."""
    backbone = (LlamaModel if family == "llama" else BertModel)(cfg, filler=spec, dtype=dtype)
    if head == "lm":
        if family != "llama":
            raise ValueError("--head=lm needs a Llama decoder; BERT models take --head=cls")
        return backbone
    # every row of the last layer: the plan's FLOPs and activation terms count them (training with
    # a CLS head skips most of that layer, AdaptedModel.skip_unread_rows: there the plan is high
    # by up to one layer's work, 1/L of the encoder's)
    return AdaptedModel(backbone, ClassificationHead(2, pooling=default_pooling(backbone), dtype=dtype),
                        skip_unread_rows=False)


def abstract_params(model, head: str):
    """The parameter tree as ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    init = lambda r, x: model.init({"params": r, "dropout": r}, x if head == "lm" else {"input_ids": x})["params"]
    return jax.eval_shape(init, jax.random.PRNGKey(0), ids)


def fsdp_dim(shape: tuple, size: int):
    """The dimension a frozen leaf is split along over `fsdp` (None: replicated), as parallel.py does."""
    if size == 1 or not shape:
        return None
    return next((i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % size == 0), None)


def leaf_table(params, labels, frozen_itemsize: int, fsdp: int) -> list[dict]:
    flat_l = traverse_util.flatten_dict(dict(labels))
    rows = []
    for path, x in traverse_util.flatten_dict(dict(params)).items():
        trainable = flat_l[path] == peft.TRAINABLE
        n = int(np.prod(x.shape))
        dim = None if trainable else fsdp_dim(tuple(x.shape), fsdp)
        nbytes = n * (4 if trainable else frozen_itemsize)
        rows.append(dict(path=rules.path_str(path), shape=tuple(x.shape), n=n, trainable=trainable, dim=dim,
                         bytes=nbytes, per_chip=nbytes // (fsdp if dim is not None else 1)))
    return rows


def position(path: str, num_layers: int) -> int | None:
    """Where a trainable leaf sits in the network: 4*layer + sublayer slot (-1 embeddings, 4L head)."""
    m = re.fullmatch(r"(?:.*/)?layer_(\d+)/(?:.*/)?(" + "|".join(SITE_POS) + r")/.*", path)
    if m:
        return 4 * int(m.group(1)) + SITE_POS[m.group(2)]
    if path.startswith("head/"):
        return 4 * num_layers
    if "shared_adapters/" in path:
        return None
    return -1  # embeddings, prompt tokens, anything before layer 0


# ----------------------------------------------------------------------------- FLOPs

@dataclasses.dataclass(frozen=True)
class Arch:
    d: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    n_ffn: int  # FFN matmuls: 3 for SwiGLU, 2 for BERT
    vocab: int
    family: str

    @classmethod
    def of(cls, family, cfg):
        llama = family == "llama"
        return cls(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads if llama else cfg.num_heads,
                   cfg.head_dim if llama else cfg.hidden_size // cfg.num_heads, cfg.intermediate_size,
                   3 if llama else 2, cfg.vocab_size, family)


def step_flops(a: Arch, batch: int, seq: int, adapters: dict, cut: int, full: bool, head: str,
               remat: bool, num_labels: int = 2) -> dict:
    """FLOPs of one train step (global batch), matmuls only.

    adapters: {position: per-token matmul params of trainable kernels there}; cut: the position of
    the lowest trainable leaf (-1 for full fine-tuning). An op gets an activation backward iff it
    sits above the cut; the lowest adapter itself only needs its up-projection's dX (half).
    """
    tok = batch * seq
    p_attn = a.d * a.heads * a.head_dim + 2 * a.d * a.kv_heads * a.head_dim + a.heads * a.head_dim * a.d
    ops = []  # (position, forward flops, activation-backward multiplier, has trainable weights)
    for l in range(a.layers):
        ops += [(4 * l, 2 * tok * p_attn, 1, full), (4 * l, 4 * tok * seq * a.heads * a.head_dim, 2, False),
                (4 * l + 2, 2 * tok * a.n_ffn * a.d * a.ffn, 1, full)]
    ops += [(p, 2 * tok * n, 1, True) for p, n in adapters.items()]
    head_op = (4 * a.layers, 2 * tok * a.d * a.vocab, 1, full) if head == "lm" else \
        (4 * a.layers, 2 * batch * a.d * num_labels, 1, True)
    ops.append(head_op)
    fwd = sum(f for _, f, _, _ in ops)
    bwd_act = sum(f * (m if p > cut else 0.5 if (p == cut and w) else 0) for p, f, m, w in ops)
    wgrad = sum(f for _, f, _, w in ops if w)
    recompute = sum(f for p, f, _, _ in ops if p >= cut and p < 4 * a.layers) if remat else 0
    return dict(forward=fwd, backward_act=bwd_act, weight_grad=wgrad, remat=recompute,
                model=fwd + bwd_act + wgrad, hardware=fwd + bwd_act + wgrad + recompute)


# ----------------------------------------------------------------------------- activation memory

def saved_per_token(a: Arch, seq: int, s: int, sites: dict, cut: int, full: bool, head: str, flash: bool,
                    attn_dropout: bool, hidden_dropout: bool) -> tuple[list, int]:
    """Bytes per token that the backward pass keeps: ([per layer], above the layers).

    The terms follow what JAX saves (jax.ad_checkpoint's saved residuals) when only the
    trainable leaves are differentiated, on the accelerator path (flax's standard bf16 ops);
    docs/scaling.md lists them. XLA:CPU's bf16 kernels keep less (softmax_pv: 3 bytes per
    score). s: compute-dtype bytes.
    sites: {position: (kind 'act' | 'dense', bottleneck r)}. Sub-layers at or below the cut save nothing.
    """
    d, h, hkv, dh, f, t = a.d, a.heads, a.kv_heads, a.head_dim, a.ffn, seq
    norm = 8 * d + 8  # RMSNorm: f32 input, 2x (d/dx of the square), 2 per-token scalars
    ln = 4 * d + 4  # LayerNorm (backbones/layer_norm.py): f32 normalised values, 1 per-token scalar
    # scores: bool mask, f32 masked logits, f32 exp, probs (compute dtype) [+ keep mask, f32 probs]
    scores = (h * dh * s + 4 * h) if flash else h * (t * (9 + s + (5 if attn_dropout else 0)) + 8)
    if a.family == "llama":
        attn = norm + (h + 2 * hkv) * dh * s + 16 * dh + scores  # q, k, v (+ f32 cos/sin tables)
        ffn = norm + 5 * f * s  # gate pre-activation, 3 silu intermediates, up projection
        at_site = 0
        if full:  # inputs of the (now trained) matmuls and the normalised values for the norm scales
            attn += d * s + 4 * d + (0 if flash else h * dh * s)
            ffn += d * s + 4 * d + f * s
    else:
        drop = (d + d * s) if hidden_dropout else 0  # keep mask + dropped values
        attn = 3 * d * s + scores + drop
        ffn = f * s + drop  # exact GELU: its input (backbones/gelu.py)
        at_site = ln  # post-LN: the add & norm sits at each activation site
        if full:
            attn += 4 * d + (0 if flash else d * s)
            ffn += 4 * d + f * s
    layers = []
    for l in range(a.layers):
        b = (attn if 4 * l > cut else 0) + (ffn if 4 * l + 2 > cut else 0)
        for p in range(4 * l, 4 * l + 4):
            kind, r = sites.get(p, (None, 0))
            if p % 2 and p >= cut:
                # input (bf16 down proj) and the f32 pre-activation (activated_dense rebuilds f(pre))
                b += at_site + (d * s + 4 * r if kind == "act" else 0)
            elif kind == "dense" and p >= cut:
                b += d * s + r * s  # LoRA: input and A-output (estimate)
        layers.append(b)
    top = (norm if a.family == "llama" else 0) + (4 * a.vocab + 8 if head == "lm" else 0)  # final norm, softmax
    if full and a.family == "llama":
        top += 4 * d + 4 + (d * s if head == "lm" else 0)  # final norm's normalised value, ids, lm_head input
    elif full:
        top += ln + 4 * d + (d + d * s if hidden_dropout else 0) + 12  # embeddings LayerNorm, dropout, ids
    return layers, top


def activation_bytes(a: Arch, micro_batch: int, seq: int, layers: list, top: int, remat: bool, flash: bool,
                     head: str) -> dict:
    """Activation bytes on one chip for a micro-batch: saved tensors, the loss head, live gradients."""
    tok = micro_batch * seq
    if remat:  # checkpoint each layer's f32 input, recompute one layer at a time in the backward
        saved = sum(4 * a.d for b in layers if b) + max(layers)
    else:
        saved = sum(layers)
    work = 2 * max(0 if flash else a.heads * seq * 4, a.ffn * 4, a.d * 4, 4 * a.vocab if head == "lm" else 0)
    return dict(layers=tok * saved, top=tok * top, work=tok * work, total=tok * (saved + top + work),
                max_layer_per_token=max(layers))


# ----------------------------------------------------------------------------- the plan

def adapter_layout(trainable: list, a: Arch, full: bool) -> tuple[dict, dict, int]:
    """({position: per-token matmul params}, {position: (kind, r)}, cut) from the trainable adapter leaves."""
    matmul, sites = {}, {}
    if full:  # no adapters; the embeddings are trained, so the backward reaches every op
        return matmul, sites, -1
    for r in trainable:
        p = position(r["path"], a.layers)
        if p is None or p < 0 or p >= 4 * a.layers:
            continue
        kind = "act" if p % 2 else "dense"
        if len(r["shape"]) == 2:  # per-token matmul kernels: bottleneck down/up, LoRA A/B
            matmul[p] = matmul.get(p, 0) + r["n"]
            sites[p] = (kind, min(r["shape"]))
        else:
            sites.setdefault(p, (kind, 0))
    positions = [q for r in trainable if (q := position(r["path"], a.layers)) is not None]
    return matmul, sites, min(positions)


def plan(model: str = "llama2-7b", data: int = 1, fsdp: int = 1, chip: str = "v5e", batch: int = 64,
         seq: int = 2048, adapter: str = "houlsby", bottleneck: int = 64, dtype: str = "bf16",
         mfu: float = 0.4, remat: str = "none", head: str | None = None, attention: str = "xla",
         accum: int = 1) -> dict:
    family, cfg = load_config(model)
    head = head or ("lm" if family == "llama" else "cls")
    n_chips, hw = data * fsdp, CHIPS[chip]
    if min(batch, seq, accum, data, fsdp) < 1 or not 0 < mfu <= 1:
        raise ValueError("--batch, --seq, --accum and the mesh sizes must be >= 1, and 0 < --mfu <= 1")
    if batch % (n_chips * accum):
        raise ValueError(f"--batch={batch} is not divisible by data*fsdp*accum={n_chips * accum}")
    if seq > cfg.max_position_embeddings and family == "bert":
        raise ValueError(f"--seq={seq} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    if adapter not in ADAPTERS:
        raise ValueError(f"--adapter={adapter!r}: the planner models {', '.join(ADAPTERS)}")
    options = ({"r": bottleneck} if adapter == "lora" else {} if adapter in ("ia3", "none")
               else {"bottleneck_dim": bottleneck})
    spec = spec_from_config(adapter, **options)
    full = spec is None
    s, cdtype = {"bf16": (2, jnp.bfloat16), "f32": (4, jnp.float32)}[dtype]
    params = abstract_params(build_model(family, cfg, spec, head, cdtype), head)
    labels = rules.labels_for(params, peft.make_rules([spec.name] if spec else [], train_all=full))
    leaves = leaf_table(params, labels, s, fsdp)
    tx, _ = optim.make(params, labels, lr=1e-4, total_steps=1000)
    opt_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                    for x in jax.tree_util.tree_leaves(jax.eval_shape(tx.init, params)))
    trainable, frozen = [r for r in leaves if r["trainable"]], [r for r in leaves if not r["trainable"]]
    n_tr, n_all = sum(r["n"] for r in trainable), sum(r["n"] for r in leaves)
    a = Arch.of(family, cfg)
    matmul, sites, cut = adapter_layout(trainable, a, full)
    flops = step_flops(a, batch, seq, matmul, cut, full, head, remat == "full")
    flops_full = step_flops(a, batch, seq, {}, -1, True, head, remat == "full")
    drop = dict(attn_dropout=getattr(cfg, "attention_dropout", 0.0) > 0,
                hidden_dropout=getattr(cfg, "hidden_dropout", 0.0) > 0)
    layers, top = saved_per_token(a, seq, s, sites, cut, full, head, attention == "flash", **drop)
    local = batch // n_chips
    act = activation_bytes(a, local // accum, seq, layers, top, remat == "full", attention == "flash", head)

    tr_bytes = 4 * n_tr
    memory = dict(frozen_params=sum(r["per_chip"] for r in frozen), trainable_params=tr_bytes, gradients=tr_bytes,
                  grad_accumulator=tr_bytes if accum > 1 else 0, optimizer=opt_bytes,
                  state_misc=12,  # TrainState.step (int32) + rng (uint32[2])
                  fsdp_gather_buffer=2 * sum(r["bytes"] for r in frozen if "layer_0/" in r["path"]) if fsdp > 1 else 0,
                  activations=act["total"])
    total = sum(memory.values())
    peak = hw.peak_bf16 if dtype == "bf16" else hw.peak_f32
    step_s = flops["hardware"] / n_chips / (mfu * peak)
    gather = sum(r["bytes"] for r in frozen) * (fsdp - 1) / fsdp * (2 + (remat == "full")) * accum  # per micro-batch
    allreduce = 2 * (n_chips - 1) / n_chips * tr_bytes
    return dict(
        model=model, family=family, head=head, adapter=adapter, bottleneck=None if full else bottleneck,
        dtype=dtype, remat=remat, attention=attention, accum=accum, chip=hw.name, mesh=dict(data=data, fsdp=fsdp),
        global_batch=batch, seq=seq, local_batch=local, tokens_per_step=batch * seq,
        params=dict(total=n_all, frozen=n_all - n_tr, trainable=n_tr, optimizer_counters=(opt_bytes - 8 * n_tr) // 4),
        memory_per_chip=memory, memory_total=total, hbm=hw.hbm, fits=total <= 0.9 * hw.hbm,
        hbm_fraction=total / hw.hbm, activation_detail=act, saved_per_token=dict(layers=layers, top=top),
        full_ft_state_bytes=16 * n_all,  # f32 params + grads + 2 moments, replicated as parallel.py does
        flops=flops, flops_full_ft=flops_full, peft_vs_full=flops["model"] / flops_full["model"],
        mfu=mfu, peak_flops=peak, step_time_s=step_s, tokens_per_s_per_chip=batch * seq / n_chips / step_s,
        model_flops_utilisation=flops["model"] / n_chips / step_s / peak,
        comm=dict(fsdp_allgather_bytes=gather, grad_allreduce_bytes=allreduce,
                  seconds_at_link_bw=(gather + allreduce) / hw.link),
        sharding=sharding_table(leaves, fsdp, batch, local, seq, s, opt_bytes),
    )


def sharding_table(leaves, fsdp: int, batch: int, local: int, seq: int, s: int, opt_bytes: int) -> list[dict]:
    """One row per parameter kind (layer_N folded into layer_*): shape, PartitionSpec, bytes per chip."""
    groups = {}
    for r in leaves:
        g = groups.setdefault((re.sub(r"layer_\d+", "layer_*", r["path"]), r["shape"], r["trainable"], r["dim"]),
                              dict(count=0, per_chip=0))
        g["count"] += 1
        g["per_chip"] += r["per_chip"]
    rows = []
    for (path, shape, tr, dim), g in groups.items():
        axes = ", ".join("'fsdp'" if i == dim else "None" for i in range(len(shape)))
        spec = "P()" if dim is None else f"P({axes})"
        rows.append(dict(array=path, shape=list(shape), count=g["count"], spec=spec, per_chip=g["per_chip"],
                         kind="trainable f32" if tr else f"frozen {'bf16' if s == 2 else 'f32'}"))
    n_tr = sum(r["n"] for r in leaves if r["trainable"])
    rows += [dict(array="gradients (trainable only)", shape=[n_tr], count=1, spec="P()", per_chip=4 * n_tr, kind="f32"),
             dict(array="AdamW mu, nu (+ counters)", shape=[2, n_tr], count=1, spec="P()", per_chip=opt_bytes,
                  kind="f32"),
             dict(array="batch input_ids", shape=[batch, seq], count=1, spec="P(('data', 'fsdp'))",
                  per_chip=4 * local * seq, kind=f"int32, {local} rows/chip")]
    return rows


# ----------------------------------------------------------------------------- printing / CLI

def _b(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def render(p: dict) -> str:
    m, fl, ff, act = p["memory_per_chip"], p["flops"], p["flops_full_ft"], p["activation_detail"]
    out = [f"{p['model']} ({p['family']}, head={p['head']}) + {p['adapter']}"
           + (f" r={p['bottleneck']}" if p["bottleneck"] else "")
           + f" | {p['chip']} x{p['mesh']['data'] * p['mesh']['fsdp']}"
           f" data={p['mesh']['data']} fsdp={p['mesh']['fsdp']}"
           f" | batch {p['global_batch']} x {p['seq']} ({p['local_batch']}/chip, accum {p['accum']}) | {p['dtype']}"
           f" | remat={p['remat']} attention={p['attention']}",
           f"params: {p['params']['total']:,} total, {p['params']['trainable']:,} trainable "
           f"({100 * p['params']['trainable'] / p['params']['total']:.3f}%)", "",
           "memory per chip (params/optimizer exact; activations estimated)"]
    out += [f"  {k:<22}{v / GiB:9.2f} GiB" for k, v in m.items()]
    verdict = "FITS" if p["fits"] else ("TIGHT (over 90%)" if p["hbm_fraction"] <= 1 else "DOES NOT FIT")
    out += [f"    = saved {act['layers'] / GiB:.2f} + loss head {act['top'] / GiB:.2f} + live grads "
            f"{act['work'] / GiB:.2f} GiB; largest layer saves {act['max_layer_per_token']:,} B/token",
            f"  {'total':<22}{p['memory_total'] / GiB:9.2f} GiB of {p['hbm'] / GiB:.0f} GiB HBM "
            f"({100 * p['hbm_fraction']:.0f}%): {verdict}",
            f"  (full fine-tuning state alone: {p['full_ft_state_bytes'] / GiB:.1f} GiB per chip "
            "- f32 params, grads, 2 moments, replicated)", "",
            f"FLOPs per step (global)    {'PEFT':>10} {'full FT':>10}"]
    out += [f"  {k:<24}{fl[k] / 1e12:>9.1f}T {ff[k] / 1e12:>9.1f}T"
            for k in ("forward", "backward_act", "weight_grad", "remat", "model", "hardware")]
    out += [f"  PEFT / full FT (model FLOPs): {p['peft_vs_full']:.3f}",
            f"step time at {p['mfu']:.0%} of {p['peak_flops'] / 1e12:.0f} TFLOP/s on hardware FLOPs: "
            f"{p['step_time_s']:.3f} s, {p['tokens_per_s_per_chip']:,.0f} tokens/s/chip "
            f"(model-FLOPs MFU {p['model_flops_utilisation']:.0%})",
            f"comm per chip per step: fsdp all-gather {p['comm']['fsdp_allgather_bytes'] / GiB:.2f} GiB, "
            f"trainable-grad all-reduce {p['comm']['grad_allreduce_bytes'] / 2 ** 20:.1f} MiB "
            f"(~{p['comm']['seconds_at_link_bw']:.3f} s at link bandwidth, before overlap)", "",
            f"sharding on mesh ('data', 'fsdp') = ({p['mesh']['data']}, {p['mesh']['fsdp']})",
            f"  {'array':<46} {'shape':>12} {'n':>4} {'PartitionSpec':<21} {'kind':<24} {'per chip':>12}"]
    for r in p["sharding"]:
        out.append(f"  {r['array']:<46} {'x'.join(map(str, r['shape'])):>12} {r['count']:>4} {r['spec']:<21} "
                   f"{r['kind']:<24} {r['per_chip'] / 2 ** 20:8.2f} MiB")
    return "\n".join(out)


def parse_mesh(text: str) -> tuple[int, int]:
    axes = dict(data=1, fsdp=1)
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in axes or not v.strip().isdigit() or int(v) < 1:
            raise ValueError(f"--mesh={text!r}: expected data=D,fsdp=F with positive integers")
        axes[k.strip()] = int(v)
    return axes["data"], axes["fsdp"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b", help=f"{', '.join(MODELS)} or a config.json path")
    ap.add_argument("--mesh", default="data=1,fsdp=1")
    ap.add_argument("--chip", choices=sorted(CHIPS), default="v5e")
    ap.add_argument("--batch", type=int, default=64, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--adapter", default="houlsby", choices=ADAPTERS,
                    help="'none' = full fine-tuning")
    ap.add_argument("--bottleneck", type=int, default=64, help="bottleneck r (LoRA rank for lora)")
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16", help="frozen params and compute")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--remat", choices=("none", "full"), default="none")
    ap.add_argument("--head", choices=("lm", "cls"), default=None, help="default: lm for Llama, cls for BERT")
    ap.add_argument("--attention", choices=("xla", "flash"), default="xla",
                    help="xla: scores kept (what jax.nn.dot_product_attention runs); flash: O + logsumexp only")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step (train.accum_steps)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        data, fsdp = parse_mesh(args.mesh)
        p = plan(args.model, data, fsdp, args.chip, args.batch, args.seq, args.adapter, args.bottleneck,
                 args.dtype, args.mfu, args.remat, args.head, args.attention, args.accum)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(p, indent=1, default=str) if args.json else render(p))
    return p


if __name__ == "__main__":
    main()
