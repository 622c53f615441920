"""The memory preflight: a config too large for the devices is refused before anything is allocated, naming a
mesh that fits, or what to lower when none does."""
import math
import os
import re

import pytest

from diffmoe_jax import memory
from diffmoe_jax import main as main_lib
from diffmoe_jax import parallel
from diffmoe_jax.train import preflight
from test_config import load as load_named
from test_cli import assert_one_error, run_cli, train_command
from test_train import load_config


def test_too_large_config_stops_before_allocating(monkeypatch, tmp_path):
  """PI-S on 8 devices of 80 GiB: refused before anything is allocated, naming a mesh that fits."""
  config = load_named("pi_s")
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 80 * 2**30)
  with pytest.raises(preflight.InsufficientMemoryError, match=r"needs about [\d,.]+ GiB per device.*a mesh that "
                                                             r"fits on (\d+) devices: --config\.mesh\.shape") as e:
    preflight.check_memory(config, {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}, "gpu")
  budget = 0.9 * 80 * 2**30
  shape, need = preflight.fitting_mesh(preflight.mesh_options(config, "gpu"), 8, budget)
  devices = math.prod(shape.values())
  assert str(devices) in str(e.value)
  # The parts it names add up to the total it names (the gradients were left out of them).
  parts = re.search(r"needs about ([\d,.]+) GiB .*\(state ([\d,.]+) GiB, gradients and update ([\d,.]+) GiB, "
                    r"activations ([\d,.]+) GiB, by the estimator\)", str(e.value))
  assert parts, str(e.value)
  total, *summands = (float(x.replace(",", "")) for x in parts.groups())
  assert sum(summands) == pytest.approx(total, abs=0.02)
  assert need == memory.training_memory_per_device(config, shape)["total"] <= budget
  # Half the devices do not fit with the weights sharded over all of them.
  half = {"data": 1, "fsdp": devices // 2, "expert": 1, "tensor": 1}
  assert memory.training_memory_per_device(config, half)["total"] > budget
  # Memory no mesh can provide (24 GB cards): the message names the least any mesh needs and what takes it,
  # the warmup's 4 sequences of 4,096 tokens per device (512 / 128 devices). It advised a smaller
  # curriculum.tokens_per_batch or more accumulation, which leave the warmup's sequences per device as they are.
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 24 * 10**9)
  with pytest.raises(preflight.InsufficientMemoryError, match=r"no mesh of up to [\d,]+ devices fits it; the least any "
                     r"needs is ~([\d.]+) GiB per device \(([^;]+), on 128 devices; its largest activations are the "
                     r"warmup phase's, 4 sequence\(s\) of 4,096 tokens per device\): lower "
                     r"curriculum\.warmup\.batch_size, or") as e:
    preflight.check_memory(config, {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}, "gpu")
  least, flags = re.search(r"the least any needs is ~([\d.]+) GiB per device \(([^;]+), on", str(e.value)).groups()
  shape = {f.split("=")[0].rsplit(".", 1)[1]: int(f.split("=")[1]) for f in flags.split()}
  # Splitting the experts halves the layer group each device gathers whole for its FSDP step.
  assert shape == {"data": 1, "fsdp": 64, "expert": 2, "tensor": 1}
  assert float(least) == round(memory.training_memory_per_device(config, shape)["total"] / 2**30, 2)
  assert float(least) * 2**30 > 0.9 * 24 * 10**9
  # The refused run leaves no empty workdir behind (one that existed stays).
  with pytest.raises(preflight.InsufficientMemoryError):
    main_lib.run(config, str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")


def test_with_the_memory_check_off_a_config_too_large_trains_after_a_warning(monkeypatch, caplog):
  """The estimate errs high on GPUs (an H100 compile's temporaries were 1.8-2.7x below it), and no headroom
  above 1 was allowed: a config it refused could not be trained at all. config.train.memory_check=False
  warns with the same figures and goes on; the refusal says so."""
  config = load_named("pi_s")
  mesh = {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 80 * 2**30)
  monkeypatch.setattr(preflight, "_mesh_advice", lambda *args: "lower the batch")
  with pytest.raises(preflight.InsufficientMemoryError, match=r"lower the batch\. The estimate errs high on GPUs "
                     r".*; config\.train\.memory_check=False trains anyway\.$"):
    preflight.check_memory(config, mesh, "gpu")
  # A caller's own advice (the NCAS search's proxies, which it configures itself) comes without that way past.
  with pytest.raises(preflight.InsufficientMemoryError, match=r"; raise the scale\.$"):
    preflight.check_memory(config, mesh, "gpu", "raise the scale")
  config.train.memory_check = False
  with caplog.at_level("WARNING"):
    need = preflight.check_memory(config, mesh, "gpu")
  assert need == memory.training_memory_per_device(config, mesh)
  [record] = [r for r in caplog.records if r.levelname == "WARNING"]
  assert record.getMessage().startswith("This config needs about ")
  assert record.getMessage().endswith("lower the batch. Training anyway, as config.train.memory_check is False.")


def test_the_suggested_mesh_is_one_the_run_accepts():
  """The mesh named for a config too large was built for the default axis rules and any backend: it could
  split the experts where expert parallelism cannot run, and missed every mesh when the batch rule left out fsdp."""
  budget = 0.9 * 16 * 2**30
  config = load_named("pi_p")
  config.model.moe.expert_parallel, config.model.moe.dispatch = "ragged", "dropless"  # ragged: not on XLA:CPU
  on_gpu, _ = preflight.fitting_mesh(preflight.mesh_options(config, "gpu"), 8, budget)
  assert on_gpu["expert"] > 1
  on_cpu = preflight.fitting_mesh(preflight.mesh_options(config, "cpu"), 8, budget)
  assert on_cpu is None or on_cpu[0]["expert"] == 1
  config = load_named("pi_p")
  config.mesh.axis_rules = (("batch", ("data", "expert")),) + tuple(config.mesh.axis_rules[1:])
  shape, need = preflight.fitting_mesh(preflight.mesh_options(config, "gpu"), 8, 0.9 * 80 * 2**30)
  parallel.check_expert_parallel(config, shape, "gpu")
  assert need == memory.training_memory_per_device(config, shape)["total"] <= 0.9 * 80 * 2**30
  assert shape["data"] * shape["expert"] > 1  # the batch split over the axes its rule names


def test_memory_check_counts_what_a_step_without_remat_keeps(caplog):
  """remat_policy "none" was counted as full remat, with a warning that the run might still run out of
  memory: what its layers keep is counted now (tests/test_estimate.py holds that against the compiled
  step), with no warning."""
  config = load_config()
  needs = {}
  for policy in ("full", "none"):
    config.model.remat_policy = policy
    needs[policy] = preflight.check_memory(config, {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, "cpu")
  assert needs["none"]["state"] == needs["full"]["state"]
  assert needs["none"]["activations"] > 1.5 * needs["full"]["activations"], needs
  assert not caplog.text


@pytest.mark.parametrize("override", ["model.moe.num_experts=1000000", "model.num_layers=1000000000"])
def test_a_size_far_beyond_any_device_is_refused_at_once(override, tmp_path):
  """Within int32, but petabytes: the memory check's one line, in seconds. The CPU's expert matmuls were
  traced as a chain per expert (a million of them) and the routed layers listed one by one: each ran for
  minutes, or out of memory."""
  proc = run_cli(*train_command(tmp_path / "run", f"--config.{override}"), timeout=120)
  assert_one_error(proc, "This config needs about ", " per device to train on mesh ")
  assert not os.path.exists(tmp_path / "run")


def _compiled_eval_temp_bytes(config, batch: int) -> int:
  """The temporary memory of `config`'s compiled evaluation step on `batch` sequences of model.max_seq_len."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from diffmoe_jax.nn import model as model_lib
  from diffmoe_jax.train import step as step_lib
  model = model_lib.build_model(config.model)
  params = jax.eval_shape(lambda r: nn.unbox(model.init({"params": r, "noise": r}, jnp.zeros((1, 16), jnp.int32))),
                          jax.random.PRNGKey(0))["params"]
  batch = {k: jax.ShapeDtypeStruct((batch, config.model.max_seq_len), jnp.int32) for k in ("inputs", "targets")}
  compiled = jax.jit(step_lib.make_eval_step(model)).lower(params, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("model_overrides", [{}, {"attention_impl": "blockwise"}, {"vocab_size": 8192}])
def test_evaluation_memory_agrees_with_the_compiled_eval_step(model_overrides):
  """Tiny's evaluation of 64 sequences, its largest working set the dropless MoE's rows, the blockwise
  attention's blocks or the logits: the estimate is the compiled step's temporaries within 15%."""
  config = load_named("tiny")
  config.model.update(**model_overrides)
  estimate = memory.eval_activation_bytes(config.model, 64, config.model.max_seq_len)
  assert estimate == pytest.approx(_compiled_eval_temp_bytes(config, 64), rel=0.15)


def test_an_evaluation_batch_too_large_is_refused_before_training(monkeypatch):
  """6,144 evaluation sequences of tiny (~28 GB) on a device of 4 GiB, whose training fits: refused, naming
  the evaluation; the check counted training alone, and the run crashed out of memory at its first evaluation."""
  config = load_named("tiny")
  config.train.eval_batch_size = 6144
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 4 * 2**30)
  one_device = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
  with pytest.raises(preflight.InsufficientMemoryError, match=r"needs about ([\d.]+) GiB per device to train on mesh "
                     r".*\(state ([\d.]+) MiB, evaluation's activations ([\d.]+) GiB, by the estimator\).*; a mesh that "
                     r"fits on (\d+) devices: ") as e:
    preflight.check_memory(config, one_device, "cpu")
  parts = re.search(r"needs about ([\d.]+) GiB .*\(state ([\d.]+) MiB, evaluation's activations ([\d.]+) GiB, .* fits "
                    r"on (\d+) devices", str(e.value))
  total, state, evaluation, devices = (float(x) for x in parts.groups())
  assert total == pytest.approx(state / 1024 + evaluation, abs=0.01) and evaluation > 20 and devices > 1
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 4 * 2**20)  # no mesh fits
  with pytest.raises(preflight.InsufficientMemoryError, match=r"its largest activations are the evaluation's, \d+ "
                     r"sequence\(s\) of 256 tokens per device\): lower train\.eval_batch_size, or"):
    preflight.check_memory(config, one_device, "cpu")
  config.train.eval_batch_size = 8
  assert memory.training_memory_per_device(config, one_device)["evaluation"] == 0.0  # training needs more
