"""Hopper forward kernel for `flash_attention` in Mosaic GPU: TMA loads, wgmma products, warp-specialised.

The Triton forward (`pallas_attention.py`) reaches about a third of cuDNN's rate on an H200: Triton's
Hopper path issues no wgmma from Pallas's dots and no TMA pipeline. This kernel is laid out the way
FlashAttention-3 is. Each program (CUDA block) holds 128 queries of one (batch, head) as two compute
warpgroups of 64 rows (wgmma's M) and one memory warpgroup. The memory warpgroup streams the key blocks
both compute warpgroups need through `STAGES` shared-memory slots with TMA, a barrier per slot for "loaded"
and one for "consumed"; each compute warpgroup runs, per key block and per map, `S = q kᵀ` (wgmma from
shared memory), the online softmax in registers, and `acc += P v` (wgmma with P in registers). Every K/V
block loaded serves all M maps, as in the other kernels. Key blocks come from the same tables as theirs
(`flash_attention.block_bounds`, `full_blocks`): the leading all-visible blocks run without the
elementwise mask, the rest with it, and a compute warpgroup whose range ends first releases the slots the
other still uses.

Layouts: wgmma reads its shared-memory operands in (8, swizzle / itemsize) tiles with one swizzle for both;
a head width is zero-padded to a multiple of 16 (PI-P's 72 to 80, 144 stays) and the swizzle is the widest
of 128, 64, 32 bytes that divides a row (32 for 80 columns). Keys are passed transposed, `[D, S]`, so the
`q kᵀ` operand is a plain TMA tile. Inputs must be 16-bit (wgmma takes P from registers only in 16 bits).

The kernel is tested on CPU in Mosaic GPU's interpret mode, which simulates the warpgroups, TMA copies
and barriers but has no register layouts and no `pl.run_state`: `_in_layout`, `_load` and `_add_product`
take the interpreter's form there, the rest is the code the GPU runs (its lowering is tested too).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from diffmoe_jax.ops import flash_attention as fa
from diffmoe_jax.ops.flash_attention import pad_last

ROWS = 64  # query rows per compute warpgroup: wgmma's M
COMPUTE_WARPGROUPS = 2
STAGES = 2  # shared-memory slots of K/V blocks in flight
BLOCK_K = 64
_LOG2E = math.log2(math.e)
_ROW, _COLUMN = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)


def _interpreter():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def swizzle(row_bytes: int) -> int:
  """The widest shared-memory swizzle (bytes) that tiles a row of `row_bytes`."""
  for size in (128, 64, 32):
    if row_bytes % size == 0:
      return size
  raise ValueError(f"a {row_bytes}-byte row fits no wgmma swizzle (a multiple of 32 bytes).")


def _smem(shape, dtype, swizzle_bytes: int):
  itemsize = jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle_bytes // itemsize)),
                                              plgpu.SwizzleTransform(swizzle_bytes)))


def _in_layout(x, layout, interpret: bool):
  return x if interpret else plgpu.layout_cast(x, layout)


def _load(ref, index, layout, interpret: bool):
  """`ref[index]` into registers in `layout` (a scalar with layout None)."""
  return ref[index] if interpret else plgpu.load(ref, index, layout=layout, optimized=False)


def _product(a_smem, b_smem, shape):
  """`a b` (fp32) of two shared-memory tiles through one wgmma."""
  def run(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _add_product(acc, p, v_smem, interpret: bool):
  """`acc + p v`: wgmma accumulating into acc's registers (the interpreter, whose wgmma takes no operand
  from registers, adds a `jnp.dot`)."""
  if interpret:
    return acc + jnp.dot(p, v_smem[...], preferred_element_type=jnp.float32)

  def accumulate(acc_ref):
    plgpu.wgmma(acc_ref, p, v_smem)
  return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _kernel(key_stop_ref, full_keys_ref, q_ref, kt_ref, v_ref, q_mask_ref, kv_mask_ref, out_ref, lse_ref,
            q_smem, kt_smem, v_smem, out_smem, lse_smem, q_loaded, k_loaded, v_loaded, k_consumed, v_consumed,
            *, heads: int, causal: bool, interpret: bool):
  num_maps, dvp = kt_smem.shape[1], v_smem.shape[-1]
  bh, program, wg = (lax.axis_index(name) for name in ("batch_heads", "q_seq", "wg"))
  b = lax.div(bh, heads)
  scalar = lambda ref, *index: _load(ref, index, None, interpret)
  first_block = program * COMPUTE_WARPGROUPS
  steps = jnp.maximum(scalar(key_stop_ref, b, first_block), scalar(key_stop_ref, b, first_block + 1))
  slot_of = lambda j: lax.rem(j, STAGES)

  @pl.when(wg < COMPUTE_WARPGROUPS)
  def _compute():
    # Registers move to the compute warpgroups: 128 threads x (2 x 232 + 40) fit the SM's 64K. Two maps'
    # fp32 accumulators at PI-P's 144 columns take 144 a thread.
    plgpu.set_max_registers(232, action="increase")
    block = first_block + wg
    rows = pl.ds(block * ROWS, ROWS)
    stop = scalar(key_stop_ref, b, block)
    full = jnp.minimum(scalar(full_keys_ref, b, block), stop)
    for m in range(num_maps):  # a map at a time: TMA strides over at most 5 dimensions, tiles included
      plgpu.copy_gmem_to_smem(q_ref.at[bh, m, rows], q_smem.at[wg, m], q_loaded.at[wg])
    q_pos, q_seg = (lax.broadcast_in_dim(_load(q_mask_ref, (b, r, rows), _ROW, interpret), (ROWS, BLOCK_K), [0])
                    for r in range(2))
    init = lambda value, shape, layout: _in_layout(jnp.full(shape, value, jnp.float32), layout, interpret)
    carry = tuple((init(fa.MASK_VALUE, (ROWS,), _ROW), init(0.0, (ROWS,), _ROW),
                   init(0.0, (ROWS, dvp), plgpu.Layout.WGMMA)) for _ in range(num_maps))
    plgpu.barrier_wait(q_loaded.at[wg])

    def key_step(masked: bool):
      def step(j, carry):
        slot = slot_of(j)
        visible = None
        if masked:
          keys = pl.ds(j * BLOCK_K, BLOCK_K)
          kv_pos, kv_seg, kv_valid = (
              lax.broadcast_in_dim(_load(kv_mask_ref, (b, r, keys), _COLUMN, interpret), (ROWS, BLOCK_K), [1])
              for r in range(3))
          visible = fa.visibility(q_pos, q_seg, kv_pos, kv_seg, kv_valid, causal)
        plgpu.barrier_wait(k_loaded.at[slot])
        # Scores in log2 units (exp2 is one instruction); MASK_VALUE stays finite after the max.
        scores = [_product(q_smem.at[wg, m], kt_smem.at[slot, m], (ROWS, BLOCK_K)) * _LOG2E
                  for m in range(num_maps)]
        plgpu.barrier_arrive(k_consumed.at[slot])
        plgpu.barrier_wait(v_loaded.at[slot])
        new = []
        for s, (m_old, l, acc) in zip(scores, carry):
          if masked:
            s = jnp.where(visible, s, fa.MASK_VALUE)
          m_new = jnp.maximum(m_old, s.max(axis=1))
          alpha = jnp.exp2(m_old - m_new)
          p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
          if masked:
            p = jnp.where(visible, p, 0.0)
          acc = _add_product(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p.astype(v_smem.dtype),
                             v_smem.at[slot], interpret)
          new.append((m_new, l * alpha + p.sum(axis=1), acc))
        plgpu.barrier_arrive(v_consumed.at[slot])
        return tuple(new)
      return step

    carry = lax.fori_loop(0, full, key_step(False), carry)
    carry = lax.fori_loop(full, stop, key_step(True), carry)

    @pl.loop(stop, steps)
    def _release(j):  # the other warpgroup's remaining blocks: seen loaded (every phase is observed), released
      for loaded, consumed in ((k_loaded, k_consumed), (v_loaded, v_consumed)):
        plgpu.barrier_wait(loaded.at[slot_of(j)])
        plgpu.barrier_arrive(consumed.at[slot_of(j)])

    for m, (m_i, l, acc) in enumerate(carry):
      seen = l > 0.0
      scale = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
      out_smem.at[wg][...] = acc * lax.broadcast_in_dim(scale, acc.shape, [0])
      lse_smem.at[wg, m][...] = jnp.where(seen, (m_i + jnp.log2(jnp.where(seen, l, 1.0))) / _LOG2E, 0.0)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem.at[wg], out_ref.at[bh, m, rows])
      plgpu.wait_smem_to_gmem(0)  # out_smem is reused for the next map
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bh, :, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == COMPUTE_WARPGROUPS)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")

    def load(j):
      slot, keys = slot_of(j), pl.ds(j * BLOCK_K, BLOCK_K)
      for m in range(num_maps):
        plgpu.copy_gmem_to_smem(kt_ref.at[bh, m, :, keys], kt_smem.at[slot, m], k_loaded.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[bh, keys], v_smem.at[slot], v_loaded.at[slot])

    @pl.loop(0, jnp.minimum(steps, STAGES))
    def _fill(j):
      load(j)

    @pl.loop(STAGES, steps)
    def _stream(j):
      plgpu.barrier_wait(k_consumed.at[slot_of(j)])  # both warpgroups are done with block j - STAGES
      plgpu.barrier_wait(v_consumed.at[slot_of(j)])
      load(j)

    @pl.loop(jnp.maximum(steps - STAGES, 0), steps)
    def _drain(j):  # the last blocks' release: every phase is observed
      plgpu.barrier_wait(k_consumed.at[slot_of(j)])
      plgpu.barrier_wait(v_consumed.at[slot_of(j)])


def forward(q, k, v, masks, causal, block_q, block_k, *, interpret: bool):
  """Per-map outputs `[B, H, M, T, Dv]` (fp32) and log-sum-exp `[B, H, M, T]`, as `fa.xla_forward`, for
  T a multiple of 128 and S of 64 (`flash_attention` pads to them). block_q and block_k are the Triton
  kernels' and are not used: this kernel's blocks are fixed by wgmma (64 rows a warpgroup, 64 keys a step)."""
  del block_q, block_k
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"the Mosaic GPU attention kernel needs bfloat16 or float16 q, k, v, got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}: set model.dtype, or model.attention_gpu_forward='triton'.")
  if t % (ROWS * COMPUTE_WARPGROUPS) or s % BLOCK_K:
    raise ValueError(f"the Mosaic GPU attention kernel tiles {ROWS * COMPUTE_WARPGROUPS} queries and {BLOCK_K} "
                     f"keys, got T={t}, S={s}.")
  dp, dvp = -(-d // 16) * 16, -(-dv // 16) * 16
  if dvp > 256:
    raise ValueError(f"the Mosaic GPU attention kernel's P·v product is one wgmma, at most 256 columns wide; got "
                     f"value width {dv}: set model.attention_gpu_forward='triton'.")
  itemsize = jnp.dtype(q.dtype).itemsize
  qk_swizzle, v_swizzle = swizzle(dp * itemsize), swizzle(dvp * itemsize)
  # The `q kᵀ` operands share one swizzle: q's rows are dp wide, kᵀ's BLOCK_K.
  qk_swizzle = min(qk_swizzle, swizzle(BLOCK_K * itemsize))
  nq = t // ROWS
  _, _, last_key, _ = fa.block_bounds(masks, ROWS, BLOCK_K, causal)
  full_keys, _ = fa.full_blocks(masks, ROWS, BLOCK_K, causal)
  q_pos, q_seg, kv_pos, kv_seg, kv_valid = masks
  # Batch and heads as one leading axis: with a map's index and a tile's four, the five TMA can stride.
  flat = lambda x: x.reshape(b * h, *x.shape[2:])
  kt = jnp.swapaxes(flat(pad_last(k, dp)), -1, -2)  # [B·H, M, D, S]
  out, lse = plgpu.kernel(
      functools.partial(_kernel, heads=h, causal=causal, interpret=interpret),
      out_type=[jax.ShapeDtypeStruct((b * h, num_maps, t, dvp), jnp.float32),
                jax.ShapeDtypeStruct((b * h, num_maps, t), jnp.float32)],
      scratch_types=[
          _smem((COMPUTE_WARPGROUPS, num_maps, ROWS, dp), q.dtype, qk_swizzle),
          _smem((STAGES, num_maps, dp, BLOCK_K), q.dtype, qk_swizzle),
          _smem((STAGES, BLOCK_K, dvp), q.dtype, v_swizzle),
          _smem((COMPUTE_WARPGROUPS, ROWS, dvp), jnp.float32, swizzle(dvp * 4)),
          plgpu.SMEM((COMPUTE_WARPGROUPS, num_maps, ROWS), jnp.float32),
          plgpu.Barrier(num_arrivals=num_maps, num_barriers=COMPUTE_WARPGROUPS),  # one copy per map
          plgpu.Barrier(num_arrivals=num_maps, num_barriers=STAGES),
          plgpu.Barrier(num_barriers=STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),
      ],
      grid=(nq // COMPUTE_WARPGROUPS, b * h),
      grid_names=("q_seq", "batch_heads"),
      num_threads=COMPUTE_WARPGROUPS + 1,
      thread_name="wg",
      compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
      interpret=_interpreter() if interpret else None,
  )(last_key + 1, full_keys, flat(pad_last(q, dp)), kt, flat(pad_last(v, dvp)), jnp.stack([q_pos, q_seg], 1),
    jnp.stack([kv_pos, kv_seg, kv_valid], 1))
  return out.reshape(b, h, num_maps, t, dvp)[..., :dv], lse.reshape(b, h, num_maps, t)
