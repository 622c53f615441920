"""What a new user trips on: commands run from another directory, config paths and flag values mistyped,
evaluate pointed at a directory of runs, a refused run's directories, mistakes told before the run's summary,
bench's argument mistakes, a token cache path that is a file, and library chatter on the terminal."""
import os
import shutil

import pytest

from diffmoe_jax import bench, cli, data, evaluate
from diffmoe_jax import config as config_lib
from diffmoe_jax import main as main_lib
from diffmoe_jax.config import ConfigError
from diffmoe_jax.train import checkpoint, workdir as workdir_lib
from test_cli import ROOT, assert_one_error, run_cli
from test_train import load_config


def test_a_config_path_that_names_no_file_names_the_file_meant(tmp_path, monkeypatch):
  check = lambda path: cli.check_command_line([f"--config={path}"], None)
  configs = os.path.join(ROOT, "configs")
  # From another directory, the checkout's file of that relative path.
  monkeypatch.chdir(tmp_path)
  assert check("configs/tiny.py") == (
      f"--config: there is no config file configs/tiny.py (relative to {tmp_path}); pass "
      f"--config={configs}/tiny.py, or run from {ROOT}, as relative paths (--workdir's too) start from the current "
      "directory.")
  # A directory: its config files.
  listed = check(configs)
  assert listed.startswith(f"--config: {configs} is a directory, not a config file; its config files: ")
  assert f"{configs}/tiny.py" in listed and f"{configs}/pi_s.py" in listed
  # A typo: the closest file beside it.
  monkeypatch.chdir(ROOT)
  assert check("configs/tinny.py") == (
      f"--config: there is no config file configs/tinny.py (relative to {ROOT}); did you mean configs/tiny.py?")
  assert check("configs/pi_s") == (
      f"--config: there is no config file configs/pi_s (relative to {ROOT}); did you mean configs/pi_s.py?")
  assert check("configs/none.py") == (  # no far-fetched name (ncas_smoke.py was "closest")
      f"--config: there is no config file configs/none.py (relative to {ROOT}); pass the path of a file with "
      f"get_config(), such as {configs}/tiny.py.")
  # A script that exits as it loads (setup.py parses the command line itself) is no config file.
  script = tmp_path / "script.py"
  script.write_text("import sys\nsys.exit('usage: script.py cmd')\n")
  assert check(script) == (f"--config: {script} exited while it was loaded, so it is no config file; pass one "
                           "with get_config().")


def test_a_flag_value_of_the_wrong_type_names_what_the_flag_takes():
  assert_one_error(run_cli("diffmoe_jax.main", "--config=configs/tiny.py", "--config.model.num_layers=2.5"),
                   "error: --config.model.num_layers=2.5: '2.5' is not an integer; model.num_layers takes a whole "
                   "number (configs/tiny.py has 4).")
  assert_one_error(run_cli("diffmoe_jax.main", "--config=configs/tiny.py", "--config.optimizer.peak_lr=1,5e-3"),
                   "error: --config.optimizer.peak_lr=1,5e-3: '1,5e-3' is not a number; optimizer.peak_lr takes a "
                   "number such as 0.5 (configs/tiny.py has 0.003).")
  # Python's parse error, with an object's address in it, was the message.
  assert_one_error(run_cli("diffmoe_jax.main", "--config=configs/tiny.py", "--config.data.domains=code"),
                   "error: --config.data.domains=code: 'code' is not a dict; data.domains takes a dict such as "
                   "\"{'key': 'value'}\", or one key at a time: --config.data.domains.<key>=<value> (configs/tiny.py "
                   "has {'code': 'stdlib:code', 'docs': 'stdlib:docs'}).")
  assert_one_error(run_cli("diffmoe_jax.evaluate", "--workdir=runs/tiny", "--step=last"),
                   "error: --step=last: 'last' is not an integer; pass a whole number.")


def test_a_flag_value_of_the_wrong_type_names_the_value_of_the_config_file_given_an_argument(tmp_path):
  # --config=FILE:ARG: the value its get_config(ARG) sets (it named get_config()'s).
  sized = tmp_path / "sized.py"
  sized.write_text("from diffmoe_jax import config as config_lib\n\ndef get_config(size=None):\n"
                   f"  c = config_lib.load_file({os.path.join(ROOT, 'configs', 'tiny.py')!r})\n"
                   "  c.optimizer.peak_lr = 1e-4 if size == 'big' else 3e-3\n  return c\n")
  assert_one_error(run_cli("diffmoe_jax.estimate", f"--config={sized}:big", "--config.optimizer.peak_lr=fast"),
                   f"optimizer.peak_lr takes a number such as 0.5 ({sized} has 0.0001).")


def test_evaluate_names_the_runs_of_a_directory_of_runs_and_a_missing_workdir(tmp_path, monkeypatch):
  for run in ("ablation/full/seed0", "ablation/no_mod/seed0", "tiny"):
    os.makedirs(tmp_path / "runs" / run / "checkpoints")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(checkpoint.CheckpointError) as e:
    evaluate.restore_params("runs")
  assert str(e.value) == ("runs is not a run's directory but holds runs: runs/tiny, runs/ablation/full/seed0, "
                          "runs/ablation/no_mod/seed0; pass one of them, such as --workdir=runs/tiny.")
  with pytest.raises(checkpoint.CheckpointError) as e:
    evaluate.restore_params("runs/tinny")
  assert str(e.value) == (f"there is no directory runs/tinny (relative to {tmp_path}); pass the training run's "
                          "--workdir.")
  os.makedirs(tmp_path / "runs" / "empty")
  with pytest.raises(checkpoint.CheckpointError, match=r"^runs/empty holds no checkpoints \(there is no "
                     r".*/runs/empty/checkpoints\); train one with python -m diffmoe_jax\.main --workdir=runs/empty\.$"):
    evaluate.restore_params("runs/empty")
  # A report directory (where an ablation or a search writes its report): training into it is no fix.
  for report, what, command in (("ablation", "an ablation's report", "ablation"), ("ncas", "an NCAS search's report",
                                                                                    "search")):
    shutil.copytree(os.path.join(ROOT, "results", report), tmp_path / report)
    with pytest.raises(checkpoint.CheckpointError) as e:
      evaluate.restore_params(report)
    assert str(e.value) == (f"{report} holds {what}, not a training run; pass the --workdir of one of the "
                            f"{command}'s runs, which evaluate names when given the {command}'s --workdir.")


