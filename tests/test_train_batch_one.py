"""A phase whose batch is a single sequence validates, starts and trains (the trainer end to end)."""
import numpy as np

from diffmoe_jax import main as main_lib
from test_train import load_config, read_tb, scalar_series


def test_a_phase_of_batch_one_trains(tmp_path):
  config = load_config()
  cur = config.curriculum
  cur.total_steps = 3
  cur.order = ("warmup", "foundation")
  cur.warmup.update(fraction=0.0, steps=1, seq_len=16, batch_size=2)
  cur.foundation.update(fraction=1.0, seq_len=16, batch_size=1)  # the batch of one starts at step 1
  # Batch rows are not split over devices (one row cannot be): every device holds the whole batch.
  config.mesh.axis_rules = tuple(("batch", None) if name == "batch" else (name, rule)
                                 for name, rule in config.mesh.axis_rules)
  config.train.update(eval_batch_size=1, eval_every=100, checkpoint_every=100)
  result = main_lib.run(config, str(tmp_path))
  assert result.final_step == 3 and result.stopped is None
  batch_sizes = scalar_series(read_tb(str(tmp_path)), "train/batch_size")
  assert batch_sizes == {1: 2.0, 2: 1.0, 3: 1.0}
  losses = scalar_series(read_tb(str(tmp_path)), "train/loss")
  assert all(np.isfinite(list(losses.values())))
