"""The decoder: causality, gradients, scan == unrolled, layer layout, stats, axis names, remat names."""
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from diffmoe_jax import config as config_lib
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.nn.attention import Attention
from diffmoe_jax.nn.mod import MoDRouter
from diffmoe_jax.ops import dispatch

B, T = 2, 16


def _init(cfg):
  model = model_lib.build_model(cfg.model)
  tokens = jnp.zeros((B, T), jnp.int32)
  variables = jax.jit(lambda: model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)},
                                         tokens))()
  return model, variables


@pytest.fixture(scope="module")
def base(make_config):
  cfg = make_config()
  model, variables = _init(cfg)
  return cfg, model, nn.unbox(variables)["params"], variables


@pytest.fixture(scope="module")
def forward(base):
  """Jitted inference forward, one compile per MoD mode, shared by the tests."""
  _, model, _, _ = base
  fns = {}
  def run(params, tokens, mod_mode):
    if mod_mode not in fns:
      fns[mod_mode] = jax.jit(lambda p, t: model.apply({"params": p}, t, mod_mode=mod_mode))
    return fns[mod_mode](params, tokens)
  return run


def _tokens(seed, vocab=64):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


@pytest.mark.parametrize("mod_mode", ["predictor", "off"])
def test_future_tokens_never_change_earlier_logits(base, forward, mod_mode):
  _, _, params, _ = base
  tokens = _tokens(0)
  logits, _ = forward(params, tokens, mod_mode)
  for cut in (1, 7, 12):
    changed = tokens.at[:, cut:].set((tokens[:, cut:] + 1 + jnp.arange(T - cut)) % 64)
    other, _ = forward(params, changed, mod_mode)
    np.testing.assert_allclose(np.asarray(other[:, :cut]), np.asarray(logits[:, :cut]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(other[:, cut:]), np.asarray(logits[:, cut:]))


def test_causal_without_mod_and_with_dropless(make_config):
  cfg = make_config(**{"mod.enabled": False, "moe.dispatch": "dropless"})
  model, variables = _init(cfg)
  apply = jax.jit(lambda t: model.apply(variables, t)[0])
  tokens = _tokens(1)
  changed = tokens.at[:, 9:].set(0)
  np.testing.assert_allclose(np.asarray(apply(changed)[:, :9]), np.asarray(apply(tokens)[:, :9]),
                             rtol=1e-5, atol=1e-5)


def test_a_router_at_each_layer_is_causal_and_routes_every_layer(make_config):
  """mod.every=1, the paper's "a learned binary router at each layer": groups of one routed layer."""
  cfg = make_config(**{"mod.every": 1})
  assert list(range(cfg.model.num_layers)[model_lib.routed_layers(cfg.model)]) == list(range(cfg.model.num_layers))
  model, variables = _init(cfg)
  apply = jax.jit(lambda t: model.apply(variables, t, mod_mode="predictor"))
  tokens = _tokens(2)
  logits, aux = apply(tokens)
  assert aux["layers"]["mod_selected_fraction"].shape == (cfg.model.num_layers,)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 1) % 64)
  np.testing.assert_allclose(np.asarray(apply(changed)[0][:, :9]), np.asarray(logits[:, :9]), rtol=1e-5, atol=1e-5)


def test_gradients_reach_router_lambdas_and_mod_router(base):
  _, model, params, _ = base
  tokens = _tokens(2)

  def loss(p):
    logits, aux = model.apply({"params": p}, tokens, train=True, mod_mode="topk", router_noise_std=0.0,
                              rngs={"noise": jax.random.PRNGKey(3)})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    return ce + sum(aux["losses"].values())

  grads = jax.jit(jax.grad(loss))(params)["groups"]
  for layer in ("layer_0", "layer_1"):
    g = grads[layer]["block"]
    router = np.asarray(g["moe"]["router"])
    assert np.isfinite(router).all() and np.abs(router).max() > 0, layer
    for lam in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
      per_expert = np.abs(np.asarray(g["attention"][lam])).max(axis=-1)  # [groups, experts]
      assert np.isfinite(per_expert).all()
      assert (per_expert > 0).all(), f"{layer} {lam}: an expert's λ got no gradient: {per_expert}"
  mod = grads["layer_1"]["mod_router"]
  for name in ("score", "predictor_hidden", "predictor_out"):
    assert np.abs(np.asarray(mod[name])).max() > 0, name


