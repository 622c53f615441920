"""Benchmarks (CLI): `python -m diffmoe_jax.bench <subcommand> [flags]`.

Subcommands:
  moe        the MoE layer (router, top-k gating, dispatch, experts, combine) against a dense FFN of the
             same active FLOPs (d -> k·f -> d), forward and forward+backward, in one process, as ratios
             (bench_moe.py).
  attention  the differential attention layer (expert-conditional λ) against standard attention of the
             same width, forward and forward+backward, as ratios; differential attention's paths and the
             flash baselines per length (time, compiled temp memory); with --train-lengths, the longest
             context at which the config's train step compiles and runs within --memory-gib
             (bench_attention.py).
  compile    compile time of the scanned model's training gradient at two depths (default 32 vs 4 layers).
  train      a config's train step: tokens/s and MFU against this machine's measured matmul peak, and the
             data pipeline's tokens/s against what the step consumes.
  data       the input pipeline alone: the token cache's build, then batches/s and tokens/s at each phase's
             shape, per training process (bench_data.py).
  expert_parallel  the expert-parallel MoE layer against replicated experts on several devices, and its
             all-to-all bytes (bench_expert_parallel.py).
  generate   prefill and decode tokens/s with the KV cache, and decode with mixture-of-depths skipping
             against masking rejected tokens (bench_generate.py).
  kernels    each GPU attention kernel alone over launch settings: rows, loop step, warps, pipeline
             stages (bench_kernels.py).
  gpu_compile  the GPU attention kernels compiled for Hopper on any host: ptxas's registers and spills per
             kernel (bench_gpu_compile.py).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffmoe_jax import cli, config as config_lib, validation


def _interleaved_medians(fns: dict, *, warmup: int, reps: int) -> dict:
  """Median wall seconds of each zero-argument `fns[name]`, blocking on its result.

  All are compiled and warmed up first, then timed in turns (one call of each per round), so a change
  in machine load during the run affects them alike and the ratios stay meaningful.
  """
  for fn in fns.values():
    for _ in range(1 + warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _forward_and_backward(layer):
  """Jitted (fwd, fwd+bwd). fwd+bwd returns y and its VJP w.r.t. params and x for a given cotangent:
  inside a model the layers above need y, so y must not be optimised away as it would be by
  differentiating a loss linear in y."""
  def both(params, x, cotangent):
    y, vjp = jax.vjp(layer, params, x)
    return y, vjp(cotangent.astype(y.dtype))
  return jax.jit(layer), jax.jit(both)


def bench_compile(args: argparse.Namespace) -> None:
  from diffmoe_jax.nn import model as model_lib
  config = config_lib.load_file(args.config)
  for layers in args.layers:  # every depth is one the model takes, before anything compiles
    config.model.num_layers = layers
    validation.validate(config)
  tokens = jnp.zeros((args.batch, args.seq_len), jnp.int32)

  def compile_seconds(layers: int) -> float:
    cfg = ml_collections.ConfigDict(config.model.to_dict())
    cfg.num_layers = layers
    model = model_lib.build_model(cfg)
    params = jax.eval_shape(lambda: nn.unbox(model.init({"params": jax.random.PRNGKey(0)}, tokens))["params"])

    def loss(p):
      logits, aux = model.apply({"params": p}, tokens, train=True, rngs={"noise": jax.random.PRNGKey(0)})
      return jnp.mean(logits) + sum(aux["losses"].values())

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params).compile()
    return time.perf_counter() - start

  print(f"config {args.config}, batch {args.batch}, seq_len {args.seq_len}; after an untimed compile of "
        f"{args.layers[0]} layers (a process's first compile also pays one-time costs)", flush=True)
  compile_seconds(args.layers[0])
  seconds = {}
  for layers in args.layers:
    seconds[layers] = compile_seconds(layers)
    print(f"{layers:>4} layers: trace + lower + compile of the training gradient {seconds[layers]:6.1f} s",
          flush=True)
  first, last = args.layers[0], args.layers[-1]
  print(f"ratio {last} / {first} layers: {seconds[last] / seconds[first]:.2f}x")


def _gpu_launch(text: str) -> tuple[str, str]:
  """`KERNEL=ROWS,STEP,WARPS,STAGES`, checked as `model.attention_gpu_launch.KERNEL` would be."""
  kernel, _, launch = text.partition("=")
  try:
    config_lib.gpu_launches(ml_collections.ConfigDict({"attention_gpu_launch": {kernel: launch}}))
  except config_lib.ConfigError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return kernel, launch


def _train_config(args: argparse.Namespace):
  """The config `bench train` runs: the file's with the flags applied, validated; its curriculum and timed phase."""
  from diffmoe_jax.train.curriculum import Curriculum
  config = config_lib.load_file(args.config)
  if args.layers:
    config.model.num_layers = args.layers
  if args.remat_policy:
    config.model.update(remat_policy=args.remat_policy, remat_save_names=tuple(args.remat_save_names))
  if args.attention_impl:
    config.model.attention_impl = args.attention_impl
  if args.attention_gpu_backward:
    config.model.attention_gpu_backward = args.attention_gpu_backward
  if args.attention_gpu_forward:
    config.model.attention_gpu_forward = args.attention_gpu_forward
  for kernel, launch in args.attention_gpu_launch:
    config.model.attention_gpu_launch[kernel] = launch
  if args.max_seq_len:
    config.model.max_seq_len = args.max_seq_len
  if args.logits_chunk_len:
    config.model.logits_chunk_len = args.logits_chunk_len
  # --batch and --seq-len set the timed phase. The other phases are only built, never run: one sequence each
  # where their own batch would come from curriculum.tokens_per_batch, which a longer context can leave short.
  for name in config.curriculum.order:
    p = config.curriculum[name]
    if name == args.phase:
      p.update(batch_size=args.batch or p.batch_size, seq_len=args.seq_len or p.seq_len)
    elif not p.batch_size:
      p.batch_size = 1
  validation.validate(config)
  curriculum = Curriculum(config)
  return config, curriculum, next(p for p in curriculum.phases if p.name == args.phase)


