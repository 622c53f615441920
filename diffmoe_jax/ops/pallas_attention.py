"""Pallas kernels for `flash_attention`: forward, and the FlashAttention-2 backward as two kernels (dq,
dk/dv) or as one (dk/dv adding each block's dq share atomically; `fa.GPU_BACKWARDS`).

Same layouts, block math and masks as the XLA driver in `flash_attention.py`. One program per
(batch, head, block): the forward and dq kernels hold a query block and loop over key blocks, the dk/dv
kernel holds a key block and loops over query blocks. Each kernel's blocks, warps and pipeline stages
are its `Launch`. Every K/V block loaded serves all M maps. The
loops run over the live range of blocks from `flash_attention.block_bounds` (computed in XLA, one int32
per block): key blocks up to the query block's last live one, query blocks from the key block's first
live one, which with sorted positions stops exactly at the diagonal. The loop body has no branch, so
Triton can pipeline its loads; a dead pair inside the range (unsorted positions, other segments) runs
fully masked and adds nothing. On an H200 (PI-P's heads, bf16, T = 8192) the branch-free loops ran the
forward 1.9x faster than skipping blocks under `lax.cond` inside the loop. Each range is split in two
loops: the blocks `flash_attention.full_blocks` finds all visible run without the elementwise mask (with
sorted positions, all below the diagonal), the rest with it: fwd+bwd 13.2 -> 11.2 ms there.

Triton's tensors are powers of two. A head width is zero-padded to a multiple of 16 and handled as
power-of-two column chunks (`column_chunks`: 72 as 64 + 16, 144 as 128 + 16): scores sum the chunks'
products and each output chunk accumulates alone. Padding to the next power of two instead (128 and
256 for PI-P) costs 1.8x the FLOPs and measured 2.6-3x the time of power-of-two heads of 64 and 128.

These are the Triton GPU kernels (TPU's are in `pallas_tpu_attention.py`; Hopper's Mosaic GPU ones, which
stream their blocks through shared memory themselves, in `mosaic_gpu_attention.py`). They are lowered by
Triton, never by Mosaic GPU (jax's default for a `pallas_call` without compiler parameters): Mosaic GPU
copies every block into shared memory, and the whole-sequence K/V blocks the query-blocked kernels read
from overflow it at any useful length (437 KB at T = 512, D = 64). Triton loads only the `pl.ds` slices
a loop step touches.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from diffmoe_jax.ops import flash_attention as fa
from diffmoe_jax.ops.flash_attention import pad_last

# The fp32 accumulators a program keeps in registers: M·bq·Dv (forward), M·bq·D (dq), (M·D + Dv)·bk
# (dk/dv). Blocks are halved until they hold at most 32K values, 128 per thread of a program whose warps
# each own 16 of its rows (Triton's MMA tiles are 16 rows per warp): PI-P's heads (two maps, D = 72 and
# Dv = 144 as 80 and 144 columns) get 64 x 64 blocks and 4 warps. On an H200 (bf16, T = 8192, 64 and 128
# columns) 64-row blocks ran 1.9x faster on 4 warps than on 8 (`launch/gpu_checks.sh`, README).
_ACCUMULATOR_VALUES = 32768
# Nor more than 64 rows: at PI-S's and PI's heads (64 and 128 columns) the budget allows 128, with which the
# dk/dv kernel asks for 292 KB of shared memory, over Hopper's 227 KB, and the forward and dq spill registers
# (`bench gpu_compile`); at PI-P's, 128-row forward programs measured slower on an H200 (3.39 vs 2.98 ms).
_MAX_BLOCK = 64


def register_blocks(block_q: int, block_k: int, num_maps: int, d: int, dv: int) -> tuple[int, int]:
  """(bq, bk): the blocks asked for (powers of two), at most `_MAX_BLOCK`, halved while their accumulators
  exceed the budget and they are above 16."""
  fit = lambda block, per_row: min(block, _MAX_BLOCK,
                                   max(16, 1 << (_ACCUMULATOR_VALUES // per_row).bit_length() - 1))
  return fit(block_q, num_maps * max(d, dv)), fit(block_k, num_maps * d + dv)


class Launch(NamedTuple):
  """How one kernel runs: rows per program (queries for the forward and dq, keys for dk/dv), rows of the
  other side per loop step, warps, and Triton's software-pipeline stages."""
  rows: int
  step: int
  num_warps: int
  num_stages: int = 2


