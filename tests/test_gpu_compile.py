"""`bench gpu_compile` (bench_gpu_compile.py): reading ptxas's reports, the refusal without the CUDA plugin,
and, where the plugin and ptxas are installed (`pip install -e '.[gpu-compile]'`), the Mosaic GPU kernels
compiled for Hopper from this host: ptxas moves registers to their compute warpgroups and serialises no wgmma."""
import os
import re
import subprocess
import sys

import pytest

from diffmoe_jax import bench, bench_gpu_compile

# ptxas -v's report of one PTX file with two kernels (XLA's form: notes, when any, after the entry line) and of
# Mosaic GPU's single-kernel form (its notes first).
XLA_REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'loop_add_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compiling entry function 'flash_multi_map_dkv' for 'sm_90a'
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized
ptxas info    : Function properties for flash_multi_map_dkv
    560 bytes stack frame, 1276 bytes spill stores, 1104 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 560 bytes cumulative stack size
"""
MOSAIC_REPORT = """ptxas info    : (C7507) Potential Performance Loss: 'setmaxnreg' ignored to maintain minimum
ptxas warning : Registers are spilled to local memory in function 'k', 1728 bytes spill stores, 1440 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mosaic_attention_forward_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for mosaic_attention_forward_mosaic_gpu_kernel
    576 bytes stack frame, 1728 bytes spill stores, 1440 bytes spill loads