def test_initial_weights_have_their_scales(base):
  """Normal(init_std) weights, but the projections that write into the residual stream (attention wo, expert
  w_out) at init_std / sqrt(2 · num_layers) (GPT-2's scaled init), λ vectors at 0.1 (DESIGN), norm scales 1 and
  biases 0: each array's root mean square within four standard errors of a normal sample's."""
  cfg, _, params, _ = base
  m = cfg.model
  residual = m.init_std / np.sqrt(2 * m.num_layers)
  want = {"wo": residual, "w_out": residual, "lambda_q1": 0.1, "lambda_k1": 0.1, "lambda_q2": 0.1, "lambda_k2": 0.1}
  for path, a in jax.tree_util.tree_leaves_with_path(params):
    name, a = path[-1].key, np.asarray(a, np.float64)
    if name in ("scale", "predictor_hidden_bias"):
      np.testing.assert_array_equal(a, 1.0 if name == "scale" else 0.0, err_msg=jax.tree_util.keystr(path))
      continue
    std = want.get(name, m.init_std)
    assert np.sqrt(np.mean(a * a)) == pytest.approx(std, rel=4 / np.sqrt(2 * a.size)), jax.tree_util.keystr(path)


def test_the_predictor_loss_trains_the_predictor_alone(base):
  """The predictor reads a stop-gradient input (DESIGN, "Mixture-of-depths"): its BCE loss has a gradient for the
  predictor's own weights and none for any other parameter (the embedding, the blocks, the MoD score)."""
  _, model, params, _ = base
  tokens = _tokens(4)

  def predictor_loss(p):
    _, aux = model.apply({"params": p}, tokens, train=True, mod_mode="topk", mod_capacity=0.5, router_noise_std=0.0,
                         rngs={"noise": jax.random.PRNGKey(3)})
    return aux["losses"]["mod_predictor"]

  grads = jax.jit(jax.grad(predictor_loss))(params)
  own = {"predictor_hidden", "predictor_hidden_bias", "predictor_out"}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = path[-1].key
    largest = float(np.abs(np.asarray(g)).max())
    assert (largest > 0) == (name in own), (jax.tree_util.keystr(path), largest)


def test_token_rows_move_by_gathers_in_the_gradient(base):
  """Mixture-of-depths and MoE rows travel by gathers both ways: the topk-mode gradient has no scatter of
  activation rows (width d_model) into a zero array; only the plans' integer arrays, routing weights of
  width E or 1, λ and the embedding table's rows are scattered."""
  cfg, model, params, _ = base
  tokens = _tokens(4)

  def loss(p):
    logits, aux = model.apply({"params": p}, tokens, train=True, mod_mode="topk", router_noise_std=0.0,
                              rngs={"noise": jax.random.PRNGKey(3)})
    return jnp.sum(logits ** 2) + sum(aux["losses"].values())

  text = jax.jit(jax.grad(loss)).lower(params).as_text(dialect="hlo")
  results = [line.split(" = ")[1].split("{")[0] for line in text.splitlines() if " scatter(" in line]
  rows = [r for r in results if r.endswith(f",{cfg.model.d_model}]") and r != f"f32[{cfg.model.vocab_size},"
          f"{cfg.model.d_model}]"]
  assert results and not rows, rows


@pytest.mark.parametrize("overrides", [{}, {"attention": "differential_v2", "expert_conditional_lambda": False,
                                            "ffn": "dense", "moe.activation": "swiglu", "remat_policy": "dots"}])
