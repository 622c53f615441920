"""Orbax checkpoints of the train state, each with the run's config stored beside it as JSON."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import ml_collections
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores a state pytree under `directory`, keeping the last `keep` steps.

  The trainer decides when to save; the manager has no interval policy beyond Orbax's rule that, without
  `force`, only a step newer than the latest saved one is written. Orbax handles multi-process arrays and
  writes the config JSON from the primary process only.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"Checkpointer keep={keep}: keep at least 1 checkpoint.")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Steps that failed to restore in this process: a save of the same step replaces them.
    self._unreadable: set[int] = set()

  @property
  def latest_step(self) -> int | None:
    """The newest saved step (including one still being written), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Saved steps, oldest first (including one still being written)."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict | Mapping | None = None,
           force: bool = False) -> bool:
    """Starts saving `state` (and `config` as JSON) at `step`; returns whether a save was started.

    A step that is already saved is skipped (unless it failed to restore in this process: then it is
    replaced). Without `force`, a step older than the latest saved one is skipped too; `force` saves it.
    Saves are asynchronous if the Checkpointer was made with `async_save`: call `wait()` for durability.
    """
    step = int(step)
    if step in self._unreadable:
      # The run redid this step from an older checkpoint, so its state replaces the unreadable copy.
      log.warning("Replacing the unreadable checkpoint at step %d in %s.", step, self.directory)
      self._manager.delete(step)
      self._unreadable.discard(step)
      force = True
    if step in self._manager.all_steps():
      log.info("Checkpoint at step %d already exists in %s; not saving it again.", step, self.directory)
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      items["config"] = ocp.args.JsonSave(_json_config(config))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self):
    """Blocks until every started save is durable on disk."""
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """Restores the newest readable checkpoint onto the shapes, dtypes and shardings of `abstract_state`.

    Returns (state, step), or None if there is no checkpoint. An unreadable checkpoint is logged and the
    next older one is tried; if none can be read this raises, since starting over would lose saved work.
    """
    self.wait()
    steps = self.all_steps()[::-1]
    if not steps:
      return None
    errors = []
    for step in steps:
      try:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      # Damage shows up as many exception types (missing files, tensorstore errors, missing items).
      except Exception as e:  # pylint: disable=broad-except
        log.warning("Cannot restore checkpoint at step %d in %s (%s: %s); trying an older one.",
                    step, self.directory, type(e).__name__, e)
        self._unreadable.add(step)
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        continue
      return restored["state"], step
    raise RuntimeError(
        f"No checkpoint in {self.directory} could be restored; tried steps {steps} (newest first):\n  "
        + "\n  ".join(errors)
        + "\nIf the state's structure changed, restore with the config the run was saved with; if the files "
          "are damaged, repair or remove those step directories (or use a new workdir to start over).")

  def restore_config(self, step: int | None = None) -> dict:
    """The config saved with `step` (the latest step by default), as a dict."""
    self.wait()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"No checkpoint in {self.directory}, so no saved config.")
      step = steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint at step {step} in {self.directory}; saved steps: {steps}.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except KeyError as e:
      raise FileNotFoundError(f"Checkpoint at step {step} in {self.directory} has no config: it was saved with "
                     "config=None.") from e
    return restored["config"]

  def close(self):
    """Waits for pending saves and releases the manager."""
    self._manager.close()


def _json_config(config: ml_collections.ConfigDict | Mapping) -> dict:
  """`config` as a plain dict, checked here because the JSON is written in the background."""
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  try:
    json.dumps(config)
  except TypeError as e:
    raise TypeError(f"The config cannot be saved as JSON ({e}); keep its values to strings, numbers, "
                    "booleans, None, lists and dicts.") from e
  return config
