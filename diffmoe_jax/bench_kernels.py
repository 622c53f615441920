"""`python -m diffmoe_jax.bench kernels`: each GPU attention kernel timed alone over launch settings.

The kernels of `ops/pallas_attention.py` (forward, dq, dk/dv, and dk/dv with dq for the one-pass backward)
at a config's heads, for every combination of rows per program, rows per loop step, warps and Triton
pipeline stages asked for. A setting the GPU cannot run (shared memory, registers) is reported with the
first line of its error. Each output is compared with the default launch's (the config's
`model.attention_gpu_launch`, else `default_launches`), so a setting that computes something else shows.
The best setting of each kernel among those that agree with the default (AGREEMENT) is printed as the
`bench train` flag and the config override that run it.
Off a GPU the kernels run interpreted: that checks the tool, and its times mean nothing.

    python -m diffmoe_jax.bench kernels --config=configs/pi_p.py --seq-len 8192 --kernels dq dkv
"""
from __future__ import annotations

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp

from diffmoe_jax import config as config_lib

KERNELS = ("forward", "dq", "dkv", "dkv_dq")


def add_parser(commands) -> None:
  from diffmoe_jax.bench import POSITIVE, _config_file, _positive_float
  kernels = commands.add_parser("kernels", help="the GPU attention kernels alone, over launch settings")
  kernels.add_argument("--config", type=_config_file, default="configs/pi_p.py", help="whose heads")
  kernels.add_argument("--seq-len", type=POSITIVE, default=8192)
  kernels.add_argument("--batch", type=POSITIVE, default=1)
  kernels.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  kernels.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS,
                       help="dkv_dq: the one-pass backward's kernel")
  kernels.add_argument("--rows", type=POSITIVE, nargs="+", default=(32, 64, 128),
                       help="rows per program: queries (forward, dq) or keys (dkv, dkv_dq)")
  kernels.add_argument("--steps", type=POSITIVE, nargs="+", default=(32, 64, 128),
                       help="rows of the other side per loop step")
  kernels.add_argument("--warps", type=POSITIVE, nargs="+", default=(4, 8))
  kernels.add_argument("--stages", type=POSITIVE, nargs="+", default=(2, 3))
  kernels.add_argument("--reps", type=POSITIVE, default=5)
  kernels.add_argument("--budget-s", type=_positive_float, default=300.0, help="start no new setting after this long")
  kernels.set_defaults(run=run)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  for flag in ("rows", "steps"):
    for block in getattr(args, flag):
      if block < 16 or block & (block - 1) or args.seq_len % block:
        parser.error(f"argument --{flag}: {block} must be a power of two of at least 16 that divides --seq-len "
                     f"({args.seq_len})")


def _operands(config, args):
  """The kernels' operands in their internal layout at the config's heads (two maps unless standard),
  the default launches and whether the kernels run interpreted."""
  from diffmoe_jax.ops import attention as attention_ops, pallas_attention as pa
  m = config.model
  b, t, h = args.batch, args.seq_len, m.num_heads
  num_maps = 1 if m.attention == "standard" else 2
  d, dv = m.head_dim // num_maps, m.head_dim
  block_q, block_k = (min(block or attention_ops.default_block_size(), t)
                      for block in (m.attention_block_q, m.attention_block_k))
  widths = [sum(w for _, w in pa.column_chunks(n)) for n in (d, dv)]
  defaults = {**pa.default_launches(block_q, block_k, num_maps, *widths),
              **{kernel: pa.Launch(*launch) for kernel, launch in config_lib.gpu_launches(m)}}
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q = jax.random.normal(keys[0], (b, h, num_maps, t, d), dtype) * d**-0.5
  k = jax.random.normal(keys[1], (b, h, num_maps, t, d), dtype)
  v = jax.random.normal(keys[2], (b, h, t, dv), dtype)
  g = jax.random.normal(keys[3], (b, h, t, dv), dtype)
  w = jnp.broadcast_to(jnp.asarray([1.0, -0.5][:num_maps]).reshape(1, 1, num_maps, 1), (b, h, num_maps, t))
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  zeros = jnp.zeros((b, t), jnp.int32)
  masks = (positions, zeros, positions, zeros, jnp.ones((b, t), jnp.int32))
  interpret = jax.default_backend() != "gpu"
  out, lse = jax.jit(lambda q, k, v: pa.forward(q, k, v, masks, True, 0, 0, interpret=interpret,
                                                launches=defaults))(q, k, v)
  delta = jnp.einsum("bhmtv,bhtv->bhmt", out, g.astype(jnp.float32))
  return dict(q=q, k=k, v=v, w=w, g=g, lse=lse, delta=delta, masks=masks), (num_maps, d, dv), defaults, interpret


_OPERANDS = ("q", "k", "v", "w", "g", "lse", "delta", "masks")