ptxas info    : Used 167 registers, used 16 barriers, 576 bytes cumulative stack size, 1 bytes smem
"""


def test_reads_each_kernels_registers_spills_and_notes():
  assert bench_gpu_compile.parse_ptxas(XLA_REPORT) == {
      "loop_add_fusion": {"registers": 10, "spill_stores": 0, "spill_loads": 0, "notes": []},
      "flash_multi_map_dkv": {"registers": 255, "spill_stores": 1276, "spill_loads": 1104,
                              "notes": ["wgmma serialised"]}}
  assert bench_gpu_compile.parse_ptxas(MOSAIC_REPORT) == {
      "mosaic_attention_forward_mosaic_gpu_kernel": {"registers": 167, "spill_stores": 1728, "spill_loads": 1440,
                                                     "notes": ["setmaxnreg ignored"]}}


PLUGIN = bench_gpu_compile.cuda_plugin_installed()


@pytest.mark.skipif(PLUGIN, reason="JAX's CUDA plugin is installed")
def test_without_the_cuda_plugin_it_says_what_to_install():
  with pytest.raises(SystemExit) as exit_:
    bench.main(["gpu_compile"])
  message = str(exit_.value)
  assert message.startswith("error: bench gpu_compile needs JAX's CUDA plugin, which is not installed: pip install "
                            "-e '.[gpu-compile]' (jax-cuda12-plugin=="), message
  assert "\n" not in message


@pytest.mark.skipif(not PLUGIN, reason="needs JAX's CUDA plugin and ptxas: pip install -e '.[gpu-compile]'")
@pytest.mark.parametrize("config", ["configs/pi_p.py", "configs/pi_s.py"])
def test_kernels_compile_and_mosaic_ones_keep_their_registers(config):
  """Both kernel families compile at PI-P's heads (72 and 144 columns a map) and PI-S's (64 and 128; there
  Triton's 128-row dk/dv asked for more shared memory than Hopper has, and the Mosaic dk/dv's products were
  refused a 128-byte swizzle). The Mosaic GPU kernels: with the register moves outside each warpgroup's
  branch ptxas ignored them and every kernel spilled 0.6-2.4 KB a thread with its wgmmas serialised; dk/dv
  at 64-query blocks still spilled ~1 KB (PI-P) or 0.8 KB (PI-S) with serialised wgmmas."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the plugin's CUDA platform is needed
  run = subprocess.run([sys.executable, "-m", "diffmoe_jax.bench", "gpu_compile", f"--config={config}",
                        "--seq-len", "1024"], capture_output=True, text=True, env=env, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = {m.group(1): (m.group(2), int(m.group(3)), m.group(4).strip()) for m in re.finditer(
      r"^(?:triton|mosaic)\s+(\w+)\s+(\d+)\s+(\d+)\s+\d+ *(.*)$", run.stdout, re.M)}
  names = {f"{prefix}_{kernel}" for prefix in ("flash_multi_map", "mosaic_attention")
           for kernel in ("forward", "dq", "dkv")}
  assert set(rows) == names, run.stdout
  for name, (_, spill_stores, notes) in rows.items():
    if name.startswith("mosaic"):
      assert notes == "" and spill_stores <= 256, (name, spill_stores, notes)


@pytest.mark.skipif(not PLUGIN, reason="needs JAX's CUDA plugin and ptxas: pip install -e '.[gpu-compile]'")
def test_the_train_step_compiled_for_a_gpu_has_a_roofline_below_the_peak():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  run = subprocess.run([sys.executable, "-m", "diffmoe_jax.bench", "gpu_compile", "--step", "--layers", "2",
                        "--seq-len", "1024", "--top", "3"], capture_output=True, text=True, env=env, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  bound = re.search(r"^roofline\s+([\d.]+) ms at 989 TFLOP/s and 3.35 TB/s.*MFU at most ([\d.]+)%$", run.stdout, re.M)
  assert bound and float(bound.group(1)) > 0 and 0 < float(bound.group(2)) < 100, run.stdout
  assert re.search(r"^  moe\s+backward\s+[\d.]+ ms", run.stdout, re.M), run.stdout
  # the compiled temporaries beside the memory check's estimate for the GPU (it errs high there)
  held = re.search(r"^memory .* temporaries ([\d.]+) GiB: ([\d.]+)x the memory check's estimate of them, ([\d.]+) GiB",
                   run.stdout, re.M)
  assert held and float(held.group(2)) == pytest.approx(float(held.group(1)) / float(held.group(3)), rel=0.05)
  assert 0 < float(held.group(2)) < 1, run.stdout


@pytest.mark.skipif(not PLUGIN, reason="needs JAX's CUDA plugin and ptxas: pip install -e '.[gpu-compile]'")
def test_the_train_step_compiles_for_a_mesh_of_gpus_sharded_as_the_trainer_shards_it():
  """--mesh: the step on 4 GPUs (compile-only ones here) as fsdp 2 x tensor 2, the memory per device beside the
  memory check's estimate for that mesh; a batch the mesh cannot split is refused before compiling."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  command = [sys.executable, "-m", "diffmoe_jax.bench", "gpu_compile", "--step", "--layers", "2", "--seq-len", "1024",
             "--top", "3", "--mesh", "fsdp=2,tensor=2"]
  run = subprocess.run(command + ["--batch", "4"], capture_output=True, text=True, env=env, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert re.search(r"^train step of .* on mesh fsdp=2,tensor=2: 2 layers, .* batch 4,", run.stdout, re.M), run.stdout
  held = re.search(r"^memory per device arguments ([\d.]+) GiB, temporaries [\d.]+ GiB: ([\d.]+)x the memory "
                   r"check's estimate", run.stdout, re.M)
  assert held and 0 < float(held.group(2)) < 1, run.stdout
  refused = subprocess.run(command + ["--batch", "3"], capture_output=True, text=True, env=env, timeout=900)
  assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
      "error: --mesh fsdp=2,tensor=2: its batch axes split the batch 2 ways, which --batch 3 is not a multiple of; "
      "--batch is the global batch"), refused.stderr[-2000:]


@pytest.mark.parametrize("argv, message", [
    (["--layers", "2"], "argument --layers: only with --step"),
    (["--remat-policy", "dots"], "argument --remat-policy: only with --step"),
    (["--logits-chunk-len", "512"], "argument --logits-chunk-len: only with --step"),
    (["--mesh", "fsdp=2"], "argument --mesh: only with --step"),
    (["--step", "--mesh", "fsdp=2,fsdp=2"], "argument --mesh: 'fsdp=2,fsdp=2' is not a mesh such as 'fsdp=4,tensor=2'"),
    (["--step", "--mesh", "tensor=0"], "argument --mesh: 'tensor=0' is not a mesh"),
    (["--step", "--families", "mosaic"], "argument --families: not with --step"),
])
def test_flags_of_the_other_mode_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    bench.main(["gpu_compile", *argv])
  assert message in capsys.readouterr().err
