"""The ablation table at proxy scale (`python -m diffmoe_jax.ablate`): a model smaller than tiny, all arms.

Width 144 = 4 differential heads x 36 (3-smooth, 2^4 * 3^2); its power-of-two arm is 128, the same ratio
as the paper's 4608 to 4096. 4 layers, 4 experts top-2 with FFN 384, MoD on every other layer at 0.25,
context 128, the six-phase curriculum in 160 steps of 1024 tokens, two seeds. Sized so all eight arms
train in well under an hour on 2 CPU cores, most of it compiling each arm's programs.
"""
import ml_collections

from diffmoe_jax import config as config_lib

ARMS = "full,power_of_two,standard_attention,no_mod,rope_10000,dense_ffn,lambda_per_layer,differential_v2"


def get_config():
  c = config_lib.defaults()
  c.name = "ablation"
  c.model.update(vocab_size=256, d_model=144, num_layers=4, num_heads=4, head_dim=36, max_seq_len=128,
                 dtype="float32")
  c.model.moe.update(num_experts=4, expert_ffn_dim=384, top_k=2)
  c.model.mod.update(capacity=0.25, predictor_hidden=32)
  c.data.tokenizer = "bytes"
  c.curriculum.tokens_per_batch = 8 * 128
  c.curriculum.total_steps = 160
  c.curriculum.mod_anneal_levels = 2  # fewer distinct programs: each costs a compile on a small CPU
  c.curriculum.specialize.domain_weights = {"code": 0.7, "docs": 0.3}
  c.curriculum.anneal.domain_weights = {"code": 1.0}
  c.optimizer.peak_lr = 3e-3
  c.train.update(log_every=10, eval_every=40, eval_batches=4, checkpoint_every=160, keep_checkpoints=1,
                 stable_rank_every=20)
  c.ablation = ml_collections.ConfigDict({"arms": ARMS, "seeds": 2})
  return c
