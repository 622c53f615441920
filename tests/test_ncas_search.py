"""The π-constrained architecture search end to end: the smoke search and its report, proxies reused, refused,
stopped and diverged, and the command line."""
import copy
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from diffmoe_jax import config as config_lib, validation
from diffmoe_jax import data, estimate
from diffmoe_jax.config import ConfigError
from diffmoe_jax.ncas import complete, report, scores, search
from diffmoe_jax.train.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_output_closed_early_ends_quietly(tmp_path):
  """`python -m diffmoe_jax.ncas ... | head -1` ended with a BrokenPipeError traceback."""
  proc = subprocess.Popen([sys.executable, "-m", "diffmoe_jax.ncas", "--config=configs/ncas_smoke.py",
                           f"--workdir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  proc.stdout.close()  # the reader is gone before the first line
  stderr = proc.communicate(timeout=120)[1]
  assert proc.returncode == 141 and "Traceback" not in stderr, stderr[-2000:]


def test_a_scale_with_no_proxy_head_layout_names_the_field(tmp_path):
  c = search.defaults()
  c.ncas.proxy.scale = 16  # 2592 / 16 = 162 is not a multiple of 4
  with pytest.raises(ConfigError, match=r"config\.ncas\.proxy\.scale.*2592"):
    search.run(c, str(tmp_path), log=lambda line: None)


def smoke_config():
  c = search.defaults()
  c.ncas.space.update(min_width=2304, max_width=2592, step=288)  # 2304 and 2592
  c.ncas.baseline = False
  c.ncas.proxy.update(scale=24, seq_len=16, tokens_per_batch=128, steps=6, eval_batches=1)
  return c


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ncas"))
  lines = []
  return workdir, search.run(smoke_config(), workdir, log=lines.append), lines


def test_a_proxy_too_large_for_the_machine_is_refused_before_any_trains(tmp_path, monkeypatch):
  """The search trains through loop.train, which has no memory preflight: a proxy too large (a wide search
  space) ran out of memory when the search reached it, after the smaller ones had trained."""
  from diffmoe_jax.train import loop, preflight
  monkeypatch.setattr(data, "build_corpus", lambda *args: pytest.fail("the data was built before refusing"))
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 2**20)
  with pytest.raises(preflight.InsufficientMemoryError, match=r"^the proxy pi_2304: This config needs about .*; lower "
                     r"config\.ncas\.space\.max_width, or raise config\.ncas\.proxy\.scale \(a smaller proxy\)\.$"):
    search.run(smoke_config(), str(tmp_path), log=lambda line: None)


def test_a_throughput_measurement_too_large_for_the_machine_is_refused_before_any_proxy_trains(tmp_path, monkeypatch):
  """ncas.hardware.measure='on' ran out of memory (a traceback) when the first candidate was measured."""
  from diffmoe_jax.train import loop, preflight
  monkeypatch.setattr(data, "build_corpus", lambda *args: pytest.fail("the data was built before refusing"))
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  c = smoke_config()
  c.ncas.hardware.update(measure="on", measure_seq_len=8192, measure_batch_size=64)
  arch = complete.complete(2592, search.completion_rules(c.ncas))
  need = scores.measurement_bytes(arch, seq_len=8192, batch_size=64)
  assert need > 40 * 2**30  # 2592 wide at 64 x 8,192 tokens
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: need / 2)
  with pytest.raises(preflight.InsufficientMemoryError, match=r"^measuring the throughput of d_model 2592 \(64 "
                     r"sequences of 8,192 tokens, config\.ncas\.hardware\.measure = 'on'\) needs about .*; lower "
                     r"config\.ncas\.hardware\.measure_seq_len or measure_batch_size, or set config\.ncas\.hardware"
                     r"\.measure='off'\.$"):
    search.run(c, str(tmp_path), log=lambda line: None)


