"""Every `python -m diffmoe_jax.bench` subcommand runs at a small size and prints its figures (the README's
benchmark table comes from these commands; `bench kernels` and `bench expert_parallel` have their own tests)."""
import os
import re
import subprocess
import sys

import pytest

from diffmoe_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"[\d,.]+"
CASES = {
    "moe": (["--batch", "2", "--seq-len", "32", "--d-model", "16", "--ffn-dim", "32", "--experts", "4", "--reps", "1",
             "--warmup", "0"],
            [rf"^{variant} .* {NUMBER} +{NUMBER} +{NUMBER} +{NUMBER}$"
             for variant in ("dense", "capacity", "dropless-padded", "dropless-ragged")]),
    "attention": (["--seq-len", "32", "--lengths", "64", "--block", "16", "--reps", "1", "--warmup", "0",
                   "--sweep-batch", "1", "--sweep-reps", "1"],
                  [rf"^fwd +standard +{NUMBER} ms +differential +{NUMBER} ms +ratio {NUMBER}x$",
                   rf"^fwd\+bwd +standard +{NUMBER} ms +differential +{NUMBER} ms +ratio {NUMBER}x$",
                   r"^ +64 .* max \|Δ\| vs explicit: blockwise \d\.\de-0[6-9]$"]),  # the two paths agree
    "generate": (["--batch", "1", "--prompt-len", "8", "--new-tokens", "4", "--reps", "1"],
                 [rf"^ +prefill +{NUMBER} tokens/s$", rf"^ +decode, MoD skipping +{NUMBER} tokens/s",
                  rf"^ +decode speed, skipping / masking: {NUMBER}x$"]),
    "train": (["--steps", "2", "--data-batches", "2", "--layers", "2", "--batch", "8", "--seq-len", "32",
               "--profile-top", "3"],
              [rf"^train step +{NUMBER} ms +{NUMBER} tokens/s", rf"^MFU +{NUMBER}%",
               rf"^data +{NUMBER} tokens/s += {NUMBER}x what the step consumes$",
               rf"^  attention +backward +{NUMBER} ms +{NUMBER}%$", rf"^  moe +recompute +{NUMBER} ms",
               rf"^  matmul +{NUMBER} ms", r"^the 3 slowest instructions:$"]),
    "data": (["--batches", "2", "--phase", "warmup", "anneal"],
             [rf"^corpus +{NUMBER} s to build or reuse the token cache: code {NUMBER} tokens, docs {NUMBER} tokens$",
              rf"^warmup +64 +32 +{NUMBER} batches/s +{NUMBER} tokens/s +{NUMBER} batches/s +{NUMBER} tokens/s$",
              rf"^anneal +256 +8 +{NUMBER} batches/s +{NUMBER} tokens/s +{NUMBER} batches/s +{NUMBER} tokens/s$"]),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_bench_command_prints_its_figures(command, capsys):
  args, patterns = CASES[command]
  bench.main([command, *args])
  out = capsys.readouterr().out
  for pattern in patterns:
    assert re.search(pattern, out, re.MULTILINE), (pattern, out)


def test_profiling_turns_off_gpu_command_buffers_before_jax_starts(monkeypatch):
  """With --profile-top, XLA's GPU command buffers are off (the profiler sees each one as one unnamed event), set
  before the backend reads XLA_FLAGS; flags already given are kept. (A wrong --phase ends the command early.)"""
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  with pytest.raises(SystemExit):
    bench.main(["train", "--profile-top", "3", "--phase", "no_such_phase"])
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_enable_command_buffer="
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(SystemExit):
    bench.main(["train", "--phase", "no_such_phase"])
  assert os.environ["XLA_FLAGS"] == ""


def test_ctrl_c_ends_the_command_in_one_line():
  """Ctrl-C (here raised where `bench moe` starts its work) ends the command with one line and exit 130, not a
  traceback, nor a crash of XLA's compile threads at interpreter exit."""
  code = ("import runpy, sys\nfrom diffmoe_jax.ops import dispatch\n"
          "def interrupted(*args, **kwargs):\n  raise KeyboardInterrupt\n"
          "dispatch.moe_capacity = interrupted\nsys.argv = ['bench', 'moe']\n"
          "runpy.run_module('diffmoe_jax.bench', run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 130 and proc.stderr.strip() == "error: interrupted.", proc.stderr[-2000:]


@pytest.mark.parametrize("argv, accepted", [
    (["--attention-gpu-backward", "one_pass"], False),  # auto is explicit / blockwise on a CPU
    (["--attention-gpu-launch", "dkv=64,32,4,2", "--attention-impl", "blockwise"], False),
    (["--attention-gpu-forward", "mosaic"], False),
    (["--attention-gpu-backward", "one_pass", "--attention-impl", "pallas_gpu"], True),  # interpreted on a CPU
])
def test_gpu_kernel_flags_are_refused_where_the_step_does_not_run_the_kernels(argv, accepted, capsys, monkeypatch):
  ran = []
  monkeypatch.setattr(bench, "bench_train", lambda args: ran.append(args))
  if accepted:
    bench.main(["train", *argv])
    assert len(ran) == 1
    return
  with pytest.raises(SystemExit) as info:
    bench.main(["train", *argv])
  err = capsys.readouterr().err
  assert info.value.code == 2 and not ran
  assert f"argument {argv[0]}: sets the GPU attention kernels, which this step does not run (attention " in err, err


CONFIG = f"""from diffmoe_jax import config as config_lib

def get_config():
  c = config_lib.load_file({os.path.join(ROOT, "configs", "tiny.py")!r})
  c.model.num_layers = 2
  c.optimizer.grad_accum_steps = 2
  c.train.update(loss_scale_init=8.0, loss_scale_growth_interval=3, loss_scale_min=2.0, peak_flops_per_device=1e9)
  return c
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "config.py"
  path.write_text(CONFIG)
  return str(path)


@pytest.fixture(scope="module")
def train_run(config_path):
  """`bench train` (at a context beyond tokens_per_batch) and `bench attention --train-lengths` of a config with
  gradient accumulation, its own loss-scale settings and peak: (bench train's output, {"step" / "init": the arguments of each train step and
  state init they built})."""
  import contextlib
  import inspect
  import io
  from diffmoe_jax.train import state as state_lib, step as step_lib
  built = {"step": [], "init": []}

  def recorded(name, fn):
    def wrapper(*args, **kwargs):
      caller = os.path.basename(sys._getframe(1).f_code.co_filename)
      if name == "step" or caller.startswith("bench"):  # (not estimate's abstract state)
        built[name].append(inspect.signature(fn).bind(*args, **kwargs).arguments)
      return fn(*args, **kwargs)
    return wrapper
  out = io.StringIO()
  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
    patch.setattr(step_lib, "make_train_step", recorded("step", step_lib.make_train_step))
    patch.setattr(state_lib, "init_fn", recorded("init", state_lib.init_fn))
    bench.main(["train", "--config", config_path, "--steps", "1", "--data-batches", "1", "--batch", "2",
                "--seq-len", "16", "--max-seq-len", "4096"])
    train_out = out.getvalue()
    bench.main(["attention", "--config", config_path, "--no-layer-ratio", "--lengths", "--train-lengths", "16"])
  return train_out, built


def test_bench_train_and_attention_build_the_step_main_trains_with(train_run):
  """The config's accumulation and float16 loss-scale settings, as the training loop passes them (the scale's
  growth and floor were the defaults, its start too, and `attention --train-lengths` did not accumulate)."""
  _, built = train_run
  keys = ("grad_accum_steps", "loss_scale_growth_interval", "loss_scale_min")
  steps = [{k: arguments.get(k) for k in keys} for arguments in built["step"]]
  assert steps == 2 * [{"grad_accum_steps": 2, "loss_scale_growth_interval": 3, "loss_scale_min": 2.0}], steps
  assert [arguments.get("loss_scale_init") for arguments in built["init"]] == [8.0, 8.0], built["init"]


def test_bench_train_mfu_is_against_the_configured_peak(train_run):
  """MFU = FLOPs per token x tokens/s / config.train.peak_flops_per_device, as main logs it (the measured CPU
  rate was used instead)."""
  out, _ = train_run
  tokens_per_s, mflop = re.search(rf"^train step +{NUMBER} ms +({NUMBER}) tokens/s +({NUMBER}) MFLOP/token", out,
                                  re.MULTILINE).groups()
  mfu = re.search(r"^MFU +([\d,.]+)% +of config.train.peak_flops_per_device, 1.0 GFLOP/s$", out, re.MULTILINE)
  assert mfu, out
  expected = 100 * float(mflop) * 1e6 * float(tokens_per_s.replace(",", "")) / 1e9
  assert abs(float(mfu.group(1).replace(",", "")) - expected) <= 0.01 * expected, (expected, out)


def test_bench_train_times_a_context_longer_than_tokens_per_batch(train_run):
  """--max-seq-len 4096 beyond tiny's tokens_per_batch (2,048): the timed phase takes --batch and --seq-len, and
  the phases not run no longer refuse the config ("long_context.batch_size: is 0 and curriculum.tokens_per_batch
  (2048) is below the phase's seq_len (4096)", even with --batch given)."""
  out, _ = train_run
  assert re.search(r"^config .* phase long_context: seq_len 16, batch 2, MoD topk", out, re.MULTILINE), out


def test_bench_attention_counts_the_donated_state_once(config_path, capsys, monkeypatch):
  """The train step donates its state: the output state reuses the argument's buffers, which the compiled
  memory counted twice (3 + 2 + 1 GiB here, where 2 GiB of the outputs are the donated arguments')."""
  import types
  import jax
  gib = 2**30
  stats = types.SimpleNamespace(argument_size_in_bytes=3 * gib, output_size_in_bytes=2 * gib,
                                alias_size_in_bytes=2 * gib, temp_size_in_bytes=1 * gib)
  monkeypatch.setattr(jax.stages.Compiled, "memory_analysis", lambda self: stats)
  bench.main(["attention", "--config", config_path, "--no-layer-ratio", "--lengths", "--train-lengths", "16",
              "--memory-gib", "3.5"])
  out = capsys.readouterr().out
  assert re.search(r"^T= +16 .* compiled memory 4\.00 GiB \(temp 1\.00; .* over the limit", out, re.MULTILINE), out


def test_bench_train_refuses_a_batch_the_accumulation_does_not_split(config_path, capsys):
  """A traceback from a reshape inside the step before."""
  with pytest.raises(SystemExit) as info:
    bench.main(["train", "--config", config_path, "--batch", "3"])
  err = capsys.readouterr().err
  assert info.value.code == 2 and (
      "python -m diffmoe_jax.bench train: error: argument --batch: 3 sequences do not split into the 2 micro-batches "
      "of optimizer.grad_accum_steps") in err, err


def test_attention_parity_leaves_out_the_standard_attention_baseline(capsys):
  """standard_flash computes standard attention, not differential attention: its difference from the others
  (about 3 here) was printed beside theirs as if it were an error."""
  bench.main(["attention", "--no-layer-ratio", "--lengths", "32", "--block", "16", "--sweep-reps", "1", "--impls",
              "explicit", "standard_flash", "four_flash_calls"])
  out = capsys.readouterr().out
  assert re.search(r"^ +32 .* max \|Δ\| vs explicit: four_flash_calls \d\.\de-0[5-9]$", out, re.MULTILINE), out


def test_expert_parallel_names_the_expert_count_that_does_not_split(capsys):
  """--experts 6 over 4 devices (of the 8 the tests simulate) was told to simulate devices with XLA_FLAGS."""
  with pytest.raises(SystemExit) as info:
    bench.main(["expert_parallel", "--experts", "6"])
  err = capsys.readouterr().err
  assert info.value.code == 2 and "error: argument --experts: 6 is not a multiple of --expert-axis (4)" in err, err
  assert "XLA_FLAGS" not in err, err


@pytest.mark.parametrize("command", [["train"], ["compile", "--layers", "4"]])
def test_fewer_layers_than_a_layer_group_name_the_flag(command, capsys):
  """The error named model.mod.every, which bench gives no way to set."""
  with pytest.raises(SystemExit) as info:
    bench.main([*command, "--layers", "1"])
  err = capsys.readouterr().err
  assert info.value.code == 2 and ("error: argument --layers: 1 is fewer than one layer group of configs/tiny.py (2 "
                                   "layers, model.mod.every); give at least 2") in err, err


@pytest.mark.parametrize("impl", ["pallas_mosaic", "pallas_mosaic_forward"])
def test_the_mosaic_kernels_in_a_float32_attention_sweep_are_refused(impl, capsys):
  """A traceback from the kernel's input check, telling the user to set model.dtype, which the sweep does not read."""
  with pytest.raises(SystemExit) as info:
    bench.main(["attention", "--no-layer-ratio", "--lengths", "64", "--impls", "explicit", impl])
  err = capsys.readouterr().err
  assert info.value.code == 2 and (f"error: argument --impls: {impl} runs the Mosaic GPU kernels, which take 16-bit "
                                   "inputs; add --dtype bfloat16") in err, err


@pytest.mark.parametrize("command", [["moe"], ["generate"]])
def test_a_seed_past_32_bits_is_refused(command, capsys):
  """An OverflowError traceback from 2**63; 2**32 drew seed 0's weights again."""
  with pytest.raises(SystemExit) as info:
    bench.main([*command, "--seed", str(2**32)])
  err = capsys.readouterr().err
  assert info.value.code == 2 and "error: argument --seed: 4294967296 must be at most 4294967295" in err, err


def test_generate_times_only_the_decoding_programs(monkeypatch):
  """Each timed call of `bench generate` runs the compiled prefill or decode step alone: the slicing of its
  tokens (a dispatch of its own, 0.05 ms against a decode step of about 2 on this CPU) was timed with it."""
  import time
  from diffmoe_jax import bench_generate, generate as generate_lib
  from diffmoe_jax.nn import model as model_lib
  clock = {"calls": 0, "sliced_while_timed": 0}

  def perf_counter():
    clock["calls"] += 1
    return float(clock["calls"])

  class Sequence:
    shape = (1, 6)

    def __getitem__(self, index):
      clock["sliced_while_timed"] += clock["calls"] % 2  # an odd count of clock reads: a timing has started
      return index

  program = lambda params, cache, tokens, positions, last, rng: (None, None, cache)
  compiled = type("Lowered", (), {"compile": lambda self: program})()
  monkeypatch.setattr(generate_lib, "make_step", lambda *a, **k: type("Step", (), {"lower": lambda *a: compiled})())
  monkeypatch.setattr(model_lib, "unrolled", lambda model, params: (model, params))
  monkeypatch.setattr(model_lib, "init_cache", lambda *args: {})
  monkeypatch.setattr(time, "perf_counter", perf_counter)
  times = bench_generate._timed_decoding(None, {}, Sequence(), prompt_len=2, reps=2)
  assert set(times) == {"skipping", "masking"} and clock["calls"] == 2 * 2 * 2 * 5  # each of 5 steps timed
  assert clock["sliced_while_timed"] == 0


def test_compile_times_each_depth_after_a_warm_up_compile(capsys, monkeypatch):
  """The first depth was timed with the process's one-time compile costs (4 layers of tiny: 10.6 s against 9.7
  and 9.8 s for the same depth compiled again), understating the ratio."""
  from diffmoe_jax.nn import model as model_lib
  built, build = [], model_lib.build_model
  monkeypatch.setattr(model_lib, "build_model", lambda cfg: built.append(cfg.num_layers) or build(cfg))
  bench.main(["compile", "--layers", "2", "4", "--batch", "1", "--seq-len", "16"])
  out = capsys.readouterr().out
  for pattern in (rf"^ +2 layers: .* {NUMBER} s$", rf"^ +4 layers: .* {NUMBER} s$",
                  rf"^ratio 4 / 2 layers: {NUMBER}x$"):
    assert re.search(pattern, out, re.MULTILINE), (pattern, out)
  assert built == [2, 2, 4], built  # the untimed compile first


def test_bench_train_refuses_a_step_larger_than_the_device(capsys, monkeypatch):
  """Read off the compiled step before the state is allocated (--batch 8192 of tiny: RESOURCE_EXHAUSTED
  allocating 155 GB, a traceback, before); here the device is made to hold 1 MiB."""
  from diffmoe_jax.train import preflight
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 2.0**20)
  with pytest.raises(SystemExit) as info:
    bench.main(["train", "--steps", "1", "--data-batches", "1", "--layers", "2", "--batch", "2", "--seq-len", "16"])
  captured = capsys.readouterr()
  assert info.value.code == 1 and "train step" not in captured.out, captured.out
  assert re.search(r"^error: the train step needs [\d.]+ GiB \(its compiled arguments, outputs and temporaries\), "
                   r"more than the 0\.00 GiB a device here has \(train\.memory_headroom = 0\.9\); lower --batch, "
                   r"--seq-len or --layers$", captured.err, re.MULTILINE), captured.err


