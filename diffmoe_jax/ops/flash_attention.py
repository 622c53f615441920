"""Blockwise (flash) multi-map attention: O(T·block) memory, any number of softmax maps in one pass.

`flash_attention` computes `Σ_m w_m · softmax(q_m k_mᵀ + M) v` for M maps sharing one value tensor:
M = 2 with w = (1, −λ) is differential attention, M = 1 with w = 1 is standard attention. Each K/V block is
loaded once and serves every map; each map keeps its own online softmax (running max and sum) and output
accumulator, so no `[T, S]` array is ever formed. The custom VJP recomputes each block's probabilities
from the saved per-map log-sum-exp (FlashAttention-2). With `O = Σ_m w_m P_m v` and `dC = g vᵀ` shared by
the maps: `dS_m = w_m P_m ⊙ (dC − δ_m)` with `δ_m = g·o_m` (o_m the map's normalised output),
`dv = (Σ_m w_m P_m)ᵀ g` and `dw_m = δ_m`.

Masks are elementwise: key s is visible to query t when `kv_valid[s]`, `seg[t] == seg[s]` and (causal)
`kv_pos[s] <= q_pos[t]`. A (query block, key block) pair with no visible pair is skipped, which with
sorted positions skips exactly the blocks above the diagonal; arbitrary positions stay correct because the
mask is applied per element in every block that runs. A query with no visible key returns 0.

Two drivers share the block math: "xla" (while loops over query blocks and, inside, key blocks; runs on
every backend) and "pallas" (kernels in `pallas_attention.py`). Internal layout: q `[B, H, M, T, D]`,
k `[B, H, M, S, D]`, v `[B, H, S, Dv]`, per-row statistics `[B, H, M, T]`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

# A finite stand-in for -inf: a fully masked row then gives finite values (and exact zeros after the
# post-softmax mask) instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
KERNELS = ("xla", "pallas", "pallas_gpu", "pallas_tpu")
# The GPU kernels' backward: in Triton, "two_pass", a second kernel over key blocks computes dq and
# recomputes the scores (FlashAttention-2's Triton layout), or "one_pass", the dk/dv kernel adds each
# block's dq share into an fp32 dq with atomic adds (its CUDA layout: 29% fewer backward FLOPs at PI-P's
# heads, nondeterministic summation order); "mosaic", two passes in Mosaic GPU
# (`mosaic_gpu_attention_backward.py`: Hopper's TMA and wgmma, 16-bit inputs).
GPU_BACKWARDS = ("two_pass", "one_pass", "mosaic")
# The GPU forward: "triton" (`pallas_attention.py`, any NVIDIA or AMD GPU) or "mosaic"
# (`mosaic_gpu_attention.py`: Hopper's TMA and wgmma, 16-bit inputs).
GPU_FORWARDS = ("triton", "mosaic")
# The checkpoint name of the custom VJP's residuals: per-map outputs and log-sum-exp.
RESIDUALS_NAME = "flash_residuals"


def visibility(q_pos, q_seg, kv_pos, kv_seg, kv_valid, causal: bool):
  """Boolean `[..., bq, bk]` from query-side `[..., bq, 1]` and key-side `[..., 1, bk]` integer arrays."""
  visible = (kv_valid != 0) & (kv_seg == q_seg)
  if causal:
    visible = visible & (kv_pos <= q_pos)
  return visible


def block_visibility(q_pos, q_seg, kv_pos, kv_seg, kv_valid, causal: bool):
  """`visibility` from per-query `[..., bq]` and per-key `[..., bk]` integer arrays."""
  column, row = (lambda a: a[..., :, None]), (lambda a: a[..., None, :])
  return visibility(column(q_pos), column(q_seg), row(kv_pos), row(kv_seg), row(kv_valid), causal)


def any_visible(visible) -> jax.Array:
  """Whether a block has a visible pair (a float max: a reduction every kernel backend lowers)."""
  return jnp.max(jnp.where(visible, 1.0, 0.0)) > 0.0


def block_bounds(masks, block_q: int, block_k: int, causal: bool) -> tuple:
  """Which block pairs the kernels must run, from O(T/block) values computed in XLA: latest query position
  per query block `[B, nq]`, earliest valid key position per key block `[B, nk]` (int32 max if none), the
  last live key block of each query block `[B, nq]` and the first live query block of each key block
  `[B, nk]` (0 where none is live). The GPU kernels loop over those ranges; the TPU kernels prefetch the
  tables into SMEM and test each pair.

  Pair (i, j) is live when earliest_key[j] <= latest_query[i]: some valid key of block j is no later than
  some query of block i (without causality latest_query is int32 max − 1: live when block j has a valid
  key). Conservative (segments are left to the per-element mask); with sorted positions it skips exactly
  the blocks above the diagonal.
  """
  q_pos, _, kv_pos, _, kv_valid = masks
  b, t, s = q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]
  nq, nk, never = t // block_q, s // block_k, jnp.iinfo(jnp.int32).max
  valid = (kv_valid != 0).reshape(b, nk, block_k)
  earliest_key = jnp.min(jnp.where(valid, kv_pos.reshape(valid.shape), never), axis=-1)
  latest_query = (jnp.max(q_pos.reshape(b, nq, block_q), axis=-1) if causal else
                  jnp.full((b, nq), never - 1, jnp.int32))
  live = live_pairs(latest_query, earliest_key)
  last_key = jnp.max(jnp.where(live, jnp.arange(nk), 0), axis=2)
  first_query = jnp.min(jnp.where(live, jnp.arange(nq)[:, None], nq), axis=1)
  first_query = jnp.where(first_query == nq, 0, first_query)
  return tuple(a.astype(jnp.int32) for a in (latest_query, earliest_key, last_key, first_query))


def full_blocks(masks, block_q: int, block_k: int, causal: bool) -> tuple:
  """Which block pairs need no mask, every (query, key) pair of them visible, for the Pallas kernels (the GPU
  ones' unmasked loops, the TPU ones' unmasked steps): per query block `[B, nq]` the number of leading key
  blocks that are all full, per key block `[B, nk]` the first query block from which all later ones are
  full (nq where none is). A pair is full when its key block's keys are all valid, both blocks hold one
  segment, the same, and (causal) its latest key is no later than its earliest query: with sorted
  positions, every pair below the diagonal."""
  q_pos, q_seg, kv_pos, kv_seg, kv_valid = masks
  b, t, s = q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]
  nq, nk = t // block_q, s // block_k
  blocked = lambda a, n: a.reshape(b, n, -1)
  q_seg_lo, q_seg_hi = jnp.min(blocked(q_seg, nq), -1), jnp.max(blocked(q_seg, nq), -1)
  kv_seg_lo, kv_seg_hi = jnp.min(blocked(kv_seg, nk), -1), jnp.max(blocked(kv_seg, nk), -1)
  key_side = (jnp.all(blocked(kv_valid, nk) != 0, -1) & (kv_seg_lo == kv_seg_hi))[:, None, :]
  full = key_side & ((q_seg_lo == q_seg_hi)[:, :, None]) & (q_seg_lo[:, :, None] == kv_seg_lo[:, None, :])
  if causal:
    full = full & (jnp.max(blocked(kv_pos, nk), -1)[:, None, :] <= jnp.min(blocked(q_pos, nq), -1)[:, :, None])
  leading = jnp.sum(jnp.cumprod(full.astype(jnp.int32), axis=2), axis=2)
  trailing = jnp.sum(jnp.cumprod(full[:, ::-1].astype(jnp.int32), axis=1), axis=1)
  return leading.astype(jnp.int32), (nq - trailing).astype(jnp.int32)


def live_pairs(latest_query, earliest_key):
  """`[B, nq, nk]` bool from `block_bounds`' first two tables (the kernels test one pair at a time)."""
  return earliest_key[:, None, :] <= latest_query[:, :, None]