def test_weights_cast_ahead_of_the_layers_give_the_same_logits_and_gradients(make_config, overrides):
  """`cast_weights` (the train step's) against each layer casting its own weights, bf16 compute: bit-equal
  logits and fp32 gradients, since every cast weight has one use, in the compute dtype."""
  cfg = make_config(dtype="bfloat16", **overrides)
  model, variables = _init(cfg)
  params = nn.unbox(variables)["params"]
  names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  tokens = _tokens(5)

  def loss(p, cast):
    logits, aux = model.apply({"params": model_lib.cast_weights(p, cfg.model) if cast else p}, tokens, train=True,
                              mod_mode="topk", router_noise_std=0.0, rngs={"noise": jax.random.PRNGKey(3)})
    return jnp.mean(logits ** 2) + sum(aux["losses"].values()), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, False)
  (_, cast_logits), cast_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, True)
  np.testing.assert_array_equal(np.asarray(cast_logits), np.asarray(logits))
  for (path, g), c in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(cast_grads)):
    assert c.dtype == jnp.float32, path
    np.testing.assert_array_equal(np.asarray(c), np.asarray(g), err_msg=jax.tree_util.keystr(path))
  expected = {"wq", "wk", "wv", "wo", "w_in", "w_out", "lm_head"} | (
      {"w_lambda", "w_gate"} if overrides else set())
  assert names & model_lib.COMPUTE_DTYPE_WEIGHTS == expected
  cast = model_lib.cast_weights(params, cfg.model)
  assert {jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(cast) if a.dtype == jnp.bfloat16} == {
      jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params) if p[-1].key in expected}
  cfg.model.cast_weights_once = False  # each layer casts its own
  assert model_lib.cast_weights(params, cfg.model) is params


