"""Several named adapters in one model: select (mixed batches), stack and fuse.

Stack and Fuse are compared with AdapterHub's Stack and Fuse; select with running each
task's rows through its own single-adapter model.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adapters_jax.adapters import AdapterSetup, parallel_apply, spec_from_config
from adapters_jax.adapters.fusion import regularization
from adapters_jax.backbones import bert_weights
from adapters_jax.backbones.bert import BertModel
from adapters_jax.model import place_base

NAMES = ("sst", "news", "tweets")


def _tiny(tmp_path, num_layers=2):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=num_layers,
                                  num_attention_heads=4, intermediate_size=37, max_position_embeddings=40)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _inputs(b=6, t=9):
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[4, 3:] = 0
    return ids, mask


def _randomize(params, seed=1, scale=0.1):
    """Random values for every adapter/fusion leaf (zero-initialised up projections included)."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    for k, v in flat.items():
        if any(n in k for n in NAMES + ("fusion",)):
            flat[k] = jnp.asarray(rng.normal(0, scale, v.shape), v.dtype)
    return traverse_util.unflatten_dict(flat)


def _setup_params(model, base, ids, mask, **call):
    init = model.init(jax.random.PRNGKey(0), ids, mask, **call)["params"]
    return _randomize(place_base(init, base))


def test_mixed_batch_equals_each_task_run_alone(tmp_path):
    _tiny(tmp_path)
    config, base = bert_weights.load(str(tmp_path))
    # Different placements: a row whose adapter is absent from a site must pass through it.
    specs = (spec_from_config("houlsby", name=NAMES[0], bottleneck_dim=8),
             spec_from_config("pfeiffer", name=NAMES[1], bottleneck_dim=8, layers="1"),
             spec_from_config("houlsby", name=NAMES[2], bottleneck_dim=8, adapter_drop=1))
    setup = AdapterSetup(specs, composition="select")
    mixed = BertModel(config, filler=setup)
    ids, mask = _inputs()
    task = np.array([0, 2, 1, 1, 0, 2], np.int32)
    params = _setup_params(mixed, base, ids, mask, adapter_ids=task)
    got = np.asarray(mixed.apply({"params": params}, ids, mask, adapter_ids=task)["last_hidden_state"])
    for i, spec in enumerate(specs):
        rows = task == i
        alone = BertModel(config, filler=spec)  # a model that holds only this task's adapter
        want = alone.apply({"params": params}, ids[rows], mask[rows])["last_hidden_state"]
        np.testing.assert_allclose(got[rows], np.asarray(want), atol=1e-5)
    # AdapterHub's Parallel: every adapter on the whole batch, [N, B, T, D]
    apply = lambda p, b: mixed.apply({"params": p}, b["input_ids"], b["attention_mask"],
                                     adapter_ids=b["adapter_ids"])["last_hidden_state"]
    par = parallel_apply(apply, params, {"input_ids": ids, "attention_mask": mask}, len(NAMES))
    for i, spec in enumerate(specs):
        want = BertModel(config, filler=spec).apply({"params": params}, ids, mask)["last_hidden_state"]
        np.testing.assert_allclose(np.asarray(par[i]), np.asarray(want), atol=1e-5)


def test_switching_adapters_or_their_weights_does_not_recompile(tmp_path):
    _tiny(tmp_path)
    config, base = bert_weights.load(str(tmp_path))
    setup = AdapterSetup(tuple(spec_from_config("pfeiffer", name=n, bottleneck_dim=8) for n in NAMES))
    model = BertModel(config, filler=setup)
    ids, mask = _inputs()
    traces = []

    @jax.jit
    def run(params, adapter_ids):
        traces.append(1)  # runs only while tracing
        return model.apply({"params": params}, ids, mask, adapter_ids=adapter_ids)["last_hidden_state"]

    p1 = _setup_params(model, base, ids, mask, adapter_ids=np.zeros(6, np.int32))
    p2 = _randomize(p1, seed=7)  # another set of trained adapters swapped in
    outs = [run(p, np.full(6, i, np.int32)) for p in (p1, p2) for i in range(3)]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], outs[3])


