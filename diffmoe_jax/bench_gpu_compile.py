"""`python -m diffmoe_jax.bench gpu_compile`: the GPU attention kernels compiled for a Hopper GPU on any host,
with what ptxas reports of each: registers a thread, bytes spilled to local memory, and its notes on lost
performance (a `setmaxnreg` it ignored, wgmmas it serialised).

A kernel that spills in its loop, or whose wgmmas run one at a time, is slow before it is timed; this
finds that on a CPU. Off a GPU, XLA compiles for a described device without one (a compile-only device of
the CUDA plugin's topology, given `HOPPER`'s description); on a GPU host, for that GPU. The forward and
backward (dq, dk/dv) of each kernel family are compiled at a config's heads, as the model calls them.
Needs the CUDA plugin of the installed jaxlib and ptxas: `pip install -e '.[gpu-compile]'` (a CPU host
needs no CUDA libraries beyond these: nothing runs).

With --step it compiles the config's whole train step instead (as `bench train` builds it, the attention
kernels as on a GPU) and estimates each instruction's time from its FLOPs and bytes at the device's peak
and memory bandwidth (`op_profile.roofline_times`): a lower bound on the step's time, by part of the model,
and the highest MFU it allows. The Pallas kernels (attention) count by their bytes alone there.

    python -m diffmoe_jax.bench gpu_compile --config=configs/pi_p.py --seq-len 4096
    python -m diffmoe_jax.bench gpu_compile --step --config=configs/pi_p.py --layers 4 --seq-len 4096
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.metadata
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import ml_collections

from diffmoe_jax import config as config_lib
from diffmoe_jax import memory as memory_lib

# (forward, backward) of each kernel family: the Triton kernels (two passes or one), Hopper's Mosaic GPU ones.
FAMILIES = {"triton": ("triton", "two_pass"), "triton_one_pass": ("triton", "one_pass"), "mosaic": ("mosaic", "mosaic")}
# The device XLA compiles for off a GPU: an H100 SXM (ptxas sees only the architecture, sm_90a; XLA's fusion
# and tiling decisions read the rest).
HOPPER = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# ptxas's notes on performance it lost (Mosaic GPU's compile writes them beside the counts).
NOTES = {"C7507": "setmaxnreg ignored", "C7512": "wgmma serialised", "C7515": "wgmma serialised",
         "C7510": "wgmma serialised"}
ATTENTION_KERNELS = ("flash_multi_map", "mosaic_attention")  # the Triton and Mosaic GPU kernels' names start so


def add_parser(commands) -> None:
  from diffmoe_jax.bench import NON_NEGATIVE, POSITIVE, _config_file, _gpu_launch, _positive_float
  gpu = commands.add_parser("gpu_compile", help="the GPU attention kernels compiled for Hopper on any host: "
                                                "registers and spills per kernel, from ptxas")
  gpu.add_argument("--config", type=_config_file, default="configs/pi_p.py", help="whose heads")
  gpu.add_argument("--seq-len", type=POSITIVE, default=4096)
  gpu.add_argument("--batch", type=POSITIVE, default=1)
  gpu.add_argument("--families", nargs="+", choices=tuple(FAMILIES), default=("triton", "mosaic"))
  gpu.add_argument("--attention-gpu-launch", type=_gpu_launch, nargs="+", default=(),
                   metavar="KERNEL=ROWS,STEP,WARPS,STAGES",
                   help="the Triton kernels' model.attention_gpu_launch.KERNEL (forward, dq, dkv), e.g. dkv=64,32,4,2")
  gpu.add_argument("--step", action="store_true", help="the config's train step, with a roofline estimate of "
                   "where its time goes")
  gpu.add_argument("--layers", type=POSITIVE, default=4, help="with --step: model.num_layers")
  gpu.add_argument("--remat-policy", choices=config_lib.REMAT_POLICIES, help="with --step: model.remat_policy")
  gpu.add_argument("--remat-save-names", nargs="+", default=(), choices=config_lib.CHECKPOINT_NAMES,
                   help="with --step and --remat-policy save_names or dots: model.remat_save_names")
  gpu.add_argument("--logits-chunk-len", type=NON_NEGATIVE, default=0,
                   help="with --step: model.logits_chunk_len (0: the config's)")
  gpu.add_argument("--mesh", type=mesh_flag, default={}, metavar="AXIS=SIZE,...",
                   help="with --step: the mesh (config.mesh.shape's axes, the rest 1; --batch is the global batch), "
                        "compiled for as many GPUs of this host or compile-only ones; e.g. fsdp=4,tensor=2")
  gpu.add_argument("--phase", default="long_context", help="with --step: the curriculum phase whose step it is")
  gpu.add_argument("--bandwidth-tbps", type=_positive_float, default=3.35,
                   help="with --step: the device's memory bandwidth (an H100 SXM's 3.35; an H200's 4.8)")
  gpu.add_argument("--top", type=POSITIVE, default=15, help="with --step: the instructions listed")
  gpu.set_defaults(run=run)


STEP_ONLY = ("layers", "remat_policy", "remat_save_names", "logits_chunk_len", "mesh", "phase", "bandwidth_tbps",
             "top")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  """Flags of the other mode are refused rather than ignored."""
  if not args.step:
    for name in STEP_ONLY:
      if getattr(args, name) != parser.get_default(name):
        parser.error(f"argument --{name.replace('_', '-')}: only with --step")
  elif tuple(args.families) != tuple(parser.get_default("families")):
    parser.error("argument --families: not with --step, which compiles the config's own kernels")


def cuda_plugin_installed() -> bool:
  return importlib.util.find_spec("jax_plugins") is not None and (
      importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def requirements() -> str:
  """ptxas's path; SystemExit naming what to install when the CUDA plugin or ptxas is missing."""
  jaxlib = importlib.metadata.version("jaxlib")
  install = (f"pip install -e '.[gpu-compile]' (jax-cuda12-plugin=={jaxlib}, jax-cuda12-pjrt=={jaxlib} and "
             "nvidia-cuda-nvcc-cu12: the plugin of the installed jaxlib and ptxas)")
  if not cuda_plugin_installed():
    raise SystemExit(f"error: bench gpu_compile needs JAX's CUDA plugin, which is not installed: {install}")
  nvcc = importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.cuda_nvcc")
  bundled = os.path.join(list(nvcc.submodule_search_locations)[0], "bin", "ptxas") if nvcc else ""
  ptxas = bundled if os.path.exists(bundled) else shutil.which("ptxas")
  if not ptxas:
    raise SystemExit(f"error: bench gpu_compile needs ptxas, found neither in nvidia-cuda-nvcc-cu12 nor on PATH: "
                     f"{install}")
  return ptxas


