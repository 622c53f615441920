"""Multi-process training on localhost: two processes (one CPU device each, gloo collectives) against one.

Each trainer is a `python -m diffmoe_jax.main` subprocess, joined by its --coordinator_address,
--num_processes and --process_id flags. The one-process reference runs on two simulated devices, so both meshes are data=2 and reduce in
the same order. The first four steps are all warmup (one compiled program per run).
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffmoe_jax import distributed, gathering
from diffmoe_jax import main as main_lib
from diffmoe_jax.train import checkpoint
from diffmoe_jax.train import workdir as workdir_lib
from conftest import subprocess_xla_flags
from test_train import _abstract_state, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ARGS = [f"--config={os.path.join(ROOT, 'tests', 'train_config.py')}",
               "--config.curriculum.warmup.steps=4", "--config.train.checkpoint_every=2"]
TIMEOUT_S = 600  # per trainer subprocess: compiling on a busy 2-core machine is slow


def _env(devices: int) -> dict:
  """This session's caches and compile flags, without the 8 simulated devices conftest sets for in-process tests."""
  return {**os.environ, "XLA_FLAGS": subprocess_xla_flags(devices), "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
          "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
  return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
  """`count` distinct free ports: each socket stays bound until all are chosen (one bound and closed at a time,
  the system may hand out the same port again, and two runs then joined one coordinator)."""
  with contextlib.ExitStack() as stack:
    sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]


def _start(workdir: str, extra: list[str], *, process_id: int | None = None, port: int = 0, devices: int = 1,
           environ: dict | None = None):
  args = [sys.executable, "-m", "diffmoe_jax.main", *CONFIG_ARGS, f"--workdir={workdir}", *extra]
  if process_id is not None:
    args += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process_id}",
             "--distributed_timeout_s=10"]
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**_env(devices), **(environ or {})})


def _finish(procs) -> list[tuple[str, str]]:
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT_S))
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == main_lib.EXIT_STOPPED_EARLY, err[-3000:]  # every run here stops by train.run_steps
  return outputs


def _refusals(procs) -> list[str]:
  """The last stderr line of each process, which must have stopped with exit 1 and no traceback."""
  try:
    errors = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errors):
    assert p.returncode == main_lib.EXIT_ERROR and "Traceback" not in err, err[-3000:]
  return [err.strip().splitlines()[-1] for err in errors]


def _losses(workdir: str) -> dict[int, float]:
  acc = EventAccumulator(os.path.join(workdir, "tb"), size_guidance={"scalars": 0})
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """Steps 0-4 in one process on two devices, with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("one"))
  _finish([_start(workdir, ["--config.train.run_steps=4"], devices=2)])
  return workdir


def test_saved_by_one_process_restored_and_trained_by_two(one_process, tmp_path):
  """Two processes resume the one-process checkpoint of step 2 and train steps 3 and 4 to the same losses."""
  workdir = str(tmp_path / "two")
  shutil.copytree(os.path.join(one_process, "checkpoints", "2"), os.path.join(workdir, "checkpoints", "2"))
  port = _free_port()
  outputs = _finish([_start(workdir, ["--config.train.run_steps=2"], process_id=i, port=port) for i in (0, 1)])
  for _, err in outputs:
    assert "Resumed from the checkpoint at step 2" in err
    assert "2 global devices" in err
  # Process 0 alone prints the summary and where the checkpoints and TensorBoard logs are.
  assert [out.count("diffmoe_jax: train_test ->") for out, _ in outputs] == [1, 0], outputs[1][0][-2000:]
  assert [out.count("checkpoints: ") for out, _ in outputs] == [1, 0], outputs[1][0][-2000:]
  want, got = _losses(one_process), _losses(workdir)
  assert sorted(got) == [3, 4]
  np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=1e-5)
  # Only process 0 writes TensorBoard; both share this host's workdir, so one event file means one writer.
  assert len([f for f in os.listdir(os.path.join(workdir, "tb")) if f.startswith("events.")]) == 1
  # Every process wrote its own part of the step-4 checkpoint, and together they equal the one-process state.
  state_dir = os.path.join(workdir, "checkpoints", "4", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  abstract = _abstract_state(load_config())
  two_state, step = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(abstract)
  one_state, _ = checkpoint.Checkpointer(os.path.join(one_process, "checkpoints")).restore_latest(abstract)
  assert step == 4 and int(two_state.step) == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               two_state.params, one_state.params)


def _read_until(proc, pattern: str) -> tuple[re.Match, str]:
  """Reads `proc`'s stderr up to the first line matching `pattern`: the match and the text read."""
  deadline, lines = time.time() + TIMEOUT_S, []
  while time.time() < deadline:
    line = proc.stderr.readline()
    if not line and proc.poll() is not None:
      break
    lines.append(line)
    if match := re.search(pattern, line):
      return match, "".join(lines)
  raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(lines)[-3000:])


