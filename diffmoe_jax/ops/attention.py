"""Attention math: rotary embeddings, the positions-based mask, differential and standard attention.

Layouts are `[batch, length, heads, ...]`. Masks are causal by *positions*, not by array index, so the
same function serves full sequences, mixture-of-depths token subsets (gathered at their original
positions) and KV-cache decoding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffmoe_jax.ops import flash_attention
from diffmoe_jax.ops.flash_attention import MASK_VALUE as _MASK_VALUE

# "explicit": fp32 score arrays [B, H, T, S] (fastest at short context); "blockwise": flash_attention's
# XLA loops (O(T·block) memory, any backend); "pallas": its kernels (GPU/TPU; interpreted on CPU);
# "pallas_gpu" / "pallas_tpu": one kernel layout on every backend, interpreted off its accelerator (tests,
# debugging); "fused": jax.nn.dot_product_attention (cuDNN on GPU for 16-bit inputs, its XLA version
# elsewhere). "xla" is the old name of "explicit".
IMPLEMENTATIONS = ("explicit", "blockwise", "pallas", "pallas_gpu", "pallas_tpu", "fused")
BLOCKWISE = ("blockwise", "pallas", "pallas_gpu", "pallas_tpu")


def rope_inverse_frequencies(dim: int, theta: float) -> jax.Array:
  """`theta ** (-2i / dim)` for i < dim / 2, in float32."""
  return theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half convention) on the last axis of `x`.

  x: `[B, T, ...heads..., D]` with D even; positions: `[B, T]` integer. Angles are computed in fp32.
  """
  dim = x.shape[-1]
  if dim % 2:
    raise ValueError(f"apply_rope rotates pairs of dimensions; the last axis of x {x.shape} must be even.")
  angles = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(dim, theta)  # [B, T, D/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def default_positions(batch: int, length: int, offset: int = 0) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(offset, offset + length, dtype=jnp.int32), (batch, length))


def attention_mask(q_positions: jax.Array, kv_positions: jax.Array, *, causal: bool = True,
                   kv_mask: jax.Array | None = None, q_segment_ids: jax.Array | None = None,
                   kv_segment_ids: jax.Array | None = None) -> jax.Array:
  """Boolean `[B, T, S]`: query t may see key s (key position <= query position, not hidden, and in the
  query's segment when segment ids are given)."""
  batch, t, s = q_positions.shape[0], q_positions.shape[1], kv_positions.shape[1]
  mask = jnp.ones((batch, t, s), dtype=bool)
  if causal:
    mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if kv_mask is not None:
    mask = mask & kv_mask[:, None, :]
  if q_segment_ids is not None:
    mask = mask & (kv_segment_ids[:, None, :] == q_segment_ids[:, :, None])
  return mask


def _positions(q: jax.Array, k: jax.Array, q_positions, kv_positions):
  """Defaults: keys at 0..S-1, queries at the last T of those (the decoding convention)."""
  batch, t, s = q.shape[0], q.shape[1], k.shape[1]
  if kv_positions is None:
    kv_positions = default_positions(batch, s)
  if q_positions is None:
    q_positions = default_positions(batch, t, offset=s - t)
  _check_shapes(("q_positions [B, T]", q_positions, (batch, t)), ("kv_positions [B, S]", kv_positions, (batch, s)))
  _check_dtypes(jnp.integer, "integers", ("q_positions", q_positions), ("kv_positions", kv_positions))
  return q_positions, kv_positions


def _check_shapes(*named_arrays) -> None:
  """ValueError naming the first `(name, array, shape)` whose array is not of that shape."""
  for name, array, shape in named_arrays:
    if array.shape != shape:
      raise ValueError(f"{name} must be {shape}; got {array.shape}.")


def _check_dtypes(kind, description: str, *named_arrays) -> None:
  """ValueError naming the first `(name, array)` whose dtype is not a `kind` (e.g. jnp.integer): every
  path must read it alike (a float position or an integer mask would be rounded or bit-tested by some)."""
  for name, array in named_arrays:
    if not jnp.issubdtype(array.dtype, kind):
      raise ValueError(f"{name} must be {description}; got {array.dtype}.")


