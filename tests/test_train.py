"""The training system end to end: six phases, TensorBoard, checkpoints, resume, fallback, signals (its guards:
test_train_guards.py)."""
import contextlib
import os
import shutil
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffmoe_jax import config as config_lib
from diffmoe_jax import estimate
from diffmoe_jax import main as main_lib
from diffmoe_jax import parallel
from diffmoe_jax.config import ConfigError
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train import checkpoint, loop, metrics as metrics_lib
from diffmoe_jax.train import state as state_lib
from diffmoe_jax.train.curriculum import Curriculum
from diffmoe_jax.train import step as step_lib

CONFIG_PATH = os.path.join(os.path.dirname(__file__), "train_config.py")


def load_config():
  return config_lib.load_file(CONFIG_PATH)


def read_tb(workdir):
  acc = EventAccumulator(os.path.join(workdir, "tb"), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
  acc.Reload()
  return acc


def scalar_series(acc, tag):
  return {e.step: e.value for e in acc.Scalars(tag)}


# How long a trainer subprocess may take to get where a test waits for it: its first run builds the token cache
# and compiles, which took over 300 s on a 2-core machine busy with other tests (CI's can be slower still).
SUBPROCESS_TIMEOUT_S = 900
# How far each compile, evaluation, checkpoint and stable-rank pass of the full run moves the step clock
# (time.perf_counter) on: far longer than any real step, so a step that counted one shows it on any machine (a
# real 8 s pause did not: a busy machine's first step took 9 s).
PAUSE_SECONDS = 1000.0
# The host's matmul rate the full run's MFU is computed with (measured on CPU; fixed here to check MFU exactly).
PEAK_FLOPS = 1e9
# The keys of the batches the full run's train and eval steps were traced with.
STEP_BATCH_KEYS = {"train": set(), "eval": set()}


def _recording_batch_keys(make_step, kind):
  def make(*args, **kwargs):
    step = make_step(*args, **kwargs)

    def recorded(state_or_params, batch, *rest):
      STEP_BATCH_KEYS[kind].add(tuple(sorted(batch)))
      return step(state_or_params, batch, *rest)
    return recorded
  return make


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """The whole curriculum; each compile, evaluation, checkpoint and stable-rank pass, and each step program's first
  run (which loads it), takes PAUSE_SECONDS more on the step clock (steps must not count them)."""
  workdir = str(tmp_path_factory.mktemp("full"))
  paused = [0.0]
  clock = time.perf_counter

  def pausing(fn):
    def slow(*args, **kwargs):
      paused[0] += PAUSE_SECONDS
      return fn(*args, **kwargs)
    return slow

  run_before, run_compiled = set(), jax.stages.Compiled.__call__

  def loading_at_first_run(program, *args, **kwargs):
    if id(program) not in run_before:
      run_before.add(id(program))
      paused[0] += PAUSE_SECONDS
    return run_compiled(program, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(time, "perf_counter", lambda: clock() + paused[0])
    patch.setattr(metrics_lib, "measured_matmul_flops", lambda: PEAK_FLOPS)
    patch.setattr(jax.stages.Compiled, "__call__", loading_at_first_run)
    patch.setattr(metrics_lib, "stable_ranks", pausing(metrics_lib.stable_ranks))
    patch.setattr(loop, "eval_loss_sums", pausing(loop.eval_loss_sums))
    patch.setattr(loop, "_save_unless_skipping", pausing(loop._save_unless_skipping))  # pylint: disable=protected-access
    # A step program is made just before it is compiled.
    patch.setattr(step_lib, "make_train_step", pausing(_recording_batch_keys(step_lib.make_train_step, "train")))
    patch.setattr(step_lib, "make_eval_step", _recording_batch_keys(step_lib.make_eval_step, "eval"))
    return workdir, main_lib.run(load_config(), workdir)


def test_trains_through_all_six_phases(full_run):
  workdir, result = full_run
  assert result.final_step == 24 and result.stopped is None
  acc = read_tb(workdir)
  phases = scalar_series(acc, "train/phase")
  assert sorted(set(phases.values())) == [0, 1, 2, 3, 4, 5]
  assert sorted(set(scalar_series(acc, "train/seq_len").values())) == [8, 16, 32]
  losses = [v for _, v in sorted(scalar_series(acc, "train/loss").items())]
  assert len(losses) == 24
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [12, 24]
  for domain in ("code", "docs"):
    assert result.eval[f"{domain}/bits_per_byte"] > 0 and result.eval[f"{domain}/unigram_bits_per_byte"] > 0
  # data.segment_masking (on by default) reaches the model: both steps are given each batch's segment ids.
  assert STEP_BATCH_KEYS == {"train": {("inputs", "segment_ids", "targets")},
                             "eval": {("inputs", "segment_ids", "targets")}}, STEP_BATCH_KEYS


def test_tensorboard_has_the_listed_tags(full_run):
  acc = read_tb(full_run[0])
  tags = acc.Tags()
  scalars = set(tags["scalars"])
  for tag in ("train/loss", "train/cross_entropy", "train/load_balance_loss", "train/router_z_loss",
              "train/mod_predictor_loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "train/mfu",
              "train/phase", "train/router_noise", "train/mod_capacity", "train/nonfinite_total",
              "moe/layer0/max_load", "moe/layer3/dropped_fraction", "lambda/layer2/expert3",
              "mod/routed0/selected_fraction", "mod/routed1/predictor_accuracy",
              "eval/loss", "eval/code/bits_per_byte", "eval/docs/unigram_bits_per_byte"):
    assert tag in scalars, tag
  assert any(t.startswith("stable_rank/") and "wq" in t for t in scalars)
  rank_tag = next(t for t in scalars if t.startswith("stable_rank/") and "wq" in t)
  assert sorted(scalar_series(acc, rank_tag)) == [12, 24]  # the slowed passes ran
  assert any(t.startswith("stable_rank/") and "w_in" in t for t in scalars)
  assert scalar_series(acc, "train/tokens_seen") == {s: 256 * s for s in range(1, 25)}  # 256 tokens a step
  assert "moe/layer0/expert_load" in tags["histograms"]
  assert any("config" in t for t in tags["tensors"])
  # MoD: routed layers run every token in foundation (capacity 1) and half of them at the end.
  fractions = scalar_series(acc, "mod/routed0/selected_fraction")
  assert fractions[5] == 1.0 and fractions[24] == 0.5
  # Warmup, foundation and sparsify's first level (steps 1-12) run every token (MoD off, so at capacity 1):
  # the predictor has no decision to match, so nothing of it is logged.
  for tag in ("mod/routed0/predictor_accuracy", "train/mod_predictor_loss"):
    assert sorted(scalar_series(acc, tag)) == list(range(13, 25)), tag


def test_step_time_leaves_out_compiles_evaluations_and_pauses(full_run):
  """Every step's time excludes the compile before it (four programs), the evaluation, checkpoint and
  stable-rank pass at step 12: none comes near PAUSE_SECONDS. The first run of each program loads it (on
  XLA:CPU 10-100 times a step's time): the speed of those steps (1, 2, 13, 19) is not logged."""
  acc = read_tb(full_run[0])
  seconds = scalar_series(acc, "train/step_seconds")
  assert sorted(seconds) == [s for s in range(1, 25) if s not in (1, 2, 13, 19)]
  assert max(seconds.values()) < PAUSE_SECONDS / 2, seconds
  tokens_per_second = scalar_series(acc, "train/tokens_per_second")
  assert sorted(tokens_per_second) == sorted(seconds) == sorted(scalar_series(acc, "train/mfu"))
  assert tokens_per_second[12] == pytest.approx(256 / seconds[12], rel=1e-4)  # the step the pauses came after
  # MFU: the FLOPs of each step's own sequence length and MoD setting, times its tokens per second, over the peak.
  config, mfu = load_config(), scalar_series(acc, "train/mfu")
  counts, curriculum = estimate.count_params(config.model), Curriculum(config)
  for step, rate in tokens_per_second.items():
    s = curriculum.settings(step - 1)
    flops = estimate.train_flops_per_token(config.model, counts, s.phase.seq_len, mod_mode=s.mod_mode,
                                           mod_capacity=s.mod_capacity)
    assert mfu[step] == pytest.approx(flops * rate / PEAK_FLOPS, rel=1e-4), step


@contextlib.contextmanager
def sigterm_during_step(index: int):
  """A SIGTERM to this process while the step of 0-based `index` is set up (its settings read)."""
  dynamic_settings = step_lib.dynamic_settings

  def with_sigterm(settings):
    if settings.step == index:
      os.kill(os.getpid(), signal.SIGTERM)
    return dynamic_settings(settings)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(step_lib, "dynamic_settings", with_sigterm)
    yield


def test_resume_continues_exactly(full_run, tmp_path):
  """Resumed from the checkpoint at step 12 (inside sparsify, so the phase's batches must go on from its third, not
  start over) of a run that went on to step 13 and lost its later checkpoint, as a killed run does: the same 24
  losses, bit for bit, each step logged once."""
  config = load_config()
  config.train.update(run_steps=13, checkpoint_every=12)
  first = main_lib.run(config, str(tmp_path))
  assert first.final_step == 13 and first.stopped == "train.run_steps" and first.received_signal is None
  assert Curriculum(config).settings(12).phase.start < 12
  shutil.rmtree(os.path.join(tmp_path, "checkpoints", "13"))
  config.train.update(run_steps=0, checkpoint_every=12)
  # A SIGTERM during the last step: nothing is left to resume, so the run finishes (evaluated, exit 0).
  with sigterm_during_step(23):
    began = time.perf_counter()
    second = main_lib.run(config, str(tmp_path))
    elapsed = time.perf_counter() - began
  assert second.final_step == 24
  # The run's seconds are both invocations' (an ablation or search reported the last one's alone).
  assert 0 < first.seconds < second.seconds <= first.seconds + elapsed
  want = scalar_series(read_tb(full_run[0]), "train/loss")
  got = scalar_series(read_tb(str(tmp_path)), "train/loss")
  assert sorted(e.step for e in read_tb(str(tmp_path)).Scalars("train/loss")) == list(range(1, 25))
  assert second.stopped is None and second.received_signal == "SIGTERM"  # a caller of several runs stops
  np.testing.assert_array_equal([got[s] for s in range(1, 25)], [want[s] for s in range(1, 25)])
  assert second.eval["loss"] == pytest.approx(full_run[1].eval["loss"], abs=1e-6)


def test_training_metrics_are_logged_every_log_every_steps_and_at_the_last(full_run, tmp_path):
  """Resumed at step 12 with train.log_every=5: train/* at steps 15 and 20, and at 24, the curriculum's last, each
  with its own step's values (after steps 16 and 21, off by one, passed every test: they all log every step)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "tb"))
  shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
  config = load_config()
  config.train.log_every = 5
  assert loop.train(config, workdir).final_step == 24
  got, want = scalar_series(read_tb(workdir), "train/loss"), scalar_series(read_tb(full_run[0]), "train/loss")
  assert sorted(got) == [15, 20, 24] and [got[s] for s in (15, 20, 24)] == [want[s] for s in (15, 20, 24)]


def test_rerunning_a_finished_run_logs_nothing_twice(full_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  result = main_lib.run(load_config(), workdir)
  assert result.final_step == 24 and result.eval["loss"] == pytest.approx(full_run[1].eval["loss"], abs=1e-6)
  assert [e.step for e in read_tb(workdir).Scalars("eval/loss")] == [12, 24]


def test_a_curriculum_shortened_to_its_checkpoint_logs_the_final_evaluation(full_run, tmp_path):
  """Step 12 saved by a run evaluating every 5 steps had no evaluation logged; with the curriculum shortened to end
  there, the rerun printed its final evaluation but never logged it (as if the run had been finished)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "tb"))
  config = load_config()
  config.train.eval_every = 5
  shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
  state, step = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).restore_latest(_abstract_state(config))
  assert step == 12
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(12, state, config, force=True)  # as that run saved it
  ckpt.close()
  config.curriculum.total_steps = 12
  config.train.allow_config_change = "curriculum.total_steps"
  result = loop.train(config, workdir)
  assert result.final_step == 12 and result.stopped is None
  assert [e.step for e in read_tb(workdir).Scalars("eval/loss")] == [12]


