"""MetricWriter read back with TensorBoard's own EventAccumulator; stable rank against NumPy float64."""
import errno
import itertools
import os
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

from diffmoe_jax.train import metrics as metrics_lib
from diffmoe_jax.train.metrics import MetricWriter, stable_ranks
from diffmoe_jax.train.workdir import WorkdirError


def read_events(logdir):
  keep_all = {kind: 0 for kind in (event_accumulator.SCALARS, event_accumulator.TENSORS,
                                   event_accumulator.HISTOGRAMS, event_accumulator.COMPRESSED_HISTOGRAMS,
                                   event_accumulator.IMAGES, event_accumulator.AUDIO)}
  return event_accumulator.EventAccumulator(str(logdir), size_guidance=keep_all).Reload()


def reference_stable_rank(m):
  m = np.asarray(m, np.float64)
  return np.linalg.norm(m, "fro") ** 2 / np.linalg.norm(m, 2) ** 2


def test_scalars_text_and_histogram_round_trip(tmp_path):
  w = MetricWriter(tmp_path)
  w.scalars(1, {"train/loss": 2.5, "train/lr": jnp.float32(1e-3)})
  w.scalars(2, {"train/loss": np.float32(1.25)})
  w.text(0, "config", "model:\n  d_model: 288")
  load = np.array([0.1, 0.2, 0.2, 0.5, np.nan])
  w.histogram(2, "moe/expert_load_layer0", load, bins=4)
  w.close()

  events = read_events(tmp_path)
  tags = events.Tags()
  assert set(tags["scalars"]) == {"train/loss", "train/lr"}
  assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.25)]
  assert events.Scalars("train/lr")[0].value == pytest.approx(1e-3)

  assert "config" in tags["tensors"]
  assert "config" in events.PluginTagToContent("text")
  assert events.Tensors("config")[0].tensor_proto.string_val[0].decode() == "model:\n  d_model: 288"

  assert tags["histograms"] == ["moe/expert_load_layer0"]
  histo = events.Histograms("moe/expert_load_layer0")[0]
  assert histo.step == 2
  value = histo.histogram_value
  finite = load[np.isfinite(load)]
  assert (value.num, value.min, value.max) == (4, 0.1, 0.5)
  assert value.sum == pytest.approx(finite.sum()) and value.sum_squares == pytest.approx(np.sum(finite**2))
  assert list(value.bucket) == list(np.histogram(finite, bins=4)[0])
  assert value.bucket_limit[-1] == pytest.approx(0.5)


@pytest.mark.parametrize("file_number", [0, 9])
def test_a_restarted_run_supersedes_the_points_logged_after_its_checkpoint(tmp_path, monkeypatch, file_number):
  """The first invocation logged steps 1-9 and eval at 8, then died; its checkpoint was at step 6. The resumed
  run logs 7-10 again: TensorBoard shows each step once, with the resumed run's values, and keeps 1-6. A run
  that starts over at 0 (killed before its first checkpoint) keeps nothing of the earlier files. Both open their
  files in the same second, as runs one process restarts can: the files' numbers then order them, also from
  the process's 10th file on (unpadded, "10" sorted before "9" and the first invocation's points won)."""
  monkeypatch.setattr(metrics_lib, "_FILE_NUMBERS", itertools.count(file_number))
  monkeypatch.setattr(metrics_lib, "time", types.SimpleNamespace(time=lambda: 1_800_000_000.0))
  def first_invocation(logdir):
    first = MetricWriter(logdir)
    first.mark_start(0)
    first.text(0, "config", "x")
    for step in range(1, 10):
      first.scalars(step, {"train/loss": float(step)})
    first.scalars(8, {"eval/loss": 8.0})
    first.close()

  for start in (6, 0):
    logdir = tmp_path / str(start)
    first_invocation(logdir)
    second = MetricWriter(logdir)
    second.mark_start(start)
    if start == 0:
      second.text(0, "config", "y")
    for step in range(start + 1, 11):
      second.scalars(step, {"train/loss": step + 0.5})
    second.close()
    events = read_events(logdir)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == (
        [(s, float(s)) for s in range(1, start + 1)] + [(s, s + 0.5) for s in range(start + 1, 11)])
    assert events.Scalars("eval/loss") == []
    # The config's text is a tensor, which the reader TensorBoard's server uses drops too (the older one keeps it).
    served = plugin_event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    served.Reload()
    assert [e.tensor_proto.string_val for e in served.Tensors("config")] == [[b"x" if start else b"y"]]


