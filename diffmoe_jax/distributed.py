"""Joining a multi-process run: `jax.distributed.initialize` when the environment asks for it.

Called once, before any other JAX use. A run is multi-process when

  - the command line names it: --coordinator_address=HOST:PORT --num_processes=N --process_id=I;
  - JAX_COORDINATOR_ADDRESS is set (with the process count and id from the flags or a launcher);
  - a launcher started more than one task: SLURM (srun), Open MPI (mpirun), GKE TPU (TPU_WORKER_HOSTNAMES);
  - --distributed=on: JAX detects the rest itself (the TPU VM slice's metadata; see launch/tpu_pod.sh).

With the ids on the command line, process 0 first gathers the others on the coordinator port, so that a
missing process or an id given twice stops every process with one line. Every process then runs the same
program on its own rows of each batch. A process that dies, or a peer
that stops answering for --distributed_timeout_s, makes the others exit non-zero within that bound
instead of waiting forever in a collective, with one line (but for process 0's death: JAX's runtime aborts the
others at once). A process that stops on an error of its own (a workdir it cannot write, a locked workdir, data
it cannot read, a Ctrl-C: `stop_run`), before joining too, tells the others, which stop at once with its line.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from typing import Callable

from absl import flags, logging

from diffmoe_jax import cli, gathering
from diffmoe_jax.gathering import DistributedError

_MODES = ("auto", "on", "off")
_DEFAULT_TIMEOUT_S, _DEFAULT_INIT_TIMEOUT_S = 100, 300  # the flags' defaults, and `initialize`'s
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", _MODES,
    "Join a multi-process run: 'auto' when a launcher, --coordinator_address (or JAX_COORDINATOR_ADDRESS) or "
    "--num_processes say there are several processes, "
    "'on' always (a TPU VM slice, where JAX reads the workers from the VM metadata), 'off' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator, the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes the run has.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", _DEFAULT_TIMEOUT_S,
    "Seconds without a heartbeat after which a process counts as dead and the others exit (and how long a "
    "finishing process waits for the rest).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout_s", _DEFAULT_INIT_TIMEOUT_S, "Seconds to wait at start for every process to join.")

# Words in a runtime error that mean a collective or the coordination service lost a peer.
_PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused",
                         "socket closed", "heartbeat", "unavailable:", "deadline_exceeded", "barrier")


def launcher_process_count(environ=os.environ) -> int:
  """How many processes a launcher that JAX auto-detects started (1 when none did)."""
  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1
  if all(v in environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                "SLURM_LOCALID")):
    return count("SLURM_NTASKS")
  if "OMPI_MCA_orte_hnp_uri" in environ:
    return count("OMPI_COMM_WORLD_SIZE")
  if environ.get("TPU_WORKER_HOSTNAMES"):
    return len(environ["TPU_WORKER_HOSTNAMES"].split(","))
  return 1


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = _DEFAULT_TIMEOUT_S,
               init_timeout_s: int = _DEFAULT_INIT_TIMEOUT_S,
               environ=os.environ) -> bool:
  """Joins the run when `mode` and the environment ask for it; returns whether it did.

  Raises DistributedError for flags that cannot work together. Must run before any other JAX use.
  """
  if mode not in _MODES:
    raise DistributedError(f"--distributed={mode!r}: choose one of {_MODES}.")
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if mode == "off":
    if given:
      raise DistributedError(f"--distributed=off contradicts {', '.join(given)}; drop them or the 'off'.")
    return False
  if (num_processes is None) != (process_id is None):
    raise DistributedError("--num_processes and --process_id go together: give both (the same "
                           "--num_processes on every process, --process_id 0 .. N-1), or neither.")
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f"--num_processes={num_processes} must be at least 1.")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id={process_id} must lie in 0 .. --num_processes-1 = {num_processes - 1}.")
  if timeout_s < 1 or init_timeout_s < 1:
    raise DistributedError(f"--distributed_timeout_s ({timeout_s}) and --distributed_init_timeout_s "
                           f"({init_timeout_s}) must be at least 1 second.")
  env_coordinator = environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator_address is not None:
    _check_address(coordinator_address, bind=process_id == 0)
  elif env_coordinator:  # JAX reads it when the flag is absent
    _check_address(env_coordinator, bind=process_id == 0, source="JAX_COORDINATOR_ADDRESS")
  launched = launcher_process_count(environ)
  mpi_size = environ.get("OMPI_COMM_WORLD_SIZE", "1")
  if not (given or env_coordinator or launched > 1) and mpi_size.isdigit() and int(mpi_size) > 1:
    # Open MPI 5 no longer sets OMPI_MCA_orte_hnp_uri, which JAX reads: each process trained apart.
    raise DistributedError(f"mpirun started {mpi_size} processes, but JAX recognises Open MPI 4 only "
                           "(OMPI_MCA_orte_hnp_uri is unset): give each process --coordinator_address=HOST:PORT "
                           "--num_processes=$OMPI_COMM_WORLD_SIZE --process_id=$OMPI_COMM_WORLD_RANK.")
  if mode == "auto" and not (given or env_coordinator or launched > 1):
    return False
  if given and coordinator_address is None and not env_coordinator and launched == 1:
    raise DistributedError("--num_processes/--process_id need --coordinator_address=HOST:PORT (process 0's host "
                           "and a free port, the same on every process) or JAX_COORDINATOR_ADDRESS.")
  if (coordinator_address is not None or env_coordinator) and num_processes is None and launched == 1:
    source = "--coordinator_address" if coordinator_address is not None else "JAX_COORDINATOR_ADDRESS"
    raise DistributedError(f"{source} needs --num_processes=N and --process_id=I (0 .. N-1) when no launcher "
                           "(SLURM, Open MPI) provides them.")

  import jax
  if jax.distributed.is_initialized():  # joined already (by a wrapper around main, say)
    return True
  address = coordinator_address or env_coordinator
  if address and process_id is not None:
    if process_id == 0:
      gathering.gather_processes(address, num_processes, init_timeout_s)
    else:
      gathering.join_process_0(address, num_processes, process_id, init_timeout_s)
  # CPU processes exchange collectives over TCP (gloo); GPU and TPU use their own interconnect.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=init_timeout_s,
                               heartbeat_timeout_seconds=timeout_s + _HEARTBEAT_MARGIN_S,
                               shutdown_timeout_seconds=timeout_s)
  except (ValueError, TypeError) as e:  # JAX's own check of missing or inconsistent arguments
    raise DistributedError(f"cannot start a multi-process run: {e} Give --coordinator_address, "
                           "--num_processes and --process_id, or start the processes under SLURM or Open "
                           "MPI.") from e
  _exit_promptly_on_failure(jax.process_index(), jax.process_count(), timeout_s)
  logging.info("Process %d of %d joined the run (%d local, %d global devices).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _check_address(address: str, bind: bool, source: str = "--coordinator_address") -> None:
  """HOST:PORT with a port in 1..65535, and for process 0 (which hosts the coordinator) a port free on this host:
  JAX's runtime ends the process with a C++ abort, not an error, for either. `source` names where it came from."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise DistributedError(f"{source}={address!r} is not HOST:PORT with a port in 1..65535 (such as "
                           "10.0.0.2:12345: process 0's host and a free port).")
  if bind:
    with socket.socket() as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's closing connections don't count
      try:
        s.bind(("", int(port)))
      except OSError as e:
        raise DistributedError(f"{source}={address!r}: port {port} cannot be opened on this host, "
                               f"process 0's ({e.strerror or e}); choose a free port.") from None


