"""The training loop: curriculum, compiled steps, evaluation, checkpoints and metrics (signals: `signals.py`).

`train(config, workdir)` runs the whole curriculum, resuming from the newest readable checkpoint in
`<workdir>/checkpoints`. Each distinct (sequence length, batch, MoD mode and capacity) compiles one step
program, once. The batch of step s is a pure function of (seed, s), so a resumed run continues exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from diffmoe_jax import cli, data, distributed, estimate, parallel, validation
from diffmoe_jax.config import ConfigError
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train import checkpoint, curriculum as curriculum_lib, metrics as metrics_lib, state as state_lib
from diffmoe_jax.train import resume, signals as signals_lib, step as step_lib, workdir as workdir_lib


class TrainingStopped(RuntimeError):
  """Training stopped early (non-finite updates) at `step`; the last good state was checkpointed."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


@dataclasses.dataclass
class RunResult:
  final_step: int
  eval: dict  # "<domain>/loss", "<domain>/bits_per_byte", "<domain>/unigram_bits_per_byte", "loss"; {} if stopped
  stopped: str | None = None  # why the run stopped before the end: "SIGTERM", "SIGINT", "train.run_steps"
  # A SIGTERM or first SIGINT received, also one during the last step, after which the run still finished: a
  # caller that trains several runs stops after this one.
  received_signal: str | None = None
  # Wall seconds of every invocation of this run up to now (each one's training, compiles and evaluations).
  seconds: float = 0.0


class _StepClock:
  """Wall seconds per training step, leaving out compiles, evaluations, checkpoints and other pauses.

  Steps run asynchronously: a step's time is the interval between the host receiving one step's metrics
  and the next one's. A pause first waits for the step in flight, so that step keeps its own time, then
  its duration is taken out of the interval it falls in.
  """

  def __init__(self):
    self._last = time.perf_counter()
    self._paused = 0.0

  @contextlib.contextmanager
  def pause(self, in_flight):
    jax.block_until_ready(in_flight)
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def lap(self) -> float:
    """Seconds of step work since the previous lap."""
    now = time.perf_counter()
    seconds = max(now - self._last - self._paused, 1e-9)
    self._last, self._paused = now, 0.0
    return seconds


def check_batch_divisibility(curriculum, config, dp_size: int, process_count: int) -> None:
  """ConfigError naming the phase if a batch does not split over the data-parallel devices and processes."""
  accum = config.optimizer.grad_accum_steps
  for p in curriculum.phases:
    for divisor, what in ((dp_size, "the mesh's data-parallel size"), (process_count, "the process count"),
                          (accum * dp_size, "optimizer.grad_accum_steps x the data-parallel size")):
      if p.batch_size % divisor:
        raise ConfigError(
            f"config.curriculum.{p.name}: its batch of {p.batch_size} sequences is not a multiple of {what} "
            f"({divisor}); set curriculum.{p.name}.batch_size or curriculum.tokens_per_batch accordingly.")
  if config.train.eval_batch_size % max(dp_size, process_count):
    raise ConfigError(f"config.train.eval_batch_size ({config.train.eval_batch_size}) must be a multiple of the "
                      f"data-parallel size ({dp_size}) and the process count ({process_count}).")


def _phase_seed(seed: int, phase_index: int) -> int:
  return int(np.random.SeedSequence([seed, phase_index]).generate_state(1)[0])


def _phase_datasets(config, curriculum, corpus, process_index: int, process_count: int) -> dict[int, object]:
  """Every phase's batches (grain builds them lazily, so this is cheap), before anything compiles: a phase
  whose data is too small fails at start, not after the phases before it have trained."""
  datasets = {}
  for phase in curriculum.phases:
    p = config.curriculum[phase.name]
    seq_len_from = (f"curriculum.{phase.name}.seq_len" if p.seq_len else
                    f"curriculum.{phase.name}.context_fraction x model.max_seq_len")
    batch_from = (f"curriculum.{phase.name}.batch_size" if p.batch_size else "curriculum.tokens_per_batch / seq_len")
    try:
      datasets[phase.index] = data.train_dataset(
          corpus, seed=_phase_seed(config.seed, phase.index), seq_len=phase.seq_len,
          batch_size=phase.batch_size, domain_weights=dict(phase.domain_weights),
          process_index=process_index, process_count=process_count)
    except data.DataError as e:
      raise data.DataError(f"phase {phase.name} (seq_len {phase.seq_len} from {seq_len_from}, batch "
                           f"{phase.batch_size} from {batch_from}): {e}") from None
  return datasets


