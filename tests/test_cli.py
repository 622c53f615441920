"""The command lines as a user meets them: one-line errors, exit codes, the workdir lock, resume checks."""
import fcntl
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from diffmoe_jax import bench, cli
from diffmoe_jax import main as main_lib
from diffmoe_jax.config import ConfigError
from diffmoe_jax.train import checkpoint, loop, resume, workdir as workdir_lib
from test_train import CONFIG_PATH, SUBPROCESS_TIMEOUT_S, _abstract_state, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None, timeout=SUBPROCESS_TIMEOUT_S):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT,
                        env=env or os.environ, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_error(proc, *fragments):
  errors = error_lines(proc.stderr)
  assert proc.returncode == main_lib.EXIT_ERROR and len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def train_command(workdir, *overrides):
  return ("diffmoe_jax.main", f"--config={CONFIG_PATH}", f"--workdir={workdir}", *overrides)


# --- Config files and flags ---------------------------------------------------------------------------------

def test_config_file_and_override_mistakes_are_one_line(tmp_path):
  config = load_config()
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n  pass\n")
  failing = tmp_path / "failing.py"
  failing.write_text("def get_config():\n  return undefined_name\n")
  check = lambda *argv: cli.check_command_line(list(argv), "configs/tiny.py")
  assert "there is no config file missing.py (relative to" in check("--config=missing.py")
  assert check(f"--config={bad}") == f"--config: {bad} line 1: invalid syntax: def get_config(:"
  assert check(f"--config={failing}") == (f"--config: {failing} line 2: NameError: name 'undefined_name' is not "
                                          "defined")
  for returned, kind in (("config_lib.defaults().to_dict()", "dict"), ("None", "NoneType")):  # tracebacks before
    plain = tmp_path / f"returns_{kind}.py"
    plain.write_text(f"from diffmoe_jax import config as config_lib\ndef get_config():\n  return {returned}\n")
    assert check(f"--config={plain}") == (f"--config: {plain}: get_config() returned {kind}, not an "
                                          "ml_collections.ConfigDict; return one, as configs/tiny.py does "
                                          "(diffmoe_jax.config.defaults(), updated).")
  assert check(f"--config={CONFIG_PATH}", "--config.model.moe.num_expert=2") == (
      "--config.model.moe.num_expert: config.model.moe has no field 'num_expert'; closest: "
      "model.moe.num_experts, mesh.shape.expert, model.num_layers.")
  assert "config.model has no field 'nonexistent'; its fields: attention, " in check(
      f"--config={CONFIG_PATH}", "--config.model.nonexistent=1")
  # The section's own close field comes before a closer one elsewhere (the top-level `seed` came first).
  assert check("--config=configs/ablation.py", "--config.ablation.seed=3") == (
      "--config.ablation.seed: config.ablation has no field 'seed'; closest: ablation.seeds, seed.")
  assert check("--config", CONFIG_PATH, "--config.optimizer.peak_rl", "1") == (
      "--config.optimizer.peak_rl: config.optimizer has no field 'peak_rl'; closest: optimizer.peak_lr.")
  # A value cannot go on a section, so `model` is no suggestion; with nothing close in its own section the
  # section's fields come first.
  assert check(f"--config={CONFIG_PATH}", "--config.mesh.shape.model=2") == (
      "--config.mesh.shape.model: config.mesh.shape has no field 'model'; its fields: data, expert, fsdp, tensor; "
      "close elsewhere: model.d_model.")
  assert re.fullmatch(r"--config\.train\.peak_lr: config\.train has no field 'peak_lr'; its fields: allow_config_change, "
                      r"[a-z_, ]+ and \d+ more; close elsewhere: optimizer\.peak_lr\.",
                      check(f"--config={CONFIG_PATH}", "--config.train.peak_lr=1"))
  # Keys of open dicts are the user's to add.
  assert check(f"--config={CONFIG_PATH}", "--config.data.domains.web=files:/data/*.txt",
               "--config.curriculum.anneal.domain_weights.web=0.5", "--config.model.d_model=96") is None
  assert config.model.d_model == 48


