"""`python -m diffmoe_jax.bench expert_parallel`: the expert-parallel MoE layer against replicated experts.

Needs several devices; on a CPU simulate them before JAX starts:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m diffmoe_jax.bench expert_parallel

Both variants compute the same layer on the same global batch, split over all devices: "replicated" keeps
every expert on every device (each device runs all experts on its own tokens; no token moves),
"expert-parallel" holds E/n experts per device and exchanges slots with all_to_all (capacity mode). The
all-to-all bytes are read off the compiled program and set against the analytic count.
"""
from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diffmoe_jax import config as config_lib
from diffmoe_jax import parallel
from diffmoe_jax.ops import dispatch, expert_parallel, routing

def add_parser(commands) -> None:
  from diffmoe_jax.bench import NON_NEGATIVE, POSITIVE, _int_in, _positive_float
  p = commands.add_parser("expert_parallel", help="expert-parallel MoE vs replicated experts (multi-device)")
  p.add_argument("--expert-axis", type=_int_in(2), default=4, help="devices the experts are split over")
  p.add_argument("--batch-per-device", type=POSITIVE, default=2)
  p.add_argument("--seq-len", type=POSITIVE, default=512)
  p.add_argument("--d-model", type=POSITIVE, default=288)
  p.add_argument("--ffn-dim", type=POSITIVE, default=768)
  p.add_argument("--experts", type=POSITIVE, default=8)
  p.add_argument("--top-k", type=POSITIVE, default=2)
  p.add_argument("--capacity-factor", type=_positive_float, default=1.25)
  p.add_argument("--warmup", type=NON_NEGATIVE, default=2)
  p.add_argument("--reps", type=POSITIVE, default=7)
  p.set_defaults(run=run)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  devices, n = jax.device_count(), args.expert_axis
  if devices % n:
    parser.error(f"argument --expert-axis: {n} must divide the {devices} devices; on a CPU simulate devices with "
                 "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  if args.experts % n:
    parser.error(f"argument --experts: {args.experts} is not a multiple of --expert-axis ({n})")


def run(args: argparse.Namespace) -> None:
  from diffmoe_jax.bench import _interleaved_medians  # the shared timing loop
  devices = jax.device_count()
  n = args.expert_axis
  # The trainer's mesh and rules (the default config's), with the experts split n ways.
  mesh_config = config_lib.defaults().mesh
  mesh_config.shape.update(data=-1, fsdp=1, expert=n, tensor=1)
  mesh, rules = parallel.make_mesh(mesh_config), parallel.axis_rules(mesh_config)
  batch_axes, [expert_axis] = (parallel.logical_mesh_axes(rules, name) for name in ("batch", "expert"))
  b, t, d, f, e, k = devices * args.batch_per_device, args.seq_len, args.d_model, args.ffn_dim, args.experts, args.top_k
  rng = np.random.default_rng(0)
  rows = NamedSharding(mesh, P(batch_axes))
  x = jax.device_put(rng.normal(size=(b, t, d)).astype(np.float32), rows)
  cot = jax.device_put(rng.normal(size=(b, t, d)).astype(np.float32), rows)
  logits = jnp.asarray(rng.normal(size=(b, t, e)), jnp.float32)
  weights, experts = (jax.device_put(a, rows) for a in routing.top_k_gating(logits, k))
  w = [rng.normal(size=(e, d, f)) / math.sqrt(d), rng.normal(size=(e, f, d)) / math.sqrt(f)]
  w = [a.astype(np.float32) for a in w]
  common = dict(activation="gelu", mode="capacity", capacity_factor=args.capacity_factor)
  layers = {
      "replicated": (functools.partial(dispatch.moe_ffn, **common), NamedSharding(mesh, P())),
      "expert-parallel": (functools.partial(expert_parallel.moe_ffn, mesh=mesh, batch_axes=batch_axes,
                                            expert_axis=expert_axis, strategy="all_to_all", **common),
                          NamedSharding(mesh, P(expert_axis))),
  }
  fns, texts = {}, {}
  for name, (layer, weight_sharding) in layers.items():
    params = [jax.device_put(a, weight_sharding) for a in w]

    def fwd_bwd(x_, params_, cot_, layer=layer):
      y, vjp = jax.vjp(lambda a, p: layer(a, weights, experts, *p)[0], x_, params_)
      return y, vjp(cot_)
    compiled = jax.jit(fwd_bwd).lower(x, params, cot).compile()
    texts[name] = compiled.as_text()
    fns[name] = functools.partial(compiled, x, params, cot)
  times = _interleaved_medians(fns, warmup=args.warmup, reps=args.reps)

  capacity = dispatch.moe_capacity(t, k, e, args.capacity_factor)
  # Per device: the [n, E/n, b_local, C, d] slot buffer, twice forward (out and back) and twice backward.
  analytic = 4 * args.batch_per_device * e * capacity * d * 4
  measured = parallel.collective_bytes(texts["expert-parallel"], "all-to-all")
  print(f"MoE layer fwd+bwd on {devices} {jax.default_backend()} devices ({dict(mesh.shape)}), "
        f"{b} x {t} tokens, d {d}, {e} experts x {f} top-{k}, capacity {capacity} per sequence")
  for name, seconds in times.items():
    print(f"  {name:<16} {seconds * 1e3:9.2f} ms")
  print(f"  expert-parallel / replicated: {times['expert-parallel'] / times['replicated']:.2f}x")
  print(f"  all-to-all bytes per device per step: measured {measured:,} (compiled program), analytic "
        f"{analytic:,} ({measured / analytic:.3f}x); {(n - 1) / n:.0%} of it leaves the device")
