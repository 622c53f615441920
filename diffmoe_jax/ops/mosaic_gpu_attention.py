"""Hopper kernels for `flash_attention` in Mosaic GPU: TMA loads, wgmma products, warp-specialised. This
module holds the forward and the pieces the backward kernels (`mosaic_gpu_attention_backward.py`) share.

The Triton kernels (`pallas_attention.py`) reach about a third of cuDNN's rate on an H200: compiled for
Hopper they issue wgmmas but load with no TMA pipeline or warp specialisation, and at PI-P's widths they
hold 255 registers a thread and spill (dk/dv 1.3 KB; `bench gpu_compile`). These kernels are laid out the way
FlashAttention-3 is. Each program (CUDA block) holds 128 rows of one (batch, head), queries (forward,
dq) or keys (dk/dv), as two compute warpgroups of 64 rows (wgmma's M), and one memory warpgroup that
streams the other side's blocks (64 rows; 32 queries in dk/dv) through `STAGES` shared-memory slots with
TMA, a barrier per slot for "loaded" and one for "consumed" (`stream_blocks`). Each compute warpgroup
runs per block and per map the wgmma products from shared memory (`product`), the softmax arithmetic in
registers, and the products that accumulate in registers (`add_product`, the left operand in registers).
Every block loaded serves all M maps, as in the other kernels. Blocks come from the same tables as theirs
(`flash_attention.block_bounds`, `full_blocks`): the all-visible blocks run without the elementwise
mask, the rest with it, and a compute warpgroup whose range is shorter releases the slots the other
still uses (`release`).

Layouts: wgmma reads its shared-memory operands in (8, swizzle / itemsize) tiles, with one swizzle for
both; a head width is zero-padded to a multiple of 16 (PI-P's 72 to 80, 144 stays) and every tile gets
the widest of 128, 64, 32 bytes that divides its row (32 for 80 columns), so the two operands of a
product share their row width and swizzle. `kᵀ` (and `vᵀ`, `qᵀ`, `gᵀ` in the backward) is the row-major
tile read transposed by wgmma. Inputs must be 16-bit (wgmma takes an operand from registers in 16 bits).

The kernels are tested on CPU in Mosaic GPU's interpret mode, which simulates the warpgroups, TMA copies
and barriers (and checks that every thread observes every barrier phase) but has no register layouts,
no `pl.run_state` and no wgmma on a transposed or register operand: `in_layout`, `load`, `product` and
`add_product` take the interpreter's form there (the same arithmetic as `jnp` on the tiles); the rest is
the code the GPU runs, and its lowering for the GPU is tested too.
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

ROWS = 64  # rows per compute warpgroup (wgmma's M), and the other side's rows per block
COMPUTE_WARPGROUPS = 2
TILE = ROWS * COMPUTE_WARPGROUPS  # a program's rows: queries and keys are padded to a multiple
STAGES = 2  # shared-memory slots of streamed blocks in flight
LOG2E = math.log2(math.e)
ROW, COLUMN = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)  # per-row / per-column vectors


def interpreter():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def swizzle(row_bytes: int, widest: int = 128) -> int:
  """The widest shared-memory swizzle (bytes, at most `widest`) that tiles a row of `row_bytes`."""
  for size in (128, 64, 32):
    if size <= widest and row_bytes % size == 0:
      return size
  raise ValueError(f"a {row_bytes}-byte row fits no wgmma swizzle (a multiple of 32 bytes).")


def tile(shape, dtype, widest_swizzle: int = 128):
  """Shared memory for wgmma operands `[..., rows, width]`, swizzled by its row's width. A wgmma whose
  contraction runs along an operand's rows needs them a multiple of swizzle / itemsize: `widest_swizzle`
  caps the swizzle for operands of fewer rows."""
  itemsize = jnp.dtype(dtype).itemsize
  size = swizzle(shape[-1] * itemsize, widest_swizzle)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, size // itemsize)),
                                              plgpu.SwizzleTransform(size)))


def widths(d: int, dv: int) -> tuple[int, int]:
  """Head widths padded to a multiple of 16, checked against one wgmma's N (256)."""
  dp, dvp = -(-d // 16) * 16, -(-dv // 16) * 16
  if max(dp, dvp) > 256:
    raise ValueError(f"the Mosaic GPU attention kernels' products are single wgmmas, at most 256 columns wide; "
                     f"got head widths {d} and {dv}: set model.attention_gpu_forward / _backward to Triton's.")
  return dp, dvp


def check_inputs(t: int, s: int, *arrays):
  if any(a.dtype not in (jnp.bfloat16, jnp.float16) or a.dtype != arrays[0].dtype for a in arrays):
    raise ValueError(f"the Mosaic GPU attention kernels need bfloat16 or float16 q, k, v, got "
                     f"{', '.join(str(a.dtype) for a in arrays)}: set model.dtype, or model.attention_gpu_forward / "
                     "_backward to Triton's.")
  if t % TILE or s % TILE:
    raise ValueError(f"the Mosaic GPU attention kernels tile {TILE} queries and keys, got T={t}, S={s}.")


def in_layout(x, layout, interpret: bool):
  return x if interpret else plgpu.layout_cast(x, layout)


def load(ref, index, layout, interpret: bool):
  """`ref[index]` into registers in `layout` (a scalar with layout None)."""
  return ref[index] if interpret else plgpu.load(ref, index, layout=layout, optimized=False)


def product(a_smem, b_smem, *, transpose_b: bool, interpret: bool):
  """`a b` or `a bᵀ` (fp32) of two shared-memory tiles through one wgmma."""
  if interpret:
    b = b_smem[...]
    return jnp.dot(a_smem[...], b.T if transpose_b else b, preferred_element_type=jnp.float32)

  def run(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem)
    return acc_ref[...]
  return pl.run_scoped(run, plgpu.ACC((a_smem.shape[0], b_smem.shape[0 if transpose_b else 1]), jnp.float32))


def add_product(acc, a, b_smem, interpret: bool):
  """`acc + a b` for a in registers (16-bit) and a shared-memory tile b: wgmma accumulating in acc's
  registers."""
  if interpret:
    return acc + jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)

  def accumulate(acc_ref):
    plgpu.wgmma(acc_ref, a, b_smem)
  return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def slot_of(j):
  return lax.rem(j, STAGES)


