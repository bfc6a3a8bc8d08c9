"""HF PEFT LoRA adapters <-> our specs and parameter trees, for BERT-family and Llama backbones.

`PeftModel.save_pretrained(dir)` writes `adapter_config.json` (a LoraConfig) and
`adapter_model.safetensors` (or `adapter_model.bin`) holding, per adapted Linear,

  base_model.model.<module>.lora_A.weight  [r, in]   -> ours: <site path>/<name>/lora_a  [in, r]
  base_model.model.<module>.lora_B.weight  [out, r]  -> ours: <site path>/<name>/lora_b  [r, out]

with <module> e.g. `encoder.layer.0.attention.self.query` (BertModel; `bert.` in front for
BertFor*) or `model.layers.0.self_attn.q_proj` (LlamaForCausalLM). The update s * x A B with
s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora) is the same on both sides.

Our dense sites and their Hugging Face modules:
  BERT:  query, key, value = attention.self.*; attn_out = attention.output.dense;
         ffn_in = intermediate.dense; ffn_out = output.dense
  Llama: query/key/value/attn_out = self_attn.{q,k,v,o}_proj; ffn_gate/ffn_in/ffn_out = mlp.{gate,up,down}_proj

Import derives the sites and layers from the saved tensors (what PEFT targeted: list or regex
target_modules, layers_to_transform, exclude_modules). Refused with a one-line ValueError naming
the option: bias other than 'none', DoRA, lora_bias, fan_in_fan_out, rank_pattern/alpha_pattern,
layer_replication, target_parameters, trainable tokens, base-weight-changing initialisations
(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), modules_to_save other than task heads, and tensors for
modules that have no dense site here (embeddings, pooler). Task heads in modules_to_save
(classifier, score, ...) are ignored with a warning.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, Mapping, Optional

import numpy as np
from flax import traverse_util

from adapters_jax.adapters.lora import LoRAConfig
from adapters_jax.adapters.spec import AdapterSpec, Placement
from adapters_jax.interop import read_json, read_weights, strip_backbone, write_json

CONFIG_NAME, WEIGHTS_NAME, BIN_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PEFT_VERSION = "0.21.2"  # the PEFT version whose schema we write (and test against)
FAMILIES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "llama": "llama"}
SITE_MODULES = {
    "bert": {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
    "llama": {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
              "attn_out": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_in": "mlp.up_proj",
              "ffn_out": "mlp.down_proj"},
}
_ATTENTION = ("query", "key", "value", "attn_out")  # our sites under `.../attention/`
# family -> (HF layer list, our stack, model prefixes PEFT keys may carry, export prefix, layers_pattern)
_STACK = {"bert": ("encoder.layer", "encoder", ("bert", "roberta", "xlm_roberta"), "", "layer"),
          "llama": ("layers", "layers", ("model",), "model.", "layers")}
_AUTO = {"bert": ("BertModel", "transformers.models.bert.modeling_bert"),
         "llama": ("LlamaForCausalLM", "transformers.models.llama.modeling_llama")}
HEAD_MODULES = ("classifier", "score", "lm_head", "qa_outputs", "cls")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Options that are mapped or carry no weight-relevant meaning (metadata, initialisation-only).
_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
          "peft_version", "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
          "lora_ga_config", "runtime_config", "ensure_weight_tying", "init_lora_weights", "exclude_modules",
          "layers_pattern", "layers_to_transform", "target_modules", "r", "lora_alpha", "lora_dropout",
          "use_rslora", "bias", "modules_to_save"}
_WHY = {"use_dora": "DoRA's magnitude vectors are not mapped", "lora_bias": "LoRA biases are not mapped",
        "fan_in_fan_out": "Conv1D-style (GPT-2) weights are not mapped",
        "rank_pattern": "per-module ranks are not mapped", "alpha_pattern": "per-module alphas are not mapped",
        "layer_replication": "replicated layers are not mapped", "target_parameters": "nn.Parameter targets",
        "trainable_token_indices": "trainable tokens are not mapped", "use_qalora": "QA-LoRA is not mapped"}
# adapter_config.json as PEFT 0.21.2 writes it for a plain LoRA (values we fill are overwritten).
_TEMPLATE = dict(
    alora_invocation_tokens=None, alpha_pattern={}, arrow_config=None, auto_mapping=None,
    base_model_name_or_path=None, bias="none", corda_config=None, ensure_weight_tying=False, eva_config=None,
    exclude_modules=None, fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, kasa_config=None,
    layer_replication=None, layers_pattern=None, layers_to_transform=None, loftq_config={}, lora_alpha=8,
    lora_bias=False, lora_dropout=0.0, lora_ga_config=None, megatron_config=None, megatron_core="megatron.core",
    modules_to_save=None, monteclora_config=None, peft_type="LORA", peft_version=PEFT_VERSION,
    qalora_group_size=16, r=8, rank_pattern={}, revision=None, target_modules=None, target_parameters=None,
    task_type=None, trainable_token_indices=None, use_bdlora=None, use_dora=False, use_qalora=False,
    use_rslora=False, velora_config=None)


def _family(model_type: str, where: str) -> str:
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type={model_type!r} is not supported (choose from {sorted(FAMILIES)})")
    return FAMILIES[model_type]


def _site_path(family: str, layer: int, site: str) -> tuple:
    stack = _STACK[family][1]
    return (stack, f"layer_{layer}") + (("attention", site) if site in _ATTENTION else (site,))


# ------------------------------------------------------------------------------ import

def _check_config(cfg: dict, source: str) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: peft_type={cfg['peft_type']!r} is not a LoRA adapter")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{source}: option bias={cfg['bias']!r} is not supported (only 'none': "
                         "PEFT would train the base biases too)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{source}: option init_lora_weights={init!r} is not supported (it changes the base "
                         "weights; save the adapter converted to plain LoRA)")
    heads = [m for m in cfg.get("modules_to_save") or () if m not in HEAD_MODULES]
    if heads:
        raise ValueError(f"{source}: option modules_to_save={cfg['modules_to_save']!r} is not supported "
                         f"({heads[0]!r} is not a task head)")
    for key, value in cfg.items():
        if key not in _KNOWN and value not in (None, False, {}, [], "", 0):
            why = _WHY.get(key, "not mapped by this importer")
            raise ValueError(f"{source}: option {key}={value!r} is not supported ({why})")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise ValueError(f"{source}: option r={cfg.get('r')!r} must be a positive integer")


def _module_site(family: str, module: str) -> Optional[tuple[int, str]]:
    """'bert.encoder.layer.3.attention.self.query' -> (3, 'query'), or None."""
    hf_stack, _, prefixes, _, _ = _STACK[family]
    pre = "|".join(re.escape(p) for p in prefixes)
    m = re.fullmatch(rf"(?:(?:{pre})\.)?{re.escape(hf_stack)}\.(\d+)\.(.+)", module)
    if not m:
        return None
    inverse = {v: k for k, v in SITE_MODULES[family].items()}
    return (int(m.group(1)), inverse[m.group(2)]) if m.group(2) in inverse else None


def import_peft_lora(directory: str, model_type: str, name: str = "adapter") -> tuple[AdapterSpec, dict]:
    """(spec, params subtree) from a PEFT LoRA directory, for a `model_type` backbone.

    model_type: 'bert', 'roberta', 'xlm-roberta' or 'llama'. The subtree is rooted at the
    backbone (`encoder/layer_i/attention/query/<name>/lora_a`, `layers/layer_i/ffn_out/...`),
    as numpy float32. Weights come from adapter_model.safetensors when present, else from
    adapter_model.bin through torch.load(weights_only=True).
    """
    directory = str(directory)
    family = _family(model_type, "import_peft_lora")
    cfg_file = os.path.join(directory, CONFIG_NAME)
    cfg = read_json(cfg_file)
    _check_config(cfg, cfg_file)
    w_file, state = read_weights(directory, WEIGHTS_NAME, BIN_NAME)
    r = cfg["r"]
    heads = tuple(cfg.get("modules_to_save") or ())
    flat, layers_by_site, skipped = {}, {}, []
    for key, value in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        module = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        if not m:
            if module.split(".")[0] in heads:
                skipped.append(key)
                continue
            raise ValueError(f"{w_file}: tensor {key} is not a LoRA factor we can map")
        where = _module_site(family, m.group(1))
        if where is None:
            raise ValueError(f"{w_file}: tensor {key}: module {m.group(1)} has no dense site in our {family} "
                             f"backbone (sites: {', '.join(SITE_MODULES[family].values())})")
        layer, site = where
        value = np.asarray(value, np.float32)
        if value.ndim != 2 or value.shape[0 if m.group(2) == "A" else 1] != r:
            raise ValueError(f"{w_file}: tensor {key} has shape {tuple(value.shape)}, not a rank-{r} "
                             f"lora_{m.group(2)} (config r={r})")
        leaf = "lora_a" if m.group(2) == "A" else "lora_b"
        flat[_site_path(family, layer, site) + (name, leaf)] = np.ascontiguousarray(value.T)
        layers_by_site.setdefault(site, set()).add(layer)
    if skipped:
        warnings.warn(f"{w_file}: task head tensors ignored ({', '.join(skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''}); only the LoRA factors are imported", stacklevel=2)
    if not flat:
        raise ValueError(f"{w_file}: no LoRA factors")
    for path in list(flat):
        other = path[:-1] + ("lora_b" if path[-1] == "lora_a" else "lora_a",)
        if other not in flat:
            raise ValueError(f"{w_file}: {'/'.join(path)} has no matching {other[-1]}")
    config = LoRAConfig(r=r, alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout", 0.0)),
                        init="gaussian" if cfg.get("init_lora_weights") == "gaussian" else "kaiming",
                        use_rslora=bool(cfg.get("use_rslora", False)))
    sets = {tuple(sorted(v)) for v in layers_by_site.values()}
    every = (isinstance(cfg.get("target_modules"), (list, tuple)) and cfg.get("layers_to_transform") is None
             and not cfg.get("exclude_modules") and len(sets) == 1
             and next(iter(sets)) == tuple(range(len(next(iter(sets))))))
    order = list(SITE_MODULES[family])
    placements = tuple(Placement(site, "lora", config, None if every else tuple(sorted(layers_by_site[site])))
                       for site in sorted(layers_by_site, key=order.index))
    return AdapterSpec(name=name, placements=placements), traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------ export

def _target_modules(family: str, layer_sets: Mapping[str, Optional[tuple]]) -> tuple[Any, Optional[list]]:
    """(target_modules, layers_to_transform) selecting exactly these sites and layers (None: all)."""
    modules = SITE_MODULES[family]
    wanted = set(layer_sets)
    short = {s: (m.rsplit(".", 1)[1] if s in ("query", "key", "value") or family == "llama" else m)
             for s, m in modules.items()}
    hits = lambda n: {s for s, m in modules.items() if m == n or m.endswith("." + n)}
    same = len({layer_sets[s] for s in wanted}) == 1
    if same and all(hits(short[s]) <= wanted for s in wanted):
        layers = next(iter(layer_sets.values()))
        return sorted(short[s] for s in wanted), None if layers is None else list(layers)
    hf_stack = re.escape(_STACK[family][0])
    alts = []
    for site in sorted(wanted):
        layers = layer_sets[site]
        idx = r"\d+" if layers is None else "(?:" + "|".join(str(i) for i in layers) + ")"
        alts.append(rf"{hf_stack}\.{idx}\.{re.escape(modules[site])}")
    return r"(?:.*\.)?(?:" + "|".join(alts) + ")", None


def export_peft_lora(spec: AdapterSpec, params_subtree: Any, directory: str, model_type: str,
                     base_model_name_or_path: Optional[str] = None, task_type: Any = "default",
                     module_prefix: Optional[str] = None) -> list[str]:
    """Writes a directory that `PeftModel.from_pretrained(base, directory)` loads.

    Args:
      spec: LoRA placements only, all with one config (r, alpha, dropout, use_rslora).
      params_subtree: a tree holding `<site path>/<spec.name>/lora_{a,b}` (an optional `backbone/`
        root is stripped; other leaves are ignored).
      model_type: 'bert', 'roberta', 'xlm-roberta' or 'llama'.
      base_model_name_or_path: written into the config (what PEFT's AutoPeftModel would load).
      task_type: PEFT task type; default None for the BERT family (a bare BertModel) and
        'CAUSAL_LM' for Llama.
      module_prefix: the path of the layer stack inside the base model ('' for BertModel,
        'bert.' for BertFor*, 'model.' for LlamaForCausalLM: the default for Llama).
    Returns:
      the files written (adapter_config.json, adapter_model.safetensors).
    """
    family = _family(model_type, "export_peft_lora")
    for p in spec.placements:
        if p.method != "lora":
            raise ValueError(f"export_peft_lora: the {p.method!r} adapter at {p.site!r} is not LoRA")
        if p.site not in SITE_MODULES[family]:
            raise ValueError(f"export_peft_lora: site {p.site!r} does not exist in a {family} backbone")
    configs = {(p.config.r, p.config.alpha, p.config.dropout, p.config.use_rslora) for p in spec.placements}
    if len(configs) != 1:
        raise ValueError(f"export_peft_lora: adapter {spec.name!r} has {len(configs) or 'no'} LoRA configs; "
                         "PEFT export needs exactly one (rank_pattern/alpha_pattern are not written)")
    r, alpha, dropout, rslora = configs.pop()
    flat = strip_backbone(params_subtree)
    found: dict = {}
    for path in flat:
        if len(path) >= 4 and path[-2:] == (spec.name, "lora_a") and path[0] == _STACK[family][1]:
            layer, site = int(path[1][len("layer_"):]), path[-3]
            if spec.placement(site, layer) is not None:
                found.setdefault(site, set()).add(layer)
    if not found:
        raise ValueError(f"export_peft_lora: the parameter tree holds no LoRA factors of adapter {spec.name!r}")
    every = {p.site for p in spec.placements if p.layers is None and spec.adapter_drop == 0}
    layer_sets = {s: None if s in every else tuple(sorted(v)) for s, v in found.items()}
    target, layers = _target_modules(family, layer_sets)
    prefix = _STACK[family][3] if module_prefix is None else module_prefix
    state = {}
    for site, layers_here in found.items():
        for layer in sorted(layers_here):
            base = _site_path(family, layer, site) + (spec.name,)
            module = f"base_model.model.{prefix}{_STACK[family][0]}.{layer}.{SITE_MODULES[family][site]}"
            for leaf, hub in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                if base + (leaf,) not in flat:
                    raise ValueError(f"export_peft_lora: the parameter tree has no {'/'.join(base + (leaf,))}")
                value = np.asarray(flat[base + (leaf,)], np.float32)
                state[f"{module}.{hub}.weight"] = np.ascontiguousarray(value.T)
    if task_type == "default":
        task_type = "CAUSAL_LM" if family == "llama" else None
    cfg = {**_TEMPLATE, "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
           "lora_dropout": dropout, "use_rslora": rslora, "target_modules": target,
           "layers_to_transform": layers, "layers_pattern": None if layers is None else _STACK[family][4],
           "base_model_name_or_path": base_model_name_or_path, "task_type": task_type,
           "auto_mapping": None if task_type else dict(zip(("base_model_class", "parent_library"), _AUTO[family]))}
    os.makedirs(directory, exist_ok=True)
    files = [os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)]
    write_json(files[0], cfg)
    from safetensors.numpy import save_file
    save_file(state, files[1], metadata={"format": "pt"})
    return files