def test_main_reports_a_flag_mistake_in_one_line():
  proc = run_cli("diffmoe_jax.main", "--config=configs/tiny.py", "--config.model.nonexistent=1")
  assert_one_error(proc, "--config.model.nonexistent: config.model has no field 'nonexistent'")
  proc = run_cli("diffmoe_jax.main", "--config=configs/tiny.py", "extra")  # not the whole help
  assert_one_error(proc, "unexpected arguments ['extra']; settings are flags, such as --config.train.run_steps=10.")


def test_help_exits_with_0_and_lists_the_config_flag():
  proc = run_cli("diffmoe_jax.main", "--help")
  assert proc.returncode == 0 and "Exit codes:" in proc.stdout and "--workdir" in proc.stdout, proc.stderr[-3000:]
  assert "--config: Path to a config file." in proc.stdout  # ml_collections filed it under another module
  proc = run_cli("diffmoe_jax.estimate", "--help")
  assert proc.returncode == 0 and "--config: Path to a config file" in proc.stdout, proc.stdout


def test_main_refuses_expert_parallelism_the_backend_cannot_run_before_compiling(tmp_path):
  proc = run_cli(*train_command(tmp_path, "--config.mesh.shape.expert=2", "--config.model.moe.dispatch=dropless",
                                "--config.model.moe.expert_parallel=ragged"))
  assert_one_error(proc, "config.model.moe.expert_parallel: 'ragged' needs jax.lax.ragged_all_to_all")
  assert "Compiling" not in proc.stderr


def test_estimate_reports_a_bad_config_in_one_line_and_takes_new_domains():
  proc = run_cli("diffmoe_jax.estimate", "--config=configs/tiny.py", "--config.model.d_model=7")
  assert_one_error(proc, "config.model.d_model: 7 must equal model.num_heads * model.head_dim")
  assert_one_error(run_cli("diffmoe_jax.estimate"),
                   "--config is required: pass a config file, such as --config=configs/tiny.py")
  proc = run_cli("diffmoe_jax.estimate", "--config=configs/tiny.py", "--config.data.domains.web=files:/data/*.txt")
  assert proc.returncode == 0 and "total parameters" in proc.stdout, proc.stderr[-3000:]
  assert "libtpu" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["moe", "--seq-len", "0"], "argument --seq-len: 0 must be at least 1"),
    (["moe", "--top-k", "3", "--experts", "2"], "argument --top-k: 3 exceeds --experts (2)"),
    (["moe", "--capacity-factor", "-1"], "argument --capacity-factor: -1.0 must be a finite number > 0"),
    (["moe", "--capacity-factor", "inf"], "argument --capacity-factor: inf must be a finite number > 0"),
    (["attention", "--memory-gib", "-1"], "argument --memory-gib: -1.0 must be a finite number > 0"),
    (["kernels", "--budget-s", "-5"], "argument --budget-s: -5.0 must be a finite number > 0"),
    (["compile", "--seq-len", "1000"], "argument --seq-len: 1000 exceeds the context of 256"),
    (["train", "--config", "diffmoe_jax/__init__.py"], "argument --config: diffmoe_jax/__init__.py: AttributeError: "
     "module 'diffmoe_config_file' has no attribute 'get_config'"),
    (["expert_parallel", "--experts", "4", "--top-k", "8"], "argument --top-k: 8 exceeds --experts (4)"),
    (["attention", "--batch", "x"], "argument --batch: 'x' is not an integer"),
    (["train", "--config", "configs/none.py"], "argument --config: there is no config file configs/none.py"),
    (["train", "--seq-len", "300"], "argument --seq-len: 300 exceeds the context of 256 (model.max_seq_len of "
     "configs/tiny.py; raise it with --max-seq-len)"),
    (["train", "--seq-len", "300", "--max-seq-len", "288"], "argument --seq-len: 300 exceeds the context of 288 "
     "(--max-seq-len)"),
    (["kernels", "--rows", "24"], "argument --rows: 24 must be a power of two of at least 16 that divides "
     "--seq-len (8192)"),
    (["train", "--remat-policy", "save_names"], "argument --remat-save-names: give it with --remat-policy "
     "save_names, or dots / dots_no_batch"),
    (["train", "--remat-save-names", "attn_out"], "argument --remat-save-names: give it with --remat-policy "
     "save_names, or dots / dots_no_batch"),
    (["generate", "--capacity", "1.5"], "argument --capacity: 1.5 must lie in (0, 1]"),
    (["expert_parallel", "--expert-axis", "1"], "argument --expert-axis: 1 must be at least 2"),
    (["train", "--phase", "long-context"], "argument --phase: 'long-context' is not a phase of configs/tiny.py; "
     "choose from ['warmup', 'foundation', 'sparsify', 'specialize', 'long_context', 'anneal']"),
    (["train", "--attention-gpu-launch", "dkv=64,32"], "argument --attention-gpu-launch: "
     "config.model.attention_gpu_launch.dkv: '64,32' is not 'rows,step,warps,stages'"),
    (["train", "--attention-gpu-launch", "bwd=64,32,4,2"], "argument --attention-gpu-launch: "
     "config.model.attention_gpu_launch.bwd: is not a GPU kernel; set one of ('forward', 'dq', 'dkv')."),
])
def test_bench_rejects_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit) as info:
    bench.main(argv)
  assert info.value.code == 2 and message in capsys.readouterr().err


