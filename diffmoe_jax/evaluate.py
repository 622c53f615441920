"""Evaluate a checkpoint: loss, perplexity and bits per byte per validation domain and on text files.

    python -m diffmoe_jax.evaluate --workdir=runs/tiny
    python -m diffmoe_jax.evaluate --workdir=runs/tiny --step=200 --json notes.txt other.txt

The config is the one saved with the checkpoint unless `--config` is given (then it must match the
checkpoint's, as for resuming). Each domain is evaluated on `train.eval_batches` batches of its validation
split at `model.max_seq_len`, as the trainer does; each file on all of its tokens, in windows of
`model.max_seq_len`. Mixture-of-depths is routed by its causal predictor and the MoE dispatches by
`model.moe.eval_dispatch` (the inference mode). Exit code 1 with one line on stderr for a mistake.
"""
from __future__ import annotations

import json
import math
import os
import sys

from diffmoe_jax import cli


def define_checkpoint_flags() -> dict:
  """--config, --workdir and --step (shared with `generate`). Defined when run as a program, not at
  import, so that importing a module never claims the flags."""
  from absl import flags
  return {"config": cli.define_config_flag(None, "A config file; default: the config saved with the checkpoint."),
          "workdir": flags.DEFINE_string("workdir", None, "The training run's directory (holding checkpoints/)."),
          "step": flags.DEFINE_integer("step", None, "The checkpoint's step; default: the newest.")}


def _define_flags() -> dict:
  from absl import flags
  return {**define_checkpoint_flags(),
          "json": flags.DEFINE_bool("json", False, "Print the results as one JSON object."),
          "domains": flags.DEFINE_bool("domains", True, "Evaluate the config's validation domains "
                                       "(--nodomains: only the files given)."),
          "eval_batches": flags.DEFINE_integer("eval_batches", None, "Batches per domain; default: "
                                               "train.eval_batches.", lower_bound=1)}


_READ_ATTEMPTS = 5  # newest checkpoints that may be deleted mid-read (by a run still training) before giving up


def restore_params(workdir: str, config=None, step: int | None = None):
  """(config, params on the config's mesh, step) of the checkpoint at `step` (the newest by default).

  Raises CheckpointError when there is none or it cannot be restored, ConfigError when `config` does not
  match the saved one. Reads only: nothing in the workdir changes. A run still training in the workdir
  may delete a checkpoint while it is read (it keeps the newest `train.keep_checkpoints`): then the newest
  one is read again, or, for a `step` asked for, the error says so.
  """
  from diffmoe_jax.train import checkpoint, workdir as workdir_lib
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
  train_hint = f"train one with python -m diffmoe_jax.main --workdir={workdir}"
  if not os.path.isdir(directory):
    run, part = workdir_lib.run_holding(os.path.dirname(directory))
    if run is not None:
      raise checkpoint.CheckpointError(f"{workdir} lies in the {part} of the run in {run}; pass the run's own "
                                       f"directory, --workdir={run}.")
    raise checkpoint.CheckpointError(_no_checkpoints(workdir, os.path.dirname(directory), train_hint))
  ckpt = checkpoint.Checkpointer(directory, async_save=False)
  for _ in range(_READ_ATTEMPTS):
    steps = ckpt.reload()
    if not steps:
      raise checkpoint.CheckpointError(f"There is no checkpoint in {directory}; {train_hint}.")
    if step is not None and step not in steps:
      raise checkpoint.CheckpointError(f"There is no checkpoint at step {step} in {directory}; its steps are "
                                       f"{', '.join(map(str, steps))}.")
    chosen = steps[-1] if step is None else step
    try:
      return _restore_step(ckpt, chosen, steps, config)
    except checkpoint.CheckpointError:
      if os.path.isdir(os.path.join(directory, str(chosen))):
        raise
    removed = (f"The checkpoint at step {chosen} in {directory} was deleted while it was being read, by the run "
               f"training in {workdir} (it keeps its newest train.keep_checkpoints)")
    if step is not None:
      raise checkpoint.CheckpointError(f"{removed}; pass a newer --step, or none for the newest.")
  raise checkpoint.CheckpointError(f"{removed}, {_READ_ATTEMPTS} times in a row; rerun once that run has "
                                   "finished, or train it with a larger train.keep_checkpoints.")