def test_scanned_and_unrolled_give_the_same_logits(base, make_config):
  cfg, model, params, _ = base
  unrolled = model_lib.build_model(make_config(scan_layers=False).model)
  _, groups, _ = model_lib.layer_layout(cfg.model)
  unrolled_params = model_lib.unstack_groups(params, groups)
  tokens = _tokens(3)
  for mod_mode in ("topk", "predictor"):
    want, _ = model.apply({"params": params}, tokens, mod_mode=mod_mode)
    got, _ = jax.jit(lambda p: unrolled.apply({"params": p}, tokens, mod_mode=mod_mode))(unrolled_params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  restacked = model_lib.stack_groups(unrolled_params)
  jax.tree.map(np.testing.assert_array_equal, restacked, params)
  # The unrolled model's own init has the same per-layer parameter shapes.
  _, fresh = _init(make_config(scan_layers=False))
  assert jax.tree.map(jnp.shape, nn.unbox(fresh)["params"]) == jax.tree.map(jnp.shape, unrolled_params)


def test_odd_layer_count_has_a_full_depth_tail(make_config):
  """PI-P's 27 layers: groups of [full, routed] and one trailing full layer (here 5 = 2 groups + 1)."""
  cfg = make_config(num_layers=5)
  model, variables = _init(cfg)
  params = nn.unbox(variables)["params"]
  assert "tail_0" in params and jax.tree.leaves(params["groups"])[0].shape[0] == 2
  assert list(range(cfg.model.num_layers)[model_lib.routed_layers(cfg.model)]) == [1, 3]
  logits, aux = model.apply(variables, _tokens(4))
  assert logits.shape == (B, T, 64)
  assert aux["layers"]["lambda"].shape == (5, 4)
  assert aux["layers"]["mod_selected_fraction"].shape == (2,)
  # Every layer, the tail included, gets λ_init of its own depth: λ_e in float64 from that layer's parameters.
  for l in range(5):
    where = params["tail_0"] if l == 4 else jax.tree.map(lambda a: a[l // 2], params["groups"][f"layer_{l % 2}"])
    p = {name: np.asarray(a, np.float64) for name, a in where["block"]["attention"].items() if name[:6] == "lambda"}
    want = (np.exp((p["lambda_q1"] * p["lambda_k1"]).sum(-1)) - np.exp((p["lambda_q2"] * p["lambda_k2"]).sum(-1))
            + 0.8 - 0.6 * np.exp(-0.3 * l))
    np.testing.assert_allclose(np.asarray(aux["layers"]["lambda"][l]), want, rtol=1e-5, err_msg=f"layer {l}")


def test_stats_have_their_meaning(base):
  _, model, params, _ = base
  _, aux = model.apply({"params": params}, _tokens(5), train=True, mod_mode="topk",
                       rngs={"noise": jax.random.PRNGKey(0)})
  layers = aux["layers"]
  np.testing.assert_allclose(np.asarray(layers["expert_load"]).sum(-1), 1.0, rtol=1e-6)
  assert ((np.asarray(layers["dropped_fraction"]) >= 0) & (np.asarray(layers["dropped_fraction"]) <= 1)).all()
  # Capacity 0.5 of 16 tokens: each routed layer runs exactly 8.
  np.testing.assert_allclose(np.asarray(layers["mod_selected_fraction"]), 0.5)
  # λ at initialisation is near λ_init(l) = 0.8 − 0.6·exp(−0.3 l) (the exp terms nearly cancel).
  lam_init = 0.8 - 0.6 * np.exp(-0.3 * np.arange(4))
  np.testing.assert_allclose(np.asarray(layers["lambda"]).mean(-1), lam_init, atol=0.1)
  assert float(aux["losses"]["load_balance"]) >= 0.99  # E·Σ f·P is 1 at best balance


def test_ablation_variants_build_and_run(make_config):
  for overrides in ({"attention": "standard", "expert_conditional_lambda": False},
                    {"ffn": "dense", "expert_conditional_lambda": False},
                    {"moe.activation": "swiglu", "dtype": "bfloat16"}):
    cfg = make_config(**overrides)
    model, variables = _init(cfg)
    logits, _ = model.apply(variables, _tokens(6))
    assert logits.shape == (B, T, 64) and np.isfinite(np.asarray(logits)).all(), overrides


def _logical_names(boxed_params) -> set:
  names = set()
  for leaf in jax.tree.leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    names.update(n for n in leaf.names if n is not None)
  return names


def test_every_logical_axis_name_has_a_rule(base):
  cfg, model, params, variables = base
  rule_names = {rule[0] for rule in cfg.mesh.axis_rules}
  param_names = _logical_names(variables["params"])
  activation_names = set()
  real_constraint = nn.with_logical_constraint

  def record(x, axes, *args, **kwargs):
    activation_names.update(a for a in axes if a is not None)
    return real_constraint(x, axes, *args, **kwargs)

  with mock.patch.object(nn, "with_logical_constraint", record):
    jax.eval_shape(lambda p: model.apply({"params": p}, _tokens(7)), params)
  assert param_names and activation_names
  assert param_names | activation_names <= rule_names, (param_names | activation_names) - rule_names
  assert "layers" in param_names  # the scanned axis is named


def _checkpoint_names(jaxpr) -> set:
  names = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "name":
      names.add(eqn.params["name"])
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names |= _checkpoint_names(inner)
  return names


def test_every_remat_checkpoint_name_exists_in_the_model(make_config):
  """In the training gradient (the flash residuals are named in the attention's VJP forward), on the
  blockwise path."""
  cfg = make_config(attention_impl="blockwise")
  model, variables = _init(cfg)
  jaxpr = jax.make_jaxpr(jax.grad(lambda v: model.apply(v, _tokens(8))[0].sum()))(variables)
  assert set(config_lib.CHECKPOINT_NAMES) <= _checkpoint_names(jaxpr.jaxpr)


def test_save_names_policy_trains(make_config):
  cfg = make_config(remat_policy="save_names", remat_save_names=("attn_out", "ffn_out"))
  model, variables = _init(cfg)
  grads = jax.grad(lambda v: model.apply(v, _tokens(9))[0].sum())(variables)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def _count_pallas_calls(jaxpr, name: str) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call" and eqn.params["jaxpr"].debug_info.func_name == name:
      count += 1
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_pallas_calls(inner, name)
  return count


def test_saving_the_flash_residuals_skips_the_attention_forward_in_the_backward(make_config):
  """Full remat reruns each attention forward kernel for the backward, and so does "dots" (a kernel is no
  matmul); keeping "flash_residuals" does not, alone or besides the matmuls' outputs: the kernel appears half
  as often in the gradient, on one device and on a data 4 x tensor 2 mesh (where the kernel runs per shard
  inside shard_map)."""
  from diffmoe_jax import parallel
  tokens = jnp.zeros((8, 8), jnp.int32)
  for mesh_shape in (None, dict(data=4, tensor=2)):
    counts, variables = {}, None
    for policy, names in (("full", ()), ("save_names", ("flash_residuals",)), ("dots", ()),
                          ("dots+", ("flash_residuals",))):
      cfg = make_config(attention_impl="pallas", remat_policy=policy.rstrip("+"), remat_save_names=names,
                        num_layers=3)
      model = model_lib.build_model(cfg.model)
      variables = variables or nn.unbox(_init(cfg)[1])
      grad = jax.jit(jax.grad(lambda v, model=model: model.apply(v, tokens)[0].sum()))
      if mesh_shape is None:
        jaxpr = jax.make_jaxpr(grad)(variables)
      else:
        cfg.mesh.shape.update(mesh_shape)
        with jax.set_mesh(parallel.make_mesh(cfg.mesh)), nn.logical_axis_rules(parallel.axis_rules(cfg.mesh)):
          jaxpr = jax.make_jaxpr(grad)(variables)
      counts[policy] = _count_pallas_calls(jaxpr.jaxpr, "flash_multi_map_forward")
    assert counts["save_names"] > 0 and counts["full"] == counts["dots"] == 2 * counts["save_names"] == (
        2 * counts["dots+"]), (mesh_shape, counts)


def test_mod_off_equals_top_k_at_full_capacity(base):
  """Warmup (MoD off) and foundation (top-k at capacity 1) run the same function: one scaling rule."""
  _, model, params, _ = base
  tokens = _tokens(10)
  off, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, mod_mode="off"))(params)
  full, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, mod_mode="topk", mod_capacity=1.0))(params)
  np.testing.assert_allclose(np.asarray(off), np.asarray(full), rtol=1e-5, atol=1e-5)


