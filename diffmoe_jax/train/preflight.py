"""The memory preflight: a config too large for the devices is refused before anything is allocated,
with the numbers and a mesh that would fit."""
from __future__ import annotations

import math

import jax
from absl import logging

from diffmoe_jax import estimate, memory, parallel
from diffmoe_jax.config import ConfigError
from diffmoe_jax.train.curriculum import Curriculum

_size = estimate.human_bytes  # the figures of the refusal, in the unit that shows them


class InsufficientMemoryError(RuntimeError):
  """The config needs more memory per device than the machine has."""


def available_bytes_per_device() -> float:
  """What one device can hold: the accelerator's limit, or this host's available RAM shared by its CPU devices."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  with open("/proc/meminfo") as f:
    available_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
  return available_kib * 1024 / jax.local_device_count()


def check_memory(config, mesh_shape: dict, backend: str, advice: str = "") -> dict:
  """The estimate of what `config` needs per device on `mesh_shape` (`memory.training_memory_per_device`);
  InsufficientMemoryError if that exceeds train.memory_headroom of a device, with `advice`, or by default a
  mesh that would fit."""
  need = memory.training_memory_per_device(config, mesh_shape)
  have = available_bytes_per_device()
  budget = config.train.memory_headroom * have
  if need["total"] <= budget:
    return need
  # A caller's own advice (the NCAS search's, for proxies it configures itself) replaces the mesh advice and
  # the way past the check.
  bypass = "" if advice else (' The estimate errs high on GPUs (README "Too large for the machine"); '
                              "config.train.memory_check=False trains anyway.")
  advice = advice or _mesh_advice(config, mesh_shape, backend, budget)
  parts = (f"evaluation's activations {_size(need['evaluation'])}" if need["evaluation"] else
           f"gradients and update {_size(need['gradients'])}, activations {_size(need['activations'])}")
  message = (f"This config needs about {_size(need['total'])} per device to train on mesh {mesh_shape} (state "
             f"{_size(need['state'])}, {parts}, by the estimator), but a device here has {_size(have)} available "
             f"(train.memory_headroom = {config.train.memory_headroom}); {advice}.")
  if not config.train.memory_check:
    logging.warning("%s Training anyway, as config.train.memory_check is False.", message)
    return need
  raise InsufficientMemoryError(message + bypass)


def _mesh_advice(config, mesh_shape: dict, backend: str, budget: float) -> str:
  """A mesh on which `config` fits in `budget` bytes per device, or what takes the memory where none does."""
  flags = lambda shape: " ".join(f"--config.mesh.shape.{axis}={size}" for axis, size in shape.items())
  devices = math.prod(mesh_shape.values())
  options = mesh_options(config, backend)
  fit = fitting_mesh(options, devices, budget)
  if fit is not None:
    shape, fit_need = fit
    where = "these" if math.prod(shape.values()) == devices else f"{math.prod(shape.values()):,}"
    return f"a mesh that fits on {where} devices: {flags(shape)} (~{_size(fit_need)} per device)"
  shape, least = min(options, key=lambda o: o[1]["total"])  # the one-device mesh is always an option
  phase, sequences, length = least["largest_phase"]
  if phase == "evaluation":
    whose, fix = "the evaluation's", ("lower train.eval_batch_size" if sequences > 1 else "shorten model.max_seq_len")
  else:
    whose = f"the {phase} phase's"
    fix = f"lower curriculum.{phase}.batch_size" if sequences > 1 else f"shorten curriculum.{phase}.seq_len"
  return (f"no mesh of up to {MAX_SUGGESTED_DEVICES:,} devices fits it; the least any needs is "
          f"~{_size(least['total'])} "
          f"per device ({flags(shape)}, on {math.prod(shape.values()):,} devices; its largest activations are "
          f"{whose}, {sequences} sequence(s) of {length:,} tokens per device): {fix}, or use devices with more "
          "memory or a smaller config")


MAX_SUGGESTED_DEVICES = 16384
_TENSOR_WAYS = (1, 2, 3, 4, 6, 8, 9, 12, 16)


def mesh_options(config, backend: str) -> list[tuple[dict, dict]]:
  """Every mesh of up to MAX_SUGGESTED_DEVICES devices this run would accept, with its estimate per device
  (`memory.training_memory_per_device`).

  Experts split over an expert axis that divides model.moe.num_experts, heads and FFN width over tensor,
  and the rest of the batch's split over fsdp (weights sharded too) or data. `config.mesh.axis_rules` must
  split every phase's batch (with optimizer.grad_accum_steps) evenly and every dimension it shards, and
  expert parallelism on `backend` must be possible.
  """
  accum = config.optimizer.grad_accum_steps
  batches = [p.batch_size for p in Curriculum(config).phases]
  batch_gcd = math.gcd(*(b // accum for b in batches if b % accum == 0))
  experts = config.model.moe.num_experts if config.model.ffn == "moe" else 1
  rules = parallel.axis_rules(config.mesh)
  boxed = memory.abstract_state(config)
  options = []
  # Splits past MAX_SUGGESTED_DEVICES are never suggested, so the loops stop there, not at the batch's size.
  for split in (s for s in range(1, min(batch_gcd, MAX_SUGGESTED_DEVICES) + 1) if batch_gcd % s == 0):
    for expert in (e for e in range(1, min(experts, split) + 1) if experts % e == 0 and split % e == 0):
      for tensor in (t for t in _TENSOR_WAYS if split * t <= MAX_SUGGESTED_DEVICES):
        for rest_axis in ("fsdp", "data"):
          shape = {"data": 1, "fsdp": 1, "expert": expert, "tensor": tensor, rest_axis: split // expert}
          if any(b % (accum * parallel.logical_axis_size(shape, rules, "batch")) for b in batches):
            continue
          try:
            parallel.check_expert_parallel(config, shape, backend)
            options.append((shape, memory.training_memory_per_device(config, shape, boxed)))
          except ConfigError:  # the mesh does not divide some dimension, or the run would refuse it
            continue
  return options


def fitting_mesh(options: list[tuple[dict, dict]], devices: int, budget: float) -> tuple[dict, float] | None:
  """Of `mesh_options`, one whose estimate fits in `budget` bytes per device, and its total: on `devices`
  devices if one fits, else on the fewest devices above that do."""
  fits = [(math.prod(shape.values()) != devices, math.prod(shape.values()), need["total"], shape)
          for shape, need in options if need["total"] <= budget and math.prod(shape.values()) >= devices]
  if not fits:
    return None
  *_, total, shape = min(fits, key=lambda o: o[:3])
  return shape, total


def check_runs_fit(configs: dict, advice: str = "") -> None:
  """`check_memory` on this machine's devices for each of several runs (name: config), before the first one
  trains: a command that trains them in turn stops at once, not when it reaches one too large."""
  for name, config in configs.items():
    try:
      check_memory(config, parallel.mesh_shape(config.mesh, jax.device_count()), jax.default_backend(), advice)
    except InsufficientMemoryError as e:
      raise InsufficientMemoryError(f"{name}: {e}") from None