def stream_blocks(copy, start, stop, consumed):
  """The memory warpgroup: block j of [start, stop) into slot j % STAGES by `copy(j, slot)`, once both
  compute warpgroups have released the slot's previous block (every barrier of `consumed`); then it waits
  for the last releases, so that it observes every phase."""
  @pl.loop(start, jnp.minimum(stop, start + STAGES))
  def _fill(j):
    copy(j, slot_of(j))

  @pl.loop(start + STAGES, stop)
  def _stream(j):
    for barrier in consumed:
      plgpu.barrier_wait(barrier.at[slot_of(j)])
    copy(j, slot_of(j))

  @pl.loop(jnp.maximum(stop - STAGES, start), stop)
  def _drain(j):
    for barrier in consumed:
      plgpu.barrier_wait(barrier.at[slot_of(j)])


def stream_key_blocks(bh, k_ref, v_ref, k_smem, v_smem, loaded, consumed, stop):
  """The memory warpgroup of the query-blocked kernels (forward, dq): key blocks [0, stop), k per map and v
  (`loaded` = (k's barriers, v's))."""
  def copy(j, slot):
    keys = pl.ds(j * ROWS, ROWS)
    for m in range(k_smem.shape[1]):
      plgpu.copy_gmem_to_smem(k_ref.at[bh, m, keys], k_smem.at[slot, m], loaded[0].at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[bh, keys], v_smem.at[slot], loaded[1].at[slot])
  stream_blocks(copy, 0, stop, consumed)


def release(start, stop, loaded, consumed):
  """A compute warpgroup's blocks [start, stop) that only the other needs: seen loaded, released."""
  @pl.loop(start, stop)
  def _release(j):
    for barrier in loaded:
      plgpu.barrier_wait(barrier.at[slot_of(j)])
    for barrier in consumed:
      plgpu.barrier_arrive(barrier.at[slot_of(j)])


def program_ids(heads: int):
  """The program's batch·head index, batch index, warpgroup and first 64-row block."""
  bh, program, wg = (lax.axis_index(name) for name in ("batch_heads", "blocks", "wg"))
  return bh, lax.div(bh, heads), wg, program * COMPUTE_WARPGROUPS


def table(ref, b, block, interpret: bool):
  """A block table's `[B, blocks]` entry (a scalar)."""
  return load(ref, (b, block), None, interpret)


def both_warpgroups(reduce, ref, b, first_block, interpret: bool):
  """`reduce` of the two compute warpgroups' table entries: the streamed range's end (max) or start (min)."""
  return reduce(table(ref, b, first_block, interpret), table(ref, b, first_block + 1, interpret))