def _routed_layer_and_params(cfg, x, positions):
  layer = model_lib.RoutedLayer(ml_collections.FrozenConfigDict(cfg.model), train=False, mod_mode="predictor")
  variables = layer.init({"params": jax.random.PRNGKey(3), "noise": jax.random.PRNGKey(4)}, x, positions,
                         jnp.asarray(1), 0.0)
  return layer, nn.unbox(variables)["params"]


def test_predictor_mode_runs_the_block_on_the_selected_tokens_alone(make_config):
  """A routed layer at inference equals running its block on the predictor's tokens only.

  Skipped tokens must take no MoE capacity and no attention slot, and evaluation must be dropless, so
  a token's output never depends on which other tokens the batch holds. Training uses a capacity factor
  small enough to drop assignments, which evaluation must not inherit.
  """
  cfg = make_config(**{"moe.capacity_factor": 0.5})
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(B, T, cfg.model.d_model)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  layer, params = _routed_layer_and_params(cfg, x, positions)
  out, _ = jax.jit(lambda p: layer.apply({"params": p}, x, positions, jnp.asarray(1), 0.0))(params)
  frozen = ml_collections.FrozenConfigDict(cfg.model)
  score, predictor_logit = MoDRouter(frozen).apply({"params": params["mod_router"]}, x)
  selected = np.asarray(predictor_logit > 0)
  assert 0 < selected.sum() < selected.size and not selected[:, 0].all(), "the test needs a mixed selection"
  block = model_lib.Block(frozen, train=False)
  for b in range(B):
    idx = np.flatnonzero(selected[b])
    delta, _ = block.apply({"params": params["block"]}, x[b:b + 1, idx], positions[b:b + 1, idx],
                           jnp.asarray(1), 0.0)
    want = np.asarray(x[b]).copy()
    want[idx] += np.asarray(jax.nn.sigmoid(score[b, idx])[:, None] * delta[0])
    np.testing.assert_allclose(np.asarray(out[b]), want, rtol=1e-5, atol=1e-5)


