"""LoRA and IA3 at the dense sites: exact identity at init, exact merge, and HF PEFT as the oracle."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from adapters_jax import peft as peft_lib
from adapters_jax import rules
from adapters_jax.adapters import ia3 as ia3_lib
from adapters_jax.adapters import lora as lora_lib
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.backbones import bert_weights, llama_weights
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.backbones.llama import LlamaConfig, LlamaModel
from tests.oracle_models import tiny_llama
from tests.bf16_checks import assert_tree_close_to_float64, dot_operand_types

BERT = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                  max_position_embeddings=40)
LLAMA = LlamaConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=48, max_position_embeddings=64)
MODELS = {"bert": (BertModel, BERT), "llama": (LlamaModel, LLAMA)}


def batch(seed=0, b=3, t=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, size=(b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0  # right padding in the batch
    return ids, mask


def flat(params):
    return traverse_util.flatten_dict(dict(params))


def graft(adapted, base):
    """The adapted model's params with every base leaf taken from `base` (same paths)."""
    fa, fb = flat(adapted), flat(base)
    assert set(fb) <= set(fa), sorted(set(fb) - set(fa))[:3]
    fa.update(fb)
    return traverse_util.unflatten_dict(fa)


def out_of(model, params, ids, mask, **kw):
    out = model.apply({"params": params}, ids, mask, **kw)
    return np.asarray(out["logits"] if "logits" in out else out["last_hidden_state"])


def adapted(kind, method, seed=1, **options):
    cls, cfg = MODELS[kind]
    spec = spec_from_config(method, **options)
    base = cls(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    model = cls(cfg, filler=spec)
    params = graft(model.init(jax.random.PRNGKey(seed), jnp.ones((1, 4), jnp.int32))["params"], base)
    return cls(cfg), base, model, params, spec


def randomize(params, leaf, scale, seed=0):
    """Every `leaf` parameter drawn N(0, scale^2) (for LoRA, IA3: shifted so IA3 stays near 1)."""
    f, rng = flat(params), np.random.default_rng(seed)
    for k, v in f.items():
        if k[-1] == leaf:
            f[k] = jnp.asarray((1.0 if leaf == "scale" else 0.0) + scale * rng.standard_normal(v.shape), v.dtype)
    return traverse_util.unflatten_dict(f)


def trainable_count(params, name="adapter"):
    labels = rules.labels_for(params, peft_lib.make_rules([name], train_head=False))
    trainable, _ = peft_lib.split(params, labels)
    return sum(int(np.prod(v.shape)) for v in flat(trainable).values())


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method,options", [("lora", {"r": 4, "alpha": 8}),
                                            ("ia3", {})])
def test_untrained_adapter_is_bit_identical(kind, method, options):
    """Op by op (no jit), as here, the outputs are equal bit for bit. Under jit XLA compiles the
    adapted and the plain model into different programs, whose fusions may differ by an ulp."""
    plain, base, model, params, _ = adapted(kind, method, **options)
    f = flat(params)
    if method == "lora":  # B = 0 makes the update vanish, while A is a real random matrix
        assert all(not np.any(v) for k, v in f.items() if k[-1] == "lora_b")
        assert all(np.std(v) > 0 for k, v in f.items() if k[-1] == "lora_a")
    else:
        assert all(np.all(v == 1) for k, v in f.items() if k[-1] == "scale")
    ids, mask = batch()
    assert np.array_equal(out_of(model, params, ids, mask), out_of(plain, base, ids, mask))


def test_lora_merge_and_unmerge():
    plain, base, model, params, spec = adapted("bert", "lora", r=4, alpha=8)
    params = randomize(randomize(params, "lora_a", 0.2, 1), "lora_b", 0.2, 2)
    ids, mask = batch()
    ref = out_of(model, params, ids, mask)
    assert np.abs(ref - out_of(plain, base, ids, mask)).max() > 1e-2  # the update really acts
    merged, merged_spec = lora_lib.merge_lora(params, spec)
    assert merged_spec.placements == ()
    assert set(flat(merged)) == set(flat(base))  # no extra parameters at all
    merged_model = BertModel(BERT, filler=merged_spec)
    assert np.abs(out_of(merged_model, merged, ids, mask) - ref).max() <= 1e-5
    restored = lora_lib.unmerge_lora(merged, params, spec)
    assert set(flat(restored)) == set(flat(params))
    for k, v in flat(params).items():
        assert np.abs(np.asarray(flat(restored)[k]) - np.asarray(v)).max() <= 1e-6, k


