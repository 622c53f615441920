"""Differential / standard attention and RoPE against float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax.ops import attention as attn


def _softmax_rows(scores, visible):
  scores = np.where(visible, scores, -np.inf)
  if not visible.any():
    return np.zeros_like(scores)
  e = np.exp(scores - scores[visible].max())
  return e / e.sum()


def reference_differential(q, k, v, lam, q_pos, kv_pos, kv_mask, causal=True):
  """Per (batch, query, head) loop in float64; lam is [B, T, H]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b_, t_, h_, _, d = q.shape
  out = np.zeros((b_, t_, h_, v.shape[-1]))
  for b in range(b_):
    for t in range(t_):
      visible = np.ones(k.shape[1], bool) if not causal else kv_pos[b] <= q_pos[b, t]
      if kv_mask is not None:
        visible = visible & kv_mask[b]
      for h in range(h_):
        a0 = _softmax_rows(k[b, :, h, 0] @ q[b, t, h, 0] / np.sqrt(d), visible)
        a1 = _softmax_rows(k[b, :, h, 1] @ q[b, t, h, 1] / np.sqrt(d), visible)
        out[b, t, h] = a0 @ v[b, :, h] - lam[b, t, h] * (a1 @ v[b, :, h])
  return out


def _inputs(rng, b=2, t=5, s=5, h=3, d=4):
  q = rng.normal(size=(b, t, h, 2, d)).astype(np.float32)
  k = rng.normal(size=(b, s, h, 2, d)).astype(np.float32)
  v = rng.normal(size=(b, s, h, 2 * d)).astype(np.float32)
  return q, k, v


@pytest.mark.parametrize("implementation", ["explicit", "fused"])
@pytest.mark.parametrize("lam_kind", ["scalar", "per_head", "per_token"])
def test_differential_matches_reference(implementation, lam_kind):
  rng = np.random.default_rng(0)
  q, k, v = _inputs(rng)
  b, t, h = q.shape[:3]
  lam = {"scalar": np.float32(0.37), "per_head": rng.uniform(0, 1, h).astype(np.float32),
         "per_token": rng.uniform(-0.5, 1, (b, t, h)).astype(np.float32)}[lam_kind]
  pos = np.broadcast_to(np.arange(t), (b, t))
  got = attn.differential_attention(q, k, v, lam, implementation=implementation)
  want = reference_differential(q, k, v, np.broadcast_to(lam, (b, t, h)), pos, pos, None)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["explicit", "fused"])