def test_predictor_mode_with_capacity_dispatch_gives_the_experts_the_slots_of_training(make_config):
  """model.moe.eval_dispatch="capacity": a routed layer at inference gives each expert the slots training
  gives it, from ceil(mod_capacity·T) tokens, not from all T (the skipped tokens take no slot but counted).
  With the predictor choosing as many tokens as training would, the layer equals its block run on those tokens
  alone, drops included."""
  cfg = make_config(**{"moe.capacity_factor": 0.5, "moe.eval_dispatch": "capacity"})
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(B, T, cfg.model.d_model)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  _, params = _routed_layer_and_params(cfg, x, positions)
  frozen = ml_collections.FrozenConfigDict(cfg.model)
  score, predictor_logit = MoDRouter(frozen).apply({"params": params["mod_router"]}, x)
  selected = np.asarray(predictor_logit > 0)
  block = model_lib.Block(frozen, train=False)
  dropped = []
  for b in range(B):
    idx = np.flatnonzero(selected[b])
    assert 0 < len(idx) < T, "the test needs a mixed selection"
    layer = model_lib.RoutedLayer(frozen, train=False, mod_mode="predictor", mod_capacity=len(idx) / T)
    out, _ = layer.apply({"params": params}, x[b:b + 1], positions[b:b + 1], jnp.asarray(1), 0.0)
    delta, stats = block.apply({"params": params["block"]}, x[b:b + 1, idx], positions[b:b + 1, idx],
                               jnp.asarray(1), 0.0)
    dropped.append(float(stats["dropped_fraction"]))
    want = np.asarray(x[b]).copy()
    want[idx] += np.asarray(jax.nn.sigmoid(score[b, idx])[:, None] * delta[0])
    np.testing.assert_allclose(np.asarray(out[0]), want, rtol=1e-5, atol=1e-5)
  assert max(dropped) > 0, "the test needs a capacity that drops assignments"
  # The slots are a fixed number, taken by earlier tokens first: the layer stays causal.
  layer = model_lib.RoutedLayer(frozen, train=False, mod_mode="predictor", mod_capacity=0.25)
  run = jax.jit(lambda inputs: layer.apply({"params": params}, inputs, positions, jnp.asarray(1), 0.0)[0])
  changed = x.at[:, -3:].set(jnp.asarray(rng.normal(size=(B, 3, cfg.model.d_model)), jnp.float32))
  np.testing.assert_allclose(run(changed)[:, :-3], run(x)[:, :-3], rtol=1e-6, atol=1e-6)


