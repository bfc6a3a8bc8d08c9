"""The adapter zoo. Importing this package registers every method with the spec."""
from adapters_jax.adapters import bottleneck  # noqa: F401  (registers 'bottleneck')
from adapters_jax.adapters.presets import PRESETS, spec_from_config
from adapters_jax.adapters.spec import AdapterSpec, Placement, parse_layers

__all__ = ["AdapterSpec", "PRESETS", "Placement", "parse_layers", "spec_from_config"]
