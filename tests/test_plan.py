"""experiments.plan against measurements: real train-state bytes, XLA's FLOP count of the compiled
step, JAX's saved residuals, and per-device bytes of fsdp-sharded arrays on an 8-device CPU mesh.

Run directly (`python -m tests.test_plan`, with 8 host devices) it is the sharding check's subprocess.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adapters_jax import optim, parallel, peft, rules, trainer
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.backbones import attention, mixed_dense
from adapters_jax.backbones.bert import BertModel
from adapters_jax.backbones.llama import LlamaModel
from adapters_jax.heads import ClassificationHead, default_pooling
from adapters_jax.model import AdaptedModel
from experiments import plan as planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R_TINY = 16
FLOPS_TOL = 0.10  # XLA also counts elementwise work (norms, softmax, rotary, dropout bits, AdamW)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def build(name, head, adapter="houlsby", r=R_TINY, batch=2, seq=16, dtype=jnp.float32, init=True):
    """Our own model/params/labels/tx, built the way training does (not through the planner)."""
    family, cfg = planner.load_config(name)
    spec = spec_from_config(adapter, bottleneck_dim=r) if adapter != "none" else None
    backbone = (LlamaModel if family == "llama" else BertModel)(cfg, filler=spec, dtype=dtype)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32)
    if head == "lm":
        model, inputs = backbone, ids
    else:
        # every row of the last layer, as the plan counts it (it is an upper bound for CLS heads)
        model = AdaptedModel(backbone, ClassificationHead(2, pooling=default_pooling(backbone), dtype=dtype),
                             skip_unread_rows=False)
        inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                  "labels": rng.integers(0, 2, batch).astype(np.int32)}
    make = lambda: model.init(jax.random.PRNGKey(0), inputs)["params"]
    params = make() if init else jax.eval_shape(make)
    labels = rules.labels_for(params, peft.make_rules([spec.name] if spec else [], train_all=spec is None))
    tx, _ = optim.make(params, labels, lr=1e-3, total_steps=10)
    return model, inputs, params, labels, tx


def lm_train_step(model, tx):
    """The causal-LM twin of trainer.make_train_step: grad w.r.t. the trainable tree only, CE on every token."""
    def loss_fn(trainable, frozen, ids):
        logits = model.apply({"params": peft.merge(trainable, frozen)}, ids)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.roll(ids, -1, 1)).mean()

    def step(state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(state.trainable, state.frozen, ids)
        updates, opt_state = tx.update(peft.merge(grads, state.frozen), state.opt_state, state.params)
        new = optax.apply_updates(state.trainable, trainer._like(updates, state.trainable))
        return state.replace(step=state.step + 1, trainable=new, opt_state=opt_state), loss
    return step


def to_dtype(state, frozen_dtype):
    return state.replace(frozen=jax.tree_util.tree_map(lambda x: x.astype(frozen_dtype), state.frozen))


# --------------------------------------------------------------------------- exact bytes

@pytest.mark.parametrize("head,dtype", [("cls", "bf16"), ("lm", "bf16"), ("cls", "f32")])
def test_state_bytes_equal_a_real_train_state(head, dtype):
    model, inputs, params, labels, tx = build("tiny-llama", head)
    state = trainer.create_state(params, labels, tx, jax.random.PRNGKey(1))
    state = to_dtype(state, jnp.bfloat16 if dtype == "bf16" else jnp.float32)
    p = planner.plan("tiny-llama", batch=2, seq=16, adapter="houlsby", bottleneck=R_TINY, dtype=dtype, head=head)
    m = p["memory_per_chip"]
    assert m["frozen_params"] == nbytes(state.frozen)
    assert m["trainable_params"] == nbytes(state.trainable)
    assert m["optimizer"] == nbytes(state.opt_state)
    assert m["state_misc"] == nbytes(state.step) + nbytes(state.rng)
    loss = (lambda tr: model.apply({"params": peft.merge(tr, state.frozen)}, inputs)["logits"].sum()) if head == "lm" \
        else (lambda tr: model.apply({"params": peft.merge(tr, state.frozen)}, inputs).sum())
    assert m["gradients"] == nbytes(jax.eval_shape(jax.grad(loss), state.trainable))
    assert p["params"]["trainable"] == sum(x.size for x in jax.tree_util.tree_leaves(state.trainable))
    assert p["params"]["total"] == sum(x.size for x in jax.tree_util.tree_leaves(params))
    # AdamW: 2 f32 moments per trainable parameter plus a few int32 step counters
    assert m["optimizer"] == 8 * p["params"]["trainable"] + 4 * p["params"]["optimizer_counters"]
    assert 0 < p["params"]["optimizer_counters"] <= 4


def test_llama2_7b_parameter_count():
    p = planner.plan("llama2-7b", data=2, fsdp=8, batch=64, seq=2048)
    assert p["params"]["frozen"] == 6_738_415_616  # Llama-2-7B as published
    assert p["params"]["trainable"] == 32 * 2 * (2 * 4096 * 64 + 64 + 4096)  # Houlsby r=64, two sites per layer


# --------------------------------------------------------------------------- FLOPs vs XLA

def xla_flops(name, head, adapter, batch, seq):
    model, inputs, params, labels, tx = build(name, head, adapter, batch=batch, seq=seq, init=False)
    state = jax.eval_shape(lambda p: trainer.create_state(p, labels, tx, jax.random.PRNGKey(1)), params)
    step = lm_train_step(model, tx) if head == "lm" else trainer.make_train_step(model, tx)
    cost = jax.jit(step).lower(state, inputs).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("name,head,batch,seq", [("tiny-llama", "cls", 4, 64), ("tiny-llama", "lm", 4, 64),
                                                 ("minilm", "cls", 4, 128)])
def test_flops_agree_with_xla_cost_analysis(name, head, batch, seq):
    p = planner.plan(name, batch=batch, seq=seq, adapter="houlsby", bottleneck=R_TINY, dtype="f32", head=head)
    peft_xla, full_xla = (xla_flops(name, head, a, batch, seq) for a in ("houlsby", "none"))
    peft_plan, full_plan = p["flops"]["model"], p["flops_full_ft"]["model"]
    print(f"{name}/{head}: PEFT xla {peft_xla:.4g} plan {peft_plan:.4g} ({peft_xla / peft_plan - 1:+.2%}); "
          f"full xla {full_xla:.4g} plan {full_plan:.4g} ({full_xla / full_plan - 1:+.2%})")
    for xla, est in ((peft_xla, peft_plan), (full_xla, full_plan)):
        assert 0.99 <= xla / est <= 1 + FLOPS_TOL
    assert abs((peft_xla / full_xla) / (peft_plan / full_plan) - 1) < 0.05


# --------------------------------------------------------------------------- activations vs JAX's residuals

def residual_bytes(name, head, adapter, batch, seq, dtype):
    from jax._src.ad_checkpoint import saved_residuals  # what the backward pass keeps (jax 0.10)
    model, inputs, params, labels, _ = build(name, head, adapter, batch=batch, seq=seq, dtype=dtype, init=False)
    params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), params)
    trainable, frozen = peft.split(params, labels)
    frozen = jax.tree_util.tree_map(lambda x: x.astype(dtype), frozen)

    def loss(tr):
        merged = {"params": peft.merge(tr, frozen)}
        if head == "lm":
            logits = model.apply(merged, inputs)["logits"].astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(inputs, -1, 1)).mean()
        return model.apply(merged, inputs, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}).sum()
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, _ in saved_residuals(loss, trainable))


MINILM_NO_DROPOUT = dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                         num_attention_heads=12, intermediate_size=1536, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("name,head,adapter,dtype", [
    ("tiny-llama", "lm", "houlsby", "bf16"), ("tiny-llama", "cls", "houlsby", "f32"),
    ("tiny-llama", "lm", "none", "bf16"), ("tiny-llama", "cls", "none", "f32"), ("minilm", "cls", "houlsby", "bf16"),
    ("minilm", "cls", "none", "bf16"),
    ("minilm-no-dropout", "cls", "houlsby", "f32")])
def test_saved_activation_bytes_equal_jax_residuals(name, head, adapter, dtype, tmp_path, monkeypatch):
    # the planner plans accelerator runs, which take flax's standard path; XLA:CPU's canonical
    # paths (mixed_dense, softmax_pv; bf16, and float32 attention) keep less and are checked in
    # their own tests
    for module in (attention, mixed_dense):
        monkeypatch.setattr(module, "use_cpu_bf16_kernels", lambda dtype: False)
    monkeypatch.setattr(attention, "_cpu_float32", lambda dtype: False)
    if name == "minilm-no-dropout":  # also exercises the config.json path
        (tmp_path / "config.json").write_text(json.dumps(MINILM_NO_DROPOUT))
        name = str(tmp_path / "config.json")
    seq, jd = 32, {"bf16": jnp.bfloat16, "f32": jnp.float32}[dtype]
    measured = (residual_bytes(name, head, adapter, 4, seq, jd)
                - residual_bytes(name, head, adapter, 2, seq, jd)) / (2 * seq)  # per token
    p = planner.plan(name, batch=2, seq=seq, adapter=adapter, bottleneck=R_TINY, dtype=dtype, head=head)
    estimate = sum(p["saved_per_token"]["layers"]) + p["saved_per_token"]["top"]
    print(f"{os.path.basename(name)}/{head}/{adapter}/{dtype}: JAX saves {measured:.1f} B/token, planner {estimate}")
    assert abs(estimate / measured - 1) < 0.01


# --------------------------------------------------------------------------- fsdp layout on 8 devices

def sharding_check() -> dict:
    """Per-device bytes of the frozen params placed with parallel.state_shardings(shard_frozen=True)."""
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for dtype, jd in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
        _, _, params, labels, tx = build("tiny-llama", "cls")
        state = to_dtype(trainer.create_state(params, labels, tx, jax.random.PRNGKey(1)), jd)
        for fsdp in (2, 8):
            mesh = parallel.make_mesh(fsdp)
            placed = parallel.put_state(state, parallel.state_shardings(state, mesh, shard_frozen=True))
            dev0 = jax.devices()[0]
            on0 = lambda tree: sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree)
                                   for s in x.addressable_shards if s.device == dev0)
            p = planner.plan("tiny-llama", data=8 // fsdp, fsdp=fsdp, batch=8, seq=16, bottleneck=R_TINY,
                             dtype=dtype, head="cls")
            out[f"{dtype}_data{8 // fsdp}_fsdp{fsdp}"] = dict(
                jax_frozen=on0(placed.frozen), plan_frozen=p["memory_per_chip"]["frozen_params"],
                jax_trainable=on0(placed.trainable), plan_trainable=p["memory_per_chip"]["trainable_params"],
                jax_opt=on0(placed.opt_state), plan_opt=p["memory_per_chip"]["optimizer"],
                unsharded=nbytes(state.frozen))
    return out


def test_fsdp_per_device_bytes_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "tests.test_plan"], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for name, r in results.items():
        print(name, r)
        assert r["jax_frozen"] == r["plan_frozen"] < r["unsharded"], name
        assert (r["jax_trainable"], r["jax_opt"]) == (r["plan_trainable"], r["plan_opt"]), name


# --------------------------------------------------------------------------- command line

def test_cli_json_table_config_json_and_errors(tmp_path, capsys):
    p = planner.main(["--model", "tiny-llama", "--mesh", "data=2,fsdp=4", "--chip", "h100", "--batch", "8",
                      "--seq", "64", "--json"])
    assert json.loads(capsys.readouterr().out)["memory_total"] == p["memory_total"]
    planner.main(["--model", "minilm", "--mesh", "data=4", "--batch", "8", "--seq", "128", "--remat", "full"])
    table = capsys.readouterr().out
    assert "FITS" in table and "P()" in table and "PEFT / full FT" in table
    hf = dict(model_type="llama", vocab_size=999, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=344, max_position_embeddings=512)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from_json = planner.plan(str(tmp_path / "config.json"), batch=8, seq=64)
    assert from_json["params"] == planner.plan("tiny-llama", batch=8, seq=64)["params"]
    for bad in (["--mesh", "data=two"], ["--model", "nope"], ["--batch", "7", "--mesh", "data=2"]):
        with pytest.raises(SystemExit):
            planner.main(["--model", "tiny-llama", *bad])
        assert capsys.readouterr().err.startswith("error:")


def test_remat_trades_activations_for_flops():
    kw = dict(model="llama2-7b", data=2, fsdp=8, chip="v5e", batch=64, seq=2048)
    base, remat = planner.plan(**kw), planner.plan(**kw, remat="full")
    assert remat["activation_detail"]["total"] < base["activation_detail"]["total"] / 4
    assert remat["flops"]["hardware"] > base["flops"]["hardware"] == base["flops"]["model"]
    assert base["flops"]["weight_grad"] < 0.01 * base["flops_full_ft"]["weight_grad"]


if __name__ == "__main__":
    print(json.dumps(sharding_check()))
