"""The trainer's guards: non-finite updates skipped, counted and stopped on; configs and data refused before
training starts."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax import data
from diffmoe_jax import main as main_lib
from diffmoe_jax.config import ConfigError
from diffmoe_jax.train import checkpoint, loop
from diffmoe_jax.train import step as step_lib
from diffmoe_jax.train import workdir as workdir_lib
from diffmoe_jax.train.workdir import WorkdirError
from test_train import _abstract_state, _fresh_state, load_config, read_tb, scalar_series


def test_nonfinite_update_is_skipped_and_counted():
  model, optimizer, state, batch = _fresh_state(load_config(), seed=0, length=8)
  fn = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5))
  dyn = {"lr": 1e-3, "router_noise": 0.0, "load_balance_weight": 0.01, "z_loss_weight": 0.001,
         "mod_predictor_weight": 0.01}
  poisoned = {**dyn, "router_noise": float("nan")}  # NaN router logits: a non-finite loss and gradient
  after, metrics = fn(state, batch, {k: jnp.float32(v) for k, v in poisoned.items()})
  assert int(metrics["update_skipped"]) == 1 and int(after.nonfinite_total) == 1 and int(after.step) == 1
  jax.tree.map(np.testing.assert_array_equal, after.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, state.opt_state)
  good, metrics = fn(after, batch, {k: jnp.float32(v) for k, v in dyn.items()})
  assert int(metrics["update_skipped"]) == 0 and int(good.nonfinite_streak) == 0
  assert int(good.nonfinite_total) == 1
  assert not np.array_equal(np.asarray(good.params["embed"]["table"]), np.asarray(state.params["embed"]["table"]))


def test_a_run_of_nonfinite_updates_stops_with_the_last_good_state(tmp_path):
  config = load_config()
  config.optimizer.peak_lr = float("inf")  # every update non-finite
  config.train.max_nonfinite_in_a_row = 3
  config.train.checkpoint_every = 2
  # The streak is read one step late (each step's metrics are fetched after the next is dispatched), so the state
  # saved is a step later; the message gives the streak and step read (it read the later state's streak, 0 when
  # that step's update was finite).
  with pytest.raises(loop.TrainingStopped, match=r"^3 non-finite updates in a row up to step 3 \(train\."
                     r"max_nonfinite_in_a_row is 3\).* Change optimizer\.peak_lr \(lower\), optimizer\.grad_clip "
                     r"and rerun to resume, allowing the change with --config\.train\.allow_config_change=<field>\.$"):
    loop.train(config, str(tmp_path))  # (not validated here: a config file's peak_lr of inf is refused)
  ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"))
  # No periodic save while updates are skipped (rotation would drop older, good checkpoints for them).
  assert ckpt.all_steps() == [4]
  state, step = ckpt.restore_latest(_abstract_state(config))
  assert int(state.nonfinite_total) == step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  # TensorBoard's count ends at the saved state's.
  totals = scalar_series(read_tb(str(tmp_path)), "train/nonfinite_total")
  assert totals[max(totals)] == 4 and max(totals) == step


def test_a_batch_the_mesh_cannot_split_is_refused_before_the_data_and_the_workdir(tmp_path):
  config = load_config()
  config.curriculum.tokens_per_batch = 128  # long_context: 4 sequences over 8 devices
  with pytest.raises(ConfigError, match=r"config\.curriculum\.long_context: its batch of 4 sequences is not a "
                     r"multiple of the mesh's data-parallel size \(8\)"):
    main_lib.run(config, str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new")


def test_vocabulary_smaller_than_the_tokenizer(tmp_path):
  config = load_config()
  config.model.vocab_size = 100
  with pytest.raises(ConfigError, match=r"model\.vocab_size \(100\) is smaller than the tokenizer's vocabulary"):
    loop.train(config, str(tmp_path))


LONG_TEXT = "a text long enough for one window of thirty-three tokens\n"
SHORT_TEXT = "sixteen bytes..\n"  # and the separator: 17 tokens


@pytest.mark.parametrize("val_text, train_text, message", [
    (LONG_TEXT, SHORT_TEXT,
     r"^phase long_context \(seq_len 32 from curriculum\.long_context\.context_fraction x model\.max_seq_len, "
     r"batch 8 from curriculum\.tokens_per_batch / seq_len\): domain 'small': its train split has 17 tokens, "
     r"fewer than one window of seq_len \+ 1 = 33"),
    (SHORT_TEXT, LONG_TEXT,
     r"^evaluation \(seq_len 32 from model\.max_seq_len\): domain 'small': its validation split has 17 tokens"),
], ids=["train", "validation"])
def test_a_domain_too_small_for_a_later_phase_fails_before_training(tmp_path, val_text, train_text, message):
  """A domain of 17 train tokens serves the phases of 8 and 16 tokens but no window of long_context's 32: the
  run must stop at start, naming the phase and where its length comes from, not after training the phases
  before it. The same for evaluation's length."""
  small = tmp_path / "small"
  small.mkdir()
  (small / "a.txt").write_text(val_text)  # a.txt's path hashes lower: the validation file (data/split.py)
  (small / "b.txt").write_text(train_text)
  config = load_config()
  # The domains are split together, so each is cached with the others' files: repository files build in a
  # second, where the built-in corpus would be built again for each `small`.
  repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config.data.domains.update(code=f"files:{repository}/diffmoe_jax/**/*.py", docs=f"files:{repository}/tests/*.py",
                             small=f"files:{small}/*.txt")
  with pytest.raises(data.DataError, match=message):
    main_lib.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # the workdir it created, and then locked, is removed


