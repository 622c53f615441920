"""Before JAX's runtime starts, process 0 gathers the others on the coordinator port, with a line each way.

JAX's runtime ends a process with a C++ abort and a stack dump for a peer that never arrives, a process id given
twice, or a coordinator it cannot reach; gathered first, each of these is one line on every process. A process
whose command line or config fails before it joins tells the gathering too (`tell_others_before_joining`), so
the others stop at once with its line instead of waiting --distributed_init_timeout_s for it.
"""
from __future__ import annotations

import json
import socket
import time

from diffmoe_jax.config import ConfigError

_JOIN_REPLY_MARGIN_S = 10  # a peer waits this much longer than process 0 for its answer
_FAILED_START_WAIT_S = 10  # how long a process that fails before joining tries to tell the others


class DistributedError(ConfigError):
  """The distributed setup (flags or launcher environment) cannot start a run; the message says why."""


def gather_processes(address: str, num_processes: int, timeout_s: float) -> None:
  """Process 0: returns once processes 1 .. N-1 have each joined once at `address`; DistributedError (on every
  process that joined, too) when one is missing after `timeout_s`, two processes share an id or disagree on
  --num_processes, or one stopped before joining."""
  port = int(address.rpartition(":")[2])
  deadline = time.monotonic() + timeout_s
  joined: dict[int, socket.socket] = {}
  error = None
  try:
    server = _server(port)
  except OSError as e:
    raise DistributedError(f"coordinator address {address!r}: port {port} cannot be opened on this host, process "
                           f"0's ({e.strerror or e}); choose a free port.") from None
  with server:
    while error is None and len(joined) < num_processes - 1:
      server.settimeout(max(0.01, deadline - time.monotonic()))
      try:
        conn, _ = server.accept()
      except TimeoutError:
        missing = sorted(set(range(1, num_processes)) - set(joined))
        error = (f"process(es) {missing} of {num_processes} did not join process 0 at {address} within "
                 f"--distributed_init_timeout_s={timeout_s:g} s (not started, or stopped at start: see its log): "
                 f"start every process 0 .. {num_processes - 1} with the same --coordinator_address and "
                 "--num_processes, or raise the timeout.")
        break
      if (hello := _hello(conn)) is None:  # anything but a peer's hello (a port scanner, say) is dropped
        continue
      peer_id, peer_count, peer_error = hello
      if peer_error:
        error = f"process {peer_id} of {num_processes} stopped before joining the run: {peer_error}"
      elif peer_count != num_processes:
        error = (f"process {peer_id} was started with --num_processes={peer_count}, process 0 with "
                 f"{num_processes}; give every process the same --num_processes.")
      elif peer_id in joined:
        error = (f"two processes were started with --process_id={peer_id}; give each process its own "
                 f"--process_id, 0 .. {num_processes - 1}.")
      joined.setdefault(peer_id, conn)
      if joined[peer_id] is not conn:
        _reply(conn, f"error: {error}")
  for conn in joined.values():
    _reply(conn, f"error: {error}" if error else "ok")
  if error:
    raise DistributedError(error)