def test_a_full_disk_is_one_error_naming_the_directory(tmp_path):
  """Events reach the file when written (a killed run keeps them); a write that fails raises WorkdirError at
  once, in the caller (no writer thread's traceback), and closing afterwards is quiet."""
  w = MetricWriter(tmp_path)
  w.scalars(1, {"train/loss": 1.0})
  assert [e.step for e in read_events(tmp_path).Scalars("train/loss")] == [1]

  def disk_full(data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  w._records._writer.write = disk_full
  with pytest.raises(WorkdirError, match=r"Cannot write TensorBoard events at step 2 in .*: No space left on device; "
                     "free space or fix the directory, then rerun to resume from the newest checkpoint"):
    w.scalars(2, {"train/loss": 2.0})
  w.close()


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "tb"
  w = MetricWriter(logdir, enabled=False)
  w.scalars(1, {"train/loss": 1.0})
  w.text(1, "config", "x")
  w.histogram(1, "h", [1.0, 2.0])
  w.close()
  assert not logdir.exists()


def test_non_scalar_is_rejected(tmp_path):
  w = MetricWriter(tmp_path)
  with pytest.raises(ValueError, match=r"'train/loss' has shape \(2,\)"):
    w.scalars(1, {"train/loss": np.ones(2)})
  w.close()


def stable_rank(m):
  """One 2-D matrix's stable rank, through stable_ranks (a `w_in` is [in, out]: one matrix)."""
  return stable_ranks({"w_in": m})["stable_rank/w_in"]


def test_stable_rank_against_numpy():
  rng = np.random.default_rng(0)
  assert stable_rank(np.outer(rng.normal(size=6), rng.normal(size=4))) == pytest.approx(1.0, rel=1e-5)
  orthogonal, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  assert stable_rank(orthogonal) == pytest.approx(5.0, rel=1e-5)
  m = rng.normal(size=(12, 7))
  assert stable_rank(m) == pytest.approx(reference_stable_rank(m), rel=1e-5)
  assert stable_rank(jnp.asarray(m, jnp.bfloat16)) == pytest.approx(reference_stable_rank(m), rel=1e-2)
  assert stable_rank(np.zeros((3, 3))) == 0.0


def test_stable_ranks_of_stacked_kernels():
  rng = np.random.default_rng(1)
  layers, experts, d, heads, head_dim, f = 2, 3, 8, 2, 4, 6
  wq = rng.normal(size=(layers, d, heads, head_dim))
  wo = rng.normal(size=(layers, heads, head_dim, d))
  w_in = rng.normal(size=(layers, experts, d, f))
  dense_w_out = rng.normal(size=(f, d))
  params = {"decoder": {
      "layers": {"attn": {"wq": nn.LogicallyPartitioned(jnp.asarray(wq), ("layers", "embed", "heads", "head_dim")),
                          "wo": jnp.asarray(wo), "lambda_q1": jnp.ones((layers, 1, 2))},
                 "moe": {"w_in": jnp.asarray(w_in), "router": jnp.ones((layers, d, experts))}},
      "dense": {"w_out": jnp.asarray(dense_w_out)},
      "embed": {"table": jnp.ones((16, d))},
  }}
  expected = {
      "stable_rank/decoder/layers/attn/wq": np.mean([reference_stable_rank(wq[i].reshape(d, -1))
                                                     for i in range(layers)]),
      "stable_rank/decoder/layers/attn/wo": np.mean([reference_stable_rank(wo[i].reshape(-1, d))
                                                     for i in range(layers)]),
      "stable_rank/decoder/layers/moe/w_in": np.mean([reference_stable_rank(w_in[i, e])
                                                      for i in range(layers) for e in range(experts)]),
      "stable_rank/decoder/dense/w_out": reference_stable_rank(dense_w_out),
  }
  ranks = stable_ranks(params)
  assert ranks.keys() == expected.keys()
  for tag, value in expected.items():
    assert ranks[tag] == pytest.approx(value, rel=1e-5), tag
  with pytest.raises(ValueError, match=r"attn/wq has shape \(8, 8\)"):
    stable_ranks({"attn": {"wq": jnp.ones((8, 8))}})


def test_stable_ranks_compile_without_lapack():
  """Batched SVD on XLA:CPU waits on its own intra-op pool; with eight devices running it at once the pool
  starved and a training run hung at its stable-rank pass. The computation is matrix products only."""
  from diffmoe_jax.train.metrics import _mean_stable_ranks
  kernels = {"stable_rank/w": jnp.ones((3, 8, 6))}
  hlo = _mean_stable_ranks.lower(kernels, (("stable_rank/w", 2, 1),)).compile().as_text()
  assert re.findall(r'custom_call_target="([^"]+)"', hlo) == []


def test_a_file_where_the_event_directory_goes_is_a_workdir_error(tmp_path):
  (tmp_path / "tb").write_text("not a directory")
  with pytest.raises(WorkdirError, match=r"The TensorBoard directory .*/tb is a file, not a directory; move it away"):
    MetricWriter(tmp_path / "tb")


def _small_model(moe=(), **changes):
  from diffmoe_jax import config as config_lib
  m = config_lib.defaults().model
  m.update(vocab_size=32, d_model=16, num_layers=2, num_heads=2, head_dim=8, max_seq_len=8, dtype="float32",
           **changes)
  m.moe.update(num_experts=3, expert_ffn_dim=8, top_k=2, **dict(moe))
  m.mod.update(capacity=0.5, predictor_hidden=4)
  return m


def _train_step_metrics(model_config):
  """A forward pass's metrics as the train step reports them, and the params."""
  from diffmoe_jax.nn import model as model_lib
  model = model_lib.build_model(model_config)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % model_config.vocab_size
  rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
  params = nn.meta.unbox(model.init(rngs, tokens)["params"])
  _, aux = model.apply({"params": params}, tokens, train=True, mod_mode="topk", mod_capacity=0.5,
                       router_noise_std=0.5, rngs={"noise": jax.random.PRNGKey(2)})
  metrics = {"loss": 3.0, "cross_entropy": 2.9, "grad_norm": 1.0, "lr": 1e-3, "router_noise": 0.5,
             **{f"{k}_loss": v for k, v in aux["losses"].items()}, "layers": aux["layers"]}
  return jax.device_get(metrics), params


def _reference_lambdas(attention_params, layer):
  """Each row's λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, λ_init = 0.8 − 0.6·exp(−0.3·l), in float64."""
  p = {k: np.asarray(attention_params[k], np.float64)
       for k in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
  return (np.exp((p["lambda_q1"] * p["lambda_k1"]).sum(-1)) - np.exp((p["lambda_q2"] * p["lambda_k2"]).sum(-1))
          + 0.8 - 0.6 * np.exp(-0.3 * layer))


@pytest.mark.parametrize("changes, lambda_tags, has_moe", [
    ({}, "expert", True),
    ({"moe": {"dispatch": "dropless"}}, "expert", True),
    ({"expert_conditional_lambda": False}, "layer", True),
    ({"ffn": "dense", "expert_conditional_lambda": False}, "layer", False),
    ({"attention": "standard", "expert_conditional_lambda": False}, None, True),
    ({"attention": "differential_v2", "expert_conditional_lambda": False}, "token_mean", True),
])
def test_step_scalars_name_what_the_model_has(changes, lambda_tags, has_moe):
  """A dense FFN has no router (its loss, noise and expert load were logged as zeros), dropless dispatch drops
  nothing (logged as 0), standard attention has no λ (logged as 0), and a layer's single λ or the mean per-token λ
  is no expert's (both were `expert0`)."""
  from diffmoe_jax.train.metrics import step_scalars
  model_config = _small_model(**changes)
  metrics, params = _train_step_metrics(model_config)
  scalars = step_scalars(metrics, model_config)
  layer_params = [params["groups"]["layer_0"], params["groups"]["layer_1"]]  # one group of two layers
  moe_tags = {f"moe/layer{l}/max_load" for l in range(2)} | {"train/load_balance_loss", "train/router_z_loss",
                                                             "train/router_noise"}
  dropped_tags = {f"moe/layer{l}/dropped_fraction" for l in range(2)}
  assert (moe_tags <= scalars.keys()) == has_moe
  assert has_moe or not moe_tags & scalars.keys()
  capacity = has_moe and model_config.moe.dispatch == "capacity"
  assert (dropped_tags <= scalars.keys()) == capacity and (capacity or not dropped_tags & scalars.keys())
  lambdas = {k: v for k, v in scalars.items() if k.startswith("lambda/")}
  if lambda_tags is None:
    assert lambdas == {}
  elif lambda_tags == "token_mean":
    assert lambdas.keys() == {"lambda/layer0/token_mean", "lambda/layer1/token_mean"}
  else:
    expected = {}
    for l in range(2):
      reference = _reference_lambdas(layer_params[l]["block"]["attention"], l)[0]  # the group axis
      names = [f"lambda/layer{l}/expert{e}" for e in range(3)] if lambda_tags == "expert" else [f"lambda/layer{l}"]
      assert len(reference) == len(names)
      expected.update(zip(names, reference))
    assert lambdas.keys() == expected.keys()
    for tag, value in expected.items():
      assert lambdas[tag] == pytest.approx(value, rel=1e-5), tag
  assert scalars["mod/routed0/selected_fraction"] == 0.5 and "mod/routed0/predictor_accuracy" in scalars
  assert "train/mod_predictor_loss" not in step_scalars(metrics, model_config, mod_predicted=False)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v5 lite", 197e12),
                                        ("NVIDIA GeForce RTX 4090", 0.0)])
def test_an_accelerators_peak_is_its_own_models(kind, peak):
  """Every H100 was given the SXM part's 989 TFLOP/s: a PCIe card's MFU read 24% low."""
  assert metrics_lib.peak_of_kind(kind) == peak


def test_a_configured_peak_is_per_device():
  """config.train.peak_flops_per_device is one device's: the run's peak is that times the devices (taken as
  the run's, MFU read eight times too high here)."""
  assert jax.device_count() == 8
  assert metrics_lib.peak_flops(1e9) == 8e9


def test_the_measured_matmul_rate_counts_a_multiply_add_as_two_flops(monkeypatch):
  """An n x n matmul is 2n³ FLOPs: with each timed call taking one second on a clock that ticks a second a
  read, the rate is 2n³ per second (n³ passed every test: MFU on CPU read twice too high)."""
  clock = itertools.count()
  monkeypatch.setattr(metrics_lib.time, "perf_counter", lambda: float(next(clock)))
  assert metrics_lib.measured_matmul_flops(n=64, repeats=3) == 2 * 64**3
