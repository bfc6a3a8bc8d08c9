"""Bottleneck adapters: Houlsby (double_seq_bn), Pfeiffer (seq_bn) and parallel (par_bn).

One module implements all three through AdapterHub's flags, so that a config means the
same thing here and in `adapters`, and weights move between the two unchanged:

  A(z)  = f(LN_before?(z) W_down + b_down) W_up + b_up, times the scaling s
  seq:  residual = h_out (residual_before_ln=True), or the add&normed input (False)
        z = LN(h_out + x) if original_ln_before else h_out
        y = A(z) + residual  (LN_after optional, before or after that residual)
        out = LN(y + x) if original_ln_after else y
  par:  out = LN(h_out + s * A(x) + x)    (the adapter reads the sub-layer *input* x)

with h_out the sub-layer's output, x its input and LN the block's own LayerNorm.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from adapters_jax.adapters.activated_dense import ActivatedDense
from adapters_jax.backbones import mixed_dense
from adapters_jax.backbones.mixed_dense import is_bf16
from adapters_jax.dropout import Dropout
from adapters_jax.param import param

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
    "linear": lambda x: x,
}
INITS = ("bert", "near_identity", "zero_up", "houlsby", "mam_adapter")


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """One bottleneck adapter; field names follow AdapterHub's BnConfig where they overlap."""
    bottleneck_dim: Optional[int] = None  # r; or give reduction_factor (r = d // factor)
    reduction_factor: Optional[float] = None
    activation: str = "relu"
    use_bias: bool = True
    init: str = "bert"          # see INITS; near_identity draws N(0, init_std) for both projections
    init_std: float = 1e-2
    ln_before: bool = False      # a new LayerNorm on the adapter input
    ln_after: bool = False       # a new LayerNorm on the adapter output
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: Union[bool, str] = True  # True, False or 'post_add'
    adapter_residual_before_ln: bool = False
    is_parallel: bool = False
    scaling: Union[float, str] = 1.0  # a float, 'learned' (scalar) or 'channel' (vector)
    dropout: float = 0.0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"adapter.activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ValueError(f"adapter.init={self.init!r} is not one of {INITS}")
        if not (isinstance(self.scaling, (int, float)) or self.scaling in ("learned", "channel")):
            raise ValueError(f"adapter.scaling={self.scaling!r} must be a number, 'learned' or 'channel'")
        if self.bottleneck_dim is not None and self.bottleneck_dim <= 0:
            raise ValueError(f"adapter.bottleneck_dim={self.bottleneck_dim} must be > 0")
        if self.reduction_factor is not None and self.reduction_factor <= 0:
            raise ValueError(f"adapter.reduction_factor={self.reduction_factor} must be > 0")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise ValueError(f"adapter.residual_before_ln={self.residual_before_ln!r} must be True, False or 'post_add'")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("adapter.residual_before_ln='post_add' needs original_ln_before=True "
                             "(there is no post-add sum to take otherwise)")

    def dim(self, d_model: int) -> int:
        """The bottleneck size r for a model of width d_model."""
        if self.bottleneck_dim is not None:
            r = self.bottleneck_dim
        elif self.reduction_factor is not None:
            r = max(int(d_model // self.reduction_factor), 1)
        else:
            r = max(d_model // 2, 1)  # AdapterHub's default when neither is given
        if r > d_model:
            raise ValueError(f"adapter.bottleneck_dim={r} exceeds the model width d_model={d_model}")
        return r


def _inits(cfg: BottleneckConfig):
    """(down kernel init, up kernel init) for the configured scheme."""
    normal = nn.initializers.normal
    if cfg.init == "bert":
        return normal(0.02), normal(0.02)
    if cfg.init == "near_identity":
        return normal(cfg.init_std), normal(cfg.init_std)
    if cfg.init == "zero_up":
        return normal(cfg.init_std), nn.initializers.zeros
    if cfg.init == "houlsby":
        tn = nn.initializers.truncated_normal(1e-2, lower=-2.0, upper=2.0)
        return tn, tn
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), nn.initializers.zeros  # mam


def bottleneck(module: nn.Module, c: BottleneckConfig, z, deterministic: bool, dtype=jnp.float32,
               proj=None, compute_dtype=None):
    """The bare bottleneck A(z) [B, T, D] -> [B, T, D], scaled, without any residual.

    Called from inside `module`'s compact method, so that its parameters (down, up, ...)
    sit directly under `module`: `.../ffn_adapter/<name>/down/kernel`. `proj(features, name)`
    builds a projection (default nn.Dense; Compacter passes its PHM layer). compute_dtype: the
    backbone's (its sublayer output's dtype; None: z's); bf16 makes the projections bf16 dots.
    """
    d = z.shape[-1]
    activated_up = None  # the up projection of f(pre) when it is a plain Dense
    if proj is None:
        down_init, up_init = _inits(c)
        inits = {"down": down_init, "up": up_init}
        # in a bf16 backbone (bf16 sublayer outputs) both projections multiply in bf16 with float32
        # accumulation, as the backbone's own matmuls: the backward keeps bf16 inputs, not float32
        # copies (3 MiB less per site at MiniLM 32 x 128), and every dot, dW included, takes
        # XLA:CPU's canonical bf16 kernel. A float32 up projection ran its dW as a float32 dot on
        # a transposed copy of the cotangent. Measured at MiniLM 32 x 128 on the 2-core CPU: one
        # adapter's forward + backward 4.5 -> 2.6 ms, the Houlsby step 1.6-5.2% faster (three
        # in-process A/Bs). The up projection's output is rounded to bf16 (as PyTorch autocast's
        # Linear), before the float32 residual add.
        mm_dtype = jnp.bfloat16 if is_bf16(z.dtype if compute_dtype is None else compute_dtype) else dtype
        proj = lambda feats, name: (mixed_dense.Dense(
            feats, use_bias=c.use_bias, dtype=mm_dtype,
            kernel_init=inits[name], name=name))
        if c.activation not in ("identity", "linear"):  # f(pre) is recomputed in the backward
            activated_up = ActivatedDense(d, activation=ACTIVATIONS[c.activation], use_bias=c.use_bias,
                                          dtype=mm_dtype, kernel_init=inits["up"], name="up")
    if c.ln_before:
        z = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="ln_before")(z)
    pre = proj(c.dim(d), "down")(z).astype(dtype)  # [B, T, r]
    # [B, T, D]; scaling and dropout in the adapter's dtype: a learned scaling's gradient then sums
    # over the rows in float32 (a bf16 sum was 4.5% off float64 at 32 x 128; see ia3.scale_features)
    if activated_up is None:
        up = proj(d, "up")(ACTIVATIONS[c.activation](pre))
    else:
        up = activated_up(pre)
    up = up.astype(dtype)
    if c.scaling == "learned":
        up = up * param(module, "scaling", nn.initializers.ones, (1,)).astype(up.dtype)
    elif c.scaling == "channel":
        up = up * param(module, "scaling", nn.initializers.ones, (d,)).astype(up.dtype)
    elif c.scaling != 1.0:
        up = up * c.scaling
    return Dropout(c.dropout)(up, deterministic=deterministic)


def pre_forward(c: BottleneckConfig, h_out, x, layer_norm):
    """(adapter input z, residual) before the adapter(s) run (AdapterHub's pre_forward)."""
    if c.is_parallel:
        return x, x
    norm = (lambda y: y) if layer_norm is None else layer_norm
    residual = h_out if c.residual_before_ln is True else None
    z = h_out
    if c.original_ln_before:
        z = h_out + x
        if c.residual_before_ln == "post_add":
            residual = z
        z = norm(z)
    if not c.residual_before_ln:
        residual = z
    return z, residual


def adapter_output(c: BottleneckConfig, up, residual, ln_after):
    """One adapter's output from its bottleneck output `up` (AdapterHub's Adapter.forward)."""
    if c.is_parallel:
        return ln_after(up) if c.ln_after else up
    y = up + residual if c.adapter_residual_before_ln else up
    if c.ln_after:
        y = ln_after(y)
    return y if c.adapter_residual_before_ln else y + residual


def post_forward(c: BottleneckConfig, y, h_out, x, layer_norm):
    """The block's own residual and LayerNorm after the adapter(s) (AdapterHub's post_forward)."""
    norm = (lambda v: v) if layer_norm is None else layer_norm
    if c.is_parallel:
        return norm(y + h_out + x)
    return norm(y + x) if c.original_ln_after else y


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter at an activation site, AdapterHub semantics (see module doc).

    `forward` is one adapter's own computation; compositions (Stack, Fuse) call it between
    one `pre_forward` and one `post_forward`, as AdapterHub does.
    """
    config: BottleneckConfig
    dtype: Any = jnp.float32

    def core(self, z, deterministic: bool, shared, compute_dtype=None):
        del shared  # cross-layer parameters are Compacter's; plain bottlenecks have none
        return bottleneck(self, self.config, z, deterministic, self.dtype, compute_dtype=compute_dtype)

    @nn.compact
    def forward(self, z, residual, deterministic: bool = True, shared=None, compute_dtype=None):
        """(output, up): the adapter output and its scaled bottleneck output A(z) (fusion's input).
        compute_dtype: the backbone's (see `bottleneck`)."""
        up = self.core(z, deterministic, shared, compute_dtype)
        ln_after = lambda y: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_after")(y)
        return adapter_output(self.config, up, residual, ln_after), up

    def __call__(self, h_out, x, layer_norm, deterministic: bool = True, shared=None):
        z, residual = pre_forward(self.config, h_out, x, layer_norm)
        # the backbone's compute dtype is its sublayer output's: Pfeiffer's and the parallel
        # adapter's z (a LayerNorm output, the residual stream) are float32 in a bf16 backbone
        y, _ = self.forward(z, residual, deterministic, shared, compute_dtype=h_out.dtype)
        return post_forward(self.config, y, h_out, x, layer_norm)


def _register():
    from adapters_jax.adapters.spec import register
    register("bottleneck", BottleneckConfig, BottleneckAdapter, "activation")


_register()