def default_launches(block_q: int, block_k: int, num_maps: int, d: int, dv: int) -> dict[str, Launch]:
  """Each kernel's launch ("forward", "dq", "dkv"; the one-pass backward uses "dkv") for the blocks asked
  for, at padded widths d and dv: `register_blocks`, 4 warps (one per 16 rows of a 64-row program), two
  stages. `python -m diffmoe_jax.bench kernels` times the alternatives on a GPU."""
  bq, bk = register_blocks(block_q, block_k, num_maps, d, dv)
  return {"forward": Launch(bq, bk, 4), "dq": Launch(bq, bk, 4), "dkv": Launch(bk, bq, 4)}


def _pallas_call(kernel, interpret: bool, launch: Launch, **spec):
  params = pl_triton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)
  return pl.pallas_call(kernel, compiler_params=None if interpret else params, interpret=interpret, **spec)


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
      bound=pl.BlockSpec((None, 1), lambda b, h, i: (b, i)),  # the grid block's loop bound
  )


def column_chunks(n: int) -> tuple[tuple[int, int], ...]:
  """(offset, width) column chunks of a head width n rounded up to a multiple of 16 (Triton's smallest
  dot): its binary decomposition into powers of two, widest first (72 -> 64 + 16, 144 -> 128 + 16)."""
  rest, chunks = -(-n // 16) * 16, []
  while rest:
    width = 1 << rest.bit_length() - 1
    chunks.append((sum(_widths(chunks)), width))
    rest -= width
  return tuple(chunks)


def _widths(chunks) -> tuple[int, ...]:
  return tuple(w for _, w in chunks)


def _load(ref, chunks, *index):
  """The tile `ref[*index, chunk]`: one array per column chunk."""
  return tuple(ref[(*index, pl.ds(offset, width))] for offset, width in chunks)


def _store(ref, chunks, tile, *index):
  for (offset, width), part in zip(chunks, tile):
    ref[(*index, pl.ds(offset, width))] = part


def _split_range(start, stop, split):
  """[start, split) and [split, stop) of the loop range [start, stop), split clipped into it."""
  split = jnp.minimum(jnp.maximum(split, start), stop)
  return (start, split), (split, stop)


def _loops(ranges, step, carry):
  """`step(masked)(i, carry)` over the unmasked range, then the masked one (or the other order): two
  branch-free loops, the elementwise mask only in the blocks that need it."""
  for (start, stop), masked in ranges:
    carry = lax.fori_loop(start, stop, step(masked), carry)
  return carry


def _over_key_blocks(body, carry, key_blocks_ref, full_keys_ref, k_ref, v_ref, q_pos, q_seg, kv_pos_ref, kv_seg_ref,
                     kv_valid_ref, *, causal: bool, block_k: int, d_chunks, v_chunks):
  """`carry = body(ks, v, visible, carry)` over a query block's live key blocks: per map's key tiles, the
  value tile and the mask (None in the blocks whose pairs are all visible, which come first)."""
  def key_step(masked):
    def step(j, carry):
      keys = pl.ds(j * block_k, block_k)
      visible = (fa.block_visibility(q_pos, q_seg, kv_pos_ref[keys], kv_seg_ref[keys], kv_valid_ref[keys], causal)
                 if masked else None)
      ks = [_load(k_ref, d_chunks, m, keys) for m in range(k_ref.shape[0])]
      return body(ks, _load(v_ref, v_chunks, keys), visible, carry)
    return step

  full, partial = _split_range(0, jnp.max(key_blocks_ref[...]), jnp.max(full_keys_ref[...]))
  return _loops(((full, False), (partial, True)), key_step, carry)


def _forward_kernel(key_blocks_ref, full_keys_ref, q_ref, k_ref, v_ref, q_pos_ref, q_seg_ref, kv_pos_ref,
                    kv_seg_ref, kv_valid_ref, out_ref, lse_ref, *, causal: bool, block_k: int, d_chunks, v_chunks):
  num_maps, block_q, _ = q_ref.shape
  qs = [_load(q_ref, d_chunks, j, slice(None)) for j in range(num_maps)]
  carry = _over_key_blocks(lambda ks, v, visible, c: fa.forward_block(qs, ks, v, visible, c),
                           fa.init_carry((block_q,), num_maps, _widths(v_chunks)), key_blocks_ref, full_keys_ref,
                           k_ref, v_ref, q_pos_ref[...], q_seg_ref[...], kv_pos_ref, kv_seg_ref, kv_valid_ref,
                           causal=causal, block_k=block_k, d_chunks=d_chunks, v_chunks=v_chunks)
  outs, lses = fa.finalize(carry)
  for j in range(num_maps):
    _store(out_ref, v_chunks, outs[j], j, slice(None))
    lse_ref[j] = lses[j][:, 0]


def _dq_kernel(key_blocks_ref, full_keys_ref, q_ref, k_ref, v_ref, g_ref, w_ref, lse_ref, delta_ref, q_pos_ref,
               q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref, dq_ref, *, causal: bool, block_k: int, d_chunks,
               v_chunks):
  num_maps, block_q, _ = q_ref.shape
  stats = lambda ref: [ref[m][:, None] for m in range(num_maps)]
  qs = [_load(q_ref, d_chunks, m, slice(None)) for m in range(num_maps)]
  ws, lses, deltas, g = stats(w_ref), stats(lse_ref), stats(delta_ref), _load(g_ref, v_chunks, slice(None))

  def add_block(ks, v, visible, dq):
    grads, _, _ = fa.backward_block(qs, ks, v, g, ws, lses, deltas, visible, want_dkv=False)
    return jax.tree.map(jnp.add, dq, tuple(grads))

  zeros = tuple(fa.zeros_tile((block_q,), _widths(d_chunks)) for _ in range(num_maps))
  dq = _over_key_blocks(add_block, zeros, key_blocks_ref, full_keys_ref, k_ref, v_ref, q_pos_ref[...], q_seg_ref[...],
                        kv_pos_ref, kv_seg_ref, kv_valid_ref, causal=causal, block_k=block_k, d_chunks=d_chunks,
                        v_chunks=v_chunks)
  for j in range(num_maps):
    _store(dq_ref, d_chunks, dq[j], j, slice(None))


def _dkv_kernel(first_query_ref, full_queries_ref, q_ref, k_ref, v_ref, g_ref, w_ref, lse_ref, delta_ref, q_pos_ref,
                q_seg_ref, kv_pos_ref, kv_seg_ref, kv_valid_ref, *out_refs, causal: bool, block_q: int, d_chunks,
                v_chunks, one_pass: bool):
  """dk, dv of one key block; with one_pass also each query block's dq share, added atomically into dq
  (out_refs: the zeros aliased as dq, then dk, dv, dq)."""
  dk_ref, dv_ref, dq_ref = out_refs[1:] if one_pass else (*out_refs, None)
  num_maps, block_k, _ = k_ref.shape
  ks = [_load(k_ref, d_chunks, m, slice(None)) for m in range(num_maps)]
  v = _load(v_ref, v_chunks, slice(None))
  kv_pos, kv_seg, kv_valid = kv_pos_ref[...], kv_seg_ref[...], kv_valid_ref[...]

  def query_step(masked):
    def step(i, carry):
      rows = pl.ds(i * block_q, block_q)
      visible = (fa.block_visibility(q_pos_ref[rows], q_seg_ref[rows], kv_pos, kv_seg, kv_valid, causal)
                 if masked else None)
      per_map = lambda ref: [ref[m, rows][:, None] for m in range(num_maps)]
      dq_blk, dk_blk, dv_blk = fa.backward_block(
          [_load(q_ref, d_chunks, m, rows) for m in range(num_maps)], ks, v, _load(g_ref, v_chunks, rows),
          per_map(w_ref), per_map(lse_ref), per_map(delta_ref), visible, want_dq=one_pass)
      for m in range(num_maps if one_pass else 0):
        for (offset, width), part in zip(d_chunks, dq_blk[m]):
          pl_triton.atomic_add(dq_ref, (jnp.int32(m), rows, pl.ds(offset, width)), part)
      return jax.tree.map(jnp.add, carry, (tuple(dk_blk), dv_blk))
    return step

  zeros = (tuple(fa.zeros_tile((block_k,), _widths(d_chunks)) for _ in range(num_maps)),
           fa.zeros_tile((block_k,), _widths(v_chunks)))
  partial, full = _split_range(jnp.max(first_query_ref[...]), q_ref.shape[1] // block_q,
                               jnp.max(full_queries_ref[...]))
  dk, dv = _loops(((partial, True), (full, False)), query_step, zeros)
  for j in range(num_maps):
    _store(dk_ref, d_chunks, dk[j], j, slice(None))
  _store(dv_ref, v_chunks, dv, slice(None))


def _padded_chunks(d: int, dv: int):
  chunks = dict(d_chunks=column_chunks(d), v_chunks=column_chunks(dv))
  return chunks, sum(_widths(chunks["d_chunks"])), sum(_widths(chunks["v_chunks"]))


def _blocks(launch: Launch, kernel: str, rows: int, steps: int) -> tuple[int, int]:
  """(rows, step) of `launch`, checked to tile `rows` program rows and `steps` loop rows (Triton's dots
  further need at least 16; interpreted, smaller blocks run)."""
  for name, block, length in (("rows", launch.rows, rows), ("step", launch.step, steps)):
    if block < 1 or block & (block - 1) or length % block:
      raise ValueError(f"the {kernel} kernel's launch {name}={block} must be a power of two that divides "
                       f"{length}.")
  return launch.rows, launch.step


def forward(q, k, v, masks, causal, block_q, block_k, *, interpret: bool, launches=None):
  """Per-map outputs `[B, H, M, T, Dv]` (fp32) and log-sum-exp `[B, H, M, T]`, as `fa.xla_forward`.
  launches: `{"forward": Launch}` instead of `default_launches(block_q, block_k, ...)`'s."""
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  chunks, dp, dvp = _padded_chunks(d, dv)
  launch = {**default_launches(block_q, block_k, num_maps, dp, dvp), **(launches or {})}["forward"]
  block_q, block_k = _blocks(launch, "forward", t, s)
  specs = _specs(block_q, block_k, t, s, num_maps, dp, dvp, query_blocked=True)
  _, _, last_key, _ = fa.block_bounds(masks, block_q, block_k, causal)
  full_keys, _ = fa.full_blocks(masks, block_q, block_k, causal)
  out, lse = _pallas_call(
      functools.partial(_forward_kernel, causal=causal, block_k=block_k, **chunks), interpret, launch,
      grid=(b, h, t // block_q),
      in_specs=[specs["bound"], specs["bound"], specs["q"], specs["k"], specs["v"], specs["q_mask"], specs["q_mask"],
                specs["k_mask"], specs["k_mask"], specs["k_mask"]],
      out_specs=[pl.BlockSpec((None, None, num_maps, block_q, dvp), lambda b_, h_, i: (b_, h_, 0, i, 0)),
                 specs["stats"]],
      out_shape=[jax.ShapeDtypeStruct((b, h, num_maps, t, dvp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, num_maps, t), jnp.float32)],
      name="flash_multi_map_forward",
  )(last_key + 1, full_keys, pad_last(q, dp), pad_last(k, dp), pad_last(v, dvp), *masks)
  return out[..., :dv], lse


_BACKWARD_OPERANDS = ("q", "k", "v", "g", "stats", "stats", "stats", "q_mask", "q_mask", "k_mask", "k_mask",
                      "k_mask")


def _backward_operands(q, k, v, w, g, lse, delta, masks, dp: int, dvp: int) -> tuple:
  return (pad_last(q, dp), pad_last(k, dp), pad_last(v, dvp), pad_last(g, dvp), w, lse, delta, *masks)


def dkv(q, k, v, w, g, lse, delta, masks, causal, launch: Launch, *, interpret: bool, one_pass: bool):
  """dk, dv (fp32) from the key-blocked kernel; with one_pass also dq, added in atomically (else None)."""
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  chunks, dp, dvp = _padded_chunks(d, dv)
  block_k, block_q = _blocks(launch, "dk/dv", s, t)
  first_query = fa.block_bounds(masks, block_q, block_k, causal)[3]
  full_queries = fa.full_blocks(masks, block_q, block_k, causal)[1]
  specs = _specs(block_q, block_k, t, s, num_maps, dp, dvp, query_blocked=False)
  dq_spec = [specs["q"]] if one_pass else []  # every program adds into its (b, h)'s whole dq
  dq_shape = (b, h, num_maps, t, dp)
  outputs = _pallas_call(
      functools.partial(_dkv_kernel, causal=causal, block_q=block_q, one_pass=one_pass, **chunks), interpret,
      launch,
      grid=(b, h, s // block_k),
      in_specs=[specs[n] for n in ("bound", "bound") + _BACKWARD_OPERANDS] + dq_spec,
      out_specs=[specs["k"], specs["v"]] + dq_spec,
      out_shape=[jax.ShapeDtypeStruct((b, h, num_maps, s, dp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, s, dvp), jnp.float32)]
                + ([jax.ShapeDtypeStruct(dq_shape, jnp.float32)] if one_pass else []),
      input_output_aliases={len(_BACKWARD_OPERANDS) + 2: 2} if one_pass else {},
      name="flash_multi_map_dkv_dq" if one_pass else "flash_multi_map_dkv",
  )(first_query, full_queries, *_backward_operands(q, k, v, w, g, lse, delta, masks, dp, dvp),
    *([jnp.zeros(dq_shape, jnp.float32)] if one_pass else []))
  return outputs[2][..., :d] if one_pass else None, outputs[0][..., :d], outputs[1][..., :dv]


def dq(q, k, v, w, g, lse, delta, masks, causal, launch: Launch, *, interpret: bool):
  """dq (fp32) from the query-blocked kernel."""
  b, h, num_maps, t, d = q.shape
  s, dv = k.shape[3], v.shape[-1]
  chunks, dp, dvp = _padded_chunks(d, dv)
  block_q, block_k = _blocks(launch, "dq", t, s)
  last_key = fa.block_bounds(masks, block_q, block_k, causal)[2]
  full_keys = fa.full_blocks(masks, block_q, block_k, causal)[0]
  specs = _specs(block_q, block_k, t, s, num_maps, dp, dvp, query_blocked=True)
  out = _pallas_call(
      functools.partial(_dq_kernel, causal=causal, block_k=block_k, **chunks), interpret, launch,
      grid=(b, h, t // block_q),
      in_specs=[specs[n] for n in ("bound", "bound") + _BACKWARD_OPERANDS],
      out_specs=specs["q"],
      out_shape=jax.ShapeDtypeStruct((b, h, num_maps, t, dp), jnp.float32),
      name="flash_multi_map_dq",
  )(last_key + 1, full_keys, *_backward_operands(q, k, v, w, g, lse, delta, masks, dp, dvp))
  return out[..., :d]


def backward(q, k, v, w, g, lse, delta, masks, causal, block_q, block_k, *, interpret: bool, one_pass: bool,
             launches=None):
  """dq, dk, dv (fp32), as `fa.xla_backward`: dq from its own kernel, or (one_pass) from the dk/dv kernel's
  atomic adds (`fa.GPU_BACKWARDS`). launches: `{"dq": Launch, "dkv": Launch}` (either) instead of the
  defaults."""
  operands = (q, k, v, w, g, lse, delta, masks, causal)
  _, dp, dvp = _padded_chunks(q.shape[-1], v.shape[-1])
  launches = {**default_launches(block_q, block_k, q.shape[2], dp, dvp), **(launches or {})}
  dq_out, dk, dv_out = dkv(*operands, launches["dkv"], interpret=interpret, one_pass=one_pass)
  if not one_pass:
    dq_out = dq(*operands, launches["dq"], interpret=interpret)
  return dq_out, dk, dv_out