def target_devices(count: int = 1):
  """`count` GPUs of this host, else as many compile-only Hopper devices (one host's), and how to name them."""
  try:
    gpus = jax.devices("cuda")
  except RuntimeError:
    gpus = []
  if len(gpus) >= count:
    return gpus[:count], "this host's GPU" + ("s" if count > 1 else "")
  from jax.experimental import topologies
  devices = topologies.get_topology_desc("", "cuda", target_config=HOPPER, topology=f"1x1x{count}").devices
  return devices, (f"{count} compile-only devices: this host has {len(gpus) or 'no'} GPU{'' if len(gpus) == 1 else 's'}"
                   if count > 1 else "a compile-only device: this host has no GPU")


def parse_ptxas(text: str) -> dict[str, dict]:
  """ptxas -v output -> {entry function: {"registers", "spill_stores", "spill_loads", "notes"}}. Notes printed
  before a function's "Compiling entry function" line (Mosaic GPU's single-kernel files) are that function's."""
  kernels, notes, current = {}, [], None
  for line in text.splitlines():
    code = re.search(r"\((C\d{4})\)", line)
    if code and code.group(1) in NOTES:
      target = kernels[current]["notes"] if current else notes
      if NOTES[code.group(1)] not in target:
        target.append(NOTES[code.group(1)])
    entry = re.search(r"Compiling entry function '([^']+)'", line)
    if entry:
      current = entry.group(1)
      kernels[current] = {"registers": None, "spill_stores": 0, "spill_loads": 0, "notes": notes}
      notes = []
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if spill and current:
      kernels[current].update(spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)))
    registers = re.search(r"Used (\d+) registers", line)
    if registers and current:
      kernels[current]["registers"] = int(registers.group(1))
  return kernels