def test_bench_train_refuses_a_tokenizer_larger_than_the_model_vocabulary(tmp_path, capsys):
  """As main does (bytes into a 128-token embedding: a loss of NaN); the step was timed before."""
  path = tmp_path / "config.py"
  path.write_text(CONFIG.replace("  return c", "  c.model.vocab_size = 128\n  return c"))
  with pytest.raises(SystemExit) as info:
    bench.main(["train", "--config", str(path), "--steps", "1", "--batch", "2", "--seq-len", "16"])
  err = capsys.readouterr().err
  assert info.value.code == 1 and "error: config.model.vocab_size (128) is smaller than the tokenizer's vocabulary " \
      "(256, bytes)" in err, err


def test_bench_data_reads_a_directory_of_text_files_per_process(tmp_path, capsys):
  """--domain replaces the config's domains (the phases then mix them equally, so tiny's weights naming `code`
  do not stand in the way); the cache holds every byte of the files and a separator after each; with
  --process-count each batch's rows are one process's share, and tokens/s is batches/s x rows x seq_len."""
  import numpy as np
  rng = np.random.default_rng(0)
  words = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(2000)]
  for i in range(20):
    (tmp_path / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 400)))
  size = sum(f.stat().st_size for f in tmp_path.glob("*.txt")) + 20  # bytes, and one separator per file
  bench.main(["data", "--batches", "3", "--phase", "anneal", "--process-count", "2", "--cache-dir",
              str(tmp_path / "cache"), "--domain", f"text=files:{tmp_path}/*.txt"])
  out = capsys.readouterr().out
  corpus = rf"^corpus +{NUMBER} s to build or reuse the token cache: text {size:,} tokens$"
  assert re.search(corpus, out, re.MULTILINE), out
  line = re.search(r"^anneal +256 +4 +(.*)$", out, re.MULTILINE)
  assert line, out
  figures = [float(x.replace(",", "")) for x in re.findall(r"([\d,.]+) (?:batches|tokens)/s", line.group(1))]
  assert len(figures) == 4 and all(f > 0 for f in figures), out
  for batches, tokens in (figures[:2], figures[2:]):
    assert tokens == pytest.approx(batches * 4 * 256, rel=2e-3), out


@pytest.mark.parametrize("argv, message", [
    (["--phase", "warmup", "no_such_phase"],
     "argument --phase: 'no_such_phase' is not a phase of configs/tiny.py; choose from ['warmup', "),
    (["--process-count", "3"],  # before any figure is printed (it was a DataError naming no flag, midway)
     "argument --process-count: 3 processes cannot share phase warmup's batch of 32 sequences; give a divisor of it"),
])
def test_bench_data_refuses_a_phase_or_process_count_the_config_does_not_have(argv, message, capsys):
  with pytest.raises(SystemExit) as info:
    bench.main(["data", *argv])
  captured = capsys.readouterr()
  assert info.value.code == 2 and message in captured.err and not captured.out, captured