# A tile is one array or a tuple of column chunks of one: the GPU kernels split a head width that is not
# a power of two (PI-P's 72 and 144) into power-of-two chunks (64 + 16, 128 + 16) instead of padding it
# to the next power of two, which measured 2.6-3x slower at PI-P's widths on an H200.


def _contract(a, b):
  """`a bᵀ` in fp32 over tiles a `[..., x, c]`, b `[..., y, c]` chunked alike: `[..., x, y]`."""
  pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
  return functools.reduce(jnp.add, [jnp.einsum("...xc,...yc->...xy", ai, bi, preferred_element_type=jnp.float32)
                                    for ai, bi in pairs])


def _apply(p, b, transpose: bool = False):
  """`p b` (or `pᵀ b`) in fp32 for p `[..., x, y]` (fp32) and a tile b: a tile chunked like b."""
  spec = "...xy,...xc->...yc" if transpose else "...xy,...yc->...xc"
  return jax.tree.map(lambda bi: jnp.einsum(spec, p.astype(bi.dtype), bi, preferred_element_type=jnp.float32), b)


def _scores(q, k, visible):
  return _contract(q, k) if visible is None else jnp.where(visible, _contract(q, k), MASK_VALUE)


def _masked(x, visible):
  """x where visible, else 0; visible None: a block with every pair visible (`full_blocks`), x as it is."""
  return x if visible is None else jnp.where(visible, x, 0.0)


