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

import os
import sys

from absl import app, flags

from diffmoe_jax import cli, distributed  # distributed: its flags (--coordinator_address, ...) are main's

DEFAULT_CONFIG = "configs/tiny.py"
EXIT_ERROR, EXIT_STOPPED_EARLY, EXIT_INTERRUPTED = 1, 3, 130

_CONFIG = cli.define_config_flag(DEFAULT_CONFIG, "Path to a config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints and TensorBoard logs.")
flags.adopt_module_key_flags(distributed)  # --help lists them with main's own


def summary(config, workdir: str, result: dict, mesh_shape: dict, need: dict, curriculum) -> str:
  import jax
  from diffmoe_jax import estimate
  cfg = config.model
  lines = [
      f"diffmoe_jax: {config.name or 'unnamed config'} -> {workdir}",
      f"  model   {estimate.human(result['total_params'])} parameters, {estimate.human(result['active_params'])}"
      f" active per token with MoD; d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} "
      f"{cfg.attention} heads x {cfg.head_dim}, {estimate.ffn_description(cfg)}, "
      f"MoD {estimate.mod_description(cfg)}",
      f"  compute {cfg.dtype} (weights {cfg.param_dtype}), {estimate.human(result['train_flops_per_token'])} "
      f"training FLOPs per token at context {cfg.max_seq_len}",
      f"  mesh    {mesh_shape} over {jax.device_count()} {jax.default_backend()} device(s), "
      f"{jax.process_count()} process(es); ~{estimate.human_bytes(need['total'])} per device",
      f"  data    {dict(config.data.domains)}, tokenizer {config.data.tokenizer}",
      f"  curriculum {curriculum.total_steps} steps:",
      curriculum.describe(),
  ]
  return "\n".join(lines)


def run(config, workdir: str):
  import jax
  from diffmoe_jax import data, estimate, parallel, validation
  from diffmoe_jax.train import curriculum as curriculum_lib
  from diffmoe_jax.train import loop, preflight, workdir as workdir_lib
  validation.validate(config)
  created = workdir_lib.first_missing(workdir)
  workdir = workdir_lib.prepare(workdir)  # before anything slow: a bad workdir fails at once
  # Removed if the run saves nothing, by process 0 alone in a multi-process run (the others may still write there),
  # also when another process stops this one (which then exits at once, after the others).
  created = created if jax.process_index() == 0 else None
  if created:
    distributed.clean_up_on_leaving(lambda: workdir_lib.remove_if_unused(workdir, created))
  # A run refused or interrupted before it saved anything leaves no workdir behind.
  with workdir_lib.removed_unless_used(workdir, created):
    workdir_lib.check_contents(workdir, "a training run")
    distributed.check_same_run(config, workdir)
    cli.use_compilation_cache(config)
    curriculum = curriculum_lib.Curriculum(config)
    mesh_shape = parallel.mesh_shape(config.mesh, jax.device_count())
    parallel.check_expert_parallel(config, mesh_shape, jax.default_backend())
    loop.check_batch_divisibility(curriculum, config, parallel.logical_axis_size(
        mesh_shape, parallel.axis_rules(config.mesh), "batch"), jax.process_count())
    data.check_sources(config.data)  # a missing file, a bad tokenizer or cache dir before the summary, not after
    result = estimate.estimate(config)
    need = preflight.check_memory(config, mesh_shape, jax.default_backend())
    lead = jax.process_index() == 0  # in a multi-process run, process 0 alone prints
    if lead:  # a workdir another run holds is refused before the summary, not after it (loop.train locks it)
      workdir_lib.WorkdirLock(workdir).acquire().release()
      print(summary(config, workdir, result, mesh_shape, need, curriculum), flush=True)
    outcome = loop.train(config, workdir)
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
  from diffmoe_jax import validation
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.data import DataError
  from diffmoe_jax.train.checkpoint import CheckpointError
  from diffmoe_jax.train.loop import TrainingStopped
  from diffmoe_jax.train.preflight import InsufficientMemoryError
  from diffmoe_jax.train.workdir import WorkdirError
  try:
    validation.validate(_CONFIG.value)  # before joining: an invalid config stops every process at once
    distributed.initialize_from_flags()  # before any other JAX use; a no-op for a single process
    outcome = run(_CONFIG.value, _WORKDIR.value)
  except distributed.DistributedError as e:  # every process of the run raises it alike
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_ERROR)
  # In a multi-process run an error may stop this process alone: stop_run stops the others too, with its line.
  except (ConfigError, DataError, InsufficientMemoryError, TrainingStopped, WorkdirError) as e:
    distributed.stop_run(f"error: {e}", EXIT_ERROR)
  except CheckpointError as e:
    distributed.stop_run(f"error: {e}", EXIT_ERROR, at_once=True)
  except KeyboardInterrupt:  # the other processes of a run stop too, saying that this one was interrupted
    distributed.stop_run(
        f"error: interrupted at once (a second Ctrl-C, or one before training began), so no checkpoint of the "
        f"current step was saved; those saved earlier in "
        f"{os.path.join(os.path.abspath(os.path.expanduser(_WORKDIR.value)), 'checkpoints')}, if any, are intact. "
        "Rerun the same command to resume from the newest.", EXIT_INTERRUPTED, at_once=True)
  if outcome.stopped is not None:
    sys.exit(EXIT_STOPPED_EARLY)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags(DEFAULT_CONFIG, on_error=distributed.tell_others_before_joining))
