"""Dynamic loss scaling of float16 training (train/step.py, state.LossScale), against float32 gradients."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffmoe_jax import config as config_lib
from diffmoe_jax import parallel, validation
from diffmoe_jax.config import ConfigError
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train import checkpoint, resume, state as state_lib, step as step_lib

CONFIG_PATH = os.path.join(os.path.dirname(__file__), "train_config.py")
# An optimizer whose state is the last gradient it was given: a step's gradients, read off the new state.
KEEP_GRADS = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))
# Load balancing is a product of batch means, not additive over micro-batches: off, so accumulation is exact.
DYN = {k: jnp.float32(v) for k, v in {"lr": 1e-3, "router_noise": 0.0, "load_balance_weight": 0.0,
                                      "z_loss_weight": 1e-3, "mod_predictor_weight": 1e-2}.items()}
TINY = 2.0**-24  # float16's smallest subnormal
GROWTH_INTERVAL = 2


def tiny_config(dtype):
  config = config_lib.load_file(CONFIG_PATH)
  config.model.update(dtype=dtype, num_layers=1, remat_policy="none")
  config.model.mod.enabled = False
  return config


@pytest.fixture(scope="module")
def setup():
  """(params whose gradients below the head fall under float16's range, a batch, {dtype: (model, state)})."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 9)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  models, params = {}, None
  for dtype in ("float32", "float16"):
    model = model_lib.build_model(tiny_config(dtype).model)
    state = jax.jit(lambda r, m=model: nn.unbox(state_lib.init_fn(m, KEEP_GRADS, 8)(r)))(jax.random.PRNGKey(0))
    if params is None:  # the same float32 weights for both; the output head scaled down 10^4, and with it
      params = {**state.params, "lm_head": state.params["lm_head"] * 1e-4}  # every gradient below the head
    models[dtype] = (model, state.replace(params=params))
  return params, batch, models


@pytest.fixture(scope="module")
def steps(setup):
  """{(dtype, grad_accum_steps, loss_scale_min): the jitted train step}, compiled on first use."""
  _, _, models = setup
  cache = {}

  def get(dtype, accum=1, minimum=1.0):
    if (dtype, accum, minimum) not in cache:
      cache[dtype, accum, minimum] = jax.jit(step_lib.make_train_step(
          models[dtype][0], KEEP_GRADS, mod_mode="topk", mod_capacity=0.5, grad_accum_steps=accum,
          loss_scale_growth_interval=GROWTH_INTERVAL, loss_scale_min=minimum))
    return cache[dtype, accum, minimum]
  return get


def with_scale(state, scale, good_steps=0):
  return state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(scale),
                                                           good_steps=jnp.int32(good_steps)))


def leaf_errors(got, want):
  """{parameter path: |got - want| / |want|} (norms over each array)."""
  return {jax.tree_util.keystr(p): float(np.linalg.norm(np.asarray(g) - np.asarray(w)) / np.linalg.norm(w))
          for (p, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got))}


@pytest.fixture(scope="module")
def float32_grads(setup, steps):
  _, batch, models = setup
  return steps("float32")(models["float32"][1], batch, DYN)[0].opt_state


@pytest.mark.parametrize("accum", [1, 2])
def test_scaled_float16_gradients_match_float32_where_unscaled_ones_flush_to_zero(setup, steps, float32_grads,
                                                                                   accum):
  """The float32 gradients below float16's range are zero in float16 without a loss scale, and match the
  float32 ones with it, as far as float16 compute allows (its rounding moves every gradient ~1%)."""
  _, batch, models = setup
  state = models["float16"][1]
  want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(float32_grads)])
  tiny = (want != 0) & (np.abs(want) < TINY)
  assert tiny.sum() > 10_000  # the premise: many true gradients lie below float16's smallest subnormal
  fn = steps("float16", accum)
  if accum == 1:  # a loss scale of 1 is no scaling (x 1.0 and / 1.0 are exact in float32)
    unscaled = fn(with_scale(state, 1.0), batch, DYN)[0].opt_state
    flushed = np.concatenate([np.ravel(x) for x in jax.tree.leaves(unscaled)])[tiny] == 0
    assert flushed.mean() > 0.3, flushed.mean()
    assert max(leaf_errors(unscaled, float32_grads).values()) > 0.9  # a whole array's gradient is lost
  after, metrics = fn(state, batch, DYN)
  assert float(after.loss_scale.scale) == float(metrics["loss_scale"]) == 2.0**15  # the default start
  assert int(metrics["update_skipped"]) == int(metrics["overflow_skipped"]) == 0
  got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(after.opt_state)])
  assert np.count_nonzero(got[tiny] == 0) <= 0.001 * tiny.sum()
  errors = leaf_errors(after.opt_state, float32_grads)
  assert max(errors.values()) < 0.06, {k: v for k, v in errors.items() if v >= 0.06}


