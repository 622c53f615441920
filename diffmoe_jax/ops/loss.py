"""The language-modelling loss as a pure function."""
from __future__ import annotations

import functools

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


def chunked_token_cross_entropy(x: jax.Array, w: jax.Array, labels: jax.Array, chunk_len: int,
                                constrain_logits=lambda logits: logits) -> jax.Array:
  """`token_cross_entropy(x @ w, labels)` without the `[B, T, V]` logits: x `[B, T, d]` and w `[d, V]` in the
  compute dtype, integer labels `[B, T]`; per-token cross-entropy `[B, T]` in nats.

  The logits exist `chunk_len` positions of every sequence at a time, in the forward and again in the
  backward, which recomputes each chunk's from x and w (one more output-head product) and saves only each
  token's log-sum-exp: memory B·chunk_len·V instead of B·T·V. Chunks run along the sequence, so a batch
  split over devices stays split. Each chunk's product is in float32 without a rounding to the compute
  dtype (`nn.layers.logits_product`), its backward in the compute dtype with float32 accumulation; w's
  gradient is summed over the chunks in float32. A T that `chunk_len` does not divide is padded (the padded
  positions take no part in the gradient). `constrain_logits`: a sharding hint applied to each chunk's.
  """
  b, t = labels.shape
  chunks = -(-t // chunk_len)
  pad = chunks * chunk_len - t
  as_chunks = lambda a: jnp.swapaxes(a.reshape((b, chunks, chunk_len) + a.shape[2:]), 0, 1)
  xs = as_chunks(jnp.pad(x, ((0, 0), (0, pad), (0, 0))))
  ls = as_chunks(jnp.pad(labels, ((0, 0), (0, pad))))
  ce = _chunked_cross_entropy(xs, w, ls, constrain_logits)
  return jnp.swapaxes(ce, 0, 1).reshape(b, chunks * chunk_len)[:, :t]


def _chunk_logits(x: jax.Array, w: jax.Array, constrain_logits) -> jax.Array:
  return constrain_logits(jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_cross_entropy(xs, w, labels, constrain_logits):
  return _chunked_cross_entropy_fwd(xs, w, labels, constrain_logits)[0]


def _chunked_cross_entropy_fwd(xs, w, labels, constrain_logits):
  def chunk(_, xl):
    x, label = xl
    return None, _logsumexp_and_label_logit(_chunk_logits(x, w, constrain_logits), label)

  _, (lse, label_logit) = lax.scan(chunk, None, (xs, labels))
  return lse - label_logit, (xs, w, labels, lse)


def _chunked_cross_entropy_bwd(constrain_logits, residuals, g):
  xs, w, labels, lse = residuals

  def chunk(dw, xlg):
    x, label, lse, g = xlg
    logits = _chunk_logits(x, w, constrain_logits)
    dlogits = _cross_entropy_bwd((logits, label, lse), g)[0].astype(x.dtype)  # the whole logits' softmax - one-hot
    dx = jnp.einsum("btv,dv->btd", dlogits, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return dw + jnp.einsum("btd,btv->dv", x, dlogits, preferred_element_type=jnp.float32), dx

  dw, dxs = lax.scan(chunk, jnp.zeros(w.shape, jnp.float32), (xs, labels, lse, g))
  return dxs, dw.astype(w.dtype), None


_chunked_cross_entropy.defvjp(_chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd)