def test_topk_mode_runs_the_block_on_the_highest_scored_tokens_at_their_positions(make_config):
  """Training's routing: the ceil(capacity·T) best-scored tokens of a sequence (chosen here by NumPy) run
  the block among themselves at their own positions, scaled by sigmoid(score); the rest pass unchanged."""
  cfg = make_config()
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.normal(size=(B, T, cfg.model.d_model)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  _, params = _routed_layer_and_params(cfg, x, positions)
  frozen = ml_collections.FrozenConfigDict(cfg.model)
  layer = model_lib.RoutedLayer(frozen, train=False, mod_mode="topk", mod_capacity=0.25)
  out, stats = jax.jit(lambda p: layer.apply({"params": p}, x, positions, jnp.asarray(1), 0.0))(params)
  score, predictor_logit = MoDRouter(frozen).apply({"params": params["mod_router"]}, x)
  block = model_lib.Block(frozen, train=False)
  target = np.zeros((B, T), bool)
  for b in range(B):
    idx = np.sort(np.argsort(-np.asarray(score[b]), kind="stable")[:4])  # 0.25 · 16 tokens
    assert idx[-1] >= 4, "the test needs a selection other than the first tokens"
    target[b, idx] = True
    delta, _ = block.apply({"params": params["block"]}, x[b:b + 1, idx], positions[b:b + 1, idx],
                           jnp.asarray(1), 0.0)
    want = np.asarray(x[b]).copy()
    want[idx] += np.asarray(jax.nn.sigmoid(score[b, idx])[:, None] * delta[0])
    np.testing.assert_allclose(np.asarray(out[b]), want, rtol=1e-5, atol=1e-5)
  # The predictor learns the top-k choice: binary cross-entropy of its logits against it, and its accuracy.
  z = np.asarray(predictor_logit, np.float64)
  bce = np.logaddexp(0.0, z) - target * z
  np.testing.assert_allclose(float(stats["mod_predictor_loss"]), bce.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(stats["mod_predictor_accuracy"]), np.mean((z > 0) == target), rtol=1e-6)
  assert float(stats["mod_selected_fraction"]) == 0.25


@pytest.mark.parametrize("route_from,same", [("attention_input", True), ("ffn_input", False)])
def test_expert_conditional_lambda_follows_the_moe_routing(make_config, route_from, same):
  """route_from='attention_input': λ is mixed over exactly the experts the token's FFN runs (noise too)."""
  cfg = make_config(**{"moe.route_from": route_from, "moe.num_experts": 8})
  frozen = ml_collections.FrozenConfigDict(cfg.model)
  block = model_lib.Block(frozen, train=True)
  x = jnp.asarray(np.random.default_rng(12).normal(size=(B, T, cfg.model.d_model)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  rngs = {"params": jax.random.PRNGKey(5), "noise": jax.random.PRNGKey(6)}
  variables = block.init(rngs, x, positions, jnp.asarray(0), 1.0)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, Attention) and context.method_name == "__call__":
      seen["lambda_experts"] = np.asarray(kwargs["lambda_gate"][1])
    return next_fun(*args, **kwargs)

  real_moe_ffn = dispatch.moe_ffn
  def moe_ffn(x_, weights, experts, *args, **kwargs):
    seen["ffn_experts"] = np.asarray(experts)
    return real_moe_ffn(x_, weights, experts, *args, **kwargs)

  with nn.intercept_methods(record), mock.patch.object(dispatch, "moe_ffn", moe_ffn):
    block.apply(variables, x, positions, jnp.asarray(0), 1.0, rngs={"noise": jax.random.PRNGKey(7)})
  agree = np.mean(seen["lambda_experts"] == seen["ffn_experts"])
  assert (agree == 1.0) == same, agree


@pytest.mark.parametrize("tokens, extra, message", [
    (jnp.zeros((T,), jnp.int32), {}, r"tokens must be an integer array \[batch, length\]; got int32 \(16,\)"),
    (jnp.zeros((B, T), jnp.float32), {}, r"tokens must be an integer array \[batch, length\]; got float32"),
    (jnp.zeros((B, T), jnp.int32), {"positions": jnp.zeros((B, T - 3), jnp.int32)},
     r"positions must be an integer array shaped like tokens \(2, 16\); got int32 \(2, 13\)"),
    (jnp.zeros((B, T), jnp.int32), {"segment_ids": jnp.zeros((1, T), jnp.int32)},
     r"segment_ids must be an integer array shaped like tokens \(2, 16\); got int32 \(1, 16\)"),
])
def test_misshaped_inputs_name_the_array(base, tokens, extra, message):
  _, model, params, _ = base
  with pytest.raises(ValueError, match=message):
    model.apply({"params": params}, tokens, **extra)


def test_build_model_checks_the_model_section(make_config):
  """A library user's model section is checked as `validate` checks it: 2 heads x 24 is not a width of 40."""
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.d_model: 40 must equal model\.num_heads \* "
                                                   r"model\.head_dim = 2 \* 24 = 48"):
    model_lib.build_model(make_config(d_model=40).model)
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.remat_policy: 'some' is not one of"):
    model_lib.build_model(make_config(remat_policy="some").model)
