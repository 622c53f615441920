"""NCAS Pareto point d_model 4608 (pi family): 60.2B parameters; written by python -m diffmoe_jax.ncas."""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "ncas_4608"
  c.model.update(d_model=4608, num_layers=54, num_heads=36,
                 head_dim=128, max_seq_len=32768)
  c.model.moe.update(num_experts=9, expert_ffn_dim=12288, top_k=2)
  c.curriculum.tokens_per_batch = 4194304
  # Steps and peak learning rate: those of the PI config nearest in width.
  c.curriculum.total_steps = 66_700
  c.optimizer.peak_lr = 0.0003
  # Weights, gradients and optimizer state shard over every device (FSDP), as in configs/pi.py.
  c.mesh.shape.update(data=1, fsdp=-1)
  return c
