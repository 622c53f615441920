"""A phase whose batch is a single sequence validates, starts and trains (the trainer end to end)."""
import numpy as np

from diffmoe_jax import main as main_lib
from test_train import load_config, read_tb, scalar_series


def test_a_phase_of_batch_one_trains(tmp_path):
  config = load_config()
  cur = config.curriculum
  cur.total_steps = 2
  cur.order = ("foundation",)
  cur.foundation.update(fraction=1.0, seq_len=16, batch_size=1)
  # One row cannot be split over devices: the batch is not sharded, every device holds it.
  config.mesh.axis_rules = tuple(("batch", None) if name == "batch" else (name, rule)
                                 for name, rule in config.mesh.axis_rules)
  config.train.update(eval_batch_size=1, eval_every=100, checkpoint_every=100)
  result = main_lib.run(config, str(tmp_path))
  assert result.final_step == 2 and result.stopped is None
  acc = read_tb(str(tmp_path))
  assert scalar_series(acc, "train/batch_size") == {1: 1.0, 2: 1.0}
  assert all(np.isfinite(list(scalar_series(acc, "train/loss").values())))