def test_a_signal_to_one_process_stops_both_and_killing_one_stops_the_other(one_process, tmp_path):
  """From scratch: the first loss equals the one-process run's. SIGTERM to process 1 alone stops both processes
  at the same step with its checkpoint (process 0 waited in the next step's collectives forever); both resume
  from it; then process 1 dies and process 0 exits with one line."""
  workdir, port = str(tmp_path), _free_port()
  start = lambda: [_start(workdir, ["--config.curriculum.total_steps=2400"], process_id=i, port=port) for i in (0, 1)]
  procs = start()
  try:
    _, text = _read_until(procs[0], r"step 2/2400")
    first_loss = float(re.search(r"step 1/2400 .*loss ([\d.]+)", text).group(1))
    assert first_loss == pytest.approx(_losses(one_process)[1], abs=1e-4)
    procs[1].send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [main_lib.EXIT_STOPPED_EARLY] * 2, errors[0][-3000:]
  stopped = [re.search(r"Stopped by SIGTERM at step (\d+) of 2400", err) for err in errors]
  assert stopped[0] and stopped[1] and stopped[0].group(1) == stopped[1].group(1), errors[1][-3000:]
  step = int(stopped[0].group(1))
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step == step

  procs = start()
  try:
    _read_until(procs[0], rf"Resumed from the checkpoint at step {step}\b")
    _read_until(procs[0], rf"step {step + 1}/2400")
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=TIMEOUT_S)
    exit_after = time.time() - killed_at
  finally:
    for p in procs:
      p.kill()
  assert procs[0].returncode != 0
  assert exit_after < 120, f"process 0 took {exit_after:.0f} s to exit after its peer died"
  assert "error: process 0 of 2 lost another process of this run" in err, err[-3000:]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="off", num_processes=2, process_id=0), "--distributed=off contradicts --num_processes"),
    (dict(num_processes=2), "--num_processes and --process_id go together"),
    (dict(num_processes=2, process_id=2, coordinator_address="h:1"), r"--process_id=2 must lie in 0 \.\. "),
    (dict(num_processes=2, process_id=0), "need --coordinator_address=HOST:PORT"),
    (dict(coordinator_address="h:1"), "--coordinator_address needs --num_processes"),
    # JAX's own check said to give --coordinator_address, which the variable gives.
    (dict(environ={"JAX_COORDINATOR_ADDRESS": "h:1"}), r"^JAX_COORDINATOR_ADDRESS needs --num_processes=N and "
     r"--process_id=I \(0 \.\. N-1\) when no launcher"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, timeout_s=0), "at least 1 second"),
    # Open MPI 5, which JAX does not recognise: each process trained apart on the same workdir.
    (dict(environ={"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}), r"^mpirun started 4 processes, but "
     r"JAX recognises Open MPI 4 only \(OMPI_MCA_orte_hnp_uri is unset\): give each process --coordinator_address="),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), r"--num_processes=0 must be at least 1\."),
    # JAX's runtime answers these with an IndexError traceback or a C++ abort after its timeout.
    (dict(coordinator_address="notanaddress", num_processes=2, process_id=1),
     r"--coordinator_address='notanaddress' is not HOST:PORT with a port in 1\.\.65535"),
    (dict(coordinator_address="h:99999", num_processes=2, process_id=1), "is not HOST:PORT"),
    # The same checks for the address JAX reads from the environment (a ValueError or OverflowError traceback).
    (dict(num_processes=2, process_id=0, environ={"JAX_COORDINATOR_ADDRESS": "notanaddress"}),
     r"JAX_COORDINATOR_ADDRESS='notanaddress' is not HOST:PORT"),
    (dict(num_processes=2, process_id=1, environ={"JAX_COORDINATOR_ADDRESS": "h:99999"}),
     r"JAX_COORDINATOR_ADDRESS='h:99999' is not HOST:PORT"),
])
def test_flags_that_cannot_work_together(kwargs, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.initialize(**{"environ": {}, **kwargs})


def test_a_coordinator_port_in_use_is_refused_before_jax_starts():
  """Process 0 hosts the coordinator: a port another program listens on made JAX's runtime segfault."""
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(distributed.DistributedError, match=rf"port {port} cannot be opened on this host, process "
                       r"0's \(.*\); choose a free port\."):
      distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=0, environ={})


