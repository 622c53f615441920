"""`python -m diffmoe_jax.bench attention`: the differential attention layer against standard attention,
differential attention's implementations and flash baselines per length, and the longest context the
config's train step fits in.

On a GPU, `--dtype=bfloat16 --impls pallas four_flash_calls standard_flash --lengths 2048 4096 8192 16384`
compares the Pallas kernel (both maps in one pass) with the official layout's four cuDNN flash calls and
with one standard cuDNN flash attention of the same width.
"""
from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffmoe_jax import config as config_lib
from diffmoe_jax.bench import _forward_and_backward, _interleaved_medians, compiled_bytes


def add_parser(commands) -> None:
  from diffmoe_jax.bench import NON_NEGATIVE, POSITIVE, _config_file, _positive_float
  from diffmoe_jax.ops import attention as attention_ops
  attention = commands.add_parser("attention", help="differential vs standard attention; implementations and "
                                   "flash baselines per length; the longest trainable context")
  attention.add_argument("--config", type=_config_file, default="configs/tiny.py")
  attention.add_argument("--no-layer-ratio", dest="layer_ratio", action="store_false",
                         help="skip the differential-vs-standard layer timing")
  attention.add_argument("--batch", type=POSITIVE, default=8)
  attention.add_argument("--seq-len", type=POSITIVE, default=512)
  attention.add_argument("--warmup", type=NON_NEGATIVE, default=2)
  attention.add_argument("--reps", type=POSITIVE, default=9)
  attention.add_argument("--lengths", type=POSITIVE, nargs="*", default=(512, 1024, 2048, 4096, 8192),
                         help="lengths of the per-implementation sweep (none: skip it)")
  attention.add_argument("--impls", nargs="+", default=("explicit", "blockwise"),
                         choices=attention_ops.IMPLEMENTATIONS + tuple(VARIANTS) + BASELINES,
                         help="implementations of differential attention (pallas_one_pass: the GPU kernels with "
                         "the one-pass backward; pallas_mosaic: the Mosaic GPU kernels, pallas_mosaic_forward: its "
                         "forward with Triton's backward) and flash baselines to sweep")
  attention.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                         help="q, k, v dtype of the sweep")
  attention.add_argument("--sweep-batch", type=POSITIVE, default=1)
  attention.add_argument("--sweep-reps", type=POSITIVE, default=3)
  attention.add_argument("--block", type=POSITIVE, default=512, help="query/key block of the blockwise paths")
  attention.add_argument("--max-run-gib", type=_positive_float, default=8.0)
  attention.add_argument("--train-lengths", type=POSITIVE, nargs="*", default=(),
                         help="train-step lengths to try in order, e.g. 8192 16384 32768")
  attention.add_argument("--memory-gib", type=_positive_float, default=16.0)
  attention.set_defaults(run=run)


def check_args(args, parser) -> None:
  mosaic = [impl for impl in args.impls if VARIANTS.get(impl, {}).get("gpu_forward") == "mosaic"]
  if mosaic and args.dtype == "float32":
    parser.error(f"argument --impls: {mosaic[0]} runs the Mosaic GPU kernels, which take 16-bit inputs; add "
                 "--dtype bfloat16")


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def _attention_layer_ratio(args, config) -> None:
  """The differential layer (expert-conditional λ) against standard attention of the same width."""
  from diffmoe_jax.nn.attention import Attention
  b, t = args.batch, args.seq_len
  x = jax.random.normal(jax.random.PRNGKey(0), (b, t, config.model.d_model), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  e, k = config.model.moe.num_experts, config.model.moe.top_k
  gate_experts = jax.random.randint(jax.random.PRNGKey(1), (b, t, k), 0, e)
  gate_weights = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (b, t, k)), axis=-1)
  fns = {}
  for name, overrides in (("standard", dict(attention="standard", expert_conditional_lambda=False)),
                          ("differential", dict(attention="differential", expert_conditional_lambda=True))):
    cfg = ml_collections.ConfigDict(config.model.to_dict())
    cfg.update(overrides)
    module = Attention(ml_collections.FrozenConfigDict(cfg))
    gate = (gate_weights, gate_experts) if cfg.expert_conditional_lambda else None
    params = module.init(jax.random.PRNGKey(3), x, positions, 1, lambda_gate=gate)
    layer = lambda p, x_, module=module, gate=gate: module.apply(p, x_, positions, 1, lambda_gate=gate)[0]
    fwd, both = _forward_and_backward(layer)
    fns[(name, "fwd")] = functools.partial(fwd, params, x)
    fns[(name, "fwd+bwd")] = functools.partial(both, params, x, x)
  medians = _interleaved_medians(fns, warmup=args.warmup, reps=args.reps)
  m = config.model
  print(f"backend={jax.default_backend()} B={b} T={t} d={m.d_model} H={m.num_heads} Dv={m.head_dim} "
        f"impl={m.attention_impl}; median of {args.reps} interleaved rounds")
  for part in ("fwd", "fwd+bwd"):
    std, diff = medians[("standard", part)], medians[("differential", part)]
    print(f"{part:<8} standard {1e3 * std:8.1f} ms   differential {1e3 * diff:8.1f} ms   ratio {diff / std:.2f}x")