def zeros_tile(rows: tuple, width):
  """An fp32 zero tile `rows + (width,)`, or a tuple of chunks when width is a tuple of chunk widths."""
  if isinstance(width, tuple):
    return tuple(jnp.zeros(rows + (w,), jnp.float32) for w in width)
  return jnp.zeros(rows + (width,), jnp.float32)


def init_carry(rows: tuple, num_maps: int, dv):
  """Per map: running max, running sum `[..., bq, 1]` and unnormalised output `[..., bq, Dv]` (fp32; a
  tuple of chunks when dv is a tuple of chunk widths).

  Row statistics are columns (`[..., bq, 1]`) in all the block math, the layout TPU kernels keep them in.
  """
  return tuple((jnp.full(rows + (1,), MASK_VALUE, jnp.float32), jnp.zeros(rows + (1,), jnp.float32),
                zeros_tile(rows, dv)) for _ in range(num_maps))


def forward_block(qs, ks, v, visible, carry):
  """One key block for every map. Per map j: tiles qs[j] `[..., bq, D]`, ks[j] `[..., bk, D]`; tile v
  `[..., bk, Dv]`; visible `[..., bq, bk]` bool, or None for a block whose pairs are all visible.

  Maps come as sequences (not a stacked axis) so kernels load each map's tile straight from its ref.
  """
  new = []
  for qj, kj, (m, l, acc) in zip(qs, ks, carry):
    s = _scores(qj, kj, visible)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    p = _masked(jnp.exp(s - m_new), visible)
    alpha = jnp.exp(m - m_new)
    acc = jax.tree.map(lambda a, pv: alpha * a + pv, acc, _apply(p, v))
    new.append((m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), acc))
  return tuple(new)


def finalize(carry):
  """Per map: the normalised output tile (0 for a row with no visible key) and its log-sum-exp
  `[..., bq, 1]`."""
  outs, lses = [], []
  for m, l, acc in carry:
    seen = l > 0.0
    outs.append(jax.tree.map(lambda a: a / jnp.where(seen, l, 1.0), acc))
    lses.append(jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0))
  return outs, lses


