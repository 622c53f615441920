"""Sampling's settings: values that cannot mean what they say are errors, not read as no restriction."""
import jax
import jax.numpy as jnp
import pytest

from diffmoe_jax.ops import sampling

LOGITS = jnp.array([[0.0, 1.0, 2.0]])


@pytest.mark.parametrize("settings, message", [
    ({"temperature": -1.0}, r"temperature=-1\.0 must be a finite number >= 0"),
    ({"temperature": float("nan")}, r"temperature=nan must be a finite number >= 0"),
    ({"top_k": -3}, r"top_k=-3 must be >= 0"),
    ({"top_p": 0.0}, r"top_p=0\.0 must lie in \(0, 1\]"),
    ({"top_p": float("nan")}, r"top_p=nan must lie in \(0, 1\]"),
    ({"top_p": 1.5, "temperature": 0.0}, r"top_p=1\.5 must lie in \(0, 1\]"),
])
def test_bad_settings_are_errors(settings, message):
  with pytest.raises(ValueError, match=message):
    sampling.sample(LOGITS, jax.random.PRNGKey(0), **settings)


def test_logits_must_be_batch_by_vocab():
  with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\]; got shape \(3,\)"):
    sampling.restrict_logits(LOGITS[0], top_p=0.5)


def test_top_k_keeps_every_token_tied_with_the_kth():
  """The docstring's rule: top_k keeps the k largest logits, and every logit equal to the k-th."""
  logits = jnp.array([[3.0, 1.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 1.0, 4.0]])
  kept = jnp.isfinite(sampling.restrict_logits(logits, top_k=2))
  assert kept.tolist() == [[True, False, True, True, False], [True, True, True, False, False]]