def test_bench_reports_a_bad_config_in_one_line(tmp_path, capsys):
  bad = tmp_path / "bad.py"
  bad.write_text("from diffmoe_jax import config as config_lib\n\ndef get_config():\n"
                 "  c = config_lib.load_file('configs/tiny.py')\n  c.model.d_model = 7\n  return c\n")
  with pytest.raises(SystemExit) as info:
    bench.main(["train", "--config", str(bad)])
  err = capsys.readouterr().err
  assert info.value.code == 1 and err.startswith("error: config.model.d_model: 7 must equal") and err.count("\n") == 1


def test_a_config_path_under_home_is_read_through_its_tilde(tmp_path, monkeypatch, capsys):
  # The shell leaves the ~ of --config=~/... as it is; it was "no config file ~/t.py (relative to <cwd>)".
  shutil.copy(CONFIG_PATH, tmp_path / "t.py")
  proc = run_cli("diffmoe_jax.estimate", "--config=~/t.py", env={**os.environ, "HOME": str(tmp_path)})
  assert proc.returncode == 0 and "total parameters" in proc.stdout, proc.stderr[-3000:]
  (tmp_path / "bad.py").write_text("from diffmoe_jax import config as config_lib\n\ndef get_config():\n"
                                   f"  c = config_lib.load_file({CONFIG_PATH!r})\n  c.model.d_model = 7\n  return c\n")
  monkeypatch.setenv("HOME", str(tmp_path))
  with pytest.raises(SystemExit) as info:
    bench.main(["train", "--config=~/bad.py"])
  assert info.value.code == 1 and capsys.readouterr().err.startswith("error: config.model.d_model: 7 must equal")


# --- The workdir --------------------------------------------------------------------------------------------

def test_an_empty_workdir_is_refused_not_the_current_directory(tmp_path):
  assert_one_error(run_cli(*train_command("")), "The workdir is empty; pass the run's directory")
  with pytest.raises(workdir_lib.WorkdirError, match="The workdir is empty"):
    workdir_lib.prepare(" ")


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("")
  assert_one_error(run_cli(*train_command(path)), f"The workdir {path} is a file, not a directory")
  with pytest.raises(workdir_lib.WorkdirError, match=f"Cannot create the workdir {path}/run: Not a directory"):
    workdir_lib.prepare(path / "run")