def _check_kv_mask(kv_mask, batch: int, s: int) -> None:
  if kv_mask is not None:
    _check_shapes(("kv_mask [B, S]", kv_mask, (batch, s)))
    _check_dtypes(jnp.bool_, "boolean", ("kv_mask", kv_mask))


def _segments(q_segment_ids, kv_segment_ids, batch: int, t: int, s: int):
  """Both or neither; with T == S one array serves queries and keys."""
  if kv_segment_ids is None and q_segment_ids is not None and t == s:
    kv_segment_ids = q_segment_ids
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("segment ids: pass q_segment_ids and kv_segment_ids together (kv_segment_ids may be "
                     "left out only when queries and keys are the same tokens).")
  if q_segment_ids is not None:
    _check_shapes(("q_segment_ids [B, T]", q_segment_ids, (batch, t)),
                  ("kv_segment_ids [B, S]", kv_segment_ids, (batch, s)))
    _check_dtypes(jnp.integer, "integers", ("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids))
  return q_segment_ids, kv_segment_ids


def _check_implementation(implementation: str) -> str:
  implementation = "explicit" if implementation == "xla" else implementation
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} (or 'xla', the old name of "
                     f"'explicit'), got {implementation!r}.")
  return implementation


def fused_implementation(dtype, head_dim: int, device=None) -> str:
  """jax.nn.dot_product_attention's implementation: cuDNN on a GPU (default: the first device) for
  16-bit inputs with a head width it supports (a multiple of 8, at most 256 from Hopper on and 128
  before), its XLA version otherwise."""
  device = device or jax.devices()[0]
  if device.platform != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 8:
    return "xla"
  hopper_or_later = float(getattr(device, "compute_capability", "0")) >= 9.0
  return "cudnn" if head_dim <= (256 if hopper_or_later else 128) else "xla"


def _dot_product_attention(q, k, v, mask, scale):
  """jax.nn.dot_product_attention (`fused_implementation`); rows with no visible key give 0."""
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                     implementation=fused_implementation(q.dtype, max(q.shape[-1], v.shape[-1])))
  return _zero_rows_without_keys(out, mask)


def _lambda_rows(lam, batch: int, length: int, heads: int) -> jax.Array:
  """λ as `[B, T, H]` float32 from a scalar, `[H]` or `[B, T, H]`."""
  lam = jnp.asarray(lam, jnp.float32)
  if lam.shape not in ((), (heads,), (batch, length, heads)):
    raise ValueError(f"lam must be a scalar, [H] = ({heads},) or [B, T, H] = {(batch, length, heads)}; got shape "
                     f"{lam.shape}.")
  return jnp.broadcast_to(lam, (batch, length, heads))


def _zero_rows_without_keys(out: jax.Array, mask: jax.Array) -> jax.Array:
  """Queries that see no key get 0 (a per-row factor, cheaper than masking the probabilities).
  out `[B, T, heads..., Dv]`, mask `[B, T, S]`."""
  seen = jnp.any(mask, axis=-1).reshape(mask.shape[:2] + (1,) * (out.ndim - 2))
  return out * seen.astype(out.dtype)


def _attention_maps(q, k, mask):
  """Both softmax maps `[B, H, T, S]` (fp32) of pre-scaled q `[B, T, H, 2, D]`, one einsum per map."""
  def attention_map(j):
    scores = jnp.einsum("bthd,bshd->bhts", q[:, :, :, j], k[:, :, :, j], preferred_element_type=jnp.float32)
    return jax.nn.softmax(jnp.where(mask[:, None], scores, _MASK_VALUE), axis=-1)
  return attention_map(0), attention_map(1)


@jax.custom_vjp
def _differential_xla(q, k, v, lam, mask):
  """`(A₀ − λA₁)·v` for pre-scaled q; lam `[B, H, T]`. A hand-written VJP shares the row reductions."""
  a0, a1 = _attention_maps(q, k, mask)
  return jnp.einsum("bhts,bshv->bthv", (a0 - lam[..., None] * a1).astype(v.dtype), v)


