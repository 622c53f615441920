"""Train a model through its curriculum.

    python -m diffmoe_jax.main --config=configs/tiny.py --workdir=runs/tiny
    python -m diffmoe_jax.main --config=configs/tiny.py --config.curriculum.total_steps=50 --workdir=runs/short
    python -m diffmoe_jax.main ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I

A run of several processes (those flags on each, or a launcher: SLURM, Open MPI, a TPU slice with
--distributed=on) joins JAX's distributed runtime first (`distributed.py`).

Validates the config, prints a one-screen summary, refuses configs too large for the machine before
allocating anything, then trains, evaluates and checkpoints. Re-running on the same workdir resumes; one
run at a time may use a workdir (it is locked while a run holds it).

Exit codes:
  0    finished the curriculum
  1    error (config, flags, data, workdir, checkpoint, memory, or training stopped by non-finite updates),
       with one line on stderr saying what to change
  3    stopped early and resumable (SIGTERM, SIGINT or train.run_steps): rerun the same command to go on
  130  interrupted at once (a second Ctrl-C, or one before training began) without a final checkpoint; the
       earlier checkpoints are intact
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

from absl import app, flags

from diffmoe_jax import cli, distributed  # distributed: its flags (--coordinator_address, ...) are main's

DEFAULT_CONFIG = "configs/tiny.py"
EXIT_ERROR, EXIT_STOPPED_EARLY, EXIT_INTERRUPTED = 1, 3, 130

_CONFIG = cli.define_config_flag(DEFAULT_CONFIG, "Path to a config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints and TensorBoard logs.")


class InsufficientMemoryError(RuntimeError):
  """The config needs more memory per device than the machine has."""


def _available_bytes_per_device() -> float:
  """What one device can hold: the accelerator's limit, or this host's available RAM shared by its CPU devices."""
  import jax
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  with open("/proc/meminfo") as f:
    available_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
  return available_kib * 1024 / jax.local_device_count()


def check_memory(config, mesh_shape: dict, backend: str) -> dict:
  from absl import logging
  from diffmoe_jax import estimate
  if config.model.remat_policy not in estimate.MODELED_REMAT_POLICIES:
    logging.warning("The memory check counts activations as under model.remat_policy='full'; with %r they are "
                    "larger and not modeled, so this run may still run out of device memory.",
                    config.model.remat_policy)
  need = estimate.training_memory_per_device(config, mesh_shape)
  have = _available_bytes_per_device()
  budget = config.train.memory_headroom * have
  if need["total"] <= budget:
    return need
  gib = lambda x: f"{x / 2**30:,.1f} GiB"
  flags = lambda shape: " ".join(f"--config.mesh.shape.{axis}={size}" for axis, size in shape.items())
  devices = math.prod(mesh_shape.values())
  options = mesh_options(config, backend)
  fit = fitting_mesh(options, devices, budget)
  if fit is not None:
    shape, fit_need = fit
    where = "these" if math.prod(shape.values()) == devices else f"{math.prod(shape.values()):,}"
    advice = f"a mesh that fits on {where} devices: {flags(shape)} (~{gib(fit_need)} per device)"
  else:  # the one-device mesh is always an option
    shape, least = min(options, key=lambda o: o[1]["total"])
    phase, sequences, length = least["largest_phase"]
    advice = (f"no mesh of up to {MAX_SUGGESTED_DEVICES:,} devices fits it; the least any needs is ~{gib(least['total'])} "
              f"per device ({flags(shape)}, on {math.prod(shape.values()):,} devices; its largest activations are "
              f"the {phase} phase's, {sequences} sequence(s) of {length:,} tokens per device): "
              + (f"lower curriculum.{phase}.batch_size" if sequences > 1 else f"shorten curriculum.{phase}.seq_len")
              + ", or use devices with more memory or a smaller config")
  raise InsufficientMemoryError(
      f"This config needs about {gib(need['total'])} per device to train on mesh {mesh_shape} (state "
      f"{gib(need['state'])}, activations {gib(need['activations'])}, by the estimator), but a device here "
      f"has {gib(have)} available (train.memory_headroom = {config.train.memory_headroom}); {advice}.")


MAX_SUGGESTED_DEVICES = 16384
_TENSOR_WAYS = (1, 2, 3, 4, 6, 8, 9, 12, 16)


def mesh_options(config, backend: str) -> list[tuple[dict, dict]]:
  """Every mesh of up to MAX_SUGGESTED_DEVICES devices this run would accept, with its estimate per device
  (`estimate.training_memory_per_device`).

  Experts split over an expert axis that divides model.moe.num_experts, heads and FFN width over tensor,
  and the rest of the batch's split over fsdp (weights sharded too) or data. `config.mesh.axis_rules` must
  split every phase's batch (with optimizer.grad_accum_steps) evenly and every dimension it shards, and
  expert parallelism on `backend` must be possible.
  """
  from diffmoe_jax import estimate, parallel
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.train.curriculum import Curriculum
  accum = config.optimizer.grad_accum_steps
  batches = [p.batch_size for p in Curriculum(config).phases]
  batch_gcd = math.gcd(*(b // accum for b in batches if b % accum == 0))
  experts = config.model.moe.num_experts if config.model.ffn == "moe" else 1
  rules = parallel.axis_rules(config.mesh)
  boxed = estimate.abstract_state(config)
  options = []
  for split in (s for s in range(1, batch_gcd + 1) if batch_gcd % s == 0):
    for expert in (e for e in range(1, experts + 1) if experts % e == 0 and split % e == 0):
      for tensor in (t for t in _TENSOR_WAYS if split * t <= MAX_SUGGESTED_DEVICES):
        for rest_axis in ("fsdp", "data"):
          shape = {"data": 1, "fsdp": 1, "expert": expert, "tensor": tensor, rest_axis: split // expert}
          if any(b % (accum * parallel.logical_axis_size(shape, rules, "batch")) for b in batches):
            continue
          try:
            parallel.check_expert_parallel(config, shape, backend)
            options.append((shape, estimate.training_memory_per_device(config, shape, boxed)))
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


def summary(config, workdir: str, result: dict, mesh_shape: dict, need: dict, curriculum) -> str:
  import jax
  from diffmoe_jax import estimate
  cfg = config.model
  lines = [
      f"diffmoe_jax: {config.name or 'unnamed config'} -> {workdir}",
      f"  model   {estimate.human(result['total_params'])} parameters, {estimate.human(result['active_params'])}"
      f" active per token with MoD; d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} "
      f"{cfg.attention} heads x {cfg.head_dim}, {cfg.moe.num_experts} experts top-{cfg.moe.top_k} "
      f"({cfg.ffn}), MoD {'every ' + str(cfg.mod.every) + ' at ' + str(cfg.mod.capacity) if cfg.mod.enabled else 'off'}",
      f"  compute {cfg.dtype} (weights {cfg.param_dtype}), {estimate.human(result['train_flops_per_token'])} "
      f"training FLOPs per token at context {cfg.max_seq_len}",
      f"  mesh    {mesh_shape} over {jax.device_count()} {jax.default_backend()} device(s), "
      f"{jax.process_count()} process(es); ~{need['total'] / 2**30:.2f} GiB per device",
      f"  data    {dict(config.data.domains)}, tokenizer {config.data.tokenizer}",
      f"  curriculum {curriculum.total_steps} steps:",
      curriculum.describe(),
  ]
  return "\n".join(lines)


def _remove_if_unused(workdir: str) -> None:
  """Removes `workdir` if it holds nothing but the lock file of the run that created it."""
  from diffmoe_jax.train.workdir import LOCK_NAME
  with contextlib.suppress(OSError):  # holds more, or removed by another process of the run
    if set(os.listdir(workdir)) <= {LOCK_NAME}:
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(workdir, LOCK_NAME))
      os.rmdir(workdir)


def run(config, workdir: str):
  import jax
  from diffmoe_jax import estimate, parallel, validation
  from diffmoe_jax.train import curriculum as curriculum_lib
  from diffmoe_jax.train import loop, workdir as workdir_lib
  validation.validate(config)
  created = not os.path.isdir(os.path.expanduser(workdir))
  workdir = workdir_lib.prepare(workdir)  # before anything slow: a bad workdir fails at once
  try:
    distributed.check_same_run(config, workdir)
    cli.use_compilation_cache(config)
    curriculum = curriculum_lib.Curriculum(config)
    mesh_shape = parallel.mesh_shape(config.mesh, jax.device_count())
    parallel.check_expert_parallel(config, mesh_shape, jax.default_backend())
    loop.check_batch_divisibility(curriculum, config, parallel.logical_axis_size(
        mesh_shape, parallel.axis_rules(config.mesh), "batch"), jax.process_count())
    result = estimate.estimate(config)
    need = check_memory(config, mesh_shape, jax.default_backend())
    lead = jax.process_index() == 0  # in a multi-process run, process 0 alone prints
    if lead:
      print(summary(config, workdir, result, mesh_shape, need, curriculum), flush=True)
    outcome = loop.train(config, workdir)
  except Exception:
    if created:  # a run refused before it saved anything leaves no workdir behind
      _remove_if_unused(workdir)
    raise
  if not lead:
    return outcome
  if outcome.eval:
    print(f"finished at step {outcome.final_step}: validation loss {outcome.eval['loss']:.4f} nats/token")
    for domain in config.data.domains.keys():
      print(f"  {domain}: {outcome.eval[domain + '/bits_per_byte']:.3f} bits/byte "
            f"(unigram baseline {outcome.eval[domain + '/unigram_bits_per_byte']:.3f})")
  print(f"checkpoints: {os.path.join(workdir, 'checkpoints')}; TensorBoard: tensorboard --logdir "
        f"{os.path.join(workdir, 'tb')}")
  return outcome


def main(argv):
  cli.refuse_arguments(argv)
  cli.quiet_library_output()
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.data import DataError
  from diffmoe_jax.train.checkpoint import CheckpointError
  from diffmoe_jax.train.loop import TrainingStopped
  from diffmoe_jax.train.workdir import WorkdirError
  try:
    distributed.initialize_from_flags()  # before any other JAX use; a no-op for a single process
    outcome = run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, InsufficientMemoryError, TrainingStopped, WorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_ERROR)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    cli.exit_now(EXIT_ERROR)
  except KeyboardInterrupt:
    print(f"error: interrupted at once (a second Ctrl-C, or one before training began), so no checkpoint of the "
          f"current step was saved; those saved earlier in "
          f"{os.path.join(os.path.abspath(os.path.expanduser(_WORKDIR.value)), 'checkpoints')}, if any, are intact. "
          "Rerun the same command to resume from the newest.", file=sys.stderr)
    cli.exit_now(EXIT_INTERRUPTED)
  if outcome.stopped is not None:
    sys.exit(EXIT_STOPPED_EARLY)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags(DEFAULT_CONFIG))