def _no_checkpoints(workdir: str, path: str, train_hint: str) -> str:
  """Why the workdir `workdir` (absolute: `path`) has no checkpoints directory: it does not exist, or it holds
  runs (an ablation's or a search's workdir, or a directory of runs) whose own directories to pass are named."""
  from diffmoe_jax.train import workdir as workdir_lib
  if not os.path.isdir(path):
    where = cli.relative_to_cwd(os.path.expanduser(workdir))
    if os.path.exists(path):
      return f"{workdir}{where} is a file, not a directory; pass the training run's --workdir."
    return f"there is no directory {workdir}{where}; pass the training run's --workdir."
  runs = []
  for root, dirs, _ in os.walk(path):
    if "checkpoints" in dirs:
      runs.append(os.path.relpath(root, path))
      dirs.clear()
    dirs[:] = sorted(d for d in dirs if os.path.relpath(os.path.join(root, d), path).count(os.sep) < 3)
  checkpoints = os.path.join(path, "checkpoints")
  if not runs and os.path.exists(checkpoints):
    return f"{checkpoints} is a file, not the run's checkpoints directory; pass the training run's --workdir."
  report = None if runs else workdir_lib.report_in(path)
  if report:
    what, command = report
    return (f"{workdir} holds {what}, not a training run; pass the --workdir of one of the {command}'s runs, which "
            f"evaluate names when given the {command}'s --workdir.")
  if not runs:
    return f"{workdir} holds no checkpoints (there is no {checkpoints}); {train_hint}."
  runs.sort(key=lambda run: (run.count(os.sep), run))
  named = ", ".join(os.path.join(workdir, r) for r in runs[:4])
  named += f" and {len(runs) - 4} more" if len(runs) > 4 else ""
  return (f"{workdir} is not a run's directory but holds runs: {named}; pass one of them, such as "
          f"--workdir={os.path.join(workdir, runs[0])}.")


def _restore_step(ckpt, step: int, steps: list[int], config):
  """restore_params for one saved step of `ckpt` (`steps`: all its saved steps)."""
  from absl import logging
  from diffmoe_jax import config as config_lib, parallel, validation
  from diffmoe_jax.nn import model as model_lib
  from diffmoe_jax.train import checkpoint, resume, state as state_lib
  directory = ckpt.directory
  if not os.path.isdir(os.path.join(directory, str(step), "state")):  # a save cut short where renames are not atomic
    earlier = [s for s in steps if s < step]
    raise checkpoint.CheckpointError(
        f"The checkpoint at step {step} in {directory} is incomplete (it has no state: a save cut short); "
        + (f"pass --step={earlier[-1]} for the one before it, or remove {os.path.join(directory, str(step))}."
           if earlier else f"remove {os.path.join(directory, str(step))} and train the run again."))
  try:
    saved_config = ckpt.restore_config(step)
  except FileNotFoundError as e:
    if config is None:
      raise checkpoint.CheckpointError(f"{e} Pass the run's config with --config.") from None
    saved_config = None
  except Exception as e:  # pylint: disable=broad-except  (a damaged config file: Orbax's or the JSON parser's error)
    if config is None:
      raise checkpoint.CheckpointError(f"The config saved with the checkpoint at step {step} in {directory} cannot "
                                       f"be read ({type(e).__name__}); pass the run's config with --config.") from None
    logging.warning("The config saved at step %d cannot be read (%s); using --config.", step, type(e).__name__)
    saved_config = None
  if saved_config is not None:  # fields added to the code since the save take their defaults
    saved_config, added = config_lib.with_defaults(saved_config)
    if added:
      logging.warning("The config saved at step %d predates %s; using %s.", step, ", ".join(added),
                      "its default" if len(added) == 1 else "their defaults")
  config = _fit_mesh(saved_config, step) if config is None else config
  validation.validate(config)
  cli.use_compilation_cache(config)
  model = model_lib.build_model(config.model)
  mesh, rules = parallel.make_mesh(config.mesh), parallel.axis_rules(config.mesh)
  abstract_state, _, _ = state_lib.create_state(model, state_lib.make_optimizer(config.optimizer), mesh, rules,
                                                seed=config.seed, seq_len=config.model.max_seq_len)
  resume.check(config, saved_config=saved_config, saved_shapes=ckpt.saved_shapes(step),
               abstract_state=abstract_state, step=step, directory=directory, training=False)
  problem, state = ckpt.restore_verified(step, abstract_state)
  if problem is not None:
    older = [s for s in steps if s < step]
    raise checkpoint.CheckpointError(f"The checkpoint at step {step} in {directory} cannot be used: {problem}."
                                     + (f" Pass --step={older[-1]} for the previous one." if older else ""))
  return config, state.params, step


