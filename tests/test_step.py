"""The train step's pieces: which parameters decay, how gradient accumulation splits the batch and what it
averages, the update against AdamW written out, clipping by the global norm on a mesh, the logged metrics
recomputed, and the master weights' dtype."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffmoe_jax import parallel, validation
from diffmoe_jax.config import ConfigError
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.nn.mod import MoDRouter
from diffmoe_jax.train import metrics as metrics_lib
from diffmoe_jax.train import state as state_lib
from diffmoe_jax.train import step as step_lib

ROUTING = {"router", "score", "predictor_hidden", "predictor_hidden_bias", "predictor_out"}
MATRICES = {"table", "lm_head", "wq", "wk", "wv", "wo", "w_in", "w_out", "w_gate"}
DYNAMIC = ("lr", "router_noise", "load_balance_weight", "z_loss_weight", "mod_predictor_weight")  # dynamic_settings'


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_weight_decay_takes_feature_matrices_and_no_routing_parameter(make_config, activation):
  cfg = make_config(**{"moe.activation": activation})
  model = model_lib.build_model(cfg.model)
  params = nn.unbox(jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}, jnp.zeros((1, 8), jnp.int32))))["params"]
  decayed = {}
  for path, flag in jax.tree_util.tree_leaves_with_path(state_lib.decay_mask(params)):
    decayed.setdefault(path[-1].key, set()).add(bool(flag))
  assert ROUTING <= set(decayed) and {"router", "score", "predictor_out"} <= set(decayed)
  for name, flags in decayed.items():
    assert flags == {name in MATRICES}, (name, flags)


def _collectives(hlo: str) -> dict:
  ops = ("all-gather", "collective-permute", "all-to-all")
  return {op: len([line for line in hlo.splitlines() if f" {op}(" in line or f" {op}-start(" in line])
          for op in ops}


def test_gradient_accumulation_keeps_every_row_on_its_device(make_config):
  """Micro-batch i takes rows i, i + A, i + 2A, ...: every device holds its share of each micro-batch, so
  accumulating adds no activation movement between devices (compared on the compiled programs)."""
  cfg = make_config()
  mesh = parallel.make_mesh(cfg.mesh)
  rules = parallel.axis_rules(cfg.mesh)
  assert parallel.data_parallel_size(mesh, rules) == 8
  model = model_lib.build_model(cfg.model)
  optimizer = state_lib.make_optimizer(cfg.optimizer)
  abstract, shardings, _ = state_lib.create_state(model, optimizer, mesh, rules, seed=0, seq_len=16)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  tokens = jax.ShapeDtypeStruct((16, 16), jnp.int32, sharding=batch_sharding)
  dyn = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in DYNAMIC}
  counts = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for accum in (1, 2):
      fn = step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5, grad_accum_steps=accum)
      compiled = jax.jit(fn).lower(abstract, {"inputs": tokens, "targets": tokens}, dyn).compile()
      counts[accum] = _collectives(compiled.as_text())
  assert counts[2] == counts[1], counts


def test_train_and_eval_steps_keep_attention_inside_each_document(make_config):
  """A batch's segment ids reach the model in both steps: their cross-entropy is the model's with the ids
  (two documents per row), which differs from the model's without them."""
  cfg = make_config()
  model = model_lib.build_model(cfg.model)
  optimizer = state_lib.make_optimizer(cfg.optimizer)
  state = jax.jit(lambda r: nn.unbox(state_lib.init_fn(model, optimizer, 16)(r)))(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, cfg.model.vocab_size)
  segments = jnp.broadcast_to((jnp.arange(16) >= 6).astype(jnp.int32), (2, 16))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments}

  def cross_entropy(segment_ids, **mode):
    logits, _ = model.apply({"params": state.params}, batch["inputs"], segment_ids=segment_ids,
                            rngs={"noise": jax.random.PRNGKey(2)}, **mode)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean())

  evaluation = dict(train=False, mod_mode="predictor")
  loss_sum, count = jax.jit(step_lib.make_eval_step(model))(state.params, batch)
  assert float(loss_sum / count) == pytest.approx(cross_entropy(segments, **evaluation), rel=1e-5)
  assert abs(cross_entropy(None, **evaluation) - cross_entropy(segments, **evaluation)) > 1e-3
  training = dict(train=True, mod_mode="topk", mod_capacity=0.5)
  dyn = {k: jnp.float32(0.0) for k in DYNAMIC}  # no router noise: the rng does not matter
  _, metrics = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5))(
      state, batch, dyn)
  assert float(metrics["cross_entropy"]) == pytest.approx(cross_entropy(segments, **training), rel=1e-5)
  assert abs(cross_entropy(None, **training) - cross_entropy(segments, **training)) > 1e-3


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float16"])
def test_training_refuses_16_bit_master_weights(make_config, param_dtype):
  """AdamW updates the weights in their own dtype, where a small update (lr x weight decay, or any step at a
  warmup's small lr) rounds away; the compute dtype is model.dtype."""
  cfg = make_config(dtype="bfloat16", param_dtype=param_dtype)
  cfg.curriculum.tokens_per_batch = 64
  with pytest.raises(ConfigError, match=rf"^config\.model\.param_dtype: '{param_dtype}': training keeps float32 "
                                        r"master weights.*set it to 'float32' \(model\.dtype"):
    validation.validate(cfg)
  cfg.model.param_dtype = "float32"
  validation.validate(cfg)


