"""Pallas kernels for `flash_attention` laid out for TPU (Mosaic): the key loop is a grid axis.

The GPU kernels (`pallas_attention.py`) hold whole-sequence K/V blocks and loop over them inside one
program, which Triton serves from global memory but Mosaic would copy whole into VMEM (double-buffered:
about 16 MiB for PI-P's 8K context, 64 MiB at 32K). Here every block is one tile: the grid is
(batch, head, query block, key block) for the forward and dq kernels and (batch, head, key block, query
block) for dk/dv, the last axis sequential ("arbitrary"), and the running statistics and accumulators
live in VMEM scratch across it, initialised at its first step and written out at its last. VMEM use is
O(block), whatever the length. The block math is `flash_attention`'s; row statistics are columns
(`[bq, 1]`), query-side masks `[B, T, 1]` and key-side masks `[B, 1, S]`, so no kernel reshapes a
vector. Which (query block, key block) pairs can have a visible pair follows from per-block bounds
computed beforehand in XLA (`flash_attention.block_bounds`, O(T/block) int32 values in SMEM by scalar
prefetch, the TPU idiom for block sparsity): the others skip their arithmetic, and their tiles past the
last live one (in the inner loop's direction) repeat the previous block's index so Pallas fetches nothing
new. A live pair whose (query, key) pairs are all visible (`flash_attention.full_blocks`; with sorted
positions every pair below the diagonal) runs without the mask, the others apply it per element. Blocks
are at least 16 queries (bf16 tiles are 16 rows) and 128 keys or the whole key sequence (a key-side mask
row is a lane vector); smaller requested blocks are raised and the sequences padded to match, which
changes no result.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from diffmoe_jax.ops import flash_attention as fa
from diffmoe_jax.ops.flash_attention import kernel_width, pad_last

_SEQUENTIAL_LAST = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
_MIN_BLOCK_Q, _LANES = 16, 128
_TABLES = 6  # scalar-prefetched per-block tables (`_tables`) ahead of every kernel's refs


def _specs(block_q: int, block_k: int, num_maps: int, d: int, dv: int, query_major: bool) -> dict:
  """BlockSpecs over the grid (b, h, i, j) when query_major (key block j inner), else (b, h, j, i) (query
  block i inner). An inner block past the last live one (query_major: key blocks after the query block's
  last live one; else query blocks before the key block's first live one) maps to that live block's
  tiles, which are already loaded."""
  if query_major:
    blocks = lambda b, h, i, j, latest, earliest, last_key, first_query, *_: (i, jnp.minimum(j, last_key[b, i]))
  else:
    blocks = lambda b, h, j, i, latest, earliest, last_key, first_query, *_: (jnp.maximum(i, first_query[b, j]), j)
  at = lambda f: lambda b, h, x, y, *tables: f(b, h, *blocks(b, h, x, y, *tables))
  return dict(
      q=pl.BlockSpec((None, None, num_maps, block_q, d), at(lambda b, h, i, j: (b, h, 0, i, 0))),
      k=pl.BlockSpec((None, None, num_maps, block_k, d), at(lambda b, h, i, j: (b, h, 0, j, 0))),
      v=pl.BlockSpec((None, None, block_k, dv), at(lambda b, h, i, j: (b, h, j, 0))),
      g=pl.BlockSpec((None, None, block_q, dv), at(lambda b, h, i, j: (b, h, i, 0))),
      stats=pl.BlockSpec((None, None, num_maps, block_q, 1), at(lambda b, h, i, j: (b, h, 0, i, 0))),
      q_mask=pl.BlockSpec((None, block_q, 1), at(lambda b, h, i, j: (b, i, 0))),
      k_mask=pl.BlockSpec((None, 1, block_k), at(lambda b, h, i, j: (b, 0, j))),
  )


def _mask_layout(masks):
  """(q_pos, q_seg, kv_pos, kv_seg, kv_valid) `[B, T]`/`[B, S]` -> query side `[B, T, 1]`, key side `[B, 1, S]`."""
  q_pos, q_seg, kv_pos, kv_seg, kv_valid = masks
  return (q_pos[..., None], q_seg[..., None], kv_pos[:, None], kv_seg[:, None], kv_valid[:, None])


def _pair(query_major: bool):
  """(b, i, j): the batch row, query block and key block of this grid step."""
  b, x, y = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  return (b, x, y) if query_major else (b, y, x)


def _each_live_block(tables, query_major: bool, step, mask_refs, causal: bool):
  """`step(None)` when this step's block pair is live and all visible, `step(visible)` with its elementwise
  mask when it is live and not (tables: `block_bounds`' four and `full_blocks`' two, in SMEM; mask_refs: the
  query side's positions and segments, the key side's positions, segments and validity)."""
  latest, earliest, _, _, full_keys, full_queries = tables
  b, i, j = _pair(query_major)
  live = earliest[b, j] <= latest[b, i]
  full = j < full_keys[b, i] if query_major else i >= full_queries[b, j]

  @pl.when(live & full)
  def _():
    step(None)

  @pl.when(live & jnp.logical_not(full))
  def _():
    step(fa.visibility(*(ref[...] for ref in mask_refs), causal))


def _forward_kernel(*refs, causal: bool):
  (q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref, out_ref, lse_ref, m_scratch,
   l_scratch, acc_scratch) = refs[_TABLES:]
  num_maps = q_ref.shape[0]
  key_block = pl.program_id(3)
  carry = lambda: tuple((m_scratch[j], l_scratch[j], acc_scratch[j]) for j in range(num_maps))

  @pl.when(key_block == 0)
  def _():
    m_scratch[...] = jnp.full(m_scratch.shape, fa.MASK_VALUE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def step(visible):
    new = fa.forward_block([q_ref[j] for j in range(num_maps)], [k_ref[j] for j in range(num_maps)], v_ref[...],
                           visible, carry())
    for j, (m, l, acc) in enumerate(new):
      m_scratch[j], l_scratch[j], acc_scratch[j] = m, l, acc

  _each_live_block(refs[:_TABLES], True, step, (q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref), causal)

  @pl.when(key_block == pl.num_programs(3) - 1)
  def _():
    outs, lses = fa.finalize(carry())
    for j in range(num_maps):
      out_ref[j], lse_ref[j] = outs[j], lses[j]


def _dq_kernel(*refs, causal: bool):
  (q_ref, k_ref, v_ref, g_ref, w_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref,
   dq_ref, dq_scratch) = refs[_TABLES:]
  num_maps = q_ref.shape[0]
  key_block = pl.program_id(3)
  per_map = lambda ref: [ref[j] for j in range(num_maps)]

  @pl.when(key_block == 0)
  def _():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  def step(visible):
    dq, _, _ = fa.backward_block(per_map(q_ref), per_map(k_ref), v_ref[...], g_ref[...], per_map(w_ref),
                                 per_map(lse_ref), per_map(delta_ref), visible, want_dkv=False)
    for j in range(num_maps):
      dq_scratch[j] += dq[j]

  _each_live_block(refs[:_TABLES], True, step, (q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref), causal)

  @pl.when(key_block == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = dq_scratch[...]


def _dkv_kernel(*refs, causal: bool):
  (q_ref, k_ref, v_ref, g_ref, w_ref, lse_ref, delta_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref,
   dk_ref, dv_ref, dk_scratch, dv_scratch) = refs[_TABLES:]
  num_maps = q_ref.shape[0]
  query_block = pl.program_id(3)
  per_map = lambda ref: [ref[j] for j in range(num_maps)]

  @pl.when(query_block == 0)
  def _():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  def step(visible):
    _, dk, dv = fa.backward_block(per_map(q_ref), per_map(k_ref), v_ref[...], g_ref[...], per_map(w_ref),
                                  per_map(lse_ref), per_map(delta_ref), visible, want_dq=False)
    for j in range(num_maps):
      dk_scratch[j] += dk[j]
    dv_scratch[...] += dv

  _each_live_block(refs[:_TABLES], False, step, (q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref), causal)

  @pl.when(query_block == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = dk_scratch[...]
    dv_ref[...] = dv_scratch[...]


def _tables(masks, block_q: int, block_k: int, causal: bool) -> tuple:
  """The kernels' first operands, in SMEM: `block_bounds`' four tables and `full_blocks`' two."""
  return fa.block_bounds(masks, block_q, block_k, causal) + fa.full_blocks(masks, block_q, block_k, causal)


def _call(kernel, interpret: bool, *, grid, in_specs, out_specs, scratch_shapes, out_shape, name):
  """The kernel over `grid` with the `_tables` as its first operands."""
  grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=_TABLES, grid=grid, in_specs=in_specs,
                                           out_specs=out_specs, scratch_shapes=scratch_shapes)
  return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, compiler_params=_SEQUENTIAL_LAST,
                        interpret=interpret, name=name)