def test_an_overflow_skips_the_update_halves_the_scale_and_is_not_counted_as_nonfinite(setup, steps):
  _, batch, models = setup
  state = with_scale(models["float16"][1], 2.0**120, good_steps=1)  # the scaled float16 gradients overflow
  after, metrics = steps("float16")(state, batch, DYN)
  jax.tree.map(np.testing.assert_array_equal, after.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, state.opt_state)
  assert float(after.loss_scale.scale) == 2.0**119 and int(after.loss_scale.good_steps) == 0
  assert int(after.loss_scale.overflow_total) == int(metrics["overflow_total"]) == 1
  assert int(metrics["update_skipped"]) == int(metrics["overflow_skipped"]) == 1
  assert int(after.nonfinite_total) == int(after.nonfinite_streak) == 0 and int(after.step) == 1


def test_at_the_floor_an_overflow_counts_as_nonfinite(setup, steps):
  _, batch, models = setup
  state = with_scale(models["float16"][1], 2.0**120)
  after, metrics = steps("float16", minimum=2.0**120)(state, batch, DYN)
  jax.tree.map(np.testing.assert_array_equal, after.params, state.params)
  assert float(after.loss_scale.scale) == 2.0**120 and int(after.loss_scale.overflow_total) == 0
  assert int(metrics["overflow_skipped"]) == 0 and int(metrics["update_skipped"]) == 1
  assert int(after.nonfinite_total) == int(after.nonfinite_streak) == 1


def test_an_overflow_above_the_floor_halves_the_scale_no_lower_than_the_floor(setup, steps):
  """1.5 x the floor halved would be 0.75 x it: the scale stops at the floor (halving past it passed every test, whose
  scales were powers of two landing on the floor exactly)."""
  _, batch, models = setup
  state = with_scale(models["float16"][1], 1.5 * 2.0**120)
  after, metrics = steps("float16", minimum=2.0**120)(state, batch, DYN)  # the step the floor test compiled
  jax.tree.map(np.testing.assert_array_equal, after.params, state.params)
  assert float(after.loss_scale.scale) == 2.0**120 and int(after.loss_scale.overflow_total) == 1
  assert int(metrics["overflow_skipped"]) == int(metrics["update_skipped"]) == 1 and int(after.nonfinite_total) == 0


def test_a_nonfinite_loss_is_counted_and_leaves_the_scale(setup, steps):
  """A forward that is not finite is no overflow of the scaled gradients: halving the scale would not help."""
  _, batch, models = setup
  state = models["float16"][1]
  after, metrics = steps("float16")(state, batch, {**DYN, "router_noise": jnp.float32(np.nan)})
  jax.tree.map(np.testing.assert_array_equal, after.params, state.params)
  assert float(after.loss_scale.scale) == 2.0**15 and int(after.loss_scale.overflow_total) == 0
  assert int(after.nonfinite_total) == int(after.nonfinite_streak) == 1


def test_the_scale_doubles_after_the_growth_interval_of_finite_steps(setup, steps):
  _, batch, models = setup
  state, fn = with_scale(models["float16"][1], 2.0**10), steps("float16")
  scales = []
  for _ in range(2 * GROWTH_INTERVAL):
    state, _ = fn(state, batch, DYN)
    scales.append((float(state.loss_scale.scale), int(state.loss_scale.good_steps)))
  assert scales == [(2.0**10, 1), (2.0**11, 0), (2.0**11, 1), (2.0**12, 0)]
  assert int(state.nonfinite_total) == 0


