"""The ablation runner on a two-arm, few-step budget: report files, skipping finished arms, arm configs."""
import json
import os
import re
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest

from diffmoe_jax import ablate, ablate_analysis, data, estimate
from diffmoe_jax import config as config_lib
from diffmoe_jax.train import loop
from diffmoe_jax.train.workdir import WorkdirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config():
  """tests/train_config.py's model (d_model 48) at 2 layers (one full, one routed) for 6 steps of one phase
  (one train program to compile), two arms, one seed."""
  c = config_lib.load_file(os.path.join(REPO, "tests", "train_config.py"))
  c.name = "ablation_smoke"
  c.model.num_layers = 2
  c.curriculum.update(total_steps=6, order=("foundation",))
  c.curriculum.foundation.fraction = 1.0
  c.train.update(eval_every=3, checkpoint_every=6, stable_rank_every=3)
  c.ablation = ml_collections.ConfigDict({"arms": "full,differential_v2", "seeds": 1})
  return c


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  root = tmp_path_factory.mktemp("ablate")
  workdir, report_dir = str(root / "runs"), str(root / "report")
  return workdir, report_dir, ablate.run(smoke_config(), workdir, report_dir)


def test_smoke_run_writes_table_plots_and_json(smoke):
  workdir, report_dir, summary = smoke
  for name in ("README.md", "results.json", *ablate_analysis.FIGURES.values()):
    if name != "stable_rank.png":  # only with the power-of-two arm
      assert os.path.getsize(os.path.join(report_dir, name)) > 0, name
  with open(os.path.join(report_dir, "results.json")) as f:
    saved = json.load(f)
  assert set(saved["arms"]) == {"full", "differential_v2"}
  full, v2 = saved["arms"]["full"], saved["arms"]["differential_v2"]
  assert full["final_step"] == 6 and full["seeds"] == [0]
  # Arm runs log what a main run logs, MFU included (the loop computes it from the estimator's FLOPs).
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(os.path.join(workdir, "full", "seed0", "tb"))
  events.Reload()
  assert {"train/mfu", "train/tokens_per_second"} <= set(events.Tags()["scalars"])
  assert full["delta_vs_full"]["loss"] == 0.0
  assert v2["delta_vs_full"]["loss"] == pytest.approx(v2["mean"]["loss"] - full["mean"]["loss"])
  for domain in ("code", "docs"):
    assert np.isfinite(v2["mean"][f"{domain}/bits_per_byte"])
  readme = open(os.path.join(report_dir, "README.md")).read()
  assert "| Full NCAS-DiffMoE |" in readme and "Diff-Transformer V2" in readme and "loss_curves.png" in readme
  assert "on the built-in corpus (code = 'stdlib:code', docs = 'stdlib:docs')" in readme
  with open(os.path.join(workdir, "full", "seed0", "result.json")) as f:
    assert json.load(f)["data"] == data.build_corpus(smoke_config().data).fingerprint
  # λ through the router: per domain and layer, a mean within the experts' range and shares summing to 1.
  lam = saved["lambda"]["full/seed0"]
  for domain in ("code", "docs"):
    per_expert = np.asarray(lam["per_layer"][domain])
    assert per_expert.shape == (2, 4)
    for layer, tokens in enumerate(lam["tokens"][domain]):
      assert per_expert[layer].min() - 1e-6 <= tokens["mean"] <= per_expert[layer].max() + 1e-6
      assert sum(tokens["expert_share"]) == pytest.approx(1.0)
  v2_lambda = np.asarray(saved["lambda"]["differential_v2/seed0"]["per_layer"]["code"])
  assert v2_lambda.shape == (2, 1) and ((v2_lambda > 0) & (v2_lambda < 1)).all()


