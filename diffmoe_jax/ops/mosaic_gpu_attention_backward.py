"""Hopper backward kernels for `flash_attention` in Mosaic GPU: FlashAttention-2's two passes laid out as
the forward in `mosaic_gpu_attention.py` (whose docstring describes the program, the streaming and the
interpreter's forms), with the block math of `flash_attention.backward_block`.

dk/dv: a program holds 128 keys (64 per compute warpgroup, with their dk and dv accumulators in
registers); the memory warpgroup streams query blocks of 32 (q per map, g, and their per-query
log-sum-exp, δ and weight) from the first one either warpgroup can see. Per block, in the transposed
orientation (rows are keys): `sᵀ = k qᵀ` per map, `dCᵀ = v gᵀ` once, `dsᵀ = w·pᵀ ⊙ (dCᵀ − δ)`, then
`dk += dsᵀ q` per map and `dv += (Σ_m w·pᵀ) g`, one product for both maps.

dq: a program holds 128 queries as the forward does; the memory warpgroup streams key blocks (k per map
and v). Per block: `s = q kᵀ` per map, `dC = g vᵀ` once, `ds = w·p ⊙ (dC − δ)`, `dq += ds k` per map.

Maps are taken one at a time, so one map's fp32 tiles are live at once: `[64, 64]` in dq (32 registers a
thread each), `[64, 32]` in dk/dv (16 each), whose accumulators take 2 × 40 + 72 = 152 registers a thread
at PI-P's widths (dq's 80), within a compute warpgroup's 240.

Both write their results in the inputs' dtype (the accumulators are fp32 to the end, and the VJP casts
the Triton kernels' fp32 results to that dtype anyway), through the shared memory their inputs used.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from diffmoe_jax.ops import flash_attention as fa
from diffmoe_jax.ops import mosaic_gpu_attention as mga
from diffmoe_jax.ops.flash_attention import pad_last
from diffmoe_jax.ops.mosaic_gpu_attention import COMPUTE_WARPGROUPS, ROWS, STAGES, TILE, slot_of

_STATS = 3  # per query and map: log-sum-exp (in log2 units), δ, weight
# dk/dv streams query blocks of 32, not 64: its [64, 32] fp32 tiles take 16 registers a thread, not 32, which
# with the 152 of its accumulators keeps a compute warpgroup within its 240 (at 64 ptxas spilled about 1 KB a
# thread and serialised the wgmmas).
DKV_QUERY_ROWS = 32


def _zeros(shape, interpret: bool):
  return mga.in_layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA, interpret)


def _dkv_kernel(first_query_ref, full_queries_ref, q_ref, k_ref, v_ref, g_ref, stats_ref, q_mask_ref,
                kv_mask_ref, dk_ref, dv_ref, k_smem, v_smem, q_smem, g_smem, stats_smem, kv_loaded, q_loaded,
                g_loaded, q_consumed, g_consumed, *, heads: int, causal: bool, interpret: bool):
  num_maps, dp, dvp = k_smem.shape[1], k_smem.shape[-1], v_smem.shape[-1]
  num_query_blocks = q_ref.shape[2] // DKV_QUERY_ROWS
  bh, b, wg, first_block = mga.program_ids(heads)
  start = mga.both_warpgroups(jnp.minimum, first_query_ref, b, first_block, interpret)

  def compute():
    block = first_block + wg
    keys = pl.ds(block * ROWS, ROWS)
    first = mga.table(first_query_ref, b, block, interpret)
    split = jnp.clip(mga.table(full_queries_ref, b, block, interpret), first, num_query_blocks)
    for m in range(num_maps):
      plgpu.copy_gmem_to_smem(k_ref.at[bh, m, keys], k_smem.at[wg, m], kv_loaded.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[bh, keys], v_smem.at[wg], kv_loaded.at[wg])
    kv_pos, kv_seg, kv_valid = (mga.rows_broadcast(kv_mask_ref, (b, r, keys), interpret, DKV_QUERY_ROWS)
                                for r in range(3))
    carry = (tuple(_zeros((ROWS, dp), interpret) for _ in range(num_maps)), _zeros((ROWS, dvp), interpret))
    plgpu.barrier_wait(kv_loaded.at[wg])
    mga.release(start, first, (q_loaded, g_loaded), (q_consumed, g_consumed))

    def query_step(masked: bool):
      def step(j, carry):
        dk, dv = carry
        slot = slot_of(j)
        visible = None
        if masked:
          queries = pl.ds(j * DKV_QUERY_ROWS, DKV_QUERY_ROWS)
          q_pos, q_seg = (mga.columns_broadcast(q_mask_ref, (b, r, queries), interpret) for r in range(2))
          visible = fa.visibility(q_pos, q_seg, kv_pos, kv_seg, kv_valid, causal)
        plgpu.barrier_wait(g_loaded.at[slot])
        d_combined = mga.product(v_smem.at[wg], g_smem.at[slot], transpose_b=True, interpret=interpret)
        stat = lambda r, m: mga.columns_broadcast(stats_smem, (slot, r, m), interpret)
        plgpu.barrier_wait(q_loaded.at[slot])
        new_dk, combined_p = [], None
        for m in range(num_maps):  # a map at a time: one map's scores live in registers
          s = mga.product(k_smem.at[wg, m], q_smem.at[slot, m], transpose_b=True, interpret=interpret)
          p = jnp.exp2(s * mga.LOG2E - stat(0, m))
          if masked:
            p = jnp.where(visible, p, 0.0)
          weighted_p = p * stat(2, m)
          ds = weighted_p * (d_combined - stat(1, m))
          new_dk.append(mga.add_product(dk[m], ds.astype(q_smem.dtype), q_smem.at[slot, m], interpret))
          combined_p = weighted_p if combined_p is None else combined_p + weighted_p
        plgpu.barrier_arrive(q_consumed.at[slot])
        dv = mga.add_product(dv, combined_p.astype(g_smem.dtype), g_smem.at[slot], interpret)
        plgpu.barrier_arrive(g_consumed.at[slot])
        return tuple(new_dk), dv
      return step

    carry = lax.fori_loop(first, split, query_step(True), carry)
    dk, dv = lax.fori_loop(split, num_query_blocks, query_step(False), carry)
    for m in range(num_maps):  # out through the tiles this warpgroup's k and v came in
      k_smem.at[wg, m][...] = dk[m].astype(k_smem.dtype)
    v_smem.at[wg][...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    for m in range(num_maps):
      plgpu.copy_smem_to_gmem(k_smem.at[wg, m], dk_ref.at[bh, m, keys])
    plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[bh, keys])
    plgpu.wait_smem_to_gmem(0)

  def memory():
    def copy(j, slot):
      queries = pl.ds(j * DKV_QUERY_ROWS, DKV_QUERY_ROWS)
      for m in range(num_maps):
        plgpu.copy_gmem_to_smem(q_ref.at[bh, m, queries], q_smem.at[slot, m], q_loaded.at[slot])
      plgpu.copy_gmem_to_smem(g_ref.at[bh, queries], g_smem.at[slot], g_loaded.at[slot])
      plgpu.copy_gmem_to_smem(stats_ref.at[bh, :, :, queries], stats_smem.at[slot], g_loaded.at[slot])
    mga.stream_blocks(copy, start, num_query_blocks, (q_consumed, g_consumed))

  mga.warp_specialise(wg, compute, memory)


def _dq_kernel(key_stop_ref, full_keys_ref, q_ref, k_ref, v_ref, g_ref, stats_ref, q_mask_ref, kv_mask_ref,
               dq_ref, q_smem, g_smem, k_smem, v_smem, q_loaded, k_loaded, v_loaded, k_consumed, v_consumed, *,
               heads: int, causal: bool, interpret: bool):
  num_maps, dp = q_smem.shape[1], q_smem.shape[-1]
  bh, b, wg, first_block = mga.program_ids(heads)
  steps = mga.both_warpgroups(jnp.maximum, key_stop_ref, b, first_block, interpret)

  def compute():
    block = first_block + wg
    rows = pl.ds(block * ROWS, ROWS)
    stop = mga.table(key_stop_ref, b, block, interpret)
    full = jnp.minimum(mga.table(full_keys_ref, b, block, interpret), stop)
    for m in range(num_maps):
      plgpu.copy_gmem_to_smem(q_ref.at[bh, m, rows], q_smem.at[wg, m], q_loaded.at[wg])
    plgpu.copy_gmem_to_smem(g_ref.at[bh, rows], g_smem.at[wg], q_loaded.at[wg])
    q_pos, q_seg = (mga.rows_broadcast(q_mask_ref, (b, r, rows), interpret) for r in range(2))
    stats = [[mga.rows_broadcast(stats_ref, (bh, r, m, rows), interpret) for r in range(_STATS)]
             for m in range(num_maps)]
    carry = tuple(_zeros((ROWS, dp), interpret) for _ in range(num_maps))
    plgpu.barrier_wait(q_loaded.at[wg])

    def key_step(masked: bool):
      def step(j, dq):
        slot = slot_of(j)
        visible = mga.key_block_visibility(q_pos, q_seg, kv_mask_ref, b, j, causal, interpret) if masked else None
        plgpu.barrier_wait(v_loaded.at[slot])
        d_combined = mga.product(g_smem.at[wg], v_smem.at[slot], transpose_b=True, interpret=interpret)
        plgpu.barrier_arrive(v_consumed.at[slot])
        plgpu.barrier_wait(k_loaded.at[slot])
        new = []
        for m in range(num_maps):  # a map at a time: one map's scores live in registers
          s = mga.product(q_smem.at[wg, m], k_smem.at[slot, m], transpose_b=True, interpret=interpret)
          lse, delta, w = stats[m]
          p = jnp.exp2(s * mga.LOG2E - lse)
          if masked:
            p = jnp.where(visible, p, 0.0)
          ds = p * w * (d_combined - delta)
          new.append(mga.add_product(dq[m], ds.astype(k_smem.dtype), k_smem.at[slot, m], interpret))
        plgpu.barrier_arrive(k_consumed.at[slot])
        return tuple(new)
      return step

    dq = lax.fori_loop(0, full, key_step(False), carry)
    dq = lax.fori_loop(full, stop, key_step(True), dq)
    mga.release(stop, steps, (k_loaded, v_loaded), (k_consumed, v_consumed))
    for m in range(num_maps):  # out through the tiles this warpgroup's q came in
      q_smem.at[wg, m][...] = dq[m].astype(q_smem.dtype)
    plgpu.commit_smem()
    for m in range(num_maps):
      plgpu.copy_smem_to_gmem(q_smem.at[wg, m], dq_ref.at[bh, m, rows])
    plgpu.wait_smem_to_gmem(0)

  mga.warp_specialise(wg, compute, functools.partial(
      mga.stream_key_blocks, bh, k_ref, v_ref, k_smem, v_smem, (k_loaded, v_loaded), (k_consumed, v_consumed), steps))


def backward(q, k, v, w, g, lse, delta, masks, causal, block_q, block_k, *, interpret: bool):
  """dq, dk, dv in q's dtype, as `fa.xla_backward`, for T and S multiples of TILE (`flash_attention` pads
  to them); block_q and block_k are the Triton kernels' and are not used."""
  del block_q, block_k
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  mga.check_inputs(t, s, q, k, v)
  dp, dvp = mga.widths(d, dv)
  last_key = fa.block_bounds(masks, ROWS, ROWS, causal)[2]
  full_keys = fa.full_blocks(masks, ROWS, ROWS, causal)[0]
  first_query = fa.block_bounds(masks, DKV_QUERY_ROWS, ROWS, causal)[3]
  full_queries = fa.full_blocks(masks, DKV_QUERY_ROWS, ROWS, causal)[1]
  q_pos, q_seg, kv_pos, kv_seg, kv_valid = masks
  operands = (mga.flat(pad_last(q, dp)), mga.flat(pad_last(k, dp)), mga.flat(pad_last(v, dvp)),
              mga.flat(pad_last(g.astype(q.dtype), dvp)),
              mga.flat(jnp.stack([lse * mga.LOG2E, delta, w], 2)),  # [B·H, 3, M, T]
              jnp.stack([q_pos, q_seg], 1), jnp.stack([kv_pos, kv_seg, kv_valid], 1))
  grid = dict(grid_names=("batch_heads", "blocks"), **mga.compiler(interpret))
  # dk += dsᵀ q and dv += (Σ w·P)ᵀ g contract over a block's DKV_QUERY_ROWS queries, which the swizzle's
  # width in elements must divide; the products sharing an operand with them share its swizzle.
  dkv_tile = functools.partial(mga.tile, widest_swizzle=DKV_QUERY_ROWS * q.dtype.itemsize)
  dk_out, dv_out = plgpu.kernel(
      functools.partial(_dkv_kernel, heads=h, causal=causal, interpret=interpret),
      out_type=[jax.ShapeDtypeStruct((b * h, num_maps, s, dp), q.dtype),
                jax.ShapeDtypeStruct((b * h, s, dvp), q.dtype)],
      scratch_types=[
          dkv_tile((COMPUTE_WARPGROUPS, num_maps, ROWS, dp), q.dtype),
          dkv_tile((COMPUTE_WARPGROUPS, ROWS, dvp), q.dtype),
          dkv_tile((STAGES, num_maps, DKV_QUERY_ROWS, dp), q.dtype),
          dkv_tile((STAGES, DKV_QUERY_ROWS, dvp), q.dtype),
          plgpu.SMEM((STAGES, _STATS, num_maps, DKV_QUERY_ROWS), jnp.float32),
          plgpu.Barrier(num_arrivals=num_maps + 1, num_barriers=COMPUTE_WARPGROUPS),  # k per map, v
          plgpu.Barrier(num_arrivals=num_maps, num_barriers=STAGES),
          plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # g, statistics
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),
      ],
      grid=(b * h, s // TILE), kernel_name="mosaic_attention_dkv", **grid,
  )(first_query, full_queries, *operands)
  dq_out = plgpu.kernel(
      functools.partial(_dq_kernel, heads=h, causal=causal, interpret=interpret),
      out_type=jax.ShapeDtypeStruct((b * h, num_maps, t, dp), q.dtype),
      scratch_types=[
          mga.tile((COMPUTE_WARPGROUPS, num_maps, ROWS, dp), q.dtype),
          mga.tile((COMPUTE_WARPGROUPS, ROWS, dvp), q.dtype),
          mga.tile((STAGES, num_maps, ROWS, dp), q.dtype),
          mga.tile((STAGES, ROWS, dvp), q.dtype),
          plgpu.Barrier(num_arrivals=num_maps + 1, num_barriers=COMPUTE_WARPGROUPS),  # q per map, g
          plgpu.Barrier(num_arrivals=num_maps, num_barriers=STAGES),
          plgpu.Barrier(num_barriers=STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),
      ],
      grid=(b * h, t // TILE), kernel_name="mosaic_attention_dq", **grid,
  )(last_key + 1, full_keys, *operands)
  unflat = lambda x, width: x.reshape(b, h, *x.shape[1:])[..., :width]
  return unflat(dq_out, d), unflat(dk_out, d), unflat(dv_out, dv)
