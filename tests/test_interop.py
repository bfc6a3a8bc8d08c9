"""AdapterHub bottleneck and PEFT LoRA files, both ways, with transformers/adapters/peft as the oracle.

Every adapter weight is random and non-trivial (AdapterHub's zero-initialised up projections
and PEFT's zero lora_B are overwritten before saving), and every adapter leaf of our model
must come from the imported file: nothing is left at its random initialisation.
"""
import dataclasses
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adapters_jax.adapters.bottleneck import BottleneckConfig
from adapters_jax.adapters.presets import spec_from_config
from adapters_jax.adapters.spec import AdapterSpec, Placement
from adapters_jax.backbones import bert_weights, llama_weights
from adapters_jax.backbones.bert import BertConfig, BertModel
from adapters_jax.backbones.llama import LlamaModel
from adapters_jax.interop import (export_adapterhub, export_peft_lora, import_adapterhub, import_peft_lora,
                                  place_adapter)
from adapters_jax.model import place_base

TOL = 1e-4
HF = {"bert": dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                   max_position_embeddings=40),
      "llama": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5)}
OURS = {"bert": (BertModel, bert_weights), "llama": (LlamaModel, llama_weights)}
IDS = np.random.default_rng(0).integers(3, 99, size=(3, 9)).astype(np.int32)
MASK = np.ones_like(IDS)
MASK[1, 6:], MASK[2, 3:] = 0, 0  # right padding


def _flat(tree):
    return traverse_util.flatten_dict(dict(tree))


# ------------------------------------------------------------------ both sides of the comparison