def test_the_token_lambda_spread_is_over_every_token_of_a_layer(smoke, monkeypatch):
  """Per domain and layer, the mean and standard deviation of the λ every token got through the router, against the
  tokens' λ recorded as they were mixed (each call's layer found by its λ per expert): the spread of the
  per-batch means passed every test."""
  workdir, _, _ = smoke
  recorded, token_lambdas = [], ablate_analysis.token_lambdas

  def recording(lambda_per_expert, weights, experts):
    tokens = token_lambdas(lambda_per_expert, weights, experts)
    recorded.append((np.asarray(lambda_per_expert), np.ravel(tokens)))
    return tokens

  monkeypatch.setattr(ablate_analysis, "token_lambdas", recording)
  config = smoke_config()
  corpus = data.build_corpus(config.data)
  run_config = ablate.arm_config(config, "full", 0)[0]
  lam = ablate_analysis.lambda_analysis(run_config, os.path.join(workdir, "full", "seed0"), corpus)
  per_domain = len(recorded) // len(corpus.domains)
  assert per_domain == run_config.train.eval_batches * run_config.model.num_layers
  for d, domain in enumerate(corpus.domains):
    calls = recorded[d * per_domain:(d + 1) * per_domain]
    for layer, lambdas in enumerate(lam["per_layer"][domain]):
      tokens = np.concatenate([t for per_expert, t in calls if np.allclose(per_expert, lambdas, rtol=1e-6)])
      assert tokens.size == run_config.train.eval_batches * run_config.train.eval_batch_size * \
          run_config.model.max_seq_len
      assert lam["tokens"][domain][layer]["mean"] == pytest.approx(np.mean(tokens), rel=1e-6)
      assert lam["tokens"][domain][layer]["std"] == pytest.approx(np.std(tokens), rel=1e-6)


def test_rerun_skips_finished_arms(smoke, monkeypatch, capsys):
  workdir, report_dir, summary = smoke

  def no_training(*args, **kwargs):
    raise AssertionError("a finished arm was trained again")

  monkeypatch.setattr(loop, "train", no_training)
  again = ablate.run(smoke_config(), workdir, report_dir)
  assert capsys.readouterr().out.count("finished earlier") == 2
  assert again["arms"]["full"]["mean"] == summary["arms"]["full"]["mean"]


def test_changed_config_is_refused_not_mixed(smoke):
  workdir, report_dir, _ = smoke
  changed = smoke_config()
  changed.optimizer.peak_lr = 5e-3
  with pytest.raises(ablate.AblationError, match="different config.*config.optimizer.peak_lr"):
    ablate.run(changed, workdir, report_dir)


def test_arm_configs_change_one_thing_and_validate():
  config = config_lib.load_file(os.path.join(REPO, "configs", "ablation.py"))
  base = ablate.arm_config(config, "full", 0)[0]
  for arm in ablate.ARMS:
    c, change = ablate.arm_config(config, arm, 1)
    assert c.seed == 1 and "ablation" not in c
    assert (c.model.to_dict() == base.model.to_dict()) == (arm == "full"), arm
  v2 = ablate.arm_config(config, "differential_v2", 0)[0].model
  assert v2.attention == "differential_v2" and not v2.expert_conditional_lambda


def test_an_arm_that_changes_nothing_is_refused():
  config = config_lib.load_file(os.path.join(REPO, "configs", "ablation.py"))
  config.model.mod.enabled = False
  with pytest.raises(ablate.AblationError, match=re.escape(
      "config.ablation.arms: the no_mod arm changes nothing in this config (model.mod.enabled=False already); "
      "drop it from config.ablation.arms.")):
    ablate.arm_config(config, "no_mod", 0)


def test_power_of_two_arm_is_parameter_matched():
  config = config_lib.load_file(os.path.join(REPO, "configs", "ablation.py"))
  full = ablate.arm_config(config, "full", 0)[0].model
  p2 = ablate.arm_config(config, "power_of_two", 0)[0].model
  assert (p2.d_model, p2.head_dim, p2.num_heads) == (128, 32, full.num_heads)
  assert p2.moe.expert_ffn_dim % 32 == 0
  wider = ml_collections.ConfigDict(p2.to_dict())
  wider.moe.expert_ffn_dim += 32
  step = estimate.count_params(wider).total - estimate.count_params(p2).total
  # Within half of one 32-wide FFN step of the full model's count.
  assert abs(estimate.count_params(p2).total - estimate.count_params(full).total) <= step / 2


def test_bad_arm_is_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "diffmoe_jax.ablate", "--config=configs/ablation.py",
                         "--config.ablation.arms=full,no_such_arm", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith("error: config.ablation.arms=") and "no_such_arm" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("arms, problem", [("full,no_modd", "unknown: no_modd"), ("full,full", "listed twice: full"),
                                           ("no_mod", "full, the Δ column's reference, is missing")])
def test_a_bad_list_of_arms_names_what_is_wrong_with_it(arms, problem):
  """A repeated arm and a missing full got only the line that lists the arms, which did not say which was wrong."""
  config = smoke_config()
  config.ablation.arms = arms
  with pytest.raises(ablate.AblationError, match=re.escape(f"config.ablation.arms={arms!r}: {problem}; list "
                                                           "distinct arms from full,")):
    ablate.arm_names(config)


