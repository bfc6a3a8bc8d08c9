"""Dense layers whose bf16 matmuls take the CPU's fast bf16 kernels, forward and backward.

Why: on XLA:CPU a bf16 x bf16 dot runs at about twice the float32 rate (avx512_bf16/AMX,
through XNNPACK/YNNPACK) only in one shape: row-major [M, K] @ [K, N] with a float32
result. A bf16 result, or a transposed operand, falls back to a float32 dot (with converts),
which is why flax's `nn.Dense(dtype=bfloat16)` was no faster than float32. Autodiff of a dot
produces exactly the transposed forms: dx = g @ W^T and dW = x^T @ g, and XLA folds a plain
`.T` back into the dot's dimension numbers. So `mixed_matmul` has its own VJP that
materialises the transposes in a form the simplifier leaves alone and keeps every dot
canonical, and it saves its residuals in bf16 (half the activation memory), and only those the
backward uses: a frozen kernel's input is not kept.

float32 layers on XLA:CPU take `float32_matmul`, nn.Dense's forward with a backward on 2-D rows:
autodiff's weight gradient contracts a [B, T, K] input over two axes, and writes narrow results
([384, 64]) in the slower orientation (one MiniLM FFN layer's forward, dx and dW at 32 x 128:
105 -> 71 ms).

Only XLA:CPU takes these paths (`use_cpu_bf16_kernels`, `use_cpu_float32_matmul`); GPU and TPU
keep flax's.

Measured on the 2-core AVX-512 CPU at [4096, 384] @ [384, 1536]: forward 12.3 ms (bf16,
float32 result) vs 24 ms (float32) vs 30.5 ms (bf16 result); dx with a folded transpose
27 ms, materialised 12.4 ms.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from adapters_jax.backbones.grad_barrier import not_before
from adapters_jax.param import param


def materialized_permute(a: jnp.ndarray, perm: tuple) -> jnp.ndarray:
    """jnp.transpose(a, perm) as an array XLA writes out, instead of folding the transpose into
    the consuming dot (the fold makes the dot non-canonical, which the fast bf16 kernels
    reject). A trailing unit axis rides along, which the simplifier does not see through."""
    out = jnp.transpose(a[..., None], tuple(perm) + (a.ndim,))
    return out.reshape(out.shape[:-1])


def materialized_transpose(a: jnp.ndarray) -> jnp.ndarray:
    """[..., M, K] -> [..., K, M], written out (see materialized_permute)."""
    n = a.ndim
    return materialized_permute(a, tuple(range(n - 2)) + (n - 1, n - 2))


def _dot_f32(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """[..., K] @ [K, N] -> [..., N] float32, contracting a's last axis with b's first."""
    return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def bdot_f32(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """[..., M, K] @ [..., K, N] -> [..., M, N] float32, batched over the leading axes."""
    n = a.ndim
    batch = tuple(range(n - 2))
    return lax.dot_general(a, b, (((n - 1,), (n - 2,)), (batch, batch)),
                           preferred_element_type=jnp.float32)


@jax.custom_vjp
def mixed_matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """x [..., K] @ kernel [K, N] with bf16 inputs and float32 accumulation -> [..., N] float32."""
    return _dot_f32(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))


def _fwd(x, kernel):
    """Saves only what the backward needs: x only when the kernel is differentiated (a frozen
    weight needs no dW, so its input is not kept), the kernel only when x is."""
    xb, wb = x.value.astype(jnp.bfloat16), kernel.value.astype(jnp.bfloat16)
    # the zero-size arrays carry the primal dtypes (and the kernel's shape) to the backward
    res = (xb if kernel.perturbed else None, wb if x.perturbed else None,
           jnp.zeros((0,), x.value.dtype), jnp.zeros((0,) + wb.shape, kernel.value.dtype))
    return _dot_f32(xb, wb), res


def _bwd(res, g):
    xb, wb, x_like, w_like = res
    k, n = w_like.shape[1:]
    if isinstance(g, SymbolicZero):
        return None, None
    gb = g.astype(jnp.bfloat16)  # [..., N]
    dx = None if wb is None else _dot_f32(gb, materialized_transpose(wb)).astype(x_like.dtype)  # [..., K]
    # dW = x^T g over all leading axes
    dw = None if xb is None else _dot_f32(materialized_transpose(xb.reshape(-1, k)),
                                          gb.reshape(-1, n)).astype(w_like.dtype)  # [K, N]
    return dx, dw


mixed_matmul.defvjp(_fwd, _bwd, symbolic_zeros=True)


def weight_gradient(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """dW = x^T g [K, N] from x [M, K] and g [M, N] (M rows, here 4096), with the narrower of K
    and N as the rows of the dot's result: XLA:CPU's float32 kernels ran a narrow-output dot
    (N = 64, or 8) at half the rate. Measured at M = 4096 on the 2-core EPYC (medians of 30):
    [384, 64] 3.36 -> 2.34 ms, [384, 8] 1.83 -> 0.71, [1536, 384] 37.6 -> 34.6; with K < N
    x^T g is the faster form (as autodiff writes it), so it stays."""
    if x.shape[1] <= g.shape[1]:
        return _dot_t(x, g)  # [K, N]
    return materialized_transpose(_dot_t(g, x))  # [N, K] written out as [K, N]


def _dot_t(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a^T b: a [M, P], b [M, Q] -> [P, Q], contracting the rows."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())))


@jax.custom_vjp
def float32_matmul(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """x [..., K] @ kernel [K, N] -> [..., N] as nn.Dense computes it; its backward computes dW
    with `weight_gradient` and dx as autodiff does. For float32 on XLA:CPU."""
    return _dense_dot(x, kernel)


def _dense_dot(x: jnp.ndarray, kernel: jnp.ndarray, precision=None) -> jnp.ndarray:
    """nn.Dense's product: x [..., K] @ kernel [K, N] -> [..., N]."""
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _f32_fwd(x, kernel):
    """Keeps x only when the kernel is differentiated, the kernel only when x is (as autodiff)."""
    res = (x.value if kernel.perturbed else None, kernel.value if x.perturbed else None,
           jnp.zeros((0,) + kernel.value.shape, kernel.value.dtype))
    return _dense_dot(x.value, kernel.value), res