def _eval_sets(config, corpus, process_index: int, process_count: int) -> dict[str, list]:
  try:
    return {domain: data.eval_batches(corpus, domain, seq_len=config.model.max_seq_len,
                                      batch_size=config.train.eval_batch_size, num_batches=config.train.eval_batches,
                                      process_index=process_index, process_count=process_count)
            for domain in corpus.domains}
  except data.DataError as e:
    raise data.DataError(f"evaluation (seq_len {config.model.max_seq_len} from model.max_seq_len): {e}") from None


class _Progress:
  """A progress bar on a terminal, plain log lines otherwise."""

  def __init__(self, total: int, initial: int, every: int):
    self.every = every
    self.bar = None
    if sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    self.start_time, self.start_step, self.total = time.time(), initial, total

  def update(self, step: int, info: dict) -> None:
    if self.bar is not None:
      self.bar.update(step + 1 - self.bar.n)
      self.bar.set_postfix(info, refresh=False)
    elif (step + 1) % self.every == 0 or step + 1 == self.total:
      done = step + 1 - self.start_step
      eta = (time.time() - self.start_time) / max(done, 1) * (self.total - step - 1)
      logging.info("step %d/%d %s eta %s", step + 1, self.total,
                   " ".join(f"{k} {v}" for k, v in info.items()), workdir_lib.duration_text(eta))

  def write(self, line: str) -> None:
    (self.bar.write if self.bar is not None else logging.info)(line)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def eval_loss_sums(eval_fn, params, eval_sets: dict[str, list], batch_sharding) -> dict[str, tuple[float, float]]:
  """{name: (sum of token cross-entropies in nats, tokens counted)} of each set's batches, under the mesh.

  eval_fn is `step.make_eval_step`'s, jitted; a batch's "weights" (if any) weigh its tokens (0: padding). A batch's
  result is read after the next batch is dispatched, so the device runs them back to back.
  """
  keys = ("inputs", "targets", "weights", "segment_ids")
  results = ((name, eval_fn(params, parallel.global_batch({k: b[k] for k in keys if k in b}, batch_sharding)))
             for name, batches in eval_sets.items() for b in batches)  # each dispatched when the loop asks for it
  sums, previous = dict.fromkeys(eval_sets, (0.0, 0.0)), next(results, None)
  while previous is not None:
    name, (s, n) = previous
    previous = next(results, None)
    s, n = jax.device_get((s, n))
    sums[name] = (sums[name][0] + float(s), sums[name][1] + float(n))
  return sums


def eval_results(sums: dict[str, tuple[float, float]], bytes_per_token: dict[str, float]) -> dict:
  """"<name>/loss" (nats per token) and "<name>/bits_per_byte" of each set, and "loss" over all their tokens."""
  results = {}
  for name, (loss_sum, tokens) in sums.items():
    results[f"{name}/loss"] = loss_sum / tokens
    results[f"{name}/bits_per_byte"] = loss_sum / tokens / math.log(2) / bytes_per_token[name]
  results["loss"] = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
  return results


def _save_unless_skipping(ckpt: checkpoint.Checkpointer, step: int, state, config, progress: dict) -> None:
  """A periodic save, except while updates are being skipped: rotation then keeps the older checkpoints."""
  streak = int(jax.device_get(state.nonfinite_streak))
  if streak:
    logging.warning("Not saving step %d: the last %d updates were skipped as non-finite.", step, streak)
    return
  ckpt.save(step, state, config, progress=progress)


def train(config: ml_collections.ConfigDict, workdir: str, *, corpus: "data.Corpus | None" = None) -> RunResult:
  """Trains through the curriculum in `workdir` (resuming if it holds a checkpoint).

  The workdir is locked for the run: a second run on it is refused with WorkdirError.
  """
  workdir = workdir_lib.prepare(workdir)
  lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    began = time.perf_counter()
    try:
      result = _train_locked(config, workdir, corpus=corpus)
    finally:  # a stopped or failed invocation's time counts too
      seconds = workdir_lib.add_seconds(workdir, time.perf_counter() - began, write=jax.process_index() == 0)
    return dataclasses.replace(result, seconds=seconds)