@pytest.mark.parametrize("head", [{}, {"logits_chunk_len": 5, "tie_embeddings": True}, {"logits_chunk_len": 8}])
def test_step_is_adamw_on_the_gradient_of_the_documented_loss(make_config, head):
  """Two steps against float64 AdamW written out here, on jax.grad of a loss written from model.apply:
  next-token cross entropy over every position plus each auxiliary loss times its weight, gradient clipped
  to optimizer.grad_clip by global norm, Adam with bias correction, decay on the feature matrices only. The
  same when the step's loss computes the logits in chunks of the 16 positions (the reference takes them
  whole), one of them ragged, and through the tied embedding table."""
  cfg = make_config(num_layers=2, **head)
  cfg.optimizer.grad_clip = 0.5  # below the gradient norms here, so the clipping is exercised
  o = cfg.optimizer
  model = model_lib.build_model(cfg.model)
  optimizer = state_lib.make_optimizer(o)
  state = jax.jit(lambda r: nn.unbox(state_lib.init_fn(model, optimizer, 16)(r)))(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, cfg.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  weights = {"load_balance": 0.3, "router_z": 0.2, "mod_predictor": 0.1}
  dyn = {k: jnp.float32(v) for k, v in {"lr": 0.01, "router_noise": 0.5, "load_balance_weight": 0.3,
                                        "z_loss_weight": 0.2, "mod_predictor_weight": 0.1}.items()}

  @jax.jit
  def loss_and_grad(params, rng):
    def loss(params):
      logits, aux = model.apply({"params": params}, batch["inputs"], train=True, mod_mode="topk",
                                mod_capacity=0.5, router_noise_std=0.5, rngs={"noise": rng})
      log_probs = jax.nn.log_softmax(logits, axis=-1)
      ce = -jnp.mean(jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1))
      return ce + sum(w * aux["losses"][k] for k, w in weights.items()), ce
    return jax.value_and_grad(loss, has_aux=True)(params)

  step = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5))
  as64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
  params = as64(state.params)
  mu, nu = jax.tree.map(np.zeros_like, params), jax.tree.map(np.zeros_like, params)
  for t in (1, 2):
    (loss, ce), grads = loss_and_grad(state.params, jax.random.fold_in(state.rng, state.step))
    state, metrics = step(state, batch, dyn)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics["cross_entropy"]) == pytest.approx(float(ce), rel=1e-6)
    grads = as64(grads)
    norm = np.sqrt(sum(np.sum(g * g) for g in jax.tree.leaves(grads)))
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5) and norm > o.grad_clip
    grads = jax.tree.map(lambda g: g * o.grad_clip / norm, grads)
    mu = jax.tree.map(lambda m, g: o.b1 * m + (1 - o.b1) * g, mu, grads)
    nu = jax.tree.map(lambda v, g: o.b2 * v + (1 - o.b2) * g * g, nu, grads)

    def adamw(path, p, m, v):
      update = (m / (1 - o.b1 ** t)) / (np.sqrt(v / (1 - o.b2 ** t)) + o.eps)
      return p - 0.01 * (update + (o.weight_decay * p if path[-1].key in MATRICES else 0.0))
    params = jax.tree_util.tree_map_with_path(adamw, params, mu, nu)
    # Float32 against float64: Adam's m / sqrt(v) amplifies rounding where a gradient is near 0.
    jax.tree.map(lambda got, want: np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5),
                 state.params, params)