def _hub_model(tmp_path, names, composition):
    adapters = pytest.importorskip("adapters")
    import torch
    from adapters.composition import Fuse, Stack
    model = _tiny(tmp_path, num_layers=2)
    adapters.init(model)
    for n in names:
        model.add_adapter(n, config="double_seq_bn" if composition == "stack" else "seq_bn")
    block = Stack(*names) if composition == "stack" else Fuse(*names)
    if composition == "fuse":
        model.add_adapter_fusion(block)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n or "adapter_fusion_layer" in n:
                p.normal_(0, 0.1)
    model.set_active_adapters(block)
    return model.eval()


def _hub_fusion_tree(state, names, fusion_name):
    """AdapterHub fusion weights -> our `encoder/layer_i/ffn_adapter/<fusion_name>/...` tree."""
    flat = {}
    key = ",".join(names)
    for k, v in state.items():
        if f"adapter_fusion_layer.{key}." not in k:
            continue
        layer = int(k.split("encoder.layer.")[1].split(".")[0])
        part, kind = k.split(f"adapter_fusion_layer.{key}.")[1].split(".")
        leaf = "kernel" if kind == "weight" else "bias"
        flat[("encoder", f"layer_{layer}", "ffn_adapter", fusion_name, part, leaf)] = v.T if leaf == "kernel" else v
    return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("composition, preset", [("stack", "houlsby"), ("fuse", "pfeiffer")])
def test_stack_and_fuse_match_adapterhub(tmp_path, composition, preset):
    import torch
    from adapters_jax.interop.adapterhub import bottleneck_from_torch
    names = ("a", "b")
    ref = _hub_model(tmp_path, names, composition)
    config, base = bert_weights.load(str(tmp_path))
    specs = tuple(spec_from_config(preset, name=n, reduction_factor=16) for n in names)
    setup = AdapterSetup(specs, composition=composition, fusion_name="fusion")
    model = BertModel(config, filler=setup)
    ids, mask = _inputs()
    params = place_base(model.init(jax.random.PRNGKey(0), ids, mask)["params"], base)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    flat = traverse_util.flatten_dict(params)
    loaded = [bottleneck_from_torch(state, n) for n in names]
    if composition == "fuse":
        loaded.append(_hub_fusion_tree(state, names, "fusion"))
    for tree in loaded:
        for path, value in traverse_util.flatten_dict(tree).items():
            assert flat[path].shape == value.shape, path
            flat[path] = jnp.asarray(value)
    assert all(not np.array_equal(v, 0) for v in flat.values())
    ours = model.apply({"params": traverse_util.unflatten_dict(flat)}, ids, mask)["last_hidden_state"]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).last_hidden_state
    assert np.abs(np.asarray(ours) - want.numpy()).max() <= 1e-4


def test_fusion_value_starts_at_identity_and_regularizer_measures_the_drift(tmp_path):
    _tiny(tmp_path)
    config, base = bert_weights.load(str(tmp_path))
    setup = AdapterSetup(tuple(spec_from_config("pfeiffer", name=n, bottleneck_dim=8) for n in NAMES[:2]),
                         composition="fuse")
    model = BertModel(config, filler=setup)
    ids, mask = _inputs()
    params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
    w = params["encoder"]["layer_0"]["ffn_adapter"]["fusion"]["value"]["kernel"]
    np.testing.assert_allclose(np.diag(w), 1.0)
    np.testing.assert_allclose(w[0, 1], 1e-6)
    n_sites = config.num_layers  # pfeiffer: one fused site per layer
    expected = 0.01 * n_sites * (32 * 32 - 32) * 1e-12
    assert abs(float(regularization(params, "fusion")) - expected) < 1e-12
    moved = jax.tree_util.tree_map(lambda x: x, params)
    moved["encoder"]["layer_0"]["ffn_adapter"]["fusion"]["value"]["kernel"] = w + 0.5
    assert float(regularization(moved, "fusion")) > 0.01 * 0.25 * 32 * 32 * 0.9


