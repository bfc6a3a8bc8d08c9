"""Knowledge distillation loss: a plain student matches an adapted teacher's logits, which
removes the adapters' inference latency (experiments/distill.py runs it)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def distill_loss(student_logits, teacher_logits, labels, temperature: float, label_weight: float = 0.0):
    """(T^2 · KL(softmax(t/T) || softmax(s/T)) + label_weight · CE(s, labels), the KL term).

    Args:
      student_logits, teacher_logits: [B, C]; labels: [B] ints (used only if label_weight > 0).
    """
    t = jax.nn.log_softmax(teacher_logits / temperature, -1)  # [B, C]
    s = jax.nn.log_softmax(student_logits / temperature, -1)
    kl = jnp.sum(jnp.exp(t) * (t - s), -1).mean() * temperature ** 2
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
    return kl + label_weight * ce, kl
