"""Checkpointer: round trip of a train-state-shaped pytree, retention, damaged checkpoints, re-sharding."""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from diffmoe_jax.train.checkpoint import Checkpointer, CheckpointError, fingerprint


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array
  tokens_seen: jax.Array


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))


def make_state(seed=0):
  """A train state like the trainer's, one optimizer update in (so the moments and count are nonzero)."""
  # NumPy draws and one jitted update: eager jax ops each compile, which would dominate the run time.
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  params = {
      "embed": {"table": normal(16, 8)},
      "layers": {"attn": {"wq": normal(2, 8, 2, 4)}, "moe": {"w_in": normal(2, 4, 8, 16), "router": normal(8, 4)}},
  }
  _, opt_state = jax.jit(TX.update)(params, TX.init(params), params)
  return State(step=jnp.array(1, jnp.int32), params=params, opt_state=opt_state, rng=jax.random.PRNGKey(seed),
               tokens_seen=jnp.array(4096, jnp.int32))


def abstract(state, sharding_of=lambda x: x.sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), state)


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def damage(directory, step):
  """Deletes every file inside the step's directory, leaving the directories."""
  for root, _, files in os.walk(os.path.join(directory, str(step))):
    for name in files:
      os.remove(os.path.join(root, name))


@pytest.fixture(scope="module")
def state():
  return make_state()


def test_round_trip_with_config(tmp_path, state):
  config = ml_collections.ConfigDict({"model": {"d_model": 8, "attention": "differential"}, "seed": 3})
  ckpt = Checkpointer(tmp_path, async_save=False)
  assert ckpt.restore_latest(abstract(state)) is None and ckpt.latest_step is None
  assert ckpt.save(7, state, config)
  restored, step = ckpt.restore_latest(abstract(state))
  assert step == 7 and ckpt.latest_step == 7 and ckpt.all_steps() == [7]
  assert_same(restored, state)
  assert restored.rng.dtype == jnp.uint32
  assert ckpt.restore_config() == config.to_dict() == ckpt.restore_config(7)
  later = ml_collections.ConfigDict({"model": {"d_model": 8, "attention": "differential"}, "seed": 4})
  assert ckpt.save(9, state, later)
  assert ckpt.restore_config() == later.to_dict() and ckpt.restore_config(7) == config.to_dict()  # the latest's
  ckpt.close()


def test_config_errors(tmp_path, state):
  ckpt = Checkpointer(tmp_path, async_save=False)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    ckpt.restore_config()
  with pytest.raises(TypeError, match="cannot be saved as JSON"):
    ckpt.save(1, state, {"dtype": jnp.float32})
  ckpt.save(1, state)
  with pytest.raises(FileNotFoundError, match="config=None"):
    ckpt.restore_config(1)
  ckpt.close()


def test_keeps_last_k(tmp_path, state):
  ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
  for step in (1, 2, 3, 4):
    ckpt.save(step, state)
  assert ckpt.all_steps() == [3, 4]
  assert sorted(os.listdir(tmp_path)) == ["3", "4"]
  ckpt.close()


def test_the_trainer_removes_a_save_its_killed_predecessor_left_partial(tmp_path, state):
  """A process killed while saving step 2 left its partial directory, as large as a checkpoint. A reader
  (evaluate) leaves it, since it may be a save in progress; the run that owns the directory removes it."""
  Checkpointer(tmp_path, async_save=False).save(1, state)
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234"
  shutil.copytree(tmp_path / "1", partial)
  reader = Checkpointer(tmp_path, async_save=False)
  assert reader.all_steps() == [1]
  reader.close()
  assert partial.exists()
  trainer = Checkpointer(tmp_path, async_save=False, remove_partial_saves=True)
  assert trainer.save(3, state)
  trainer.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "3"]


def test_saving_an_existing_step_is_skipped(tmp_path, state):
  ckpt = Checkpointer(tmp_path)
  assert ckpt.save(5, state)
  other = make_state(seed=1)
  assert not ckpt.save(5, other)
  assert not ckpt.save(5, other, force=True)
  ckpt.wait()
  assert_same(ckpt.restore_latest(abstract(state))[0], state)
  ckpt.close()


def test_force_saves_an_older_step(tmp_path, state):
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, state)
  assert not ckpt.save(3, state)
  assert ckpt.save(3, state, force=True)
  assert ckpt.all_steps() == [3, 5]
  ckpt.close()


