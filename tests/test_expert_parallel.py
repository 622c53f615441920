"""Expert parallelism on 8 simulated devices: the sharded layer and train step equal one device's."""
import functools
import re
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffmoe_jax import parallel
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.ops import dispatch, expert_parallel
from diffmoe_jax.train import state as state_lib
from diffmoe_jax.train import step as step_lib

B, T, D, F, E, K = 8, 12, 16, 32, 8, 2
LR = 1.0  # a plain gradient step: updated weights differ from the initial ones by the gradient


def _inputs(seed, activation):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  weights = rng.uniform(0.1, 1.0, size=(B, T, K)).astype(np.float32)
  # Skewed routing, so that capacity mode drops assignments.
  probs = np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
  experts = np.stack([rng.choice(E, size=K, replace=False, p=probs) for _ in range(B * T)]).reshape(B, T, K)
  mask = rng.uniform(size=(B, T)) < 0.8
  params = [rng.normal(size=(E, D, F)) / np.sqrt(D), rng.normal(size=(E, F, D)) / np.sqrt(F)]
  if activation == "swiglu":
    params.append(rng.normal(size=(E, D, F)) / np.sqrt(D))
  return (x, weights, experts.astype(np.int32), mask), [p.astype(np.float32) for p in params]


def _layer_and_grads(layer):
  def loss(x, w, params, experts, mask, cot):
    y, stats = layer(x, w, experts, *params, token_mask=mask)
    return jnp.sum(y * cot), (y, stats["dropped_fraction"], stats["slot_fill"])
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


# capacity: slots per expert given explicitly (as a routed layer at inference does), else from the factor (3).
CASES = [("capacity", "all_to_all", "gelu", (2, 4, 1), None), ("capacity", "gather", "swiglu", (2, 4, 1), 2),
         ("dropless", "gather", "gelu", (2, 4, 1), None), ("capacity", "all_to_all", "swiglu", (2, 2, 2), 2),
         ("dropless", "gather", "gelu", (2, 2, 2), None)]