def test_decode_positions_and_kv_mask(implementation):
  """S != T: two new queries at positions 6, 7 over a cache of 8 slots, two of them empty."""
  rng = np.random.default_rng(1)
  q, k, v = _inputs(rng, t=2, s=8)
  b, t, h = q.shape[:3]
  q_pos = np.broadcast_to(np.array([6, 7]), (b, t)).astype(np.int32)
  kv_pos = np.broadcast_to(np.arange(8), (b, 8)).astype(np.int32)
  kv_mask = np.ones((b, 8), bool)
  kv_mask[0, 2] = kv_mask[1, 5] = False
  lam = rng.uniform(0, 1, (b, t, h)).astype(np.float32)
  got = attn.differential_attention(q, k, v, lam, q_positions=q_pos, kv_positions=kv_pos, kv_mask=kv_mask,
                                    implementation=implementation)
  want = reference_differential(q, k, v, lam, q_pos, kv_pos, kv_mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # The default positions put the queries at the end of the keys: the same result without kv_mask.
  default = attn.differential_attention(q, k, v, lam, implementation=implementation)
  np.testing.assert_allclose(np.asarray(default), reference_differential(q, k, v, lam, q_pos, kv_pos, None),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["explicit", "fused", "blockwise"])
def test_non_causal_sees_every_valid_key(implementation):
  """causal=False: every query sees every key kv_mask keeps, later positions included."""
  rng = np.random.default_rng(7)
  q, k, v = _inputs(rng, t=5, s=7)
  b, t, h = q.shape[:3]
  q_pos = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
  kv_pos = np.broadcast_to(np.arange(7), (b, 7)).astype(np.int32)
  kv_mask = np.ones((b, 7), bool)
  kv_mask[0, 6] = kv_mask[1, 0] = False
  lam = rng.uniform(0, 1, (b, t, h)).astype(np.float32)
  got = attn.differential_attention(q, k, v, lam, causal=False, q_positions=q_pos, kv_positions=kv_pos,
                                    kv_mask=kv_mask, implementation=implementation, block_q=2, block_k=2)
  want = reference_differential(q, k, v, lam, q_pos, kv_pos, kv_mask, causal=False)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert np.abs(want - reference_differential(q, k, v, lam, q_pos, kv_pos, kv_mask)).max() > 0.1


def test_gathered_positions_subset():
  """Mixture-of-depths: a token subset at its original (non-contiguous) positions."""
  rng = np.random.default_rng(2)
  q, k, v = _inputs(rng, t=4, s=4)
  b, t, h = q.shape[:3]
  pos = np.array([[0, 3, 4, 9], [2, 5, 6, 7]], np.int32)
  lam = rng.uniform(0, 1, (b, t, h)).astype(np.float32)
  got = attn.differential_attention(q, k, v, lam, q_positions=pos, kv_positions=pos)
  np.testing.assert_allclose(np.asarray(got), reference_differential(q, k, v, lam, pos, pos, None),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["explicit", "fused"])
def test_lambda_zero_is_softmax_attention(implementation):
  """λ = 0 leaves the first map: plain softmax attention with q₀, k₀ (NumPy reference)."""
  rng = np.random.default_rng(3)
  q, k, v = _inputs(rng)
  got = attn.differential_attention(q, k, v, 0.0, implementation=implementation)
  d = q.shape[-1]
  scores = np.einsum("bthd,bshd->bhts", q[:, :, :, 0].astype(np.float64), k[:, :, :, 0]) / np.sqrt(d)
  t = q.shape[1]
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhts,bshv->bthv", p, v.astype(np.float64))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  std = attn.standard_attention(q[:, :, :, 0], k[:, :, :, 0], v, implementation="explicit")
  np.testing.assert_allclose(np.asarray(std), want, rtol=1e-5, atol=1e-5)


def test_fully_masked_row_is_zero_not_nan():
  rng = np.random.default_rng(4)
  q, k, v = _inputs(rng, b=1, t=1, s=3)
  out = attn.differential_attention(q, k, v, 0.5, q_positions=np.array([[0]]), kv_positions=np.array([[1, 2, 3]]))
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_rope_against_complex_rotation():
  """RoPE as a complex rotation of (x1 + i x2) by position * frequency, in float64."""
  rng = np.random.default_rng(5)
  b, t, h, d, theta = 2, 6, 3, 8, 10000 * np.pi
  x = rng.normal(size=(b, t, h, d)).astype(np.float32)
  pos = rng.integers(0, 1000, size=(b, t))
  got = np.asarray(attn.apply_rope(jnp.asarray(x), jnp.asarray(pos), theta))
  freqs = theta ** (-np.arange(0, d, 2) / d)
  z = (x[..., : d // 2] + 1j * x[..., d // 2:]).astype(np.complex128)
  z = z * np.exp(1j * pos[:, :, None, None] * freqs)
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-4, atol=1e-4)
  # Relative positions: the q·k product depends only on the position difference.
  q, k = rng.normal(size=(2, d)).astype(np.float32)
  def dot(pq, pk):
    rq = attn.apply_rope(jnp.asarray(q)[None, None], jnp.array([[pq]]), theta)
    rk = attn.apply_rope(jnp.asarray(k)[None, None], jnp.array([[pk]]), theta)
    return float(jnp.sum(rq * rk))
  assert dot(10, 3) == pytest.approx(dot(107, 100), rel=1e-4, abs=1e-5)


def test_lambda_init_schedule():
  got = np.asarray(attn.lambda_init_schedule(jnp.arange(4)))
  np.testing.assert_allclose(got, [0.8 - 0.6 * np.exp(-0.3 * l) for l in range(4)], rtol=1e-6)


def test_bad_shapes_raise():
  q = np.zeros((1, 2, 3, 2, 4), np.float32)
  with pytest.raises(ValueError, match="expects q"):
    attn.differential_attention(q, q, np.zeros((1, 2, 2, 8), np.float32), 0.5)
  with pytest.raises(ValueError, match="lam must be"):
    attn.differential_attention(q, q, np.zeros((1, 2, 3, 8), np.float32), np.zeros((2, 3)))


def _plain_differential(q, k, v, lam, q_pos, kv_pos, kv_mask):
  """Differential attention written directly in jnp (autodiff gives its gradient)."""
  d = q.shape[-1]
  visible = (kv_pos[:, None, :] <= q_pos[:, :, None]) & kv_mask[:, None, :]
  def attention_map(j):
    scores = jnp.einsum("bthd,bshd->bhts", q[:, :, :, j], k[:, :, :, j]) / jnp.sqrt(d)
    return jax.nn.softmax(jnp.where(visible[:, None], scores, -1e30), axis=-1)
  out = (jnp.einsum("bhts,bshv->bthv", attention_map(0), v)
         - lam[..., None] * jnp.einsum("bhts,bshv->bthv", attention_map(1), v))
  return out


def test_gradients_match_autodiff_of_the_plain_formula():
  """The explicit path's hand-written VJP against autodiff of the direct formula, per-token λ, masks."""
  rng = np.random.default_rng(6)
  q, k, v = (jnp.asarray(a) for a in _inputs(rng, t=6, s=6))
  b, t, h = q.shape[:3]
  lam = jnp.asarray(rng.uniform(-0.5, 1, (b, t, h)), jnp.float32)
  pos = jnp.asarray(np.sort(rng.choice(20, size=(b, t), replace=False), axis=1), jnp.int32)
  kv_mask = jnp.asarray(np.array([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1]], bool))
  cotangent = jnp.asarray(rng.normal(size=(b, t, h, v.shape[-1])), jnp.float32)

  def loss(fn):
    return lambda q, k, v, lam: jnp.sum(fn(q, k, v, lam) * cotangent)
  ours = jax.grad(loss(lambda q, k, v, lam: attn.differential_attention(
      q, k, v, lam, q_positions=pos, kv_positions=pos, kv_mask=kv_mask)), argnums=(0, 1, 2, 3))(q, k, v, lam)
  plain = jax.grad(loss(lambda q, k, v, lam: _plain_differential(q, k, v, lam, pos, pos, kv_mask)),
                   argnums=(0, 1, 2, 3))(q, k, v, lam)
  for name, got, want in zip(("dq", "dk", "dv", "dlam"), ours, plain):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=name)


