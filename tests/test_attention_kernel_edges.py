"""The attention paths at their edges, against test_flash_attention's float64 reference: each batch row's own
block bounds, a key that opens a TPU key block seen by the query at its position alone, rows whose scores all
lie far below zero, and bfloat16 inputs whose scores bfloat16 cannot hold."""
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax.ops import attention as attn
from test_flash_attention import GPU_VARIANTS, _case, _run, lam_gradient, map_weights, reference, visibility

KERNELS = ("pallas", "pallas_tpu") + tuple(GPU_VARIANTS)
TOL = dict(rtol=2e-4, atol=2e-5)


def _check(path, q, k, v, lam, g, masks, visible, relative_to_largest=False):
  """Output and gradients against the reference; `relative_to_largest`: each array within 2e-5 of its largest
  magnitude, or of 1 (gradients that scale with large inputs carry float32's rounding of them)."""
  want, (dq, dk, dv, dw) = reference(q, k, v, map_weights(lam, q.shape[:3]), visible, g)
  got, grads = _run(path, q, k, v, lam, g, masks)
  np.testing.assert_allclose(np.asarray(got), want, **TOL, err_msg="out")
  for name, ours, ref in zip(("dq", "dk", "dv", "dlam"), grads, (dq, dk, dv, lam_gradient(dw, lam))):
    tol = dict(rtol=0, atol=2e-5 * max(1.0, np.abs(ref).max())) if relative_to_largest else TOL
    np.testing.assert_allclose(np.asarray(ours).reshape(np.shape(ref)), ref, **tol, err_msg=name)


@pytest.mark.parametrize("path", KERNELS)
def test_each_batch_row_takes_its_own_block_bounds(path):
  """The kv-mask case with every key of the first row valid and the second's hidden at random: with the first
  row's bounds for every row (the blocks it may run unmasked, its last live key block, its first query block),
  the second ran its blocks unmasked and attended to keys its mask hides (every other test has the first row
  the more masked one, the direction that hid it)."""
  q, k, v, lam, g, masks, _ = _case("scalar_lam_kv_mask")
  masks["kv_mask"][0] = True
  assert not masks["kv_mask"][1].all()
  visible = visibility(masks["q_positions"], masks["kv_positions"], masks["kv_mask"])
  _check(path, q, k, v, lam, g, masks, visible)


def test_a_tpu_key_block_opened_by_the_querys_own_key_is_run():
  """Decoding at position 128 over a 256-slot cache filled up to it: the query's own key is the first of the TPU
  kernel's second 128-key block, whose pair with the query a strict `<` skipped."""
  rng = np.random.default_rng(3)
  b, h, d, s = 1, 2, 4, 256
  q, g = (rng.normal(size=(b, 1, h) + shape).astype(np.float32) for shape in ((2, d), (2 * d,)))
  k, v = (rng.normal(size=(b, s, h) + shape).astype(np.float32) for shape in ((2, d), (2 * d,)))
  lam = rng.uniform(0.1, 0.9, (b, 1, h)).astype(np.float32)
  q_pos = np.full((b, 1), 128, np.int32)
  kv_pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.int32)
  kv_mask = np.broadcast_to(np.arange(s) <= 128, (b, s))
  masks = dict(q_positions=q_pos, kv_positions=kv_pos, kv_mask=kv_mask)
  _check("pallas_tpu", q, k, v, lam, g, masks, visibility(q_pos, kv_pos, kv_mask))


@pytest.mark.parametrize("path", ("blockwise",) + KERNELS)
def test_rows_whose_scores_all_lie_far_below_zero_keep_their_softmax(path):
  """Every score is −200: softmax is uniform over the visible keys. A running maximum started at 0 instead of
  −∞ made exp underflow to 0 for each, and such rows came out as 0."""
  q, k, v, lam, g, masks, visible = _case("per_token_lam")
  k = np.ones_like(k)
  q = np.full_like(q, -200.0 / np.sqrt(q.shape[-1]))  # q·k / √d = −200
  _check(path, q, k, v, lam, g, masks, visible, relative_to_largest=True)


@pytest.mark.parametrize("path", ("explicit", "blockwise", "pallas", "pallas_tpu"))
def test_bf16_scores_are_computed_in_float32(path):
  """Standard attention on bfloat16 inputs whose scores reach ±50, where bfloat16 steps by 0.25: each path's
  output is within 1% of the float64 reference's largest value on the same inputs (scores rounded to bfloat16
  before the softmax, with the bf16 tests' scores of a few units, passed every test)."""
  rng = np.random.default_rng(5)
  b, t, h, d = 1, 40, 2, 8
  round_bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
  q, k = (round_bf16(rng.normal(size=(b, t, h, 1, d)) * 5) for _ in range(2))
  v = round_bf16(rng.normal(size=(b, t, h, d)))
  positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
  visible = visibility(positions, positions)
  want, _ = reference(q, k, v, map_weights(None, (b, t, h)), visible, np.zeros((b, t, h, d)))
  assert np.abs(np.einsum("bthmd,bshmd->bhts", q, k)[:, :, visible[0]]).max() / np.sqrt(d) > 40
  got = attn.standard_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q[:, :, :, 0], k[:, :, :, 0], v)),
                                q_positions=positions, kv_positions=positions, implementation=path, block_q=16,
                                block_k=16)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=0.01 * np.abs(want).max())
