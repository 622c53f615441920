"""`python -m diffmoe_jax.bench moe`: the MoE layer (router, top-k gating, dispatch, experts, combine) against a
dense FFN of the same active FLOPs (d -> k·f -> d), forward and forward+backward, in one process, as ratios."""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from diffmoe_jax.bench import _forward_and_backward, _interleaved_medians
from diffmoe_jax.ops import dispatch, routing


def add_parser(commands) -> None:
  from diffmoe_jax.bench import NON_NEGATIVE, POSITIVE, SEED, _positive_float
  moe = commands.add_parser("moe", help="MoE layer vs a dense FFN of equal active FLOPs")
  moe.add_argument("--batch", type=POSITIVE, default=8)
  moe.add_argument("--seq-len", type=POSITIVE, default=512)
  moe.add_argument("--d-model", type=POSITIVE, default=288)
  moe.add_argument("--ffn-dim", type=POSITIVE, default=768, help="each expert's hidden width f")
  moe.add_argument("--experts", type=POSITIVE, default=9)
  moe.add_argument("--top-k", type=POSITIVE, default=2)
  moe.add_argument("--capacity-factor", type=_positive_float, default=1.25)
  moe.add_argument("--activation", choices=dispatch.ACTIVATIONS, default="gelu")
  moe.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  moe.add_argument("--variants", nargs="+", choices=tuple(MOE_VARIANTS), default=tuple(MOE_VARIANTS),
                   help="MoE dispatch variants to time against the dense FFN")
  moe.add_argument("--warmup", type=NON_NEGATIVE, default=2)
  moe.add_argument("--reps", type=POSITIVE, default=7)
  moe.add_argument("--seed", type=SEED, default=0)
  moe.set_defaults(run=run)


MOE_VARIANTS = {"capacity": ("capacity", "padded"), "dropless-padded": ("dropless", "padded"),
                "dropless-ragged": ("dropless", "ragged")}


def _moe_layer(params, x, *, top_k, activation, mode, capacity_factor, dropless_impl):
  """Router (fp32), top-k gating and the expert mixture: `[B, T, d] -> ([B, T, d], stats)`."""
  b, t, d = x.shape
  logits = (x.reshape(b * t, d).astype(jnp.float32) @ params["router"]).reshape(b, t, -1)
  weights, experts = routing.top_k_gating(logits, top_k)
  return dispatch.moe_ffn(x, weights, experts, params["w_in"], params["w_out"], params.get("w_gate"),
                          activation=activation, mode=mode, capacity_factor=capacity_factor,
                          dropless_impl=dropless_impl)


def _dense_layer(params, x, *, activation):
  # 2-D matmuls: XLA:CPU differentiates a [B, T, d] einsum much more slowly (contraction over B and T).
  x2 = x.reshape(-1, x.shape[-1])
  h = x2 @ params["w_in"]
  h = jax.nn.silu(x2 @ params["w_gate"]) * h if activation == "swiglu" else dispatch.gelu(h)
  return (h @ params["w_out"]).reshape(x.shape)


def run(args: argparse.Namespace) -> None:
  b, t, d, f, e, k = args.batch, args.seq_len, args.d_model, args.ffn_dim, args.experts, args.top_k
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.PRNGKey(args.seed), 8)
  x = jax.random.normal(keys[0], (b, t, d), dtype)
  cotangent = jax.random.normal(keys[1], (b, t, d), jnp.float32)

  def init(key, shape, fan_in):
    return (jax.random.normal(key, shape, jnp.float32) / fan_in**0.5).astype(dtype)

  moe_params = {"router": jax.random.normal(keys[2], (d, e), jnp.float32) / d**0.5,
                "w_in": init(keys[3], (e, d, f), d), "w_out": init(keys[4], (e, f, d), f)}
  dense_params = {"w_in": init(keys[5], (d, k * f), d), "w_out": init(keys[6], (k * f, d), k * f)}
  if args.activation == "swiglu":
    moe_params["w_gate"] = init(keys[7], (e, d, f), d)
    dense_params["w_gate"] = init(keys[7], (d, k * f), d)

  capacity = dispatch.moe_capacity(t, k, e, args.capacity_factor)
  slots = {"capacity": capacity, "dropless-padded": t, "dropless-ragged": t * k / e}
  layers = {"dense": (lambda p, x_: _dense_layer(p, x_, activation=args.activation), dense_params)}
  for name in args.variants:
    mode, impl = MOE_VARIANTS[name]
    layers[name] = (lambda p, x_, mode=mode, impl=impl: _moe_layer(
        p, x_, top_k=k, activation=args.activation, mode=mode, capacity_factor=args.capacity_factor,
        dropless_impl=impl)[0], moe_params)
  fns, dropped = {}, {}
  for name, (layer, params) in layers.items():
    fwd, both = _forward_and_backward(layer)
    fns[(name, "fwd")] = functools.partial(fwd, params, x)
    fns[(name, "fwd+bwd")] = functools.partial(both, params, x, cotangent)
  for name in args.variants:
    mode, impl = MOE_VARIANTS[name]
    stats = _moe_layer(moe_params, x, top_k=k, activation=args.activation, mode=mode,
                       capacity_factor=args.capacity_factor, dropless_impl=impl)[1]
    dropped[name] = f"{float(stats['dropped_fraction']):.3f}"

  print(f"backend={jax.default_backend()} dtype={args.dtype} activation={args.activation}  B={b} T={t} "
        f"d={d} f={f} E={e} k={k} ({b * t * k} assignments)  capacity_factor={args.capacity_factor} "
        f"(C={capacity})  median of {args.reps} interleaved rounds after {args.warmup} warm-up calls")
  medians = _interleaved_medians(fns, warmup=args.warmup, reps=args.reps)
  header = (f"{'variant':<17}{'rows/assign':>12}{'dropped':>9}{'fwd ms':>9}{'fwd x':>7}"
            f"{'fwd+bwd ms':>12}{'fwd+bwd x':>11}")
  print(header)
  print("-" * len(header))
  for name in layers:
    rows = "-" if name == "dense" else f"{e * slots[name] / (t * k):.3f}"
    t_fwd, t_all = medians[(name, "fwd")], medians[(name, "fwd+bwd")]
    print(f"{name:<17}{rows:>12}{dropped.get(name, '-'):>9}{1e3 * t_fwd:>9.1f}"
          f"{t_fwd / medians[('dense', 'fwd')]:>7.2f}{1e3 * t_all:>12.1f}"
          f"{t_all / medians[('dense', 'fwd+bwd')]:>11.2f}")
  print("rows/assign: expert rows computed per routed assignment (matmul FLOPs relative to dense); "
        "x: time relative to dense.")
