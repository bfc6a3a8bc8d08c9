"""Per-row ('select') LoRA and IA3 at dense sites: mixed batches, as PEFT's `adapter_names=[...]`.

Each row of a mixed batch must get what it gets from a model holding only its own adapter
(the same params), and a PEFT model with two LoRA adapters called with `adapter_names`
must agree with ours on the imported weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adapters_jax.adapters import AdapterSetup, AdapterSpec, spec_from_config
from adapters_jax.backbones import sites
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.backbones.llama import LlamaConfig, LlamaModel

BERT = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                  max_position_embeddings=40)
LLAMA = LlamaConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                    max_position_embeddings=64)
MODELS = {"bert": (BertModel, BERT, "last_hidden_state"), "llama": (LlamaModel, LLAMA, "logits")}
NAMES = ("a", "b", "c", "plain")
IDS = np.random.default_rng(0).integers(3, 99, size=(6, 7)).astype(np.int32)
MASK = np.ones_like(IDS)
MASK[1, 5:], MASK[4, 2:] = 0, 0
TASK = np.array([0, 2, 1, 3, 1, 0], np.int32)  # each row's adapter (3: 'plain', no adapter anywhere)


def _specs():
    """Two LoRAs with different sites, ranks and layers (b only in layer 1), an IA3, and an empty one."""
    return (spec_from_config("lora", name="a", r=4, alpha=8, lora_sites=("query", "value", "ffn_in")),
            spec_from_config("lora", name="b", r=2, alpha=4, use_rslora=True, lora_sites=("query", "ffn_out"),
                             layers="1"),
            spec_from_config("ia3", name="c", ia3_sites=("key", "value", "ffn_out"), feedforward_sites=("ffn_out",)),
            AdapterSpec(name="plain"))


def _params(model, *args, seed=1, **kwargs):
    """Random params from the shapes alone (no init program to compile): every `scale` (norms,
    IA3) around 1, kernels and LoRA factors ~ N(0, 1/fan_in) (so lora_b is non-zero), biases small."""
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), *args, **kwargs)["params"])
    rng, out = np.random.default_rng(seed), {}
    for path, leaf in shapes.items():
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        out[path] = (1 + 0.3 * x if path[-1] == "scale" else 0.1 * x if x.ndim == 1 else x / np.sqrt(x.shape[0]))
    return traverse_util.unflatten_dict(out)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_mixed_lora_ia3_batch_equals_each_adapter_alone(kind):
    cls, config, out = MODELS[kind]
    specs = _specs()
    mixed = cls(config, filler=AdapterSetup(specs, composition="select"))
    params = _params(mixed, IDS, MASK, adapter_ids=TASK)
    assert sum(1 for k in traverse_util.flatten_dict(params) if k[-2:] == ("b", "lora_b")) == 2  # b: query and ffn_out of layer 1 only
    got = np.asarray(jax.jit(mixed.apply)({"params": params}, IDS, MASK, adapter_ids=TASK)[out])
    alone = []  # each adapter on the whole batch, in a model that holds only it (or no adapter)
    for i, spec in enumerate(specs):
        model = cls(config, filler=spec if spec.placements else None)
        alone.append(np.asarray(jax.jit(model.apply)({"params": params}, IDS, MASK)[out]))
        np.testing.assert_allclose(got[TASK == i], alone[i][TASK == i], atol=1e-5)
    for i in range(3):  # every adapter really changes its rows
        assert np.abs(alone[i] - alone[3]).max() > 1e-2


def test_switching_dense_adapters_does_not_recompile():
    model = BertModel(BERT, filler=AdapterSetup(_specs()[:2]))
    traces = []

    @jax.jit
    def run(params, adapter_ids):
        traces.append(1)  # runs only while tracing
        return model.apply({"params": params}, IDS, MASK, adapter_ids=adapter_ids)["last_hidden_state"]

    params = _params(model, IDS, MASK, adapter_ids=TASK % 2)
    outs = [run(params, np.full(6, i, np.int32)) for i in (0, 1, 0)]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_select_dense_site_without_ids_is_refused():
    model = BertModel(BERT, filler=AdapterSetup(_specs()[:2]))
    params = _params(model, IDS, MASK, adapter_ids=TASK % 2)
    with pytest.raises(ValueError, match=r"composition 'select' needs adapter_ids \[B\]"):
        model.apply({"params": params}, IDS, MASK)


def _backbone_calls():
    """Every backbone with dense sites, tiny, with a call on a batch of 2 rows."""
    from adapters_jax.backbones.gpt2 import GPT2Config, GPT2Model
    from adapters_jax.backbones.t5 import T5Config, T5Model
    from adapters_jax.backbones.vit import ViTConfig, ViTModel
    ids, mask = IDS[:2], MASK[:2]
    return {
        "bert": (BertModel(BERT), (ids, mask)),
        "gpt2": (GPT2Model(GPT2Config(vocab_size=99, hidden_size=16, num_layers=2, num_heads=2)), (ids, mask)),
        "llama": (LlamaModel(LLAMA), (ids, mask)),
        "t5": (T5Model(T5Config(vocab_size=99, hidden_size=16, num_layers=1, num_heads=2, head_dim=8,
                                intermediate_size=24, gated=True)), (ids, mask, ids[:, :3])),
        "vit": (ViTModel(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                                   intermediate_size=24)), (np.zeros((2, 8, 8, 3), np.float32),)),
    }


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "t5", "vit"])
def test_every_backbone_gives_its_dense_sites_the_row_ids(kind):
    """Tracing only: a select dense site that misses the ids raises, so every site of every layer
    (T5: self-, cross-attention and FFN) must receive them through its backbone."""
    model, args = _backbone_calls()[kind]
    everywhere = lambda n: spec_from_config("lora", name=n, r=2, lora_sites=sites.DENSE_SITES)
    mixed = model.clone(filler=AdapterSetup((everywhere("a"), everywhere("b"))))
    shapes = jax.eval_shape(mixed.init, jax.random.PRNGKey(0), *args, adapter_ids=np.array([1, 0], np.int32))
    leaves = traverse_util.flatten_dict(shapes["params"])
    assert {k[-2] for k in leaves if k[-1] == "lora_b"} == {"a", "b"}
    with pytest.raises(ValueError, match=r"composition 'select' needs adapter_ids \[B\]"):
        jax.eval_shape(mixed.init, jax.random.PRNGKey(0), *args)


# ------------------------------------------------------------------ PEFT's mixed batches as the oracle

@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_mixed_batch_adapter_names_match(tmp_path, kind):
    peft = pytest.importorskip("peft")
    import torch
    from adapters_jax.backbones import bert_weights, llama_weights
    from adapters_jax.interop import import_peft_lora, place_adapter
    from adapters_jax.model import place_base
    from tests.test_interop import IDS as T_IDS, MASK as T_MASK, _err, _load_torch, _torch_base, _torch_out
    base_dir = _torch_base(tmp_path, kind)
    first, second = ((["query", "value"], ["key", "output.dense"]) if kind == "bert"
                     else (["q_proj", "v_proj", "down_proj"], ["k_proj", "gate_proj"]))
    pm = peft.get_peft_model(_load_torch(kind, base_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=first),
                             adapter_name="one")
    pm.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=8, target_modules=second, layers_to_transform=[1]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn_like(p))
    pm.eval()
    names = ["two", "one", "__base__"]  # T_IDS has 3 rows
    with torch.no_grad():
        torch_out = pm(input_ids=torch.tensor(T_IDS).long(), attention_mask=torch.tensor(T_MASK).long(),
                       adapter_names=names)
    want = (torch_out.last_hidden_state if kind == "bert" else torch_out.logits).numpy()
    with pm.disable_adapter():
        assert np.abs(want[:2] - _torch_out(pm, kind)[:2]).max() > 1e-2  # both adapters act on their rows
    pm.save_pretrained(str(tmp_path / "peft"))  # non-default adapters go to peft/<name>

    imported = [import_peft_lora(str(tmp_path / "peft" / n), kind, name=n) for n in ("one", "two")]
    setup = AdapterSetup(tuple(s for s, _ in imported) + (AdapterSpec(name="base"),), composition="select")
    cls, weights = (BertModel, bert_weights) if kind == "bert" else (LlamaModel, llama_weights)
    config, base = weights.load(base_dir)
    model = cls(config, filler=setup)
    ids = jnp.asarray([setup.index("base" if n == "__base__" else n) for n in names], jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((3, 4), jnp.int32), adapter_ids=ids)
    params = place_base(jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes["params"]), base)
    for _, subtree in imported:
        params = place_adapter(params, subtree)
    lora = {k: v for k, v in traverse_util.flatten_dict(params).items() if k[-1].startswith("lora_")}
    assert len(lora) == sum(1 for n, _ in pm.named_parameters() if "lora_" in n)
    assert all(np.any(v != 0) for v in lora.values())  # every LoRA leaf imported, none left at zero
    out = "last_hidden_state" if kind == "bert" else "logits"
    run = jax.jit(lambda p, adapter_ids: model.apply({"params": p}, jnp.asarray(T_IDS), jnp.asarray(T_MASK),
                                                      adapter_ids=adapter_ids)[out])
    assert _err(run(params, ids), want, kind) <= 1e-4
    assert _err(run(params, ids[::-1]), want, kind) > 1e-2  # each row's own adapter matters
