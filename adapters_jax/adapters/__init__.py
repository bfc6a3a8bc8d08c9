"""The adapter zoo. Importing this package registers every method with the spec."""
# Each import registers its method ('bottleneck', 'compacter', 'lora', 'ia3', 'prefix', 'prompt').
from adapters_jax.adapters import bottleneck, compacter, ia3, lora, prefix, prompt  # noqa: F401
from adapters_jax.adapters.composition import AdapterSetup, parallel_apply
from adapters_jax.adapters.fusion import FusionConfig
from adapters_jax.adapters.presets import PRESETS, spec_from_config
from adapters_jax.adapters.spec import AdapterSpec, Placement, parse_layers

__all__ = ["AdapterSetup", "AdapterSpec", "FusionConfig", "PRESETS", "Placement", "parallel_apply", "parse_layers",
           "spec_from_config"]
