"""A test-sized run of the whole system: the paper's shape at d_model 48, all six phases in 24 steps.

Loaded by path, both in-process and by trainer subprocesses, so both compile identical programs.
"""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "train_test"
  c.model.update(vocab_size=256, d_model=48, num_layers=4, num_heads=2, head_dim=24, max_seq_len=32,
                 dtype="float32")
  c.model.moe.update(num_experts=4, expert_ffn_dim=64, top_k=2)
  c.model.mod.update(capacity=0.5, predictor_hidden=8)
  c.curriculum.total_steps = 24
  c.curriculum.tokens_per_batch = 256  # batches of 32, 16 and 8 sequences: multiples of 8 devices
  c.curriculum.mod_anneal_levels = 2
  c.curriculum.specialize.domain_weights = {"code": 0.7, "docs": 0.3}
  c.curriculum.anneal.domain_weights = {"code": 1.0}
  c.optimizer.peak_lr = 1e-2
  c.train.update(log_every=1, eval_every=12, eval_batches=1, eval_batch_size=8, checkpoint_every=12,
                 stable_rank_every=12, compilation_cache_dir="")
  return c