BASELINES = ("four_flash_calls", "standard_flash")
VARIANTS = {"pallas_one_pass": dict(implementation="pallas", gpu_backward="one_pass"),
            # The GPU layout forced, so that off a GPU the Mosaic GPU kernels run interpreted, not Triton's.
            "pallas_mosaic": dict(implementation="pallas_gpu", gpu_forward="mosaic", gpu_backward="mosaic"),
            "pallas_mosaic_forward": dict(implementation="pallas_gpu", gpu_forward="mosaic")}


def _flash_baseline(name: str, q, k, v, lam):
  """What differential attention is measured against, with `jax.nn.dot_product_attention` (cuDNN on GPU
  for 16-bit inputs, its XLA version elsewhere) and its own causal mask: "four_flash_calls", the official
  Diff-Transformer layout (flash kernels need v as wide as q and k: each map against each half of v), and
  "standard_flash", one standard attention of the same width (q, k and v of width Dv = 2D)."""
  from diffmoe_jax.ops import attention as attention_ops
  flash = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=attention_ops.fused_implementation(q.dtype, q.shape[-1]))
  if name == "standard_flash":
    wide = lambda x: x.reshape(x.shape[:3] + (-1,))  # [B, T, H, 2, D] -> [B, T, H, 2D]
    return flash(wide(q), wide(k), v)
  halves = jnp.split(v, 2, axis=-1)
  maps = [jnp.concatenate([flash(q[:, :, :, m], k[:, :, :, m], half) for half in halves], axis=-1) for m in (0, 1)]
  return (maps[0].astype(jnp.float32) - lam[..., None] * maps[1].astype(jnp.float32)).astype(v.dtype)


def _attention_length_sweep(args, config) -> None:
  """Differential attention per length, forward and forward+backward: each implementation's (and
  baseline's) median time and the compiled temp memory of its forward+backward."""
  from diffmoe_jax.ops import attention as attention_ops
  m = config.model
  b, h, d = args.sweep_batch, m.num_heads, m.head_dim // 2
  dtype = jnp.dtype(args.dtype)
  print(f"\ndifferential attention per length (op level, per-token λ, causal): backend={jax.default_backend()} "
        f"{dtype.name} B={b} H={h} D={d} Dv={m.head_dim}, blocks {args.block}; median of {args.sweep_reps} "
        f"interleaved rounds; runs only programs whose temp memory is under {args.max_run_gib} GiB")
  print(f"{'T':>6}" + "".join(f"{name:>{len(name) + 3}} fwd ms  fwd+bwd ms  GiB" for name in args.impls))
  for t in args.lengths:
    keys = jax.random.split(jax.random.PRNGKey(t), 4)
    q = jax.random.normal(keys[0], (b, t, h, 2, d), dtype)
    k = jax.random.normal(keys[1], (b, t, h, 2, d), dtype)
    v = jax.random.normal(keys[2], (b, t, h, 2 * d), dtype)
    lam = jax.random.uniform(keys[3], (b, t, h), jnp.float32)
    fns, temps = {}, {}
    for impl in args.impls:
      def attend(q, k, v, lam, impl=impl):
        if impl in BASELINES:
          return _flash_baseline(impl, q, k, v, lam)
        options = VARIANTS.get(impl, dict(implementation=impl))
        return attention_ops.differential_attention(q, k, v, lam, block_q=args.block, block_k=args.block, **options)
      loss = lambda q, k, v, lam, attend=attend: jnp.sum(attend(q, k, v, lam).astype(jnp.float32) * v)
      forward = jax.jit(attend).lower(q, k, v, lam).compile()
      both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, lam).compile()
      temps[impl] = both.memory_analysis().temp_size_in_bytes
      if temps[impl] <= args.max_run_gib * 2**30:
        fns[(impl, "fwd")] = functools.partial(forward, q, k, v, lam)
        fns[(impl, "both")] = functools.partial(both, q, k, v, lam)
    medians = _interleaved_medians(fns, warmup=1, reps=args.sweep_reps)
    row = f"{t:>6}"
    for impl in args.impls:
      ms = lambda part: f"{1e3 * medians[(impl, part)]:.2f}" if (impl, part) in medians else "(not run)"
      row += f"{ms('fwd'):>{len(impl) + 10}}{ms('both'):>12}{_gib(temps[impl]):>5}"
    # Parity: each output against the first that ran, of those computing differential attention (not standard_flash).
    outputs = {impl: fns[(impl, "fwd")]().astype(jnp.float32) for impl in args.impls
               if (impl, "fwd") in fns and impl != "standard_flash"}
    if len(outputs) > 1:
      first, *others = outputs
      row += "   max |Δ| vs " + first + ": " + ", ".join(
          f"{impl} {float(jnp.max(jnp.abs(outputs[impl] - outputs[first]))):.1e}" for impl in others)
    print(row, flush=True)