def rows_broadcast(ref, index, interpret: bool, columns: int = ROWS):
  """A per-row vector `ref[index]` `[ROWS]`, broadcast along the columns: `[ROWS, columns]`."""
  return lax.broadcast_in_dim(load(ref, index, ROW, interpret), (ROWS, columns), [0])


def columns_broadcast(ref, index, interpret: bool):
  """A per-column vector `ref[index]` `[N]`, broadcast along the rows: `[ROWS, N]`."""
  columns = load(ref, index, COLUMN, interpret)
  return lax.broadcast_in_dim(columns, (ROWS,) + columns.shape, [1])


def key_block_visibility(q_pos, q_seg, kv_mask_ref, b, j, causal: bool, interpret: bool):
  """Which pairs of a warpgroup's queries (positions and segments broadcast `[ROWS, ROWS]`) and key block j
  are visible: `[ROWS, ROWS]` bool."""
  keys = pl.ds(j * ROWS, ROWS)
  return fa.visibility(q_pos, q_seg, *(columns_broadcast(kv_mask_ref, (b, r, keys), interpret) for r in range(3)),
                       causal)


def compiler(interpret: bool) -> dict:
  """plgpu.kernel's arguments for a program of two compute warpgroups and a memory one."""
  return dict(num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg",
              compiler_params=None if interpret else plgpu.CompilerParams(approx_math=True),
              interpret=interpreter() if interpret else None)


def warp_specialise(wg, compute, memory):
  """`compute()` on the compute warpgroups, `memory()` on the memory one, each first moving registers to the
  compute warpgroups: 128 threads x (2 x 240 + 24) fit the SM's 64K (two maps' fp32 accumulators at PI-P's
  144 value columns take 144 a thread). ptxas honours the moves only as the first step of each branch: from
  conditionals of their own, with a join after them, it ignored them (its note C7507), every warpgroup kept
  168, and all three kernels spilled (0.6-2.4 KB a thread) and serialised their wgmmas (C7512)."""
  @pl.when(wg < COMPUTE_WARPGROUPS)
  def _compute():
    plgpu.set_max_registers(240, action="increase")
    compute()

  @pl.when(wg == COMPUTE_WARPGROUPS)
  def _memory():
    plgpu.set_max_registers(24, action="decrease")
    memory()


def _forward_kernel(key_stop_ref, full_keys_ref, q_ref, k_ref, v_ref, q_mask_ref, kv_mask_ref, out_ref, lse_ref,
                    q_smem, k_smem, v_smem, out_smem, lse_smem, q_loaded, k_loaded, v_loaded, k_consumed,
                    v_consumed, *, heads: int, causal: bool, interpret: bool):
  num_maps, dvp = k_smem.shape[1], v_smem.shape[-1]
  bh, b, wg, first_block = program_ids(heads)
  steps = both_warpgroups(jnp.maximum, key_stop_ref, b, first_block, interpret)

  def compute():
    block = first_block + wg
    rows = pl.ds(block * ROWS, ROWS)
    stop = table(key_stop_ref, b, block, interpret)
    full = jnp.minimum(table(full_keys_ref, b, block, interpret), stop)
    for m in range(num_maps):  # a map at a time: TMA strides over at most 5 dimensions, tiles included
      plgpu.copy_gmem_to_smem(q_ref.at[bh, m, rows], q_smem.at[wg, m], q_loaded.at[wg])
    q_pos, q_seg = (rows_broadcast(q_mask_ref, (b, r, rows), interpret) for r in range(2))
    init = lambda value, shape, layout: in_layout(jnp.full(shape, value, jnp.float32), layout, interpret)
    carry = tuple((init(fa.MASK_VALUE, (ROWS,), ROW), init(0.0, (ROWS,), ROW),
                   init(0.0, (ROWS, dvp), plgpu.Layout.WGMMA)) for _ in range(num_maps))
    plgpu.barrier_wait(q_loaded.at[wg])

    def key_step(masked: bool):
      def step(j, carry):
        slot = slot_of(j)
        visible = key_block_visibility(q_pos, q_seg, kv_mask_ref, b, j, causal, interpret) if masked else None
        plgpu.barrier_wait(k_loaded.at[slot])
        plgpu.barrier_wait(v_loaded.at[slot])
        new = []
        for m, (m_old, l, acc) in enumerate(carry):  # a map at a time: one map's scores live in registers
          # Scores in log2 units (exp2 is one instruction); MASK_VALUE stays finite after the max.
          s = product(q_smem.at[wg, m], k_smem.at[slot, m], transpose_b=True, interpret=interpret) * LOG2E
          if masked:
            s = jnp.where(visible, s, fa.MASK_VALUE)
          m_new = jnp.maximum(m_old, s.max(axis=1))
          alpha = jnp.exp2(m_old - m_new)
          p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
          if masked:  # hidden keys give exp2(MASK_VALUE - max) = 0, unless the row has seen no visible key
            p = jnp.where(lax.broadcast_in_dim(m_new > 0.5 * fa.MASK_VALUE, s.shape, [0]), p, 0.0)
          acc = add_product(acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p.astype(v_smem.dtype),
                            v_smem.at[slot], interpret)
          new.append((m_new, l * alpha + p.sum(axis=1), acc))
        plgpu.barrier_arrive(k_consumed.at[slot])
        plgpu.barrier_arrive(v_consumed.at[slot])
        return tuple(new)
      return step

    carry = lax.fori_loop(0, full, key_step(False), carry)
    carry = lax.fori_loop(full, stop, key_step(True), carry)
    release(stop, steps, (k_loaded, v_loaded), (k_consumed, v_consumed))
    for m, (m_i, l, acc) in enumerate(carry):
      seen = l > 0.0
      scale = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
      out_smem.at[wg][...] = acc * lax.broadcast_in_dim(scale, acc.shape, [0])
      lse_smem.at[wg, m][...] = jnp.where(seen, (m_i + jnp.log2(jnp.where(seen, l, 1.0))) / LOG2E, 0.0)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem.at[wg], out_ref.at[bh, m, rows])
      plgpu.wait_smem_to_gmem(0)  # out_smem is reused for the next map
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bh, :, rows])
    plgpu.wait_smem_to_gmem(0)

  warp_specialise(wg, compute, functools.partial(
      stream_key_blocks, bh, k_ref, v_ref, k_smem, v_smem, (k_loaded, v_loaded), (k_consumed, v_consumed), steps))