def test_bad_setups_are_refused():
    with pytest.raises(ValueError, match="composition='mix'"):
        AdapterSetup((spec_from_config("houlsby", name="a"),), composition="mix")
    with pytest.raises(ValueError, match="unique"):
        AdapterSetup((spec_from_config("houlsby", name="a"), spec_from_config("pfeiffer", name="a")))
    setup = AdapterSetup((spec_from_config("prefix", name="a", num_heads=4, head_dim=8), spec_from_config("lora", name="b")))
    with pytest.raises(ValueError, match="activation and dense sites only; 'a' fills the prefix site 'prefix'"):
        setup("prefix", 0)
    stacked = AdapterSetup((spec_from_config("lora", name="a"), spec_from_config("lora", name="b")),
                           composition="stack")
    with pytest.raises(ValueError, match="dense site 'query': composition 'stack' of several LoRA/IA3"):
        stacked("query", 0)


@pytest.mark.parametrize("scaling", [1.0, "channel"])
def test_like_bottlenecks_gather_per_row_weights_and_cost_one_adapter(tmp_path, monkeypatch, scaling):
    """Members with one config take the gathered path: same outputs as each alone, and the
    traced forward holds the base's matmuls plus one adapter's, not N adapters'."""
    from adapters_jax.adapters import select_gather
    _tiny(tmp_path)
    config, base = bert_weights.load(str(tmp_path))
    specs = tuple(spec_from_config("houlsby", name=n, bottleneck_dim=8, scaling=scaling) for n in NAMES)
    mixed = BertModel(config, filler=AdapterSetup(specs, composition="select"))
    ids, mask = _inputs()
    task = np.array([0, 2, 1, -1, 0, 2], np.int32)  # -1: no adapter, the plain model
    params = _setup_params(mixed, base, ids, mask, adapter_ids=task)
    gathered = []
    real = select_gather.select_gathered
    monkeypatch.setattr(select_gather, "select_gathered", lambda *a: gathered.append(1) or real(*a))
    got = np.asarray(mixed.apply({"params": params}, ids, mask, adapter_ids=task)["last_hidden_state"])
    assert len(gathered) == 2 * 2  # both sites of both layers
    for i, spec in enumerate(specs):
        alone = BertModel(config, filler=spec).apply({"params": params}, ids[task == i], mask[task == i])
        np.testing.assert_allclose(got[task == i], np.asarray(alone["last_hidden_state"]), atol=1e-5)
    plain = BertModel(config).apply({"params": base}, ids[task == -1], mask[task == -1])
    np.testing.assert_allclose(got[task == -1], np.asarray(plain["last_hidden_state"]), atol=1e-5)

    # Gradients through the gathered weights equal those of the general path (every member on
    # the whole batch), leaf by leaf.
    loss = lambda p: jnp.sum(jnp.sin(mixed.apply({"params": p}, ids, mask, adapter_ids=task)["last_hidden_state"]))
    fast = traverse_util.flatten_dict(jax.grad(loss)(params))
    monkeypatch.setattr(select_gather, "gatherable", lambda *a: False)
    slow = traverse_util.flatten_dict(jax.grad(loss)(params))
    for k, v in slow.items():
        np.testing.assert_allclose(fast[k], v, atol=1e-4 * max(float(np.abs(v).max()), 1e-2), err_msg=str(k))
    monkeypatch.undo()

    def matmuls(model, p, **call):  # dot_general equations in the traced forward, nested ones included
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, mask, **call))(p)
        return str(jaxpr).count("dot_general[")
    single = matmuls(BertModel(config, filler=specs[0]), params)
    assert matmuls(mixed, params, adapter_ids=task) == single  # base + one adapter's down and up
    assert single > matmuls(BertModel(config), base)