def _top_k(row, k):
  return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


def test_logged_metrics_are_what_the_readme_says(make_config):
  """One train step's TensorBoard figures recomputed in NumPy from what the same forward pass routes on (each
  layer's router logits, each routed layer's MoD scores and predictor logits) and its logits: the losses and
  their weighted sum, each layer's expert loads, max load and dropped fraction (capacity per sequence, earlier
  tokens first), the MoD selected fraction and predictor accuracy, the step's lr and router noise."""
  cfg = make_config(num_layers=2, scan_layers=False, remat_policy="none", **{"moe.capacity_factor": 0.75})
  m = cfg.model
  model = model_lib.build_model(m)
  optimizer = state_lib.make_optimizer(cfg.optimizer)
  state = jax.jit(lambda r: nn.unbox(state_lib.init_fn(model, optimizer, 16)(r)))(jax.random.PRNGKey(0))
  tokens = np.random.default_rng(5).integers(0, m.vocab_size, (4, 17)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
  weights = {"load_balance": 0.3, "router_z": 0.2, "mod_predictor": 0.1}
  dyn = {"lr": 0.01, "router_noise": 0.0, "load_balance_weight": 0.3, "z_loss_weight": 0.2, "mod_predictor_weight": 0.1}
  _, metrics = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5))(
      state, batch, {k: jnp.float32(v) for k, v in dyn.items()})
  scalars = metrics_lib.step_scalars(jax.device_get(metrics), m)

  captured = lambda module, method: method == "router_logits" or isinstance(module, MoDRouter)
  (logits, _), inter = jax.jit(lambda p: model.apply(
      {"params": p}, batch["inputs"], train=True, mod_mode="topk", mod_capacity=0.5, router_noise_std=0.0,
      rngs={"noise": jax.random.PRNGKey(1)}, capture_intermediates=captured))(state.params)
  group = inter["intermediates"]["group_0"]
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  want = {"train/cross_entropy": -np.mean(np.take_along_axis(log_probs, tokens[:, 1:, None], -1)),
          "train/lr": 0.01, "train/router_noise": 0.0}
  balance, z_loss, e, k = [], [], m.moe.num_experts, m.moe.top_k
  for l in range(2):
    router = np.asarray(group[f"layer_{l}"]["block"]["moe"]["router_logits"][0], np.float64)  # [B, n, E]
    rows, n = router.shape[0], router.shape[1]
    capacity = math.ceil(m.moe.capacity_factor * n * k / e)
    counts, dropped = np.zeros(e), 0
    for sequence in router:
      used = np.zeros(e)
      for row in sequence:  # earlier tokens take the slots first
        for expert in _top_k(row, k):
          counts[expert] += 1
          dropped += used[expert] == capacity
          used[expert] = min(used[expert] + 1, capacity)
    f = counts / (rows * n * k)
    probs = np.exp(router - router.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    balance.append(e * np.sum(f * probs.reshape(-1, e).mean(0)))
    lse = router.max(-1) + np.log(np.exp(router - router.max(-1, keepdims=True)).sum(-1))
    z_loss.append(np.mean(lse ** 2))
    np.testing.assert_allclose(np.asarray(metrics["layers"]["expert_load"][l]), f, rtol=1e-6)
    want[f"moe/layer{l}/max_load"] = f.max() / f.mean()
    want[f"moe/layer{l}/dropped_fraction"] = dropped / (rows * n * k)
    assert 0 < dropped and (n == 16) == (l == 0)  # the routed layer's MoE runs its selected half only
  score, predictor = (np.asarray(a, np.float64) for a in group["layer_1"]["mod_router"]["__call__"][0])
  selected = np.zeros(score.shape, bool)
  for b, row in enumerate(score):
    selected[b, sorted(range(16), key=lambda t: (-row[t], t))[:8]] = True
  want.update({"train/load_balance_loss": np.mean(balance), "train/router_z_loss": np.mean(z_loss),
               "train/mod_predictor_loss": np.mean(np.logaddexp(0, predictor) - predictor * selected),
               "mod/routed0/selected_fraction": 0.5,
               "mod/routed0/predictor_accuracy": np.mean((predictor > 0) == selected)})
  want["train/loss"] = want["train/cross_entropy"] + sum(
      w * want[f"train/{name}_loss"] for name, w in weights.items())
  for tag, value in want.items():
    assert scalars[tag] == pytest.approx(value, rel=1e-5, abs=1e-7), tag


def test_accumulated_step_is_the_mean_over_its_micro_batches(make_config):
  """Two micro-batches (rows 0, 2 and 1, 3) with documents starting at different places in each row: the
  accumulated loss, its parts and the gradient are the means of the two micro-batches' (jax.grad of the loss
  written from model.apply on each). Cross-entropy, z-loss and predictor loss also equal the whole batch's;
  the load-balance loss, a product of two token means, does not (README "The step")."""
  cfg = make_config(num_layers=2)
  model = model_lib.build_model(cfg.model)
  optimizer = optax.identity()  # the update is the gradient itself: params - lr * g
  state = jax.jit(lambda r: nn.unbox(state_lib.init_fn(model, optimizer, 16)(r)))(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 17), 0, cfg.model.vocab_size)
  starts = jnp.asarray([3, 9, 0, 12])[:, None]  # the second document's first position in each row
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": (jnp.arange(16)[None, :] >= starts).astype(jnp.int32)}
  weights = {"load_balance": 0.3, "router_z": 0.2, "mod_predictor": 0.1}
  dyn = {"lr": 1.0, "router_noise": 0.0, "load_balance_weight": 0.3, "z_loss_weight": 0.2, "mod_predictor_weight": 0.1}
  new, metrics = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5,
                                                  grad_accum_steps=2))(
      state, batch, {k: jnp.float32(v) for k, v in dyn.items()})

  def loss(params, rows):
    logits, aux = model.apply({"params": params}, rows["inputs"], train=True, mod_mode="topk", mod_capacity=0.5,
                              segment_ids=rows["segment_ids"], rngs={"noise": jax.random.PRNGKey(1)})
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    parts = {"cross_entropy": -jnp.mean(jnp.take_along_axis(log_probs, rows["targets"][..., None], axis=-1)),
             **{f"{k}_loss": aux["losses"][k] for k in weights}}
    return parts["cross_entropy"] + sum(w * parts[f"{k}_loss"] for k, w in weights.items()), parts

  parts_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  micro = [parts_and_grad(state.params, jax.tree.map(lambda x: x[i::2], batch)) for i in (0, 1)]
  _, whole = jax.jit(loss)(state.params, batch)  # the forward alone
  mean = lambda *xs: np.mean([np.asarray(x, np.float64) for x in xs], axis=0)
  assert float(metrics["loss"]) == pytest.approx(mean(*(m[0][0] for m in micro)), rel=1e-5)
  for name in whole:
    want = mean(*(m[0][1][name] for m in micro))
    assert float(metrics[name]) == pytest.approx(want, rel=1e-5), name
    assert (float(whole[name]) == pytest.approx(want, rel=1e-5)) == (name != "load_balance_loss"), name
  grads = jax.tree.map(lambda p, q: np.asarray(p, np.float64) - np.asarray(q, np.float64), state.params, new.params)
  jax.tree.map(lambda got, a, b: np.testing.assert_allclose(got, mean(a, b), rtol=1e-4, atol=1e-6),
               grads, micro[0][1], micro[1][1])


