"""NCAS Pareto point d_model 3456 (pi family): 15.9B parameters; written by python -m diffmoe_jax.ncas."""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "ncas_3456"
  c.model.update(d_model=3456, num_layers=36, num_heads=27,
                 head_dim=128, max_seq_len=16384)
  c.model.moe.update(num_experts=6, expert_ffn_dim=9216, top_k=2)
  c.curriculum.tokens_per_batch = 2097152
  # Steps and peak learning rate: those of the PI config nearest in width.
  c.curriculum.total_steps = 100_000
  c.optimizer.peak_lr = 0.0004
  # Weights, gradients and optimizer state shard over every device (FSDP), as in configs/pi.py.
  c.mesh.shape.update(data=1, fsdp=-1)
  return c
