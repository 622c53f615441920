"""ops.loss.token_cross_entropy against float64 NumPy, and its gradient's form (no scatter over the logits)."""
import jax
import jax.numpy as jnp
import numpy as np

from diffmoe_jax.ops import loss as loss_lib


def _reference(logits, labels):
  """Float64 per-token cross-entropy and the gradient of its mean: (softmax - one-hot) / N."""
  z = np.asarray(logits, np.float64)
  shifted = z - z.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  one_hot = (np.arange(z.shape[-1]) == np.asarray(labels)[..., None]).astype(np.float64)
  ce = -(log_softmax * one_hot).sum(-1)
  return ce, (np.exp(log_softmax) - one_hot) / ce.size


def test_matches_float64_cross_entropy_and_its_gradient():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 37)).astype(np.float32) * 4
  logits[0, 0, 7] = 60.0  # a dominant logit: the log-sum-exp must not overflow
  labels = rng.integers(0, 37, size=(3, 5))
  labels[0, 0], labels[0, 1] = 7, 36  # the dominant one, and the last class
  want, want_grad = _reference(logits, labels)
  ce = loss_lib.token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
  np.testing.assert_allclose(np.asarray(ce), want, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda z: jnp.mean(loss_lib.token_cross_entropy(z, jnp.asarray(labels, jnp.int32))))(logits)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
  # bfloat16 logits are taken in float32
  half = loss_lib.token_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels, jnp.int32))
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(half), _reference(np.asarray(jnp.asarray(logits, jnp.bfloat16),
                                                                     np.float32), labels)[0], rtol=1e-5, atol=1e-5)


def test_the_gradient_takes_each_tokens_own_cotangent():
  """A weighted sum of the per-token losses (weights of either sign, as padding weights or a difference of
  losses give) has the gradient (softmax - one-hot) x each token's weight; a mean's equal weights cannot tell."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  labels = rng.integers(0, 11, size=(3, 5))
  weights = rng.normal(size=(3, 5)).astype(np.float32)
  z = np.asarray(logits, np.float64)
  softmax = np.exp(z - z.max(-1, keepdims=True))
  softmax /= softmax.sum(-1, keepdims=True)
  one_hot = np.arange(11) == labels[..., None]
  grad = jax.grad(lambda x: jnp.sum(loss_lib.token_cross_entropy(x, jnp.asarray(labels, jnp.int32)) * weights))(
      jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad), (softmax - one_hot) * weights[..., None], rtol=1e-5, atol=1e-6)


def test_a_large_vocabulary_and_equal_logits_match_float64():
  """The one-pass reduction's rescaled partial sums over 65,536 classes (as XLA splits them), and rows of
  equal logits (every partial maximum ties)."""
  rng = np.random.default_rng(1)
  logits = (rng.normal(size=(2, 3, 65536)) * 6).astype(np.float32)
  logits[1, 2] = 3.0
  labels = rng.integers(0, 65536, size=(2, 3))
  ce = jax.jit(loss_lib.token_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
  np.testing.assert_allclose(np.asarray(ce), _reference(logits, labels)[0], rtol=2e-6)
  assert abs(float(ce[1, 2]) - np.log(65536)) < 1e-4


def test_the_gradient_reads_the_logits_once_without_a_scatter():
  """The label's logit by comparison: its gradient is elementwise (a gather's would scatter-add into a zero
  array the size of the logits, a pass of its own over them)."""
  logits = jax.ShapeDtypeStruct((2, 8, 512), jnp.float32)
  labels = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  grad = jax.grad(lambda z, t: jnp.mean(loss_lib.token_cross_entropy(z, t)))
  text = jax.jit(grad).lower(logits, labels).as_text()
  assert "scatter" not in text and "gather" not in text


def _head_reference(x, w, labels):
  """Float64 per-token cross-entropy of x @ w, and the gradients of its weighted sum: (softmax - one-hot)
  times each token's weight, pulled back through the product."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  logits = x64 @ w64
  ce, _ = _reference(logits, labels)
  softmax = np.exp(logits - logits.max(-1, keepdims=True))
  softmax /= softmax.sum(-1, keepdims=True)
  return ce, softmax - (np.arange(w.shape[1]) == np.asarray(labels)[..., None])


def test_chunked_cross_entropy_matches_float64_with_a_ragged_last_chunk():
  """Chunks of 4 over 11 positions (the last one padded), against the float64 loss of the whole logits: the
  per-token loss and the gradients of a weighted sum of it in x and w (each token's own cotangent)."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 11, 8)).astype(np.float32)
  w = (rng.normal(size=(8, 37)) * 0.8).astype(np.float32)
  labels = rng.integers(0, 37, size=(2, 11))
  weights = rng.normal(size=(2, 11)).astype(np.float32)
  want, dlogits = _head_reference(x, w, labels)
  labels32 = jnp.asarray(labels, jnp.int32)
  ce = loss_lib.chunked_token_cross_entropy(jnp.asarray(x), jnp.asarray(w), labels32, 4)
  assert ce.shape == (2, 11) and ce.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ce), want, rtol=1e-5, atol=1e-5)
  dx, dw = jax.grad(lambda x, w: jnp.sum(loss_lib.chunked_token_cross_entropy(x, w, labels32, 4) * weights),
                    argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  g = dlogits * weights[..., None]
  np.testing.assert_allclose(np.asarray(dx), g @ np.asarray(w, np.float64).T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), np.einsum("btd,btv->dv", np.asarray(x, np.float64), g),
                             rtol=1e-4, atol=1e-5)


def test_chunked_cross_entropy_in_bfloat16_sums_the_head_gradient_in_float32():
  """bfloat16 x and w: the loss is the float32 product's (no rounding of the logits), and w's gradient, summed
  over 16 chunks, is as close to float64 as one bfloat16 rounding (a bfloat16 running sum would add one per
  chunk)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 64, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(16, 50)) * 0.5, jnp.bfloat16)
  labels = rng.integers(0, 50, size=(1, 64))
  want, dlogits = _head_reference(np.asarray(x, np.float32), np.asarray(w, np.float32), labels)
  labels32 = jnp.asarray(labels, jnp.int32)
  ce = loss_lib.chunked_token_cross_entropy(x, w, labels32, 4)
  np.testing.assert_allclose(np.asarray(ce), want, rtol=1e-5, atol=1e-5)
  dw = jax.grad(lambda w: jnp.sum(loss_lib.chunked_token_cross_entropy(x, w, labels32, 4)))(w)
  assert dw.dtype == jnp.bfloat16
  # the softmax's gradient rounded to bfloat16 before its product (as the unchunked backward does)
  rounded = np.asarray(jnp.asarray(dlogits, jnp.bfloat16), np.float64)
  want_dw = np.einsum("btd,btv->dv", np.asarray(x, np.float64), rounded)
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, rtol=2 ** -8, atol=1e-3)


def test_chunked_cross_entropy_keeps_one_chunks_logits():
  """The compiled forward and backward over 4,096 positions and 8,192 classes hold one chunk's logits (256
  positions: 8 MiB in float32), not the whole (128 MiB)."""
  x = jax.ShapeDtypeStruct((1, 4096, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((32, 8192), jnp.float32)
  labels = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
  loss = lambda x, w, t, chunk: jnp.mean(loss_lib.chunked_token_cross_entropy(x, w, t, chunk))
  temp = lambda chunk: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3).lower(
      x, w, labels, chunk).compile().memory_analysis().temp_size_in_bytes
  whole_logits = 4096 * 8192 * 4
  assert temp(256) < whole_logits / 4
  assert temp(4096) > whole_logits