def test_a_coordinator_that_cannot_be_reached_is_one_line_after_the_init_timeout():
  """JAX's runtime aborted (exit 134, a stack dump) after its timeout for either."""
  start = time.monotonic()
  with pytest.raises(distributed.DistributedError, match=rf"process 1 could not reach the coordinator at "
                     rf"127\.0\.0\.1:{(port := _free_port())} within --distributed_init_timeout_s=1 s \(.*; process 0 "
                     r"not started, or stopped at start: see its log\): start process 0 with the same "):
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=1, init_timeout_s=1,
                           environ={})
  assert time.monotonic() - start < 30
  with pytest.raises(distributed.DistributedError, match=r"cannot resolve host 'nosuchhost\.invalid'"):
    distributed.initialize(coordinator_address="nosuchhost.invalid:1234", num_processes=2, process_id=1,
                           init_timeout_s=1, environ={})


def test_process_0_alone_stops_with_one_line_after_the_init_timeout(tmp_path):
  """JAX's runtime ended process 0 with a C++ abort (exit 134, a stack dump) when a peer never arrived."""
  proc = _start(str(tmp_path / "run"), ["--distributed_init_timeout_s=2"], process_id=0, port=_free_port())
  line, = _refusals([proc])
  assert re.fullmatch(r"error: process\(es\) \[1\] of 2 did not join process 0 at 127\.0\.0\.1:\d+ within "
                      r"--distributed_init_timeout_s=2 s \(not started, or stopped at start: see its log\): start "
                      r"every process 0 \.\. 1 with the same "
                      r"--coordinator_address and --num_processes, or raise the timeout\.", line), line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("peers, message", [
    ([(1, 3)], r"process\(es\) \[2\] of 3 did not join process 0 at .* within --distributed_init_timeout_s=1 s \(not "
              r"started, or stopped at start: see its log\): "),
    ([(1, 3), (1, 3)], r"two processes were started with --process_id=1; give each process its own --process_id, "
                       r"0 \.\. 2\."),
    ([(1, 2)], r"process 1 was started with --num_processes=2, process 0 with 3; give every process the same "
               r"--num_processes\."),
])
def test_processes_that_cannot_make_one_run_get_process_0s_reason(peers, message):
  """Process 0 gathers the others before JAX's runtime starts, which aborted (exit 134) on a peer that never
  arrived or an id given twice; every process that joined gets process 0's line."""
  address = f"127.0.0.1:{_free_port()}"
  errors = {}

  def join(k, process_id, num_processes):
    try:
      gathering.join_process_0(address, num_processes, process_id, timeout_s=5)
      errors[k] = None
    except distributed.DistributedError as e:
      errors[k] = str(e)

  threads = [threading.Thread(target=join, args=(k, *peer)) for k, peer in enumerate(peers)]
  for t in threads:
    t.start()
  with pytest.raises(distributed.DistributedError, match=message) as process_0:
    gathering.gather_processes(address, 3, timeout_s=1)
  for t in threads:
    t.join(timeout=30)
  assert errors == {k: str(process_0.value) for k in range(len(peers))}


def test_processes_on_other_configs_or_workdirs_stop_with_one_line(tmp_path):
  """Different configs (which failed in a collective or trained apart unnoticed) and workdirs that are not one
  directory (which hung at the first checkpoint): every process stops before training, with the same line."""
  for name, extras in (("config", (["--config.optimizer.peak_lr=0.1"], [])),
                       ("workdir", ([f"--workdir={tmp_path / 'other'}"], []))):
    port = _free_port()
    for line in _refusals([_start(str(tmp_path / name), extras[i], process_id=i, port=port) for i in (0, 1)]):
      if name == "config":
        assert line == ("error: process(es) [1] were started with another config than process 0's; start every "
                        "process with the same --config file and --config overrides.")
      else:
        assert line.startswith("error: process(es) [1] do not see process 0's workdir: every process must write "
                               "the same directory (this one's is "), line
  leftovers = [f for d in tmp_path.iterdir() if d.is_dir() for f in os.listdir(d) if f.startswith(".process0_")]
  assert not leftovers  # process 0's marker is removed