@pytest.mark.parametrize("layout, holds", [("checkpoints", "a training run"), ("proxies", "an NCAS search")])
def test_a_workdir_holding_another_commands_runs_is_refused(tmp_path, monkeypatch, layout, holds):
  (tmp_path / layout).mkdir()
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  with pytest.raises(WorkdirError, match=re.escape(f"The workdir {tmp_path} holds {holds}, not an ablation; pass "
                                                   "another --workdir.")):
    ablate.run(smoke_config(), str(tmp_path))


def test_a_report_dir_holding_a_searchs_report_is_refused(tmp_path, monkeypatch):
  """The ablation's report went in beside the search's, which has no file of the same name to protect."""
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "report.md").write_text("# NCAS search report\n")
  with pytest.raises(WorkdirError, match=re.escape(f"The report_dir {tmp_path / 'docs'} holds an NCAS search's "
                                                   "report; pass another --report_dir")):
    ablate.run(smoke_config(), str(tmp_path / "runs"), str(tmp_path / "docs"))


def test_a_second_ablation_in_a_workdir_is_refused_at_once(tmp_path, monkeypatch):
  """It read the data and the finished runs, and ran until it reached the run the first ablation was training."""
  from diffmoe_jax.train import workdir as workdir_lib
  monkeypatch.setattr(data, "build_corpus", lambda *args: pytest.fail("the data was built before refusing"))
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match="is in use by another run"):
      ablate.run(smoke_config(), str(tmp_path))


def test_a_config_without_an_ablation_section_is_one_line_error(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "diffmoe_jax.ablate", "--config=configs/tiny.py", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip() == ("error: the config has no ablation section (config.ablation.arms, config.ablation."
                                 "seeds); use --config=configs/ablation.py, or add one to your config as that file "
                                 "does.")


def finished_run(run_dir, config, record: dict) -> None:
  """Writes a result.json for the run of `config` in run_dir, as a finished one has, plus `record`."""
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump({"eval": {"loss": 3.0}, "config": json.loads(config.to_json_best_effort()), **record}, f)


def test_a_run_finished_on_other_data_is_refused(tmp_path):
  config = ablate.arm_config(smoke_config(), "full", 0)[0]
  run_dir = str(tmp_path / "full" / "seed0")
  finished_run(run_dir, config, {"data": {"code": "k1", "docs": "k2"}})
  with pytest.raises(WorkdirError, match=re.escape(
      f"{run_dir} finished on other training data (config.data.domains.code: its files changed since); pass a "
      "new --workdir, or delete that run to train it again.")):
    ablate._finished(run_dir, config, {"code": "k3", "docs": "k2"})
  assert ablate._finished(run_dir, config, {"code": "k1", "docs": "k2"})["eval"]["loss"] == 3.0


def test_a_run_finished_over_several_invocations_is_reused_by_a_rerun_without_run_steps(tmp_path):
  """An ablation stopped and resumed with train.run_steps, then rerun without it: the finished runs were
  refused as finished with another config (train.run_steps: 4 there, 0 now)."""
  config = ablate.arm_config(smoke_config(), "full", 0)[0]
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.train.update(run_steps=4, checkpoint_every=2, compilation_cache_dir="")
  saved.model.attention_impl = "blockwise"
  run_dir = str(tmp_path / "full" / "seed0")
  finished_run(run_dir, saved, {"data": {"code": "k1"}})
  assert ablate._finished(run_dir, config, {"code": "k1"})["eval"]["loss"] == 3.0
  # Fields that change what the table reports still count: other evaluation batches measure another loss.
  config.train.eval_batches += 1
  with pytest.raises(ablate.AblationError, match=re.escape("(config.train.eval_batches: 1 there, 2 now)")):
    ablate._finished(run_dir, config, {"code": "k1"})


def test_a_later_arm_finished_with_another_config_is_refused_before_training(tmp_path, monkeypatch):
  """The refusal comes before the first arm trains, not after it."""
  config = smoke_config()
  other = ablate.arm_config(config, "differential_v2", 0)[0]
  other.optimizer.peak_lr = 5e-3
  finished_run(str(tmp_path / "differential_v2" / "seed0"), other, {})
  monkeypatch.setattr(data, "build_corpus", lambda *args: types.SimpleNamespace(fingerprint={}))
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  with pytest.raises(ablate.AblationError, match="differential_v2/seed0 finished with a different config"):
    ablate.run(config, str(tmp_path), str(tmp_path / "report"))


def test_an_arm_too_large_for_the_machine_is_refused_before_any_trains(tmp_path, monkeypatch):
  """ablate trains through loop.train, which has no memory preflight: an arm too large ran out of memory when
  the ablation reached it."""
  from diffmoe_jax.train import preflight
  monkeypatch.setattr(data, "build_corpus", lambda *args: types.SimpleNamespace(fingerprint={}))
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 2**20)
  with pytest.raises(preflight.InsufficientMemoryError, match=r"^the full arm: This config needs about [\d.]+ MiB "
                     r"per device .* but a device here has 1\.00 MiB available"):
    ablate.run(smoke_config(), str(tmp_path), str(tmp_path / "report"))