def _kernel_fn(kernel: str, launch, operands: dict, interpret: bool):
  """A zero-argument call of `kernel` with `launch`, compiled with the operands as its arguments (closed over,
  they would be constants in the program, which XLA spends seconds folding)."""
  from diffmoe_jax.ops import pallas_attention as pa

  def call(q, k, v, w, g, lse, delta, masks):
    backward = (q, k, v, w, g, lse, delta, masks, True, launch)
    if kernel == "forward":
      return pa.forward(q, k, v, masks, True, 0, 0, interpret=interpret, launches={"forward": launch})
    if kernel == "dq":
      return pa.dq(*backward, interpret=interpret)
    return pa.dkv(*backward, interpret=interpret, one_pass=kernel == "dkv_dq")[0 if kernel == "dkv_dq" else 1:]

  args = [operands[name] for name in _OPERANDS]
  return functools.partial(jax.jit(call).lower(*args).compile(), *args)


# A launch changes only the order of the fp32 sums (and, in 16 bits, the roundings of the outputs): beyond
# this share of the default's largest output value it computes something else and is not recommended.
AGREEMENT = {"bfloat16": 2e-2, "float32": 1e-4}


def _relative_difference(a, b) -> float:
  """The largest |a - b| over the outputs, as a share of b's largest |value|."""
  a, b = ([x.astype(jnp.float32) for x in jax.tree.leaves(t)] for t in (a, b))
  scale = max(float(jnp.max(jnp.abs(y))) for y in b) or 1.0
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b)) / scale


def best_line(kernel: str, timings: dict, default) -> str:
  """The fastest launch as a `bench train` flag and a config override (launch/gpu_checks.sh reads the flag)."""
  best = min(timings, key=timings.get)
  setting = f"{'dkv' if kernel == 'dkv_dq' else kernel}={','.join(map(str, best))}"
  return (f"{kernel:<7} best {tuple(best)}: {1e3 * timings[best]:.3f} ms; default {tuple(default)}: "
          + (f"{1e3 * timings[default]:.3f} ms" if default in timings else "not run")
          + f"; --attention-gpu-launch {setting} (config: --config.model.attention_gpu_launch.{setting})")


def run(args: argparse.Namespace) -> None:
  from diffmoe_jax.bench import _interleaved_medians
  from diffmoe_jax.ops import pallas_attention as pa
  config = config_lib.load_file(args.config)
  operands, (num_maps, d, dv), defaults, interpret = _operands(config, args)
  where = jax.default_backend() + (" (interpreted: times mean nothing)" if interpret else "")
  print(f"GPU attention kernels alone: backend={where} {args.dtype} B={args.batch} T={args.seq_len} "
        f"H={config.model.num_heads} maps={num_maps} D={d} Dv={dv}; median of {args.reps}; "
        "launch = rows, step, warps, stages")
  start = time.perf_counter()
  for kernel in args.kernels:
    if time.perf_counter() - start > args.budget_s:  # a kernel's reference run is a setting too (minutes interpreted)
      print(f"{kernel:<7} time budget of {args.budget_s:.0f} s spent: not run", flush=True)
      continue
    default = defaults["dkv" if kernel == "dkv_dq" else kernel]
    reference = _kernel_fn(kernel, default, operands, interpret)
    expected = reference()
    timings, agreeing = {}, {}  # agreeing: the settings whose output matches the default's
    settings = [default] + [pa.Launch(*s) for s in itertools.product(args.rows, args.steps, args.warps, args.stages)
                            if pa.Launch(*s) != default]
    for launch in settings:
      if time.perf_counter() - start > args.budget_s:
        print(f"{kernel:<7} time budget of {args.budget_s:.0f} s spent: {len(settings) - len(timings)} settings "
              "not run", flush=True)
        break
      label = f"{kernel:<7} {launch.rows:>4} {launch.step:>4} {launch.num_warps:>2} {launch.num_stages}"
      try:
        fn = reference if launch == default else _kernel_fn(kernel, launch, operands, interpret)
        difference = _relative_difference(fn(), expected)
        timings[launch] = _interleaved_medians({kernel: fn}, warmup=1, reps=args.reps)[kernel]
      except Exception as e:  # pylint: disable=broad-except  (a setting the compiler rejects is a result)
        print(f"{label}: not run: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}", flush=True)
        continue
      agrees = difference <= AGREEMENT[args.dtype]
      if agrees:
        agreeing[launch] = timings[launch]
      mark = ("  (default)" if launch == default else "" if agrees else
              f"  (differs from the default beyond {AGREEMENT[args.dtype]:.0e}: not recommended)")
      print(f"{label}: {1e3 * timings[launch]:8.3f} ms  max |Δ| vs default {difference:.1e} of its largest value"
            f"{mark}", flush=True)
    if agreeing:
      print(best_line(kernel, agreeing, default), flush=True)