def test_damaged_latest_falls_back_and_is_replaced_when_saved_again(tmp_path, state, caplog):
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  newer = make_state(seed=1)
  ckpt.save(2, newer)
  damage(tmp_path, 2)
  with caplog.at_level(logging.WARNING, logger="diffmoe_jax.train.checkpoint"):
    restored, step = ckpt.restore_latest(abstract(state))
  assert step == 1
  assert_same(restored, state)
  assert "step 2" in caplog.text
  # The run redoes step 2 from step 1; saving it replaces the unreadable copy.
  assert ckpt.save(2, newer)
  restored, step = ckpt.restore_latest(abstract(state))
  assert step == 2
  assert_same(restored, newer)
  ckpt.close()


def test_steps_before_a_damaged_newer_one_are_saved_after_falling_back(tmp_path, state):
  """Fallen back from a damaged step 24 to step 12, a run saving every 5 steps (another interval than the damaged
  run's) saves 15 and 20: Orbax skipped every step not newer than 24, silently, so a run killed before step 24
  went back to 12 again."""
  ckpt = Checkpointer(tmp_path, keep=5, async_save=False)
  ckpt.save(12, state)
  ckpt.save(24, state)
  damage(tmp_path, 24)
  assert ckpt.restore_latest(abstract(state))[1] == 12
  assert ckpt.save(15, state) and ckpt.save(20, state)
  assert ckpt.all_steps() == [12, 15, 20, 24]
  ckpt.close()


def test_an_unreadable_step_that_rotation_removed_is_saved_again(tmp_path, state):
  """Keeping 2, the saves of 15 and 20 after falling back to 12 rotate out 12 and the unreadable 24; saving 24
  again then asked Orbax to delete a step it no longer had (FileNotFoundError)."""
  ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
  ckpt.save(12, state)
  ckpt.save(24, state)
  damage(tmp_path, 24)
  assert ckpt.restore_latest(abstract(state))[1] == 12
  for step in (15, 20, 24):
    assert ckpt.save(step, state)
  assert ckpt.all_steps() == [20, 24]
  assert ckpt.restore_latest(abstract(state))[1] == 24
  ckpt.close()


def test_all_damaged_raises(tmp_path, state):
  ckpt = Checkpointer(tmp_path, async_save=False)
  for step in (1, 2):
    ckpt.save(step, state)
    damage(tmp_path, step)
  with pytest.raises(CheckpointError, match=r"newest first: step 2: .*; step 1: ") as info:
    ckpt.restore_latest(abstract(state))
  assert str(tmp_path) in str(info.value)
  ckpt.close()


def test_the_reads_a_damaged_step_abandons_print_nothing(tmp_path, state, caplog, monkeypatch):
  """Falling back from a step with a missing file: when one read failed, Orbax abandoned the other arrays'
  reads, and each printed its TensorStore spec when collected ("Exception ignored in <coroutine ...>",
  asyncio's "Task exception was never retrieved"): 3,000 lines after the one warning naming the damage. Reads
  that TensorStore completed after the restore's event loop had closed each printed "Event loop is closed"."""
  import gc
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  ckpt.save(2, make_state(seed=1))
  data_files = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "2" / "state") for f in files
                if os.path.basename(root) == "d"]
  for path in data_files:
    os.remove(path)
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  with caplog.at_level(logging.WARNING):
    assert ckpt.restore_latest(abstract(state))[1] == 1
    gc.collect()
  assert not unraisable, unraisable[0].object
  assert [r.getMessage().split(":")[0] for r in caplog.records] == ["Cannot restore the checkpoint at step 2 in "
                                                                     f"{tmp_path}"]
  ckpt.close()


@pytest.mark.parametrize("harm", [lambda path: os.truncate(path, 100), os.remove], ids=["truncated", "missing"])
def test_a_read_error_names_the_damage(tmp_path, state, harm):
  """Tensorstore's outer error names only the array index; the damage is in the errors it was raised from."""
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  data_files = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "1" / "state") for f in files
                if os.path.basename(root) == "d"]
  harm(max(data_files, key=os.path.getsize))
  with pytest.raises(CheckpointError, match=r"step 1: its files cannot be read: (.*)\((.*)\)") as info:
    ckpt.restore_latest(abstract(state))
  message = str(info.value)
  assert "read: a file is missing or shorter than recorded (truncated) (" in message, message
  assert "TensorStore details" not in message, message
  ckpt.close()


