"""The train step's pieces: which parameters decay, and how gradient accumulation splits the batch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from diffmoe_jax import parallel, validation
from diffmoe_jax.config import ConfigError
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train import state as state_lib
from diffmoe_jax.train import step as step_lib

ROUTING = {"router", "score", "predictor_hidden", "predictor_hidden_bias", "predictor_out"}
MATRICES = {"table", "lm_head", "wq", "wk", "wv", "wo", "w_in", "w_out", "w_gate"}


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
  dyn = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in step_lib.DYNAMIC_KEYS}
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
  dyn = {k: jnp.float32(0.0) for k in step_lib.DYNAMIC_KEYS}  # no router noise: the rng does not matter
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