def _attention_gradient(config, args, family: str, device, dump: str) -> None:
  """The config's attention (forward and all gradients) with `family`'s kernels, compiled for `device`, with
  XLA's and Mosaic GPU's dumps in `dump`."""
  from jax.sharding import SingleDeviceSharding
  from diffmoe_jax.ops import attention as attention_ops
  m = config.model
  forward, backward = FAMILIES[family]
  flags = ml_collections.ConfigDict({"attention_gpu_launch": dict(args.attention_gpu_launch)})
  launches = tuple(sorted({**dict(config_lib.gpu_launches(m)), **dict(config_lib.gpu_launches(flags))}.items()))
  # "pallas": lowered for a CUDA device, each stage takes its CUDA branch ("pallas_gpu" would pick Mosaic GPU's
  # by the host's backend, interpreted on a CPU host).
  common = dict(implementation="pallas", gpu_forward=forward, gpu_backward=backward, gpu_launches=launches)
  b, t, h = args.batch, args.seq_len, m.num_heads
  differential = m.attention != "standard"
  d = m.head_dim // 2 if differential else m.head_dim
  dtype = jnp.dtype(m.dtype if m.dtype != "float32" else "bfloat16")

  def loss(q, k, v, lam):
    if differential:
      out = attention_ops.differential_attention(q, k, v, lam, **common)
    else:
      out = attention_ops.standard_attention(q[:, :, :, 0], k[:, :, :, 0], v, **common)
    return jnp.sum(out.astype(jnp.float32))

  sharding = SingleDeviceSharding(device)
  shape = lambda s, dt: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
  operands = (shape((b, t, h, 2, d), dtype), shape((b, t, h, 2, d), dtype), shape((b, t, h, m.head_dim), dtype),
              shape((b, t, h), jnp.float32))
  os.environ["MOSAIC_GPU_DUMP_TO"] = os.path.join(dump, "mosaic")
  os.makedirs(os.environ["MOSAIC_GPU_DUMP_TO"])
  gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  gradient.trace(*operands).lower().compile(compiler_options={"xla_dump_to": os.path.join(dump, "xla")})


def kernel_reports(dump: str, ptxas: str) -> dict[str, dict]:
  """ptxas's report of every kernel in a compile's dumps: XLA's PTX assembled here, Mosaic GPU's as it wrote it."""
  reports = {}
  for path in sorted(glob.glob(os.path.join(dump, "xla", "*.ptx"))):
    with open(path) as f:
      if ".entry" not in f.read():  # XLA also dumps a module's empty PTX (no kernel of its own)
        continue
    run = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    if run.returncode:
      raise SystemExit(f"error: ptxas failed on {path}: {(run.stderr or run.stdout).strip().splitlines()[-1]}")
    reports.update(parse_ptxas(run.stdout + run.stderr))
  for path in sorted(glob.glob(os.path.join(dump, "mosaic", "*.ptxas"))):
    with open(path) as f:
      reports.update(parse_ptxas(f.read()))
  return reports


# What a program that does not compile for the target raises: XLA's errors (shared memory, tiling) and the
# kernels' lowering checks (wgmma shapes).
NOT_COMPILED = (jax.errors.JaxRuntimeError, ValueError)


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextlib.contextmanager
def _backend_of(device):
  """The model picks some paths by `jax.default_backend()` (dispatch, attention blocks): while tracing for
  `device`, it answers with that device's platform, so the program is the one that device would run."""
  host = jax.default_backend
  jax.default_backend = lambda: device.platform
  try:
    yield
  finally:
    jax.default_backend = host


