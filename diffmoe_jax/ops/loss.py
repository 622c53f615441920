"""The language-modelling loss as a pure function."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The reductions' starting maximum: finite, so that combining two empty partial results (as a tree reduction
# may) gives 0 · exp(0), not 0 · exp(-inf + inf) = NaN.
_LOWEST = float(jnp.finfo(jnp.float32).min)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-token cross-entropy in nats, `logsumexp(logits) - logits[label]`: logits `[..., V]` (computed in
  float32), integer labels `[...]` in [0, V).

  One pass over the logits: a single reduction carries the running maximum, the sum of exponentials
  rescaled to it (the online softmax's) and the label's logit, picked by comparing an iota with the label
  rather than gathered. The gradient, `softmax - one_hot`, is one elementwise pass more (a gather's would
  scatter-add into a zero array as large as the logits).
  """
  return _cross_entropy(logits.astype(jnp.float32), labels)


def _label_mask(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1) == labels[..., None]


def _logsumexp_and_label_logit(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  def combine(a, b):
    (max_a, sum_a, label_a), (max_b, sum_b, label_b) = a, b
    top = jnp.maximum(max_a, max_b)
    return top, sum_a * jnp.exp(max_a - top) + sum_b * jnp.exp(max_b - top), label_a + label_b

  operands = (logits, jnp.ones_like(logits), jnp.where(_label_mask(logits, labels), logits, 0.0))
  top, total, label_logit = lax.reduce(operands, (_LOWEST, 0.0, 0.0), combine, (logits.ndim - 1,))
  return top + jnp.log(total), label_logit


def _cross_entropy_fwd(logits, labels):
  lse, label_logit = _logsumexp_and_label_logit(logits, labels)
  return lse - label_logit, (logits, labels, lse)


@jax.custom_vjp
def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return _cross_entropy_fwd(logits, labels)[0]


def _cross_entropy_bwd(residuals, g):
  logits, labels, lse = residuals
  one_hot = _label_mask(logits, labels).astype(logits.dtype)
  return (jnp.exp(logits - lse[..., None]) - one_hot) * g[..., None], None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