def test_restore_onto_another_mesh(tmp_path, state):
  mesh = jax.make_mesh((8,), ("data",))
  assert len(jax.devices()) == 8

  def sharded(x):
    # A leading axis divisible by 8 is split over the mesh, anything else is replicated on it.
    return NamedSharding(mesh, P("data") if x.ndim and x.shape[0] % 8 == 0 else P())

  single = SingleDeviceSharding(jax.devices()[0])
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, jax.device_put(state, single))
  restored, _ = ckpt.restore_latest(abstract(state, sharded))
  assert_same(restored, state)
  table = restored.params["embed"]["table"]
  assert table.sharding == sharded(table) and len(table.addressable_shards) == 8
  assert table.addressable_shards[0].data.shape == (2, 8)

  ckpt.save(2, restored)
  restored, step = ckpt.restore_latest(abstract(state, lambda x: single))
  assert step == 2
  assert_same(restored, state)
  assert all(x.sharding == single for x in jax.tree.leaves(restored))
  ckpt.close()


def test_async_save_is_durable_after_wait(tmp_path, state):
  ckpt = Checkpointer(tmp_path, async_save=True)
  assert ckpt.save(3, state, {"seed": 0})
  assert ckpt.latest_step == 3  # visible while still being written
  ckpt.wait()
  fresh = Checkpointer(tmp_path)
  restored, step = fresh.restore_latest(abstract(state))
  assert step == 3
  assert_same(restored, state)
  assert fresh.restore_config() == {"seed": 0}
  fresh.close()
  ckpt.close()


def test_changed_array_files_fail_the_checksum_and_fall_back(tmp_path, state, caplog):
  """The newest checkpoint's array files replaced by valid ones holding other values (the silent kind of
  damage: the files read back without error)."""
  ckpt = Checkpointer(tmp_path / "run", async_save=False)
  ckpt.save(1, state)
  ckpt.save(2, state)
  other = Checkpointer(tmp_path / "other", async_save=False)
  other.save(2, make_state(seed=1))
  other.close()
  shutil.rmtree(tmp_path / "run" / "2" / "state")
  shutil.copytree(tmp_path / "other" / "2" / "state", tmp_path / "run" / "2" / "state")
  with caplog.at_level(logging.WARNING, logger="diffmoe_jax.train.checkpoint"):
    restored, step = ckpt.restore_latest(abstract(state))
  assert step == 1
  assert_same(restored, state)
  assert "step 2" in caplog.text and "do not match the checksum saved with them (params/embed/table, " in caplog.text
  ckpt.close()


def test_a_nonfinite_checkpoint_falls_back(tmp_path, state, caplog):
  """A checkpoint saved without a checksum (as older versions did) is still checked for finiteness."""
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  ckpt.close()
  poisoned = state.replace(params={**state.params, "embed": {"table": state.params["embed"]["table"] * jnp.nan}})
  raw = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
  raw.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(poisoned)))
  raw.close()
  ckpt = Checkpointer(tmp_path, async_save=False)
  with caplog.at_level(logging.WARNING, logger="diffmoe_jax.train.checkpoint"):
    restored, step = ckpt.restore_latest(abstract(state))
  assert step == 1
  assert_same(restored, state)
  assert "non-finite values (params/embed/table)" in caplog.text
  ckpt.close()


def test_a_nonfinite_state_is_not_saved_so_rotation_keeps_the_good_one(tmp_path, state):
  ckpt = Checkpointer(tmp_path, keep=1, async_save=False)
  assert ckpt.save(1, state)
  poisoned = state.replace(opt_state=jax.tree.map(lambda x: x * jnp.inf if x.dtype == jnp.float32 else x,
                                                  state.opt_state))
  assert not ckpt.save(2, poisoned, force=True)
  assert ckpt.all_steps() == [1]
  assert_same(ckpt.restore_latest(abstract(state))[0], state)
  ckpt.close()


def test_fingerprint_ignores_the_sharding_and_sees_a_permutation(state):
  mesh = jax.make_mesh((8,), ("data",))
  table = state.params["embed"]["table"]
  sharded = jax.device_put(table, NamedSharding(mesh, P("data")))
  sums, nonfinite = fingerprint({"t": table})
  assert fingerprint({"t": sharded})[0] == sums and nonfinite == []
  assert fingerprint({"t": table[::-1]})[0] != sums  # same values, other positions
  assert fingerprint({"t": table.at[3, 2].add(1e-6)})[0] != sums