def test_a_result_from_before_data_fingerprints_is_reused_with_a_note(tmp_path, capsys):
  config = ablate.arm_config(smoke_config(), "full", 0)[0]
  run_dir = str(tmp_path / "full" / "seed0")
  finished_run(run_dir, config, {})
  assert ablate._finished(run_dir, config, {"code": "k1", "docs": "k2"})["eval"]["loss"] == 3.0
  assert (f"note: {run_dir} has no record of its training data, so a change in it could not be checked.\n"
          in capsys.readouterr().out)


def test_a_result_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  """A run killed while writing its result.json (here: the disk fills) must not leave half a file, which
  the next run would read."""
  dump = json.dump

  def dump_and_fail(value, f, **kwargs):
    if not os.path.basename(f.name).startswith(ablate.RESULT_FILE):  # the token cache's files
      return dump(value, f, **kwargs)
    f.write(json.dumps(value)[:20])
    raise OSError("No space left on device")

  def train(config, run_dir, corpus):
    os.makedirs(run_dir)
    return loop.RunResult(final_step=6, stopped=None, eval={"loss": 3.0})

  monkeypatch.setattr(loop, "train", train)
  monkeypatch.setattr(ablate_analysis, "lambda_analysis", lambda *args: None)
  monkeypatch.setattr(json, "dump", dump_and_fail)
  with pytest.raises(OSError, match="No space left"):
    ablate.run(smoke_config(), str(tmp_path), str(tmp_path / "report"))
  assert not os.path.exists(tmp_path / "full" / "seed0" / "result.json")


def test_a_signal_during_a_runs_last_step_stops_the_ablation_after_that_run(tmp_path, monkeypatch, capsys):
  """The loop finishes a run whose last step received a SIGTERM (nothing is left to resume there): the ablation
  went on to the next run as if no signal had come."""
  trained = []

  def train(config, run_dir, corpus):
    os.makedirs(run_dir)
    trained.append(run_dir)
    return loop.RunResult(final_step=6, stopped=None, eval={"loss": 3.0}, received_signal="SIGTERM")

  monkeypatch.setattr(loop, "train", train)
  monkeypatch.setattr(ablate_analysis, "lambda_analysis", lambda *args: None)
  assert ablate.run(smoke_config(), str(tmp_path), str(tmp_path / "report")) == {"stopped": "SIGTERM"}
  assert trained == [str(tmp_path / "full" / "seed0")]
  assert os.path.exists(tmp_path / "full" / "seed0" / "result.json")  # the finished run is kept
  assert "SIGTERM received, so stopping here; rerun the same command to go on" in capsys.readouterr().out