def test_a_run_interrupted_before_its_first_step_leaves_no_workdir_behind(tmp_path, monkeypatch):
  """A Ctrl-C while the first step compiles came after the TensorBoard file (holding the config's text) and the
  checkpoints directory were made: the workdir the run created stayed behind, though it saved nothing."""
  def interrupted(*args, **kwargs):
    assert os.listdir(tmp_path / "new" / "run" / "tb") and os.path.isdir(tmp_path / "new" / "run" / "checkpoints")
    raise KeyboardInterrupt

  monkeypatch.setattr(step_lib, "config_train_step", interrupted)
  with pytest.raises(KeyboardInterrupt):
    main_lib.run(load_config(), str(tmp_path / "new" / "run"))
  assert not os.path.exists(tmp_path / "new")  # nor the directory it created to hold it


def test_a_workdir_holding_a_logged_step_or_a_checkpoint_is_not_taken_for_unused(tmp_path):
  from diffmoe_jax.train import metrics
  (tmp_path / "checkpoints").mkdir()
  writer = metrics.MetricWriter(tmp_path / "tb")
  writer.mark_start(0)
  writer.text(0, "config", "{}")
  assert workdir_lib.saved_nothing(str(tmp_path))
  writer.scalars(1, {"train/loss": 3.0})  # a run that trained without saving a checkpoint
  assert not workdir_lib.saved_nothing(str(tmp_path))
  writer.close()
  for name in os.listdir(tmp_path / "tb"):
    os.remove(tmp_path / "tb" / name)
  (tmp_path / "checkpoints" / "3").mkdir()
  assert not workdir_lib.saved_nothing(str(tmp_path))


@pytest.mark.parametrize("layout, holds", [("proxies/pi_2304/checkpoints", "an NCAS search"),
                                           ("full/seed0/checkpoints", "an ablation")])
def test_a_workdir_holding_another_commands_runs_is_refused(tmp_path, layout, holds):
  """Trained into a search's or an ablation's workdir, a run wrote its checkpoints beside their runs, and evaluate
  then read that run for the ablation's."""
  os.makedirs(tmp_path / layout)
  with pytest.raises(WorkdirError, match=re.escape(f"The workdir {tmp_path} holds {holds}, not a training run; "
                                                   "pass another --workdir.")):
    main_lib.run(load_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [layout.split("/")[0]]