def test_the_last_step_is_saved_after_the_final_evaluation(full_run, tmp_path, monkeypatch):
  """A run killed during its final evaluation had saved its last step already, so the rerun found the run done and
  never logged that evaluation; the last step is saved after the evaluation, as every periodic one is."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))  # resume from 12
  started, saved_before_eval = [], []
  save = checkpoint.Checkpointer.save
  monkeypatch.setattr(checkpoint.Checkpointer, "save",
                      lambda self, step, *args, **kwargs: started.append(step) or save(self, step, *args, **kwargs))

  def killed(*args, **kwargs):
    saved_before_eval.extend(started)
    raise RuntimeError("killed during the final evaluation")

  monkeypatch.setattr(loop, "eval_loss_sums", killed)
  with pytest.raises(RuntimeError, match="killed during the final evaluation"):
    loop.train(load_config(), workdir)
  assert saved_before_eval == []


def test_a_curriculum_shortened_below_the_checkpoint_is_refused(full_run, tmp_path):
  config = load_config()
  config.curriculum.total_steps = 12
  config.train.allow_config_change = "curriculum.total_steps"
  with pytest.raises(ConfigError, match=r"The checkpoint at step 24 in .* lies past the end of the curriculum "
                     r"\(curriculum.total_steps=12\); set curriculum.total_steps to at least 24"):
    loop.train(config, full_run[0])


def test_unreadable_newest_checkpoint_falls_back(full_run, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  newest = os.path.join(workdir, "checkpoints", "24")
  for root, _, files in os.walk(newest):
    for f in files:
      if "state" in root:
        os.remove(os.path.join(root, f))
  with caplog.at_level("WARNING"):
    result = main_lib.run(load_config(), workdir)
  assert "Cannot restore the checkpoint at step 24" in caplog.text
  assert result.final_step == 24
  assert result.eval["loss"] == pytest.approx(full_run[1].eval["loss"], abs=1e-6)
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step == 24


def test_a_damaged_saved_config_still_guards_the_resume(full_run, tmp_path, caplog):
  """The config saved with the newest checkpoint cannot be read: a changed config is checked against the one
  before it, and with none readable refused unless the check is waived; never resumed unchecked."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  damage = lambda step: open(os.path.join(workdir, "checkpoints", str(step), "config", "metadata"), "w").write("{x")
  config = load_config()
  config.optimizer.peak_lr = 5e-3
  damage(24)
  with caplog.at_level("WARNING"), pytest.raises(ConfigError, match=(
      r"The checkpoint at step 24 in .* was saved with another config: optimizer\.peak_lr 0\.01 -> 0\.005")):
    loop.train(config, workdir)
  assert "The config saved with the checkpoint at step 24 cannot be read" in caplog.text
  damage(12)
  with pytest.raises(ConfigError, match=r"No config saved in .* up to step 24 can be read \(step 24: \w+, step 12: "
                     r"\w+\), so whether this run's config matches .*allow_config_change='\*'"):
    loop.train(config, workdir)
  config.train.allow_config_change = "*"
  assert loop.train(config, workdir).final_step == 24


def _abstract_state(config):
  model = model_lib.build_model(config.model)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  abstract, _, _ = state_lib.create_state(model, state_lib.make_optimizer(config.optimizer), mesh,
                                          parallel.axis_rules(config.mesh), seed=0, seq_len=8)
  return abstract


def _fresh_state(config, *, seed: int, length: int):
  """(model, optimizer, initial state, a random batch of 4 sequences of `length` tokens)."""
  model = model_lib.build_model(config.model)
  optimizer = state_lib.make_optimizer(config.optimizer)
  state = jax.jit(lambda r: nn.unbox(state_lib.init_fn(model, optimizer, 8)(r)))(jax.random.PRNGKey(0))
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (4, length + 1)), jnp.int32)
  return model, optimizer, state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_resume_onto_a_different_mesh(full_run, tmp_path):
  """Stopped on 8-way data parallelism, resumed on fsdp 2 x expert 2 x tensor 2: same losses."""
  config = load_config()
  config.train.run_steps = 10
  main_lib.run(config, str(tmp_path))
  config.train.run_steps = 0
  config.mesh.shape.update(data=1, fsdp=2, expert=2, tensor=2)
  result = main_lib.run(config, str(tmp_path))
  assert result.final_step == 24
  want = scalar_series(read_tb(full_run[0]), "train/loss")
  got = scalar_series(read_tb(str(tmp_path)), "train/loss")
  # The first step after the restore sees the same weights and batch: equal up to reduction order.
  assert got[11] == pytest.approx(want[11], rel=1e-5)
  # Later steps differ by accumulated rounding (another mesh sums in another order), amplified by training.
  np.testing.assert_allclose([got[s] for s in range(12, 25)], [want[s] for s in range(12, 25)], rtol=5e-3)