def test_a_second_search_in_a_workdir_is_refused_at_once(tmp_path, monkeypatch):
  """It screened, read the data and ran until it reached the proxy the first search was training."""
  from diffmoe_jax.train import workdir as workdir_lib
  monkeypatch.setattr(data, "build_corpus", lambda *args: pytest.fail("the data was built before refusing"))
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match="is in use by another run"):
      search.run(smoke_config(), str(tmp_path), log=lambda line: None)


@pytest.mark.parametrize("min_width, baseline, first_line", [
    (2304, True, "; 2 to score."),  # no power of two in the range: it said "(with the power-of-two baseline)"
    (2048, True, "; 3 to score (1 of them the power-of-two baseline)."),
    (2048, False, "; 2 to score."),
])
def test_the_first_line_counts_the_baseline_widths_it_scores(tmp_path, monkeypatch, min_width, baseline,
                                                             first_line):
  from diffmoe_jax.train import preflight
  monkeypatch.setattr(preflight, "available_bytes_per_device", lambda: 2**20)  # stops the search after the line
  config = smoke_config()
  config.ncas.space.min_width, config.ncas.baseline = min_width, baseline
  config.ncas.proxy.scale = 8  # a proxy layout for 2048 too
  lines = []
  with pytest.raises(preflight.InsufficientMemoryError):
    search.run(config, str(tmp_path), log=lines.append)
  assert lines[0].endswith(first_line), lines[0]


def test_smoke_search_writes_the_report(smoke):
  workdir, result, lines = smoke
  with open(os.path.join(workdir, "table.csv")) as f:
    table = list(csv.DictReader(f))
  assert [int(r["width"]) for r in table] == [2304, 2592]
  assert all(float(r["proxy_loss"]) > 0 for r in table)
  with open(os.path.join(workdir, "front.json")) as f:
    front = json.load(f)
  assert {r["width"] for r in front["fronts"]["pi"]} == {int(k.split("_")[1]) for k in result["fronts"]["pi"]}
  assert os.path.getsize(os.path.join(workdir, "front.png")) > 1000
  assert any(line.startswith("[2/2]") for line in lines)
  assert lines[0].endswith("; 2 to score.")  # ncas.baseline is off
  with open(os.path.join(workdir, "proxies", "pi_2304", "result.json")) as f:
    assert json.load(f)["data"] == data.build_corpus(smoke_config().data).fingerprint


def test_resume_skips_finished_proxies(smoke, monkeypatch):
  workdir, result, _ = smoke
  from diffmoe_jax.train import loop

  def no_training(*args, **kwargs):
    raise AssertionError("a finished proxy was trained again")

  monkeypatch.setattr(loop, "train", no_training)
  again = search.run(smoke_config(), workdir, log=lambda line: None)
  assert again["fronts"] == result["fronts"]
  assert [r.get("proxy_loss") for r in again["rows"]] == [r.get("proxy_loss") for r in result["rows"]]
  # The report's time is the proxies' training, not the few seconds of this rerun ("Wall time 4 s." before).
  trained = 0.0
  for name in ("pi_2304", "pi_2592"):
    with open(os.path.join(workdir, "proxies", name, "result.json")) as f:
      trained += json.load(f)["seconds"]
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  assert (f"Wall time: the 2 proxies trained for {trained:.0f} s in all (each over all its invocations); this "
          f"invocation reused 2 of them and took {again['seconds']:.0f} s.") in text
  with open(os.path.join(workdir, "front.json")) as f:
    assert json.load(f)["proxy_seconds"] == pytest.approx(trained)


def test_emitted_configs_validate_and_build(smoke):
  workdir, result, _ = smoke
  paths = sorted(os.listdir(os.path.join(workdir, "configs")))
  assert paths == sorted(f"ncas_{k.split('_')[1]}.py" for k in dict.fromkeys(result["fronts"]["pi"] + result["fronts"]["joint"]))
  rows = {r["width"]: r for r in result["rows"]}
  for path in paths:
    c = validation.validate(config_lib.load_file(os.path.join(workdir, "configs", path)))
    width = c.model.d_model
    assert dataclasses.astuple(rows[width]["arch"]) == (width, c.model.num_layers, c.model.num_heads, c.model.head_dim,
                                                         c.model.moe.num_experts, c.model.moe.top_k,
                                                         c.model.moe.expert_ffn_dim, c.model.max_seq_len)
    assert estimate.count_params(c.model).total == rows[width]["total_params"]  # builds the model (eval_shape)