_MARKER_WAIT_S = 10.0  # how long the other processes look for process 0's marker: a shared filesystem may show it late


def check_same_run(config, workdir: str) -> None:
  """Every process of a multi-process run has process 0's config and sees its workdir; DistributedError on every
  process otherwise. Without this, processes on different configs fail in a collective (a C++ abort) or train
  apart unnoticed, and a workdir that is not shared hangs the first checkpoint."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return
  token = np.frombuffer(os.urandom(8), np.uint32) if jax.process_index() == 0 else np.zeros(2, np.uint32)
  marker_of = lambda t: os.path.join(workdir, f".process0_{np.asarray(t).tobytes().hex()}")
  if jax.process_index() == 0:  # before the others look: a lookup that finds no file may be cached (NFS)
    open(marker_of(token), "w", encoding="utf-8").close()
    def remove_marker(path=marker_of(token)):
      with contextlib.suppress(OSError):
        os.remove(path)
    keep_marker = clean_up_on_leaving(remove_marker)  # if another process stops the run before the check ends
  marker = marker_of(multihost_utils.broadcast_one_to_all(token))  # process 0's file, named by its token
  deadline = time.time() + _MARKER_WAIT_S
  while not (seen := os.path.exists(marker)) and time.time() < deadline:
    time.sleep(0.5)
  values = dict(config.to_dict())
  values["train"] = {k: v for k, v in values["train"].items() if k != "compilation_cache_dir"}  # per host
  everyone = np.asarray(multihost_utils.process_allgather(np.append(_digest(values), np.uint32(seen))))
  if jax.process_index() == 0:
    os.remove(marker)
    keep_marker()
  other_config = [p for p in range(len(everyone)) if not np.array_equal(everyone[p, :4], everyone[0, :4])]
  blind = [p for p in range(len(everyone)) if not everyone[p, 4]]
  if other_config:
    raise DistributedError(f"process(es) {other_config} were started with another config than process 0's; start "
                           "every process with the same --config file and --config overrides.")
  if blind:
    raise DistributedError(f"process(es) {blind} do not see process 0's workdir: every process must write the same "
                           f"directory (this one's is {workdir}); pass the same --workdir, on a filesystem every "
                           "host mounts.")


def check_same_data(corpus) -> None:
  """Every process of a multi-process run read the same data as process 0 (each split's file names, relative to
  its source's root, and its token and byte counts); DistributedError on every process otherwise. Each host
  reads its own files for the same `data.domains`, and hosts that see other files would train on other data
  unnoticed. Modification times are left out: identical copies made at different times are the same data."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return
  summary = {domain: {split: dataclasses.astuple(corpus.info(domain, split)) for split in ("train", "val")}
             for domain in corpus.domains}
  everyone = np.asarray(multihost_utils.process_allgather(_digest(summary)))
  other_data = [p for p in range(len(everyone)) if not np.array_equal(everyone[p], everyone[0])]
  if other_data:
    raise DistributedError(f"process(es) {other_data} read other data than process 0 for the same data.domains "
                           "(other files, or files of other contents); every process must see the same files: a "
                           "filesystem every host mounts, or identical copies.")


def max_over_processes(value: int):
  """Starts the maximum of each process's `value` over all processes and returns it unread: a replicated int32
  jax.Array, read with `int(np.asarray(result.addressable_data(0)))`. Unlike `process_allgather`, which waits for
  the result and so for every step queued before it, a caller can read it a step later while the next one runs."""
  import jax
  import numpy as np
  rows_sharding, maximum = _max_over_processes_program()
  rows = [jax.device_put(np.array([value], np.int32), device) for device in jax.local_devices()]
  return maximum(jax.make_array_from_single_device_arrays((jax.process_count(),), rows_sharding, rows))


@functools.cache
def _max_over_processes_program():
  """The sharding of one row per process and the compiled maximum over them, built once: called every step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  # One row per process, as JAX's own multihost_utils lays them out (devices are ordered by process).
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count()),
                           ("processes", "local_devices"))
  return NamedSharding(mesh, P("processes")), jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))


def _digest(values):
  """16 bytes of the SHA-256 of `values` as JSON, as uint32 (a process_allgather operand)."""
  import numpy as np
  return np.frombuffer(hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).digest()[:16],
                       np.uint32)


def initialize_from_flags() -> bool:
  """`initialize` with this module's command-line flags (call at the top of `main`)."""
  return initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                    timeout_s=_TIMEOUT.value, init_timeout_s=_INIT_TIMEOUT.value)


