"""PI (flagship): the paper's table, first column. ~74B parameters as built; see README for the paper's ~54B."""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "pi"
  c.model.update(d_model=4608, num_layers=54, num_heads=36, head_dim=128, max_seq_len=32768)
  c.model.moe.update(num_experts=9, expert_ffn_dim=15360, top_k=2)
  c.curriculum.tokens_per_batch = 4 * 1024 * 1024
  # The paper's "total training compute ... approximately 3.2 × 10²² FLOPs": 66,700 steps of 4M tokens
  # through the curriculum cost 3.20e22 (280B tokens; `python -m diffmoe_jax.estimate`).
  c.curriculum.total_steps = 66_700
  c.optimizer.peak_lr = 3e-4
  # Weights, gradients and optimizer state shard over every device (FSDP); the batch splits the same way.
  c.mesh.shape.update(data=1, fsdp=-1)
  return c