def test_an_error_of_one_process_stops_the_others_with_its_line(tmp_path):
  """A workdir that one process cannot create, one that another run holds (which process 0 alone locks), a bug in
  one process: that process printed its line (or traceback), then every process waited for the others until JAX's
  runtime ended them all with a fatal error and a stack dump (exit 134), the others never saying why. The three
  runs go at once."""
  (tmp_path / "file").write_text("")
  uncreatable, locked = tmp_path / "file" / "run", tmp_path / "locked"
  locked.mkdir()
  # The bug: a stand-in check that raises, put in place by sitecustomize in process 1 alone.
  (tmp_path / "bug").mkdir()
  (tmp_path / "bug" / "sitecustomize.py").write_text(
      "from diffmoe_jax import distributed\n"
      "def check_same_run(config, workdir):\n  raise ValueError('a bug\\nits details')\n"
      "distributed.check_same_run = check_same_run\n")
  buggy = {"PYTHONPATH": f"{tmp_path / 'bug'}{os.pathsep}{ROOT}"}
  ports = _free_ports(3)
  with workdir_lib.WorkdirLock(locked):  # another run on this workdir
    procs = [_start(str(tmp_path / "run"), [], process_id=0, port=ports[0]),
             _start(str(uncreatable), [], process_id=1, port=ports[0]),
             *[_start(str(locked), [], process_id=i, port=ports[1]) for i in (0, 1)],
             _start(str(tmp_path / "run_bug"), [], process_id=0, port=ports[2]),
             _start(str(tmp_path / "run_bug"), [], process_id=1, port=ports[2], environ=buggy)]
    try:
      errors = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
    finally:
      for p in procs:
        p.kill()
  assert [p.returncode for p in procs] == [main_lib.EXIT_ERROR] * 6, [e[-2000:] for e in errors]
  assert "Traceback" not in "".join(errors[:5]), errors[:5]
  lines = [e.strip().splitlines()[-1] for e in errors]
  cause = f"Cannot create the workdir {uncreatable}: Not a directory; pass a --workdir in a directory you can write."
  assert lines[:2] == [f"error: process 1 of 2 stopped the run: {cause}", f"error: {cause}"]
  assert not (tmp_path / "run").exists()  # the workdir process 0 created for the run, which saved nothing
  assert lines[2].startswith(f"error: The workdir {locked} is in use by another run (PID {os.getpid()} "), lines
  assert lines[3] == lines[2].replace("error: ", "error: process 0 of 2 stopped the run: ", 1)
  assert lines[4] == "error: process 1 of 2 stopped the run: ValueError: a bug (its log holds the traceback)"
  assert "Traceback" in errors[5] and errors[5].strip().endswith("ValueError: a bug\nits details"), errors[5][-3000:]


# A process that joins the run and waits, as a trainer between its steps.
_JOINED_PEER = """
import sys, time
from diffmoe_jax import distributed
distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]), timeout_s=3,
                       environ={})
print("joined", flush=True)
time.sleep(600)
"""


def test_a_process_that_stops_answering_stops_the_others_with_one_line():
  """A process frozen (SIGSTOP; a hung host or a broken network alike): JAX's runtime ended the others with a fatal
  error and a stack dump (exit 134) after its heartbeat timeout. Process 1 frozen in one run, process 0 (which hosts
  JAX's store) in another, at once."""
  runs = []
  for frozen in (1, 0):
    address = f"127.0.0.1:{_free_port()}"
    runs.append((frozen, [subprocess.Popen([sys.executable, "-c", _JOINED_PEER, address, str(i)], env=_env(1),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                          for i in (0, 1)]))
  try:
    for _, procs in runs:
      for p in procs:
        assert p.stdout.readline() == "joined\n", p.communicate(timeout=TIMEOUT_S)[1][-3000:]
    for frozen, procs in runs:
      procs[frozen].send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    outcomes = [(frozen, procs[1 - frozen].wait(timeout=120), procs[1 - frozen].stderr.read())
                for frozen, procs in runs]
    waited = time.monotonic() - frozen_at
  finally:
    for _, procs in runs:
      for p in procs:
        p.kill()
  for frozen, status, err in outcomes:
    assert status == 1 and "Traceback" not in err and "Fatal" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: process {frozen} of 2 stopped answering for 3 s (--distributed_timeout_s): it died or froze, or "
        "its host or the network failed. The newest complete checkpoint in the workdir is intact: restart every "
        "process with the same command to resume."), err[-3000:]
  assert waited < 3 + distributed._HEARTBEAT_MARGIN_S  # before JAX's own heartbeat timeout


