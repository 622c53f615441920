"""Sampling's settings: values that cannot mean what they say are errors, not read as no restriction."""
import jax
import jax.numpy as jnp
import numpy as np
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


def test_top_p_keeps_the_fewest_most_likely_tokens_reaching_p():
  """Against a float64 loop: tokens in order of probability are kept until their sum reaches top_p, the one that
  reaches it included. Each top_p lies midway between two partial sums, so rounding cannot move a boundary."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 9)) * 2
  for row in logits:
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    sums = np.cumsum(probs[order])
    for n in range(1, len(row)):  # top_p between the sums of the n and the n + 1 most likely tokens
      top_p = (sums[n - 1] + sums[n]) / 2
      kept = np.isfinite(np.asarray(sampling.restrict_logits(jnp.asarray(row[None], jnp.float32), top_p=top_p)))[0]
      want = np.zeros(len(row), bool)
      want[order[:n + 1]] = True
      np.testing.assert_array_equal(kept, want, err_msg=f"top_p={top_p}")


def test_top_k_and_top_p_together_keep_their_intersection():
  """Each rule alone keeps more than both together: row 0's nucleus is wider than its top 2, row 1's top 4 wider
  than its nucleus (top_p alone in place of the intersection passed every other test)."""
  logits = np.log(np.array([[0.3, 0.25, 0.2, 0.15, 0.1], [0.6, 0.3, 0.05, 0.03, 0.02]]))
  kept = np.isfinite(np.asarray(sampling.restrict_logits(jnp.asarray(logits, jnp.float32), top_k=2, top_p=0.8)))
  np.testing.assert_array_equal(kept, [[True, True, False, False, False], [True, True, False, False, False]])
  kept = np.isfinite(np.asarray(sampling.restrict_logits(jnp.asarray(logits, jnp.float32), top_k=4, top_p=0.8)))
  np.testing.assert_array_equal(kept, [[True, True, True, True, False], [True, True, False, False, False]])
