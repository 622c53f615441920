"""Where a compiled step's time goes: each HLO instruction's measured time from a JAX profiler trace, joined
with the compiled HLO text to say what the instruction is (a matmul, a kernel, a collective, an elementwise
fusion) and which part of the model it belongs to (from the name stack in its metadata).

    hlo = step.lower(*args).compile().as_text()
    times = trace_times(lambda: jax.block_until_ready(step(*args)), hlo, calls=3)  # {instruction: seconds}
    rows = breakdown(times, hlo)

Without running it, `roofline_times` estimates each instruction's time from its FLOPs and bytes
(`instruction_costs`) at a device's peak rate and memory bandwidth: a lower bound, for where a program
compiled for a device that is not here would spend its time.

Accelerator planes ("/device:GPU:0", "/device:TPU:0") are read when they carry HLO op events; on CPU the
host threads that run the program carry them. Time is device-busy time summed over instructions, which
exceeds the wall time where streams overlap.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import math
import re
import tempfile

import jax
from jax.profiler import ProfileData

from diffmoe_jax.parallel import COLLECTIVES, hlo_arrays, hlo_bytes, hlo_computations, hlo_totals

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


_TYPED = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")  # name, result type, opcode, rest
# Instructions that move no data of their own (views, tuples) or run nothing on the device.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "while", "conditional", "call"}


def _operands(rest: str) -> list[str]:
  """The operand names of an instruction (the text after its opcode's parenthesis)."""
  depth, end = 1, 0
  for end, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      break
  return [m.group(1) for m in re.finditer(r"%([\w.\-]+)", rest[:end])]


def _dot_flops(line: str, types: dict[str, str]) -> int:
  """2 · (output elements) · (contracted size) of a dot, or of a cuBLAS GEMM custom call."""
  name, result, opcode, rest = _TYPED.match(line).groups()
  lhs = hlo_arrays(types.get(_operands(rest)[0], ""))
  out = hlo_arrays(result)
  contracting = re.search(r'lhs_contracting_dim(?:s=\{|ensions":\[)([\d,"]*)', line)
  if not (lhs and out and contracting):
    return 0
  k = math.prod(lhs[0][1][int(i)] for i in re.findall(r"\d+", contracting.group(1)))
  return 2 * math.prod(out[0][1]) * k


def instruction_costs(hlo: str) -> dict[str, tuple[float, float]]:
  """{instruction: (FLOPs, bytes)} over one call of a compiled module: matmul FLOPs (dots, alone, fused or as
  GEMM calls) and the bytes each kernel reads and writes (its operands and result; an in-place dynamic
  update only its update, twice), times the instruction runs (`hlo_totals`: loop trip counts). Fusions are
  costed at their instruction, not their parts; custom kernels (Pallas) are costed by bytes alone."""
  computations, _ = hlo_computations(hlo)
  types = {m.group(1): m.group(2) for lines in computations.values() for line in lines for m in [_TYPED.match(line)]
           if m}
  bodies = {name: [line for line in lines if _INSTRUCTION.match(line)] for name, lines in computations.items()}

  def cost(line: str) -> collections.Counter:
    m = _TYPED.match(line)
    if not m or m.group(3) in _FREE:
      return collections.Counter()
    name, result, opcode, rest = m.groups()
    operand_bytes = [hlo_bytes(types.get(o, "")) for o in _operands(rest)]
    moved = hlo_bytes(result) + sum(operand_bytes)
    if "dynamic_update_slice" in name or opcode == "dynamic-update-slice":  # in place: the update moves
      moved = 2 * (sum(operand_bytes) - max(operand_bytes, default=0))
    elif "dynamic_slice" in name or opcode == "dynamic-slice":
      moved = 2 * hlo_bytes(result)
    flops = 0
    if opcode == "dot" or (opcode == "custom-call" and _kind(opcode, line, bodies) == "matmul"):
      flops = _dot_flops(line, types)
    elif opcode == "fusion":
      called = _CALLS.search(line)
      flops = sum(_dot_flops(inner, types) for inner in computations.get(called.group(1), ()) if " dot(" in inner)
    return collections.Counter({(name, "flops"): flops, (name, "bytes"): moved})

  totals = hlo_totals(hlo, cost)
  return {name: (totals[(name, "flops")], totals[(name, "bytes")]) for name, kind in totals if kind == "bytes"}


def roofline_times(costs: dict[str, tuple[float, float]], peak_flops: float, bandwidth: float) -> dict[str, float]:
  """Each instruction's time if it ran at the device's peak FLOP/s or its memory bandwidth, whichever binds."""
  return {name: max(flops / peak_flops, moved / bandwidth) for name, (flops, moved) in costs.items()}


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


def report(rows: list[Row], *, calls: int, top: int, heading: str = "device busy") -> list[str]:
  """Lines: per part and pass, per kind, and the `top` instructions, in ms per call and share of busy time."""
  busy = sum(r.seconds for r in rows) or 1.0
  ms = lambda s: f"{1e3 * s / calls:9.2f} ms {s / busy:6.1%}"
  out = [f"{heading} {1e3 * busy / calls:.2f} ms per step (summed over instructions), by part of the model:"]
  out += [f"  {part:<18} {pass_:<9} {ms(s)}" for (part, pass_), s in by_part(rows).items()]
  out.append("by kind of instruction:")
  out += [f"  {kind:<27} {ms(s)}" for kind, s in by_kind(rows).items()]
  out.append(f"the {min(top, len(rows))} slowest instructions:")
  for r in rows[:top]:
    i = r.instruction
    where = f"{i.kind}, {i.part} {i.pass_}: {i.op_name[-70:]}" if i else "unnamed"
    out.append(f"  {r.name[:28]:<28} {ms(r.seconds)}  {where}")
  return out
