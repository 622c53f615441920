"""Resuming: the config and state layout a checkpoint was saved with, against the ones a run resumes with, and
the restore of the newest checkpoint that passes that check.

Checked before any array is restored. A different state layout (a changed model shape) is an error that
names the fields and arrays that differ. Other config changes are errors too unless
`train.allow_config_change` lists them; `name`, `train.*`, `mesh.*`, where the token cache lives and the
fields of how attention, the MoE layer, remat, the weights' casts and the loss's logits run (FREE_FIELDS)
change bookkeeping, the device layout, the speed or the memory, not what is trained, and may always change.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import jax
from absl import logging

from diffmoe_jax import config as config_lib
from diffmoe_jax.config import ConfigError
from diffmoe_jax.train import checkpoint, state as state_lib

# May change on resume: bookkeeping, the mesh, and how attention, the MoE layer, remat, the weights' casts and
# the loss's logits compute the same function. The token cache's directory is bookkeeping too: the cache is
# keyed by the data it holds, not by where it lives.
FREE_FIELDS = ("name", "train", "mesh", "data.cache_dir", "model.attention_impl", "model.attention_block_q",
               "model.attention_block_k", "model.attention_gpu_backward", "model.attention_gpu_launch",
               "model.attention_gpu_forward", "model.moe.expert_parallel", "model.moe.dropless_impl",
               "model.remat_policy", "model.remat_save_names", "model.cast_weights_once", "model.logits_chunk_len")


def _normalised(config) -> dict:
  """Plain JSON values (tuples as lists, as the saved JSON has them)."""
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(config))


_MISSING = object()


def differences(saved: Mapping, current: Any) -> list[tuple[str, Any, Any]]:
  """[(dotted field path, saved value, current value)] for every field that differs (missing: `<absent>`)."""
  old, new = config_lib.flat_fields(_normalised(saved)), config_lib.flat_fields(_normalised(current))
  out = []
  for path in sorted(set(old) | set(new)):
    a, b = old.get(path, _MISSING), new.get(path, _MISSING)
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
      out.append((path, a, b))
  return out


# A finished run's result stays valid when only these differ: FREE_FIELDS, less the training section's fields
# that shape what the run trained or reported (evaluation batches, logged steps, loss scaling).
RESULT_FREE_FIELDS = tuple(f for f in FREE_FIELDS if f != "train") + (
    "train.run_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.memory_headroom",
    "train.peak_flops_per_device", "train.compilation_cache_dir", "train.allow_config_change")


def changed_fields(saved: Mapping, current: Any) -> list[tuple[str, Any, Any]]:
  """`differences` that make a finished run's result (which a rerun reuses rather than resumes) another
  config's: in fields both configs have (one only one side has was added or dropped by the code since) and
  not in RESULT_FREE_FIELDS."""
  return [d for d in differences(saved, current)
          if d[1] is not _MISSING and d[2] is not _MISSING and not config_lib.path_matches(d[0], RESULT_FREE_FIELDS)]


def _show(value: Any) -> str:
  text = "<absent>" if value is _MISSING else json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
  return ", ".join(f"{path} {_show(a)} -> {_show(b)}" for path, a, b in diffs)


def shape_differences(saved: Mapping[str, tuple], abstract_state: Any) -> list[str]:
  """Arrays whose shape or dtype differs between a saved state layout and `abstract_state`, described."""
  current = {jax.tree_util.keystr(p, simple=True, separator="/"): (tuple(x.shape), str(x.dtype))
             for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  out = []
  for path in sorted(set(saved) | set(current), key=lambda p: (not p.startswith("params/"), p)):  # weights first
    a, b = saved.get(path), current.get(path)
    if a != b:
      show = lambda s: "absent" if s is None else f"{s[1]}{list(s[0])}"
      out.append(f"{path} saved {show(a)}, now {show(b)}")
  return out


def check_data(config, progress: Mapping | None, content: dict[str, str], *, step: int, directory: str) -> None:
  """ConfigError if the checkpoint at `step` trained on other data than `content` (`Corpus.content`), by the
  record in its `progress` (none before checkpoints had one), unless train.allow_config_change lists
  "data.files". Domains on one side only are config changes, checked by `check`."""
  saved = (progress or {}).get("data") or {}
  changed = sorted(d for d in set(saved) & set(content) if saved[d] != content[d])
  if not changed:
    return
  # Domains split together (data/corpus.py) change together, whichever one's files changed.
  what = (f"config.data.domains.{changed[0]}: its files, or files it is split with," if len(changed) == 1 else
          f"config.data.domains {', '.join(changed)}: their files, or files they are split with,")
  if config_lib.path_matches(config_lib.DATA_FILES, config_lib.allowed_changes(config)):
    logging.warning("Resuming from step %d on other training data (allowed by train.allow_config_change): %s "
                    "changed since.", step, what)
    return
  raise ConfigError(f"The checkpoint at step {step} in {directory} trained on other data: {what} changed since "
                    "(files added, removed or of other sizes). Resume with the files as they were, allow the change "
                    "with --config.train.allow_config_change=data.files (the rest of the run, and its validation, "
                    "then use the new data), or pass a new --workdir. The checkpoints are left as they are.")


class SavedWithAnotherConfig(ConfigError):
  """A checkpoint this config may not resume: `changes` are the fields that differ, [(path, saved, now)]."""

  def __init__(self, message: str, changes: list[tuple[str, Any, Any]]):
    super().__init__(message)
    self.changes = changes


def check(config, *, saved_config: Mapping | None, saved_shapes: Mapping | None, abstract_state: Any,
          step: int, directory: str, training: bool = True) -> None:
  """Raises ConfigError if the checkpoint at `step` cannot, or may not, be resumed (or, with training=False,
  read by evaluate / generate) with `config`.

  Fields the code no longer has (`config.without_obsolete`) are not compared; fields added since the save
  are, as changes from `<absent>`: the code cannot know how the saved run behaved without them.
  """
  diffs = []
  if saved_config is not None:
    saved_config, obsolete = config_lib.without_obsolete(_normalised(saved_config))
    if obsolete:
      logging.info("The config saved at step %d has fields this code no longer has, ignored: %s.", step,
                   ", ".join(obsolete))
    diffs = differences(saved_config, config)
  where = f"The checkpoint at step {step} in {directory}"
  keep = "The checkpoints are left as they are."
  shapes = shape_differences(saved_shapes, abstract_state) if saved_shapes is not None else []
  if shapes:
    model = [d for d in diffs if d[0].startswith("model.")]
    cause = (f"it was saved with {describe(model)}" if model else
             "the model fields match, so the state's layout changed with the code since the save")
    arrays = "; ".join(shapes[:3]) + (f"; and {len(shapes) - 3} more arrays" if len(shapes) > 3 else "")
    fix = ("Resume with the saved values, or pass a new --workdir to train this config from scratch" if training
           else "Drop --config to use the saved config")
    raise SavedWithAnotherConfig(f"{where} holds a train state of another shape ({arrays}): {cause}. {fix}. {keep}",
                                 model)
  free = [d for d in diffs if config_lib.path_matches(d[0], FREE_FIELDS)]
  patterns = config_lib.allowed_changes(config)
  allowed = [d for d in diffs if d not in free and config_lib.path_matches(d[0], patterns)]
  refused = [d for d in diffs if d not in free and d not in allowed]
  if refused:
    fields = ",".join(d[0] for d in refused)
    fix = (f"Resume with the saved values, allow the change with --config.train.allow_config_change={fields}, or "
           "pass a new --workdir" if training else
           f"Drop --config to use the saved config, or allow the change with "
           f"--config.train.allow_config_change={fields}")
    raise SavedWithAnotherConfig(f"{where} was saved with another config: {describe(refused)}. {fix}. {keep}",
                                 refused)
  using = "Resuming from" if training else "Reading"
  if allowed:
    logging.warning("%s step %d with config changes (allowed by train.allow_config_change): %s.", using, step,
                    describe(allowed))
  if free:
    logging.info("%s step %d with changed bookkeeping fields: %s.", using, step, describe(free))


def restore_or_init(ckpt: checkpoint.Checkpointer, config, abstract_state, make_state):
  """(state, start step, the config saved with that step or None): the newest sound checkpoint if its config
  allows resuming with `config`, else a new state."""
  # Checked against the newest checkpoint whose layout is readable (a damaged one is left to the restore),
  # and the newest config saved up to it that can be read.
  steps = ckpt.all_steps()
  saved_config = config_step = None
  saved_layout = abstract_state
  for step in steps[::-1]:
    saved_shapes = ckpt.saved_shapes(step)
    if saved_shapes is None:
      continue
    # A float16 run's state has a loss scale, others' have none: model.dtype changed (if allowed) adds or drops it.
    saved_layout = state_lib.with_loss_scale(abstract_state, "loss_scale/scale" in saved_shapes)
    saved_config, unreadable = None, []
    for config_step in [s for s in steps if s <= step][::-1]:
      try:
        saved_config = ckpt.restore_config(config_step)
        break
      except Exception as e:  # pylint: disable=broad-except  (saved without a config, or a damaged one)
        unreadable.append(f"step {config_step}: {type(e).__name__}")
    if unreadable and saved_config is not None:
      logging.warning("The config saved with the checkpoint at step %d cannot be read (%s); this config is "
                      "checked against the one saved at step %d.", step, unreadable[0], config_step)
    if saved_config is None and "*" not in config_lib.allowed_changes(config):
      raise ConfigError(f"No config saved in {ckpt.directory} up to step {step} can be read ({', '.join(unreadable)}), "
                        "so whether this run's config matches the saved run's cannot be checked; resume without "
                        "that check with --config.train.allow_config_change='*' (a change of the model's shapes is "
                        "still refused), or pass a new --workdir. The checkpoints are left as they are.")
    check(config, saved_config=saved_config, saved_shapes=saved_shapes, abstract_state=saved_layout,
                 step=step, directory=ckpt.directory)
    if step > config.curriculum.total_steps:  # with a shortened curriculum allowed: nothing it runs is left
      raise ConfigError(f"The checkpoint at step {step} in {ckpt.directory} lies past the end of the curriculum "
                        f"(curriculum.total_steps={config.curriculum.total_steps}); set curriculum.total_steps to at "
                        f"least {step}, or pass a new --workdir. The checkpoints are left as they are.")
    break
  restored = ckpt.restore_latest(saved_layout)
  if restored is None:
    logging.info("No checkpoint in %s: starting from step 0.", ckpt.directory)
    return make_state(), 0, None
  logging.info("Resumed from the checkpoint at step %d in %s.", restored[1], ckpt.directory)
  state, step = restored
  state = state_lib.with_loss_scale(state, abstract_state.loss_scale is not None, config.train.loss_scale_init)
  return state, step, saved_config if config_step == step else None


def logged_at(step: int, saved_config, progress) -> dict[str, bool]:
  """What the run that saved `step` logged there: {"eval": its evaluation (periodic or final), "stable_ranks":
  its stable ranks}. Read from the progress saved with the step (a run stopped by a signal or the non-finite
  guard saves before evaluating); without one (an older checkpoint), from its saved config's intervals, as such a
  run logged every evaluation due before saving; unknown (no config either): False, so they are logged again."""
  if progress is not None:
    return {"eval": bool(progress.get("evaluated")), "stable_ranks": bool(progress.get("stable_ranks"))}
  if saved_config is None:
    return {"eval": False, "stable_ranks": False}
  train = saved_config["train"]
  return {"eval": step == saved_config["curriculum"]["total_steps"] or step % train["eval_every"] == 0,
          "stable_ranks": step % train["stable_rank_every"] == 0}