def tell_others_before_joining(line: str, argv: list[str] | None = None) -> None:
  """A process that stops before joining (a command line that does not parse, an invalid config) passes `line`
  to the others when its command line names a gathering (`gathering.tell_others_before_joining`). `argv`: the
  command line when its flags could not be parsed (the flags' values otherwise)."""
  if argv is None:
    if not flags.FLAGS.is_parsed():  # not called by a command
      return
    values = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
              "process_id": _PROCESS_ID.value}
  else:  # the flags' values are unknown: read the words
    words = iter(argv)
    values = {}
    for word in words:
      match = re.fullmatch(r"--?(coordinator_address|num_processes|process_id)(?:=(.*))?", word)
      if match:
        values[match.group(1)] = match.group(2) if match.group(2) is not None else next(words, None)
  try:
    address = values.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count, index = int(values["num_processes"]), int(values["process_id"])
  except (KeyError, TypeError, ValueError):
    return
  host, _, port = address.rpartition(":")
  if host and port.isdigit() and 1 <= int(port) <= 65535 and 0 <= index < count and count > 1:
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C while it waits for the others ends the wait
      gathering.tell_others_before_joining(address, count, index, line)


# A process that stops on an error of its own writes its line under _LEAVING + its index in JAX's key-value store
# (hosted by process 0); one that stops for another's writes "". Each process looks there every _POLL_S while it
# runs. Without this, the others waited for it in their next collective until JAX's runtime ended them with a
# fatal error and a stack dump after --distributed_timeout_s, never saying why, and the failing process itself
# ended the same way in JAX's shutdown barrier after printing its line.
_LEAVING = "diffmoe_jax/leaving/"
# Each process also counts up its key under _ALIVE every _POLL_S. A process whose count stands still for
# --distributed_timeout_s (process 0's, too, when its store does not answer) stopped answering: the others stop with
# one line. JAX's own heartbeat timeout is _HEARTBEAT_MARGIN_S longer, since its runtime ends every process with a
# fatal error and a stack dump (exit 134) when it finds a process silent; its handler for that
# (`missed_heartbeat_callback`) cannot be replaced from Python in jax 0.10.2 (calling it ends in std::bad_cast).
_ALIVE = "diffmoe_jax/alive/"
_HEARTBEAT_MARGIN_S = 10
_POLL_S = 1.0
_LEAVE_WAIT_S = 10.0  # how long process 0, whose exit ends the store, waits for the others to read a line
_leaving = threading.Lock()  # held by the one thread of this process that prints why it stops, then exits it
_on_leaving: list[Callable[[], None]] = []  # this process's clean-up when it stops so (`clean_up_on_leaving`)


