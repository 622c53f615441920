"""PI-S (standard): the paper's table, second column. 27 differential heads of value width 128."""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "pi_s"
  c.model.update(d_model=3456, num_layers=36, num_heads=27, head_dim=128, max_seq_len=16384)
  c.model.moe.update(num_experts=6, expert_ffn_dim=10240, top_k=2)
  c.curriculum.tokens_per_batch = 2 * 1024 * 1024
  c.curriculum.total_steps = 100_000
  c.optimizer.peak_lr = 4e-4
  # Weights, gradients and optimizer state shard over every device (FSDP); the batch splits the same way.
  c.mesh.shape.update(data=1, fsdp=-1)
  return c
