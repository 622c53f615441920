"""Orbax checkpoints of the train state, each with the run's config (JSON) and a checksum of its arrays.

A checkpoint is trusted only if it restores, its arrays match the checksum computed when it was saved and
its floating-point arrays are finite; otherwise the next older one is tried. A state with non-finite values
is never saved. A save that fails raises `CheckpointSaveError` (naming the directory and the cause) and
removes its partial step directory.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

CHECKSUM_VERSION = 1
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_WRITER_GRACE_SECONDS = 30.0  # how long a failed save's remaining writer threads get to end


class CheckpointError(RuntimeError):
  """No checkpoint could be restored, or the checkpoints directory cannot be used."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (full disk, directory gone or read-only)."""


def _leaf_path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 values (narrower types widened, wider ones split)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = jnp.dtype(x.dtype).itemsize
  if width >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[width]).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array):
  """Two wrapping 32-bit sums of the array's bits: plain and weighted by (2·position + 1), and finiteness.

  Integer sums are exact in any order, so the result does not depend on the sharding. A change of values
  changes the plain sum unless changes cancel, and a permutation changes the weighted one.
  """
  bits = _as_uint32(x)
  position = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):  # the flat index from iotas: no reshape, so no resharding
    position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  plain = jnp.sum(bits, dtype=jnp.uint32)
  weighted = jnp.sum(bits * (position * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return plain, weighted, finite


@jax.jit
def _fingerprints(leaves: list):
  plain, weighted, finite = zip(*map(_leaf_fingerprint, leaves))
  return jnp.stack(plain), jnp.stack(weighted), jnp.stack(finite)


def fingerprint(state: Any) -> tuple[dict[str, str], list[str]]:
  """({leaf path: checksum}, [paths of floating-point leaves holding NaN or infinity]) of a pytree."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
  plain, weighted, finite = jax.device_get(_fingerprints(list(leaves)))
  names = [_leaf_path(p) for p in paths]
  checksums = {name: f"{int(a):08x}{int(b):08x}" for name, a, b in zip(names, plain, weighted)}
  return checksums, [name for name, ok in zip(names, finite) if not ok]


def _first(names: list[str], n: int = 3) -> str:
  return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _chain(e: BaseException) -> list[BaseException]:
  """`e` and the exceptions it was raised from, outermost first (tensorstore's outer errors say little)."""
  chain = [e]
  while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
    chain.append(cause)
  return chain


def _one_line(e: BaseException, limit: int = 300) -> str:
  """The innermost error of `e`'s chain, on one line."""
  root = _chain(e)[-1]
  text = " ".join(str(root).split())
  return f"{type(root).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class _AbandonedReadReports(logging.Filter):
  """asyncio's reports of a read's failure nobody awaited ("Task exception was never retrieved")."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(("Task exception was never retrieved",
                                               "Future exception was never retrieved"))


def _to_a_closed_loop(unraisable) -> bool:
  """An abandoned read that TensorStore completes after the restore's event loop closed: its result is
  handed to the closed loop (`call_soon_threadsafe`), which refuses it."""
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
          and bool(frames) and frames[0].name == "call_soon_threadsafe"
          and f"{os.sep}asyncio{os.sep}" in frames[0].filename)


@contextlib.contextmanager
def _abandoned_reads_quiet():
  """When one array's read fails, Orbax abandons the reads of the others. Collected, each printed its
  TensorStore spec ("Exception ignored in <coroutine ...>", or asyncio's "Task exception was never
  retrieved"; one TensorStore completed after the restore's event loop closed, "Event loop is closed"):
  thousands of lines for one missing file, after the one line that names the damage. Within this block, and
  when it collects them on the way out, their reports are dropped; any other unraisable exception is
  reported as before."""
  report, asyncio_log, quiet = sys.unraisablehook, logging.getLogger("asyncio"), _AbandonedReadReports()

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    if _to_a_closed_loop(unraisable):
      return
    report(unraisable)

  sys.unraisablehook = hook
  asyncio_log.addFilter(quiet)
  try:
    yield
  finally:
    gc.collect()
    asyncio_log.removeFilter(quiet)
    sys.unraisablehook = report


def _likely_cause(e: BaseException) -> str:
  """The damage a read error points to, in words (tensorstore's messages bury it deep in the text)."""
  text = " ".join(str(x) for x in _chain(e))
  if any(isinstance(x, FileNotFoundError) for x in _chain(e)) or "NOT_FOUND" in text or "not found" in text:
    return ": a file is missing"
  if "OUT_OF_RANGE" in text or "Byte range" in text or "truncated" in text.lower():
    return ": a file is missing or shorter than recorded (truncated)"  # tensorstore reads a missing one as empty
  if "DATA_LOSS" in text or "decompress" in text.lower() or "corrupt" in text.lower():
    return ": a file's content is corrupted"
  return ""


def _join_by(thread: threading.Thread, deadline: float) -> None:
  """Joins `thread` until the `time.monotonic()` deadline, waiting out a thread whose start() has not yet run
  it (which `threading.enumerate` lists, and `join` refuses)."""
  while True:
    try:
      thread.join(timeout=max(0.0, deadline - time.monotonic()))
      return
    except RuntimeError:  # "cannot join thread before it is started"
      if time.monotonic() >= deadline:
        return
      time.sleep(0.01)


def check_directory(directory: str | os.PathLike, writable: bool = False) -> None:
  """CheckpointError if the checkpoints directory is a file, or (with `writable`, for the run that saves there)
  cannot be written: a run finds out before it trains, not at its first save."""
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointError(f"The checkpoints directory {directory} is a file, not a directory; move it away or use "
                          "another workdir.")
  problem = _unwritable(directory) if writable else None
  if problem:
    raise CheckpointError(f"Cannot save checkpoints in {directory}: {problem}. Make it a writable directory, then "
                          "rerun (the run resumes from the checkpoints it holds).")


def _unwritable(d: str) -> str | None:
  """Why no checkpoint can be saved in the directory `d`, or None."""
  if not os.path.exists(d):
    if os.path.isdir(os.path.dirname(d)) and os.access(os.path.dirname(d), os.W_OK):
      return None  # Orbax creates it
    return "it does not exist and cannot be created"
  if not os.path.isdir(d):
    return "it is a file, not a directory"
  if not os.access(d, os.W_OK | os.X_OK):
    return "it is not writable (read-only or immutable)"
  return None


class Checkpointer:
  """Saves and restores a state pytree under `directory`, keeping the last `keep` steps.

  The trainer decides when to save; the manager has no interval policy beyond Orbax's rule that, without
  `force`, only a step newer than the latest saved one is written. Orbax handles multi-process arrays and
  writes the JSON items from the primary process only.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True,
               remove_partial_saves: bool = False):
    """`remove_partial_saves`: delete the partial step directories of saves that never finished (a process
    killed while saving), which are as large as a checkpoint. Only for the run that owns the directory: a
    reader would delete a save in progress."""
    if keep < 1:
      raise ValueError(f"Checkpointer keep={keep}: keep at least 1 checkpoint.")
    self.directory = os.path.abspath(os.fspath(directory))
    check_directory(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=remove_partial_saves)
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "checksums": ocp.JsonCheckpointHandler(), "progress": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    # Steps that failed to restore in this process: a save of the same step replaces them.
    self._unreadable: set[int] = set()
    self._saving: int | None = None  # the step of the last started save, until it is known to be durable
    self._threads_before_save: set[threading.Thread] = set()

  @property
  def latest_step(self) -> int | None:
    """The newest saved step (including one still being written), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Saved steps, oldest first (including one still being written)."""
    return sorted(self._manager.all_steps())

  def reload(self) -> list[int]:
    """all_steps() as the directory holds them now: a reader's Checkpointer caches them when it is made, and
    the run that writes the directory saves and deletes steps meanwhile."""
    self._manager.reload()
    return self.all_steps()

  # --- Saving -------------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict | Mapping | None = None,
           force: bool = False, progress: Mapping | None = None) -> bool:
    """Starts saving `state` (and `config` and `progress`, the run's own record of the step, as JSON) at `step`;
    returns whether a save was started.

    A step that is already saved is skipped (unless it failed to restore in this process: then it is
    replaced). Without `force`, a step older than the latest saved one is skipped too (unless only steps that
    failed to restore are newer); `force` saves it.
    A state with a non-finite floating-point value is not saved (so rotation never drops a good
    checkpoint for it). Saves are asynchronous if the Checkpointer was made with `async_save`: call
    `wait()` for durability. Raises CheckpointSaveError if this or an earlier save failed.
    """
    step = int(step)
    self.check()
    checksums, nonfinite = fingerprint(state)
    if nonfinite:
      log.error("Not saving step %d in %s: the state holds non-finite values (%s); the older checkpoints stay.",
                step, self.directory, _first(nonfinite))
      return False
    self._unreadable &= set(self._manager.all_steps())  # saves since may have rotated some out
    if step in self._unreadable:
      # The run redid this step from an older checkpoint, so its state replaces the unreadable copy.
      log.warning("Replacing the unreadable checkpoint at step %d in %s.", step, self.directory)
      self._manager.delete(step)
      self._unreadable.discard(step)
      force = True
    if any(s > step for s in self._unreadable):
      # Orbax skips a step older than its newest, but a newer unreadable one holds nothing: the run redoes those
      # steps from an older checkpoint and must save them at its usual interval.
      force = True
    if step in self._manager.all_steps():
      log.info("Checkpoint at step %d already exists in %s; not saving it again.", step, self.directory)
      return False
    self._check_writable(step)
    items = {"state": ocp.args.StandardSave(state),
             "checksums": ocp.args.JsonSave({"version": CHECKSUM_VERSION, "arrays": checksums})}
    if config is not None:
      items["config"] = ocp.args.JsonSave(_json_config(config))
    if progress is not None:
      items["progress"] = ocp.args.JsonSave(dict(progress))
    self._threads_before_save = set(threading.enumerate())
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from None
    if started:
      self._saving = step
    return started

  def _check_writable(self, step: int) -> None:
    """Fails before Orbax starts its writer threads, which wait forever if the directory cannot be made."""
    problem = _unwritable(self.directory)
    if problem:
      raise CheckpointSaveError(f"Cannot save the checkpoint at step {step} in {self.directory}: {problem}. Make it "
                                "a writable directory, then rerun to resume from the last checkpoint.")

  def _save_failed(self, step: int | None, e: BaseException) -> CheckpointSaveError:
    """The error for a failed save, after removing the save's partial step directory."""
    step = self._saving if step is None else step
    self._saving = None
    # The save's other writer threads may still be writing into its directory: let them end first.
    deadline = time.monotonic() + _WRITER_GRACE_SECONDS
    for thread in set(threading.enumerate()) - self._threads_before_save - {threading.current_thread()}:
      _join_by(thread, deadline)
    removed = ""
    if step is not None and jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if name == str(step) + _TMP_SUFFIX or name.startswith(str(step) + _TMP_SUFFIX):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
          removed = f" (its partial directory {name} was removed)"
    cause = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else _one_line(e)
    return CheckpointSaveError(f"Cannot save the checkpoint at step {step} in {self.directory}{removed}: {cause}. "
                               "Free space or fix the directory, then rerun to resume from the last checkpoint.")

  def check(self) -> None:
    """Raises CheckpointSaveError if a started save has failed; never blocks on one still running."""
    if self._saving is None or self._manager.is_saving_in_progress():
      return
    self.wait()

  def wait(self):
    """Blocks until every started save is durable on disk; raises CheckpointSaveError if one failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(None, e) from None
    self._saving = None

  # --- Restoring ----------------------------------------------------------------------------------------

  def restore_latest(self, abstract_state: Any) -> tuple[Any, int] | None:
    """Restores the newest sound checkpoint onto the shapes, dtypes and shardings of `abstract_state`.

    Returns (state, step), or None if there is no checkpoint. A checkpoint that cannot be read, does not
    match its checksum or holds non-finite values is logged (one line with the cause) and the next older
    one is tried; if none is sound this raises CheckpointError, since starting over would lose saved work.
    """
    self.wait()
    steps = self.all_steps()[::-1]
    if not steps:
      return None
    errors = []
    with _abandoned_reads_quiet():  # a damaged step's abandoned reads end while the next one is restored
      for step in steps:
        problem, restored = self.restore_verified(step, abstract_state)
        if problem is None:
          return restored, step
        log.warning("Cannot restore the checkpoint at step %d in %s: %s; trying an older one.", step,
                    self.directory, problem)
        self._unreadable.add(step)
        errors.append(f"step {step}: {problem}")
    raise CheckpointError(
        f"No checkpoint in {self.directory} could be restored (newest first: {'; '.join(errors)}). If the files "
        "are damaged, remove those step directories to start over from an older one, or use a new workdir.")

  def restore_verified(self, step: int, abstract_state: Any) -> tuple[str | None, Any]:
    """Restores one step: (None, state) when sound (readable, matching its checksums, finite), else (what
    is wrong with it, None)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_checksums = os.path.isdir(os.path.join(self.directory, str(step), "checksums"))
    if has_checksums:
      items["checksums"] = ocp.args.JsonRestore()
    with _abandoned_reads_quiet():
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      # Damage shows up as many exception types (missing files, tensorstore errors, missing items).
      except Exception as e:  # pylint: disable=broad-except
        return f"its files cannot be read{_likely_cause(e)} ({_one_line(e)})", None
    checksums, nonfinite = fingerprint(restored["state"])
    if has_checksums:
      saved = restored["checksums"].get("arrays", {})
      changed = [name for name, value in checksums.items() if saved.get(name) != value]
      if changed:
        return (f"its arrays do not match the checksum saved with them ({_first(changed)}): the files were "
                "changed or damaged after the save"), None
    else:
      log.info("The checkpoint at step %d in %s has no checksum (saved by an older version); only its "
               "finiteness is checked.", step, self.directory)
    if nonfinite:
      return f"it holds non-finite values ({_first(nonfinite)})", None
    return None, restored["state"]

  def saved_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """{leaf path: (shape, dtype)} of the state saved at `step`, from its metadata; None if unreadable."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
      shapes = {_leaf_path(p): (tuple(x.shape), str(x.dtype))
                for p, x in jax.tree_util.tree_flatten_with_path(metadata)[0]}
    except Exception:  # pylint: disable=broad-except
      return None
    return shapes or None

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
    if not os.path.isdir(os.path.join(self.directory, str(step), "config")):
      raise FileNotFoundError(f"Checkpoint at step {step} in {self.directory} has no config: it was saved with "
                              "config=None.")
    return self._read_json(step, "config")

  def restore_progress(self, step: int) -> dict | None:
    """The `progress` saved with `step`; None if it was saved without one (or by an older version)."""
    self.wait()
    if not os.path.isdir(os.path.join(self.directory, str(step), "progress")):
      return None
    return self._read_json(step, "progress")

  def _read_json(self, step: int, name: str) -> dict:
    # The item's own handler: a partial restore through the manager warns about the items it skips.
    item = os.path.join(self.directory, str(step), name)
    return ocp.JsonCheckpointHandler().restore(epath.Path(item), args=ocp.args.JsonRestore())

  def close(self):
    """Waits for pending saves and releases the manager."""
    self.wait()
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
