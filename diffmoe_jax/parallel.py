"""The device mesh, the logical-axis rules, and the shardings of parameters, state and batches.

One SPMD program: the train step is a single `jax.jit` over a `Mesh` with axes (data, fsdp, expert,
tensor). Parameters carry logical axis names; `config.mesh.axis_rules` maps them to mesh axes and is the
only place mesh axes are named. A single device is the degenerate mesh (every axis of size 1). The data
axis plays the role `jax.pmap` used to: each data-parallel slice of the batch on its own devices.
"""
from __future__ import annotations

import collections
import functools
import math
import re
from typing import Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffmoe_jax.config import MESH_AXES, ConfigError


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves the one allowed -1 to the devices left over; errors name the field and the device count."""
  shape = {axis: mesh_config.shape.get(axis, 1) for axis in MESH_AXES}
  unknown = [a for a, s in shape.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f"config.mesh.shape: at most one axis may be -1, got {unknown}.")
  fixed = math.prod(s for s in shape.values() if s != -1)
  if unknown:
    if num_devices % fixed:
      raise ConfigError(f"config.mesh.shape: the fixed axes multiply to {fixed}, which does not divide the "
                        f"{num_devices} devices; change mesh.shape so the product divides {num_devices}.")
    shape[unknown[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ConfigError(f"config.mesh.shape {shape} multiplies to {math.prod(shape.values())}, but there are "
                      f"{num_devices} devices; make the product equal the device count or set one axis to -1.")
  return shape


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: shardings come from the logical rules and XLA's propagation (the pjit model), not from
  # sharding-in-types, which newer JAX versions make the default.
  return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_axes_of(spec) -> tuple:
  """The mesh axes of one dimension's PartitionSpec entry (None, a name or a tuple of names)."""
  return spec if isinstance(spec, tuple) else (spec,) if spec else ()