def _differential_xla_fwd(q, k, v, lam, mask):
  a0, a1 = _attention_maps(q, k, mask)
  out = jnp.einsum("bhts,bshv->bthv", (a0 - lam[..., None] * a1).astype(v.dtype), v)
  return out, (q, k, v, lam, a0, a1)


def _differential_xla_bwd(residuals, g):
  # With C = A₀ − λA₁ and dC = g·vᵀ: the softmax gradient of map j is A_j ⊙ (dA_j − rowsum(A_j ⊙ dA_j)),
  # with dA₀ = dC and dA₁ = −λ·dC, so r_j = rowsum(A_j ⊙ dC) serves both maps and dλ = −r₁.
  q, k, v, lam, a0, a1 = residuals
  d_combined = jnp.einsum("bthv,bshv->bhts", g, v, preferred_element_type=jnp.float32)
  dv = jnp.einsum("bhts,bthv->bshv", (a0 - lam[..., None] * a1).astype(g.dtype), g)
  r0 = jnp.sum(a0 * d_combined, axis=-1, keepdims=True)
  r1 = jnp.sum(a1 * d_combined, axis=-1, keepdims=True)
  ds0 = (a0 * (d_combined - r0)).astype(q.dtype)
  ds1 = (-lam[..., None] * a1 * (d_combined - r1)).astype(q.dtype)
  dq = jnp.stack([jnp.einsum("bhts,bshd->bthd", ds, k[:, :, :, j]) for j, ds in enumerate((ds0, ds1))], axis=3)
  dk = jnp.stack([jnp.einsum("bhts,bthd->bshd", ds, q[:, :, :, j]) for j, ds in enumerate((ds0, ds1))], axis=3)
  return dq, dk, dv, (-r1[..., 0]).astype(lam.dtype), None


_differential_xla.defvjp(_differential_xla_fwd, _differential_xla_bwd)