def clean_up_on_leaving(clean_up: Callable[[], None]) -> Callable[[], None]:
  """Runs `clean_up` (which must not raise; the last registered first) if this process stops because of another
  process or an error of its own in a multi-process run, which exits at once; returns a function that cancels it."""
  _on_leaving.append(clean_up)
  return lambda: _on_leaving.remove(clean_up)


def stop_run(line: str, status: int, at_once: bool = False) -> None:
  """Prints `line` to stderr and exits with `status` (`at_once`: without Python's clean-up, `cli.exit_now`). In a
  multi-process run it exits at once, after telling the other processes, which stop with status 1 and `line` as
  this process's: an error this process raised alone left the others waiting for it until JAX's runtime ended them.
  Before joining, it tells those that gather (`tell_others_before_joining`)."""
  if _run() is None:
    print(line, file=sys.stderr)
    tell_others_before_joining(line)
    if at_once:
      cli.exit_now(status)
    sys.exit(status)
  _leaving.acquire()  # never released: this thread exits the process below, or another already does
  print(line, file=sys.stderr)
  _leave(line, status)


def _run():
  """(JAX's distributed client, this process's index, the process count) in a multi-process run, else None. Starts
  no backend (an error before any JAX use must not wait for an accelerator)."""
  if "jax" not in sys.modules:
    return None
  from jax._src import distributed as jax_distributed
  state = jax_distributed.global_state
  return (state.client, state.process_id, state.num_processes) if state.client and state.num_processes > 1 else None


def _leave(line: str, status: int, silent: tuple[int, ...] = ()) -> None:
  """Writes this process's `line` ("" when it stops for another's) to the store and exits at once; process 0 first
  waits, up to _LEAVE_WAIT_S, until every other process but the `silent` ones has written its own. With process 0
  silent, the store is not asked (it would not answer)."""
  client, index, count = _run()
  try:
    if 0 not in silent:
      client.key_value_set(f"{_LEAVING}{index}", line)
    deadline = time.monotonic() + _LEAVE_WAIT_S
    while (index == 0 and len(client.key_value_dir_get(_LEAVING)) < count - len(silent)
           and time.monotonic() < deadline):
      time.sleep(0.1)
  except (Exception, KeyboardInterrupt):  # pylint: disable=broad-except
    pass  # the store went with process 0 (JAX ends the others then), or a Ctrl-C cut the wait short
  for clean_up in reversed(_on_leaving):
    clean_up()
  cli.exit_now(status)