def compiled_bytes(compiled) -> int | None:
  """Device memory a compiled program needs: its arguments, outputs and temporaries, an output that reuses a
  donated argument's buffer (the train step's state) counted once; None where the backend does not report it."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes


def _check_step_fits(compiled, config) -> None:
  """A ConfigError, before anything is allocated, if the compiled step needs more memory than a device here has
  (train.memory_headroom of it, as main's preflight reads it)."""
  from diffmoe_jax.train import preflight
  need = compiled_bytes(compiled)
  if need is None:  # a backend that does not report it
    return
  have = config.train.memory_headroom * preflight.available_bytes_per_device()
  if need > have:
    raise config_lib.ConfigError(
        f"the train step needs {need / 2**30:,.2f} GiB (its compiled arguments, outputs and temporaries), more than "
        f"the {have / 2**30:,.2f} GiB a device here has (train.memory_headroom = {config.train.memory_headroom}); "
        "lower --batch, --seq-len or --layers")


def bench_train(args: argparse.Namespace) -> None:
  from diffmoe_jax import data, estimate
  from diffmoe_jax.nn import model as model_lib
  from diffmoe_jax.train import metrics, state as state_lib, step as step_lib
  config, curriculum, phase = _train_config(args)
  corpus = data.build_corpus(config.data)
  data.check_separator(corpus.tokenizer, corpus.segment_masking)  # what main refuses to train on
  validation.check_tokenizer_vocab(config, corpus.tokenizer)
  settings = curriculum.settings(phase.start)
  model = model_lib.build_model(config.model)
  optimizer = state_lib.make_optimizer(config.optimizer)
  init = state_lib.init_fn(model, optimizer, phase.seq_len, config.train.loss_scale_init)
  make_state, rng = jax.jit(lambda r: nn.unbox(init(r))), jax.random.PRNGKey(config.seed)
  step = jax.jit(step_lib.config_train_step(config, model, optimizer, mod_mode=settings.mod_mode,
                                            mod_capacity=settings.mod_capacity), donate_argnums=0)
  dataset = data.train_dataset(corpus, seed=0, seq_len=phase.seq_len, batch_size=phase.batch_size,
                               domain_weights=dict(phase.domain_weights))
  dyn = {k: jnp.float32(v) for k, v in step_lib.dynamic_settings(settings).items()}
  batches = [{k: jnp.asarray(v) for k, v in dataset[i].items() if k != "domain"} for i in range(args.steps)]
  step = step.lower(jax.eval_shape(make_state, rng), batches[0], dyn).compile()
  _check_step_fits(step, config)
  state = make_state(rng)
  state, _ = step(state, batches[0], dyn)  # warm up
  jax.block_until_ready(state)
  start = time.perf_counter()
  for batch in batches:
    state, metrics_ = step(state, batch, dyn)
  jax.block_until_ready(metrics_)
  step_seconds = (time.perf_counter() - start) / args.steps
  tokens = phase.batch_size * phase.seq_len
  flops = estimate.train_flops_per_token(config.model, estimate.count_params(config.model), phase.seq_len,
                                        mod_mode=settings.mod_mode, mod_capacity=settings.mod_capacity)
  # The step runs on one device: its peak, as main reads it (the config's, else the known or measured one).
  peak = config.train.peak_flops_per_device or metrics.device_peak_flops()

  start = time.perf_counter()
  for i in range(args.data_batches):
    dataset[args.steps + i]
  data_tokens_per_second = args.data_batches * tokens / (time.perf_counter() - start)
  tokens_per_second = tokens / step_seconds
  print(f"config {args.config} ({config.model.num_layers} layers, {config.model.dtype}), phase {phase.name}: "
        f"seq_len {phase.seq_len}, batch {phase.batch_size}, MoD "
        f"{settings.mod_mode} {settings.mod_capacity:.3f}, attention {config.model.attention_impl} (GPU forward "
        f"{config.model.attention_gpu_forward}, backward {config.model.attention_gpu_backward}, launches "
        f"{dict(config_lib.gpu_launches(config.model)) or 'default'}), remat "
        f"{' '.join((config.model.remat_policy,) + tuple(config.model.remat_save_names))}, {args.steps} steps")
  print(f"train step  {1e3 * step_seconds:8.1f} ms  {tokens_per_second:10,.0f} tokens/s  "
        f"{flops / 1e6:.2f} MFLOP/token (3x forward)")
  where = ("config.train.peak_flops_per_device" if config.train.peak_flops_per_device else
           "this host's measured fp32 matmul rate" if jax.default_backend() == "cpu" else
           f"{jax.devices()[0].device_kind}'s 16-bit peak")
  if peak:
    print(f"MFU         {flops * tokens_per_second / peak:8.1%}  of {where}, {peak / 1e9:,.1f} GFLOP/s")
  else:
    print(f"MFU              n/a  (no known peak of {jax.devices()[0].device_kind}: set train.peak_flops_per_device "
          "in the config)")
  print(f"data        {data_tokens_per_second:10,.0f} tokens/s  = {data_tokens_per_second / tokens_per_second:,.0f}x "
        f"what the step consumes")
  if args.profile_top:
    from diffmoe_jax import op_profile
    hlo = step.as_text()

    def run():
      nonlocal state
      state, out = step(state, batches[0], dyn)
      jax.block_until_ready(out)

    rows = op_profile.breakdown(op_profile.trace_times(run, hlo, calls=args.steps), hlo)
    print("\n".join(op_profile.report(rows, calls=args.steps, top=args.profile_top)))


def _int_in(minimum: int, maximum: int | None = None):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
    if maximum is not None and value > maximum:
      raise argparse.ArgumentTypeError(f"{value} must be at most {maximum}")
    return value
  return parse


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not (value > 0 and math.isfinite(value)):
    raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
  return value


def _fraction(text: str) -> float:
  value = _positive_float(text)
  if value > 1:
    raise argparse.ArgumentTypeError(f"{value} must lie in (0, 1]")
  return value


def _config_file(path: str) -> str:
  """A config file that loads (as `main --config` checks it); its path, a leading ~ expanded (as `main`'s)."""
  path = os.path.expanduser(path)
  _, problem = cli.load_config(path)
  if problem:
    raise argparse.ArgumentTypeError(problem.removeprefix("--config: "))
  return path


POSITIVE, NON_NEGATIVE, SEED = _int_in(1), _int_in(0), _int_in(0, config_lib.MAX_SEED)


class _Parser(argparse.ArgumentParser):
  """argparse's parser, with a mistake reported in one line: not after the usage, which runs to a dozen lines
  for `train` and hid the error among them. Subcommands' parsers are of the same class."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the arguments)\n")


# XLA on GPU replays runs of a step's instructions as CUDA graphs ("command buffers"), which the profiler sees as
# one unnamed event each (on an H200 a PI-P step's profile was four such events and nothing else): off while
# profiling, so every instruction is timed on its own; the profiled run then also pays the launches they save.
PROFILE_XLA_FLAGS = "--xla_gpu_enable_command_buffer="


def main(argv: list[str] | None = None) -> None:
  parser = _Parser(prog="python -m diffmoe_jax.bench", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  from diffmoe_jax import bench_moe
  bench_moe.add_parser(commands)
  compile_ = commands.add_parser("compile", help="compile time of the scanned model at two depths")
  compile_.add_argument("--config", type=_config_file, default="configs/tiny.py")
  compile_.add_argument("--layers", type=POSITIVE, nargs="+", default=(4, 32))
  compile_.add_argument("--batch", type=POSITIVE, default=8)
  compile_.add_argument("--seq-len", type=POSITIVE, default=256)
  compile_.set_defaults(run=bench_compile)

  train = commands.add_parser("train", help="train-step tokens/s and MFU; data pipeline throughput")
  train.add_argument("--config", type=_config_file, default="configs/tiny.py")
  train.add_argument("--phase", default="long_context", help="the curriculum phase whose step is timed")
  train.add_argument("--steps", type=POSITIVE, default=10)
  train.add_argument("--data-batches", type=POSITIVE, default=200)
  train.add_argument("--layers", type=NON_NEGATIVE, default=0,
                     help="model.num_layers for the run (0: the config's), e.g. a PI-P-shaped 4-layer stack")
  train.add_argument("--batch", type=NON_NEGATIVE, default=0, help="sequences per step, the phase's batch_size (0: "
                     "the config's, or curriculum.tokens_per_batch // the seq_len)")
  train.add_argument("--seq-len", type=NON_NEGATIVE, default=0, help="tokens per sequence, the phase's seq_len (0: "
                     "the config's)")
  train.add_argument("--max-seq-len", type=NON_NEGATIVE, default=0,
                     help="model.max_seq_len for the run (0: the config's), to time a longer context")
  train.add_argument("--attention-impl", choices=config_lib.ATTENTION_IMPLS,
                     help="model.attention_impl (default: the config's)")
  train.add_argument("--attention-gpu-backward", choices=config_lib.GPU_BACKWARDS,
                     help="model.attention_gpu_backward (default: the config's)")
  train.add_argument("--attention-gpu-forward", choices=config_lib.GPU_FORWARDS,
                     help="model.attention_gpu_forward (default: the config's)")
  train.add_argument("--attention-gpu-launch", type=_gpu_launch, nargs="+", default=(),
                     metavar="KERNEL=ROWS,STEP,WARPS,STAGES",
                     help="model.attention_gpu_launch.KERNEL (forward, dq, dkv), e.g. dkv=64,32,4,2")
  train.add_argument("--remat-policy", choices=config_lib.REMAT_POLICIES, help="model.remat_policy (default: "
                     "the config's)")
  train.add_argument("--logits-chunk-len", type=NON_NEGATIVE, default=0,
                     help="model.logits_chunk_len (0: the config's): the loss's logits this many positions at a time")
  train.add_argument("--profile-top", type=NON_NEGATIVE, default=0, metavar="N",
                     help="also trace --steps steps with the JAX profiler and print where the time goes: per "
                          "part of the model, per kind of instruction, and the N slowest instructions (XLA's GPU "
                          "command buffers are then off, so each instruction shows)")
  train.add_argument("--remat-save-names", nargs="+", default=(), choices=config_lib.CHECKPOINT_NAMES,
                     help="model.remat_save_names, with --remat-policy save_names (or dots: kept besides)")
  train.set_defaults(run=bench_train)

  from diffmoe_jax import (bench_attention, bench_data, bench_expert_parallel, bench_generate, bench_gpu_compile,
                           bench_kernels)
  for module in (bench_attention, bench_data, bench_expert_parallel, bench_generate, bench_kernels, bench_gpu_compile):
    module.add_parser(commands)

  args = parser.parse_args(argv)
  if getattr(args, "profile_top", 0):  # before the first use of jax starts its backend, which reads the flags
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {PROFILE_XLA_FLAGS}".strip()
  from diffmoe_jax.data import DataError
  try:
    _check_and_run(args, commands.choices[args.command])  # a mistake is shown with its subcommand's usage
  except (config_lib.ConfigError, DataError) as e:  # a config file or data mistake: one line, as the other commands
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _check_gpu_kernels_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  """--attention-gpu-backward / --attention-gpu-launch set the GPU Pallas kernels: refused where the step would
  not run them (auto is explicit or blockwise on CPU; TPUs run the TPU layout), instead of being ignored."""
  from diffmoe_jax.ops import attention as attention_ops
  model = config_lib.load_file(args.config).model
  impl = args.attention_impl or model.attention_impl
  resolved = attention_ops.resolve_attention_impl(impl, length=args.seq_len or args.max_seq_len or model.max_seq_len)
  backend = jax.default_backend()
  if not (resolved == "pallas_gpu" or (resolved == "pallas" and backend != "tpu")):
    flag = next(f"--attention-gpu-{name}" for name in ("backward", "forward", "launch")
                if getattr(args, f"attention_gpu_{name}"))
    parser.error(f"argument {flag}: sets the GPU attention kernels, which this step does not run (attention {impl} "
                 f"on {backend} is {resolved}); run it on a GPU, or add --attention-impl pallas_gpu to run them "
                 "interpreted")


def _check_and_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  from diffmoe_jax import bench_attention, bench_data, bench_expert_parallel, bench_gpu_compile, bench_kernels
  if args.command in ("moe", "expert_parallel") and args.top_k > args.experts:
    parser.error(f"argument --top-k: {args.top_k} exceeds --experts ({args.experts})")
  if args.command == "train":
    from diffmoe_jax.train.curriculum import Curriculum
    phases = [p.name for p in Curriculum(config_lib.load_file(args.config)).phases]
    if args.phase not in phases:
      parser.error(f"argument --phase: {args.phase!r} is not a phase of {args.config}; choose from {phases}")
  if args.command in ("train", "compile") and args.seq_len:
    given = getattr(args, "max_seq_len", 0)  # (train has --max-seq-len, compile does not)
    context = given or config_lib.load_file(args.config).model.max_seq_len
    if args.seq_len > context:
      source = ("--max-seq-len" if given else
                f"model.max_seq_len of {args.config}; raise it with --max-seq-len")
      parser.error(f"argument --seq-len: {args.seq_len} exceeds the context of {context} ({source})")
  layers = getattr(args, "layers", None) if args.command in ("train", "compile", "gpu_compile") else None
  if layers:  # checked here, as validation would name model.mod.every, which bench gives no way to set
    fewest = min(layers) if isinstance(layers, (list, tuple)) else layers
    mod = config_lib.load_file(args.config).model.mod
    if mod.enabled and fewest < mod.every:
      parser.error(f"argument --layers: {fewest} is fewer than one layer group of {args.config} ({mod.every} layers, "
                   f"model.mod.every); give at least {mod.every}")
  if args.command == "attention":
    bench_attention.check_args(args, parser)
  if args.command == "kernels":
    bench_kernels.check_args(args, parser)
  if args.command == "gpu_compile":
    bench_gpu_compile.check_args(args, parser)
  if args.command == "expert_parallel":
    bench_expert_parallel.check_args(args, parser)
  if args.command == "data":
    bench_data.check_args(args, parser)
  if args.command == "train" and (args.attention_gpu_backward or args.attention_gpu_forward
                                  or args.attention_gpu_launch):
    _check_gpu_kernels_run(args, parser)
  keeps_names = ("save_names", "dots", "dots_no_batch")
  if args.command == "train" and (args.remat_policy == "save_names" and not args.remat_save_names
                                  or args.remat_save_names and args.remat_policy not in keeps_names):
    parser.error("argument --remat-save-names: give it with --remat-policy save_names, or dots / dots_no_batch")
  if args.command == "train":
    config, _, phase = _train_config(args)
    accum = config.optimizer.grad_accum_steps
    if phase.batch_size % accum:
      parser.error(f"argument --batch: {phase.batch_size} sequences do not split into the {accum} micro-batches of "
                   f"optimizer.grad_accum_steps in {args.config}; give a multiple of {accum}")
  args.run(args)


if __name__ == "__main__":
  cli.start_command()
  cli.interruptible(main)(None)  # Ctrl-C: one line and exit 130, not a traceback (or a crash in XLA's threads)