def test_a_refused_run_removes_the_directories_it_created(tmp_path):
  config = load_config()
  config.curriculum.tokens_per_batch = 128  # long_context: 4 sequences over the tests' 8 devices: refused
  with pytest.raises(ConfigError, match="is not a multiple of the mesh's data-parallel size"):
    main_lib.run(config, str(tmp_path / "new" / "runs" / "a"))
  assert os.listdir(tmp_path) == []
  os.makedirs(tmp_path / "kept")
  with pytest.raises(ConfigError, match="is not a multiple of the mesh's data-parallel size"):
    main_lib.run(config, str(tmp_path / "kept" / "runs" / "a"))
  assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_a_run_interrupted_before_training_removes_the_directories_it_created(tmp_path, monkeypatch):
  """A Ctrl-C while the corpus builds left the new workdir holding only its lock and time record."""
  def interrupted(*_):
    raise KeyboardInterrupt
  monkeypatch.setattr(main_lib.distributed, "check_same_run", interrupted)
  with pytest.raises(KeyboardInterrupt):
    main_lib.run(load_config(), str(tmp_path / "new" / "run"))
  assert os.listdir(tmp_path) == []


def test_a_workdir_another_run_holds_is_refused_before_the_summary(tmp_path, capsys):
  """The run's one-screen summary came first and the refusal after it, where it was easy to miss."""
  with workdir_lib.WorkdirLock(tmp_path):
    with pytest.raises(workdir_lib.WorkdirError, match="is in use by another run"):
      main_lib.run(load_config(), str(tmp_path))
  assert capsys.readouterr().out == ""


def test_a_data_source_that_matches_no_file_is_refused_before_the_summary(tmp_path, capsys):
  """The summary came first, the data error after it; the new workdir is left out too."""
  config = load_config()
  config.data.domains.code = f"files:{tmp_path}/none/*.txt"
  with pytest.raises(data.DataError, match=r"^config\.data\.domains\.code = .* matches no file; fix or remove it\.$"):
    main_lib.run(config, str(tmp_path / "run"))
  assert capsys.readouterr().out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("tokenizer", "bogus", r"^config\.data\.tokenizer = 'bogus' is not a tokenizer spec"),
    ("cache_dir", "{tmp}/a_file", r"^the token cache \S+/a_file cannot be written \(it is a file, not a directory\)"),
])
def test_a_bad_tokenizer_or_cache_dir_is_refused_before_the_summary(tmp_path, capsys, field, value, message):
  """They came after the run's summary (the data source's check, above, read neither)."""
  (tmp_path / "a_file").write_text("")
  config = load_config()
  config.data[field] = value.format(tmp=tmp_path)
  with pytest.raises(data.DataError, match=message):
    main_lib.run(config, str(tmp_path / "run"))
  assert capsys.readouterr().out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["train", "--seq-len", "300"], ["tain"], []])
def test_bench_reports_an_argument_mistake_in_one_line(argv, capsys):
  """Not after the usage, a dozen lines for `train`."""
  with pytest.raises(SystemExit) as info:
    bench.main(argv)
  err = capsys.readouterr().err
  assert info.value.code == 2 and len(err.splitlines()) == 1 and " error: " in err, err
  assert err.endswith(" --help lists the arguments)\n"), err


def test_a_token_cache_that_is_a_file_says_so_without_advice_to_free_space(tmp_path):
  a_file = tmp_path / "cache"
  a_file.write_text("")
  with pytest.raises(data.DataError) as e:
    data.build_corpus(config_lib.defaults().data, cache_root=str(a_file))
  assert str(e.value) == (f"the token cache {a_file} cannot be written (it is a file, not a directory); set "
                          "config.data.cache_dir (or $DIFFMOE_CACHE) to a directory you can write.")


def test_tensorboards_routine_reading_notes_stay_off_the_terminal(tmp_path):
  """The ablation report logged "No path found after <event file>" for every run it read."""
  import logging
  from tensorboard.backend.event_processing import event_accumulator
  from diffmoe_jax.train import metrics
  writer = metrics.MetricWriter(str(tmp_path))
  writer.scalars(1, {"train/loss": 1.0})
  writer.close()
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logging.getLogger().addHandler(handler)
  level = logging.getLogger().level
  logging.getLogger().setLevel(logging.INFO)
  try:
    event_accumulator.EventAccumulator(str(tmp_path)).Reload()
  finally:
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)
  assert records and all(r.name.startswith("tensorboard") and r.levelno < logging.WARNING for r in records)
  assert not any(cli._library_log_filter(r) for r in records)  # pylint: disable=protected-access


def test_an_empty_config_path_is_one_line_not_a_traceback():
  """--config=$CONFIG with the variable unset: the check took the default file, and the flag parser's failure to
  load "" surfaced later as a traceback from the config's first use."""
  assert cli.check_command_line(["--config="], "configs/tiny.py") == (
      "--config is empty; pass a config file, such as --config=configs/tiny.py.")
  assert_one_error(run_cli("diffmoe_jax.main", "--config="), "error: --config is empty")