def test_cli_reports_an_unknown_rule_in_one_line():
  proc = subprocess.run([sys.executable, "-m", "diffmoe_jax.ncas", "--config=configs/ncas.py",
                         "--config.ncas.rules.enabled=('three_smooth','prime_width')", "--workdir=/nonexistent/x"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.ncas.rules.enabled:")
  assert "Traceback" not in proc.stderr


def test_a_stopped_proxy_stops_the_search_resumably(tmp_path, monkeypatch):
  """A first Ctrl-C or SIGTERM stops the proxy's training with a checkpoint and no evaluation: the search
  stops too (it read the missing validation loss before) and writes no result for that proxy."""
  from diffmoe_jax.train import loop
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: loop.RunResult(final_step=3, stopped="SIGTERM",
                                                                            eval={}))
  config = smoke_config()
  arch = complete.complete(2304, search.completion_rules(config.ncas))
  with pytest.raises(search.SearchStopped, match="the proxy pi_2304 stopped early \\(SIGTERM\\); finished proxies "
                     "are kept, rerun the same command to resume"):
    search.train_proxy(config, arch, "pi", str(tmp_path), corpus=None, log=lambda line: None)
  assert not os.path.exists(tmp_path / "proxies" / "pi_2304" / "result.json")


def test_a_proxy_stopped_part_way_and_rerun_with_other_settings_names_the_searchs_fix(tmp_path, monkeypatch):
  """The resume check's advice, --config.train.allow_config_change, is no field of a search config: the search
  refused it when the user followed it."""
  from diffmoe_jax.train import loop, resume
  config = smoke_config()
  arch = complete.complete(2304, search.completion_rules(config.ncas))

  def train(cfg, run_dir, corpus):  # the checkpoint a proxy of one step fewer saved
    saved = copy.deepcopy(cfg)
    saved.curriculum.total_steps -= 1
    resume.check(cfg, saved_config=saved.to_dict(), saved_shapes=None, abstract_state=None, step=3,
                 directory=os.path.join(run_dir, "checkpoints"))

  monkeypatch.setattr(loop, "train", train)
  total = config.ncas.proxy.steps
  with pytest.raises(ConfigError) as error:
    search.train_proxy(config, arch, "pi", str(tmp_path), corpus=None, log=lambda line: None)
  assert str(error.value) == (
      f"{tmp_path / 'proxies' / 'pi_2304'} holds a proxy trained part way with another proxy config "
      f"(curriculum.total_steps {total - 1} -> {total}); rerun with the config.ncas settings it was started with, "
      "pass a new --workdir, or delete that proxy to train it again.")


def test_a_signal_during_a_proxys_last_step_stops_the_search_after_that_proxy(tmp_path, monkeypatch):
  """The loop finishes a proxy whose last step received a SIGTERM: the search went on to the next proxy."""
  from diffmoe_jax.train import loop

  def train(config, run_dir, corpus):
    os.makedirs(run_dir)
    return loop.RunResult(final_step=6, stopped=None, eval={"loss": 3.0}, received_signal="SIGTERM")

  monkeypatch.setattr(loop, "train", train)
  config = smoke_config()
  arch = complete.complete(2304, search.completion_rules(config.ncas))
  with pytest.raises(search.SearchStopped, match="SIGTERM received as the proxy pi_2304 finished; finished proxies "
                     "are kept, rerun the same command to resume"):
    search.train_proxy(config, arch, "pi", str(tmp_path), corpus=types.SimpleNamespace(fingerprint={}),
                       log=lambda line: None)
  assert os.path.exists(tmp_path / "proxies" / "pi_2304" / "result.json")


def test_the_front_keeps_the_most_capacity_and_efficiency_and_the_lowest_loss(tmp_path, monkeypatch):
  """The fronts a search reports, against pairwise dominance in a plain loop (capacity and efficiency higher, proxy
  loss lower is better), with proxy losses set so that 3456 dominates 2592 only by its lower loss: the proxy loss
  maximised instead passed every test."""
  config = smoke_config()
  config.ncas.space.update(min_width=2304, max_width=3456)  # 2304, 2592 and 3456 pass the rules
  losses = {2304: 3.0, 2592: 2.5, 3456: 2.0}
  monkeypatch.setattr(search, "train_proxy", lambda config, arch, *args: {"loss": losses[arch.d_model], "seconds": 1.0})
  result = search.run(config, str(tmp_path), log=lambda line: None)
  scored = [r for r in result["rows"] if r.get("proxy_loss") is not None]
  assert [r["width"] for r in scored] == [2304, 2592, 3456]

  def beats(a, b):
    at_least = (a["capacity_gbit"] >= b["capacity_gbit"] and a["efficiency"] >= b["efficiency"]
                and a["proxy_loss"] <= b["proxy_loss"])
    return at_least and (a["capacity_gbit"] > b["capacity_gbit"] or a["efficiency"] > b["efficiency"]
                         or a["proxy_loss"] < b["proxy_loss"])

  front = [f"pi_{r['width']}" for r in scored if not any(beats(q, r) for q in scored)]
  assert result["fronts"]["pi"] == result["fronts"]["joint"] == front
  assert "pi_2592" not in front  # a front of every row would not tell the directions apart


def test_the_joint_front_pools_both_families_and_each_of_its_points_gets_a_config(tmp_path, monkeypatch):
  """With the baseline scored, the joint front is dominance over the π and power-of-two rows together, and every
  point on it gets a config file, a baseline width's too (the π rows alone pooled, and configs for the π front
  alone, passed every test: no other search scores the baseline)."""
  config = smoke_config()
  config.ncas.baseline = True
  config.ncas.space.update(min_width=2048, max_width=2592, step=32)  # π: 2304 and 2592; power of two: 2048
  config.ncas.proxy.scale = 8  # a common scale of both families must be a power of two
  losses = {2048: 2.8, 2304: 3.0, 2592: 2.5}
  monkeypatch.setattr(search, "train_proxy", lambda config, arch, *args: {"loss": losses[arch.d_model], "seconds": 1.0})
  result = search.run(config, str(tmp_path), log=lambda line: None)
  scored = [r for r in result["rows"] if r.get("proxy_loss") is not None]
  assert sorted(report.row_key(r) for r in scored) == ["pi_2304", "pi_2592", "power_of_two_2048"]
  objectives = ("capacity_gbit", "efficiency", "proxy_loss")
  signs = {"capacity_gbit": 1, "efficiency": 1, "proxy_loss": -1}
  beats = lambda a, b: (all(signs[o] * a[o] >= signs[o] * b[o] for o in objectives)
                        and any(signs[o] * a[o] > signs[o] * b[o] for o in objectives))
  joint = [report.row_key(r) for r in scored if not any(beats(q, r) for q in scored)]
  assert sorted(result["fronts"]["joint"]) == sorted(joint) and "power_of_two_2048" in joint
  widths = {int(key.rsplit("_", 1)[1]) for key in result["fronts"]["pi"] + joint}
  assert sorted(os.listdir(tmp_path / "configs")) == sorted(f"ncas_{w}.py" for w in widths)
  # table.csv names each row's fronts; table.md's scored table holds the scored rows alone (each passed every
  # test inverted).
  with open(tmp_path / "table.csv", newline="") as f:
    table = {f"{r['family']}_{r['width']}": r["fronts"].split() for r in csv.DictReader(f)}
  assert table == {report.row_key(r): [name for name, keys in result["fronts"].items() if report.row_key(r) in keys]
                   for r in result["rows"]}
  scored_md = (tmp_path / "table.md").read_text().split("## π candidates")[0]
  listed = [line.split(" | ")[:2] for line in scored_md.splitlines() if line.startswith(("| pi |", "| power_of_two |"))]
  assert sorted(f"{family[2:]}_{width}" for family, width in listed) == sorted(report.row_key(r) for r in scored)


def test_a_diverged_proxy_is_a_result_on_no_front_and_the_search_goes_on(smoke, tmp_path, monkeypatch):
  """A proxy stopped by non-finite updates ended the search with the training config's advice (optimizer.peak_lr,
  --config.train.allow_config_change), which a search config has no field for; a rerun resumed it into the same
  stop, so no search could pass that width."""
  from diffmoe_jax.train import loop

  def train(config, run_dir, corpus):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "train_seconds.json"), "w") as f:
      json.dump({"seconds": 12.5}, f)
    raise loop.TrainingStopped("11 non-finite updates in a row up to step 12 (train.max_nonfinite_in_a_row is 10): "
                               "training stopped. Skipped updates never touch the weights. Change optimizer.peak_lr.", 12)

  monkeypatch.setattr(loop, "train", train)
  config = smoke_config()
  arch = complete.complete(2304, search.completion_rules(config.ncas))
  corpus = types.SimpleNamespace(fingerprint={"code": "k1"})
  lines = []
  result = search.train_proxy(config, arch, "pi", str(tmp_path), corpus, log=lines.append)
  reason = "11 non-finite updates in a row up to step 12 (train.max_nonfinite_in_a_row is 10): training stopped"
  assert np.isnan(result["loss"]) and result["diverged"] == reason and result["seconds"] == 12.5
  assert lines == [f"  pi_2304: diverged ({reason}), so it has no proxy loss and is on no Pareto front; a lower "
                   "config.ncas.proxy.peak_lr in a new --workdir trains every proxy again."]
  lines.clear()
  again = search.train_proxy(config, arch, "pi", str(tmp_path), corpus, log=lines.append)  # not trained again
  assert np.isnan(again["loss"]) and lines == [f"  pi_2304: diverged before ({reason}), no proxy loss"]
  # The report: the front leaves it out, report.md names it, the plot draws the rest.
  _, smoke_result, _ = smoke
  rows = copy.deepcopy(smoke_result["rows"])
  rows[0].update(proxy=again, proxy_loss=again["loss"])
  assert [rows[i]["width"] for i in scores.pareto_front(rows, smoke_result["objectives"])] == [2592]
  fronts = {"pi": ["pi_2592"], "power_of_two": [], "joint": ["pi_2592"]}
  search.write_report(config, str(tmp_path), {**smoke_result, "rows": rows, "fronts": fronts})
  with open(tmp_path / "report.md") as f:
    assert f"Diverged proxies (no proxy loss, so on no front): pi_2304 ({reason})." in f.read()
  assert os.path.getsize(tmp_path / "front.png") > 1000