def _stop_for_a_peer(blocking: bool) -> None:
  """Stops this process (status 1) with the line another process stopped the run with, if one did; returns if none
  did, the store cannot be read, or (not `blocking`) this process is stopping already."""
  if (run := _run()) is None:  # JAX's client has shut down: the run ended
    return
  client, index, count = run
  try:
    entries = client.key_value_dir_get(_LEAVING)
  except Exception:  # pylint: disable=broad-except  (the run is ending: JAX reports a lost coordinator itself)
    return
  stopped = sorted((int(key.rpartition("/")[2]), line) for key, line in entries if line)
  stopped = [(peer, line) for peer, line in stopped if peer != index]
  if not stopped or not _leaving.acquire(blocking=blocking):
    return
  peer, line = stopped[0]
  print(f"error: process {peer} of {count} stopped the run: {line.removeprefix('error: ')}", file=sys.stderr)
  _leave("", 1)


def _beat(beat: int, counts: dict[int, str], heard: list[float]) -> None:
  """Writes this process's `beat` under _ALIVE and notes in `heard` when each process's count (`counts`) last
  changed; returns without noting anything when the store cannot be reached."""
  if (run := _run()) is None:
    return
  client, index, _ = run
  try:
    client.key_value_set(f"{_ALIVE}{index}", str(beat), allow_overwrite=True)
    entries = client.key_value_dir_get(_ALIVE)
  except Exception:  # pylint: disable=broad-except  (the run is ending: JAX reports a lost coordinator itself)
    return
  now = time.monotonic()
  for key, value in entries:
    peer = int(key.rpartition("/")[2])
    if counts.get(peer) != value:
      counts[peer], heard[peer] = value, now


def _stop_for_silence(heard: list[float], timeout_s: int) -> None:
  """Stops this process (status 1) when another has not answered for `timeout_s` (the lowest such, process 0 when
  the store it hosts does not answer either); returns if none, or this process is stopping already."""
  if (run := _run()) is None:
    return
  _, index, count = run
  now = time.monotonic()
  silent = tuple(p for p in range(count) if p != index and now - heard[p] > timeout_s)
  if not silent or not _leaving.acquire(blocking=False):
    return
  print(f"error: process {silent[0]} of {count} stopped answering for {timeout_s} s (--distributed_timeout_s): it "
        "died or froze, or its host or the network failed. The newest complete checkpoint in the workdir is intact: "
        "restart every process with the same command to resume.", file=sys.stderr)
  _leave("", 1, silent)


def _exit_promptly_on_failure(process_index: int, process_count: int, timeout_s: int) -> None:
  """An uncaught error in a multi-process run exits this process at once, another process's `stop_run` stops
  this one, and so does another process that stops answering for `timeout_s` (two threads watch until Python
  exits: one asks the store, which may not answer; the other asks nothing).

  Without this, Python's exit waits in JAX's shutdown barrier for peers that will never arrive. A lost
  peer gets one line (the one it stopped with, if it stopped by `stop_run`); any other error keeps its traceback,
  and the other processes stop naming its type and first line.
  """
  if process_count == 1:
    return

  def hook(exc_type, exc, tb):
    text = str(exc)
    first_line = text.strip().splitlines()[0] if text.strip() else exc_type.__name__
    if any(marker in text.lower() for marker in _PEER_FAILURE_MARKERS):
      _stop_for_a_peer(blocking=True)
      print(f"error: process {process_index} of {process_count} lost another process of this run ({first_line}). "
            "The newest complete checkpoint in the workdir is intact: restart every process with the same "
            "command to resume.", file=sys.stderr)
      cli.exit_now(1)
    _leaving.acquire()
    traceback.print_exception(exc_type, exc, tb)
    _leave(f"{exc_type.__name__}: {first_line} (its log holds the traceback)", 1)

  sys.excepthook = hook
  finished = threading.Event()
  heard = [time.monotonic()] * process_count  # when each process's count last changed

  def ask_the_store():
    counts: dict[int, str] = {}
    for beat in itertools.count(1):
      if finished.wait(_POLL_S):
        return
      _beat(beat, counts, heard)
      _stop_for_a_peer(blocking=False)

  def listen():
    while not finished.wait(_POLL_S):
      _stop_for_silence(heard, timeout_s)

  watchers = [threading.Thread(target=target, name=f"diffmoe_jax-{target.__name__}", daemon=True)
              for target in (ask_the_store, listen)]
  for watcher in watchers:
    watcher.start()
  # Registered after JAX's own exit handler, so it runs first: the threads stop before JAX's client shuts down.
  atexit.register(lambda: (finished.set(), *(watcher.join() for watcher in watchers)))