_SAVE_SCRIPT = """
import errno, os, shutil, sys
import jax.numpy as jnp
from diffmoe_jax.train.checkpoint import Checkpointer, CheckpointSaveError
directory, fault = sys.argv[1], sys.argv[2]
ckpt = Checkpointer(directory, async_save=True)
state = {"w": jnp.ones((64, 64)), "b": jnp.zeros((3,))}
ckpt.save(1, state, {"seed": 0})
ckpt.wait()
if fault == "file":  # the checkpoints directory replaced by a regular file
  shutil.rmtree(directory)
  open(directory, "w").close()
else:  # a full disk while writing the step's JSON items
  from orbax.checkpoint._src.handlers import json_checkpoint_handler
  async def no_space(self, x, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  json_checkpoint_handler.JsonCheckpointHandler._save_fn = no_space
try:
  ckpt.save(2, state, {"seed": 0})
  ckpt.wait()
except CheckpointSaveError as e:
  print(f"error: {e}", file=sys.stderr)
  sys.exit(1)
print("saved")
"""


@pytest.mark.parametrize("fault, cause", [("file", "it is a file, not a directory"),
                                          ("full", "No space left on device")])
def test_a_failed_save_raises_one_error_and_never_hangs(tmp_path, fault, cause):
  directory = str(tmp_path / "checkpoints")
  proc = subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, directory, fault], capture_output=True, text=True,
                        timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
  assert f"step 2 in {directory}" in errors[0] and cause in errors[0]
  if fault == "full":
    assert sorted(os.listdir(directory)) == ["1"]  # the partial step directory is gone


def test_a_failed_save_waits_for_a_writer_thread_that_has_not_started_yet(tmp_path, monkeypatch):
  """threading.enumerate() lists a thread between its start() and its first instruction, and join() refuses
  it: a full disk then ended the run with "cannot join thread before it is started" and a traceback."""
  ckpt = Checkpointer(tmp_path, async_save=False)
  ran = []
  writer = threading.Thread(target=lambda: ran.append(True))
  starter = threading.Timer(0.2, writer.start)
  monkeypatch.setattr(threading, "enumerate", lambda: [writer])  # listed before it is started
  starter.start()
  error = ckpt._save_failed(3, OSError(errno.ENOSPC, "No space left on device"))
  starter.join()
  assert ran == [True] and not writer.is_alive()
  assert str(error).startswith(f"Cannot save the checkpoint at step 3 in {tmp_path}: No space left on device.")


def test_a_run_on_a_read_only_checkpoints_directory_is_refused_before_it_trains(tmp_path, monkeypatch):
  """A resumed run whose checkpoints directory had become read-only built its data, compiled and trained up to its
  first save (train.checkpoint_every steps, hours on a large config) before it failed and lost those steps."""
  from diffmoe_jax import config as config_lib, data
  from diffmoe_jax.train import loop
  checkpoints = tmp_path / "checkpoints"
  checkpoints.mkdir()
  access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode: False if os.fspath(path) == str(checkpoints)
                      else access(path, mode))  # read-only (chmod does not stop root)

  def build_corpus(*args, **kwargs):
    raise AssertionError("the data was built before the checkpoints directory was checked")

  monkeypatch.setattr(data, "build_corpus", build_corpus)
  config = config_lib.load_file(os.path.join(os.path.dirname(__file__), "train_config.py"))
  with pytest.raises(CheckpointError, match=rf"Cannot save checkpoints in {checkpoints}: it is not writable "
                                            r"\(read-only or immutable\)\. Make it a writable directory, then rerun"):
    loop.train(config, str(tmp_path))


def test_a_checksum_file_missing_an_array_fails_the_check_and_falls_back(tmp_path, state, caplog):
  """Every restored array must have its saved checksum: one left out of the file (cut or edited) is not taken as
  sound (an array without a checksum passed)."""
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, state)
  ckpt.save(2, state)
  path = tmp_path / "2" / "checksums" / "metadata"
  saved = json.loads(path.read_text())
  del saved["arrays"]["params/embed/table"]
  path.write_text(json.dumps(saved))
  with caplog.at_level(logging.WARNING, logger="diffmoe_jax.train.checkpoint"):
    restored, step = ckpt.restore_latest(abstract(state))
  assert step == 1
  assert "do not match the checksum saved with them (params/embed/table)" in caplog.text
  ckpt.close()
  with pytest.raises(ValueError, match="keep=0: keep at least 1 checkpoint"):
    Checkpointer(tmp_path, keep=0)