def join_process_0(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
  """A process other than 0: joins process 0 at `address` and returns once every process has; DistributedError
  with process 0's reason otherwise, or when process 0 is unreachable for `timeout_s`."""
  conn = _connect(address, process_id, timeout_s)
  answer = _exchange(conn, {"process_id": process_id, "num_processes": num_processes},
                     timeout_s + _JOIN_REPLY_MARGIN_S)
  if answer == "ok":
    return
  if answer.startswith("error: "):
    raise DistributedError(answer[len("error: "):])
  raise DistributedError(f"process {process_id}: the coordinator at {address} gave no answer as process 0 of this "
                         "run (it stopped, or another program uses that port); see process 0's log.")


def tell_others_before_joining(address: str, num_processes: int, process_id: int, line: str) -> None:
  """A process that stops before joining (its command line or config fails) passes its `line` to the others
  that gather within _FAILED_START_WAIT_S: another process to process 0, which stops every process that joined
  with it; process 0 to each process that joins. Returns quietly when there is nobody to tell."""
  message = line.removeprefix("error: ")
  if process_id != 0:
    try:
      conn = _connect(address, process_id, _FAILED_START_WAIT_S)
    except DistributedError:
      return  # process 0 is not there (it waits for this process until its own timeout, which names the cause)
    _exchange(conn, {"process_id": process_id, "num_processes": num_processes, "error": message}, 2.0)
    return
  deadline = time.monotonic() + _FAILED_START_WAIT_S
  answered: set[int] = set()
  try:
    server = _server(int(address.rpartition(":")[2]))
  except OSError:
    return
  with server:
    while len(answered) < num_processes - 1:
      server.settimeout(max(0.01, deadline - time.monotonic()))
      try:
        conn, _ = server.accept()
      except TimeoutError:
        return
      if (hello := _hello(conn)) is not None:
        answered.add(hello[0])
        _reply(conn, f"error: process 0 of {num_processes} stopped before joining the run: {message}")


def _server(port: int) -> socket.socket:
  dualstack = socket.has_dualstack_ipv6()
  return socket.create_server(("", port), family=socket.AF_INET6 if dualstack else socket.AF_INET,
                              dualstack_ipv6=dualstack)


def _connect(address: str, process_id: int, timeout_s: float) -> socket.socket:
  """A connection to process 0 at `address`, retried for `timeout_s`; DistributedError when there is none."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      wait = max(0.1, min(5.0, deadline - time.monotonic()))
      return socket.create_connection((host.strip("[]"), int(port)), timeout=wait)
    except socket.gaierror as e:
      if e.errno == socket.EAI_AGAIN and time.monotonic() < deadline:  # the resolver may recover
        time.sleep(0.5)
        continue
      raise DistributedError(f"coordinator address {address!r}: cannot resolve host {host!r} ({e.strerror or e}); "
                             "give process 0's host name or IP address.") from None
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"process {process_id} could not reach the coordinator at {address} within "
            f"--distributed_init_timeout_s={timeout_s:g} s ({e.strerror or e}; process 0 not started, or stopped "
            "at start: see its log): start process 0 with the same --coordinator_address (its host and a free "
            "port), check that this host can reach it, or raise the timeout.") from None
      time.sleep(0.5)


def _exchange(conn: socket.socket, hello: dict, timeout_s: float) -> str:
  """Sends `hello` on `conn` and returns process 0's answer ("" if none came within `timeout_s`)."""
  with conn:
    try:
      conn.sendall(json.dumps(hello).encode() + b"\n")
    except OSError:
      pass  # process 0 hung up at once: reported by the caller as no answer
    return _read_line(conn, timeout_s)


def _hello(conn: socket.socket) -> tuple[int, int, str] | None:
  """(process id, process count, the error it stopped with or "") from a peer's hello line on `conn`, or None
  (then `conn` is closed) for anything else."""
  try:
    peer = json.loads(_read_line(conn, 5.0))
    return int(peer["process_id"]), int(peer["num_processes"]), str(peer.get("error", ""))
  except (ValueError, TypeError, KeyError, AttributeError):
    conn.close()
    return None


def _read_line(conn: socket.socket, timeout_s: float) -> str:
  """One line from `conn` within `timeout_s`, bytes that are not UTF-8 replaced ("" on timeout, a closed connection
  or 64 KiB without a line end)."""
  deadline = time.monotonic() + timeout_s
  data = b""
  try:
    while b"\n" not in data and len(data) < 65536:
      conn.settimeout(max(0.01, deadline - time.monotonic()))
      chunk = conn.recv(65536)
      if not chunk:
        break
      data += chunk
  except OSError:
    pass
  line, newline, _ = data.partition(b"\n")
  return line.decode("utf-8", "replace").strip() if newline else ""


def _reply(conn: socket.socket, line: str) -> None:
  """Sends `line` and waits briefly for the peer to close first, so the port is free for JAX's service at once."""
  with conn:
    try:
      conn.sendall(line.encode() + b"\n")
      _read_line(conn, 2.0)
    except OSError:
      pass