def test_merged_lora_compiles_to_the_base_models_own_program():
    """Why merged LoRA adds no latency at all: XLA compiles it to the plain base's program, op
    for op (source locations aside), so any gap in a timing is that timing's noise."""
    plain, base, model, params, spec = adapted("bert", "lora", r=4, alpha=8)
    merged, merged_spec = lora_lib.merge_lora(randomize(params, "lora_b", 0.2, 2), spec)
    ids, mask = batch()

    def program(m, p):
        text = jax.jit(lambda q: m.apply({"params": q}, ids, mask)["last_hidden_state"]).lower(p).compile().as_text()
        return text.split("\nFileNames")[0]  # the ops; the source-location tables follow

    base_program = program(plain, base)
    assert program(BertModel(BERT, filler=merged_spec), merged) == base_program
    assert program(model, params) != base_program  # unmerged LoRA computes its update


def test_lora_dropout_only_with_a_dropout_rng():
    cfg = BertConfig(**{**BERT.__dict__, "hidden_dropout": 0.0, "attention_dropout": 0.0})
    spec = spec_from_config("lora", r=4, alpha=8, dropout=0.5)
    model = BertModel(cfg, filler=spec)
    params = randomize(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"], "lora_b", 0.2)
    ids, mask = batch()
    evaluation = out_of(model, params, ids, mask)
    # training mode takes the explicit attention einsums (evaluation the fused op): equal to rounding
    np.testing.assert_allclose(out_of(model, params, ids, mask, deterministic=False), evaluation, atol=1e-6)
    train = out_of(model, params, ids, mask, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert np.abs(train - evaluation).max() > 1e-3


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_parameter_counts_follow_the_formulas(kind):
    _, cfg = MODELS[kind]
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    kv = d if kind == "bert" else cfg.num_kv_heads * cfg.head_dim
    *_, params, _ = adapted(kind, "lora", r=4, alpha=8, lora_sites=("query", "value", "ffn_out"))
    assert trainable_count(params) == layers * 4 * ((d + d) + (d + kv) + (f + d))
    assert trainable_count(params) == layers * sum(
        lora_lib.lora_param_count(i, o, 4) for i, o in ((d, d), (d, kv), (f, d)))
    *_, params, _ = adapted(kind, "ia3")
    assert trainable_count(params) == layers * (kv + kv + f)


def test_ia3_merge():
    plain, base, model, params, spec = adapted("bert", "ia3")
    params = randomize(params, "scale", 0.3)
    ids, mask = batch()
    ref = out_of(model, params, ids, mask)
    merged, merged_spec = ia3_lib.merge_ia3(params, spec)
    assert set(flat(merged)) == set(flat(base))
    assert np.abs(out_of(BertModel(BERT, filler=merged_spec), merged, ids, mask) - ref).max() <= 1e-5


def test_bad_options_fail_with_the_field_name():
    for method, kw, field in [("lora", {"r": 0}, "adapter.r"), ("lora", {"rank": 4}, "adapter.rank"),
                              ("lora", {"lora_sites": ("qkv",)}, "adapter.lora_sites"),
                              ("ia3", {"feedforward_sites": ("query",)}, "adapter.feedforward_sites")]:
        with pytest.raises(ValueError, match=field):
            spec_from_config(method, **kw)


# ------------------------------------------------------------------ HF PEFT as the oracle

def _torch_bert(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=40)
    model = transformers.BertModel(hf).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, base = bert_weights.load(str(tmp_path))
    return model, config, base


def _torch_out(model, ids, mask, logits=False):
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    return (out.logits if logits else out.last_hidden_state).numpy()


BERT_SITES = {"attention.self.query": ("attention", "query"), "attention.self.key": ("attention", "key"),
              "attention.self.value": ("attention", "value"), "attention.output.dense": ("attention", "attn_out"),
              "intermediate.dense": ("ffn_in",), "output.dense": ("ffn_out",)}
LLAMA_SITES = {"self_attn.q_proj": ("attention", "query"), "self_attn.k_proj": ("attention", "key"),
               "self_attn.v_proj": ("attention", "value"), "self_attn.o_proj": ("attention", "attn_out"),
               "mlp.up_proj": ("ffn_in",), "mlp.gate_proj": ("ffn_gate",), "mlp.down_proj": ("ffn_out",)}


def _our_path(hf_module, stack, site_map):
    """'base_model.model.encoder.layer.1.attention.self.query' -> ('encoder', 'layer_1', 'attention', 'query')."""
    layer, module = hf_module.split(".layer.", 1)[1].split(".", 1) if stack == "encoder" else \
        hf_module.split(".layers.", 1)[1].split(".", 1)
    return (stack, f"layer_{layer}") + site_map[module]


def _base_out(peft_model, ids, mask, logits=False):
    with peft_model.disable_adapter():
        return _torch_out(peft_model, ids, mask, logits)


def _randomize_peft_lora(pm, root: str, site_names) -> dict:
    """Draws PEFT's LoRA weights (B included, which PEFT zero-inits) and returns them in our layout."""
    import torch
    torch.manual_seed(1)
    ours = {}
    for n, p in pm.named_parameters():
        if "lora_" in n:
            with torch.no_grad():
                p.normal_(0.0, 0.3)
            leaf = "lora_a" if "lora_A" in n else "lora_b"
            ours[_our_path(n.split(".lora_")[0], root, site_names) + ("adapter", leaf)] = p.detach().numpy().T
    return ours


def test_lora_matches_peft_bert(tmp_path):
    peft = pytest.importorskip("peft")
    import torch
    model, config, base = _torch_bert(tmp_path)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])).eval()
    ours = _randomize_peft_lora(pm, "encoder", BERT_SITES)
    spec = spec_from_config("lora", r=4, alpha=8)
    jmodel = BertModel(config, filler=spec)
    params = graft(jmodel.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"], base)
    f = flat(params)
    assert {k for k in f if k[-1].startswith("lora_")} == set(ours)
    f.update({k: jnp.asarray(v) for k, v in ours.items()})
    ids, mask = batch()
    got = out_of(jmodel, traverse_util.unflatten_dict(f), ids, mask)
    ref = _torch_out(pm, ids, mask)
    assert np.abs(ref - _base_out(pm, ids, mask)).max() > 1e-2  # the update really acts
    assert np.abs(got - ref).max() <= 1e-4


def test_lora_matches_peft_llama_gqa(tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    model, config, base = tiny_llama(tmp_path)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj",
                                                                                         "down_proj"])).eval()
    ours = _randomize_peft_lora(pm, "layers", LLAMA_SITES)
    spec = spec_from_config("lora", r=4, alpha=16, lora_sites=("query", "value", "ffn_out"))
    jmodel = LlamaModel(config, filler=spec)
    params = graft(jmodel.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"], base)
    f = flat(params)
    assert {k for k in f if k[-1].startswith("lora_")} == set(ours)
    f.update({k: jnp.asarray(v) for k, v in ours.items()})
    ids, mask = batch()
    got = out_of(jmodel, traverse_util.unflatten_dict(f), ids, mask)
    ref = _torch_out(pm, ids, mask, logits=True)
    real = mask.astype(bool)
    assert np.abs(ref - _base_out(pm, ids, mask, logits=True))[real].max() > 1e-2  # the update really acts
    assert np.abs(got - ref)[real].max() <= 1e-4


@pytest.mark.parametrize("case", ["paper_sites", "peft_default_list"])
def test_ia3_matches_peft_bert(tmp_path, case):
    """Our default (key, value, ffn_out) equals PEFT with a regex naming exactly those modules.

    PEFT's list form `target_modules=['key', 'value', 'output.dense']` (its default for BERT)
    suffix-matches attention.output.dense too, and `feedforward_modules=['output.dense']`
    (plain endswith) makes it an input-scaled layer: that is our ia3 with attn_out added.
    """
    peft = pytest.importorskip("peft")
    import torch
    model, config, base = _torch_bert(tmp_path)
    if case == "paper_sites":
        ffn = r".*\.layer\.\d+\.output\.dense"
        pcfg = peft.IA3Config(target_modules=r".*\.attention\.self\.(key|value)|" + ffn, feedforward_modules=ffn)
        options = {}
    else:
        pcfg = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
        options = {"ia3_sites": ("key", "value", "attn_out", "ffn_out"), "feedforward_sites": ("attn_out", "ffn_out")}
    pm = peft.get_peft_model(model, pcfg).eval()
    torch.manual_seed(1)
    ours = {}
    for n, p in pm.named_parameters():
        if "ia3_l" in n:
            with torch.no_grad():
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            path = _our_path(n.split(".ia3_l")[0], "encoder", BERT_SITES)
            ours[path + ("adapter", "scale")] = p.detach().numpy().ravel()
    spec = spec_from_config("ia3", **options)
    jmodel = BertModel(config, filler=spec)
    params = graft(jmodel.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"], base)
    f = flat(params)
    assert {k for k in f if k[-1] == "scale" and "adapter" in k} == set(ours)
    f.update({k: jnp.asarray(v) for k, v in ours.items()})
    ids, mask = batch()
    got = out_of(jmodel, traverse_util.unflatten_dict(f), ids, mask)
    ref = _torch_out(pm, ids, mask)
    assert np.abs(ref - _base_out(pm, ids, mask)).max() > 1e-2
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("site", ["lora", "ia3_out", "ia3_in"])
def test_bf16_site_gradients_match_float64_and_every_dot_is_bf16(site):
    """A LoRA or IA3 dense site of a bf16 backbone: the gradients of its input and of every
    parameter (the frozen kernel's too, as full fine-tuning needs it) match float64 autodiff of
    the site's formula to bf16 rounding, and on XLA:CPU every dot is bf16 x bf16 (the backbone's
    mixed_dense path). As plain nn.Dense subclasses these sites ran float32 dots with converts."""
    cls, kw = {"lora": (lora_lib.LoRADense, dict(adapter=lora_lib.LoRAConfig(r=4, alpha=8.0))),
               "ia3_out": (ia3_lib.IA3Dense, dict(adapter=ia3_lib.IA3Config())),
               "ia3_in": (ia3_lib.IA3Dense, dict(adapter=ia3_lib.IA3Config(scale_input=True)))}[site]
    layer = cls(40, dtype=jnp.bfloat16, **kw)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 7, 48)), jnp.bfloat16)  # [B, T, in]
    cot = rng.normal(size=(3, 7, 40))
    p = layer.init(jax.random.PRNGKey(0), x)["params"]
    p = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype), p)  # B != 0, l != 1

    def loss(p, x):
        return jnp.sum(layer.apply({"params": p}, x).astype(jnp.float32) * jnp.asarray(cot, jnp.float32))
    got = jax.grad(loss, argnums=(0, 1))(p, x)
    with jax.enable_x64(True):
        def loss64(p, x):
            a = p["adapter"]
            if site == "lora":
                y = x @ p["kernel"] + p["bias"] + (x @ a["lora_a"] @ a["lora_b"]) * 2.0  # alpha / r
            elif site == "ia3_out":
                y = (x @ p["kernel"] + p["bias"]) * a["scale"]
            else:
                y = (x * a["scale"]) @ p["kernel"] + p["bias"]
            return jnp.sum(y * cot)
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), p)
        want = jax.tree.map(np.asarray, jax.grad(loss64, argnums=(0, 1))(p64, jnp.asarray(np.asarray(x, np.float64))))
    assert_tree_close_to_float64(got, want)
    if jax.default_backend() == "cpu":
        types = dot_operand_types(jax.grad(loss, argnums=(0, 1)), p, x)
        assert len(types) >= 2 and set(types) == {"bf16xbf16"}, types  # dx, dW (+ forward, adapter dots)