def axis_rules(mesh_config: ml_collections.ConfigDict) -> tuple:
  return tuple((name, tuple(m) if isinstance(m, (list, tuple)) else m) for name, m in mesh_config.axis_rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` values (e.g. `jax.eval_shape` of init)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def shard_shapes(boxed_tree, mesh_shape: dict[str, int], rules) -> list[tuple[str, tuple[int, ...], object]]:
  """(path, one device's shard shape, dtype) of every array of a boxed tree on a mesh of `mesh_shape`.

  Needs no devices (so the estimator can size a pod from a laptop). Raises ConfigError, naming the array,
  its logical axis, the dimension and the mesh axes, when the rules split a dimension unevenly, or map two
  of an array's logical axes to one mesh axis.
  """
  is_boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed_tree, is_leaf=is_boxed):
    value = leaf.unbox() if is_boxed(leaf) else leaf
    names = leaf.names if is_boxed(leaf) else (None,) * len(value.shape)
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    shard, taken = [], {}
    for dim, logical in zip(value.shape, names):
      axes = logical_mesh_axes(rules, logical) if logical else ()
      for axis in (a for a in axes if mesh_shape.get(a, 1) > 1):
        if axis in taken:  # flax would leave one of the two whole, silently
          raise ConfigError(
              f"config.mesh.axis_rules: {name} has logical axes {taken[axis]!r} and {logical!r}, both mapped to "
              f"mesh axis {axis!r} ({mesh_shape[axis]} devices), which can split only one dimension of an array; "
              f"map one of them to other mesh axes.")
        taken[axis] = logical
      ways = math.prod(mesh_shape.get(a, 1) for a in axes)
      if dim % ways:
        split = " x ".join(f"{a}={mesh_shape.get(a, 1)}" for a in axes)
        raise ConfigError(
            f"config.mesh: {name} has its {logical!r} axis of size {dim} split over mesh {split}, {ways} ways, "
            f"which does not divide {dim}; change config.mesh.shape, map {logical!r} to other mesh axes in "
            f"config.mesh.axis_rules, or use a model dimension divisible by {ways}.")
      shard.append(dim // ways)
    out.append((name, tuple(shard), value.dtype))
  return out


def check_expert_parallel(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], backend: str) -> None:
  """ConfigError, before anything compiles, for expert parallelism (`model.moe.expert_parallel` on a mesh
  that splits the experts) that this mesh's rules or this backend cannot run."""
  from diffmoe_jax.ops import expert_parallel
  moe, rules = config.model.moe, axis_rules(config.mesh)
  mesh_axes = functools.partial(logical_mesh_axes, rules)
  ways = logical_axis_size(mesh_shape, rules, "expert")
  if config.model.ffn != "moe" or moe.expert_parallel == "off" or ways == 1:
    return
  where = f"the experts are split {ways} ways (config.mesh.axis_rules and mesh.shape)"
  split_over = [a for a in mesh_axes("expert") if mesh_shape.get(a, 1) > 1]
  if len(split_over) > 1:
    raise ConfigError(f"config.mesh.axis_rules: 'expert' maps to {mesh_axes('expert')}, and expert parallelism "
                      f"splits the experts over one mesh axis, but {split_over} all have more than one device; "
                      "map 'expert' to one of them, or set model.moe.expert_parallel='off'.")
  if mesh_axes("length"):
    raise ConfigError(f"config.mesh.axis_rules: 'length' maps to {mesh_axes('length')}, but {where} and expert "
                      "parallelism routes whole sequences per device; map 'length' to no mesh axis, or set "
                      "model.moe.expert_parallel='off'.")
  if not set(mesh_axes("expert")) <= set(mesh_axes("batch")):
    raise ConfigError(f"config.mesh.axis_rules: 'batch' maps to {mesh_axes('batch')}, but {where} and expert "
                      f"parallelism needs the batch split over {mesh_axes('expert')} too; add them to the batch "
                      "rule, or set model.moe.expert_parallel='off'.")
  shared = [a for a in mesh_axes("mlp") if a in mesh_axes("batch") and mesh_shape.get(a, 1) > 1]
  if shared:
    raise ConfigError(f"config.mesh.axis_rules: 'mlp' maps to {mesh_axes('mlp')}, but {where} and expert "
                      f"parallelism sums the FFN's hidden-unit slices over mesh axes that hold the same tokens, "
                      f"while the batch is split over {shared} too; map 'mlp' to mesh axes the batch rule does not "
                      "use (tensor), or set model.moe.expert_parallel='off'.")
  for field in ("dispatch", "eval_dispatch"):
    if backend == "cpu" and expert_parallel.resolve_strategy(moe.expert_parallel, moe[field], backend) == "ragged":
      raise ConfigError("config.model.moe.expert_parallel: 'ragged' needs jax.lax.ragged_all_to_all, which XLA:CPU "
                        "does not implement; use 'gather' (or 'auto', which picks it on CPU).")


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Tokens `[batch, length]`: the batch split over the data-parallel axes."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_mesh_axes(rules, logical: str) -> tuple:
  """The mesh axes the rules map one logical axis to (one name at a time: within one spec flax drops a mesh
  axis an earlier dimension took)."""
  return mesh_axes_of(nn.logical_to_mesh_axes((logical,), rules)[0])


def logical_axis_size(mesh_shape: Mapping[str, int], rules, logical: str) -> int:
  """How many ways a mesh of `mesh_shape` (`Mesh.shape`, or `mesh_shape(...)`'s) splits a logical axis (1 when
  its rule maps it to no mesh axis)."""
  return math.prod(mesh_shape.get(a, 1) for a in logical_mesh_axes(rules, logical))


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the batch axis is split: the global batch must be a multiple of it."""
  return logical_axis_size(mesh.shape, rules, "batch")


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's rows of the batch -> global `jax.Array`s (works for one or many processes)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


# ragged-all-to-all counts its output buffer, sized for the most rows a device can receive: an upper bound.
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def collective_bytes(hlo: str, op: str) -> int:
  """Bytes of the results of the `op` instructions one call of an HLO module runs (one device's program),
  counted as `hlo_totals` counts (an asynchronous collective by its `op-done`: its result; `op-start` also
  holds the operand)."""
  return hlo_totals(hlo, lambda line: collections.Counter({op: _result_bytes(line, op)}))[op]


def hlo_totals(hlo: str, cost) -> collections.Counter:
  """The sum of `cost(instruction line)` (a Counter) over the instructions one call of an HLO module runs.

  Counted from the ENTRY computation down: a while loop's body counts its known trip count times (the
  scans over layers and micro-batches), a conditional its largest branch (by its total), any other called
  computation once (an async pair's at its start), except a fusion's: its instruction is the kernel.
  """
  computations, entry = hlo_computations(hlo)
  if entry is None:  # not a whole module: every instruction once
    return sum((cost(line) for line in hlo.splitlines()), collections.Counter())
  memo: dict[str, collections.Counter] = {}

  def total(name: str) -> collections.Counter:
    if name not in memo:
      memo[name] = collections.Counter()  # (no recursion in HLO; this only guards a malformed text)
      count = collections.Counter()
      for line in computations.get(name, ()):
        count.update(cost(line))
        if " while(" in line:
          trips = _TRIP_COUNT.search(line)
          body = total(_BODY.search(line).group(1))
          count.update({k: v * (int(trips.group(1)) if trips else 1) for k, v in body.items()})
        elif " conditional(" in line:
          count.update(max((total(b) for b in _branches(line)), key=lambda c: sum(c.values()),
                           default=collections.Counter()))
        elif "-done(" not in line and " fusion(" not in line:
          for called in _CALLED.findall(line):
            count.update(total(called))
      memo[name] = count
    return memo[name]

  return total(entry)


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BODY = re.compile(r"body=%?([\w.\-]+)")
_CALLED = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_NAME = re.compile(r"%?([\w.\-]+)")


def _branches(line: str) -> list[str]:
  """The computations a conditional instruction may run."""
  named = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
  listed = re.search(r"branch_computations=\{([^}]*)\}", line)
  return named + ([_NAME.match(b.strip()).group(1) for b in listed.group(1).split(",")] if listed else [])


def hlo_computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
  """{computation name: its instruction lines} of an HLO module's text, and the ENTRY computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
  return computations, entry


def hlo_arrays(type_text: str) -> list[tuple[int, list[int]]]:
  """(bytes per item, dims) of each array in an HLO type (`f32[2,3]{1,0}`, or a tuple of them)."""
  return [(_BYTES[dtype], [int(x) for x in dims.split(",") if x]) for dtype, dims in _SHAPE.findall(type_text)]


def hlo_bytes(type_text: str) -> int:
  """Bytes of the arrays in an HLO type."""
  return sum(item * math.prod(dims) for item, dims in hlo_arrays(type_text))


def _result_bytes(line: str, op: str) -> int:
  """Bytes of the result of `line` if it is an `op` (or `op-done`) instruction, else 0."""
  for form in (f" {op}(", f" {op}-done("):
    if form in line and "=" in line:
      return hlo_bytes(line.split("=", 1)[1].split(form, 1)[0])
  return 0


def collective_summary(hlo: str) -> str:
  """"all-to-all 1.2 MiB, all-gather 3.4 MiB" per device per call of a compiled program; "" when none."""
  sizes = {op: collective_bytes(hlo, op) for op in COLLECTIVES}
  return ", ".join(f"{op} {n / 2**20:,.2f} MiB" for op, n in sizes.items() if n)