@pytest.mark.parametrize("mode,strategy,activation,mesh_shape,capacity", CASES)
def test_expert_parallel_layer_equals_one_device(mode, strategy, activation, mesh_shape, capacity):
  """Outputs, dropped fraction, slot fill and gradients, with a token mask; mesh (data, expert, tensor)."""
  mesh = jax.make_mesh(mesh_shape, ("data", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  (x, w, experts, mask), params = _inputs(0, activation)
  cot = np.random.default_rng(1).normal(size=(B, T, D)).astype(np.float32)
  common = dict(activation=activation, mode=mode, capacity_factor=0.75, dropless_impl="padded", capacity=capacity)
  single = _layer_and_grads(functools.partial(dispatch.moe_ffn, **common))
  sharded = _layer_and_grads(functools.partial(
      expert_parallel.moe_ffn, mesh=mesh, batch_axes=("data", "expert"), expert_axis="expert",
      tensor_axes="tensor", strategy=strategy, **common))
  rows = NamedSharding(mesh, P(("data", "expert")))
  put = lambda a: jax.device_put(a, rows)
  weight_specs = [P("expert", None, "tensor"), P("expert", "tensor", None), P("expert", None, "tensor")]
  sharded_params = [jax.device_put(p, NamedSharding(mesh, s)) for p, s in zip(params, weight_specs)]
  want_grads, (want_y, want_dropped, want_fill) = single(x, w, params, experts, mask, cot)
  got_grads, (got_y, got_dropped, got_fill) = sharded(put(x), put(w), sharded_params, put(experts), put(mask),
                                                      put(cot))
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_dropped, want_dropped, rtol=1e-6)
  np.testing.assert_allclose(got_fill, want_fill, rtol=1e-6)
  if mode == "capacity":
    assert float(want_dropped) > 0  # the case exercises dropping
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
  """`jax.lax.ragged_all_to_all` as its documentation specifies it, from all-gathers and selects (XLA:CPU
  cannot compile the real collective): slice i of every sender goes to device i // (K / n), which writes
  it at the sender's output_offsets[i]; the receiver's recv_sizes[i] says how many rows slice i has."""
  n, me = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  per_device = input_offsets.shape[0] // n
  gather = lambda a: jax.lax.all_gather(a, axis_name)
  operands, starts, write_at = gather(operand), gather(input_offsets), gather(output_offsets)
  rows = jnp.arange(output.shape[0])
  result = output
  for i in range(input_offsets.shape[0]):  # received slice i: from device i // per_device
    source, slot = i // per_device, me * per_device + i % per_device
    begin = write_at[source, slot]
    inside = (rows >= begin) & (rows < begin + recv_sizes[i])
    taken = jnp.take(operands[source], starts[source, slot] + rows - begin, axis=0, mode="clip")
    result = jnp.where(inside.reshape((-1,) + (1,) * (output.ndim - 1)), taken, result)
  return result


@pytest.mark.parametrize("activation, mesh_shape", [("gelu", (2, 4, 1)), ("swiglu", (2, 2, 2))])
def test_ragged_strategy_equals_one_device(activation, mesh_shape):
  """The dropless ragged strategy's sizes and offsets, checked through the collective's documented
  semantics (emulated here; the real one is lowered for GPU and TPU below): outputs and gradients equal
  the single-device dropless layer."""
  mesh = jax.make_mesh(mesh_shape, ("data", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  (x, w, experts, mask), params = _inputs(5, activation)
  cot = np.random.default_rng(6).normal(size=(B, T, D)).astype(np.float32)
  common = dict(activation=activation, mode="dropless", dropless_impl="padded")
  want_grads, (want_y, _, _) = _layer_and_grads(functools.partial(dispatch.moe_ffn, **common))(
      x, w, params, experts, mask, cot)
  sharded = _layer_and_grads(functools.partial(
      expert_parallel.moe_ffn, mesh=mesh, batch_axes=("data", "expert"), expert_axis="expert",
      tensor_axes="tensor", strategy="ragged", **common))
  rows = NamedSharding(mesh, P(("data", "expert")))
  put = lambda a: jax.device_put(a, rows)
  weight_specs = [P("expert", None, "tensor"), P("expert", "tensor", None), P("expert", None, "tensor")]
  sharded_params = [jax.device_put(p, NamedSharding(mesh, s)) for p, s in zip(params, weight_specs)]
  with mock.patch.object(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all):
    got_grads, (got_y, got_dropped, _) = sharded(put(x), put(w), sharded_params, put(experts), put(mask), put(cot))
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  assert float(got_dropped) == 0.0
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_ragged_strategy_lowers_to_ragged_all_to_all(platform):
  """Lowered for GPU and TPU from this host, the layer and its gradient exchange rows by ragged_all_to_all only:
  two exchanges forward and their two transposes, no all-gather of tokens."""
  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  (x, w, experts, mask), params = _inputs(7, "gelu")
  layer = functools.partial(expert_parallel.moe_ffn, mesh=mesh, batch_axes=("data", "expert"),
                            expert_axis="expert", activation="gelu", mode="dropless", strategy="ragged")
  loss = lambda x, params: jnp.sum(layer(x, w, experts, *params, token_mask=mask)[0])
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(x, params).lower(lowering_platforms=(platform,)).as_text()
  assert text.count("@ragged_all_to_all") == 4, text.count("@ragged_all_to_all")
  gathered = [line for line in text.splitlines() if "all_gather" in line]
  assert all("xi32>" in line for line in gathered), gathered  # only the group sizes are all-gathered


def test_auto_strategy_per_backend():
  assert expert_parallel.resolve_strategy("auto", "dropless", backend="gpu") == "ragged"
  assert expert_parallel.resolve_strategy("auto", "dropless", backend="tpu") == "ragged"
  assert expert_parallel.resolve_strategy("auto", "dropless", backend="cpu") == "gather"
  assert expert_parallel.resolve_strategy("auto", "capacity", backend="gpu") == "all_to_all"


def test_all_to_all_moves_only_slots():
  """The all_to_all strategy compiles to all-to-alls (no all-gather of tokens); gather to the reverse."""
  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  (x, w, experts, mask), params = _inputs(2, "gelu")
  rows = NamedSharding(mesh, P(("data", "expert")))
  texts = {}
  for strategy in ("all_to_all", "gather"):
    fn = jax.jit(functools.partial(expert_parallel.moe_ffn, mesh=mesh, batch_axes=("data", "expert"),
                                   expert_axis="expert", activation="gelu", strategy=strategy))
    args = [jax.device_put(a, rows) for a in (x, w, experts)]
    args += [jax.device_put(p, NamedSharding(mesh, P("expert"))) for p in params]
    texts[strategy] = fn.lower(*args).compile().as_text()
  assert "all-to-all" in texts["all_to_all"] and "all-gather" not in texts["all_to_all"]
  assert "all-gather" in texts["gather"] and "reduce-scatter" in texts["gather"]


def test_bad_layouts_are_refused():
  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  (x, w, experts, _), params = _inputs(3, "gelu")
  call = functools.partial(expert_parallel.moe_ffn, x, w, experts, *params, mesh=mesh, expert_axis="expert",
                           activation="gelu")
  with pytest.raises(ValueError, match="batch split over the expert axis"):
    call(batch_axes=("data",))
  with pytest.raises(ValueError, match="needs capacity mode"):
    call(batch_axes=("data", "expert"), mode="dropless", strategy="all_to_all")
  with pytest.raises(ValueError, match="ragged strategy is dropless"):
    call(batch_axes=("data", "expert"), mode="capacity", strategy="ragged")
  with pytest.raises(ValueError, match="do not divide"):
    expert_parallel.moe_ffn(x, w, experts, params[0][:6], params[1][:6], mesh=mesh, batch_axes=("data", "expert"),
                            expert_axis="expert", activation="gelu")
  with pytest.raises(ValueError, match=r"the batch of 4 sequences does not split evenly over the 8 devices of "
                                       r"mesh axes \('data', 'expert'\); use a batch size that is a multiple of 8"):
    expert_parallel.moe_ffn(x[:4], w[:4], experts[:4], *params, mesh=mesh, batch_axes=("data", "expert"),
                            expert_axis="expert", activation="gelu")
  with pytest.raises(ValueError, match=r"the FFN width is split over \('data',\), whose devices must hold the same "
                                       r"tokens, but the batch is split over \['data'\] too"):
    call(batch_axes=("data", "expert"), tensor_axes="data")
  with pytest.raises(ValueError, match=r"mesh axes \['tensor'\] are not axes of the mesh"):
    call(batch_axes=("data", "expert"), tensor_axes="tensor")
  with pytest.raises(ValueError, match=r"top-k k=5 must be between 1 and the number of experts 4"):
    expert_parallel.moe_ffn(x, np.ones((B, T, 5), np.float32), np.zeros((B, T, 5), np.int32), params[0][:4],
                            params[1][:4], mesh=mesh, batch_axes=("data", "expert"), expert_axis="expert",
                            activation="gelu", mode="dropless", strategy="gather")


@pytest.mark.parametrize("mode,strategy", [("capacity", "all_to_all"), ("dropless", "gather")])
def test_one_expert_per_device_with_k_above_it(mode, strategy):
  """E = 8 over an expert axis of 8: one local expert per device while each token picks k = 2."""
  mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  (x, w, experts, mask), params = _inputs(4, "gelu")
  common = dict(activation="gelu", mode=mode, capacity_factor=0.75, token_mask=mask)
  y, stats = jax.jit(functools.partial(expert_parallel.moe_ffn, mesh=mesh, batch_axes="expert",
                                       expert_axis="expert", strategy=strategy, **common))(x, w, experts, *params)
  y_one, stats_one = dispatch.moe_ffn(x, w, experts, *params, **common)
  np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["dropped_fraction"], stats_one["dropped_fraction"], rtol=1e-6)
  assert (float(stats["dropped_fraction"]) > 0) == (mode == "capacity")


def _train_step_result(cfg, devices):
  mesh = parallel.make_mesh(cfg.mesh, devices=devices)
  rules = parallel.axis_rules(cfg.mesh)
  model = model_lib.build_model(cfg.model)
  # A plain gradient step (update = lr · g): the comparison is of the gradients themselves, where Adam's
  # first update g / (|g| + ε) would turn the rounding of a near-zero gradient into a step of up to lr.
  optimizer = optax.identity()
  _, shardings, make = state_lib.create_state(model, optimizer, mesh, rules, seed=0, seq_len=16)
  tokens = np.random.default_rng(4).integers(0, cfg.model.vocab_size, (8, 17)).astype(np.int32)
  batch = parallel.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                parallel.batch_sharding(mesh, rules))
  dyn = {"lr": LR, "router_noise": 0.5, "load_balance_weight": 0.01, "z_loss_weight": 0.001,
         "mod_predictor_weight": 0.01}
  spy = mock.patch.object(expert_parallel, "moe_ffn", wraps=expert_parallel.moe_ffn)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), spy as expert_parallel_calls:
    fn = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5))
    state, metrics = fn(make(), batch, {k: jnp.float32(v) for k, v in dyn.items()})
  assert expert_parallel_calls.called == (mesh.shape["expert"] > 1)
  return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params)


