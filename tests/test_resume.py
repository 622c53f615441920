"""What may change when a run resumes (train/resume.py), checked on configs alone: no checkpoint needed."""
import builtins
import errno
import os

import pytest

from diffmoe_jax import config as config_lib, main as main_lib
from diffmoe_jax.config import ConfigError
from diffmoe_jax.train import preflight, resume, workdir as workdir_lib
from test_config import load


def check(saved, config):
  resume.check(config, saved_config=saved.to_dict(), saved_shapes=None, abstract_state=None, step=7,
               directory="ckpts")


def test_moving_the_token_cache_is_free_but_changing_the_data_is_not():
  """The token cache is keyed by the data it holds: resuming with it elsewhere (a faster disk, another
  machine) trains the same run, so it is not refused as a config change."""
  saved, config = load("tiny"), load("tiny")
  config.data.cache_dir = "/scratch/diffmoe_cache"
  check(saved, config)
  config.data.val_fraction = 0.1
  with pytest.raises(ConfigError, match=r"saved with another config: data\.val_fraction 0\.05 -> 0\.1\. .*"
                                        r"--config\.train\.allow_config_change=data\.val_fraction,"):
    check(saved, config)


def test_how_the_loss_and_the_weights_casts_run_may_change():
  """The logits in chunks and the weights cast in each layer compute the same function in less memory: a
  run out of memory resumes with them, not refused as a config change; the vocabulary is the model's."""
  saved, config = load("tiny"), load("tiny")
  config.model.update(logits_chunk_len=64, cast_weights_once=False)
  check(saved, config)
  config.model.vocab_size = 512
  with pytest.raises(ConfigError, match=r"saved with another config: model\.vocab_size 256 -> 512\."):
    check(saved, config)


def test_resuming_on_other_data_needs_it_allowed(caplog):
  """A resume read the changed files silently (a file appended, one added: the rest of the run trained on other
  data, and files moved between the splits). Domains added or removed are config changes, checked by `check`."""
  config, saved = load("tiny"), {"data": {"code": "1f2e", "docs": "77aa"}}
  resume.check_data(config, saved, {"code": "1f2e", "docs": "77aa", "web": "0000"}, step=7, directory="ckpts")
  resume.check_data(config, None, {"code": "9999"}, step=7, directory="ckpts")  # saved before the record
  with pytest.raises(ConfigError, match=r"^The checkpoint at step 7 in ckpts trained on other data: config\.data\."
                                        r"domains\.code: its files, or files it is split with, changed since \(files "
                                        r"added, removed or of other sizes\)\. Resume with the files as they were, "
                                        r"allow the change with --config\.train\.allow_config_change=data\.files"):
    resume.check_data(config, saved, {"code": "9999", "docs": "77aa"}, step=7, directory="ckpts")
  with pytest.raises(ConfigError, match=r"other data: config\.data\.domains code, docs: their files"):
    resume.check_data(config, saved, {"code": "9999", "docs": "8888"}, step=7, directory="ckpts")
  for allowed in ("data.files", "data.*", "*"):
    config.train.allow_config_change = allowed
    resume.check_data(config, saved, {"code": "9999", "docs": "77aa"}, step=7, directory="ckpts")
  assert "Resuming from step 7 on other training data (allowed by train.allow_config_change)" in caplog.text


def _open_on_a_full_disk(path, *args, **kwargs):
  """`open` for workdir.py on a full disk: writes reach the buffer, flushing them fails."""
  f = builtins.open(path, *args, **kwargs)

  def flush():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  f.flush = flush
  return f


def test_a_full_disk_is_one_error_when_the_run_takes_the_workdir_lock(tmp_path, monkeypatch):
  """Rerun on a full disk to resume, the run's lock raised the OSError of writing its holder line, a traceback;
  and the lock stays free for the next run."""
  monkeypatch.setattr(workdir_lib, "open", _open_on_a_full_disk, raising=False)
  lock = workdir_lib.WorkdirLock(tmp_path)
  with pytest.raises(workdir_lib.WorkdirError, match=rf"^Cannot write the lock file {tmp_path}/lock: No space left "
                                                      r"on device; free space there or pass another --workdir\.$"):
    lock.acquire()
  monkeypatch.undo()
  with workdir_lib.WorkdirLock(tmp_path):
    pass


def test_a_run_refused_by_the_lock_leaves_the_workdir_of_the_run_holding_it(tmp_path, monkeypatch):
  """Two runs started at once on a new workdir: the one that created it lost the lock to the other, and on its way
  out removed the workdir as unused, lock file and all, under the running one (a third run could then take a new
  lock beside it)."""
  workdir, held = tmp_path / "run", []
  check_memory = preflight.check_memory

  def the_other_run_locks_first(*args, **kwargs):  # between this run's creating the workdir and locking it
    held.append(workdir_lib.WorkdirLock(workdir).acquire())
    return check_memory(*args, **kwargs)

  monkeypatch.setattr(preflight, "check_memory", the_other_run_locks_first)
  config = config_lib.load_file(os.path.join(os.path.dirname(__file__), "train_config.py"))
  try:
    with pytest.raises(workdir_lib.WorkdirError, match=r"is in use by another run"):
      main_lib.run(config, str(workdir))
    assert os.listdir(workdir) == ["lock"]
    with pytest.raises(workdir_lib.WorkdirError, match=r"is in use by another run"):
      workdir_lib.WorkdirLock(workdir).acquire()  # the lock file is the one still held
  finally:
    for lock in held:
      lock.release()


def test_a_full_disk_leaves_the_time_record_as_it_was_and_no_partial_file(tmp_path, monkeypatch, caplog):
  """The run's time record could not be replaced on a full disk: the old one stays, and the empty temporary file
  the write had made was left in the workdir."""
  workdir_lib.add_seconds(str(tmp_path), 5.0)
  monkeypatch.setattr(workdir_lib, "open", _open_on_a_full_disk, raising=False)
  assert workdir_lib.add_seconds(str(tmp_path), 2.0) == 7.0
  assert "Cannot record the run's training time" in caplog.text
  assert os.listdir(tmp_path) == [workdir_lib.SECONDS_FILE]
  monkeypatch.undo()
  assert workdir_lib.add_seconds(str(tmp_path), 0.0, write=False) == 5.0
  (tmp_path / workdir_lib.SECONDS_FILE).write_text('{"seconds": ')  # damaged: was reset without a word
  assert workdir_lib.add_seconds(str(tmp_path), 3.0, write=False) == 3.0
  assert "training time recorded in" in caplog.text and "cannot be read (JSONDecodeError)" in caplog.text


def test_what_the_saving_run_logged_at_its_step():
  """The progress saved with the step says; a checkpoint saved without it is read from its config's intervals,
  the curriculum's last step always evaluated (read as not evaluated, a finished run's rerun logged its final
  evaluation a second time); nothing to read from: logged again."""
  saved = {"train": {"eval_every": 100, "stable_rank_every": 50}, "curriculum": {"total_steps": 260}}
  assert resume.logged_at(260, saved, None) == {"eval": True, "stable_ranks": False}
  assert resume.logged_at(200, saved, None) == {"eval": True, "stable_ranks": True}
  assert resume.logged_at(150, saved, None) == {"eval": False, "stable_ranks": True}
  assert resume.logged_at(120, saved, None) == {"eval": False, "stable_ranks": False}
  assert resume.logged_at(200, None, None) == {"eval": False, "stable_ranks": False}
  progress = {"evaluated": False, "stable_ranks": True}
  assert resume.logged_at(200, saved, progress) == {"eval": False, "stable_ranks": True}
