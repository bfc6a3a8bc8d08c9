"""Bottleneck adapters: parameter formulas, identity at init, and equality with AdapterHub."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adapters_jax.adapters import bottleneck as bn
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.interop.adapterhub import bottleneck_from_torch
from adapters_jax.model import param_count, place_base
from tests.conftest import SENTENCES
from tests.bf16_checks import assert_tree_close_to_float64, bf16_adapter_case, dot_operand_types


def adapter_params(params, name="adapter"):
    flat = traverse_util.flatten_dict(params)
    return {k: v for k, v in flat.items() if name in k}


def test_one_adapter_has_2dr_plus_d_plus_r_params():
    d, r = 48, 7
    x = jnp.ones((1, 3, d))
    for use_bias, expected in ((True, 2 * d * r + d + r), (False, 2 * d * r)):
        cfg = bn.BottleneckConfig(bottleneck_dim=r, use_bias=use_bias)
        p = bn.BottleneckAdapter(cfg).init(jax.random.PRNGKey(0), x, x, None)
        assert param_count(p) == expected


def test_houlsby_on_bert_base_is_4Ldr():
    config = BertConfig()  # d=768, L=12
    spec = spec_from_config("houlsby", bottleneck_dim=64, use_bias=False)
    shapes = jax.eval_shape(lambda: BertModel(config, filler=spec).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    assert param_count(adapter_params(shapes)) == 4 * 12 * 768 * 64 == 2_359_296


def _adapted(minilm, spec, seed=0):
    model = BertModel(minilm.config, filler=spec)
    enc = minilm.tokenizer(SENTENCES, max_length=48)
    init = model.init(jax.random.PRNGKey(seed), enc.input_ids, enc.attention_mask)["params"]
    return model, place_base(init, minilm.params), enc


def _run(model, params, enc):
    return np.asarray(model.apply({"params": params}, enc.input_ids, enc.attention_mask,
                                  enc.token_type_ids)["last_hidden_state"])


@pytest.mark.parametrize("options", [
    dict(method="houlsby", init="zero_up"),
    dict(method="pfeiffer", init="zero_up"),
    dict(method="parallel", parallel_sites=("attn", "ffn")),  # mam init: zero up projection
    dict(method="houlsby", adapter_drop=6),  # AdapterDrop over every layer
])
def test_exact_identity_at_init(minilm, options):
    options = dict(options)
    spec = spec_from_config(options.pop("method"), bottleneck_dim=32, **options)
    model, params, enc = _adapted(minilm, spec)
    assert np.array_equal(_run(model, params, enc), np.asarray(minilm(SENTENCES, max_length=48)["last_hidden_state"]))


def test_near_identity_init_changes_output_by_less_than_1e3(minilm):
    spec = spec_from_config("houlsby", bottleneck_dim=64, init="near_identity", init_std=1e-3)
    model, params, enc = _adapted(minilm, spec)
    base = np.asarray(minilm(SENTENCES, max_length=48)["last_hidden_state"], np.float64)
    got = _run(model, params, enc)
    rel = np.linalg.norm(got - base) / np.linalg.norm(base)
    assert 0 < rel < 1e-3


# AdapterHub config name -> (our preset, options giving the same architecture)
ORACLE_CASES = {
    "seq_bn": ("pfeiffer", dict(reduction_factor=16)),
    "double_seq_bn": ("houlsby", dict(reduction_factor=16)),
    "par_bn": ("parallel", dict(reduction_factor=2)),
}


@pytest.mark.parametrize("hub_name", sorted(ORACLE_CASES))
def test_matches_adapterhub_counts_and_outputs(minilm, torch_minilm, hub_name):
    adapters = pytest.importorskip("adapters")
    torch = pytest.importorskip("torch")
    ref = copy.deepcopy(torch_minilm)
    adapters.init(ref)
    ref.add_adapter("task", config=hub_name)
    ref.train_adapter("task")
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial weights everywhere, zero-initialised up projections included
        for n, p in ref.named_parameters():
            if ".adapters.task." in n:
                p.normal_(0, 0.05)
    ref.set_active_adapters("task")
    ref.eval()
    hub_count = sum(p.numel() for p in ref.parameters() if p.requires_grad)

    preset, options = ORACLE_CASES[hub_name]
    spec = spec_from_config(preset, name="task", **options)
    model, params, enc = _adapted(minilm, spec)
    assert param_count(adapter_params(params, "task")) == hub_count

    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ours = bottleneck_from_torch(state, "task")
    flat = traverse_util.flatten_dict(params)
    for path, value in traverse_util.flatten_dict(ours).items():
        assert flat[path].shape == value.shape, path
        flat[path] = jnp.asarray(value)
    got = _run(model, traverse_util.unflatten_dict(flat), enc)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(enc.input_ids).long(),
                   attention_mask=torch.tensor(enc.attention_mask).long(),
                   token_type_ids=torch.tensor(enc.token_type_ids).long()).last_hidden_state.numpy()
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("options, needle", [
    (dict(method="bottleneck", bottleneck_sites=("after_everything",)), "adapter site 'after_everything' is unknown"),
    (dict(method="houlsby", layers="2-9"), "adapter layer 6 is out of range"),
    (dict(method="houlsby", bottleneck_dim=999), "adapter.bottleneck_dim=999 exceeds the model width"),
    (dict(method="houlsby", bottleneck_dim=0), "adapter.bottleneck_dim=0 must be > 0"),
    (dict(method="houlsby", activation="softplus"), "adapter.activation='softplus'"),
    (dict(method="houlsby", bottelneck_dim=8), "adapter.bottelneck_dim is not an option"),
    (dict(method="houlsbie"), "adapter.method='houlsbie' is unknown"),
    (dict(method="parallel", parallel_sites=("ffm",)), "adapter.parallel_sites"),
    (dict(method="houlsby", layers="first"), "adapter.layers='first'"),
])
def test_bad_specs_fail_with_one_line_naming_the_field(minilm, options, needle):
    options = dict(options)
    with pytest.raises(ValueError) as err:
        spec = spec_from_config(options.pop("method"), **options)
        spec.validate(minilm.config.num_layers, minilm.config.hidden_size,
                      ("attn_adapter", "ffn_adapter", "query", "key", "value", "attn_out", "ffn_in", "ffn_out"))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bf16_input_is_projected_in_bf16_and_kept_in_bf16():
    """A bf16 backbone hands the adapter bf16 sublayer outputs: the down projection multiplies
    them as they are (float32 accumulation), so its backward keeps z in bf16, not a float32
    copy; the result matches a float64 evaluation of the same parameters to bf16 rounding."""
    from jax._src.ad_checkpoint import saved_residuals
    cfg = bn.BottleneckConfig(bottleneck_dim=16, init="houlsby", dropout=0.0)
    adapter = bn.BottleneckAdapter(cfg)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.bfloat16)  # [B, T, D] sublayer output
    x = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)  # the block input (residual)
    params = adapter.init(jax.random.PRNGKey(0), z, x, None)["params"]
    params = jax.tree.map(lambda p: p * 30.0, params)  # far from identity, so the bottleneck counts
    out = adapter.apply({"params": params}, z, x, None)
    assert out.dtype == jnp.float32
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        z64, x64 = np.asarray(z, np.float64), np.asarray(x, np.float64)
        h = z64 @ p64["down"]["kernel"] + p64["down"]["bias"]
        up = np.asarray(bn.ACTIVATIONS[cfg.activation](jnp.asarray(h))) @ p64["up"]["kernel"] + p64["up"]["bias"]
        want = up + z64 + x64  # Houlsby: adapter residual, then the block's residual (no LayerNorm here)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2 ** -6 * np.abs(want).max())

    def loss(params):
        return adapter.apply({"params": params}, z, x, None).sum()
    kept = [a for a, _ in saved_residuals(loss, params) if a.shape == z.shape]
    assert [a.dtype for a in kept] == [jnp.bfloat16], [a.dtype for a in kept]


def test_bf16_adapter_gradients_match_float64_and_every_dot_is_bf16():
    """In a bf16 backbone both projections multiply in bf16 with float32 accumulation, forward
    and backward: the gradients of z and of all four parameters match float64 autodiff of the
    adapter's formula to bf16 rounding, and on XLA:CPU every dot (forward; dz, dh, dW_down,
    dW_up) is bf16 x bf16, the form its fast kernels take. A float32 up projection made dh and
    dW_up float32 dots (the latter on a transposed copy of the cotangent)."""
    cfg = bn.BottleneckConfig(bottleneck_dim=16, init="houlsby", activation="swish", dropout=0.0)
    adapter = bn.BottleneckAdapter(cfg)
    z, x, cot, params = bf16_adapter_case(adapter, (2, 8, 64), seed=1, param_scale=30.0)

    def loss(params, z):
        return jnp.sum(adapter.apply({"params": params}, z, x, None) * jnp.asarray(cot, jnp.float32))
    got = jax.grad(loss, argnums=(0, 1))(params, z)
    with jax.enable_x64(True):
        def loss64(p, z):
            h = jax.nn.silu(z @ p["down"]["kernel"] + p["down"]["bias"])  # [B, T, r]
            return jnp.sum((h @ p["up"]["kernel"] + p["up"]["bias"] + z + x.astype(np.float64)) * cot)
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        want = jax.grad(loss64, argnums=(0, 1))(p64, jnp.asarray(np.asarray(z, np.float64)))
        want = jax.tree.map(np.asarray, want)
    assert_tree_close_to_float64(got, want)
    if jax.default_backend() == "cpu":
        types = dot_operand_types(jax.grad(loss, argnums=(0, 1)), params, z)
        # five: the loss is linear in the up projection's output, so XLA drops that forward dot
        assert len(types) >= 5 and set(types) == {"bf16xbf16"}, types


@pytest.mark.parametrize("preset", ["pfeiffer", "parallel"])
def test_bf16_backbone_adapters_on_float32_inputs_use_bf16_dots(preset):
    """Pfeiffer's adapter reads the block's LayerNorm output and the parallel adapter the
    residual stream, both float32 in a bf16 backbone: the backbone's compute dtype is taken from
    its sublayer output (bf16), so their projections are bf16 dots too (they were float32 dots).
    Gradients of both inputs and every parameter match the same adapter evaluated in float64."""
    from adapters_jax.adapters import presets
    cfg = getattr(presets, preset)()[0].config
    rng = np.random.default_rng(2)
    h_out = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.bfloat16)  # [B, T, D] the sublayer output
    x = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)  # the sublayer input (residual stream)
    cot = rng.normal(size=(2, 8, 64))
    ln = lambda v: (v - v.mean(-1, keepdims=True)) / jnp.sqrt(v.var(-1, keepdims=True) + 1e-5)  # the block's LN
    adapter = bn.BottleneckAdapter(cfg)
    params = adapter.init(jax.random.PRNGKey(0), h_out, x, ln)["params"]
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(0, 0.3, p.shape), p.dtype), params)

    def loss(params, h_out, x, cot, adapter=adapter):
        return jnp.sum(adapter.apply({"params": params}, h_out, x, ln).astype(cot.dtype) * cot)
    got = jax.grad(loss, argnums=(0, 1, 2))(params, h_out, x, jnp.asarray(cot, jnp.float32))
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
        adapter64 = bn.BottleneckAdapter(cfg, dtype=jnp.float64)
        want = jax.grad(lambda p, h, v: loss(p, h, v, f64(cot), adapter64), argnums=(0, 1, 2))(
            jax.tree.map(f64, params), f64(h_out), f64(x))
        want = jax.tree.map(np.asarray, want)
    assert_tree_close_to_float64(got, want)
    if jax.default_backend() == "cpu":
        types = dot_operand_types(jax.grad(loss, argnums=(0, 1, 2)), params, h_out, x,
                                   jnp.asarray(cot, jnp.float32))
        assert len(types) >= 5 and set(types) == {"bf16xbf16"}, types


@pytest.mark.parametrize("scaling", ["learned", "channel"])
def test_bf16_learned_scaling_gradient_matches_float64_over_many_rows(scaling):
    """A learned scaling's gradient sums over every row (32 x 128 here, where XLA:CPU's bf16
    sums were 4.5% off): in a bf16 backbone it is summed in float32, and matches float64
    autodiff of the adapter's formula to bf16 rounding, as do the other parameters'."""
    cfg = bn.BottleneckConfig(bottleneck_dim=8, init="houlsby", activation="swish", dropout=0.0, scaling=scaling)
    adapter = bn.BottleneckAdapter(cfg)
    z, x, cot, params = bf16_adapter_case(adapter, (32, 128, 16), seed=3, param_scale=30.0)

    def loss(params, z):
        return jnp.sum(adapter.apply({"params": params}, z, x, None) * jnp.asarray(cot, jnp.float32))
    got = jax.grad(loss)(params, z)
    with jax.enable_x64(True):
        def loss64(p, z):
            h = jax.nn.silu(z @ p["down"]["kernel"] + p["down"]["bias"])  # [B, T, r]
            up = (h @ p["up"]["kernel"] + p["up"]["bias"]) * p["scaling"]
            return jnp.sum((up + z + x.astype(np.float64)) * cot)
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        want = jax.tree.map(np.asarray, jax.grad(loss64)(p64, jnp.asarray(np.asarray(z, np.float64))))
    assert_tree_close_to_float64(got, want, rel=2 ** -7)


@pytest.mark.parametrize("activation", ["swish", "relu", "gelu", "tanh"])
def test_float32_gradients_match_float64_and_only_the_pre_activation_is_kept(activation):
    """The up projection recomputes f(pre) in its backward (`activated_dense`): gradients of z
    and of all four parameters match float64 autodiff of the adapter's formula, and the only
    [B, T, r] array kept for the backward is pre (autodiff also kept f(pre) and, for swish,
    the sigmoid)."""
    from jax._src.ad_checkpoint import saved_residuals
    cfg = bn.BottleneckConfig(bottleneck_dim=16, init="houlsby", activation=activation, dropout=0.0)
    adapter = bn.BottleneckAdapter(cfg)
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)  # [B, T, D]
    x = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)
    cot = rng.normal(size=(2, 8, 64))
    params = jax.tree.map(lambda p: p * 30.0, adapter.init(jax.random.PRNGKey(0), z, x, None)["params"])

    def loss(params, z):
        return jnp.sum(adapter.apply({"params": params}, z, x, None) * jnp.asarray(cot, jnp.float32))
    got = jax.grad(loss, argnums=(0, 1))(params, z)
    with jax.enable_x64(True):
        def loss64(p, z):
            h = bn.ACTIVATIONS[activation](z @ p["down"]["kernel"] + p["down"]["bias"])  # [B, T, r]
            return jnp.sum((h @ p["up"]["kernel"] + p["up"]["bias"] + z + x.astype(np.float64)) * cot)
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        want = jax.tree.map(np.asarray, jax.grad(loss64, argnums=(0, 1))(p64, jnp.asarray(np.asarray(z, np.float64))))
    assert_tree_close_to_float64(got, want, rel=1e-5)
    kept = [a for a, _ in saved_residuals(loss, params, z) if a.shape == (2, 8, 16)]
    assert len(kept) == 1, [a.shape for a in kept]


def _adapter_stack_bytes(adapters: int) -> int:
    """XLA's temporary bytes for the gradient of `adapters` float32 Houlsby adapters in a row
    (each output is the next one's input), with respect to their parameters."""
    cfg = bn.BottleneckConfig(bottleneck_dim=64, activation="swish", dropout=0.0)
    adapter = bn.BottleneckAdapter(cfg)
    z = jnp.zeros((512, 64), jnp.float32)  # [N, D]
    params = [adapter.init(jax.random.PRNGKey(i), z, z, None)["params"] for i in range(adapters)]

    def loss(params, z):
        for p in params:
            z = adapter.apply({"params": p}, z, z, None)
        return z.sum()
    return jax.jit(jax.grad(loss)).lower(params, z).compile().memory_analysis().temp_size_in_bytes


def test_compiled_adapter_backward_holds_its_input_and_pre_activation_only():
    """Per adapter, the compiled step holds its input (for dW_down, 4 D bytes a row) and pre
    (4 r bytes a row). Autodiff also held f(pre) and the sigmoid (8 r more), and so did
    `jax.checkpoint` of the activation: XLA:CPU scheduled the recomputation in the forward."""
    per_adapter = (_adapter_stack_bytes(5) - _adapter_stack_bytes(3)) / 2
    assert per_adapter < 4 * 512 * (64 + 64 + 64), per_adapter / 512
