"""Expert parallelism: the MoE layer with its experts sharded over a mesh axis, tokens moved by collectives.

Same contract and same numbers as `dispatch.moe_ffn` (capacity per sequence, earlier tokens win, masked
tokens take no slot), computed with the E experts split over the `expert_axis` devices of a mesh, inside
`jax.shard_map`. Each device holds its batch rows (the batch is split over `batch_axes`, which must include
the expert axis) and E / n experts. Two strategies:

- "all_to_all" (capacity mode): each device plans its own sequences' `[E, C]` slots exactly as one device
  would, and one `all_to_all` over the expert axis sends expert e's slots to the device holding e; the
  local experts run on the rows of all n peers; a second `all_to_all` brings them back; combine locally.
  Bytes moved per layer and direction: B·E·C·d elements per expert group (the slots, padding included).
- "gather" (any mode, every backend): all-gather the peers' tokens over the expert axis, run the local
  experts on the assignments routed to them (capacity: the same per-expert slots; dropless: every one),
  and reduce-scatter the partial outputs back to the devices that own the tokens. It moves n·B·T·d
  elements each way, independent of routing, and is the dropless path XLA:CPU can run
  (`ragged_all_to_all` is not implemented there).
- "ragged" (dropless, GPU/TPU): each device sorts its assignments by expert, and one
  `jax.lax.ragged_all_to_all` sends each expert's run of rows to the device that holds it, with sizes and
  offsets computed from the all-gathered per-device group sizes; the receiver lays the rows out by
  (local expert, source device), runs its experts as grouped products (`ragged_dot`), and a second
  `ragged_all_to_all` returns every row to its sender's sorted position. Only the routed rows move
  (B·T·k·d elements each way per device), and each expert computes only the rows routed to it.

The FFN width may also be split over `tensor_axes` (Megatron style: each device computes its slice of
the hidden units and the partial outputs are summed). Weights are passed whole along `embed`: an FSDP
shard is gathered when the layer is entered, as XLA does for any other use of the weight.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from diffmoe_jax.ops import dispatch, routing
from diffmoe_jax.parallel import mesh_axes_of

STRATEGIES = ("all_to_all", "gather", "ragged")


def resolve_strategy(name: str, mode: str, backend: str | None = None) -> str:
  """"auto" -> "all_to_all" for capacity mode; for dropless "ragged" on GPU and TPU, "gather" elsewhere
  (XLA:CPU has no `ragged_all_to_all`)."""
  if name == "auto":
    if mode == "capacity":
      return "all_to_all"
    return "ragged" if (backend or jax.default_backend()) in ("gpu", "tpu") else "gather"
  if name not in STRATEGIES:
    raise ValueError(f"expert-parallel strategy must be 'auto' or one of {STRATEGIES}, got {name!r}.")
  if name == "all_to_all" and mode != "capacity":
    raise ValueError("the all_to_all strategy needs capacity mode (static slot counts); use 'gather' or "
                     "'ragged' for dropless.")
  if name == "ragged" and mode != "dropless":
    raise ValueError("the ragged strategy is dropless (no slots to drop from); use 'all_to_all' or 'gather' "
                     "for capacity mode.")
  return name


def _sum_over(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def moe_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array, w_in: jax.Array, w_out: jax.Array,
            w_gate: jax.Array | None = None, *, mesh, batch_axes, expert_axis: str, tensor_axes=None,
            activation: str, mode: str = "capacity", capacity_factor: float = 1.25,
            dropless_impl: str = "padded", strategy: str = "auto",
            token_mask: jax.Array | None = None, capacity: int | None = None) -> tuple[jax.Array, dict]:
  """`dispatch.moe_ffn` with experts sharded over `expert_axis` of `mesh` (a Mesh or AbstractMesh).

  batch_axes: the mesh axes the batch is split over (must include expert_axis); tensor_axes: mesh axes
  the FFN width is split over (devices that hold the same tokens: none of the batch's), or None. Returns
  y `[B, T, d]` and stats "dropped_fraction" and "slot_fill" over the whole batch. capacity: slots per expert
  per sequence in capacity mode, as in `dispatch.moe_ffn`.
  """
  if capacity is not None and capacity < 1:
    raise ValueError(f"moe_ffn: capacity={capacity} slots per expert must be at least 1.")
  batch_axes, tensor_axes = mesh_axes_of(batch_axes), mesh_axes_of(tensor_axes)
  unknown = [a for a in (expert_axis,) + batch_axes + tensor_axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"mesh axes {unknown} are not axes of the mesh {dict(mesh.shape)}.")
  if expert_axis not in batch_axes:
    raise ValueError(f"expert parallelism needs the batch split over the expert axis {expert_axis!r}; the "
                     f"batch is split over {batch_axes}.")
  shared = [a for a in tensor_axes if a in batch_axes and mesh.shape[a] > 1]
  if shared:
    raise ValueError(f"the FFN width is split over {tensor_axes}, whose devices must hold the same tokens, but the "
                     f"batch is split over {shared} too.")
  n = mesh.shape[expert_axis]
  num_experts = w_in.shape[0]
  if num_experts % n:
    raise ValueError(f"{num_experts} experts do not divide over the {n} devices of mesh axis {expert_axis!r}.")
  strategy = resolve_strategy(strategy, mode)
  b, t, _ = x.shape
  k = experts.shape[-1]
  batch_devices = math.prod(mesh.shape[a] for a in batch_axes)
  if b % batch_devices:
    raise ValueError(f"the batch of {b} sequences does not split evenly over the {batch_devices} devices of "
                     f"mesh axes {batch_axes}; use a batch size that is a multiple of {batch_devices}.")
  dispatch.check_top_k(k, num_experts)
  if mode != "capacity":
    capacity = t
  elif capacity is None:
    capacity = dispatch.moe_capacity(t, k, num_experts, capacity_factor)
  if token_mask is None:
    token_mask = jnp.ones((b, t), bool)

  rows = P(batch_axes)
  hidden = tensor_axes or None
  w_spec, w_out_spec = P(expert_axis, None, hidden), P(expert_axis, hidden, None)
  bodies = {"all_to_all": _all_to_all_body, "gather": _gather_body, "ragged": _ragged_body}
  body = functools.partial(bodies[strategy],
                           activation=activation, mode=mode, capacity=capacity, dropless_impl=dropless_impl,
                           expert_axis=expert_axis, batch_axes=batch_axes, tensor_axes=tensor_axes)
  in_specs = (rows, rows, rows, rows, w_spec, w_out_spec, None if w_gate is None else w_spec)
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(rows, P()))(
      x, weights, experts, token_mask, w_in, w_out, w_gate)


def _stats(assignments, kept, slots, batch_axes) -> dict:
  assignments, kept, slots = (_sum_over(jnp.asarray(v, jnp.float32), batch_axes) for v in (assignments, kept, slots))
  return {"dropped_fraction": (assignments - kept) / jnp.maximum(assignments, 1.0),
          "slot_fill": kept / jnp.maximum(slots, 1.0)}


def _assignments(experts, token_mask, w_in, expert_axis):
  """(devices n, local experts, all experts E, experts with a masked token's assignments set to E)."""
  n, local_experts = jax.lax.axis_size(expert_axis), w_in.shape[0]
  return n, local_experts, n * local_experts, jnp.where(token_mask[..., None], experts, n * local_experts)


def _all_to_all_body(x, weights, experts, token_mask, w_in, w_out, w_gate, *, activation, mode, capacity,
                     dropless_impl, expert_axis, batch_axes, tensor_axes):
  del mode, dropless_impl  # capacity mode only (resolve_strategy)
  n, local_experts, num_experts, experts = _assignments(experts, token_mask, w_in, expert_axis)
  b, t, d = x.shape
  k = experts.shape[-1]
  src, dst, kept = dispatch.capacity_plan(experts, num_experts, capacity)
  slots = routing.move_rows(x, src, dst, k)  # [b, E·C, d]; empty slots are zero rows
  # [b, n, E_l, C, d] -> [n, E_l, b, C, d]: chunk j (expert group j) goes to device j of the expert axis,
  # and what arrives is stacked by source device.
  slots = slots.reshape(b, n, local_experts, capacity, d).transpose(1, 2, 0, 3, 4)
  slots = jax.lax.all_to_all(slots, expert_axis, 0, 0, tiled=True)
  rows = slots.transpose(1, 0, 2, 3, 4).reshape(local_experts, n * b * capacity, d)
  out = dispatch.ffn(rows, w_in, w_out, w_gate, activation, functools.partial(jnp.einsum, "erd,edf->erf"))
  out = _sum_over(out, tensor_axes)
  out = out.reshape(local_experts, n, b, capacity, d).transpose(1, 0, 2, 3, 4)
  out = jax.lax.all_to_all(out, expert_axis, 0, 0, tiled=True)  # back to the devices that own the tokens
  out = out.transpose(2, 0, 1, 3, 4).reshape(b, num_experts * capacity, d)
  y = dispatch.combine(out, weights.reshape(b, t * k), src, dst, (b, t, k, d)).astype(x.dtype)
  assignments = jnp.sum(experts < num_experts)
  return y, _stats(assignments, kept, src.size, batch_axes)


def _gather_body(x, weights, experts, token_mask, w_in, w_out, w_gate, *, activation, mode, capacity,
                 dropless_impl, expert_axis, batch_axes, tensor_axes):
  local_experts = w_in.shape[0]
  gather = lambda a: jax.lax.all_gather(a, expert_axis, axis=0, tiled=True)
  x_all, weights_all, experts_all, mask_all = (gather(a) for a in (x, weights, experts, token_mask))
  # This device's experts keep their local ids; every other assignment becomes "no expert here".
  first = jax.lax.axis_index(expert_axis) * local_experts
  local = experts_all - first
  here = (local >= 0) & (local < local_experts) & mask_all[..., None]
  y, stats = dispatch.moe_ffn(x_all, weights_all, jnp.where(here, local, local_experts), w_in, w_out, w_gate,
                              activation=activation, mode=mode, dropless_impl=dropless_impl, capacity=capacity)
  y = _sum_over(y.astype(jnp.float32), tensor_axes)
  y = jax.lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True).astype(x.dtype)
  # Each device counted the peers' assignments to its own experts: summed over the expert axis (part of
  # batch_axes) that is every assignment once. Allocated slots likewise.
  slots = x_all.shape[0] * local_experts * capacity
  return y, _stats(stats["assignments"], stats["kept"], slots, batch_axes)


def _exclusive_cumsum(x, axis: int):
  return jnp.cumsum(x, axis=axis) - x


def ragged_exchange_plan(group_sizes: jax.Array, device: jax.Array, local_experts: int) -> dict:
  """Sizes and offsets of the two `ragged_all_to_all` exchanges, for the device at index `device`.

  group_sizes `[n, E]`: how many of device s's assignments go to expert e (all-gathered). Device s sends
  expert e's run of its sorted rows (offset starts[s, e]) to device e // E_l; the receiver r lays out
  what it gets by (local expert, source): offset base[r, l] + within[s, r, l]. Slice i of each exchange is
  expert i on the way there and (source i // E_l, local expert i % E_l) on the way back, so that slice i
  always travels to device i // E_l, as `ragged_all_to_all` requires. Returns int32 `[E]` arrays
  "send" / "back" (dicts of input_offsets, send_sizes, output_offsets, recv_sizes) and "local_sizes"
  `[E_l]`: this device's rows per local expert, grouped as received.
  """
  n, num_experts = group_sizes.shape
  starts = _exclusive_cumsum(group_sizes, 1)  # [s, e]: where expert e's run begins in s's sorted rows
  per_receiver = group_sizes.reshape(n, n, local_experts)  # [s, r, l]
  totals = per_receiver.sum(0)  # [r, l]
  offsets = _exclusive_cumsum(totals, 1)[None] + _exclusive_cumsum(per_receiver, 0)  # [s, r, l]
  received = per_receiver[:, device].reshape(-1)  # [(s, l)]: rows from s for my local expert l
  here = offsets[:, device].reshape(-1)
  send = dict(input_offsets=starts[device], send_sizes=group_sizes[device],
              output_offsets=offsets[device].reshape(-1), recv_sizes=received)
  back = dict(input_offsets=here, send_sizes=received,
              output_offsets=starts.reshape(n, n, local_experts)[:, device].reshape(-1),
              recv_sizes=group_sizes[device])
  return {"send": send, "back": back, "local_sizes": totals[device]}


def _ragged_body(x, weights, experts, token_mask, w_in, w_out, w_gate, *, activation, mode, capacity,
                 dropless_impl, expert_axis, batch_axes, tensor_axes):
  del mode, capacity, dropless_impl  # dropless, grouped products (resolve_strategy)
  n, local_experts, num_experts, experts = _assignments(experts, token_mask, w_in, expert_axis)
  b, t, d = x.shape
  k = experts.shape[-1]
  src, dst, sizes = dispatch.ragged_plan(experts, num_experts)  # masked assignments sort last, in no group
  rows = routing.move_rows(x.reshape(1, b * t, d), src, dst, k)[0]  # [N, d] by expert
  plan = ragged_exchange_plan(jax.lax.all_gather(sizes, expert_axis), jax.lax.axis_index(expert_axis),
                              local_experts)
  exchange = functools.partial(jax.lax.ragged_all_to_all, axis_name=expert_axis)
  # Every peer may route all its rows here: room for n·N rows; those past the received ones stay zero.
  arrived = exchange(rows, jnp.zeros((n * rows.shape[0], d), rows.dtype), **plan["send"])
  local_sizes = plan["local_sizes"]
  out = dispatch.ffn(arrived, w_in, w_out, w_gate, activation,
                     lambda lhs, rhs: jax.lax.ragged_dot(lhs, rhs, local_sizes))
  # ragged_dot leaves the rows past the last group undefined.
  out = jnp.where((jnp.arange(out.shape[0]) < jnp.sum(local_sizes))[:, None], out, 0)
  out = _sum_over(out, tensor_axes)
  returned = exchange(out.astype(x.dtype), jnp.zeros_like(rows), **plan["back"])
  y = dispatch.combine(returned[None], weights.reshape(1, -1), src, dst, (b, t, k, d)).astype(x.dtype)
  assignments = jnp.sum(sizes)
  return y, _stats(assignments, assignments, assignments, batch_axes)  # only routed rows are computed