def differential_attention(q: jax.Array, k: jax.Array, v: jax.Array, lam, *, causal: bool = True,
                           q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
                           kv_mask: jax.Array | None = None, q_segment_ids: jax.Array | None = None,
                           kv_segment_ids: jax.Array | None = None, implementation: str = "explicit",
                           block_q: int = 0, block_k: int = 0, gpu_backward: str = "two_pass",
                           gpu_launches: tuple = (), gpu_forward: str = "triton") -> jax.Array:
  """`softmax(q₀k₀ᵀ/√D + M) v − λ · softmax(q₁k₁ᵀ/√D + M) v` per head.

  q: `[B, T, H, 2, D]`, k: `[B, S, H, 2, D]`, v: `[B, S, H, Dv]` (floating point); lam: scalar, `[H]` or
  `[B, T, H]`; positions `[B, T]` / `[B, S]` (integers); kv_mask `[B, S]` (bool, False hides a key);
  segment ids `[B, T]` / `[B, S]` (integers) keep attention inside a document. Returns `[B, T, H, Dv]` in
  v's dtype; a query with no visible key gives 0 on every path.

  "explicit": fp32 scores; a per-query λ scales rows, so the two maps combine as `(A₀ − λA₁) v`, one
  product with v. "blockwise" / "pallas": `flash_attention` with M = 2 maps and weights (1, −λ), blocks
  of `block_q` queries and `block_k` keys (0: `default_block_size()`), the GPU kernels' backward as
  `gpu_backward` (`flash_attention.GPU_BACKWARDS`), their launches as `gpu_launches` (`flash_attention`)
  and the GPU forward's kernel as `gpu_forward` (`flash_attention.GPU_FORWARDS`).
  "fused":
  `jax.nn.dot_product_attention`, which needs v as wide as k: heads become (head, map, half of v), 4H
  heads of width D sharing one mask.
  """
  implementation = _check_implementation(implementation)
  batch, t, heads, two, d = q.shape
  if two != 2 or k.shape[0] != batch or k.shape[2:] != (heads, 2, d) or v.shape[:3] != (batch, k.shape[1], heads):
    raise ValueError(f"differential_attention expects q [B,T,H,2,D], k [B,S,H,2,D], v [B,S,H,Dv]; got "
                     f"q {q.shape}, k {k.shape}, v {v.shape}.")
  s = k.shape[1]
  _check_dtypes(jnp.floating, "floating point", ("q", q), ("k", k), ("v", v))
  q_positions, kv_positions = _positions(q, k, q_positions, kv_positions)
  q_segment_ids, kv_segment_ids = _segments(q_segment_ids, kv_segment_ids, batch, t, s)
  _check_kv_mask(kv_mask, batch, s)
  lam = _lambda_rows(lam, batch, t, heads)
  q = q * jnp.asarray(d**-0.5, q.dtype)
  if implementation in BLOCKWISE:
    return _blockwise(implementation, q, k, v, jnp.stack([jnp.ones_like(lam), -lam], axis=-1), block_q, block_k,
                      (gpu_backward, gpu_launches, gpu_forward), q_positions=q_positions, kv_positions=kv_positions,
                      causal=causal, kv_mask=kv_mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  mask = attention_mask(q_positions, kv_positions, causal=causal, kv_mask=kv_mask, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids)
  if implementation == "explicit":
    return _zero_rows_without_keys(_differential_xla(q, k, v, jnp.transpose(lam, (0, 2, 1)), mask), mask)
  dv = v.shape[-1]
  if dv != 2 * d:
    raise ValueError(f"the fused path needs Dv = 2·D (got Dv={dv}, D={d}); use implementation='blockwise'.")
  q4 = jnp.broadcast_to(q[:, :, :, :, None], (batch, t, heads, 2, 2, d)).reshape(batch, t, 4 * heads, d)
  k4 = jnp.broadcast_to(k[:, :, :, :, None], (batch, s, heads, 2, 2, d)).reshape(batch, s, 4 * heads, d)
  v_halves = v.reshape(batch, s, heads, 1, 2, d)
  v4 = jnp.broadcast_to(v_halves, (batch, s, heads, 2, 2, d)).reshape(batch, s, 4 * heads, d)
  out = _dot_product_attention(q4, k4, v4, mask, scale=1.0)
  out = out.reshape(batch, t, heads, 2, dv).astype(jnp.float32)
  return (out[:, :, :, 0] - lam[..., None] * out[:, :, :, 1]).astype(v.dtype)


def differential_v2_attention(q: jax.Array, k: jax.Array, v: jax.Array, lambda_logits: jax.Array, *,
                              causal: bool = True, q_positions: jax.Array | None = None,
                              kv_positions: jax.Array | None = None, kv_mask: jax.Array | None = None,
                              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                              implementation: str = "explicit", block_q: int = 0, block_k: int = 0,
                              gpu_backward: str = "two_pass", gpu_launches: tuple = (),
                              gpu_forward: str = "triton") -> jax.Array:
  """Differential Transformer V2: `softmax(q₀k₀ᵀ/√D + M) v − sigmoid(ℓ) · softmax(q₁k₁ᵀ/√D + M) v`.

  lambda_logits ℓ: `[B, T, H]` (V2's `W_λ x`, one λ per query token and head, in (0, 1)); the rest as in
  `differential_attention`, which this is with λ = sigmoid(ℓ) (a per-query λ keeps the fused paths exact).
  """
  return differential_attention(q, k, v, jax.nn.sigmoid(jnp.asarray(lambda_logits, jnp.float32)), causal=causal,
                                q_positions=q_positions, kv_positions=kv_positions, kv_mask=kv_mask,
                                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                implementation=implementation, block_q=block_q, block_k=block_k,
                                gpu_backward=gpu_backward, gpu_launches=gpu_launches, gpu_forward=gpu_forward)


def standard_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                       q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
                       kv_mask: jax.Array | None = None, q_segment_ids: jax.Array | None = None,
                       kv_segment_ids: jax.Array | None = None, implementation: str = "explicit",
                       block_q: int = 0, block_k: int = 0, gpu_backward: str = "two_pass",
                       gpu_launches: tuple = (), gpu_forward: str = "triton") -> jax.Array:
  """Softmax attention, `[B, T, H, D] x [B, S, H, D] x [B, S, H, Dv] -> [B, T, H, Dv]` (the ablation);
  masks, segment ids and implementations as in `differential_attention` ("blockwise" / "pallas": M = 1;
  "fused" needs Dv = D)."""
  implementation = _check_implementation(implementation)
  if q.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:] or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"standard_attention expects q [B,T,H,D], k [B,S,H,D], v [B,S,H,Dv]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}.")
  batch, t, heads, d = q.shape
  _check_dtypes(jnp.floating, "floating point", ("q", q), ("k", k), ("v", v))
  q_positions, kv_positions = _positions(q, k, q_positions, kv_positions)
  q_segment_ids, kv_segment_ids = _segments(q_segment_ids, kv_segment_ids, batch, t, k.shape[1])
  _check_kv_mask(kv_mask, batch, k.shape[1])
  q = q * jnp.asarray(d**-0.5, q.dtype)
  if implementation in BLOCKWISE:
    return _blockwise(implementation, q[:, :, :, None], k[:, :, :, None], v,
                      jnp.ones((batch, t, heads, 1), jnp.float32), block_q, block_k,
                      (gpu_backward, gpu_launches, gpu_forward),
                      q_positions=q_positions, kv_positions=kv_positions, causal=causal, kv_mask=kv_mask,
                      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  mask = attention_mask(q_positions, kv_positions, causal=causal, kv_mask=kv_mask, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids)
  if implementation == "explicit":
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask[:, None], scores, _MASK_VALUE), axis=-1)
    return _zero_rows_without_keys(jnp.einsum("bhts,bshv->bthv", probs.astype(v.dtype), v), mask)
  if v.shape[-1] != d:
    raise ValueError(f"the fused path needs Dv = D (got Dv={v.shape[-1]}, D={d}); use implementation='blockwise'.")
  return _dot_product_attention(q, k, v, mask, scale=1.0)