def _train_locked(config: ml_collections.ConfigDict, workdir: str, *, corpus: "data.Corpus | None") -> RunResult:
  process_index, process_count = jax.process_index(), jax.process_count()
  checkpoint.check_directory(os.path.join(workdir, "checkpoints"), writable=True)  # before the data is built
  corpus = corpus or data.build_corpus(config.data)
  data.check_separator(corpus.tokenizer, corpus.segment_masking)
  distributed.check_same_data(corpus)
  validation.check_tokenizer_vocab(config, corpus.tokenizer)
  curriculum = curriculum_lib.Curriculum(config)
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.axis_rules(config.mesh)
  dp_size = parallel.data_parallel_size(mesh, rules)
  expert_devices = parallel.logical_axis_size(mesh.shape, rules, "expert") if config.model.ffn == "moe" else 1
  check_batch_divisibility(curriculum, config, dp_size, process_count)
  parallel.check_expert_parallel(config, dict(mesh.shape), jax.default_backend())  # ablate and ncas come here too
  datasets = _phase_datasets(config, curriculum, corpus, process_index, process_count)
  eval_sets = _eval_sets(config, corpus, process_index, process_count)

  model = model_lib.build_model(config.model)
  optimizer = state_lib.make_optimizer(config.optimizer)
  abstract_state, state_shardings, make_state = state_lib.create_state(
      model, optimizer, mesh, rules, seed=config.seed, seq_len=min(p.seq_len for p in curriculum.phases),
      loss_scale_init=config.train.loss_scale_init)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                                 remove_partial_saves=True)  # the workdir's lock makes this run its only writer
  state, start_step, saved_config = resume.restore_or_init(ckpt, config, abstract_state, make_state)
  saved_progress = ckpt.restore_progress(start_step) if start_step else None
  resume.check_data(config, saved_progress, corpus.content, step=start_step, directory=ckpt.directory)
  logged_before = resume.logged_at(start_step, saved_config, saved_progress)
  # The tokens really trained: carried over from the checkpoint, as a resume may change the batch's shape.
  tokens_at_start = (saved_progress or {}).get("tokens_seen", curriculum.tokens_before(start_step))

  def tokens_seen(step: int) -> int:
    return tokens_at_start + curriculum.tokens_before(step) - curriculum.tokens_before(start_step)

  writer = metrics_lib.MetricWriter(os.path.join(workdir, "tb"), enabled=process_index == 0)
  writer.mark_start(start_step)
  if start_step == 0:
    writer.text(0, "config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
  batch_sharding = parallel.batch_sharding(mesh, rules)
  # What a step reads of a batch: the segment ids too when the data has them (data.segment_masking).
  batch_keys = ("inputs", "targets") + (("segment_ids",) if corpus.segment_masking else ())
  batch_shardings = {k: batch_sharding for k in batch_keys}
  scalar = parallel.replicated(mesh)

  compiled: dict[tuple, Callable] = {}
  end_step = min(curriculum.total_steps, start_step + (config.train.run_steps or curriculum.total_steps))
  total_keys = len(curriculum.shape_keys(start_step, end_step))  # the programs this invocation compiles

  def step_fn(settings, *args):
    """The compiled step for `settings`, compiled ahead of time on `args` when first needed."""
    key = settings.shape_key
    if key not in compiled:
      logging.info("Building the train step for seq_len %d, batch %d, MoD %s%s (program %d of %d).",
                   key[0], key[1], key[2], f" at capacity {key[3]:.4f}" if key[2] == "topk" else "",
                   len(compiled) + 1, total_keys)
      fn = step_lib.config_train_step(config, model, optimizer, mod_mode=settings.mod_mode,
                                      mod_capacity=settings.mod_capacity)
      start = time.perf_counter()
      with cli.cache_hits() as hits:
        compiled[key] = jax.jit(fn, in_shardings=(state_shardings, batch_shardings, scalar),
                                out_shardings=(state_shardings, scalar), donate_argnums=0).lower(*args).compile()
      logging.info("Program %d of %d %s in %.1f s.", len(compiled), total_keys,
                   "loaded from the compilation cache" if hits else "compiled", time.perf_counter() - start)
      if mesh.size > 1:  # what each step moves between devices, read off the compiled program
        moved = parallel.collective_summary(compiled[key].as_text())
        logging.info("Collectives per device per step of this program: %s.", moved or "none")
    return compiled[key]

  def batch_for(settings):
    phase = settings.phase
    local = datasets[phase.index][settings.step - phase.start]
    return parallel.global_batch({k: local[k] for k in batch_keys}, batch_sharding)

  eval_fn = jax.jit(step_lib.make_eval_step(model), in_shardings=(state_shardings.params, batch_shardings),
                    out_shardings=(scalar, scalar))

  # The steps whose evaluation and stable ranks are logged (by this run, or by the one that saved start_step).
  logged = {kind: start_step if done else -1 for kind, done in logged_before.items()}

  def evaluate(step: int, log: bool = True) -> dict:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      sums = eval_loss_sums(eval_fn, state.params, eval_sets, batch_sharding)
    results = eval_results(sums, {domain: corpus.bytes_per_token(domain, "val") for domain in sums})
    results.update({f"{domain}/unigram_bits_per_byte": corpus.unigram_bits_per_byte(domain) for domain in sums})
    if log:
      writer.scalars(step, {f"eval/{k}": v for k, v in results.items()})
      logged["eval"] = step
    return results

  def periodic_logs(step: int) -> None:
    """The stable ranks and evaluation due at `step` (and not logged yet), before its periodic save."""
    nonlocal last_eval
    if step % config.train.stable_rank_every == 0 and logged["stable_ranks"] != step:
      with clock.pause(state):
        writer.scalars(step, metrics_lib.stable_ranks(state.params))
      logged["stable_ranks"] = step
    if step % config.train.eval_every == 0 and step < curriculum.total_steps and logged["eval"] != step:
      with clock.pause(state):
        last_eval = evaluate(step)
      progress.write(f"step {step} eval: loss {last_eval['loss']:.4f}, "
                     + ", ".join(f"{d} {last_eval[d + '/bits_per_byte']:.3f} bpb" for d in corpus.domains))

  def saved_progress_at(step: int) -> dict:
    return {"tokens_seen": tokens_seen(step), "evaluated": logged["eval"] == step,
            "stable_ranks": logged["stable_ranks"] == step, "data": corpus.content}

  peak = metrics_lib.peak_flops(config.train.peak_flops_per_device)
  param_counts = estimate.count_params(config.model)  # for each logged step's FLOPs, hence MFU
  progress = _Progress(curriculum.total_steps, start_step, config.train.log_every)
  last_eval: dict = {}
  pending = None  # the previous step's metrics, fetched after the next step is dispatched
  stopped_by = None
  clock = _StepClock()

  def finish_step(item):
    """Host side of a finished step: logging and metrics; True when the non-finite guard stops the run."""
    step, settings, metrics, timed = item
    metrics = jax.device_get(metrics)
    seconds = clock.lap()
    tokens = settings.phase.batch_size * settings.phase.seq_len
    info = {"phase": settings.phase.name, "loss": f"{float(metrics['loss']):.4f}"}
    if timed:
      info["tok/s"] = f"{tokens / seconds:,.0f}"
    progress.update(step, info)
    if (step + 1) % config.train.log_every == 0 or step + 1 == curriculum.total_steps:
      scalars = metrics_lib.step_scalars(metrics, config.model, expert_devices, settings.mod_mode != "off")
      scalars.update({"train/phase": settings.phase.index, "train/tokens_seen": tokens_seen(step + 1),
                      "train/seq_len": settings.phase.seq_len, "train/batch_size": settings.phase.batch_size,
                      "train/mod_capacity": settings.mod_capacity})
      if timed:
        scalars.update({"train/tokens_per_second": tokens / seconds, "train/step_seconds": seconds})
      if timed and peak > 0:
        flops = estimate.train_flops_per_token(config.model, param_counts, settings.phase.seq_len,
                                               mod_mode=settings.mod_mode, mod_capacity=settings.mod_capacity)
        scalars["train/mfu"] = flops * tokens / seconds / peak
      writer.scalars(step + 1, scalars)
      if config.model.ffn == "moe":  # a dense FFN has no experts to load
        for l, load in enumerate(np.asarray(metrics["layers"]["expert_load"])):
          writer.histogram(step + 1, f"moe/layer{l}/expert_load", load)
    if int(metrics["update_skipped"]) and not int(metrics.get("overflow_skipped", 0)):  # an overflow: in metrics
      progress.write(f"step {step + 1}: non-finite loss or gradient; update skipped "
                     f"({int(metrics['nonfinite_total'])} so far).")
    streak = int(metrics["nonfinite_streak"])
    if streak >= config.train.max_nonfinite_in_a_row and not guard_stop:
      guard_stop.update(step=step + 1, streak=streak)
    return streak >= config.train.max_nonfinite_in_a_row

  diverged, guard_stop = False, {}  # guard_stop: the step at which the non-finite guard stopped, and its streak
  try:
    with signals_lib.StopSignals() as signals, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      step = start_step
      if start_step:  # the ones due at the checkpoint's step that its run stopped before logging
        periodic_logs(start_step)
      while step < end_step:
        settings = curriculum.settings(step)
        batch = batch_for(settings)
        # Host scalars: the step's call transfers them (a device array made for each cost 60-70 µs of host time).
        dyn = {k: np.float32(v) for k, v in step_lib.dynamic_settings(settings).items()}
        # A program's first run also loads it (10-100x a step on XLA:CPU), so that step's speed is not logged,
        # and its compile and dispatch are left out of the step before.
        timed = settings.shape_key in compiled
        if timed:
          state, metrics = compiled[settings.shape_key](state, batch, dyn)
        else:
          with clock.pause(state):
            state, metrics = step_fn(settings, state, batch, dyn)(state, batch, dyn)
        if pending is not None and finish_step(pending):
          diverged = True
        pending = (step, settings, metrics, timed)
        step += 1
        ckpt.check()  # a failed background save stops the run now, not a save later
        if diverged:
          break
        due = step % config.train.stable_rank_every == 0 or step % config.train.eval_every == 0
        if due and step < curriculum.total_steps:
          # A pending signal saves first (evaluating can outlast a preemption's grace period); the resumed run
          # logs what is due here. The last step's are logged anyway: nothing is left to resume.
          stopped_by = signals.check()
          if stopped_by is not None:
            break
        periodic_logs(step)
        # The last step is saved after the final evaluation (below), as a periodic step is after its own: a run
        # killed during that evaluation resumes from its previous checkpoint and logs it, rather than finding the
        # run done with the evaluation never logged.
        if step % config.train.checkpoint_every == 0 and step < curriculum.total_steps:
          with clock.pause(state):
            _save_unless_skipping(ckpt, step, state, config, saved_progress_at(step))
        stopped_by = signals.check()
        if stopped_by is not None:
          break
      # The last dispatched step is always reported, so TensorBoard ends at the saved state's counts.
      if pending is not None:
        diverged = finish_step(pending) or diverged
      signals.check()
      if step >= curriculum.total_steps:
        stopped_by = None  # a signal during the last step: nothing is left to resume, so the run finishes
      elif stopped_by is None:
        stopped_by = "train.run_steps"
      progress.close()

      # Still under the signal handlers: a signal now waits for the final evaluation and checkpoint.
      final_step = int(jax.device_get(state.step))
      if diverged:  # saved with nothing logged at final_step: the rerun logs it
        ckpt.save(final_step, state, config, force=True, progress=saved_progress_at(final_step))
        ckpt.wait()
        fixes = ["optimizer.peak_lr (lower)", "optimizer.grad_clip"] + (
            ["model.dtype ('float32')"] if config.model.dtype != "float32" else [])
        raise TrainingStopped(
            f"{guard_stop['streak']} non-finite updates in a row up to step {guard_stop['step']} "
            f"(train.max_nonfinite_in_a_row is {config.train.max_nonfinite_in_a_row}): training stopped. "
            "Skipped updates never touch the weights, "
            f"so the checkpoint at step {final_step} in {ckpt.directory} holds the last good state. Change "
            f"{', '.join(fixes)} and rerun to resume, allowing the change with "
            "--config.train.allow_config_change=<field>.", final_step)
      if stopped_by is None:
        # A rerun of a finished run evaluates again, but its evaluation is logged already; a run whose curriculum
        # was shortened to its checkpoint's step, or that the non-finite guard stopped there, may not have.
        last_eval = evaluate(final_step, log=logged["eval"] != final_step)
      ckpt.save(final_step, state, config, force=True, progress=saved_progress_at(final_step))
      ckpt.close()
  finally:
    progress.close()
    writer.close()
  if stopped_by is not None:
    logging.warning("Stopped by %s at step %d of %d; the checkpoint is in %s. Rerun the same command to resume.",
                    stopped_by, final_step, curriculum.total_steps, ckpt.directory)
    last_eval = {}
  return RunResult(final_step=final_step, eval=last_eval, stopped=stopped_by, received_signal=signals.received_name)