def _train_step(args, devices):
  """The config's train step (`bench train`'s, attention on the Pallas kernels) compiled for `devices` on the
  mesh of --mesh (one device: all axes 1), sharded as the trainer shards it; its model FLOPs per step (3x
  forward, as MFU counts them), config, phase and the phase's settings."""
  import flax.linen as nn
  from diffmoe_jax import bench, estimate, parallel
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.nn import model as model_lib
  from diffmoe_jax.train import state as state_lib, step as step_lib
  args = argparse.Namespace(**vars(args), attention_impl="pallas", attention_gpu_forward=None,
                            attention_gpu_backward=None, max_seq_len=0)
  config, curriculum, phase = bench._train_config(args)
  config.mesh.shape.update({axis: args.mesh.get(axis, 1) for axis in config_lib.MESH_AXES})
  settings = curriculum.settings(phase.start)
  rules = parallel.axis_rules(config.mesh)
  split = parallel.logical_axis_size(dict(config.mesh.shape), rules, "batch")
  if phase.batch_size % split:
    raise ConfigError(f"its batch axes split the batch {split} ways, which --batch {phase.batch_size} is not a "
                      "multiple of; --batch is the global batch")
  with _backend_of(devices[0]):
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    model = model_lib.build_model(config.model)
    optimizer = state_lib.make_optimizer(config.optimizer)
    state, shardings, _ = state_lib.create_state(model, optimizer, mesh, rules, seed=0, seq_len=phase.seq_len,
                                                 loss_scale_init=config.train.loss_scale_init)
    tokens = parallel.batch_sharding(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct((phase.batch_size, phase.seq_len), jnp.int32, sharding=tokens)
             for k in ("inputs", "targets", "segment_ids")}
    scalar = parallel.replicated(mesh)
    dyn = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar) for k in step_lib.dynamic_settings(settings)}
    step = step_lib.config_train_step(config, model, optimizer, mod_mode=settings.mod_mode,
                                      mod_capacity=settings.mod_capacity)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      compiled = jax.jit(step, in_shardings=(shardings, {k: tokens for k in batch}, scalar),
                         out_shardings=(shardings, scalar), donate_argnums=0).trace(state, batch, dyn).lower().compile()
  flops = phase.batch_size * phase.seq_len * estimate.train_flops_per_token(
      config.model, estimate.count_params(config.model), phase.seq_len, mod_mode=settings.mod_mode,
      mod_capacity=settings.mod_capacity)
  return compiled, flops, config, phase, settings


def run_step(args, devices, where: str) -> None:
  from diffmoe_jax import op_profile, parallel
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.train import metrics
  kind = devices[0].device_kind
  try:
    compiled, model_flops, config, phase, settings = _train_step(args, devices)
  except ConfigError as e:  # a mesh that does not divide a dimension (a ValueError: before NOT_COMPILED)
    raise SystemExit(f"error: --mesh {_mesh_text(args.mesh)}: {e}") from None
  except NOT_COMPILED as e:
    raise SystemExit(f"error: the train step does not compile for {kind}: {_first_line(e)}") from None
  hlo = compiled.as_text()
  costs = op_profile.instruction_costs(hlo)
  kernels = {name for name, i in op_profile.instructions(hlo).items() if i.kind.startswith("kernel")}
  peak, bandwidth = metrics.peak_of_kind(kind), args.bandwidth_tbps * 1e12
  times = op_profile.roofline_times(costs, peak, bandwidth)
  bound = sum(t for name, t in times.items() if name not in kernels)
  memory = compiled.memory_analysis()
  shape, rules = dict(config.mesh.shape), parallel.axis_rules(config.mesh)
  with _backend_of(devices[0]):  # the estimate of what the train step holds beyond its state, as `main` checks it
    activations = memory_lib.activation_bytes(
        config.model, phase.batch_size // parallel.logical_axis_size(shape, rules, "batch"), phase.seq_len,
        mod_capacity=settings.mod_capacity, tensor=parallel.logical_axis_size(shape, rules, "heads"))
    estimated = memory_lib.step_temporaries(config, shape, activations) + activations
  m = config.model
  on = f" on mesh {_mesh_text(args.mesh)}" if len(devices) > 1 else ""
  print(f"train step of {args.config} compiled for {kind} ({where}){on}: {m.num_layers} layers, "
        f"{m.dtype}, seq_len {phase.seq_len}, batch {phase.batch_size}, MoD {settings.mod_mode} "
        f"{settings.mod_capacity:.3f}, remat {' '.join((m.remat_policy,) + tuple(m.remat_save_names))}, attention "
        f"kernels {m.attention_gpu_forward} / {m.attention_gpu_backward}")
  per = " per device" if len(devices) > 1 else ""
  label = "memory per device " if per else "memory      "
  print(f"{label}arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
        f"{memory.temp_size_in_bytes / 2**30:.2f} GiB: {memory.temp_size_in_bytes / estimated:.2f}x the memory "
        f"check's estimate of them, {estimated / 2**30:.2f} GiB (activations {activations / 2**30:.2f} GiB)")
  print(f"work        model {model_flops / 1e12:.2f} TFLOP (3x forward{', all devices' if per else ''}), matmuls "
        f"compiled {sum(f for f, _ in costs.values()) / 1e12:.2f} TFLOP{per} (with remat's recompute), "
        f"{sum(b for _, b in costs.values()) / 1e9:.1f} GB moved{per}")
  # On a mesh each device runs its part; collectives are costed by their bytes at the memory's bandwidth, not
  # the interconnect's.
  collectives = ", collectives counted at memory bandwidth" if per else ""
  print(f"roofline    {1e3 * bound:.2f} ms at {peak / 1e12:.0f} TFLOP/s and {args.bandwidth_tbps:g} TB/s, besides "
        f"{len(kernels)} Pallas kernel calls (counted by bytes alone below){collectives}: MFU at most "
        f"{model_flops / (bound * peak * len(devices)):.1%}")
  rows = op_profile.breakdown(times, hlo)
  print("\n".join(op_profile.report(rows, calls=1, top=args.top, heading="roofline")))


