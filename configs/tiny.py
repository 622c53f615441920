"""The embedded default: the paper's shape at a few million parameters, trained on the built-in corpus.

3-smooth width 288 = 4 differential heads x 72, 4 experts top-2 with FFN 768, MoD on every other layer,
byte tokenizer, the six-phase curriculum. Trains on 2 CPU cores in a few minutes.
"""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "tiny"
  c.model.update(vocab_size=256, d_model=288, num_layers=4, num_heads=4, head_dim=72, max_seq_len=256,
                 dtype="float32")
  c.model.moe.update(num_experts=4, expert_ffn_dim=768, top_k=2)
  c.model.mod.capacity = 0.25
  c.data.tokenizer = "bytes"
  c.curriculum.tokens_per_batch = 8 * 256
  c.curriculum.total_steps = 400
  c.curriculum.mod_anneal_levels = 2  # fewer distinct programs: each costs a compile on a small CPU
  c.curriculum.specialize.domain_weights = {"code": 0.7, "docs": 0.3}
  c.curriculum.anneal.domain_weights = {"code": 1.0}
  c.optimizer.peak_lr = 3e-3
  c.train.update(log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100, stable_rank_every=100)
  return c
