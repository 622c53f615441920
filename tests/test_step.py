"""The train step's pieces: which parameters decay, and how gradient accumulation splits the batch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from diffmoe_jax import parallel
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
