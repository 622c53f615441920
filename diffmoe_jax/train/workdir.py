"""The workdir: created with a clear error when it cannot be, and locked so that one run at a time writes it;
finished runs' result files in it, written whole and checked when reused."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time

from absl import logging

LOCK_NAME = "lock"


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not a directory, not writable, in use by another run, or holding a finished
  run whose result file is damaged or whose training data changed since."""


def prepare(workdir: str | os.PathLike, flag: str = "workdir") -> str:
  """`workdir` as an absolute path, created if missing; WorkdirError naming the path (and `flag`, the
  command-line flag that gave it) if it cannot be used."""
  if not os.fspath(workdir).strip():  # e.g. --workdir=$RUN_DIR with the variable unset: not the current directory
    raise WorkdirError("The workdir is empty; pass the run's directory, such as --workdir=runs/tiny.")
  path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  run, part = run_holding(path)
  if run is not None:
    raise WorkdirError(f"The {flag} {path} lies in the {part} of the run in {run}; pass --{flag}={run} to resume "
                       "that run, or another directory.")
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"The {flag} {path} is a file, not a directory; pass another --{flag}.")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"Cannot create the {flag} {path}: {e.strerror or e}; pass a --{flag} in a directory "
                       "you can write.") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"The {flag} {path} is not writable by this user; pass another --{flag} or fix its "
                       "permissions.")
  return path


def first_missing(workdir: str) -> str | None:
  """The outermost directory of the path `workdir` (itself included) that does not exist, as an absolute path:
  what `prepare` creates for it. None if it exists (or is empty)."""
  if not os.fspath(workdir).strip():
    return None
  path, missing = os.path.abspath(os.path.expanduser(os.fspath(workdir))), None
  while not os.path.exists(path):
    missing, path = path, os.path.dirname(path)
  return missing


def saved_nothing(workdir: str) -> bool:
  """Whether `workdir` holds nothing a run saved: its lock file and time record, and empty checkpoints and
  TensorBoard directories (the config's text alone), as a run stopped before its first step leaves them."""
  from diffmoe_jax.train import metrics  # which reads WorkdirError from here
  checkpoints, tb = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "tb")
  return (set(os.listdir(workdir)) <= {LOCK_NAME, SECONDS_FILE, "checkpoints", "tb"}
          and (not os.path.exists(checkpoints) or os.path.isdir(checkpoints) and not os.listdir(checkpoints))
          and (not os.path.exists(tb) or os.path.isdir(tb) and metrics.holds_no_step(tb)))


def remove_if_unused(workdir: str, created: str) -> None:
  """Removes `workdir` if it holds nothing the run that created it saved (`saved_nothing`), and no other run
  holds its lock (one started on the same new workdir at the same moment may have taken it first); then the
  directories above it up to `created`, the outermost one the run created, that are left empty."""
  # Holds more, is in use, or was removed by another process of the run.
  with contextlib.suppress(OSError, WorkdirError), WorkdirLock(workdir):
    if saved_nothing(workdir):
      for name in ("checkpoints", "tb"):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
      for name in (SECONDS_FILE, LOCK_NAME):
        with contextlib.suppress(FileNotFoundError):
          os.remove(os.path.join(workdir, name))
      os.rmdir(workdir)
      while workdir != created:
        workdir = os.path.dirname(workdir)
        os.rmdir(workdir)  # OSError, ending the removal, once one holds something else


@contextlib.contextmanager
def removed_unless_used(workdir: str, created: str | None):
  """On an error or a Ctrl-C in the block, `remove_if_unused(workdir, created)` where this run created the
  workdir (`created`, from `first_missing` before `prepare`; None: it did not): a command refused or interrupted
  before it saved anything leaves no directory behind."""
  try:
    yield
  except BaseException:
    if created:
      remove_if_unused(workdir, created)
    raise