def _fit_mesh(saved_config, step: int):
  """The saved config, its mesh.shape made fsdp=-1 if it does not fit this machine's devices (a run trained
  on a larger slice): the mesh sets only where arrays live, so the results stay the same."""
  import jax
  from absl import logging
  from diffmoe_jax import parallel
  from diffmoe_jax.config import ConfigError
  try:
    parallel.mesh_shape(saved_config.mesh, jax.device_count())
    return saved_config
  except ConfigError:
    pass
  config = saved_config.copy_and_resolve_references()
  config.mesh.shape = {**dict.fromkeys(config.mesh.shape, 1), "fsdp": -1}
  logging.warning("The mesh.shape saved at step %d, %s, does not fit the %d devices here; reading the checkpoint "
                  "with mesh.shape fsdp=-1 (the results do not depend on the mesh).", step,
                  saved_config.mesh.shape.to_dict(), jax.device_count())
  return config


def file_batches(tokens, *, seq_len: int, batch_size: int) -> list[dict]:
  """Every token of a stream as targets once: windows of seq_len + 1 with stride seq_len, the last one
  and the last batch padded with weight 0."""
  import numpy as np
  starts = range(0, len(tokens) - 1, seq_len)
  rows = -(-len(starts) // batch_size) * batch_size
  window = np.zeros((rows, seq_len + 1), np.int32)
  weights = np.zeros((rows, seq_len), np.float32)
  for row, start in enumerate(starts):
    chunk = tokens[start:start + seq_len + 1]
    window[row, :len(chunk)] = chunk
    weights[row, :len(chunk) - 1] = 1.0
  return [{"inputs": window[i:i + batch_size, :-1], "targets": window[i:i + batch_size, 1:],
           "weights": weights[i:i + batch_size]} for i in range(0, rows, batch_size)]


def pad_rows(batch: dict, rows: int) -> dict:
  """`batch` with `rows` more rows of zeros, weighted 0 so that they count no token (unchanged if 0)."""
  if not rows:
    return batch
  import numpy as np
  arrays = {k: batch[k] for k in ("inputs", "targets", "segment_ids") if k in batch}
  arrays["weights"] = batch.get("weights", np.ones(batch["targets"].shape, np.float32))
  return {k: np.concatenate([v, np.zeros((rows,) + v.shape[1:], v.dtype)]) for k, v in arrays.items()}


def read_text_files(paths: list[str], tokenizer) -> dict[str, tuple]:
  """{path: (tokens, bytes per token)}; a missing, unreadable or too short file is a DataError."""
  import numpy as np
  from diffmoe_jax.data import DataError
  from diffmoe_jax.data.sources import read_utf8
  from diffmoe_jax.data.tokenizer import check_no_separator
  out = {}
  for path in paths:
    if os.path.isdir(path):
      raise DataError(f"{path} is a directory; name the text files in it, such as {os.path.join(path, '*.txt')}.")
    if os.path.exists(path) and not os.path.isfile(path):
      raise DataError(f"{path} is not a regular file (a device or a pipe); name a text file.")
    if not os.path.isfile(path):
      raise DataError(f"there is no text file {path}{cli.relative_to_cwd(path)}.")
    text = read_utf8(path, field="a file to evaluate", omit="leave it off the command line")
    check_no_separator(tokenizer, text, path, field="a file to evaluate")
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    if len(tokens) < 2:
      raise DataError(f"{path} has {len(tokens)} token(s): at least 2 are needed to predict one.")
    out[path] = (tokens, len(text.encode("utf-8")) / len(tokens))
  return out


def evaluate(config, params, *, files: list[str] = (), domains: bool = True, eval_batches: int | None = None) -> dict:
  """{"domains": {name: {loss, perplexity, bits_per_byte, unigram_bits_per_byte}}, "files": {path: {loss,
  perplexity, bits_per_byte}}, "loss": over the domains' tokens} (nats per token)."""
  import flax.linen as nn
  import jax
  from diffmoe_jax import config as config_lib, data, parallel, validation
  from diffmoe_jax.nn import model as model_lib
  from diffmoe_jax.train import loop, step as step_lib
  tokenizer = data.make_tokenizer(config.data.tokenizer)
  validation.check_tokenizer_vocab(config, tokenizer)
  texts = read_text_files(list(files), tokenizer)  # a bad file fails at once
  try:
    corpus = data.build_corpus(config.data) if domains else None
  except data.DataError as e:  # the run's data, named by the config saved with it: no file the user can edit
    raise data.DataError(f"{e.args[0].rstrip('.')}. The validation domains are the run's config.data.domains: "
                         "put their files back, pass --nodomains to evaluate only the files named, or pass --config "
                         "with the domains where they are now and --config.train.allow_config_change=data.domains."
                         ) from None
  mesh, rules = parallel.make_mesh(config.mesh), parallel.axis_rules(config.mesh)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  seq_len, batch_size = config.model.max_seq_len, config.train.eval_batch_size
  split = max(parallel.data_parallel_size(mesh, rules), jax.process_count())
  pad = -batch_size % split  # rows that count no token, so that every device gets as many (one process)
  if pad and jax.process_count() > 1:
    raise config_lib.ConfigError(
        f"config.train.eval_batch_size ({batch_size}) is not a multiple of the {split} ways this machine's mesh "
        "splits a batch; pass --config=<the run's config> with --config.train.eval_batch_size=<a multiple>.")
  if pad:
    from absl import logging
    logging.info("config.train.eval_batch_size (%d) does not split %d ways: each batch gets %d rows that count "
                 "no token.", batch_size, split, pad)
  _check_memory(config, params, -(-batch_size // split), parallel.logical_axis_size(dict(mesh.shape), rules, "heads"))
  eval_step = step_lib.make_eval_step(model_lib.build_model(config.model))
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  jitted = {}

  def eval_fn(p, batch):  # one program per batch layout (with or without weights)
    key = tuple(sorted(batch))
    if key not in jitted:
      jitted[key] = jax.jit(eval_step, in_shardings=(param_shardings, {k: batch_sharding for k in key}))
    return jitted[key](p, batch)

  results = {"domains": {}, "files": {}}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if domains:
      sets = {domain: [pad_rows(b, pad) for b in data.eval_batches(
                  corpus, domain, seq_len=seq_len, batch_size=batch_size,
                  num_batches=eval_batches or config.train.eval_batches)] for domain in corpus.domains}
      sums = loop.eval_loss_sums(eval_fn, params, sets, batch_sharding)
      summary = loop.eval_results(sums, {d: corpus.bytes_per_token(d, "val") for d in sums})
      results["loss"] = summary["loss"]
      for domain in sums:
        results["domains"][domain] = _entry(summary, domain)
        results["domains"][domain]["unigram_bits_per_byte"] = corpus.unigram_bits_per_byte(domain)
    if texts:
      sets = {path: [pad_rows(b, pad) for b in file_batches(tokens, seq_len=seq_len, batch_size=batch_size)]
              for path, (tokens, _) in texts.items()}
      sums = loop.eval_loss_sums(eval_fn, params, sets, batch_sharding)
      summary = loop.eval_results(sums, {path: bpt for path, (_, bpt) in texts.items()})
      results["files"] = {path: _entry(summary, path) for path in sums}
  return results


def _check_memory(config, params, rows_per_device: int, tensor: int) -> None:
  """ConfigError naming train.eval_batch_size if a device cannot hold its part of an evaluation batch's
  activations (`memory.eval_activation_bytes`) beside its shard of the weights (with train.memory_check on): a
  batch far too large ran out of memory, or failed to allocate its windows on the host, with a traceback."""
  import jax
  from diffmoe_jax import estimate, memory
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.train import preflight
  seq_len = config.model.max_seq_len
  need = memory.eval_activation_bytes(config.model, rows_per_device, seq_len, tensor=tensor)
  need += sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
  have = preflight.available_bytes_per_device()
  if config.train.memory_check and need > config.train.memory_headroom * have:
    raise ConfigError(f"config.train.eval_batch_size: {config.train.eval_batch_size:,} sequences of {seq_len:,} tokens "
                      f"need about {estimate.human_bytes(need)} per device with the weights, but a device here has "
                      f"{estimate.human_bytes(have)} available (train.memory_headroom = {config.train.memory_headroom})"
                      "; pass --config.train.eval_batch_size=<fewer>.")


def _entry(summary: dict, name: str) -> dict:
  loss = summary[f"{name}/loss"]
  return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": summary[f"{name}/bits_per_byte"]}


def report(results: dict, step: int, workdir: str) -> str:
  lines = [f"checkpoint at step {step} in {workdir}:"]
  rows = list(results["domains"].items()) + list(results["files"].items())
  width = max([len(name) for name, _ in rows] + [6])
  lines.append(f"  {'':<{width}}  {'loss':>8}  {'ppl':>9}  {'bits/byte':>9}  {'unigram':>8}")
  for name, r in rows:
    unigram = f"{r['unigram_bits_per_byte']:8.3f}" if "unigram_bits_per_byte" in r else f"{'':8}"
    lines.append(f"  {name:<{width}}  {r['loss']:8.4f}  {r['perplexity']:9.3f}  {r['bits_per_byte']:9.3f}  {unigram}")
  if "loss" in results:
    lines.append(f"  validation loss over the domains: {results['loss']:.4f} nats/token")
  return "\n".join(lines)


def require_workdir(workdir: str | None) -> str:
  from diffmoe_jax.config import ConfigError
  if not (workdir or "").strip():  # blank, as main's workdir.prepare reads it: not a directory named " "
    raise ConfigError("--workdir is required: the training run's directory, e.g. --workdir=runs/tiny.")
  return workdir


def _main(argv, flag: dict):
  cli.quiet_library_output()
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.data import DataError
  from diffmoe_jax.train.checkpoint import CheckpointError
  files = argv[1:]
  try:
    workdir = require_workdir(flag["workdir"].value)
    if not files and not flag["domains"].value:
      raise ConfigError("--nodomains leaves nothing to evaluate: name text files to evaluate.")
    if flag["eval_batches"].value is not None and not flag["domains"].value:
      raise ConfigError("--eval_batches sets the batches per validation domain, and --nodomains evaluates none "
                        "(files are evaluated whole); drop one of the two.")
    config, params, step = restore_params(workdir, flag["config"].value, flag["step"].value)
    results = evaluate(config, params, files=files, domains=flag["domains"].value,
                       eval_batches=flag["eval_batches"].value)
  except (ConfigError, DataError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  results["step"] = step
  print(json.dumps(results, indent=2) if flag["json"].value else report(results, step, workdir))


if __name__ == "__main__":
  from absl import app
  _FLAGS = _define_flags()
  app.run(cli.interruptible(lambda argv: _main(argv, _FLAGS)), flags_parser=cli.parse_flags(None))