def flat(x):
  """Batch and heads as one leading axis: with a map's index and a tile's four, the five TMA can stride."""
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def forward(q, k, v, masks, causal, block_q, block_k, *, interpret: bool):
  """Per-map outputs `[B, H, M, T, Dv]` (fp32) and log-sum-exp `[B, H, M, T]`, as `fa.xla_forward`, for
  T and S multiples of TILE (`flash_attention` pads to them). block_q and block_k are the Triton kernels'
  and are not used: these blocks are fixed by wgmma (64 rows a warpgroup, 64 keys a step)."""
  del block_q, block_k
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  check_inputs(t, s, q, k, v)
  dp, dvp = widths(d, dv)
  _, _, last_key, _ = fa.block_bounds(masks, ROWS, ROWS, causal)
  full_keys, _ = fa.full_blocks(masks, ROWS, ROWS, causal)
  q_pos, q_seg, kv_pos, kv_seg, kv_valid = masks
  out, lse = plgpu.kernel(
      functools.partial(_forward_kernel, heads=h, causal=causal, interpret=interpret),
      out_type=[jax.ShapeDtypeStruct((b * h, num_maps, t, dvp), jnp.float32),
                jax.ShapeDtypeStruct((b * h, num_maps, t), jnp.float32)],
      scratch_types=[
          tile((COMPUTE_WARPGROUPS, num_maps, ROWS, dp), q.dtype),
          tile((STAGES, num_maps, ROWS, dp), q.dtype),
          tile((STAGES, ROWS, dvp), q.dtype),
          tile((COMPUTE_WARPGROUPS, ROWS, dvp), jnp.float32),
          plgpu.SMEM((COMPUTE_WARPGROUPS, num_maps, ROWS), jnp.float32),
          plgpu.Barrier(num_arrivals=num_maps, num_barriers=COMPUTE_WARPGROUPS),  # one copy per map
          plgpu.Barrier(num_arrivals=num_maps, num_barriers=STAGES),
          plgpu.Barrier(num_barriers=STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),
          plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=STAGES),
      ],
      grid=(b * h, t // TILE), grid_names=("batch_heads", "blocks"), kernel_name="mosaic_attention_forward",
      **compiler(interpret),
  )(last_key + 1, full_keys, flat(pad_last(q, dp)), flat(pad_last(k, dp)), flat(pad_last(v, dvp)),
    jnp.stack([q_pos, q_seg], 1), jnp.stack([kv_pos, kv_seg, kv_valid], 1))
  return out.reshape(b, h, num_maps, t, dvp)[..., :dv], lse.reshape(b, h, num_maps, t)