def _tiling(q, k, v, masks, block_q: int, block_k: int, query_rows=()):
  """Blocks Mosaic can tile (module docstring) and the arrays padded to them: (q, k, v, masks, block_q,
  block_k, query_rows); `query_rows`: further (array, its query axis) pairs, padded like q."""
  s = k.shape[3]
  block_q = max(block_q, _MIN_BLOCK_Q)
  block_k = block_k if block_k % _LANES == 0 or block_k >= s else _LANES
  q_pos, q_seg, kv_pos, kv_seg, kv_valid = masks
  masks = (fa.pad_to(q_pos, block_q, 1), fa.pad_to(q_seg, block_q, 1), fa.pad_to(kv_pos, block_k, 1),
           fa.pad_to(kv_seg, block_k, 1), fa.pad_to(kv_valid, block_k, 1))
  query_rows = tuple(fa.pad_to(a, block_q, axis) for a, axis in query_rows)
  return (fa.pad_to(q, block_q, 3), fa.pad_to(k, block_k, 3), fa.pad_to(v, block_k, 2), masks, block_q, block_k,
          query_rows)


def forward(q, k, v, masks, causal, block_q, block_k, *, interpret: bool):
  """Per-map outputs `[B, H, M, T, Dv]` (fp32) and log-sum-exp `[B, H, M, T]`, as `fa.xla_forward`."""
  t_in = q.shape[3]
  q, k, v, masks, block_q, block_k, _ = _tiling(q, k, v, masks, block_q, block_k)
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  dp, dvp = kernel_width(d), kernel_width(dv)
  specs = _specs(block_q, block_k, num_maps, dp, dvp, query_major=True)
  out, lse = _call(
      functools.partial(_forward_kernel, causal=causal), interpret,
      grid=(b, h, t // block_q, s // block_k),
      in_specs=[specs[n] for n in ("q", "k", "v", "q_mask", "q_mask", "k_mask", "k_mask", "k_mask")],
      out_specs=[pl.BlockSpec((None, None, num_maps, block_q, dvp), lambda b_, h_, i, j, *_: (b_, h_, 0, i, 0)),
                 specs["stats"]],
      out_shape=[jax.ShapeDtypeStruct((b, h, num_maps, t, dvp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, num_maps, t, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((num_maps, block_q, 1), jnp.float32), pltpu.VMEM((num_maps, block_q, 1), jnp.float32),
                      pltpu.VMEM((num_maps, block_q, dvp), jnp.float32)],
      name="flash_multi_map_forward_tpu",
  )(*_tables(masks, block_q, block_k, causal), pad_last(q, dp), pad_last(k, dp), pad_last(v, dvp),
    *_mask_layout(masks))
  return out[:, :, :, :t_in, :dv], lse[:, :, :, :t_in, 0]


def backward(q, k, v, w, g, lse, delta, masks, causal, block_q, block_k, *, interpret: bool):
  """dq, dk, dv (fp32), as `fa.xla_backward`."""
  t_in, s_in = q.shape[3], k.shape[3]
  q, k, v, masks, block_q, block_k, (w, g, lse, delta) = _tiling(
      q, k, v, masks, block_q, block_k, ((w, 3), (g, 2), (lse, 3), (delta, 3)))
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  dp, dvp = kernel_width(d), kernel_width(dv)
  args = (*_tables(masks, block_q, block_k, causal), pad_last(q, dp), pad_last(k, dp),
          pad_last(v, dvp), pad_last(g, dvp), w[..., None], lse[..., None], delta[..., None], *_mask_layout(masks))
  names = ("q", "k", "v", "g", "stats", "stats", "stats", "q_mask", "q_mask", "k_mask", "k_mask", "k_mask")

  by_query = _specs(block_q, block_k, num_maps, dp, dvp, query_major=True)
  dq = _call(
      functools.partial(_dq_kernel, causal=causal), interpret,
      grid=(b, h, t // block_q, s // block_k),
      in_specs=[by_query[n] for n in names], out_specs=by_query["q"],
      out_shape=jax.ShapeDtypeStruct((b, h, num_maps, t, dp), jnp.float32),
      scratch_shapes=[pltpu.VMEM((num_maps, block_q, dp), jnp.float32)], name="flash_multi_map_dq_tpu",
  )(*args)

  by_key = _specs(block_q, block_k, num_maps, dp, dvp, query_major=False)
  dk, dv_out = _call(
      functools.partial(_dkv_kernel, causal=causal), interpret,
      grid=(b, h, s // block_k, t // block_q),
      in_specs=[by_key[n] for n in names], out_specs=[by_key["k"], by_key["v"]],
      out_shape=[jax.ShapeDtypeStruct((b, h, num_maps, s, dp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, s, dvp), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((num_maps, block_k, dp), jnp.float32), pltpu.VMEM((block_k, dvp), jnp.float32)],
      name="flash_multi_map_dkv_tpu",
  )(*args)
  return dq[:, :, :, :t_in, :d], dk[:, :, :, :s_in, :d], dv_out[:, :, :s_in, :dv]