def test_a_runs_checkpoints_or_tensorboard_directory_is_not_taken_for_a_workdir(tmp_path):
  """`--workdir=runs/tiny/checkpoints` (the path the log names) started a second run from scratch inside the
  first one's checkpoints; it is refused, naming the run's workdir."""
  run = tmp_path / "run"
  (run / "checkpoints" / "12").mkdir(parents=True)
  (run / "tb").mkdir()
  (run / "lock").write_text("")
  for inner, part in (("checkpoints", "checkpoints"), ("checkpoints/12", "checkpoints"), ("tb", "TensorBoard")):
    with pytest.raises(workdir_lib.WorkdirError, match=rf"^The workdir {run}/{inner} lies in the {part} directory "
                       rf"of the run in {run}; pass --workdir={run} to resume that run, or another directory\.$"):
      workdir_lib.prepare(run / inner)
  assert sorted(os.listdir(run / "checkpoints")) == ["12"]  # nothing written there
  assert workdir_lib.prepare(run) == str(run)
  # A directory named checkpoints that is no run's (no lock beside it) is an ordinary workdir.
  assert workdir_lib.prepare(tmp_path / "other" / "checkpoints") == str(tmp_path / "other" / "checkpoints")


_HOLD_LOCK = """
import fcntl, os, socket, sys, time
f = open(os.path.join(sys.argv[1], "lock"), "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.truncate(0); f.write(f"{socket.gethostname()} {os.getpid()} 2026-01-01 00:00:00\\n"); f.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError, match=rf"is in use by another run \(PID {holder.pid} on host "):
      loop.train(load_config(), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone: its lock went with it, though the file still names it.
  with workdir_lib.WorkdirLock(tmp_path) as lock:
    with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by another run \(PID {os.getpid()} "):
      workdir_lib.WorkdirLock(tmp_path).acquire()
  assert lock._file is None
  with open(tmp_path / "lock") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


def test_checkpoints_path_that_is_a_file(tmp_path, monkeypatch):
  """Refused before the data is built (minutes for a large corpus), not after."""
  (tmp_path / "checkpoints").write_text("")
  monkeypatch.setattr(loop.data, "build_corpus", lambda *args: pytest.fail("the data was built first"))
  with pytest.raises(checkpoint.CheckpointError, match=f"{tmp_path}/checkpoints is a file, not a directory"):
    loop.train(load_config(), str(tmp_path))


# --- A stopped run, and resuming it -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """One step of the test config by the command line, without JAX_PLATFORMS (so JAX probes for a TPU)."""
  workdir = str(tmp_path_factory.mktemp("stopped"))
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  return workdir, run_cli(*train_command(workdir, "--config.train.run_steps=1"), env=env)


def test_stopped_early_exits_3_and_says_so_quietly(stopped_run):
  workdir, proc = stopped_run
  assert proc.returncode == main_lib.EXIT_STOPPED_EARLY, proc.stderr[-3000:]
  assert "Stopped by train.run_steps at step 1 of 24" in proc.stderr
  assert "libtpu" not in proc.stderr and "Traceback" not in proc.stderr
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [1]


def test_resuming_with_another_model_names_the_fields_before_restoring(stopped_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run[0], workdir)
  before = sorted(glob.glob(f"{workdir}/checkpoints/**", recursive=True))
  proc = run_cli(*train_command(workdir, "--config.model.num_heads=1", "--config.model.head_dim=48"))
  assert_one_error(proc, "The checkpoint at step 1 in", "holds a train state of another shape",
                   "params/groups/layer_0/block/attention/head_norm/scale saved float32[2, 24], now float32[2, 48]",
                   "model.head_dim 24 -> 48, model.num_heads 2 -> 1",
                   "pass a new --workdir")
  assert "Event loop is closed" not in proc.stderr and "Cannot restore" not in proc.stderr
  assert sorted(glob.glob(f"{workdir}/checkpoints/**", recursive=True)) == before


def test_resuming_with_a_changed_setting_needs_it_allowed(stopped_run):
  workdir = stopped_run[0]
  saved = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).restore_config(1)
  abstract = _abstract_state(load_config())
  shapes = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).saved_shapes(1)
  check = lambda config: resume.check(config, saved_config=saved, saved_shapes=shapes, abstract_state=abstract,
                                      step=1, directory="ckpts")
  config = load_config()
  config.optimizer.peak_lr = 0.02
  config.seed = 5
  with pytest.raises(ConfigError, match=r"saved with another config: optimizer\.peak_lr 0\.01 -> 0\.02, seed 0 -> 5\. "
                                        r".*--config\.train\.allow_config_change=optimizer\.peak_lr,seed"):
    check(config)
  config.train.allow_config_change = "optimizer.*"
  with pytest.raises(ConfigError, match=r"another config: seed 0 -> 5\."):
    check(config)
  config.train.allow_config_change = "optimizer.peak_lr, seed"
  config.mesh.shape.data = 4
  config.train.run_steps = 0
  check(config)  # allowed, and layout / bookkeeping changes are free
  config.model.update(attention_impl="blockwise", remat_policy="save_names", remat_save_names=("attn_out",))
  config.model.attention_gpu_launch.dkv = "64,32,4,2"
  config.model.attention_gpu_forward = "mosaic"
  check(config)  # how attention and remat run is free too
  config.model.attention_gpu_forward = "triton"  # (validated below: "mosaic" needs a 16-bit model.dtype)
  config.model.moe.update(expert_parallel="gather", dropless_impl="padded")
  check(config)  # and how the MoE layer computes the same function
  # A field the code no longer has is ignored; one it added since the save is a change from <absent>.
  older = {**saved, "data": {**saved["data"], "eval_domain": ""},
           "model": {k: v for k, v in saved["model"].items() if k != "attention_gpu_launch"}}
  check_older = lambda: resume.check(config, saved_config=older, saved_shapes=shapes, abstract_state=abstract,
                                     step=1, directory="ckpts")
  check_older()
  del older["model"]["tie_embeddings"]
  with pytest.raises(ConfigError, match=r"another config: model\.tie_embeddings <absent> -> false\."):
    check_older()
  config.mesh.shape.data = -1
  config.model.moe.num_experts = 2
  with pytest.raises(ConfigError, match=r"another shape .*model\.moe\.num_experts 4 -> 2"):
    resume.check(config, saved_config=saved, saved_shapes=shapes, abstract_state=_abstract_state(config),
                 step=1, directory="ckpts")


def test_resuming_after_the_training_files_changed_needs_it_allowed(tmp_path):
  """The resume read the appended file silently: the rest of the run trained on other data."""
  text, docs = tmp_path / "text", tmp_path / "docs"
  text.mkdir()
  docs.mkdir()
  for i in range(40):
    (text / f"{i:02d}.py").write_text("".join(f"def f{i}_{j}(x):\n  return x * {j} + {i}\n\n" for j in range(40)))
    (docs / f"{i:02d}.md").write_text("".join(f"Note {i} gives the value {j}.\n" for j in range(40)))
  # Domains are split together: with the built-in docs domain each run would split the stdlib again (15 s).
  run = lambda *extra: run_cli(*train_command(tmp_path / "run", f"--config.data.domains.code=files:{text}/*.py",
                                              f"--config.data.domains.docs=files:{docs}/*.md",
                                              f"--config.data.cache_dir={tmp_path / 'cache'}", *extra))
  assert run("--config.train.run_steps=1").returncode == main_lib.EXIT_STOPPED_EARLY
  with open(text / "07.py", "a") as f:
    f.write("def appended():\n  return 1\n")
  assert_one_error(run("--config.train.run_steps=2"), "The checkpoint at step 1 in", "trained on other data: "
                   "config.data.domains.code: its files, or files it is split with, changed since",
                   "--config.train.allow_config_change=data.files")
  proc = run("--config.train.run_steps=2", "--config.train.allow_config_change=data.files")
  assert proc.returncode == main_lib.EXIT_STOPPED_EARLY and "on other training data" in proc.stderr, proc.stderr[-3000:]


def test_unreadable_checkpoints_are_one_line_each(stopped_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped_run[0], workdir)
  for path in glob.glob(f"{workdir}/checkpoints/1/state/**/d/*", recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  proc = run_cli(*train_command(workdir))
  assert_one_error(proc, "No checkpoint in",
                   "newest first: step 1: its files cannot be read: a file is missing or shorter")
  assert "Event loop is closed" not in proc.stderr
  warnings = [line for line in proc.stderr.splitlines() if line.startswith("W")]
  assert len(warnings) == 1 and "Cannot restore the checkpoint at step 1" in warnings[0], proc.stderr[-3000:]
  assert "its files cannot be read: a file is missing or shorter than recorded (truncated) (ValueError: " in warnings[0]


def test_a_failed_restores_unretrieved_read_errors_stay_off_the_terminal():
  """The other tensorstore reads of a failed restore end as asyncio tasks whose errors nobody retrieves; asyncio
  logged each with a traceback when the garbage collector took its task, so the test above failed when that
  happened before exit."""
  import logging
  read_error = ("Task exception was never retrieved\nfuture: <Task finished name='Task-223' coro=<_wrap_awaitable() "
                "done> exception=ValueError('OUT_OF_RANGE: Error reading \"rng/.zarray\" in OCDBT database "
                "[tensorstore_spec=\\'{}\\']')>")
  record = logging.LogRecord("asyncio", logging.ERROR, "asyncio/base_events.py", 1771, read_error, None, None)
  assert not cli._library_log_filter(record)  # pylint: disable=protected-access
  other = logging.LogRecord("asyncio", logging.ERROR, "asyncio/base_events.py", 1771,
                            "Task exception was never retrieved\nfuture: <Task exception=KeyError('x')>", None, None)
  assert cli._library_log_filter(other)  # pylint: disable=protected-access


_FULL_DISK_MAIN = """
import errno, os, runpy, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler
async def no_space(self, x, directory):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
json_checkpoint_handler.JsonCheckpointHandler._save_fn = no_space
sys.argv = ["diffmoe_jax.main", *sys.argv[1:]]
runpy.run_module("diffmoe_jax.main", run_name="__main__")
"""


def test_a_full_disk_stops_the_run_with_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _FULL_DISK_MAIN, *train_command(tmp_path, "--config.train.run_steps=1")[1:]],
                        capture_output=True, text=True, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT_S)
  assert_one_error(proc, f"Cannot save the checkpoint at step 1 in {tmp_path}/checkpoints",
                   "No space left on device")
  assert os.listdir(tmp_path / "checkpoints") == []


def test_a_compilation_cache_dir_that_cannot_hold_programs_is_one_line(tmp_path):
  """JAX only warned, naming no field, and every run compiled every program again."""
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  proc = run_cli(*train_command(tmp_path / "run", f"--config.train.compilation_cache_dir={a_file}"))
  assert_one_error(proc, f"config.train.compilation_cache_dir: {a_file} cannot hold the compiled programs (it or a "
                   "directory above it is a file); set it to a directory you can write, or to '' to use none.")
  config = load_config()
  config.train.compilation_cache_dir = str(a_file / "cache")
  with pytest.raises(ConfigError, match=re.escape(f"{a_file / 'cache'} cannot hold the compiled programs (it or a "
                                                  "directory above it is a file)")):
    cli.use_compilation_cache(config)


def test_cache_hits_tells_a_loaded_program_from_a_compiled_one(tmp_path):
  """The train loop logs whether each program was compiled or loaded from the persistent compilation cache:
  the same program compiled twice (the in-memory caches cleared between) is a miss, then a hit."""
  script = """
import jax, jax.numpy as jnp
from diffmoe_jax import cli
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
counts = []
for _ in range(2):
  jax.clear_caches()
  with cli.cache_hits() as hits:
    jax.jit(lambda x: jnp.sin(x) * 3).lower(jnp.ones(8)).compile()
  counts.append(bool(hits))
print(counts)
"""
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=SUBPROCESS_TIMEOUT_S)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == "[False, True]", run.stdout
