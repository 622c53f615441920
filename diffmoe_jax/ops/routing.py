"""Routing math: noisy top-k expert gating, the router's auxiliary losses, mixture-of-depths selection.

Router logits are `[..., E]` (any leading token axes) and are handled in fp32. Mixture-of-depths works on
`[B, T]` scores: per sequence, a static number K of tokens is selected, kept in position order.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Capacities are products of decimal fractions and lengths (0.3 · 10 = 3.0000000000000004 in binary
# floating point); this slack keeps ceil() from rounding such a product up to the next integer.
_CEIL_SLACK = 1e-9


def token_count(product: float, limit: int) -> int:
  """ceil(product), at least 1 and at most `limit`: a whole number of tokens or slots from a capacity."""
  return min(limit, max(1, math.ceil(product - _CEIL_SLACK)))


def _is_zero(x) -> bool:
  return isinstance(x, (int, float)) and x == 0


def _router_logits_fp32(where: str, logits: jax.Array) -> jax.Array:
  """`logits [..., E]` in fp32, refusing integer or boolean ones (an expert id array passed by mistake)."""
  if logits.ndim < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"{where}: logits must be a floating-point array [..., E]; got {logits.dtype} "
                     f"{tuple(logits.shape)}.")
  return logits.astype(jnp.float32)


def _check_token_shapes(where: str, token_shape: tuple, *, experts=None, num_experts=None, mask=None):
  """The per-token arrays of one batch of routing must agree on its token axes `token_shape`."""
  if experts is not None and (not jnp.issubdtype(experts.dtype, jnp.integer) or experts.ndim < 1 or
                              tuple(experts.shape[:-1]) != token_shape):
    raise ValueError(f"{where}: experts must be an integer array {token_shape + ('k',)}; got {experts.dtype} "
                     f"{tuple(experts.shape)}.")
  if num_experts is not None and num_experts < 1:
    raise ValueError(f"{where}: num_experts={num_experts} must be at least 1.")
  if mask is not None and tuple(mask.shape) != token_shape:
    raise ValueError(f"{where}: mask must be shaped like the tokens {token_shape}; got {tuple(mask.shape)}.")


def top_k_gating(logits: jax.Array, k: int, *, noise_std=0.0,
                 rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Noisy top-k: `[..., E]` logits -> (weights `[..., k]` fp32, experts `[..., k]` int32).

  With `rng`, Gaussian noise is added to the fp32 logits before selection, its std being `noise_std` (a
  Python float or a traced scalar, so a trainer can anneal it inside one compiled step) times the token's
  own logit spread (the std over experts, without gradient). Relative noise means the same thing at every
  width and through training: absolute noise of std 1 dwarfs a fresh router's logits (std ~0.3 at
  d=288) and makes routing random, while a trained router's grow past it. `weights` is the
  softmax over the k selected (noisy) logits, as in Mixtral; `experts` are ordered by descending
  logit, ties going to the lower expert index. Without `rng`, `noise_std` must be the constant 0. A −inf
  logit masks its expert: it is chosen last, with weight 0, and is left out of the spread.
  """
  logits = _router_logits_fp32("top_k_gating", logits)
  if not isinstance(k, int) or not 1 <= k <= logits.shape[-1]:
    raise ValueError(f"top_k_gating: k={k!r} must be an integer between 1 and the number of experts "
                     f"{logits.shape[-1]}.")
  if rng is not None:
    finite = jnp.where(jnp.isfinite(logits), logits, jnp.nan)
    spread = jnp.nan_to_num(jnp.nanstd(finite, axis=-1, keepdims=True))  # 0 when no logit is finite
    scale = jnp.asarray(noise_std, jnp.float32) * jax.lax.stop_gradient(spread)
    logits = logits + scale * jax.random.normal(rng, logits.shape, jnp.float32)
  elif not _is_zero(noise_std):
    raise ValueError("top_k_gating: noise_std may be non-zero, so an rng is required.")
  # k argmax passes rather than lax.top_k, whose operand XLA's SPMD partitioner all-gathers when the
  # batch is sharded (seen on XLA:CPU, jax 0.10); a sort would do too but is ~10x slower on CPU.
  # A masked (−inf) expert ranks at the float minimum, above the −inf that marks one already chosen.
  remaining, chosen = jnp.maximum(logits, jnp.finfo(jnp.float32).min), []
  for _ in range(k):
    best = jnp.argmax(remaining, axis=-1).astype(jnp.int32)
    chosen.append(best)
    remaining = jnp.where(jnp.arange(logits.shape[-1]) == best[..., None], -jnp.inf, remaining)
  experts = jnp.stack(chosen, axis=-1)
  values = jnp.take_along_axis(logits, experts, axis=-1)
  return jax.nn.softmax(values, axis=-1), experts


