"""Helpers shared by the training-attention tests: `attend` as a flax module (its dropout rng
stream), and XLA's temporary bytes per layer of a stack of training attentions."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from adapters_jax.backbones import attention


class Attend(nn.Module):
    """attention.attend in training mode at dropout `rate`."""
    rate: float

    @nn.compact
    def __call__(self, q, k, v, mask):
        return attention.attend(q, k, v, mask, self.rate, False, self)


def per_score_temp_bytes(backward: str = "keep", b=4, t=128, h=4, dh=32) -> float:
    """XLA's temporary bytes per layer and attention score for the gradient of chained float32
    training attentions under `backward` ('keep' or 'recompute'): the difference of 4 and 2 layers."""
    mask = jnp.ones((b, 1, t, t), bool)

    def temp_bytes(layers):
        def loss(x):  # [B, T, H, Dh]
            for i in range(layers):
                x = x + Attend(0.1).apply({}, x, x * 2, x * 3, mask, rngs={"dropout": jax.random.PRNGKey(i)})
            return jnp.sum(x ** 2)
        x = jnp.zeros((b, t, h, dh), jnp.float32)
        return jax.jit(jax.grad(loss)).lower(x).compile().memory_analysis().temp_size_in_bytes

    previous = attention.set_training_backward(backward)
    try:
        return (temp_bytes(4) - temp_bytes(2)) / 2 / (b * h * t * t)
    finally:
        attention.set_training_backward(previous)