def test_a_process_that_fails_before_joining_stops_the_others_at_once(tmp_path):
  """A command line that does not parse on process 1, an invalid config on process 0: that process stopped before
  joining, and the other waited for it until --distributed_init_timeout_s ran out. Both runs at once."""
  runs = [("", "--config.train.nosuch=1"), ("--config.model.d_model=-3", "")]
  start = time.monotonic()
  procs = []
  for (k, extras), port in zip(enumerate(runs), _free_ports(len(runs))):
    procs += [_start(str(tmp_path / f"run{k}"), [extra, "--distributed_init_timeout_s=120"] if extra else
                     ["--distributed_init_timeout_s=120"], process_id=i, port=port) for i, extra in enumerate(extras)]
  lines = _refusals(procs)
  assert time.monotonic() - start < 90
  unknown = lines[1].removeprefix("error: ")
  assert unknown.startswith("--config.train.nosuch: config.train has no field 'nosuch'"), lines
  invalid = "config.model.d_model: must be a positive integer, got -3."
  assert lines == [f"error: process 1 of 2 stopped before joining the run: {unknown}", f"error: {unknown}",
                   f"error: {invalid}", f"error: process 0 of 2 stopped before joining the run: {invalid}"]
  assert not any(os.path.exists(tmp_path / f"run{k}") for k in range(2))


def test_a_ctrl_c_on_one_process_stops_the_others_saying_so(tmp_path):
  """A Ctrl-C that interrupts one process at once (before training, or a second one): the others said they 'lost
  another process of this run', not why."""
  port = _free_port()
  procs = [_start(str(tmp_path / "run"), [], process_id=i, port=port) for i in (0, 1)]
  try:
    _read_until(procs[1], r"joined the run")
    procs[1].send_signal(signal.SIGINT)
    errors = [p.communicate(timeout=TIMEOUT_S)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [main_lib.EXIT_ERROR, main_lib.EXIT_INTERRUPTED], errors[0][-3000:]
  lines = [e.strip().splitlines()[-1] for e in errors]
  assert lines[1].startswith("error: interrupted at once (a second Ctrl-C, or one before training began)"), errors[1]
  assert lines[0] == lines[1].replace("error: ", "error: process 1 of 2 stopped the run: ", 1), errors[0][-3000:]


def test_processes_that_read_other_data_stop_with_one_line(tmp_path):
  """The same config on every process, but its `~` is another directory on each host, holding other files: the
  processes trained on different corpora unnoticed."""
  homes = [tmp_path / "host0", tmp_path / "host1"]
  for host, home in enumerate(homes):
    (home / "text").mkdir(parents=True)
    for i in range(12):
      (home / "text" / f"doc{i}.txt").write_text(f"document {i} on host {host}. " * (40 + 30 * host))
  domains = [f"--config.data.domains.{name}=files:~/text/*.txt" for name in ("code", "docs")]
  domains.append("--config.train.run_steps=1")  # without the check, both would train a step and stop
  port = _free_port()
  procs = [_start(str(tmp_path / "run"), domains, process_id=i, port=port, environ={"HOME": str(home)})
           for i, home in enumerate(homes)]
  assert _refusals(procs) == 2 * [
      "error: process(es) [1] read other data than process 0 for the same data.domains (other files, or files of "
      "other contents); every process must see the same files: a filesystem every host mounts, or identical copies."]


def test_main_reports_distributed_flags_that_cannot_work_together(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "diffmoe_jax.main", *CONFIG_ARGS, f"--workdir={tmp_path}",
                         "--num_processes=2"], capture_output=True, text=True, env=_env(1), timeout=TIMEOUT_S)
  assert proc.returncode == main_lib.EXIT_ERROR and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --num_processes and --process_id go together: give both (the same --num_processes on every "
      "process, --process_id 0 .. N-1), or neither."), proc.stderr[-3000:]


def test_main_help_lists_the_distributed_flags():
  """They are main's flags, but --help listed only --config and --workdir."""
  proc = subprocess.run([sys.executable, "-m", "diffmoe_jax.main", "--help"], capture_output=True, text=True,
                        env=_env(1), timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("distributed", "coordinator_address", "num_processes", "process_id", "distributed_timeout_s",
               "distributed_init_timeout_s"):
    assert f"\n  --{name}: " in proc.stdout, (name, proc.stdout)


def test_a_single_process_stays_out_of_the_distributed_runtime():
  assert not distributed.initialize(environ={})
  slurm_one_task = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                    "SLURM_LOCALID": "0"}
  assert not distributed.initialize(environ=slurm_one_task)


def test_launchers_are_recognised():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
           "SLURM_LOCALID": "3"}
  assert distributed.launcher_process_count(slurm) == 16
  assert distributed.launcher_process_count({"OMPI_MCA_orte_hnp_uri": "1;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "4"}) == 4
  assert distributed.launcher_process_count({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == 4
  assert distributed.launcher_process_count({"SLURM_JOB_ID": "7"}) == 1  # salloc shell, no srun step