def test_gradient_accumulation_equals_the_full_batch():
  """Two micro-batches of 2 sequences update the weights as one batch of 4 does (routing is per sequence).

  The load-balance loss E·Σ f·P is a product of batch means, so it is computed per micro-batch and not
  additive; its weight is 0 here. The other losses are means and accumulate exactly.
  """
  model, optimizer, state, batch = _fresh_state(load_config(), seed=1, length=16)
  dyn = {k: jnp.float32(v) for k, v in {"lr": 1e-3, "router_noise": 0.0, "load_balance_weight": 0.0,
                                        "z_loss_weight": 0.001, "mod_predictor_weight": 0.01}.items()}
  results = {}
  for accum in (1, 2):
    fn = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5,
                                          grad_accum_steps=accum))
    results[accum] = fn(state, batch, dyn)
  (one, m1), (two, m2) = results[1], results[2]
  assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
  assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-4)
  # Adam's first update is g / (|g| + ε): rounding in a near-zero gradient moves it by a fraction of lr.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
               two.params, one.params)


def test_bfloat16_compute_keeps_float32_master_weights():
  config = load_config()
  config.model.dtype = "bfloat16"
  model, optimizer, state, batch = _fresh_state(config, seed=2, length=16)
  fn = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=0.5))
  dyn = {k: jnp.float32(v) for k, v in {"lr": 1e-2, "router_noise": 0.5, "load_balance_weight": 0.01,
                                        "z_loss_weight": 0.001, "mod_predictor_weight": 0.01}.items()}
  losses = []
  for _ in range(3):
    state, metrics = fn(state, batch, dyn)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert int(state.nonfinite_total) == 0
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}


