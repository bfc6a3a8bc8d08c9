"""Named adapter sites: the only contract between a backbone and the adapter zoo.

A backbone never knows which adapter types exist. Each block asks a `SiteFiller` (any
hashable callable `(site, layer) -> factory | None`) what fills each of its named sites,
and gets back a module factory (flax's ModuleDef / functools.partial injection style) or
None. With no filler every site is empty: no parameters and no extra computation.

Site kinds and the call each filled site must support:

* Activation sites wrap a sub-layer's "add & norm" (post-LN BERT) or residual add (pre-LN
  Llama). The factory is called as `factory(name=SITE)` and the module as
  `module(sublayer_out, sublayer_in, layer_norm, deterministic=...) -> hidden` where
  `layer_norm` is the block's own norm module or None. The empty site computes
  `layer_norm(sublayer_out + sublayer_in)` (or the plain sum when `layer_norm` is None).
  Names: ATTN_OUTPUT ("attn_adapter", after attention), FFN_OUTPUT ("ffn_adapter",
  after the FFN) and CROSS_ATTN_OUTPUT ("cross_attn_adapter", after an encoder-decoder
  model's cross-attention; only decoder blocks of T5 have it). Parallel adapters (He et
  al.) fill the attention and FFN sites and read `sublayer_in` as their input, so
  "beside attention" and "beside the FFN" are the same hooks with another module;
  PARALLEL_SITES name them in specs.
* Dense sites replace one nn.Dense. The factory is called with nn.Dense's keyword
  arguments (features, use_bias, dtype, param_dtype, kernel_init, name) and must keep the
  base parameters at `<name>/kernel` and `<name>/bias` (LoRA, IA3 subclass mixed_dense.Dense, an nn.Dense).
  Backbones pass their per-call context as `dense(..., ctx=ctx)`; a module whose class sets
  `takes_context = True` (several adapters under 'select', which need the row ids) is then
  called as `module(x, context=ctx)`, every other one as plain `module(x)`.
* The attention site ATTN_PREFIX ("prefix"): the module is called as `module(batch)` and
  returns (keys, values), each [B, P, H_kv, Dh], prepended to every head's keys/values.
* The model-level site SHARED ("shared_adapters", layer -1) holds parameters shared across
  layers (Compacter's PHM rules). The model calls `module()` once per call.
* Per-call context: the model builds `context(filler, adapter_ids)` once, a dict with the
  shared parameters and the per-example adapter ids [B] (None when unused), and every filled
  activation site (and every dense site that takes it) receives it as the keyword `context=`.
* The embedding site EMBED_PROMPT ("prompt"): `module(embeddings [B,T,D], mask [B,T])`
  returns the extended (embeddings, mask).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn

from adapters_jax.backbones import mixed_dense

ATTN_OUTPUT = "attn_adapter"
FFN_OUTPUT = "ffn_adapter"
CROSS_ATTN_OUTPUT = "cross_attn_adapter"
ACTIVATION_SITES = (ATTN_OUTPUT, FFN_OUTPUT, CROSS_ATTN_OUTPUT)
PARALLEL_SITES = {"attn_parallel": ATTN_OUTPUT, "ffn_parallel": FFN_OUTPUT}

QUERY, KEY, VALUE, ATTN_OUT = "query", "key", "value", "attn_out"
FFN_IN, FFN_GATE, FFN_OUT = "ffn_in", "ffn_gate", "ffn_out"
DENSE_SITES = (QUERY, KEY, VALUE, ATTN_OUT, FFN_IN, FFN_GATE, FFN_OUT)

ATTN_PREFIX = "prefix"
EMBED_PROMPT = "prompt"
SHARED = "shared_adapters"
ALL_SITES = ACTIVATION_SITES + DENSE_SITES + (ATTN_PREFIX, EMBED_PROMPT)

# (site, layer) -> factory or None. layer is -1 for the model-level EMBED_PROMPT site.
SiteFiller = Callable[[str, int], Optional[Callable[..., nn.Module]]]


def lookup(filler: Optional[SiteFiller], site: str, layer: int):
    """The factory for `site` in `layer`, or None when the site is empty."""
    return None if filler is None else filler(site, layer)


def dense(filler: Optional[SiteFiller], site: str, layer: int, ctx: Optional[dict] = None,
          **dense_kwargs: Any) -> Callable:
    """An nn.Dense, or whatever fills this dense site, built with the same arguments; call it
    as `(x)`. A module that takes the per-call context (per-row adapters) gets `ctx` bound."""
    factory = lookup(filler, site, layer) or mixed_dense.Dense
    module = factory(**dense_kwargs)
    if getattr(module, "takes_context", False):
        return functools.partial(module, context=ctx)
    return module


def add_and_norm(sublayer_out, sublayer_in, layer_norm):
    """What an empty activation site computes."""
    h = sublayer_out + sublayer_in
    return h if layer_norm is None else layer_norm(h)


def context(filler: Optional[SiteFiller], adapter_ids=None) -> Optional[dict]:
    """The per-call context for activation sites (call it from the model's compact method):
    {'shared': model-level shared params or None, 'adapter_ids': [B] ints or None}."""
    factory = lookup(filler, SHARED, -1)
    shared = None if factory is None else factory(name=SHARED)()
    if shared is None and adapter_ids is None:
        return None
    return {"shared": shared, "adapter_ids": adapter_ids}


def activation(filler: Optional[SiteFiller], site: str, layer: int, sublayer_out,
               sublayer_in, layer_norm, deterministic: bool, ctx: Optional[dict] = None):
    """Runs an activation site: the filled module, or the plain residual add & norm."""
    factory = lookup(filler, site, layer)
    if factory is None:
        return add_and_norm(sublayer_out, sublayer_in, layer_norm)
    extra = {} if ctx is None else {"context": ctx}
    return factory(name=site)(sublayer_out, sublayer_in, layer_norm, deterministic=deterministic, **extra)
