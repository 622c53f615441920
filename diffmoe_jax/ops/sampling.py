"""Sampling the next token from logits: temperature, top-k and top-p (nucleus) restriction."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_settings(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, prefix: str = "") -> None:
  """ValueError naming the first setting that means nothing: a negative or non-finite temperature, a negative top_k
  or a top_p outside (0, 1] (the last two would otherwise be read as "no restriction"). `prefix` goes before each
  name in the message ("--" for command-line flags)."""
  if not (temperature >= 0 and math.isfinite(temperature)):
    raise ValueError(f"{prefix}temperature={temperature} must be a finite number >= 0 (0 is greedy).")
  if top_k < 0:
    raise ValueError(f"{prefix}top_k={top_k} must be >= 0 (0 keeps every token).")
  if not 0 < top_p <= 1:
    raise ValueError(f"{prefix}top_p={top_p} must lie in (0, 1] (1 keeps every token).")


def _check_logits(logits: jax.Array) -> None:
  if logits.ndim != 2:
    raise ValueError(f"logits must be [batch, vocab]; got shape {logits.shape}.")


def restrict_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """`logits` `[B, V]` with every token outside the support set to -inf.

  top_k > 0 keeps the k largest logits of each row (ties at the k-th value are kept too); top_p < 1 keeps
  the smallest set of most likely tokens whose probabilities sum to at least top_p (the most likely
  token always stays). Both given: the intersection.
  """
  _check_logits(logits)
  check_settings(top_k=top_k, top_p=top_p)
  logits = logits.astype(jnp.float32)
  keep = jnp.ones(logits.shape, jnp.bool_)
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    keep = logits >= kth
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
    # A token stays if the tokens more likely than it sum to less than top_p.
    keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = keep & jnp.zeros_like(keep).at[rows, order].set(keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def sample(logits: jax.Array, rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """The next token of each row of `logits` `[B, V]`, int32 `[B]`: greedy (argmax) at temperature 0,
  else drawn from softmax(logits / temperature) restricted by top_k / top_p."""
  _check_logits(logits)
  check_settings(temperature=temperature, top_k=top_k, top_p=top_p)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Tempered from each row's maximum, which stays 0: a tiny temperature would overflow the raw logits to inf
  # (inf - inf is NaN in the softmax), and 0 / a temperature that float32 flushes to zero would be NaN too.
  logits = logits.astype(jnp.float32)
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  tempered = jnp.where(shifted == 0, 0.0, shifted / temperature)
  restricted = restrict_logits(tempered, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, restricted, axis=-1).astype(jnp.int32)