def _series(workdir, prefixes):
  acc = read_tb(workdir)
  return {t: scalar_series(acc, t) for t in acc.Tags()["scalars"] if t.startswith(prefixes)}


def test_a_signal_before_an_evaluation_saves_first_and_the_resumed_run_logs_it(full_run, tmp_path):
  """A SIGTERM during step 12 (which evaluates and computes stable ranks) ran both before saving, past a
  preemption's grace period on a large model; now the run saves step 12 and stops, and the resumed run logs them."""
  with sigterm_during_step(11):
    first = loop.train(load_config(), str(tmp_path))
  assert first.final_step == 12 and first.stopped == "SIGTERM"
  assert _series(str(tmp_path), ("eval/", "stable_rank/")) == {}
  second = loop.train(load_config(), str(tmp_path))
  assert second.final_step == 24 and second.stopped is None
  want = _series(full_run[0], ("eval/", "stable_rank/"))
  got = _series(str(tmp_path), ("eval/", "stable_rank/"))
  assert sorted(got) == sorted(want) and want
  for tag, values in want.items():
    assert sorted(got[tag]) == sorted(values) == [12, 24], tag
    np.testing.assert_allclose([got[tag][s] for s in (12, 24)], [values[s] for s in (12, 24)], rtol=1e-6,
                               err_msg=tag)


