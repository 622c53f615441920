"""PI-P (pocket): the paper's table, third column. 27 layers: 13 [full, routed] groups and one full layer."""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "pi_p"
  c.model.update(d_model=2592, num_layers=27, num_heads=18, head_dim=144, max_seq_len=8192)
  c.model.moe.update(num_experts=4, expert_ffn_dim=6912, top_k=2)
  c.curriculum.tokens_per_batch = 1024 * 1024
  c.curriculum.total_steps = 100_000
  c.optimizer.peak_lr = 6e-4
  # Weights, gradients and optimizer state shard over every device (FSDP); the batch splits the same way.
  c.mesh.shape.update(data=1, fsdp=-1)
  return c