def test_each_micro_batch_draws_its_own_router_noise(make_config):
  """With router noise on, micro-batch i routes under the step's key folded with i: on a batch whose two
  micro-batches are the same rows, the accumulated gradient is the mean of that micro-batch's gradients
  under keys 0 and 1, which differ, so one key shared by all micro-batches would show."""
  cfg = make_config(num_layers=2)
  model = model_lib.build_model(cfg.model)
  optimizer = optax.identity()  # the update is the gradient itself: params - lr * g
  state = jax.jit(lambda r: nn.unbox(state_lib.init_fn(model, optimizer, 16)(r)))(jax.random.PRNGKey(0))
  rows = jax.random.randint(jax.random.PRNGKey(3), (2, 17), 0, cfg.model.vocab_size)
  tokens = jnp.repeat(rows, 2, axis=0)  # rows 0, 2 (micro-batch 0) equal rows 1, 3 (micro-batch 1)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  dyn = {"lr": 1.0, "router_noise": 1.0, "load_balance_weight": 0.0, "z_loss_weight": 0.0,
         "mod_predictor_weight": 0.0}
  new, _ = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5,
                                            grad_accum_steps=2))(
      state, batch, {k: jnp.float32(v) for k, v in dyn.items()})

  @jax.jit
  def grad(params, key):
    def cross_entropy(params):
      logits, _ = model.apply({"params": params}, rows[:, :-1], train=True, mod_mode="topk", mod_capacity=0.5,
                              router_noise_std=1.0, rngs={"noise": key})
      log_probs = jax.nn.log_softmax(logits, axis=-1)
      return -jnp.mean(jnp.take_along_axis(log_probs, rows[:, 1:, None], axis=-1))
    return jax.grad(cross_entropy)(params)

  step_key = jax.random.fold_in(state.rng, state.step)
  micro = [grad(state.params, jax.random.fold_in(step_key, i)) for i in (0, 1)]
  as_f64 = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  got = [p - q for p, q in zip(as_f64(state.params), as_f64(new.params))]
  g0, g1 = as_f64(micro[0]), as_f64(micro[1])
  assert max(np.abs(a - b).max() for a, b in zip(g0, g1)) > 1e-3  # the noise changes the routing
  for got_leaf, a, b in zip(got, g0, g1):
    np.testing.assert_allclose(got_leaf, (a + b) / 2, rtol=1e-4, atol=1e-6)