def router_probs(logits: jax.Array) -> jax.Array:
  """Softmax over all E experts in fp32: `[..., E] -> [..., E]`."""
  return jax.nn.softmax(_router_logits_fp32("router_probs", logits), axis=-1)


def _token_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over all token axes of `values [..., C]` -> `[C]`, counting only tokens where `mask [...]`."""
  values = values.reshape(-1, values.shape[-1])
  if mask is None:
    return jnp.mean(values, axis=0)
  mask = mask.reshape(-1, 1).astype(values.dtype)
  return jnp.sum(values * mask, axis=0) / jnp.maximum(jnp.sum(mask), 1.0)


def expert_load(experts: jax.Array, num_experts: int, mask: jax.Array | None = None) -> jax.Array:
  """f_e: the fraction of all (token, choice) assignments that go to expert e, `[E]` fp32 summing to 1.

  experts: `[..., k]` int; mask: optional bool `[...]` (False tokens, e.g. padding, are not counted).
  """
  _check_token_shapes("expert_load", tuple(experts.shape[:-1]), experts=experts, num_experts=num_experts,
                      mask=mask)
  k = experts.shape[-1]
  per_token = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=-2) / k  # [..., E]
  return _token_mean(per_token, mask)


def load_balance_loss(logits: jax.Array, experts: jax.Array, num_experts: int,
                      mask: jax.Array | None = None) -> jax.Array:
  """Switch load-balance loss `E · Σ_e f_e · P_e`, a scalar; 1 under perfectly uniform routing.

  logits: `[..., E]` noise-free router logits (P_e is their softmax averaged over tokens); experts:
  `[..., k]` the chosen experts (f_e, see `expert_load`); mask: optional bool `[...]` of real tokens.
  The gradient flows through P only (f is a count).
  """
  logits = _router_logits_fp32("load_balance_loss", logits)
  if logits.shape[-1] != num_experts:
    raise ValueError(f"load_balance_loss: logits {tuple(logits.shape)} must have num_experts={num_experts} "
                     "entries on their last axis.")
  _check_token_shapes("load_balance_loss", tuple(logits.shape[:-1]), experts=experts, mask=mask)
  f = expert_load(experts, num_experts, mask)
  p = _token_mean(router_probs(logits), mask)
  return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """`mean(logsumexp(logits, -1)²)` over tokens (ST-MoE), a scalar; logits `[..., E]`, mask `[...]`."""
  logits = _router_logits_fp32("router_z_loss", logits)
  _check_token_shapes("router_z_loss", tuple(logits.shape[:-1]), mask=mask)
  z = jax.nn.logsumexp(logits, axis=-1)
  return _token_mean((z * z)[..., None], mask)[0]


def mod_capacity_tokens(capacity: float, seq_len: int) -> int:
  """K = ceil(capacity · T), at least 1 and at most T: the static number of tokens a routed layer runs.

  `capacity` is a fraction in (0, 1]; any other value is an error, not clamped into range.
  """
  if not 0.0 < capacity <= 1.0:
    raise ValueError(f"mod capacity {capacity!r} must lie in (0, 1]: the fraction of a sequence's tokens a "
                     "routed layer runs.")
  return token_count(capacity * seq_len, seq_len)


def mod_select(scores: jax.Array, num_selected: int) -> jax.Array:
  """Per sequence, the positions of the `num_selected` highest scores: `[B, T] -> [B, K]` int32.

  Positions are sorted ascending so the selected tokens keep their causal order. Ties go to the
  earlier position. No gradient flows through the choice; weight the update by the gathered score.
  """
  if scores.ndim != 2:
    raise ValueError(f"mod_select: scores must be [B, T] (one score per token); got {tuple(scores.shape)}.")
  if not 0 <= num_selected <= scores.shape[1]:
    raise ValueError(f"mod_select: num_selected={num_selected} must be between 0 and the sequence length "
                     f"{scores.shape[1]}.")
  # A stable sort rather than lax.top_k, which XLA's SPMD partitioner all-gathers over a sharded batch.
  iota = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
  by_score = jax.lax.sort((-scores, iota), dimension=1, is_stable=True, num_keys=1)[1]
  return jnp.sort(by_score[:, :num_selected], axis=-1)


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """`x[b, index[b, i]]`: x `[B, R, ...]`, index `[B, N]` -> `[B, N, ...]`, zeros where `index >= R`.

  Gathers stay within a sequence, so a batch sharded over devices needs no communication here.
  """
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1, mode="fill", fill_value=0)


def move_rows(x: jax.Array, index: jax.Array, inverse: jax.Array, group: int = 1) -> jax.Array:
  """`x[b, index[b, i] // group]`: x `[B, R, ...]`, index `[B, N]` -> `[B, N, ...]`, zeros where the row is
  out of range; for an `index` that names each of the R·group sub-rows `r·group + j` at most once, with
  `inverse [B, R·group]` its inverse (`index[b, inverse[b, s]] == s`; N or more where s is not named).

  A token goes to its k expert slots (`index` = the slots' assignments, group k), a slot's output to its
  assignment (`index` = the assignments' slots, group 1), a mixture-of-depths layer's tokens to the block
  and its updates back (`selected_slots`). The gradient is then a gather through `inverse`
  (summed over a row's sub-rows), where autodiff of a gather scatter-adds into a zero array of x's shape.
  """
  # Inside shard_map, x first varies over the mesh axes its indices vary over, as it would on its way into
  # a gather, so that its gradient has x's type.
  varying = lambda a: jax.typeof(a).manual_axis_type.varying
  missing = (varying(index) | varying(inverse)) - varying(x)
  if missing:
    x = jax.lax.pcast(x, tuple(sorted(missing)), to="varying")
  return _move_rows(x, index, inverse, group)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _move_rows(x, index, inverse, group):
  return take_rows(x, index // group)


def _move_rows_fwd(x, index, inverse, group):
  return _move_rows(x, index, inverse, group), (inverse, x.shape[1])


def _move_rows_bwd(group, residuals, g):
  inverse, rows = residuals
  dx = take_rows(g, inverse)  # [B, R·group, ...]
  if group > 1:  # a token's k shares, added in fp32
    dx = jnp.sum(dx.reshape((dx.shape[0], rows, group) + dx.shape[2:]).astype(jnp.float32), axis=2)
  return dx.astype(g.dtype), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def scatter_tokens(x: jax.Array, updates: jax.Array, indices: jax.Array) -> jax.Array:
  """`x [B, T, ...]` with rows `indices [B, K]` replaced by `updates [B, K, ...]`; other rows unchanged.

  The indices of a row must be distinct (as `mod_select` gives). Written per sequence under vmap, so
  XLA sees the batch as a scatter batch dimension and a batch-sharded x needs no communication.
  """
  return jax.vmap(lambda row, new, at: row.at[at].set(new.astype(row.dtype), unique_indices=True))(
      x, updates, indices)


def selected_slots(indices: jax.Array, seq_len: int) -> jax.Array:
  """Int32 `[B, T]`: each position's place among the selected `indices [B, K]`, K where it is not selected
  (the inverse `move_rows` takes; `< K`, the selection mask, is the predictor's BCE target)."""
  b, k = indices.shape
  return scatter_tokens(jnp.full((b, seq_len), k, jnp.int32), jax.lax.broadcasted_iota(jnp.int32, (b, k), 1),
                        indices)
