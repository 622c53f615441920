"""Mesh and rules that cannot split a dimension fail before anything is compiled, naming what and why."""
import jax
import pytest

from diffmoe_jax import estimate, parallel
from diffmoe_jax.config import ConfigError, validate
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train import state as state_lib


@pytest.mark.parametrize("model,mesh,message", [
    # d_model 60 = 3 heads x 20 over fsdp=8: every weight's "embed" axis.
    ({"d_model": 60, "num_heads": 3, "head_dim": 20}, {"data": 1, "fsdp": 8},
     r"params/embed/table has its 'embed' axis of size 60 split over mesh fsdp=8, 8 ways, which does not "
     r"divide 60"),
    # Expert FFN width 30 over tensor=4 (the 4 heads divide; the hidden units do not).
    ({"d_model": 64, "num_heads": 4, "head_dim": 16, "moe.expert_ffn_dim": 30}, {"data": 2, "tensor": 4},
     r"w_in has its 'mlp' axis of size 30 split over mesh tensor=4, 4 ways"),
])
def test_a_mesh_that_cannot_split_a_dimension_is_named(make_config, model, mesh, message):
  config = make_config(**model)
  config.curriculum.tokens_per_batch = 512
  config.mesh.shape.update(mesh)
  validate(config)
  with pytest.raises(ConfigError, match=message):  # the memory preflight, before anything is built
    estimate.training_memory_per_device(config, parallel.mesh_shape(config.mesh, 8))
  net = model_lib.build_model(config.model)
  with pytest.raises(ConfigError, match=message):  # and the trainer's state, before compiling
    state_lib.create_state(net, state_lib.make_optimizer(config.optimizer), parallel.make_mesh(config.mesh),
                           parallel.axis_rules(config.mesh), seed=0, seq_len=8)
  assert len(jax.devices()) == 8
