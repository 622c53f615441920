"""Ctrl-C in every command: one line and exit 130, never lost (a signal Python drops inside a gc or weakref callback,
a __del__, or the import of JAX is sent again), and a second press stops a run at once."""
import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref

import pytest
from absl import logging as absl_logging

from diffmoe_jax import cli
from diffmoe_jax import main as main_lib
from diffmoe_jax.train import checkpoint, signals as signals_lib
from test_cli import ROOT, error_lines, train_command
from test_train import CONFIG_PATH, SUBPROCESS_TIMEOUT_S, _abstract_state, load_config


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
  proc = subprocess.Popen([sys.executable, "-m", *train_command(tmp_path, "--config.curriculum.total_steps=2400")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  lines = []
  try:
    deadline = time.time() + SUBPROCESS_TIMEOUT_S
    for wanted in ("Building the train step", "Received SIGINT"):
      while time.time() < deadline:
        lines.append(proc.stderr.readline())
        if wanted in lines[-1]:
          break
        assert lines[-1] or proc.poll() is None, "".join(lines)[-3000:]
      proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
  finally:
    proc.kill()
  assert proc.returncode == main_lib.EXIT_INTERRUPTED, err[-3000:]
  assert err.count("\n") <= 2 and "Traceback" not in err, err[-3000:]
  assert error_lines(err)[0].startswith("error: interrupted at once (a second Ctrl-C")


def test_ctrl_c_in_a_reading_command_is_one_line():
  """evaluate and generate run their main through cli.interruptible: Ctrl-C ends them in one line, exit 130."""
  code = ("from diffmoe_jax import cli\n"
          "def main(argv):\n  raise KeyboardInterrupt\n"
          "cli.interruptible(main)([])\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 130 and proc.stderr.strip() == "error: interrupted.", proc.stderr


@pytest.fixture
def interrupts_kept():
  """Python's default Ctrl-C handler (a command's; pytest-xdist's workers replace it) and the hook that
  `keep_dropped_interrupts` installs, both restored afterwards."""
  previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
  previous_hook = sys.unraisablehook
  cli.keep_dropped_interrupts()
  yield
  sys.unraisablehook = previous_hook
  signal.signal(signal.SIGINT, previous_handler)


def test_ctrl_c_inside_a_garbage_collection_callback_still_interrupts(interrupts_kept):
  """Python drops an exception raised in a gc callback (JAX registers one): a Ctrl-C that arrived there was
  lost, and the command ran on."""
  def callback(phase, info):
    if phase == "start":
      signal.raise_signal(signal.SIGINT)  # its KeyboardInterrupt is raised here, inside the callback

  gc.callbacks.append(callback)
  try:
    with pytest.raises(KeyboardInterrupt):
      gc.collect()
      time.sleep(10)  # the Ctrl-C sent again ends this wait
  finally:
    gc.callbacks.remove(callback)


def test_ctrl_c_inside_a_weakref_callback_still_interrupts(interrupts_kept):
  """A collection also runs weakref callbacks, which drop exceptions too: a Ctrl-C sent again after landing
  in a gc callback could land in one of those and be lost for good."""
  class Referent:
    pass
  referent = Referent()
  ref = weakref.ref(referent, lambda _: signal.raise_signal(signal.SIGINT))
  with pytest.raises(KeyboardInterrupt):
    del referent  # the callback runs here
    time.sleep(10)
  assert ref() is None


def test_ctrl_c_sent_again_while_the_hook_still_runs_still_interrupts(interrupts_kept, monkeypatch):
  """On a busy machine the main thread can still be inside the hook, starting the thread that sends the Ctrl-C
  again, when that thread sends it: the KeyboardInterrupt was raised in the hook, dropped, and not sent again."""
  class SlowFirstStart(threading.Timer):
    started = 0

    def start(self):
      super().start()
      SlowFirstStart.started += 1
      if SlowFirstStart.started == 1:
        time.sleep(1)  # the Ctrl-C sent 0.02 s after the start lands here, inside the hook

  monkeypatch.setattr(threading, "Timer", SlowFirstStart)
  referent = type("Referent", (), {})()
  ref = weakref.ref(referent, lambda _: signal.raise_signal(signal.SIGINT))
  with pytest.raises(KeyboardInterrupt):
    del referent
    time.sleep(10)
  assert ref() is None and SlowFirstStart.started == 2


@pytest.fixture
def quiet_output(interrupts_kept):
  """`quiet_library_output`, which a command calls after `parse_flags` installed `keep_dropped_interrupts`; its log
  filters are removed afterwards (its unraisable hook goes with `interrupts_kept`'s)."""
  yield cli.quiet_library_output
  absl_logging.get_absl_handler().removeFilter(cli._library_log_filter)  # pylint: disable=protected-access
  absl_logging.get_absl_logger().removeFilter(cli._library_log_filter)  # pylint: disable=protected-access


def test_ctrl_c_dropped_after_the_output_is_quieted_still_interrupts(quiet_output):
  """Every command quiets the libraries' output after parsing its flags, and that replaced the hook that sends a
  dropped Ctrl-C again: one landing in a gc callback while main built the corpus was lost."""
  quiet_output()

  def callback(phase, info):
    if phase == "start":
      signal.raise_signal(signal.SIGINT)

  gc.callbacks.append(callback)
  try:
    with pytest.raises(KeyboardInterrupt):
      gc.collect()
      time.sleep(10)
  finally:
    gc.callbacks.remove(callback)


def test_a_closed_event_loop_is_dropped_and_other_exceptions_still_reported(quiet_output, monkeypatch):
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  quiet_output()

  class Closing:
    def __init__(self, error):
      self.error = error

    def __del__(self):
      raise self.error
  Closing(RuntimeError("Event loop is closed"))
  Closing(ValueError("in __del__"))
  assert [type(unraisable.exc_value) for unraisable in reported] == [ValueError]


def test_other_dropped_exceptions_still_reach_the_previous_hook(interrupts_kept, monkeypatch):
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  cli.keep_dropped_interrupts()

  class Broken:
    def __del__(self):
      raise ValueError("in __del__")
  Broken()  # dropped at once, when its last reference goes
  assert [type(unraisable.exc_value) for unraisable in reported] == [ValueError]


def test_ctrl_c_while_the_config_file_loads_is_one_line(interrupts_kept, tmp_path, capsys):
  """A search config imports the data pipeline (seconds): a Ctrl-C then ended in a traceback."""
  path = tmp_path / "slow_config.py"
  path.write_text("raise KeyboardInterrupt  # as a Ctrl-C during its imports\n")
  with pytest.raises(SystemExit) as stopped:
    cli.parse_flags(None)(["prog", f"--config={path}"])
  assert stopped.value.code == 130
  assert capsys.readouterr().err.strip() == "error: interrupted."


def test_ctrl_c_while_a_command_imports_jax_is_one_line():
  """`python -m diffmoe_jax.<command>` imports JAX for seconds before it parses its flags: a Ctrl-C then ended in a
  traceback from the import system, broke JAX's initialisation (an unrelated error), or was dropped in a gc
  callback and the command ran to the end. It is noted and ends the command as it starts."""
  code = ("import runpy, signal, sys\n"
          "sys.argv = ['-m']  # as while `python -m` finds the command\n"
          "import diffmoe_jax\n"
          "signal.raise_signal(signal.SIGINT)  # during the imports\n"
          "import jax\n"
          "sys.argv = ['estimate', '--config=configs/tiny.py']\n"
          "runpy.run_module('diffmoe_jax.estimate', run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert (proc.returncode, proc.stdout, proc.stderr.strip()) == (130, "", "error: interrupted."), proc.stderr[-2000:]


def test_sigterm_mid_run_leaves_a_restorable_checkpoint(tmp_path):
  workdir = str(tmp_path)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the same 8 devices and caches as this process
  proc = subprocess.Popen(
      [sys.executable, "-m", "diffmoe_jax.main", f"--config={CONFIG_PATH}", "--config.curriculum.total_steps=2400",
       "--config.train.log_every=1", f"--workdir={workdir}"],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
  deadline, seen = time.time() + SUBPROCESS_TIMEOUT_S, 0
  try:
    while time.time() < deadline and seen < 3:
      line = proc.stderr.readline()
      if not line and proc.poll() is not None:
        break
      match = re.search(r"step (\d+)/2400", line)
      seen = int(match.group(1)) if match else seen
    assert seen >= 3, "the trainer never reported step 3"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
  finally:
    proc.kill()
  assert proc.returncode == main_lib.EXIT_STOPPED_EARLY, err[-3000:]
  assert "Stopped by SIGTERM" in err
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step
  assert step is not None and seen <= step < 2400
  state, restored_step = ckpt.restore_latest(_abstract_state(load_config()))
  assert restored_step == step and int(state.step) == step
  assert ckpt.restore_config()["curriculum"]["total_steps"] == 2400


def test_a_second_ctrl_c_that_python_swallows_still_interrupts(capsys):
  """A signal handler runs inside whatever Python code is current: a second Ctrl-C landing in a garbage-collection
  callback or a __del__ raised a KeyboardInterrupt there that Python printed as "Exception ignored" and dropped,
  so the run went on to a graceful stop."""

  class Finalized:
    def __init__(self, flag):
      self.flag = flag

    def __del__(self):
      self.flag._handle(signal.SIGINT, None)  # pylint: disable=protected-access

  with signals_lib.StopSignals() as flag:
    flag._handle(signal.SIGINT, None)  # pylint: disable=protected-access
    assert flag.check() == "SIGINT"
    obj = Finalized(flag)
    del obj  # the second SIGINT's KeyboardInterrupt is raised inside __del__, where Python cannot propagate it
    with pytest.raises(KeyboardInterrupt):
      flag.check()
  assert "Exception ignored" not in capsys.readouterr().err