def contents_kind(path: str) -> str | None:
  """What the directory `path` holds, by the layout each command writes there: "a training run" (checkpoints/ or
  tb/), "an NCAS search" (proxies/), "an ablation" (<arm>/seed<k>/), or None (none of them)."""
  if not os.path.isdir(path):
    return None
  names = os.listdir(path)
  if "proxies" in names and os.path.isdir(os.path.join(path, "proxies")):
    return "an NCAS search"
  if any(name in names and os.path.isdir(os.path.join(path, name)) for name in ("checkpoints", "tb")):
    return "a training run"
  for name in names:
    arm = os.path.join(path, name)
    if os.path.isdir(arm) and any(re.fullmatch(r"seed\d+", run) and os.path.isdir(os.path.join(arm, run))
                                  for run in os.listdir(arm)):
      return "an ablation"
  return None


def check_contents(workdir: str, kind: str) -> None:
  """WorkdirError if `workdir` holds the runs of another command than the one whose `kind` (as `contents_kind`
  says it) is given: trained beside them, a run mixed its files with theirs (and evaluate then read it for theirs)."""
  holds = contents_kind(workdir)
  if holds is not None and holds != kind:
    raise WorkdirError(f"The workdir {workdir} holds {holds}, not {kind}; pass another --workdir.")


def report_in(path: str) -> tuple[str, str] | None:
  """(what, the command that wrote it) if the directory `path` holds an ablation's or an NCAS search's report."""
  from diffmoe_jax import ablate_analysis
  from diffmoe_jax.ncas import report
  for name, title, what, command in (("README.md", ablate_analysis.TITLE, "an ablation's report", "ablation"),
                                     ("report.md", report.TITLE, "an NCAS search's report", "search")):
    if _first_line(os.path.join(path, name)) == title:
      return what, command
  return None


def check_no_other_report(report_dir: str, command: str) -> None:
  """WorkdirError if `report_dir` holds the report of another command than `command` ("ablation", "search"),
  whose files the new report would lie among."""
  report = report_in(report_dir)
  if report is not None and report[1] != command:
    raise WorkdirError(f"The report_dir {report_dir} holds {report[0]}; pass another --report_dir (a new "
                       f"directory, or one an earlier {command} report was written to).")


def run_holding(path: str) -> tuple[str | None, str]:
  """(the workdir of the run whose checkpoints or TensorBoard directory is or holds the absolute `path`, which of
  them), or (None, ""): a run's `checkpoints` (as the log names it) passed for its workdir would start another run
  there, or find no checkpoints to evaluate."""
  parts = {"checkpoints": "checkpoints directory", "tb": "TensorBoard directory"}
  inner = path
  while os.path.dirname(inner) != inner:
    run = os.path.dirname(inner)
    if os.path.basename(inner) in parts and os.path.isfile(os.path.join(run, LOCK_NAME)):
      return run, parts[os.path.basename(inner)]
    inner = run
  return None, ""


def _first_line(path: str) -> str | None:
  """The first line of the text file at `path`, None if it cannot be read."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.readline().rstrip("\n")
  except OSError:
    return None


def foreign_report_file(report_dir: str, *, text_file: str, title: str, json_file: str, json_keys: set,
                        outputs: tuple = ()) -> str | None:
  """The path of a file in report_dir that a report would replace or remove but no such report wrote, or None:
  `text_file` not opening with the line `title`, `json_file` not a JSON object with `json_keys`, or, where
  neither of them is there, one of `outputs`."""
  text, data = os.path.join(report_dir, text_file), os.path.join(report_dir, json_file)
  if not (os.path.exists(text) or os.path.exists(data)):
    return next((os.path.join(report_dir, name) for name in outputs if os.path.exists(os.path.join(report_dir, name))),
                None)
  if os.path.exists(text) and _first_line(text) != title:
    return text
  if os.path.exists(data):
    try:
      with open(data, encoding="utf-8") as f:
        saved = json.load(f)
    except (OSError, ValueError):
      return data
    if not (isinstance(saved, dict) and json_keys <= saved.keys()):
      return data
  return None


def write_json(path: str, value) -> None:
  """Writes `value` as JSON to `path` whole or not at all (a temporary file renamed into place)."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(value, f, indent=2)
    os.replace(tmp, path)
  except BaseException:  # a full disk, say: no partial file left beside the one kept
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def duration_text(seconds: float) -> str:
  """"12m05s": whole minutes and seconds, as progress lines give a run's time."""
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


SECONDS_FILE = "train_seconds.json"


