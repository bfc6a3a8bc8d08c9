"""Compacter / Compacter++: the paper's parameter count, equality with AdapterHub, the shared rule."""
import itertools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adapters_jax.adapters import compacter as cp
from adapters_jax.adapters.bottleneck import BottleneckAdapter, BottleneckConfig
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.backbones import bert_weights
from adapters_jax.backbones.bert import BertConfig, BertModel
from tests.bf16_checks import assert_tree_close_to_float64, bf16_adapter_case, dot_operand_types

SITES = ("attn_adapter", "ffn_adapter", "shared_adapters")


def _shapes(config, spec):
    model = BertModel(config, filler=spec)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]


def _random_params(config, spec, seed=0):
    """Random values in the model's parameter shapes (faster than compiling flax's init)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.1 * rng.normal(size=s.shape), jnp.float32),
        _shapes(config, spec))


def _adapter_flat(params):
    flat = traverse_util.flatten_dict(params)
    return {k: v for k, v in flat.items() if any(s in k for s in SITES)}


def _count(flat):
    return sum(int(np.prod(v.shape)) for v in flat.values())


@pytest.mark.parametrize("preset, adapters_per_layer", [("compacter", 2), ("compacter++", 1)])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("use_bias", [False, True])
def test_parameter_count_is_the_papers_formula(preset, adapters_per_layer, k, use_bias):
    # Mahabadi et al. 2021, sec. 3: a PHM layer d -> r holds n rank-k factors B_i = s_i t_i^T with
    # s_i in R^{d/n x k}, t_i in R^{k x r/n}: n (k d/n + k r/n) = k (d + r). Each adapter has a down
    # and an up layer; the A_i (n x n x n) are shared by the whole model. With L layers and m
    # adapters per layer: n^3 + 2 m L k (d + r) weights (= n^3 + 4 L k (d + r) for Compacter,
    # m = 2), plus m L (d + r) biases.
    d, L, n, factor = 768, 12, 4, 32  # BERT-base
    r = d // factor
    spec = spec_from_config(preset, reduction_factor=factor, phm_rank=k, use_bias=use_bias)
    shapes = _shapes(BertConfig(), spec)
    expected = n ** 3 + 2 * adapters_per_layer * L * k * (d + r) + use_bias * adapters_per_layer * L * (d + r)
    assert _count(_adapter_flat(shapes)) == expected
    if preset == "compacter" and k == 1:
        assert expected == (57_088 if use_bias else 38_080)


def test_init_draws_rule_from_phm_init_range_and_w_glorot_uniform():
    d, r = 768, 32
    cfg = cp.CompacterConfig(bottleneck_dim=r)
    p = cp.PHMDense(r, cfg).init(jax.random.PRNGKey(0), jnp.ones((1, d)), jnp.ones((4, 4, 4)))["params"]
    left = np.asarray(p["W_left"])  # [4, 192, 1], xavier on each [192, 1] slice
    bound = np.sqrt(6 / (d // 4 + 1))
    assert np.abs(left).max() <= bound and abs(left.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert not np.asarray(p["bias"]).any()
    rule = np.asarray(cp.CompacterShared(cfg).init(jax.random.PRNGKey(1))["params"]["phm_rule"])
    assert rule.shape == (4, 4, 4) and 0.5e-4 < rule.std() < 2e-4


def _flag_cases():
    seq = itertools.product((False, True), (True, False, "post_add"), (False, True), (False, True), (False, True))
    for olb, rbl, arbl, ln, ola in seq:
        if rbl == "post_add" and not olb:
            continue  # no residual at all: AdapterHub fails on it too
        yield dict(original_ln_before=olb, residual_before_ln=rbl, adapter_residual_before_ln=arbl,
                   ln_before=ln, ln_after=ln, original_ln_after=ola)
    yield dict(is_parallel=True, scaling=4.0)
    yield dict(is_parallel=True, ln_after=True, scaling="learned")
    yield dict(scaling="channel")


def test_phm_dim_one_is_a_bottleneck_adapter_for_every_flag_combination():
    # With n = 1 and a full W, H = A_1 W_1 is a dense kernel: the wiring around the projections
    # must then be BottleneckAdapter's, flag for flag.
    d, r = 8, 4
    rng = np.random.default_rng(0)
    h_out, x = (jnp.asarray(rng.normal(size=(2, 3, d)), jnp.float32) for _ in range(2))
    norm = lambda y: (y - y.mean(-1, keepdims=True)) / (y.std(-1, keepdims=True) + 1e-3) * 0.7 + 0.1
    for flags in _flag_cases():
        ref_cfg = BottleneckConfig(bottleneck_dim=r, activation="gelu", **flags)
        ref = BottleneckAdapter(ref_cfg).init(jax.random.PRNGKey(0), h_out, x, norm)["params"]
        ref = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.normal(size=v.shape), jnp.float32), ref)
        cfg = cp.CompacterConfig(bottleneck_dim=r, activation="gelu", phm_dim=1, factorized_phm_W=False,
                                 shared_phm_rule=False, **flags)
        ours = {k: v for k, v in ref.items() if k not in ("down", "up")}
        for proj in ("down", "up"):
            ours[proj] = {"W": ref[proj]["kernel"][None], "bias": ref[proj]["bias"], "phm_rule": jnp.ones((1, 1, 1))}
        want = BottleneckAdapter(ref_cfg).apply({"params": ref}, h_out, x, norm)
        got = cp.CompacterAdapter(cfg).apply({"params": ours}, h_out, x, norm)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(flags))


def _tiny_hf_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=40)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


_HUB = re.compile(r"encoder\.layer\.(\d+)\.(attention\.output|output)\.adapters\.x\.adapter_(down\.0|up)\.(\w+)")


def _hub_to_ours(name):
    """AdapterHub parameter name -> our parameter path."""
    if name == "shared_parameters.x.phm_rule":
        return ("shared_adapters", "x", "phm_rule")
    m = _HUB.fullmatch(name)
    assert m, name
    site = "attn_adapter" if m.group(2) == "attention.output" else "ffn_adapter"
    leaf = {"b": "bias"}.get(m.group(4), m.group(4))
    return ("encoder", f"layer_{m.group(1)}", site, "x", m.group(3).split(".")[0], leaf)


@pytest.mark.parametrize("preset, hub_config", [("compacter", "CompacterConfig"),
                                                ("compacter++", "CompacterPlusPlusConfig")])
def test_matches_adapterhub_counts_and_outputs(tmp_path, preset, hub_config):
    adapters = pytest.importorskip("adapters")
    torch = pytest.importorskip("torch")
    ref = _tiny_hf_bert(tmp_path)
    adapters.init(ref)
    ref.add_adapter("x", config=getattr(adapters, hub_config)(reduction_factor=8))  # r = 8
    ref.train_adapter("x")
    hub = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial values everywhere: rule, factors, biases (zero at init)
        for p in hub.values():
            p.normal_(0, 0.5)
    ref.set_active_adapters("x")
    ref.eval()

    config, base = bert_weights.load(str(tmp_path))
    spec = spec_from_config(preset, name="x", reduction_factor=8)
    flat = traverse_util.flatten_dict(_random_params(config, spec))
    for path, value in traverse_util.flatten_dict(base).items():
        flat[path] = jnp.asarray(value)
    ours = _adapter_flat(traverse_util.unflatten_dict(flat))
    assert _count(ours) == sum(p.numel() for p in hub.values())
    assert {_hub_to_ours(n) for n in hub} == set(ours)
    for n, p in hub.items():
        assert flat[_hub_to_ours(n)].shape == tuple(p.shape), n
        flat[_hub_to_ours(n)] = jnp.asarray(p.detach().numpy())

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, size=(3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, 8:], mask[1, 8:] = 0, 0
    got = np.asarray(jax.jit(BertModel(config, filler=spec).apply)(
        {"params": traverse_util.unflatten_dict(flat)}, ids, mask)["last_hidden_state"])
    plain = np.asarray(jax.jit(BertModel(config).apply)({"params": base}, ids, mask)["last_hidden_state"])
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).last_hidden_state
    err = np.abs(got - want.numpy()).max()
    assert np.abs(got - plain).max() > 0.1, "the adapters must matter for this comparison to mean anything"
    assert err <= 1e-4, err


def test_rule_is_one_leaf_set_used_by_every_site_of_every_layer():
    config = BertConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=40,
                        max_position_embeddings=20)
    spec = spec_from_config("compacter", name="x", reduction_factor=4)
    model = BertModel(config, filler=spec)
    params = _random_params(config, spec)
    rules = [k for k in traverse_util.flatten_dict(params) if "phm_rule" in k[-1]]
    assert rules == [("shared_adapters", "x", "phm_rule")]
    rule = params["shared_adapters"]["x"]["phm_rule"]
    ids = jnp.arange(2 * 6, dtype=jnp.int32).reshape(2, 6) % 50

    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, cp.CompacterAdapter) and context.method_name == "__call__":
            seen.append(kwargs.get("shared"))
        return next_fun(*args, **kwargs)

    def traced(p):  # every site receives the very array stored at shared_adapters/x/phm_rule
        with nn.intercept_methods(spy):
            model.apply({"params": p}, ids)
        assert len(seen) == 2 * config.num_layers
        assert all(s is p["shared_adapters"]["x"]["phm_rule"] for s in seen)
        return 0

    jax.eval_shape(traced, params)
    run = jax.jit(lambda m, p: m.apply({"params": p}, ids, output_hidden_states=True)["hidden_states"],
                  static_argnums=0)

    # A = 0 (and b = 0) switches off every adapter in every layer at once: the bare encoder comes back.
    def edit(path, v, rule_value):
        if path[-1] == "phm_rule":
            return rule_value
        return jnp.zeros_like(v) if path[-1] == "bias" and any(s in path for s in SITES) else v

    zero = traverse_util.unflatten_dict({k: edit(k, v, jnp.zeros_like(rule))
                                         for k, v in traverse_util.flatten_dict(params).items()})
    base = {k: v for k, v in params.items() if k not in ("shared_adapters",)}
    base = traverse_util.unflatten_dict({k: v for k, v in traverse_util.flatten_dict(base).items()
                                         if not any(s in k for s in SITES)})
    bare = run(BertModel(config), base)
    off = run(model, zero)
    on = run(model, traverse_util.unflatten_dict(
        {k: edit(k, v, rule * 1e3) for k, v in traverse_util.flatten_dict(params).items()}))
    for layer in range(1, config.num_layers + 1):
        np.testing.assert_allclose(off[layer], bare[layer], atol=1e-6)
        assert np.abs(np.asarray(on[layer]) - np.asarray(bare[layer])).max() > 1e-3, layer


@pytest.mark.parametrize("options", [dict(bottleneck_dim=6), dict(reduction_factor=5), dict(phm_dim=3)])
def test_dims_not_divisible_by_phm_dim_fail_with_one_line(options):
    spec = spec_from_config("compacter", **options)
    with pytest.raises(ValueError) as err:
        spec.validate(2, 32, ("attn_adapter", "ffn_adapter"))
    assert "adapter.phm_dim" in str(err.value) and "\n" not in str(err.value)
    config = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=40,
                        max_position_embeddings=20)
    with pytest.raises(ValueError, match="adapter.phm_dim"):
        _shapes(config, spec)


def test_bottleneck_init_options_are_rejected():
    with pytest.raises(ValueError, match="do not apply to compacter"):
        spec_from_config("compacter++", init="zero_up")


def test_bf16_phm_gradients_match_float64_and_token_dots_are_bf16():
    """In a bf16 backbone the PHM products multiply in bf16 with float32 accumulation, as the
    bottleneck's own projections: the gradients of z and of every parameter match the same
    adapter evaluated in float64 (x64 mode) to bf16 rounding, and on XLA:CPU the dots over the
    tokens (forward, dz, dh and the two weight gradients) are bf16 x bf16 (the float32 version
    had none; the small dots that build each PHM weight stay float32)."""
    cfg = cp.CompacterConfig(bottleneck_dim=16, shared_phm_rule=False, phm_init_range=0.5)
    adapter = cp.CompacterAdapter(cfg)
    z, x, cot, params = bf16_adapter_case(adapter, (2, 8, 64), seed=0, param_scale=3.0)

    def loss(params, z, x, cot, adapter=adapter):
        return jnp.sum(adapter.apply({"params": params}, z, x, None).astype(cot.dtype) * cot)
    got = jax.grad(loss, argnums=(0, 1))(params, z, x, jnp.asarray(cot, jnp.float32))
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
        adapter64 = cp.CompacterAdapter(cfg, dtype=jnp.float64)  # the PHM products in float64 too
        want = jax.grad(lambda p, z: loss(p, z, f64(x), f64(cot), adapter64), argnums=(0, 1))(
            jax.tree.map(f64, params), f64(z))
        want = jax.tree.map(np.asarray, want)
        assert want[1].dtype == np.float64
    assert_tree_close_to_float64(got, want)
    if jax.default_backend() == "cpu":
        types = dot_operand_types(jax.grad(loss, argnums=(0, 1)), params, z, x, jnp.asarray(cot, jnp.float32))
        assert types.count("bf16xbf16") >= 5, types