def test_clipping_scales_by_the_global_norm_over_every_shard(make_config):
  """On fsdp 2 x expert 2 x tensor 2 the step clips by the norm over all parameters, not over each device's
  shards: Adam's first moment after one step is (1 - b1) x the gradient (jax.grad of the loss written from
  model.apply, on one device) times grad_clip / its global norm computed here."""
  cfg = make_config(num_layers=2)
  cfg.optimizer.grad_clip = 0.05
  cfg.mesh.shape.update(data=1, fsdp=2, expert=2, tensor=2)
  mesh, rules = parallel.make_mesh(cfg.mesh), parallel.axis_rules(cfg.mesh)
  model = model_lib.build_model(cfg.model)
  optimizer = state_lib.make_optimizer(cfg.optimizer)
  _, _, make = state_lib.create_state(model, optimizer, mesh, rules, seed=0, seq_len=16)
  tokens = np.random.default_rng(6).integers(0, cfg.model.vocab_size, (8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  dyn = {k: jnp.float32(0.0) for k in DYNAMIC}  # lr 0, no router noise, cross-entropy alone
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = make()
    params = jax.device_get(state.params)
    new, metrics = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5))(
        state, parallel.global_batch(batch, parallel.batch_sharding(mesh, rules)), dyn)
  assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
             for leaf in jax.tree.leaves(new.params))

  def loss(params):
    logits, _ = model.apply({"params": params}, batch["inputs"], train=True, mod_mode="topk", mod_capacity=0.5,
                            rngs={"noise": jax.random.PRNGKey(1)})
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1))
  grads = jax.tree.map(lambda g: np.asarray(g, np.float64), jax.jit(jax.grad(loss))(params))
  norm = np.sqrt(sum(np.sum(g * g) for g in jax.tree.leaves(grads)))
  assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5) and norm > 10 * cfg.optimizer.grad_clip
  mu = jax.device_get(new.opt_state[1].mu)  # (clip state, Adam state, decay state)
  jax.tree.map(lambda m, g: np.testing.assert_allclose(m / (1 - cfg.optimizer.b1), g * cfg.optimizer.grad_clip / norm,
                                                       rtol=1e-4, atol=1e-8), mu, grads)