def test_the_scale_starts_at_its_init_and_is_checkpointed_and_restored(setup, tmp_path):
  """The state the trainer restores onto (create_state's abstract state, sharded over the mesh) gets the loss
  scale back."""
  _, _, models = setup
  model, state = models["float16"]
  init = state_lib.init_fn(model, KEEP_GRADS, 8, loss_scale_init=2.0**9)
  assert float(jax.jit(lambda r: init(r).loss_scale.scale)(jax.random.PRNGKey(0))) == 2.0**9
  config = tiny_config("float16")
  mesh, rules = parallel.make_mesh(config.mesh), parallel.axis_rules(config.mesh)
  abstract, _, _ = state_lib.create_state(model, KEEP_GRADS, mesh, rules, seed=0, seq_len=8)
  state = state.replace(loss_scale=state_lib.LossScale(scale=jnp.float32(2.0**21), good_steps=jnp.int32(7),
                                                       overflow_total=jnp.int32(3)))
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(5, state)
  restored, step = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 5
  assert (float(restored.loss_scale.scale), int(restored.loss_scale.good_steps),
          int(restored.loss_scale.overflow_total)) == (2.0**21, 7, 3)


@pytest.mark.parametrize("saved, resumed", [("float16", "float32"), ("float32", "float16")])
def test_a_checkpoint_resumes_with_model_dtype_changed_to_or_from_float16(setup, tmp_path, saved, resumed):
  """The way out that a run stopped for non-finite updates names (model.dtype, allowed as a change): the loss
  scale is dropped, or starts at train.loss_scale_init; the rest of the state is the saved one."""
  _, _, models = setup
  model, state = models[saved]
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, state.replace(step=jnp.int32(3)), tiny_config(saved))
  config = tiny_config(resumed)
  config.train.update(allow_config_change="model.dtype", loss_scale_init=2.0**9)
  mesh, rules = parallel.make_mesh(config.mesh), parallel.axis_rules(config.mesh)
  abstract, _, _ = state_lib.create_state(models[resumed][0], KEEP_GRADS, mesh, rules, seed=0, seq_len=8)
  restored, step, _ = resume.restore_or_init(ckpt, config, abstract, make_state=None)
  ckpt.close()
  assert step == int(restored.step) == 3
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  if resumed == "float16":
    assert (float(restored.loss_scale.scale), int(restored.loss_scale.good_steps)) == (2.0**9, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_only_float16_states_have_a_loss_scale(setup, dtype):
  """Other dtypes keep the state's layout of before loss scaling, so their checkpoints restore as they were."""
  model = model_lib.build_model(tiny_config(dtype).model)
  shapes = jax.eval_shape(lambda r: nn.unbox(state_lib.init_fn(model, KEEP_GRADS, 8)(r)), jax.random.PRNGKey(0))
  fields = {str(path[0].name) for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  before = {"step", "params", "opt_state", "rng", "nonfinite_total", "nonfinite_streak"}
  assert fields == (before | {"loss_scale"} if dtype == "float16" else before)


@pytest.mark.parametrize("field, value, message", [
    ("loss_scale_min", 0.0, r"config\.train\.loss_scale_min: the float16 loss scale must lie in float32's normal "
                            r"range \[2\*\*-126, 2\*\*127\], got 0\.0\."),
    ("loss_scale_init", 0.5, r"config\.train\.loss_scale_init: 0\.5 is below train\.loss_scale_min \(1\.0\), the "
                             r"loss scale's floor; raise it or lower loss_scale_min\."),
    ("loss_scale_init", 1e39, r"config\.train\.loss_scale_init: .*got 1e\+39\."),
    ("loss_scale_growth_interval", 0, r"config\.train\.loss_scale_growth_interval: must be an integer >= 1"),
])
def test_bad_loss_scale_fields_are_refused(field, value, message):
  config = tiny_config("float16")
  config.train[field] = value
  with pytest.raises(ConfigError, match=f"^{message}"):
    validation.validate(config)
