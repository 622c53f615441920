"""Where a compiled step's time goes: each HLO instruction's measured time from a JAX profiler trace, joined
with the compiled HLO text to say what the instruction is (a matmul, a kernel, a collective, an elementwise
fusion) and which part of the model it belongs to (from the name stack in its metadata).

    hlo = step.lower(*args).compile().as_text()
    times = trace_times(lambda: jax.block_until_ready(step(*args)), hlo, calls=3)  # {instruction: seconds}
    rows = breakdown(times, hlo)

Accelerator planes ("/device:GPU:0", "/device:TPU:0") are read when they carry HLO op events; on CPU the
host threads that run the program carry them. Time is device-busy time summed over instructions, which
exceeds the wall time where streams overlap.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile

import jax
from jax.profiler import ProfileData

from diffmoe_jax.parallel import COLLECTIVES, hlo_computations

# Flax module names of the model (nn/model.py) -> the part of the model they are reported under.
_PARTS = {"attention": "attention", "moe": "moe", "ffn": "ffn", "mod_router": "mod router", "embed": "embedding",
          "attn_norm": "norms", "ffn_norm": "norms", "final_norm": "norms"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .+? ([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
  kind: str  # "matmul", "kernel <custom-call target>", a collective's opcode, "scatter", ..., "fusion", an opcode
  part: str  # "attention", "moe", ..., "model (other)", "loss and optimizer", "no metadata"
  pass_: str  # "forward", "backward" (under a transpose, the VJP) or "recompute" (remat's forward again)
  op_name: str


def instructions(hlo: str) -> dict[str, Instruction]:
  """{instruction name: Instruction} for every instruction of a compiled module's HLO text."""
  computations, _ = hlo_computations(hlo)
  bodies = {name: [line for line in lines if _INSTRUCTION.match(line)] for name, lines in computations.items()}
  return {m.group(1): _describe(m.group(2), line, bodies)
          for lines in bodies.values() for line in lines for m in [_INSTRUCTION.match(line)]}


def _describe(opcode: str, line: str, bodies: dict[str, list[str]]) -> Instruction:
  op_name = _first(_OP_NAME, line)
  pass_ = ("forward" if "transpose(" not in op_name else
           "recompute" if "rematted_computation" in op_name else "backward")
  return Instruction(_kind(opcode, line, bodies), _part(op_name), pass_, op_name)


def _first(pattern: re.Pattern, line: str) -> str:
  match = pattern.search(line)
  return match.group(1) if match else ""


def _kind(opcode: str, line: str, bodies: dict[str, list[str]]) -> str:
  base = opcode.removesuffix("-start").removesuffix("-done")
  if base in COLLECTIVES:
    return base
  if opcode in ("dot", "convolution"):
    return "matmul"
  if opcode == "custom-call":
    target = _first(_TARGET, line)
    return "matmul" if re.search("gemm|matmul|blas", target, re.I) else f"kernel {target}"
  if opcode == "fusion":
    called = _CALLS.search(line)
    fused = " ".join(bodies.get(called.group(1), ())) if called else ""
    for op, kind in ((" dot(", "matmul"), (" convolution(", "matmul"), (" scatter(", "scatter"),
                     (" gather(", "gather"), (" sort(", "sort")):
      if op in fused:
        return kind
    return "fusion"
  return opcode


def _part(op_name: str) -> str:
  if not op_name:
    return "no metadata"  # inside a fusion, or added by the compiler (a copy, a layout change)
  segments = op_name.split("/")
  for segment in segments:
    if segment in _PARTS:
      return _PARTS[segment]
  return "model (other)" if any("Transformer" in s for s in segments) else "loss and optimizer"


def trace_times(run, hlo: str, *, calls: int) -> dict[str, float]:
  """Calls `run()` `calls` times under the JAX profiler (it should run the program compiled to `hlo` once,
  already compiled, and block until it is done); {HLO instruction name: seconds} summed over the calls."""
  module = hlo.split(",", 1)[0].removeprefix("HloModule ").strip()
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir):
      for _ in range(calls):
        run()
    [path] = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
    profile = ProfileData.from_file(path)
  device_planes = [p for p in profile.planes if p.name.startswith("/device:")]
  for planes in (device_planes, [p for p in profile.planes if not p.name.startswith("/device:")]):
    times = _op_times(planes, module)
    if times:
      return times
  seen = sorted({value for p in profile.planes for line in p.lines for e in line.events
                 for key, value in e.stats if key == "hlo_module"})
  raise RuntimeError(f"the profile holds no events of module {module!r} (modules seen: {seen or 'none'})")


def _op_times(planes, module: str) -> dict[str, float]:
  times = collections.defaultdict(float)
  for plane in planes:
    lines = list(plane.lines)
    ops_line = [line for line in lines if line.name == "XLA Ops"]  # TPU: one line of ops (others nest them)
    for line in ops_line or lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get("hlo_module", module) == module and ("hlo_op" in stats or ops_line):
          times[stats.get("hlo_op", event.name)] += event.duration_ns * 1e-9
  return dict(times)


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  seconds: float
  instruction: Instruction | None  # None: an event the compiled text does not name (a runtime copy)


def breakdown(times: dict[str, float], hlo: str) -> list[Row]:
  """The traced instructions, most time first, each with what the HLO text says it is."""
  table = instructions(hlo)
  return sorted((Row(name, s, table.get(name)) for name, s in times.items()), key=lambda r: -r.seconds)


def by_part(rows: list[Row]) -> dict[tuple[str, str], float]:
  """Seconds per (part of the model, pass), most time first."""
  totals = collections.Counter()
  for r in rows:
    i = r.instruction
    totals[(i.part, i.pass_) if i else ("unnamed", "-")] += r.seconds
  return dict(totals.most_common())


def by_kind(rows: list[Row]) -> dict[str, float]:
  """Seconds per kind of instruction (matmul, kernel, collective, fusion, ...), most time first."""
  totals = collections.Counter()
  for r in rows:
    totals[r.instruction.kind if r.instruction else "unnamed"] += r.seconds
  return dict(totals.most_common())


def report(rows: list[Row], *, calls: int, top: int) -> list[str]:
  """Lines: per part and pass, per kind, and the `top` instructions, in ms per call and share of busy time."""
  busy = sum(r.seconds for r in rows) or 1.0
  ms = lambda s: f"{1e3 * s / calls:9.2f} ms {s / busy:6.1%}"
  out = [f"device busy {1e3 * busy / calls:.2f} ms per step (summed over instructions), by part of the model:"]
  out += [f"  {part:<18} {pass_:<9} {ms(s)}" for (part, pass_), s in by_part(rows).items()]
  out.append("by kind of instruction:")
  out += [f"  {kind:<27} {ms(s)}" for kind, s in by_kind(rows).items()]
  out.append(f"the {min(top, len(rows))} slowest instructions:")
  for r in rows[:top]:
    i = r.instruction
    where = f"{i.kind}, {i.part} {i.pass_}: {i.op_name[-70:]}" if i else "unnamed"
    out.append(f"  {r.name[:28]:<28} {ms(r.seconds)}  {where}")
  return out