def _mesh_text(mesh: dict[str, int]) -> str:
  return ",".join(f"{axis}={size}" for axis, size in mesh.items()) or "(one device)"


def mesh_flag(text: str) -> dict[str, int]:
  """--mesh "fsdp=4,tensor=2" -> {"fsdp": 4, "tensor": 2}: each of config.mesh's axes at most once, sizes >= 1."""
  mesh = {}
  for part in text.split(","):
    axis, _, size = part.partition("=")
    axis = axis.strip()
    if axis not in config_lib.MESH_AXES or axis in mesh or not size.strip().isdigit() or int(size) < 1:
      raise argparse.ArgumentTypeError(
          f"{text!r} is not a mesh such as 'fsdp=4,tensor=2': each of {', '.join(config_lib.MESH_AXES)} at most "
          "once, with a size of at least 1")
    mesh[axis] = int(size)
  return mesh


def run(args: argparse.Namespace) -> None:
  ptxas = requirements()
  # Off a GPU the plugin's CUDA checks would refuse to load it; Mosaic GPU writes ptxas's report per kernel.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
  config = config_lib.load_file(args.config)
  if args.step:
    devices, where = target_devices(math.prod(args.mesh.values()))
    return run_step(args, devices, where)
  (device,), where = target_devices()
  m = config.model
  print(f"GPU attention kernels of {args.config} compiled for {device.device_kind} ({where}): B={args.batch} "
        f"T={args.seq_len} H={m.num_heads} head_dim={m.head_dim} {m.attention}; forward and gradients")
  print(f"{'family':<16}{'kernel':<40}{'registers':>10}{'spill stores':>14}{'spill loads':>13}  notes")
  failed = []
  for family in args.families:
    dump = tempfile.mkdtemp(prefix=f"gpu_compile_{family}_")
    try:
      _attention_gradient(config, args, family, device, dump)
      reports = kernel_reports(dump, ptxas)
    except NOT_COMPILED as e:  # a finding, reported as one: the other families still compile
      print(f"{family:<16}does not compile: {_first_line(e)}", flush=True)
      failed.append(family)
      continue
    finally:
      shutil.rmtree(dump, ignore_errors=True)
    attention = {name: r for name, r in reports.items() if name.startswith(ATTENTION_KERNELS)}
    others = {name: r for name, r in reports.items() if name not in attention}
    for name, r in sorted(attention.items()):
      print(f"{family:<16}{name.removesuffix('_mosaic_gpu_kernel'):<40}{r['registers']:>10}{r['spill_stores']:>14}"
            f"{r['spill_loads']:>13}  {', '.join(r['notes'])}")
    spilling = sorted(name for name, r in others.items() if r["spill_stores"])
    print(f"{family:<16}{len(others)} XLA kernels around them; spilling: {', '.join(spilling) or 'none'}", flush=True)
  if failed:
    raise SystemExit(f"error: the {' and '.join(failed)} kernels do not compile for {device.device_kind}")