def test_resolve_attention_impl_on_cpu():
  assert attn.resolve_attention_impl("xla", length=8) == "explicit"  # the old name keeps working
  assert attn.resolve_attention_impl("pallas", length=8) == "pallas"
  assert attn.resolve_attention_impl("auto", length=attn.CPU_BLOCKWISE_FROM - 1) == "explicit"
  assert attn.resolve_attention_impl("auto", length=attn.CPU_BLOCKWISE_FROM) == "blockwise"
  with pytest.raises(ValueError, match="implementation must be one of"):
    attn.resolve_attention_impl("flash", length=8)


_Q, _K, _V = jnp.ones((1, 4, 2, 2, 8)), jnp.ones((1, 4, 2, 2, 8)), jnp.ones((1, 4, 2, 16))


@pytest.mark.parametrize("call, message", [
    (lambda: attn.differential_attention(_Q, _K, _V, jnp.ones((3,))),
     r"lam must be a scalar, \[H\] = \(2,\) or \[B, T, H\] = \(1, 4, 2\); got shape \(3,\)"),
    (lambda: attn.differential_attention(_Q, _K, _V, 0.5, q_positions=jnp.zeros((1, 3), jnp.int32)),
     r"q_positions \[B, T\] must be \(1, 4\); got \(1, 3\)"),
    (lambda: attn.differential_attention(_Q, _K, _V, 0.5, kv_positions=jnp.zeros((4,), jnp.int32)),
     r"kv_positions \[B, S\] must be \(1, 4\); got \(4,\)"),
    (lambda: attn.differential_attention(_Q, _K, _V, 0.5, q_segment_ids=jnp.zeros((2, 4), jnp.int32)),
     r"q_segment_ids \[B, T\] must be \(1, 4\); got \(2, 4\)"),
    (lambda: attn.standard_attention(_Q, _K, _V), r"standard_attention expects q \[B,T,H,D\], k \[B,S,H,D\]"),
    (lambda: attn.standard_attention(_Q[:, :, :, 0], _K[:, :, :, 0, :6], _V),
     r"standard_attention expects .* got q \(1, 4, 2, 8\), k \(1, 4, 2, 6\)"),
    (lambda: attn.apply_rope(jnp.ones((1, 4, 2, 7)), jnp.zeros((1, 4), jnp.int32), 1e4),
     r"apply_rope rotates pairs of dimensions; the last axis of x \(1, 4, 2, 7\) must be even"),
    # The blockwise and Pallas paths took a kv_mask of the wrong length, float masks and positions (rounding
    # them where the explicit path did not) and integer q (scaled to 0 by the explicit path) without a word.
    (lambda: attn.differential_attention(_Q, _K, _V, 0.5, kv_mask=jnp.ones((1, 5), bool), implementation="blockwise"),
     r"kv_mask \[B, S\] must be \(1, 4\); got \(1, 5\)"),
    (lambda: attn.standard_attention(_Q[:, :, :, 0], _K[:, :, :, 0], _V, kv_mask=jnp.ones((4,), bool),
                                     implementation="pallas_tpu"), r"kv_mask \[B, S\] must be \(1, 4\); got \(4,\)"),
    (lambda: attn.differential_attention(_Q, _K, _V, 0.5, kv_mask=jnp.ones((1, 4)), implementation="pallas"),
     r"kv_mask must be boolean; got float32"),
    (lambda: attn.differential_attention(_Q, _K, _V, 0.5, q_positions=jnp.zeros((1, 4)), implementation="blockwise"),
     r"q_positions must be integers; got float32"),
    (lambda: attn.standard_attention(_Q[:, :, :, 0], _K[:, :, :, 0], _V, kv_segment_ids=jnp.zeros((1, 4)),
                                     q_segment_ids=jnp.zeros((1, 4), jnp.int32), implementation="pallas"),
     r"kv_segment_ids must be integers; got float32"),
    (lambda: attn.differential_attention(_Q.astype(jnp.int32), _K, _V, 0.5, implementation="explicit"),
     r"q must be floating point; got int32"),
    (lambda: attn.standard_attention(_Q[:, :, :, 0], _K[:, :, :, 0], _V, implementation="fused"),
     r"the fused path needs Dv = D \(got Dv=16, D=8\); use implementation='blockwise'"),
    (lambda: attn.differential_attention(_Q, _K, _V[..., :8], 0.5, implementation="fused"),
     r"the fused path needs Dv = 2·D \(got Dv=8, D=8\); use implementation='blockwise'"),
])
def test_misshaped_arguments_name_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()