def backward_block(qs, ks, v, g, ws, lses, deltas, visible, *, want_dq: bool = True, want_dkv: bool = True):
  """Gradients of one (query block, key block) pair.

  Per map j: qs[j], ks[j] as in `forward_block`; ws[j], lses[j], deltas[j] `[..., bq, 1]` (fp32); tile g
  `[..., bq, Dv]` chunked like v. Returns per-map lists dq `[..., bq, D]`, dk `[..., bk, D]` and dv
  `[..., bk, Dv]` (fp32 tiles chunked like q, k and v); what is not wanted is None.
  """
  d_combined = _contract(g, v)
  dq, dk, combined_p = [], [], None
  for qj, kj, w, lse, delta in zip(qs, ks, ws, lses, deltas):
    s = _scores(qj, kj, visible)
    weighted_p = _masked(jnp.exp(s - lse), visible) * w
    ds = weighted_p * (d_combined - delta)
    if want_dq:
      dq.append(_apply(ds, kj))
    if want_dkv:
      dk.append(_apply(ds, qj, transpose=True))
      combined_p = weighted_p if combined_p is None else combined_p + weighted_p
  # dv = Σ_m (w_m P_m)ᵀ g: the maps' probabilities are combined first, so one product serves them all.
  dv = _apply(combined_p, g, transpose=True) if want_dkv else None
  return (dq or None), (dk or None), dv


def _maps(x):
  """The per-map slices of an internal `[B, H, M, ...]` array (M on axis 2)."""
  return [jnp.take(x, j, axis=2) for j in range(x.shape[2])]


def _slice(x, start, size, axis):
  return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _mask_blocks(masks, i, block_q, j, block_k):
  """Query-side `[B, 1, bq]` and key-side `[B, 1, bk]` mask arrays of blocks (i, j)."""
  q_pos, q_seg, kv_pos, kv_seg, kv_valid = masks
  q_side = [_slice(a, i * block_q, block_q, 1)[:, None] for a in (q_pos, q_seg)]
  kv_side = [_slice(a, j * block_k, block_k, 1)[:, None] for a in (kv_pos, kv_seg, kv_valid)]
  return q_side + kv_side


def _loop(n: int, body, init):
  """`body(i, carry)` for i < n as a while loop. Not `fori_loop`/`scan`: differentiating a caller that
  contains this op (e.g. a scan over layers) partially evaluates the loops in the custom VJP, and a scan
  would then keep every block's intermediates, `[T/block, S/block, block, block]`; a while loop stays
  whole."""
  return lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])), (jnp.int32(0), init))[1]