def _longest_train_context(args, config) -> None:
  """The config's train step as main builds it (batch 1 per micro-batch, MoD top-k at the config's capacity)
  at growing lengths: compiled memory (`bench.compiled_bytes`: the state once; the temporaries beside the
  estimator's gradients + activations) and one timed step while it fits in --memory-gib. Compiling allocates
  nothing, so any config compiles here (PI-P at its 8,192-token context included)."""
  from diffmoe_jax import memory
  from diffmoe_jax.nn import model as model_lib
  from diffmoe_jax.ops import attention as attention_ops
  from diffmoe_jax.train import state as state_lib, step as step_lib
  from diffmoe_jax.train.curriculum import Curriculum
  accum = config.optimizer.grad_accum_steps
  print(f"\ntrain step of {args.config} at batch 1{f' per micro-batch ({accum} accumulated)' if accum > 1 else ''}, "
        f"attention_impl={config.model.attention_impl} (resolved per length), remat {config.model.remat_policy}; "
        f"limit {args.memory_gib} GiB")
  longest = None
  for t in args.train_lengths:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.model.max_seq_len = t
    settings = Curriculum(config).settings(0)
    model = model_lib.build_model(cfg.model)
    optimizer = state_lib.make_optimizer(cfg.optimizer)
    step = jax.jit(step_lib.config_train_step(cfg, model, optimizer, mod_mode="topk",
                                              mod_capacity=cfg.model.mod.capacity), donate_argnums=0)
    init_state = state_lib.init_fn(model, optimizer, 16, cfg.train.loss_scale_init)
    init = lambda r, init_state=init_state: nn.unbox(init_state(r))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    rows = cfg.optimizer.grad_accum_steps  # one sequence per micro-batch
    batch = {"inputs": jnp.zeros((rows, t), jnp.int32), "targets": jnp.zeros((rows, t), jnp.int32)}
    dyn = {key: jnp.float32(value) for key, value in step_lib.dynamic_settings(settings).items()}
    start = time.perf_counter()
    compiled = step.lower(abstract, batch, dyn).compile()
    compile_s = time.perf_counter() - start
    mem, total = compiled.memory_analysis(), compiled_bytes(compiled)
    activations = memory.activation_bytes(cfg.model, 1, t)
    estimated = memory.step_temporaries(cfg, {}, activations) + activations
    attention = attention_ops.resolve_attention_impl(cfg.model.attention_impl, length=t)
    line = (f"T={t:>6}  {attention:<9}  compiled memory {_gib(total)} GiB (temp {_gib(mem.temp_size_in_bytes)}; "
            f"estimated {_gib(estimated)}, {estimated / mem.temp_size_in_bytes:.2f}x)  compile {compile_s:6.1f} s")
    if total > args.memory_gib * 2**30:
      print(line + "  over the limit: not run", flush=True)
      break
    state = jax.jit(init)(jax.random.PRNGKey(0))
    start = time.perf_counter()
    state, metrics_ = compiled(state, batch, dyn)
    loss = float(metrics_["loss"])
    print(line + f"  step {time.perf_counter() - start:7.1f} s  loss {loss:.3f}", flush=True)
    longest = t
  print(f"longest context that compiled and ran within {args.memory_gib} GiB: {longest}")


def run(args: argparse.Namespace) -> None:
  config = config_lib.load_file(args.config)
  if args.layer_ratio:
    _attention_layer_ratio(args, config)
  if args.lengths:
    _attention_length_sweep(args, config)
  if args.train_lengths:
    _longest_train_context(args, config)