@pytest.fixture(scope="module")
def one_device(make_config):
  cfg = make_config(**{"moe.capacity_factor": 0.75})
  return _train_step_result(cfg, jax.devices()[:1])


@pytest.mark.parametrize("mesh", [{"data": 2, "expert": 4}, {"fsdp": 4, "tensor": 2},
                                  {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}])
def test_train_step_on_a_mesh_equals_one_device(make_config, one_device, mesh):
  cfg = make_config(**{"moe.capacity_factor": 0.75})
  cfg.mesh.shape.update({"data": 1, **mesh})
  loss, grad_norm, params = _train_step_result(cfg, jax.devices())
  want_loss, want_grad_norm, want_params = one_device
  assert loss == pytest.approx(want_loss, rel=1e-5)
  assert grad_norm == pytest.approx(want_grad_norm, rel=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), params, want_params)


def test_a_chunked_loss_on_a_mesh_equals_the_whole_logits_on_one_device(make_config, one_device):
  """model.logits_chunk_len=5 over 16 positions (the last chunk ragged) on fsdp 2 x expert 2 x tensor 2, the
  batch split over fsdp and expert and the vocabulary over tensor: the loss and the updated weights equal one
  device's, whose loss takes the whole logits."""
  cfg = make_config(logits_chunk_len=5, **{"moe.capacity_factor": 0.75})
  cfg.mesh.shape.update(data=1, fsdp=2, expert=2, tensor=2)
  loss, grad_norm, params = _train_step_result(cfg, jax.devices())
  assert loss == pytest.approx(one_device[0], rel=1e-5)
  assert grad_norm == pytest.approx(one_device[1], rel=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), params, one_device[2])