def xla_forward(q, k, v, masks, causal, block_q, block_k):
  """Per-map outputs `[B, H, M, T, Dv]` (fp32) and log-sum-exp `[B, H, M, T]`."""
  b, h, num_maps, t, _ = q.shape
  dv = v.shape[-1]

  def query_block(i, outputs):
    qi = _maps(_slice(q, i * block_q, block_q, 3))

    def key_step(j, carry):
      visible = block_visibility(*_mask_blocks(masks, i, block_q, j, block_k), causal)
      kj, vj = _maps(_slice(k, j * block_k, block_k, 3)), _slice(v, j * block_k, block_k, 2)
      return lax.cond(any_visible(visible), lambda c: forward_block(qi, kj, vj, visible, c), lambda c: c, carry)

    carry = _loop(k.shape[3] // block_k, key_step, init_carry((b, h, block_q), num_maps, dv))
    outs, lses = finalize(carry)
    out, lse = outputs
    return (lax.dynamic_update_slice_in_dim(out, jnp.stack(outs, axis=2), i * block_q, axis=3),
            lax.dynamic_update_slice_in_dim(lse, jnp.stack(lses, axis=2)[..., 0], i * block_q, axis=3))

  init = (jnp.zeros((b, h, num_maps, t, dv), jnp.float32), jnp.zeros((b, h, num_maps, t), jnp.float32))
  return _loop(t // block_q, query_block, init)


def xla_backward(q, k, v, w, g, lse, delta, masks, causal, block_q, block_k):
  """dq, dk, dv (fp32): a loop over key blocks, each looping over query blocks; dq accumulates in place."""
  s = k.shape[3]

  def key_block(j, grads):
    kj, vj = _slice(k, j * block_k, block_k, 3), _slice(v, j * block_k, block_k, 2)

    def query_step(i, carry):
      visible = block_visibility(*_mask_blocks(masks, i, block_q, j, block_k), causal)

      def accumulate(c):
        dq, dk, dv = c
        start = i * block_q
        rows = lambda x: _maps(_slice(x, start, block_q, 3))
        stats = lambda x: rows(x[..., None])
        dq_i, dk_j, dv_j = backward_block(rows(q), _maps(kj), vj, _slice(g, start, block_q, 2), stats(w),
                                          stats(lse), stats(delta), visible)
        dq = lax.dynamic_update_slice_in_dim(dq, _slice(dq, start, block_q, 3) + jnp.stack(dq_i, axis=2),
                                             start, axis=3)
        return dq, dk + jnp.stack(dk_j, axis=2), dv + dv_j

      return lax.cond(any_visible(visible), accumulate, lambda c: c, carry)

    dq, dk, dv = grads
    dq, dk_j, dv_j = _loop(q.shape[3] // block_q, query_step,
                           (dq, jnp.zeros_like(_slice(dk, 0, block_k, 3)), jnp.zeros_like(_slice(dv, 0, block_k, 2))))
    return (dq, lax.dynamic_update_slice_in_dim(dk, dk_j, j * block_k, axis=3),
            lax.dynamic_update_slice_in_dim(dv, dv_j, j * block_k, axis=2))

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  return _loop(s // block_k, key_block, (zeros(q), zeros(k), zeros(v)))


def kernel_width(n: int) -> int:
  """A head width or block inside the kernels: the next power of two, at least 16 (Triton's smallest dot)."""
  return max(16, 1 << (n - 1).bit_length())


def pad_last(x, width: int):
  """Zero columns up to `width`: they change no score and add output columns that are sliced off."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def _pallas_stage(kernel: str, stage: str, gpu_backward: str, gpu_launches: tuple, gpu_forward: str):
  """The Pallas `stage` ("forward" / "backward"), lowered for the platform being compiled for
  (`lax.platform_dependent`, so lowering for another platform than the host's picks that platform's):
  "pallas" runs the GPU kernels through Triton on GPU, the TPU kernels through Mosaic on TPU and the GPU
  kernels interpreted elsewhere; "pallas_gpu" / "pallas_tpu" run one layout, interpreted off its
  accelerator (how the tests check both on CPU). The TPU backward is always two passes (no atomics).

  A "mosaic" gpu_forward / gpu_backward puts that Mosaic GPU stage on CUDA GPUs (Triton's stays on ROCm).
  Its interpreter carries ordered effects, which `lax.platform_dependent` cannot lower beside branches
  without them, so off the GPU "pallas" interprets Triton's stage in its place, and "pallas_gpu" runs the
  Mosaic GPU stage on a GPU host and interprets it on any other (chosen by the host, not the compile
  target)."""
  from diffmoe_jax.ops import (mosaic_gpu_attention, mosaic_gpu_attention_backward, pallas_attention,
                               pallas_tpu_attention)
  gpu, tpu = getattr(pallas_attention, stage), getattr(pallas_tpu_attention, stage)
  gpu = functools.partial(gpu, launches={name: pallas_attention.Launch(*launch) for name, launch in gpu_launches})
  if stage == "backward":
    gpu = functools.partial(gpu, one_pass=gpu_backward == "one_pass")
  choice, mosaic_stage = {"forward": (gpu_forward, mosaic_gpu_attention.forward),
                           "backward": (gpu_backward, mosaic_gpu_attention_backward.backward)}[stage]
  cuda = mosaic_stage if choice == "mosaic" else gpu

  def run(*args):
    arrays, static = args[:-3], args[-3:]  # (..., causal, block_q, block_k)

    def bind(fn, interpret):
      def call(*a):
        outs = fn(*a, *static, interpret=interpret)
        # dq, dk, dv in q, k, v's dtypes (the VJP's) from every branch: Triton's are fp32, Mosaic GPU's not.
        return tuple(x.astype(r.dtype) for x, r in zip(outs, a[:3])) if stage == "backward" else outs
      return call

    if kernel == "pallas_gpu" and cuda is not gpu:
      return bind(cuda, jax.default_backend() != "gpu")(*arrays)
    on_gpu = dict(cuda=bind(cuda, False), rocm=bind(gpu, False))
    choices = {"pallas": dict(on_gpu, tpu=bind(tpu, False), default=bind(gpu, True)),
               "pallas_gpu": dict(on_gpu, default=bind(gpu, True)),
               "pallas_tpu": dict(tpu=bind(tpu, False), default=bind(tpu, True))}[kernel]
    return lax.platform_dependent(*arrays, **choices)
  return run


def _drivers(kernel: str, gpu: tuple):
  if kernel == "xla":
    return xla_forward, xla_backward  # one pass: dq accumulates in place
  return _pallas_stage(kernel, "forward", *gpu), _pallas_stage(kernel, "backward", *gpu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _multi_map_attention(q, k, v, w, masks, causal, block_q, block_k, kernel, gpu):
  """gpu: (gpu_backward, gpu_launches, gpu_forward) of `flash_attention`."""
  return _multi_map_attention_fwd(q, k, v, w, masks, causal, block_q, block_k, kernel, gpu)[0]


def _multi_map_attention_fwd(q, k, v, w, masks, causal, block_q, block_k, kernel, gpu):
  forward, _ = _drivers(kernel, gpu)
  out, lse = forward(q, k, v, masks, causal, block_q, block_k)
  # Named so that a remat policy can keep them (`model.remat_save_names`): the backward then needs only
  # q, k, v recomputed, not this forward pass.
  out, lse = checkpoint_name(out, RESIDUALS_NAME), checkpoint_name(lse, RESIDUALS_NAME)
  combined = jnp.einsum("bhmtv,bhmt->bhtv", out, w).astype(v.dtype)
  return combined, (q, k, v, w, masks, out, lse)


def _multi_map_attention_bwd(causal, block_q, block_k, kernel, gpu, residuals, g):
  q, k, v, w, masks, out, lse = residuals
  _, backward = _drivers(kernel, gpu)
  delta = jnp.einsum("bhmtv,bhtv->bhmt", out, g.astype(jnp.float32))  # δ_m = g·o_m, also dw_m
  dq, dk, dv = backward(q, k, v, w, g, lse, delta, masks, causal, block_q, block_k)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), delta, tuple(None for _ in masks)


_multi_map_attention.defvjp(_multi_map_attention_fwd, _multi_map_attention_bwd)


def pad_to(x, multiple: int, axis: int):
  """`x` zero-padded along `axis` to a multiple of `multiple`."""
  pad = -x.shape[axis] % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def block_sizes(t: int, s: int, block_q: int, block_k: int, kernel: str) -> tuple[int, int]:
  """Blocks no longer than the sequence; kernels need power-of-two blocks of at least 16 rows."""
  if kernel != "xla":
    return min(block_q, kernel_width(t)), min(block_k, kernel_width(s))
  return min(block_q, t), min(block_k, s)


def fit_launches(gpu_launches: tuple, t: int, s: int) -> tuple:
  """GPU kernel launches `((kernel, (rows, step, warps, stages)), ...)` with blocks no longer than the
  sequences they tile, as `block_sizes` does (a decoding step keeps 16 query rows, not 64)."""
  fitted = []
  for kernel, (rows, step, *rest) in gpu_launches:
    lengths = (s, t) if kernel == "dkv" else (t, s)  # dk/dv programs hold keys and step over queries
    fitted.append((kernel, (min(rows, kernel_width(lengths[0])), min(step, kernel_width(lengths[1])), *rest)))
  return tuple(fitted)


def _launch_blocks(gpu_launches: tuple) -> tuple[list[int], list[int]]:
  """The query-side and key-side blocks of the launches."""
  sides = [(step, rows) if kernel == "dkv" else (rows, step) for kernel, (rows, step, *_) in gpu_launches]
  return [q for q, _ in sides], [k for _, k in sides]


def flash_attention(q, k, v, weights, *, q_positions, kv_positions, causal: bool = True, kv_mask=None,
                    q_segment_ids=None, kv_segment_ids=None, block_q: int = 512, block_k: int = 512,
                    kernel: str = "xla", gpu_backward: str = "two_pass", gpu_launches: tuple = (),
                    gpu_forward: str = "triton"):
  """`Σ_m weights_m · softmax(q_m k_mᵀ + mask) v` with O(T·block) memory.

  q: `[B, T, H, M, D]` already scaled, k: `[B, S, H, M, D]`, v: `[B, S, H, Dv]`, weights: `[B, T, H, M]`;
  positions `[B, T]` / `[B, S]` integers; kv_mask `[B, S]` bool; segment ids `[B, T]` / `[B, S]`
  (a query sees only keys of its own segment). Returns `[B, T, H, Dv]` in v's dtype. kernel: "xla"
  (blockwise loops, any backend) or "pallas" (kernels on GPU and TPU, interpreted elsewhere; see
  `_pallas_stage` for "pallas_gpu" / "pallas_tpu"). gpu_backward / gpu_forward: one of GPU_BACKWARDS /
  GPU_FORWARDS, for the GPU kernels.
  gpu_launches: `((kernel, (rows, step, warps, stages)), ...)` replacing the GPU kernels' default launches
  (`pallas_attention.default_launches`; `config.gpu_launches`); sequences are padded to their blocks too.
  """
  if kernel not in KERNELS:
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
  if gpu_backward not in GPU_BACKWARDS:
    raise ValueError(f"gpu_backward must be one of {GPU_BACKWARDS}, got {gpu_backward!r}.")
  if gpu_forward not in GPU_FORWARDS:
    raise ValueError(f"gpu_forward must be one of {GPU_FORWARDS}, got {gpu_forward!r}.")
  batch, t, heads, num_maps, _ = q.shape
  s = k.shape[1]
  if t == 0 or s == 0:  # no queries (a skipped MoD block's shape-only call) or no keys: every row is 0
    return jnp.zeros((batch, t, heads, v.shape[-1]), v.dtype)
  bq, bk = block_sizes(t, s, block_q, block_k, kernel)
  gpu_launches = fit_launches(gpu_launches, t, s) if kernel != "xla" else ()
  q_blocks, k_blocks = _launch_blocks(gpu_launches)
  if "mosaic" in (gpu_forward, gpu_backward) and kernel in ("pallas", "pallas_gpu"):
    from diffmoe_jax.ops.mosaic_gpu_attention import TILE  # the Mosaic GPU kernels' program rows
    q_blocks, k_blocks = [*q_blocks, TILE], [*k_blocks, TILE]
  q_multiple, k_multiple = max([bq, *q_blocks]), max([bk, *k_blocks])  # powers of two: the largest tiles all
  zeros_t, zeros_s = jnp.zeros((batch, t), jnp.int32), jnp.zeros((batch, s), jnp.int32)
  q_seg = zeros_t if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
  kv_seg = zeros_s if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
  kv_valid = jnp.ones((batch, s), jnp.int32) if kv_mask is None else jnp.asarray(kv_mask).astype(jnp.int32)
  # Padded keys are invalid; padded queries compute rows that are sliced off.
  masks = (pad_to(jnp.asarray(q_positions, jnp.int32), q_multiple, 1), pad_to(q_seg, q_multiple, 1),
           pad_to(jnp.asarray(kv_positions, jnp.int32), k_multiple, 1), pad_to(kv_seg, k_multiple, 1),
           pad_to(kv_valid, k_multiple, 1))
  q_internal = pad_to(jnp.transpose(q, (0, 2, 3, 1, 4)), q_multiple, 3)
  k_internal = pad_to(jnp.transpose(k, (0, 2, 3, 1, 4)), k_multiple, 3)
  v_internal = pad_to(jnp.transpose(v, (0, 2, 1, 3)), k_multiple, 2)
  w_internal = pad_to(jnp.transpose(jnp.asarray(weights, jnp.float32), (0, 2, 3, 1)), q_multiple, 3)
  out = _multi_map_attention(q_internal, k_internal, v_internal, w_internal, masks, causal, bq, bk, kernel,
                             (gpu_backward, gpu_launches, gpu_forward))
  return jnp.transpose(out[:, :, :t], (0, 2, 1, 3))
