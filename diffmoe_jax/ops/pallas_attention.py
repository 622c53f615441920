"""Pallas kernels for `flash_attention` (forward, and the FlashAttention-2 backward as two kernels).

Same layouts, block math and masks as the XLA driver in `flash_attention.py`. One program per
(batch, head, block): the forward and dq kernels hold a query block and loop over key blocks, the dk/dv
kernel holds a key block and loops over query blocks. Every K/V block loaded serves all M maps. Blocks
with no visible (query, key) pair are skipped under `lax.cond`. Head widths are zero-padded to a power of
two (Triton's block shapes must be), which changes no score and adds zero output columns that are
sliced off.

These are the GPU kernels (TPU's are in `pallas_tpu_attention.py`). They are lowered by Triton, never by
Mosaic GPU (jax's default for a `pallas_call` without compiler parameters): Mosaic GPU
copies every block into shared memory, and the whole-sequence K/V blocks the query-blocked kernels read
from overflow it at any useful length (437 KB at T = 512, D = 64). Triton loads only the `pl.ds` slices
a loop step touches.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from diffmoe_jax.ops import flash_attention as fa
from diffmoe_jax.ops.flash_attention import kernel_width, pad_last

_TRITON = pl_triton.CompilerParams(num_warps=8, num_stages=2)
# The fp32 accumulators a program keeps in registers: M·bq·Dv (forward), M·bq·D (dq), (M·D + Dv)·bk
# (dk/dv). Eight warps hold at most 255 KiB of registers; blocks are halved until the accumulators fit
# in half of that (32K values), so wide heads (PI-P's Dv = 144, padded to 256, with two maps) do not
# spill. Chosen from the register file's size, not yet from measurement on a GPU.
_ACCUMULATOR_VALUES = 32768


def register_blocks(block_q: int, block_k: int, num_maps: int, d: int, dv: int) -> tuple[int, int]:
  """(bq, bk): the blocks asked for (powers of two), halved while their accumulators exceed the budget
  and they are above 16."""
  fit = lambda block, per_row: min(block, max(16, 1 << (_ACCUMULATOR_VALUES // per_row).bit_length() - 1))
  return fit(block_q, num_maps * max(d, dv)), fit(block_k, num_maps * d + dv)


def _pallas_call(kernel, interpret: bool, **spec):
  return pl.pallas_call(kernel, compiler_params=None if interpret else _TRITON, interpret=interpret, **spec)


def _specs(block_q: int, block_k: int, t: int, s: int, num_maps: int, d: int, dv: int, query_blocked: bool):
  """BlockSpecs over the grid (b, h, i): i indexes query blocks (query_blocked) or key blocks."""
  bq, bk = (block_q, s) if query_blocked else (t, block_k)
  qi = (lambda b, h, i: (b, h, 0, i, 0)) if query_blocked else (lambda b, h, i: (b, h, 0, 0, 0))
  ki = (lambda b, h, i: (b, h, 0, 0, 0)) if query_blocked else (lambda b, h, i: (b, h, 0, i, 0))
  q_rows = (lambda b, h, i: (b, h, i, 0)) if query_blocked else (lambda b, h, i: (b, h, 0, 0))
  k_rows = (lambda b, h, i: (b, h, 0, 0)) if query_blocked else (lambda b, h, i: (b, h, i, 0))
  q_stats = (lambda b, h, i: (b, h, 0, i)) if query_blocked else (lambda b, h, i: (b, h, 0, 0))
  q_mask = (lambda b, h, i: (b, i)) if query_blocked else (lambda b, h, i: (b, 0))
  k_mask = (lambda b, h, i: (b, 0)) if query_blocked else (lambda b, h, i: (b, i))
  return dict(
      q=pl.BlockSpec((None, None, num_maps, bq, d), qi),
      k=pl.BlockSpec((None, None, num_maps, bk, d), ki),
      v=pl.BlockSpec((None, None, bk, dv), k_rows),
      g=pl.BlockSpec((None, None, bq, dv), q_rows),
      stats=pl.BlockSpec((None, None, num_maps, bq), q_stats),
      q_mask=pl.BlockSpec((None, bq), q_mask),
      k_mask=pl.BlockSpec((None, bk), k_mask),
  )


def _forward_kernel(q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref,
                    out_ref, lse_ref, *, causal: bool, block_k: int):
  num_maps, block_q, _ = q_ref.shape
  qs = [q_ref[j] for j in range(num_maps)]
  q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]

  def key_step(j, carry):
    keys = pl.ds(j * block_k, block_k)
    visible = fa.block_visibility(q_pos, q_seg, kv_pos_ref[keys], kv_seg_ref[keys], kv_valid_ref[keys], causal)
    ks = lambda: [k_ref[m, keys, :] for m in range(num_maps)]
    return lax.cond(fa.any_visible(visible), lambda c: fa.forward_block(qs, ks(), v_ref[keys, :], visible, c),
                    lambda c: c, carry)

  carry = lax.fori_loop(0, k_ref.shape[1] // block_k, key_step,
                        fa.init_carry((block_q,), num_maps, v_ref.shape[-1]))
  outs, lses = fa.finalize(carry)
  for j in range(num_maps):
    out_ref[j] = outs[j]
    lse_ref[j] = lses[j][:, 0]


def _dq_kernel(q_ref, k_ref, v_ref, g_ref, w_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref, kv_pos_ref,
               kv_seg_ref, kv_valid_ref, dq_ref, *, causal: bool, block_k: int):
  num_maps, block_q, d = q_ref.shape
  per_map = lambda ref: [ref[m] for m in range(num_maps)]
  stats = lambda ref: [ref[m][:, None] for m in range(num_maps)]
  qs, ws, lses, deltas, g = per_map(q_ref), stats(w_ref), stats(lse_ref), stats(delta_ref), g_ref[...]
  q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]

  def key_step(j, dq):
    keys = pl.ds(j * block_k, block_k)
    visible = fa.block_visibility(q_pos, q_seg, kv_pos_ref[keys], kv_seg_ref[keys], kv_valid_ref[keys], causal)

    def accumulate(dq):
      ks = [k_ref[m, keys, :] for m in range(num_maps)]
      grads, _, _ = fa.backward_block(qs, ks, v_ref[keys, :], g, ws, lses, deltas, visible, want_dkv=False)
      return tuple(a + b for a, b in zip(dq, grads))

    return lax.cond(fa.any_visible(visible), accumulate, lambda c: c, dq)

  zeros = tuple(jnp.zeros((block_q, d), jnp.float32) for _ in range(num_maps))
  dq = lax.fori_loop(0, k_ref.shape[1] // block_k, key_step, zeros)
  for j in range(num_maps):
    dq_ref[j] = dq[j]


def _dkv_kernel(q_ref, k_ref, v_ref, g_ref, w_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref, kv_pos_ref,
                kv_seg_ref, kv_valid_ref, dk_ref, dv_ref, *, causal: bool, block_q: int):
  num_maps, block_k, d = k_ref.shape
  ks, v = [k_ref[m] for m in range(num_maps)], v_ref[...]
  kv_pos, kv_seg, kv_valid = kv_pos_ref[...], kv_seg_ref[...], kv_valid_ref[...]

  def query_step(i, carry):
    rows = pl.ds(i * block_q, block_q)
    visible = fa.block_visibility(q_pos_ref[rows], q_seg_ref[rows], kv_pos, kv_seg, kv_valid, causal)

    def accumulate(carry):
      dk, dv = carry
      per_map = lambda ref: [ref[m, rows][:, None] for m in range(num_maps)]
      _, dk_blk, dv_blk = fa.backward_block(
          [q_ref[m, rows, :] for m in range(num_maps)], ks, v, g_ref[rows, :], per_map(w_ref), per_map(lse_ref),
          per_map(delta_ref), visible, want_dq=False)
      return tuple(a + b for a, b in zip(dk, dk_blk)), dv + dv_blk

    return lax.cond(fa.any_visible(visible), accumulate, lambda c: c, carry)

  zeros = (tuple(jnp.zeros((block_k, d), jnp.float32) for _ in range(num_maps)),
           jnp.zeros((block_k, v_ref.shape[-1]), jnp.float32))
  dk, dv = lax.fori_loop(0, q_ref.shape[1] // block_q, query_step, zeros)
  for j in range(num_maps):
    dk_ref[j] = dk[j]
  dv_ref[...] = dv


def forward(q, k, v, masks, causal, block_q, block_k, *, interpret: bool):
  """Per-map outputs `[B, H, M, T, Dv]` (fp32) and log-sum-exp `[B, H, M, T]`, as `fa.xla_forward`."""
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  dp, dvp = kernel_width(d), kernel_width(dv)
  block_q, block_k = register_blocks(block_q, block_k, num_maps, dp, dvp)
  specs = _specs(block_q, block_k, t, s, num_maps, dp, dvp, query_blocked=True)
  out, lse = _pallas_call(
      functools.partial(_forward_kernel, causal=causal, block_k=block_k), interpret,
      grid=(b, h, t // block_q),
      in_specs=[specs["q"], specs["k"], specs["v"], specs["q_mask"], specs["q_mask"], specs["k_mask"],
                specs["k_mask"], specs["k_mask"]],
      out_specs=[pl.BlockSpec((None, None, num_maps, block_q, dvp), lambda b_, h_, i: (b_, h_, 0, i, 0)),
                 specs["stats"]],
      out_shape=[jax.ShapeDtypeStruct((b, h, num_maps, t, dvp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, num_maps, t), jnp.float32)],
      name="flash_multi_map_forward",
  )(pad_last(q, dp), pad_last(k, dp), pad_last(v, dvp), *masks)
  return out[..., :dv], lse


def backward(q, k, v, w, g, lse, delta, masks, causal, block_q, block_k, *, interpret: bool):
  """dq, dk, dv (fp32), as `fa.xla_backward`."""
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  dp, dvp = kernel_width(d), kernel_width(dv)
  block_q, block_k = register_blocks(block_q, block_k, num_maps, dp, dvp)
  args = (pad_last(q, dp), pad_last(k, dp), pad_last(v, dvp), pad_last(g, dvp), w, lse, delta, *masks)

  by_query = _specs(block_q, block_k, t, s, num_maps, dp, dvp, query_blocked=True)
  dq = _pallas_call(
      functools.partial(_dq_kernel, causal=causal, block_k=block_k), interpret,
      grid=(b, h, t // block_q),
      in_specs=[by_query[n] for n in ("q", "k", "v", "g", "stats", "stats", "stats", "q_mask", "q_mask",
                                      "k_mask", "k_mask", "k_mask")],
      out_specs=by_query["q"],
      out_shape=jax.ShapeDtypeStruct((b, h, num_maps, t, dp), jnp.float32),
      name="flash_multi_map_dq",
  )(*args)

  by_key = _specs(block_q, block_k, t, s, num_maps, dp, dvp, query_blocked=False)
  dk, dv_out = _pallas_call(
      functools.partial(_dkv_kernel, causal=causal, block_q=block_q), interpret,
      grid=(b, h, s // block_k),
      in_specs=[by_key[n] for n in ("q", "k", "v", "g", "stats", "stats", "stats", "q_mask", "q_mask",
                                    "k_mask", "k_mask", "k_mask")],
      out_specs=[by_key["k"], by_key["v"]],
      out_shape=[jax.ShapeDtypeStruct((b, h, num_maps, s, dp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, s, dvp), jnp.float32)],
      name="flash_multi_map_dkv",
  )(*args)
  return dq[..., :d], dk[..., :d], dv_out[..., :dv]