def test_expert_rule_naming_a_mesh_axis_of_one_device_too(make_config, one_device):
  """An 'expert' rule of two mesh axes, one of them of size 1 (the experts still split over one axis), runs
  expert parallelism over the other and equals one device."""
  cfg = make_config(**{"moe.capacity_factor": 0.75})
  cfg.mesh.shape.update({"data": 2, "expert": 4})
  cfg.mesh.axis_rules = tuple((name, {"batch": ("data", "fsdp", "expert", "tensor"), "expert": ("expert", "tensor")}
                               .get(name, rule)) for name, rule in cfg.mesh.axis_rules)
  loss, _, params = _train_step_result(cfg, jax.devices())
  assert loss == pytest.approx(one_device[0], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), params, one_device[2])


def test_all_to_all_bytes_match_the_analytic_count():
  """Forward+backward exchanges the [E, C, b_local, d] slot buffer four times per device."""
  from diffmoe_jax.parallel import collective_bytes
  mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  (x, w, experts, _), params = _inputs(5, "gelu")
  rows = NamedSharding(mesh, P(("data", "expert")))
  layer = functools.partial(expert_parallel.moe_ffn, mesh=mesh, batch_axes=("data", "expert"),
                            expert_axis="expert", activation="gelu", strategy="all_to_all")
  def fwd_bwd(x_, p):  # y is returned, as the layers above need it
    y, vjp = jax.vjp(lambda a, q: layer(a, w, experts, *q)[0], x_, p)
    return y, vjp(x_)
  fwd_bwd = jax.jit(fwd_bwd)
  args = (jax.device_put(x, rows), [jax.device_put(p, NamedSharding(mesh, P("expert"))) for p in params])
  hlo = fwd_bwd.lower(*args).compile().as_text()
  analytic = 4 * (B // 8) * E * dispatch.moe_capacity(T, K, E, 1.25) * D * 4
  assert collective_bytes(hlo, "all-to-all") == analytic
  # The trainer logs this summary for each compiled step program.
  assert f"all-to-all {analytic / 2**20:,.2f} MiB" in parallel.collective_summary(hlo)


def test_expert_parallel_benchmark_runs_on_the_trainers_mesh(capsys):
  """`bench expert_parallel` times both layouts on the default config's mesh and rules, and its compiled
  all-to-all bytes equal the analytic count."""
  from diffmoe_jax import bench as bench_lib
  bench_lib.main(["expert_parallel", "--seq-len", "16", "--d-model", "16", "--ffn-dim", "32", "--batch-per-device", "1",
                  "--warmup", "0", "--reps", "1"])
  out = capsys.readouterr().out
  assert "8 cpu devices ({'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1})" in out, out
  assert all(f"  {name} " in out for name in ("replicated", "expert-parallel")), out
  measured, analytic = (int(v.replace(",", "")) for v in
                        re.search(r"measured ([\d,]+) \(compiled program\), analytic ([\d,]+)", out).groups())
  assert measured == analytic == 4 * 1 * 8 * dispatch.moe_capacity(16, 2, 8, 1.25) * 16 * 4


def test_per_device_expert_load_sums_each_devices_experts():
  from diffmoe_jax.config import defaults
  from diffmoe_jax.train.metrics import layer_scalars
  model = defaults().model
  load = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], np.float32)
  layers = {"expert_load": load, "dropped_fraction": np.zeros(2), "lambda": np.zeros((2, 1)),
            "mod_selected_fraction": np.zeros(0), "mod_predictor_accuracy": np.zeros(0)}
  scalars = layer_scalars(layers, model, expert_devices=2)
  assert scalars["moe/layer0/device0_load"] == pytest.approx(0.3)
  assert scalars["moe/layer0/device1_load"] == pytest.approx(0.7)
  assert scalars["moe/layer1/device1_load"] == pytest.approx(0.5)
  assert not any("device" in k for k in layer_scalars(layers, model, expert_devices=1))