def test_a_proxy_finished_with_another_config_is_not_reused(smoke):
  workdir, _, _ = smoke
  config = smoke_config()
  config.ncas.proxy.steps = 7
  arch = complete.complete(2304, search.completion_rules(config.ncas))
  # Named as the search config sets it (it named the generated config.curriculum.<phase>.steps).
  with pytest.raises(ConfigError, match=r"proxies/pi_2304 finished with another proxy config \(config\.ncas\.proxy\."
                     r"steps: 6 there, 7 now\); pass a new --workdir"):
    search.train_proxy(config, arch, "pi", workdir, corpus=None, log=lambda line: None)


def test_cli_workdir_that_is_a_file_or_empty_is_one_line(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for workdir, message in ((a_file, f"error: The workdir {a_file} is a file, not a directory"),
                           ("", "error: The workdir is empty; pass the run's directory")):
    proc = subprocess.run([sys.executable, "-m", "diffmoe_jax.ncas", "--config=configs/ncas.py",
                           f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]


def finished_proxy(workdir, config, record: dict, width: int = 2304):
  """Writes a result.json for the proxy pi_<width> of `config`, as a finished one has, plus `record`."""
  arch = complete.complete(width, search.completion_rules(config.ncas))
  run_dir = os.path.join(workdir, "proxies", f"pi_{width}")
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump({"loss": 3.0, "config": json.loads(search.proxy_config(config, arch, f"pi_{width}").to_json_best_effort()),
               **record}, f)
  return arch, run_dir


def test_a_proxy_finished_with_other_settings_is_refused_before_any_proxy_trains(tmp_path, monkeypatch):
  """It was refused when the search reached it: the proxies before it trained first, with the new settings, into
  a workdir holding the earlier search's."""
  from diffmoe_jax.train import loop
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("a proxy trained before the refusal"))
  earlier = smoke_config()
  earlier.ncas.proxy.peak_lr = 1e-3
  _, run_dir = finished_proxy(str(tmp_path), earlier, {}, width=2592)
  with pytest.raises(ConfigError, match=re.escape(f"{run_dir} finished with another proxy config "
                                                  "(config.optimizer.peak_lr: 0.001 there, 0.003 now)")):
    search.run(smoke_config(), str(tmp_path), log=lambda line: None)


def test_a_proxy_finished_on_other_data_is_not_reused(tmp_path):
  config = smoke_config()
  arch, run_dir = finished_proxy(str(tmp_path), config, {"data": {"code": "k1", "docs": "k2"}})
  changed = types.SimpleNamespace(fingerprint={"code": "k1", "docs": "k3"})  # a file added to docs
  with pytest.raises(WorkdirError, match=re.escape(
      f"{run_dir} finished on other training data (config.data.domains.docs: its files changed since); pass a "
      "new --workdir, or delete that run to train it again.")):
    search.train_proxy(config, arch, "pi", str(tmp_path), changed, log=lambda line: None)
  same = types.SimpleNamespace(fingerprint={"code": "k1", "docs": "k2"})
  assert search.train_proxy(config, arch, "pi", str(tmp_path), same, log=lambda line: None)["loss"] == 3.0


def test_a_proxy_result_from_before_data_fingerprints_is_reused_with_a_note(tmp_path):
  config = smoke_config()
  arch, run_dir = finished_proxy(str(tmp_path), config, {})
  lines = []
  corpus = types.SimpleNamespace(fingerprint={"code": "k1", "docs": "k2"})
  assert search.train_proxy(config, arch, "pi", str(tmp_path), corpus, log=lines.append)["loss"] == 3.0
  assert f"note: {run_dir} has no record of its training data, so a change in it could not be checked." in lines


def test_a_proxy_result_from_before_config_records_is_reused_with_a_note(tmp_path):
  """An earlier version's result.json has no config: it was reused without a word, whatever the proxy settings."""
  config = smoke_config()
  arch, run_dir = finished_proxy(str(tmp_path), config, {"data": {"code": "k1"}})
  result_path = os.path.join(run_dir, "result.json")
  with open(result_path) as f:
    result = json.load(f)
  del result["config"]
  with open(result_path, "w") as f:
    json.dump(result, f)
  lines = []
  corpus = types.SimpleNamespace(fingerprint={"code": "k1"})
  assert search.train_proxy(config, arch, "pi", str(tmp_path), corpus, log=lines.append)["loss"] == 3.0
  assert lines[0] == f"note: {run_dir} has no record of its proxy config, so a change in it could not be checked."


def test_a_damaged_proxy_result_is_one_error_naming_it(tmp_path):
  config = smoke_config()
  arch, run_dir = finished_proxy(str(tmp_path), config, {})
  path = os.path.join(run_dir, "result.json")
  with open(path, "w") as f:
    f.write('{"loss": 3.9')  # cut short
  with pytest.raises(WorkdirError, match=re.escape(f"{path} is damaged (") + r".*\); delete it to train that run "
                     r"again\.$"):
    search.train_proxy(config, arch, "pi", str(tmp_path), corpus=None, log=lambda line: None)


@pytest.mark.parametrize("layout, holds", [("checkpoints", "a training run"), ("full/seed0", "an ablation")])
def test_a_workdir_holding_another_commands_runs_is_refused(tmp_path, monkeypatch, layout, holds):
  """A search in a training run's workdir trained its proxies beside the run's checkpoints."""
  from diffmoe_jax.train import loop
  os.makedirs(tmp_path / layout)
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  with pytest.raises(WorkdirError, match=re.escape(f"The workdir {tmp_path} holds {holds}, not an NCAS search; "
                                                   "pass another --workdir.")):
    search.run(smoke_config(), str(tmp_path), log=lambda line: None)


def test_a_report_dir_holding_an_ablations_report_is_refused(tmp_path, monkeypatch):
  from diffmoe_jax.train import loop
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  with pytest.raises(WorkdirError, match=re.escape(f"The report_dir {os.path.join(ROOT, 'results', 'ablation')} "
                                                   "holds an ablation's report; pass another --report_dir")):
    search.run(smoke_config(), str(tmp_path / "runs"), log=lambda line: None,
               report_dir=os.path.join(ROOT, "results", "ablation"))
  assert not (tmp_path / "runs").exists()


def test_a_report_dir_that_is_a_file_names_the_flag(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(WorkdirError, match=re.escape(f"The report_dir {a_file} is a file, not a directory; pass "
                                                   "another --report_dir.")):
    search.run(smoke_config(), str(tmp_path / "runs"), log=lambda line: None, report_dir=str(a_file))
  assert not (tmp_path / "runs").exists()


def test_rewriting_the_report_removes_configs_of_points_no_longer_on_the_front(smoke, tmp_path):
  """Only the config files a report wrote: it removed any ncas_<number>.py, the user's own too."""
  _, result, _ = smoke
  configs = tmp_path / "configs"
  configs.mkdir()
  (configs / "ncas_9216.py").write_text(f'"""NCAS Pareto point d_model 9216; {report.CONFIG_MARK}"""\n')
  (configs / "ncas_7.py").write_text("# the user's, named as a report's")
  (configs / "mine.py").write_text("# the user's")
  search.write_report(smoke_config(), str(tmp_path), result)
  front = [f"ncas_{k.split('_')[1]}.py" for k in dict.fromkeys(result["fronts"]["pi"] + result["fronts"]["joint"])]
  assert sorted(os.listdir(configs)) == sorted(front + ["mine.py", "ncas_7.py"])


@pytest.mark.parametrize("path, text", [("report.md", "my notes"), ("table.csv", "a,b"), ("front.json", "[]"),
                                        ("configs/ncas_9999.py", "x = 1"), ("configs", "a file")])
def test_a_report_dir_holding_files_no_report_wrote_is_refused_before_any_proxy_trains(tmp_path, monkeypatch, path,
                                                                                         text):
  """The report replaced the user's report.md and table.csv and removed any configs/ncas_<number>.py."""
  from diffmoe_jax.train import loop
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("trained before refusing"))
  (tmp_path / "docs" / "configs").mkdir(parents=True)
  if path == "configs":
    (tmp_path / "docs" / "configs").rmdir()
  (tmp_path / "docs" / path).write_text(text)
  with pytest.raises(WorkdirError, match=re.escape(f"{tmp_path / 'docs' / path} is not from an NCAS report, and the "
                                                   "report would replace or remove it; pass another --report_dir")):
    search.run(smoke_config(), str(tmp_path / "runs"), log=lambda line: None, report_dir=str(tmp_path / "docs"))
  assert (tmp_path / "docs" / path).read_text() == text
  assert not (tmp_path / "runs").exists()  # the workdir it created for the search is removed


def test_a_report_dir_a_report_was_written_to_is_accepted(smoke, tmp_path):
  workdir, result, _ = smoke
  assert report.foreign_report_file(workdir) is None  # the search's own, in its workdir
  assert report.foreign_report_file(os.path.join(ROOT, "results", "ncas")) is None  # the committed one
  search.write_report(smoke_config(), str(tmp_path), result)
  assert report.foreign_report_file(str(tmp_path)) is None
  (tmp_path / "report.md").unlink()  # a report cut short after its front.json
  assert report.foreign_report_file(str(tmp_path)) is None