def _f32_bwd(res, g):
    x, kernel, w_like = res
    if isinstance(g, SymbolicZero):
        return None, None
    k, n = w_like.shape[1:]
    dw = None if x is None else weight_gradient(x.reshape(-1, k), g.reshape(-1, n))  # [K, N]
    if dw is not None and kernel is not None:
        # dx after dW, so that x (the residual, a [N, F] GELU output at the FFN's second matmul)
        # is freed before dx is written; XLA:CPU's scheduler put dx first (+14 MiB for full
        # fine-tuning at MiniLM 32 x 128)
        kernel = not_before(kernel, dw, trailing=2)
    dx = None if kernel is None else lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))  # [..., K]
    return dx, dw


float32_matmul.defvjp(_f32_fwd, _f32_bwd, symbolic_zeros=True)


def _canonical_bmm(dot_dtype):
    """Batched a [..., M, K] @ b [..., K, N] with `dot_dtype` inputs and float32 accumulation ->
    [..., M, N] float32, with canonical dots in its VJP too (attention's QK^T in training; PV is
    in softmax_pv). Built once per dot dtype: bf16 takes XLA:CPU's fast kernels, float32 keeps
    the same written-out layouts and saves only what the backward uses."""

    @jax.custom_vjp
    def bmm(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
        return bdot_f32(a.astype(dot_dtype), b.astype(dot_dtype))

    def fwd(a, b):
        ad, bd = a.value.astype(dot_dtype), b.value.astype(dot_dtype)
        res = (ad if b.perturbed else None, bd if a.perturbed else None,
               jnp.zeros((0,), a.value.dtype), jnp.zeros((0,), b.value.dtype))
        return bdot_f32(ad, bd), res

    def bwd(res, g):
        ad, bd, a_like, b_like = res
        if isinstance(g, SymbolicZero):
            return None, None
        gd = g.astype(dot_dtype)  # [..., M, N]
        da = None if bd is None else bdot_f32(gd, materialized_transpose(bd)).astype(a_like.dtype)  # [..., M, K]
        db = None if ad is None else bdot_f32(materialized_transpose(ad), gd).astype(b_like.dtype)  # [..., K, N]
        return da, db

    bmm.defvjp(fwd, bwd, symbolic_zeros=True)
    return bmm


mixed_bmm = _canonical_bmm(jnp.bfloat16)  # bf16 inputs, float32 accumulation and result
float32_bmm = _canonical_bmm(jnp.float32)  # the same layouts and residuals in float32


def is_bf16(dtype) -> bool:
    return dtype is not None and jnp.dtype(dtype) == jnp.bfloat16


def use_cpu_bf16_kernels(dtype) -> bool:
    """True for bf16 compute on XLA:CPU, the backend these layouts are shaped for. GPU and TPU
    compilers pick their own layouts for bf16 dots, where the written-out transposes would be
    extra copies, so there the standard path runs."""
    return is_bf16(dtype) and jax.default_backend() == "cpu"


def use_cpu_float32_matmul(dtype, precision=None) -> bool:
    """True for float32 compute on XLA:CPU at default precision: `float32_matmul`'s weight
    gradient layout is measured there; other backends keep autodiff's dot."""
    return (jnp.dtype(dtype) == jnp.float32 and precision is None
            and jax.default_backend() == "cpu")


def product_by_kind(kind: str, x: jnp.ndarray, kernel: jnp.ndarray, precision=None) -> jnp.ndarray:
    """x [..., K] @ kernel [K, N] by `dense_apply`'s kind: 'mixed' (bf16 on CPU), 'float32'
    (float32 on CPU) or 'dot' (nn.Dense's dot_general, any other case)."""
    if kind == "mixed":
        return mixed_matmul(x, kernel)
    if kind == "float32":
        return float32_matmul(x, kernel)
    return _dense_dot(x, kernel, precision)


def dense_apply(inputs: jnp.ndarray, kernel: jnp.ndarray, bias, dtype, precision=None,
                product=product_by_kind) -> jnp.ndarray:
    """What `Dense` computes from its parameters: inputs [..., K] @ kernel [K, N] + bias.
    `product(kind, x, kernel, precision)` multiplies (a subclass may fold work into it)."""
    if not use_cpu_bf16_kernels(dtype):
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=dtype)
        kind = "float32" if use_cpu_float32_matmul(inputs.dtype, precision) else "dot"
        y = product(kind, inputs, kernel, precision)
        return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    y = product("mixed", inputs, kernel, precision)  # [..., N] float32
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


class Dense(nn.Dense):
    """nn.Dense (same parameters, same init) that routes bf16 compute on CPU through
    `mixed_matmul`: bf16 inputs, float32 accumulation and bias add, then the output cast to
    bf16, and float32 compute on CPU through `float32_matmul` (nn.Dense's forward; its weight
    gradient on 2-D rows). Otherwise (another backend) it computes exactly what nn.Dense does."""

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        kernel, bias = self.parameters(jnp.shape(inputs)[-1])
        return dense_apply(inputs, kernel, bias, self.dtype, self.precision)

    def parameters(self, in_features: int):
        """(kernel [K, N], bias [N] or None), created as nn.Dense creates them."""
        kernel = param(self, "kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
        bias = param(self, "bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return kernel, bias