def test_tokens_seen_counts_the_batches_trained_before_a_batch_size_change(full_run, tmp_path):
  """Resumed at step 12 with twice the tokens per batch, step 13 had seen 13 x 512 tokens by the new curriculum's
  count; the first run trained 12 x 256."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
  config = load_config()
  config.curriculum.tokens_per_batch = 512
  config.train.update(allow_config_change="curriculum.tokens_per_batch", run_steps=2)
  assert loop.train(config, workdir).final_step == 14
  seen = scalar_series(read_tb(workdir), "train/tokens_seen")
  assert [seen[s] for s in (12, 13, 14)] == [12 * 256, 12 * 256 + 512, 12 * 256 + 2 * 512]


def test_a_run_the_nonfinite_guard_stops_at_its_last_step_logs_the_final_evaluation_on_rerun(full_run, tmp_path):
  """Stopped at its last step by non-finite updates, the run logged no final evaluation, and the rerun (with the
  learning rate lowered) found the run done and took it as logged."""
  workdir = str(tmp_path / "run")
  shutil.copytree(full_run[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
  shutil.rmtree(os.path.join(workdir, "tb"))
  config = load_config()
  config.curriculum.total_steps = 14
  config.optimizer.peak_lr = float("inf")
  config.train.update(max_nonfinite_in_a_row=1, allow_config_change="curriculum.total_steps,optimizer.peak_lr")
  with pytest.raises(loop.TrainingStopped) as stopped:
    loop.train(config, workdir)
  assert stopped.value.step == 14
  assert "eval/loss" not in read_tb(workdir).Tags()["scalars"]
  config.optimizer.peak_lr = 1e-2
  result = loop.train(config, workdir)
  assert result.final_step == 14 and result.stopped is None
  assert sorted(scalar_series(read_tb(workdir), "eval/loss")) == [14]