def test_a_run_stopped_by_non_finite_updates_lets_the_others_go_on_and_the_report_names_it(smoke, tmp_path,
                                                                                          monkeypatch):
  """One arm diverging under the shared settings stopped the whole ablation (TrainingStopped, with main's advice
  to change the learning rate for that run alone), leaving the arms after it untrained and no report."""
  import shutil
  workdir, _, _ = smoke
  config = smoke_config()
  config.ablation.arms = "full,differential_v2,no_mod"
  runs, report_dir = tmp_path / "runs", tmp_path / "report"
  shutil.copytree(os.path.join(workdir, "full"), runs / "full")  # finished: reused
  trained = []

  def train(run_config, run_dir, corpus):
    trained.append(os.path.relpath(run_dir, runs))
    raise loop.TrainingStopped("10 non-finite updates in a row", 4)

  monkeypatch.setattr(loop, "train", train)
  with pytest.raises(ablate.AblationError, match=re.escape(
      "non-finite updates stopped differential_v2 seed 0 at step 4 of 6; no_mod seed 0 at step 4 of 6. The report "
      f"in {report_dir} lists the other arms. Under the shared settings that is the arm's result: drop it from "
      "config.ablation.arms")):
    ablate.run(config, str(runs), str(report_dir))
  assert trained == ["differential_v2/seed0", "no_mod/seed0"]
  with open(report_dir / "results.json") as f:
    saved = json.load(f)
  assert list(saved["arms"]) == ["full"] and saved["diverged"] == {"differential_v2": ["seed 0 at step 4 of 6"],
                                                                  "no_mod": ["seed 0 at step 4 of 6"]}
  readme = (report_dir / "README.md").read_text()
  assert ("Not in the table, stopped by non-finite updates: Diff-Transformer V2 λ = sigmoid(W_λ x) per token, seed 0 "
          "at step 4 of 6; No Mixture-of-Depths, seed 0 at step 4 of 6.") in readme
  # Without the full arm there is no Δ column to report against.
  with pytest.raises(ablate.AblationError, match=re.escape(
      "stopped full seed 0 at step 4 of 6; differential_v2 seed 0 at step 4 of 6. No report without the full "
      "arm (the Δ column's reference): change optimizer.peak_lr or optimizer.grad_clip for every arm with a new "
      "--workdir.")):
    ablate.run(smoke_config(), str(tmp_path / "other"), str(tmp_path / "other_report"))
  assert not os.path.exists(tmp_path / "other_report" / "README.md")