@pytest.mark.parametrize("platform, kernel_call", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "@tpu_custom_call")])
def test_sharded_train_step_lowers_for_accelerators(make_config, platform, kernel_call):
  """The whole train step on fsdp 2 x expert 2 x tensor 2 with the accelerator paths (Pallas attention
  kernels per shard, dropless ragged expert parallelism), lowered for GPU and TPU from this host."""
  cfg = make_config(attention_impl="pallas", dtype="bfloat16", **{"moe.dispatch": "dropless",
                                                                 "moe.expert_parallel": "ragged"})
  cfg.mesh.shape.update(data=1, fsdp=2, expert=2, tensor=2)
  mesh, rules = parallel.make_mesh(cfg.mesh), parallel.axis_rules(cfg.mesh)
  model = model_lib.build_model(cfg.model)
  optimizer = optax.adamw(1e-3)
  _, _, make = state_lib.create_state(model, optimizer, mesh, rules, seed=0, seq_len=16)
  tokens = np.zeros((8, 16), np.int32)
  batch = parallel.global_batch({"inputs": tokens, "targets": tokens}, parallel.batch_sharding(mesh, rules))
  dyn = {k: jnp.float32(0.01) for k in ("lr", "router_noise", "load_balance_weight", "z_loss_weight",
                                         "mod_predictor_weight")}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5))
    text = step.trace(make(), batch, dyn).lower(lowering_platforms=(platform,)).as_text()
  assert text.count(kernel_call) >= 3 and "@ragged_all_to_all" in text
  assert "mosaic_gpu" not in text


def test_per_device_expert_load_of_more_experts_than_devices():
  """Device j holds experts [j·E/n, (j+1)·E/n): against a plain loop over 8 experts on 4 devices. With 4 experts on
  2 devices, reading each device's experts as a stride (reshape(-1, n)) gives the same shares and passed."""
  from diffmoe_jax.config import defaults
  from diffmoe_jax.train.metrics import layer_scalars
  load = np.random.default_rng(0).dirichlet(np.ones(8), size=1).astype(np.float32)
  layers = {"expert_load": load, "dropped_fraction": np.zeros(1), "lambda": np.zeros((1, 1)),
            "mod_selected_fraction": np.zeros(0), "mod_predictor_accuracy": np.zeros(0)}
  scalars = layer_scalars(layers, defaults().model, expert_devices=4)
  for device in range(4):
    want = sum(float(load[0, e]) for e in range(8) if e // 2 == device)
    assert scalars[f"moe/layer0/device{device}_load"] == pytest.approx(want, rel=1e-6)
  assert not any(f"device{j}_load" in k for k in scalars for j in range(4, 8))