def default_block_size() -> int:
  """Query/key block of the blockwise paths: 128 for the GPU/TPU kernels (on-chip memory), 512 on CPU
  (fewer loop steps; measured with `python -m diffmoe_jax.bench attention`)."""
  return 128 if jax.default_backend() in ("gpu", "tpu") else 512


def _blockwise(implementation: str, q, k, v, weights, block_q: int, block_k: int, gpu: tuple, **masking):
  """`flash_attention` for "blockwise" (XLA loops) or "pallas" (kernels on GPU (Triton) and TPU (Mosaic);
  interpreted elsewhere); gpu: (gpu_backward, gpu_launches, gpu_forward)."""
  gpu_backward, gpu_launches, gpu_forward = gpu
  return flash_attention.flash_attention(
      q, k, v, weights, block_q=block_q or default_block_size(), block_k=block_k or default_block_size(),
      kernel="xla" if implementation == "blockwise" else implementation, gpu_backward=gpu_backward,
      gpu_launches=gpu_launches, gpu_forward=gpu_forward, **masking)


# Sequence length from which "auto" uses the blockwise path on CPU: at batch 8 explicit scores were
# 1.45x faster at 512 tokens and blockwise 1.13x faster at 1,024 (`python -m diffmoe_jax.bench attention
# --no-layer-ratio --sweep-batch 8`, README "Differential attention").
CPU_BLOCKWISE_FROM = 1024


def resolve_attention_impl(name: str, *, length: int) -> str:
  """"auto": the Pallas kernel on GPU and TPU; on CPU explicit scores below CPU_BLOCKWISE_FROM tokens and
  the blockwise loops from there. Other names pass through ("xla" becomes "explicit")."""
  if name != "auto":
    return _check_implementation(name)
  if jax.default_backend() in ("gpu", "tpu"):
    return "pallas"
  return "blockwise" if length >= CPU_BLOCKWISE_FROM else "explicit"


def lambda_init_schedule(layer_index) -> jax.Array:
  """Diff-Transformer's λ_init for a 0-based layer index: `0.8 − 0.6·exp(−0.3·l)`."""
  return 0.8 - 0.6 * jnp.exp(-0.3 * jnp.asarray(layer_index, jnp.float32))
