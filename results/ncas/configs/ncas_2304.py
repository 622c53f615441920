"""NCAS Pareto point d_model 2304 (pi family): 3.9B parameters; written by python -m diffmoe_jax.ncas."""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "ncas_2304"
  c.model.update(d_model=2304, num_layers=27, num_heads=18,
                 head_dim=128, max_seq_len=8192)
  c.model.moe.update(num_experts=4, expert_ffn_dim=6144, top_k=2)
  c.curriculum.tokens_per_batch = 1048576
  # Steps and peak learning rate: those of the PI config nearest in width.
  c.curriculum.total_steps = 100_000
  c.optimizer.peak_lr = 0.0006
  # Weights, gradients and optimizer state shard over every device (FSDP), as in configs/pi.py.
  c.mesh.shape.update(data=1, fsdp=-1)
  return c
