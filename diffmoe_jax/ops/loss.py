"""The language-modelling loss as a pure function."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-token cross-entropy in nats, `logsumexp(logits) - logits[label]`: logits `[..., V]` (computed in
  float32), integer labels `[...]` in [0, V).

  The label's logit is picked by comparing an iota with the label, not gathered: a gather's gradient is a
  scatter-add into a zero array as large as the logits, while a comparison fuses with the softmax of the
  backward into one elementwise pass over them (and with the cast of its result to the compute dtype).
  """
  logits = logits.astype(jnp.float32)
  vocab = lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
  picked = jnp.sum(jnp.where(vocab == labels[..., None], logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - picked