def test_ctrl_c_outside_training_ends_the_command_in_one_line(tmp_path):
  """Ctrl-C (here raised while the corpus is built, before any run trains) ends the command with one line and
  exit 130, not a traceback."""
  code = ("import runpy, sys\nfrom diffmoe_jax import data\n"
          "def interrupted(*args, **kwargs):\n  raise KeyboardInterrupt\n"
          f"data.build_corpus = interrupted\nsys.argv = ['ablate', '--workdir={tmp_path}']\n"
          "runpy.run_module('diffmoe_jax.ablate', run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().startswith("error: interrupted at once; finished runs"), proc.stderr[-2000:]


def test_seeds_past_32_bits_are_refused_before_anything_trains(tmp_path, monkeypatch):
  """The last seeds of config.seed + i crashed with an OverflowError traceback (from 2**63), or trained seed 0's
  weights again (2**32), after the first had trained."""
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  config = smoke_config()
  config.seed, config.ablation.seeds = 2**32 - 2, 3
  with pytest.raises(ablate.AblationError, match=re.escape(
      "config.seed=4294967294 with config.ablation.seeds=3: the seeds run from config.seed to 4294967296, past "
      "2**32 - 1; lower config.seed.")):
    ablate.run(config, str(tmp_path / "runs"))
  config.ablation.seeds = 2
  assert ablate.seeds(config) == [2**32 - 2, 2**32 - 1]


def test_a_damaged_result_is_one_line_error(tmp_path):
  run_dir = tmp_path / "full" / "seed0"
  run_dir.mkdir(parents=True)
  (run_dir / "result.json").write_text('{"loss": 3.9')  # cut short
  proc = subprocess.run([sys.executable, "-m", "diffmoe_jax.ablate", "--config=configs/ablation.py",
                         "--config.ablation.arms=full", "--config.ablation.seeds=1", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {run_dir}/result.json is damaged (") and last.endswith(
      "); delete it to train that run again."), last


def test_a_report_dir_that_is_a_file_names_the_flag(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(WorkdirError, match=re.escape(f"The report_dir {a_file} is a file, not a directory; pass "
                                                   "another --report_dir.")):
    ablate.run(smoke_config(), str(tmp_path / "runs"), str(a_file))
  assert not (tmp_path / "runs").exists()  # the workdir it created for the ablation (and locked) is removed


@pytest.mark.parametrize("name, text", [("README.md", "# My project\n"), ("results.json", '{"loss": 2.5}'),
                                        ("lambda.png", "a plot of the user's")])
def test_a_report_dir_holding_files_of_something_else_is_refused_before_training(tmp_path, monkeypatch, name, text):
  """--report_dir=. in a repository would have replaced its README.md (and another tool's results.json, or a
  plot of the report's name) after all the training; the command refuses at once and leaves the file as it was."""
  (tmp_path / name).write_text(text)
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  with pytest.raises(ablate.AblationError, match=re.escape(f"{tmp_path / name} is not from an ablation report")):
    ablate.run(smoke_config(), str(tmp_path / "runs"), str(tmp_path))
  assert (tmp_path / name).read_text() == text and not (tmp_path / "runs").exists()
  # The committed report is one the command may rewrite.
  assert ablate_analysis.foreign_report_file(os.path.join(REPO, "results", "ablation")) is None


def test_rewritten_report_names_the_corpus_and_drops_figures_it_no_longer_draws(smoke, tmp_path):
  """A report dir of an earlier run with the power-of-two arm keeps no stable_rank.png this report lacks; the
  user's own files stay."""
  workdir, _, _ = smoke
  config = smoke_config()
  config.data.domains.update({"code": "files:src/*.py", "docs": "files:doc/*.md"})
  (tmp_path / "stable_rank.png").write_bytes(b"from an earlier run")
  (tmp_path / "notes.txt").write_text("the user's")
  names = ablate.arm_names(config)
  records = []
  for arm in names:
    with open(os.path.join(workdir, arm, "seed0", "result.json")) as f:
      records.append(json.load(f))
  ablate_analysis.write_report(config, names, {arm: ablate.ARMS[arm].label for arm in names},
                               {arm: ablate.arm_config(config, arm, 0)[0].model for arm in names}, [0], records,
                               workdir, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["README.md", "lambda.png", "loss_curves.png", "notes.txt", "results.json"]
  readme = (tmp_path / "README.md").read_text()
  assert "built-in" not in readme and "on the corpus code = 'files:src/*.py', docs = 'files:doc/*.md'," in readme


def test_a_report_that_fails_to_write_keeps_its_results_json_whole(tmp_path, monkeypatch):
  """A full disk while results.json was written left it cut short, and every rerun then refused the report dir
  as one no ablation report wrote."""
  import errno
  from diffmoe_jax.train import metrics
  config = smoke_config()
  names = ["full"]
  writer = metrics.MetricWriter(tmp_path / "full" / "seed0" / "tb")
  writer.scalars(3, {"train/loss": 3.0, "eval/loss": 3.5})
  writer.close()
  records = [{"arm": "full", "seed": 0, "change": "none", "params": {"total": 10, "active": 5}, "final_step": 3,
              "wall_seconds": 1.0, "lambda": None, "eval": {"loss": 3.5, "code/bits_per_byte": 4.0,
                                                           "docs/bits_per_byte": 4.5}}]
  report_dir = tmp_path / "report"
  report_dir.mkdir()
  write = lambda: ablate_analysis.write_report(config, names, {"full": "Full"}, {"full": config.model}, [0], records,
                                               str(tmp_path), str(report_dir))
  first = write()

  def disk_full(value, f, **kwargs):
    f.write("{")
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(json, "dump", disk_full)
  with pytest.raises(OSError):
    write()
  monkeypatch.undo()
  assert ablate_analysis.foreign_report_file(str(report_dir)) is None
  assert json.loads((report_dir / "results.json").read_text()) == json.loads(json.dumps(first))


def test_a_report_of_runs_that_logged_no_stable_rank_says_so(tmp_path):
  """With the power-of-two arm and train.stable_rank_every past the curriculum's end (configs/ablation.py's 20
  with --config.curriculum.total_steps=12), the report failed with an IndexError after all the training."""
  from diffmoe_jax.train import metrics
  config = smoke_config()
  config.train.stable_rank_every = 100
  names = ["full", "power_of_two"]
  records = []
  for arm in names:
    writer = metrics.MetricWriter(tmp_path / arm / "seed0" / "tb")
    for step in (3, 6):
      writer.scalars(step, {"train/loss": 3.0, "eval/loss": 3.5})
    writer.close()
    records.append({"arm": arm, "seed": 0, "change": "none", "params": {"total": 10, "active": 5}, "final_step": 6,
                    "wall_seconds": 1.0, "lambda": None,
                    "eval": {"loss": 3.5, "code/bits_per_byte": 4.0, "docs/bits_per_byte": 4.5}})
  ablation = config_lib.load_file(os.path.join(REPO, "configs", "ablation.py"))
  report_dir = tmp_path / "report"
  report_dir.mkdir()
  summary = ablate_analysis.write_report(config, names, {arm: ablate.ARMS[arm].label for arm in names},
                                         {arm: ablate.arm_config(ablation, arm, 0)[0].model for arm in names}, [0],
                                         records, str(tmp_path), str(report_dir))
  assert "stable_rank" not in summary and not (report_dir / "stable_rank.png").exists()
  readme = (report_dir / "README.md").read_text()
  assert ("Not measured: the runs logged no stable rank (train.stable_rank_every=100, curriculum of 6 steps); set "
          "train.stable_rank_every to at most 6 (with a new --workdir) to compare.") in readme
