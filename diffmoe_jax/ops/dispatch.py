"""Mixture-of-experts dispatch and combine: tokens to per-expert rows, the expert FFNs, and back.

For token t with gate weights `w[t, j]` over its k experts `e[t, j]`:
`y_t = Σ_j w[t, j] · FFN_{e[t, j]}(x_t)`, `FFN(x) = gelu(x W_in) W_out` or
`(silu(x W_gate) ⊙ (x W_in)) W_out` (swiglu).

The (token, choice) assignments are sorted by expert with a stable sort, so tokens keep their order
inside each expert, and rows move with gathers (no one-hot dispatch tensors):
- capacity: each sequence gives each expert `C = moe_capacity(T, k, E, capacity_factor)` slots, a
  `[B, E, C, d]` buffer (empty slots are zero); one matmul per expert and weight on CPU, one batched
  einsum per weight elsewhere. Assignments past an expert's C-th in a sequence are dropped, earlier
  positions winning, so the choice is causal. A dropped assignment contributes 0 and the token's other
  weights are NOT renormalised (the residual carries the token, as in Switch / GShard). Everything
  stays within a sequence, so a batch-sharded layer needs no communication.
- dropless "padded": the capacity path with C = T, which cannot drop because a token's k experts are
  distinct. It computes E/k rows per assignment, in dense matmuls, which on CPU still beats ragged_dot.
- dropless "ragged": all B·T·k assignments of the batch in one expert-sorted `[B·T·k, d]` array and
  `jax.lax.ragged_dot` with the group sizes: no padding, the accelerator path. Its sort spans the
  batch, so a batch-sharded layer all-gathers the routing (expert parallelism is the scalable route).

Compute dtype follows x; the gate weighting and the sum over a token's k experts are in fp32, and y is
cast back to x's dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from diffmoe_jax.ops import routing

ACTIVATIONS = ("gelu", "swiglu")
MODES = ("capacity", "dropless")
DROPLESS_IMPLS = ("padded", "ragged")


def gelu(x: jax.Array) -> jax.Array:
  """GELU with the tanh approximation (`jax.nn.gelu`'s default, as in GPT-2 and BERT)."""
  return jax.nn.gelu(x, approximate=True)


def moe_capacity(seq_len: int, k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert per sequence: `ceil(capacity_factor · T · k / E)`, at least 1, at most T.

  More than T slots could never fill, since a token's k experts are distinct. A capacity_factor <= 0 (or
  not finite) and a k outside [1, E] are errors, not one slot or T.
  """
  if not 0 < capacity_factor < math.inf:
    raise ValueError(f"capacity_factor={capacity_factor!r} must be > 0 and finite.")
  check_top_k(k, num_experts)
  return routing.token_count(capacity_factor * seq_len * k / num_experts, seq_len)


def check_top_k(k: int, num_experts: int) -> None:
  """ValueError unless each token's k experts can be distinct ones of `num_experts`."""
  if not 1 <= k <= num_experts:
    raise ValueError(f"top-k k={k} must be between 1 and the number of experts {num_experts}.")


def resolve_dropless_impl(name: str) -> str:
  """"auto" -> "ragged" on TPU, "padded" on CPU and GPU.

  The padded buffer costs E/k times the FLOPs, in fast dense matmuls; `jax.lax.ragged_dot` computes only
  the assigned rows but was slower wherever it was measured: XLA:CPU lowers it to a loop (10-14x a dense
  matmul of equal FLOPs), and on an H200 (bf16, d 2592, f 6912, k 2, 8,192 tokens) forward+backward took
  1.8x the padded form's time with 4 experts and 1.9x with 9 (`bench moe`, README).
  """
  if name == "auto":
    return "ragged" if jax.default_backend() == "tpu" else "padded"
  if name not in DROPLESS_IMPLS:
    raise ValueError(f"dropless_impl must be 'auto', 'padded' or 'ragged', got {name!r}.")
  return name


def _sort_by_expert(experts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Stable sort of each row of `experts [..., n]`: (sorted experts, the assignment at each sorted slot)."""
  iota = jax.lax.broadcasted_iota(jnp.int32, experts.shape, experts.ndim - 1)
  return jax.lax.sort((experts, iota), dimension=experts.ndim - 1, is_stable=True, num_keys=1)


def _group_starts(experts: jax.Array, num_experts: int) -> jax.Array:
  """`[..., n]` expert ids -> `[..., E + 1]`: how many assignments have a smaller id, i.e. where each
  expert's run starts once sorted (the last entry is n).

  A compare-and-count rather than `jnp.searchsorted`, whose scan fails on batch-sharded inputs (jax 0.10).
  """
  smaller = experts[..., None] < jnp.arange(num_experts + 1, dtype=experts.dtype)
  return jnp.sum(smaller, axis=-2, dtype=jnp.int32)


def _invert(order: jax.Array, values: jax.Array) -> jax.Array:
  """`out[b, order[b, i]] = values[b, i]` for permutations `order [B, n]`."""
  return jax.vmap(lambda o, v: jnp.zeros_like(v).at[o].set(v, unique_indices=True))(order, values)


def capacity_plan(experts: jax.Array, num_experts: int, capacity: int):
  """Where each assignment goes among its sequence's E·C expert slots, earlier tokens first.

  experts: `[B, T, k]`, with E for the assignments of masked tokens. Returns (src `[B, E·C]`: the
  assignment `t·k + j` in slot `e·C + c`, or T·k when empty; dst `[B, T·k]`: each assignment's slot, or
  E·C when dropped; kept count).
  """
  b, t, k = experts.shape
  n = t * k
  sorted_e, order = _sort_by_expert(experts.reshape(b, n))
  starts = _group_starts(sorted_e, num_experts)  # [B, E + 1]
  counts = jnp.diff(starts, axis=1)

  # Slot c of expert e holds the (starts[e] + c)-th sorted assignment, if there is one.
  c = jnp.arange(capacity, dtype=jnp.int32)
  pos = jnp.minimum(starts[:, :-1, None] + c, n - 1).reshape(b, num_experts * capacity)
  src = jnp.where((c < counts[:, :, None]).reshape(b, -1), jnp.take_along_axis(order, pos, axis=1), n)

  # Sorted assignment p is the (p - starts[e])-th of its expert e; it is kept if that is below C. Masked
  # tokens carry the id E: they sort last and are never kept.
  slot = jnp.arange(n, dtype=jnp.int32) - jnp.take_along_axis(starts, sorted_e, axis=1)
  kept = (slot < capacity) & (sorted_e < num_experts)
  dst = _invert(order, jnp.where(kept, sorted_e * capacity + slot, num_experts * capacity))
  return src, dst, jnp.sum(kept)


def ragged_plan(experts: jax.Array, num_experts: int):
  """All B·T·k assignments of `experts [B, T, k]` sorted by expert, one group of rows per expert.

  Assignments of masked tokens carry the id E: they sort after every group and belong to none.

  Returns (src `[1, B·T·k]`: the flat assignment `(b·T + t)·k + j` in each sorted row; dst
  `[1, B·T·k]`: each assignment's sorted row; group sizes `[E]` int32).
  """
  sorted_e, src = _sort_by_expert(experts.reshape(1, -1))
  dst = _invert(src, jax.lax.broadcasted_iota(jnp.int32, src.shape, 1))
  return src, dst, jnp.diff(_group_starts(sorted_e[0], num_experts))


def combine(out: jax.Array, gates: jax.Array, src: jax.Array, dst: jax.Array, shape: tuple) -> jax.Array:
  """Each token's output (fp32 `shape[:2] + shape[3:]`, shape = (B, T, k, d)): its k assignments' expert
  rows, gate-weighted and summed. out `[G, R, d]`: expert rows (slot or sorted order) in groups G (a
  sequence, or the whole batch); gates `[G, n]` by assignment; src `[G, R]`: each row's assignment; dst
  `[G, n]`: each assignment's row (R or more when dropped: a zero row)."""
  b, t, k, d = shape
  per_assignment = routing.move_rows(out, dst, src).reshape(b, t, k, d).astype(jnp.float32)
  return jnp.sum(per_assignment * gates.reshape(b, t, k, 1).astype(jnp.float32), axis=2)


def ffn(rows: jax.Array, w_in: jax.Array, w_out: jax.Array, w_gate: jax.Array | None, activation: str,
        matmul) -> jax.Array:
  """`FFN(rows)` with `matmul(rows, w)` standing for a dense, batched or grouped product."""
  h = matmul(rows, w_in)
  h = gelu(h) if activation == "gelu" else jax.nn.silu(matmul(rows, w_gate)) * h
  return matmul(h, w_out)


PER_EXPERT_CHAINS_MAX = 64


def _expert_ffn(rows: jax.Array, w_in: jax.Array, w_out: jax.Array, w_gate: jax.Array | None,
                activation: str, *, per_expert: bool) -> jax.Array:
  """Expert e's FFN on its slots: `rows [B, E, C, d] -> [B, E, C, d]`.

  per_expert=True runs E independent chains of 2-D matmuls: on XLA:CPU (2 cores, E=9) the capacity layer's
  forward+backward then took ~1.3x a dense FFN of equal active FLOPs, against ~2x with one batched
  einsum per weight (per_expert=False), which is what accelerators get. The chains first copy each
  expert's weights out of the stack, so with one row per expert (decoding one sequence) the batched
  einsum, E matrix-vector products in place, is faster (tiny's MoE: 0.21 vs 0.30 ms); from a few rows
  up the chains win again. They are unrolled, so tracing and compiling them grows with E (9 experts: 0.6 s
  against 0.2 batched, 128: 5.9 s against 0.3, while still running 1.5x faster); `moe_ffn` takes them up to
  `PER_EXPERT_CHAINS_MAX` experts.
  """
  b, _, c, d = rows.shape
  if per_expert:
    # unstack, not indexing: its transpose is one stack, where E slices would transpose to E pads.
    gates = [None] * len(w_in) if w_gate is None else jnp.unstack(w_gate)
    return jnp.stack([
        ffn(r.reshape(b * c, d), wi, wo, wg, activation, jnp.matmul).reshape(b, c, d)
        for r, wi, wo, wg in zip(jnp.unstack(rows, axis=1), jnp.unstack(w_in), jnp.unstack(w_out), gates)],
        axis=1)
  return ffn(rows, w_in, w_out, w_gate, activation, functools.partial(jnp.einsum, "becd,edf->becf"))


def moe_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array, w_in: jax.Array, w_out: jax.Array,
            w_gate: jax.Array | None = None, *, activation: str, mode: str = "capacity",
            capacity_factor: float = 1.25, dropless_impl: str = "padded", token_mask: jax.Array | None = None,
            capacity: int | None = None) -> tuple[jax.Array, dict]:
  """The top-k mixture of expert FFNs.

  x: `[B, T, d]`; weights: `[B, T, k]` gate weights; experts: `[B, T, k]` int, distinct per token;
  w_in: `[E, d, f]`; w_out: `[E, f, d]`; w_gate: `[E, d, f]` for swiglu, else None.
  activation: "gelu" | "swiglu"; mode: "capacity" | "dropless"; dropless_impl: "padded" | "ragged"
  (resolve "auto" with `resolve_dropless_impl` first). token_mask: optional bool `[B, T]`; a False token
  takes no expert slot and gets y = 0 (mixture-of-depths tokens that skip the block). An expert id equal
  to E means "no expert here": that assignment is skipped (expert parallelism passes the assignments of
  other devices' experts so). capacity: slots per expert per sequence in capacity mode, by default
  `moe_capacity(T, k, E, capacity_factor)` (expert parallelism passes the figure for all experts).
  Returns y `[B, T, d]` in x's dtype and stats: "dropped_fraction" (dropped / real assignments, 0 in
  dropless mode) and "slot_fill" (filled / allocated expert rows: the padding's cost), fp32 scalars, and
  the counts they come from, "assignments" and "kept" (int32).
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
  if (w_gate is not None) != (activation == "swiglu"):
    raise ValueError("w_gate is required for activation='swiglu' and must be None for 'gelu'.")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  ranks_ok = x.ndim == experts.ndim == w_in.ndim == 3
  b, t, d = x.shape if ranks_ok else (None,) * 3
  k = experts.shape[-1] if ranks_ok else None
  num_experts, _, f = w_in.shape if ranks_ok else (None,) * 3
  if not ranks_ok or experts.shape != (b, t, k) or weights.shape != experts.shape or w_in.shape[1] != d or (
      w_out.shape != (num_experts, f, d)) or (w_gate is not None and w_gate.shape != w_in.shape):
    raise ValueError(f"moe_ffn expects x [B, T, d], weights and experts [B, T, k], w_in (and w_gate) [E, d, f], "
                     f"w_out [E, f, d]; got x {x.shape}, weights {weights.shape}, experts {experts.shape}, w_in "
                     f"{w_in.shape}, w_out {w_out.shape}"
                     + ("" if w_gate is None else f", w_gate {w_gate.shape}") + ".")
  if not jnp.issubdtype(experts.dtype, jnp.integer):
    raise ValueError(f"moe_ffn: experts must hold integer expert ids, got {experts.dtype}.")
  if token_mask is not None and token_mask.shape != (b, t):
    raise ValueError(f"moe_ffn: token_mask must be [B, T] = {(b, t)}, got {token_mask.shape}.")
  if capacity is not None and capacity < 1:
    raise ValueError(f"moe_ffn: capacity={capacity} slots per expert must be at least 1.")
  if token_mask is not None:
    experts = jnp.where(token_mask[..., None], experts, num_experts)
  num_assignments = jnp.sum(experts < num_experts, dtype=jnp.int32)

  # Row moves are gathers within a group of tokens: a sequence (padded), or the whole batch (ragged).
  padded = mode == "capacity" or dropless_impl == "padded"
  if padded:
    if mode == "dropless":
      capacity = t
    elif capacity is None:
      capacity = moe_capacity(t, k, num_experts, capacity_factor)
    src, dst, kept = capacity_plan(experts, num_experts, capacity)
    tokens, gates = x, weights.reshape(b, t * k)
  elif dropless_impl == "ragged":
    src, dst, group_sizes = ragged_plan(experts, num_experts)
    kept = jnp.sum(group_sizes)
    tokens, gates = x.reshape(1, b * t, d), weights.reshape(1, -1)
  else:
    raise ValueError(f"dropless_impl must be 'padded' or 'ragged', got {dropless_impl!r}.")

  rows = routing.move_rows(tokens, src, dst, k)  # an empty slot's sentinel (the assignment count) is out of range
  if padded:
    out = _expert_ffn(rows.reshape(b, num_experts, capacity, d), w_in, w_out, w_gate, activation,
                      per_expert=jax.default_backend() == "cpu" and b * capacity > 1
                      and num_experts <= PER_EXPERT_CHAINS_MAX).reshape(rows.shape)
  else:
    out = ffn(rows[0], w_in, w_out, w_gate, activation,
              lambda lhs, rhs: jax.lax.ragged_dot(lhs, rhs, group_sizes))[None]
    # Rows past the last group (masked tokens' assignments) are left undefined by ragged_dot.
    out = jnp.where((jnp.arange(out.shape[1]) < kept)[None, :, None], out, 0)
  y = combine(out, gates, src, dst, (b, t, k, d)).astype(x.dtype)

  kept = jnp.asarray(kept, jnp.int32)
  real = num_assignments.astype(jnp.float32)
  stats = {"dropped_fraction": (real - kept) / jnp.maximum(real, 1.0),
           "slot_fill": kept.astype(jnp.float32) / src.size, "assignments": num_assignments, "kept": kept}
  return y, stats