@pytest.mark.parametrize("rows", [(3, 7), (32, 128)])
def test_ia3_scale_gradient_sums_in_float32(rows):
    """The IA3 vector's gradient is a sum of x * g over every row; on a bf16 activation it is
    summed in float32 (`ia3.scale_features`). Autodiff summed in bf16, which XLA:CPU turned
    into reduce-windows 5% of the largest entry off at 32 x 128 rows. Against float64: within
    the bf16 rounding of the cotangent."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=rows + (48,)), jnp.bfloat16)  # [B, T, F]
    scale = jnp.asarray(rng.normal(1.0, 0.1, size=(48,)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=rows + (48,)), jnp.bfloat16)  # a bf16 output's cotangent
    dx, ds = jax.vjp(ia3_lib.scale_features, x, scale)[1](cot)
    x64, c64 = np.asarray(x, np.float64), np.asarray(cot, np.float64)
    want_ds = (x64 * c64).sum(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(ds, np.float64), want_ds, atol=1e-5 * np.abs(want_ds).max())
    np.testing.assert_allclose(np.asarray(dx, np.float64), c64 * np.asarray(scale, np.float64)[None, None],
                               rtol=2 ** -7)  # the scale and the product, each rounded to bf16
    assert dx.dtype == jnp.bfloat16 and ds.dtype == jnp.float32