def _torch_base(tmp_path, kind, seed=0):
    """A random HF model (norms randomized too) saved to tmp_path/base; returns the directory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cls, cfg = ((transformers.BertModel, transformers.BertConfig) if kind == "bert"
                else (transformers.LlamaForCausalLM, transformers.LlamaConfig))
    model = cls(cfg(**HF[kind])).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
    path = str(tmp_path / "base")
    model.save_pretrained(path, safe_serialization=True)
    return path


def _load_torch(kind, path):
    import transformers
    cls = transformers.BertModel if kind == "bert" else transformers.LlamaForCausalLM
    return cls.from_pretrained(path).eval()


def _torch_out(model, kind):
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.tensor(IDS).long(), attention_mask=torch.tensor(MASK).long())
    return (out.last_hidden_state if kind == "bert" else out.logits).numpy()


def _err(a, b, kind):
    keep = np.ones_like(MASK, bool) if kind == "bert" else MASK.astype(bool)  # causal LM: real tokens
    return float(np.abs(np.asarray(a) - np.asarray(b))[keep].max())


def _ours(kind, base_dir, spec, seed=0):
    """(model, params with the base in place and the adapter at its random init)."""
    cls, weights = OURS[kind]
    config, base = weights.load(base_dir)
    model = cls(config, filler=spec)
    init = model.init(jax.random.PRNGKey(seed), jnp.ones((1, 4), jnp.int32))["params"]
    return model, place_base(init, base), config


def _ours_out(kind, model, params):
    out = model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK))
    return np.asarray(out["last_hidden_state"] if kind == "bert" else out["logits"])


def _adapter_leaves(params, name):
    return {k for k in _flat(params) if name in k}


def _randomize_ours(params, name, seed=1):
    """Every leaf of adapter `name` random: N(0, 0.2^2), around 1 for LayerNorm scales and scalings."""
    rng, flat = np.random.default_rng(seed), _flat(params)
    for k, v in flat.items():
        if name in k:
            centre = 1.0 if k[-1] in ("scale", "scaling") else 0.0
            flat[k] = jnp.asarray(centre + 0.2 * rng.standard_normal(v.shape), v.dtype)
    return traverse_util.unflatten_dict(flat)


def _randomize_torch(model, needle, seed=1):
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if needle in n:
                centre = 1.0 if p.ndim == 1 and (n.endswith("weight") and "norm" in n or n.endswith("scaling")) else 0.0
                p.copy_(centre + 0.2 * torch.randn_like(p))


# ------------------------------------------------------------------ AdapterHub

def _hub_cases():
    import adapters
    custom = adapters.BnConfig(mh_adapter=True, output_adapter=True, reduction_factor={"0": 4, "default": 8},
                               non_linearity="gelu", original_ln_before=True, residual_before_ln=False,
                               ln_before=True, ln_after=True, adapter_residual_before_ln=True, scaling="channel",
                               leave_out=[1])
    return {"seq_bn": ("bert", "seq_bn"), "double_seq_bn": ("bert", "double_seq_bn"), "par_bn": ("bert", "par_bn"),
            "custom_bn": ("bert", custom),
            "llama_double_ln_before": ("llama", adapters.DoubleSeqBnConfig(ln_before=True, scaling="learned")),
            "llama_par_both": ("llama", adapters.ParBnConfig(mh_adapter=True, reduction_factor=4))}


@pytest.mark.parametrize("case", ["seq_bn", "double_seq_bn", "par_bn", "custom_bn", "llama_double_ln_before",
                                  "llama_par_both"])
def test_adapterhub_adapter_imports_with_equal_outputs(tmp_path, case):
    adapters = pytest.importorskip("adapters")
    kind, hub_config = _hub_cases()[case]
    base_dir = _torch_base(tmp_path, kind)
    ref = _load_torch(kind, base_dir)
    plain = _torch_out(ref, kind)
    adapters.init(ref)
    ref.add_adapter("task", config=hub_config)
    _randomize_torch(ref, ".adapters.task.")
    ref.set_active_adapters("task")
    ref.eval()
    want = _torch_out(ref, kind)
    assert _err(want, plain, kind) > 1e-2  # the adapter really acts
    safetensors = case == "seq_bn"  # one case through AdapterHub's safetensors file
    ref.save_adapter(str(tmp_path / "hub"), "task", use_safetensors=safetensors)
    assert os.path.exists(tmp_path / "hub" / ("adapter.safetensors" if safetensors else "pytorch_adapter.bin"))

    if kind == "llama":  # AdapterHub saves LlamaForCausalLM's lm_head as a prediction head beside it
        with pytest.warns(UserWarning, match="prediction head"):
            spec, subtree = import_adapterhub(str(tmp_path / "hub"))
    else:
        spec, subtree = import_adapterhub(str(tmp_path / "hub"))
    assert spec.name == "task"
    model, params, _ = _ours(kind, base_dir, spec)
    assert _adapter_leaves(params, "task") == set(_flat(subtree))  # every adapter leaf comes from the file
    n_hub = sum(p.numel() for n, p in ref.named_parameters() if ".adapters.task." in n)
    assert sum(v.size for v in _flat(subtree).values()) == n_hub
    got = _ours_out(kind, model, place_adapter(params, subtree))
    assert _err(got, want, kind) <= TOL


def _our_hub_specs():
    small = BottleneckConfig(bottleneck_dim=4, activation="gelu", ln_before=True, ln_after=True, scaling="learned",
                             original_ln_before=True)
    big = dataclasses.replace(small, bottleneck_dim=8)
    per_layer = AdapterSpec(name="mixed", placements=(
        Placement("attn_adapter", "bottleneck", big, (0,)), Placement("attn_adapter", "bottleneck", small, (2,)),
        Placement("ffn_adapter", "bottleneck", big, (0,)), Placement("ffn_adapter", "bottleneck", small, (2,))))
    return {"houlsby": ("bert", spec_from_config("houlsby", name="task", bottleneck_dim=8)),
            "per_layer_sizes_ln": ("bert", per_layer),
            "parallel_adapter_drop": ("bert", spec_from_config("parallel", name="par", parallel_sites=("attn", "ffn"),
                                                               reduction_factor=4, adapter_drop=1)),
            "llama_pfeiffer": ("llama", spec_from_config("pfeiffer", name="task", bottleneck_dim=8,
                                                         activation="swish"))}


@pytest.mark.parametrize("case", ["houlsby", "per_layer_sizes_ln", "parallel_adapter_drop", "llama_pfeiffer"])
def test_our_adapter_loads_in_adapterhub_with_equal_outputs(tmp_path, case):
    adapters = pytest.importorskip("adapters")
    kind, spec = _our_hub_specs()[case]
    base_dir = _torch_base(tmp_path, kind)
    model, params, config = _ours(kind, base_dir, spec)
    params = _randomize_ours(params, spec.name)
    got = _ours_out(kind, model, params)
    safetensors = case == "houlsby"  # one case without a pickle at all
    export_adapterhub(spec, params, str(tmp_path / "out"), config, torch_bin=not safetensors)

    ref = _load_torch(kind, base_dir)
    assert _err(got, _torch_out(ref, kind), kind) > 1e-2  # the adapter really acts
    adapters.init(ref)
    info = {}
    name = ref.load_adapter(str(tmp_path / "out"), loading_info=info, use_safetensors=safetensors)
    assert name == spec.name and not info["missing_keys"] and not info["unexpected_keys"]
    n_hub = sum(p.numel() for n, p in ref.named_parameters() if f".adapters.{name}." in n)
    assert n_hub == sum(np.size(v) for k, v in _flat(params).items() if spec.name in k)
    ref.set_active_adapters(name)
    ref.eval()
    assert _err(got, _torch_out(ref, kind), kind) <= TOL


# ------------------------------------------------------------------ PEFT LoRA

def _peft_cases():
    import peft
    return {"bert_list_layers_rslora_bin": ("bert", peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["query", "key", "value", "output.dense", "intermediate.dense"],
                layers_to_transform=[0, 2], use_rslora=True)),
            "llama_regex": ("llama", peft.LoraConfig(
                r=4, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj|gate_proj|down_proj)", task_type="CAUSAL_LM"))}


@pytest.mark.parametrize("case", ["bert_list_layers_rslora_bin", "llama_regex"])
def test_peft_lora_imports_with_equal_outputs(tmp_path, case):
    peft = pytest.importorskip("peft")
    kind, lora_config = _peft_cases()[case]
    base_dir = _torch_base(tmp_path, kind)
    pm = peft.get_peft_model(_load_torch(kind, base_dir), lora_config).eval()
    _randomize_torch(pm, "lora_")
    want = _torch_out(pm, kind)
    with pm.disable_adapter():
        assert _err(want, _torch_out(pm, kind), kind) > 1e-2
    pm.save_pretrained(str(tmp_path / "peft"), safe_serialization=not case.endswith("_bin"))

    spec, subtree = import_peft_lora(str(tmp_path / "peft"), kind, name="task")
    model, params, _ = _ours(kind, base_dir, spec)
    assert _adapter_leaves(params, "task") == set(_flat(subtree))
    assert sum(v.size for v in _flat(subtree).values()) == sum(
        p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    got = _ours_out(kind, model, place_adapter(params, subtree))
    assert _err(got, want, kind) <= TOL


OUR_LORA = {  # case -> (kind, spec options); the first needs a regex (PEFT's 'output.dense' also hits attn_out)
    "bert_regex": ("bert", dict(r=4, alpha=8, lora_sites=("query", "value", "ffn_out"))),
    "bert_list_layers": ("bert", dict(r=4, alpha=8, lora_sites=("query", "key", "attn_out", "ffn_in"), layers="0,2")),
    "llama_list_rslora": ("llama", dict(r=4, alpha=16, use_rslora=True, lora_sites=("query", "key", "ffn_gate",
                                                                                      "ffn_in"))),
}


@pytest.mark.parametrize("case", sorted(OUR_LORA))
def test_our_lora_loads_in_peft_with_equal_outputs(tmp_path, case):
    peft = pytest.importorskip("peft")
    kind, options = OUR_LORA[case]
    spec = spec_from_config("lora", name="task", **options)
    base_dir = _torch_base(tmp_path, kind)
    model, params, _ = _ours(kind, base_dir, spec)
    params = _randomize_ours(params, "task")
    got = _ours_out(kind, model, params)
    export_peft_lora(spec, params, str(tmp_path / "out"), kind, base_model_name_or_path=base_dir)

    pm = peft.PeftModel.from_pretrained(_load_torch(kind, base_dir), str(tmp_path / "out")).eval()
    ours_a = [k for k in _flat(params) if k[-1] == "lora_a"]
    assert sum(1 for n, _ in pm.named_parameters() if "lora_A" in n) == len(ours_a)  # exactly our sites
    assert _err(got, _torch_out(pm, kind), kind) <= TOL
    with pm.disable_adapter():
        assert _err(got, _torch_out(pm, kind), kind) > 1e-2  # the adapter really acts


# ------------------------------------------------------------------ round trips without the oracle

TINY = BertConfig(vocab_size=99, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37,
                  max_position_embeddings=40)


def _tiny_params(spec):
    model = BertModel(TINY, filler=spec)
    return _randomize_ours(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"], spec.name)


def test_round_trips_keep_every_array(tmp_path):
    for spec, export, read in [
            (spec_from_config("houlsby", name="t", bottleneck_dim=8, ln_after=True),
             lambda s, p, d: export_adapterhub(s, p, d, TINY), import_adapterhub),
            (spec_from_config("lora", name="t", r=4, alpha=8, lora_sites=("query", "ffn_out"), layers="1-2"),
             lambda s, p, d: export_peft_lora(s, p, d, "bert"), lambda d: import_peft_lora(d, "bert", name="t"))]:
        params = _tiny_params(spec)
        directory = str(tmp_path / spec.placements[0].method)
        export(spec, {"backbone": params}, directory)  # a `backbone/` root is stripped
        spec2, subtree = read(directory)
        assert [(p.site, p.layers) for p in spec2.placements] == [(p.site, p.layers) for p in spec.placements]
        assert all(p.config.dim(32) == q.config.dim(32) for p, q in zip(spec2.placements, spec.placements)
                   if p.method == "bottleneck")
        ours = {k: v for k, v in _flat(params).items() if "t" in k}
        assert set(_flat(subtree)) == set(ours)
        for k, v in _flat(subtree).items():
            np.testing.assert_array_equal(v, np.asarray(ours[k]))


# ------------------------------------------------------------------ refusals

def test_import_renames_and_place_adapter_checks_shapes(tmp_path):
    spec = spec_from_config("pfeiffer", name="t", bottleneck_dim=8)
    export_adapterhub(spec, _tiny_params(spec), str(tmp_path), TINY)
    spec2, subtree = import_adapterhub(str(tmp_path), name="sentiment")
    assert spec2.name == "sentiment" and all("sentiment" in k for k in _flat(subtree))
    wrong = dataclasses.replace(spec2, placements=spec_from_config("pfeiffer", bottleneck_dim=4).placements)
    params = BertModel(TINY, filler=wrong).init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"]
    _one_line(lambda: place_adapter(params, subtree), "has shape (8,), the model expects (4,)")
    _one_line(lambda: place_adapter(params, subtree, prefix=("backbone",)), "has no place in the model")


def _one_line(fn, needle):
    with pytest.raises(ValueError) as err:
        fn()
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg
    return msg


def _edit_json(path, fn):
    with open(path) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["config"].update(phm_layer=True), "phm_layer=True"),
    (lambda c: c["config"].update(use_gating=True), "use_gating=True"),
    (lambda c: c["config"].update(inv_adapter="nice"), "inv_adapter='nice'"),
    (lambda c: c["config"].update(stochastic_depth=0.1), "stochastic_depth=0.1"),
    (lambda c: c["config"].update(architecture="lora"), "architecture='lora'"),
    (lambda c: c["config"].update(non_linearity="leakyrelu"), "non_linearity='leakyrelu'"),
    (lambda c: c["config"].update(reduction_factor=8), "reduction_factor=8"),  # the weights say 4
    (lambda c: c.update(model_type="gpt2"), "model_type='gpt2'"),
])
def test_unsupported_adapterhub_configs_are_refused(tmp_path, edit, needle):
    spec = spec_from_config("houlsby", name="t", reduction_factor=4)
    export_adapterhub(spec, _tiny_params(spec), str(tmp_path), TINY)
    _edit_json(tmp_path / "adapter_config.json", edit)
    _one_line(lambda: import_adapterhub(str(tmp_path)), needle)


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(bias="all"), "bias='all'"),
    (lambda c: c.update(use_dora=True), "use_dora=True"),
    (lambda c: c.update(modules_to_save=["intermediate"]), "modules_to_save"),
    (lambda c: c.update(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'"),
    (lambda c: c.update(rank_pattern={"query": 8}), "rank_pattern"),
    (lambda c: c.update(peft_type="IA3"), "peft_type='IA3'"),
])
def test_unsupported_peft_configs_are_refused(tmp_path, edit, needle):
    spec = spec_from_config("lora", name="t", r=4, alpha=8)
    export_peft_lora(spec, _tiny_params(spec), str(tmp_path), "bert")
    _edit_json(tmp_path / "adapter_config.json", edit)
    _one_line(lambda: import_peft_lora(str(tmp_path), "bert"), needle)


def test_peft_tensor_without_a_site_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    spec = spec_from_config("lora", name="t", r=4, alpha=8)
    export_peft_lora(spec, _tiny_params(spec), str(tmp_path), "bert")
    state = load_file(tmp_path / "adapter_model.safetensors")
    state["base_model.model.pooler.dense.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(state, tmp_path / "adapter_model.safetensors")
    _one_line(lambda: import_peft_lora(str(tmp_path), "bert"), "module pooler.dense has no dense site")
    _one_line(lambda: import_peft_lora(str(tmp_path), "gpt2"), "model_type='gpt2'")


def test_exports_refuse_what_the_format_cannot_hold(tmp_path):
    lora = spec_from_config("lora", name="t", r=4, alpha=8)
    houlsby = spec_from_config("houlsby", name="t", bottleneck_dim=8)
    _one_line(lambda: export_adapterhub(lora, _tiny_params(lora), str(tmp_path), TINY), "not a bottleneck adapter")
    _one_line(lambda: export_peft_lora(houlsby, _tiny_params(houlsby), str(tmp_path), "bert"), "is not LoRA")
    no_bias = spec_from_config("houlsby", name="t", bottleneck_dim=8, use_bias=False)
    _one_line(lambda: export_adapterhub(no_bias, _tiny_params(no_bias), str(tmp_path), TINY), "use_bias=False")
    two = AdapterSpec(name="t", placements=spec_from_config("lora", name="t", r=4, alpha=8).placements[:1]
                      + spec_from_config("lora", name="t", r=2, alpha=8, lora_sites=("key",)).placements)
    _one_line(lambda: export_peft_lora(two, _tiny_params(two), str(tmp_path), "bert"), "rank_pattern")


class _Boom:
    """A pickle that would call print() when unpickled: weights_only=True must refuse it."""

    def __reduce__(self):
        return (print, ("this pickle was executed",))


@pytest.mark.parametrize("fmt", ["adapterhub", "peft"])
def test_pickle_posing_as_weights_is_refused(tmp_path, fmt, capsys):
    pytest.importorskip("torch")
    if fmt == "adapterhub":
        spec = spec_from_config("houlsby", name="t", bottleneck_dim=8)
        export_adapterhub(spec, _tiny_params(spec), str(tmp_path), TINY)
        os.remove(tmp_path / "adapter.safetensors")
        weights, read = tmp_path / "pytorch_adapter.bin", lambda: import_adapterhub(str(tmp_path))
    else:
        spec = spec_from_config("lora", name="t", r=4, alpha=8)
        export_peft_lora(spec, _tiny_params(spec), str(tmp_path), "bert")
        os.remove(tmp_path / "adapter_model.safetensors")
        weights, read = tmp_path / "adapter_model.bin", lambda: import_peft_lora(str(tmp_path), "bert")
    with open(weights, "wb") as f:
        pickle.dump({"x": _Boom()}, f, protocol=2)
    msg = _one_line(read, "weights_only=True")
    assert str(weights) in msg
    assert "this pickle was executed" not in capsys.readouterr().out
