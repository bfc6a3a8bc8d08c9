"""Which sites each backbone fills: a spec placed where a model has no site is refused."""
import pytest

from adapters_jax.adapters.bottleneck import BottleneckConfig
from adapters_jax.adapters.spec import AdapterSpec, Placement
from adapters_jax.backbones import sites
from adapters_jax.backbones.bert import BertConfig
from adapters_jax.backbones.llama import LlamaConfig
from adapters_jax.backbones.t5 import T5Config
from adapters_jax.hub import adapter_sites


def _cross_spec(layers):
    return AdapterSpec("x", (Placement(sites.CROSS_ATTN_OUTPUT, "bottleneck", BottleneckConfig(bottleneck_dim=4),
                                       layers),))


def test_encoders_and_llama_have_no_cross_attention_site():
    for cfg in (BertConfig(num_layers=2), LlamaConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4)):
        layers, available = adapter_sites(cfg)
        assert layers == 2 and sites.CROSS_ATTN_OUTPUT not in available
        with pytest.raises(ValueError, match="cross_attn_adapter"):
            _cross_spec(None).validate(layers, cfg.hidden_size, available)
    assert sites.FFN_GATE in adapter_sites(LlamaConfig(num_layers=2, hidden_size=64, num_heads=4,
                                                        num_kv_heads=4))[1]
    assert sites.FFN_GATE not in adapter_sites(BertConfig(num_layers=2))[1]


def test_t5_numbers_decoder_layers_after_encoder_layers():
    cfg = T5Config(num_layers=2, num_decoder_layers=3)
    layers, available = adapter_sites(cfg)
    assert layers == 5 and sites.CROSS_ATTN_OUTPUT in available and sites.FFN_GATE not in available
    _cross_spec((2, 3, 4)).validate(layers, cfg.d_model if hasattr(cfg, "d_model") else cfg.hidden_size, available)
    with pytest.raises(ValueError, match="out of range"):
        _cross_spec((5,)).validate(layers, 32, available)