def add_seconds(workdir: str, seconds: float, *, write: bool = True) -> float:
  """The wall seconds spent training the run in `workdir`, `seconds` more than recorded there (and recorded
  if `write`): a run resumed over several invocations costs them all."""
  path = os.path.join(workdir, SECONDS_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      seconds += float(json.load(f)["seconds"])
  except FileNotFoundError:
    pass  # none recorded yet
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning("The run's training time recorded in %s cannot be read (%s); counting from this invocation.",
                    path, type(e).__name__)
  if write:
    try:
      write_json(path, {"seconds": seconds})
    except OSError as e:  # e.g. a full disk, whose own error the run reports
      logging.warning("Cannot record the run's training time in %s: %s.", path, e.strerror or e)
  return seconds


def read_result(path: str) -> dict:
  """A finished run's result file; WorkdirError naming it if it is damaged."""
  try:
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise WorkdirError(f"{path} is damaged ({e}); delete it to train that run again.") from None
  if not isinstance(result, dict):
    raise WorkdirError(f"{path} is damaged (not a JSON object); delete it to train that run again.")
  return result


def check_data(run_dir: str, saved: dict | None, fingerprint: dict, log) -> None:
  """WorkdirError if the run in run_dir finished on other data than `fingerprint` (`Corpus.fingerprint`), its
  result's `saved` one; a note through `log` if its result predates the record."""
  if saved is None:
    log(f"note: {run_dir} has no record of its training data, so a change in it could not be checked.")
    return
  changed = sorted(d for d in set(saved) | set(fingerprint) if saved.get(d) != fingerprint.get(d))
  if changed:
    # Domains split together (data/corpus.py) change keys together, whichever one's files changed.
    what = (f"config.data.domains.{changed[0]}: its files changed since" if len(changed) == 1 else
            f"config.data.domains {', '.join(changed)}: their files, or files they are split with, changed since")
    raise WorkdirError(f"{run_dir} finished on other training data ({what}); pass a new --workdir, or delete that "
                       "run to train it again.")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


class WorkdirLock:
  """An exclusive lock on a workdir for one run, held from `acquire()` to `release()` (or a `with` block).

  The lock is `fcntl.flock` on `<workdir>/lock`. The kernel drops a flock when its holder exits, however it
  ends, so a lock file left by a killed run is free at once (stale locks need no clean-up). The file records
  the holder's host, PID and start time for the message a second run gets.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
    self._file = None

  def acquire(self) -> "WorkdirLock":
    try:
      f = open(self.path, "a+", encoding="utf-8")
    except OSError as e:
      raise WorkdirError(f"Cannot create the lock file {self.path}: {e.strerror or e}; pass a --workdir you can "
                         "write.") from None
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        # The filesystem has no flock (some network mounts): run unlocked rather than not at all.
        from absl import logging
        logging.warning("Cannot lock %s (%s); make sure no other run uses this workdir.", self.path, e.strerror)
        f.close()
        return self
      f.seek(0)
      holder = f.read().strip()
      f.close()
      raise WorkdirError(self._held_message(holder)) from None
    try:
      f.seek(0)
      f.truncate()
      f.write(f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
      f.flush()
    except OSError as e:  # a full disk, on which no checkpoint could be saved either
      with contextlib.suppress(OSError):  # closing flushes again, and fails again, but closes (and unlocks)
        f.close()
      raise WorkdirError(f"Cannot write the lock file {self.path}: {e.strerror or e}; free space there or pass "
                         "another --workdir.") from None
    self._file = f
    return self

  def _held_message(self, holder: str) -> str:
    workdir = os.path.dirname(self.path)
    host, pid, started = (holder.split(" ", 2) + ["?", "?", "?"])[:3]
    who = f"PID {pid} on host {host}, started {started}"
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
      # A flock outlives its taker only in processes that inherited the open file (forked children).
      return (f"The workdir {workdir} is locked by a leftover process of an earlier run ({who}, which has exited); "
              f"end that run's remaining processes (fuser {self.path} lists them), then rerun.")
    return (f"The workdir {workdir} is in use by another run ({who}); wait for it to finish or stop it, or pass "
            "another --workdir.")

  def release(self) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
