"""The π-constrained architecture search: rules, completion, scores, Pareto front, the search end to end."""
import copy
import csv
import dataclasses
import json
import math
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
from diffmoe_jax.ncas import complete, rules, scores, search
from diffmoe_jax.train.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = rules.RuleSettings(min_width=2048, max_width=8192, tile=32, head_dims=(128, 144))


def test_paper_widths_pass_and_4096_fails_by_name():
  for width in (4608, 3456, 2592):
    assert rules.rejecting_rule(width, rules.DEFAULT_RULES, SETTINGS) is None
  assert rules.rejecting_rule(4096, rules.DEFAULT_RULES, SETTINGS) == "not_power_of_two"


def smooth(n: int) -> bool:
  """Whether n has no prime factor above 3, by dividing them out."""
  while n % 2 == 0:
    n //= 2
  while n % 3 == 0:
    n //= 3
  return n == 1


def readme_first_failed(d: int, low: int, high: int) -> str | None:
  """The first of README's rules (its NCAS table, in order) the width d fails, checked in a plain loop."""
  power = 1
  while power < d:
    power *= 2
  checks = [("in_range", low <= d <= high), ("three_smooth", smooth(d)), ("not_power_of_two", power != d),
            ("tile_aligned", d % 32 == 0), ("differential_heads", d % 128 == 0 or d % 144 == 0)]
  return next((name for name, ok in checks if not ok), None)


def test_the_readme_rules_in_a_naive_loop_keep_the_nine_widths_it_quotes():
  """README: "The space is the 2,048 multiples of 3 in [2048, 8192] ... Nine widths pass: 2304, 2592, 3072,
  3456, 4608, 5184, 6144, 6912 and 7776"; 2048, 4096 and 8192 are the baseline, rejected by not_power_of_two."""
  expected = {d: readme_first_failed(d, 2048, 8192) for d in range(2048, 8193) if d % 3 == 0}
  rows = search.screen(search.defaults())
  assert {r["width"]: r["rejected_by"] for r in rows if r["family"] == search.PI} == expected
  assert len(expected) == 2048
  assert [d for d, rule in expected.items() if rule is None] == [2304, 2592, 3072, 3456, 4608, 5184, 6144, 6912, 7776]
  assert [(r["width"], r["rejected_by"]) for r in rows if r["family"] == search.BASELINE] == [
      (2048, "not_power_of_two"), (4096, "not_power_of_two"), (8192, "not_power_of_two")]


@pytest.mark.parametrize("rule, passing, failing", [
    ("in_range", [2048, 5000, 8192], [2047, 8193]),
    ("three_smooth", [2304, 2592, 4096, 7776], [2560, 3000, 4100, 5120]),
    ("not_power_of_two", [3072, 2592, 6], [2048, 4096, 8192]),
    ("tile_aligned", [2592, 3456, 4096], [2916, 3888, 2187]),
    ("differential_heads", [4608, 2592, 1296], [2916, 3000, 1000]),
])
def test_each_rule_on_hand_picked_widths(rule, passing, failing):
  for width in passing:
    assert rules.RULES[rule](width, SETTINGS), (rule, width)
  for width in failing:
    assert not rules.RULES[rule](width, SETTINGS), (rule, width)


def test_rules_can_be_switched_off():
  assert rules.rejecting_rule(4096, ("in_range", "three_smooth", "tile_aligned"), SETTINGS) is None


@pytest.mark.parametrize("path, value, field", [
    ("ncas.rules.enabled", ("three_smooth", "prime_width"), "config.ncas.rules.enabled"),
    ("ncas.space.max_width", 1000, "config.ncas.space"),
    ("ncas.proxy.steps", 0, "config.ncas.proxy.steps"),
    ("ncas.proxy.tokens_per_batch", 0, "config.ncas.proxy.tokens_per_batch"),
    # The proxy's fields, not those of the training config generated from them (curriculum.*).
    ("ncas.proxy.seq_len", 100000, "config.ncas.proxy.tokens_per_batch: 256 is below config.ncas.proxy.seq_len"),
    ("ncas.proxy.eval_batch_size", 0, "config.ncas.proxy.eval_batch_size"),
    # Not as curriculum.tokens_per_batch, with curriculum.warmup.batch_size (no search field) as the fix.
    ("ncas.proxy.tokens_per_batch", 300, "config.ncas.proxy.tokens_per_batch: 300 is not a multiple of "
     "config.ncas.proxy.seq_len"),
    ("ncas.space.min_width", 0, "config.ncas.space.min_width: must be a positive integer, got 0"),
    # Named as the search's field, not as the model field of the measured layer built from it.
    ("ncas.hardware.measure_seq_len", 0, "config.ncas.hardware.measure_seq_len: must be a positive integer, got 0"),
    ("ncas.hardware.measure_batch_size", -8, "config.ncas.hardware.measure_batch_size: must be a positive integer"),
    # The proxy's fields, not the training config's optimizer.peak_lr, model.mod.capacity, model.mod.every.
    ("ncas.proxy.peak_lr", -1.0, "config.ncas.proxy.peak_lr: must be a positive number, got -1.0"),
    ("ncas.proxy.peak_lr", float("inf"), "config.ncas.proxy.peak_lr: must be a positive number, got inf"),
    ("ncas.proxy.mod_capacity", 0.0, "config.ncas.proxy.mod_capacity: 0.0 must lie in"),
    ("ncas.proxy.mod_capacity", 1.5, "config.ncas.proxy.mod_capacity: 1.5 must lie in"),
    ("ncas.proxy.num_layers", 1, "config.ncas.proxy.num_layers: 1 is below 2; mixture of depths routes one layer in 2"),
])
def test_bad_settings_name_their_field(path, value, field):
  c = search.defaults()
  node = c
  *parents, leaf = path.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    search.validate(c)


@pytest.mark.parametrize("section, field, message", [
    ("ncas.proxy", "stpes", "config.ncas.proxy.stpes: no such field; did you mean ncas.proxy.steps?"),
    ("ncas.hardware", "bakend", "config.ncas.hardware.bakend: no such field; did you mean ncas.hardware.backend?"),
    ("data", "tokenzier", "config.data.tokenzier: no such field; did you mean data.tokenizer?"),
    ("ncas", "xyz", "config.ncas.xyz: no such field; the fields there are baseline, complete, hardware, proxy, "
     "rules, space."),
])
def test_a_misspelt_field_set_in_a_search_config_file_is_named(section, field, message):
  """`c.ncas.proxy.update(stpes=6)` in a config file added a field nothing reads: the search ran 20 steps."""
  c = search.defaults()
  node = c
  for part in section.split("."):
    node = node[part]
  node[field] = 6
  with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
    search.validate(c)
  c = search.defaults()
  c.my_notes = {"run": 1}  # a top-level section of the user's own
  c.data.domains = {"web": "files:/data/*.txt"}  # and domains other than the defaults'
  search.validate(c)


def test_reversed_space_bounds_are_named_as_such():
  """They were "no multiple of step 3 lies in [8192, 2048]; widen the range or lower the step"."""
  with pytest.raises(ConfigError, match=r"^config\.ncas\.space\.min_width: 8192 exceeds max_width 2048; swap them, "
                     r"such as min_width=2048 and max_width=8192\.$"):
    rules.candidate_widths(8192, 2048, 3)


def test_a_proxy_error_in_a_field_of_the_search_config_names_it_alone():
  """config.seed=-1 was "config.ncas.proxy: the proxy of width 2304 is not a valid model (config.seed: ...)"."""
  c = smoke_config()
  c.seed = -1
  arch = complete.complete(2304, search.completion_rules(c.ncas))
  with pytest.raises(ConfigError, match=r"^config\.seed: must be an integer >= 0, got -1\.$"):
    search.proxy_config(c, arch, "pi_2304")


def test_a_config_that_is_no_search_config_names_the_missing_field():
  """A training config (configs/tiny.py) passed as --config raised AttributeError: 'ncas' with a traceback."""
  with pytest.raises(ConfigError, match=r"config\.ncas: the config has no such field, so it is no search config; "
                     r"pass --config=configs/ncas\.py"):
    search.validate(config_lib.defaults())
  c = search.defaults()
  del c.ncas.hardware["measure"]
  c.data.domains = {"web": "files:/data/*.txt"}  # other domains than the defaults' are the user's
  with pytest.raises(ConfigError, match=r"config\.ncas\.hardware\.measure: the config has no such field"):
    search.validate(c)


def test_cli_output_closed_early_ends_quietly(tmp_path):
  """`python -m diffmoe_jax.ncas ... | head -1` ended with a BrokenPipeError traceback."""
  proc = subprocess.Popen([sys.executable, "-m", "diffmoe_jax.ncas", "--config=configs/ncas_smoke.py",
                           f"--workdir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  proc.stdout.close()  # the reader is gone before the first line
  stderr = proc.communicate(timeout=120)[1]
  assert proc.returncode == 141 and "Traceback" not in stderr, stderr[-2000:]


def test_a_space_too_large_to_screen_is_refused_before_it_is_listed():
  """max_width=10**8 listed 33 million widths (minutes, gigabytes) before anything was printed."""
  with pytest.raises(ConfigError, match=r"config\.ncas\.space: \[min_width, max_width\] = \[2048, 100000000\] in "
                     r"steps of 3 holds 33,332,651 candidate widths, more than the 100,000 a search screens"):
    rules.candidate_widths(2048, 10 ** 8, 3)
  assert len(rules.candidate_widths(1, 3 * rules.MAX_CANDIDATES, 3)) == rules.MAX_CANDIDATES


def test_a_space_where_no_width_survives_is_an_error():
  c = search.defaults()
  c.ncas.rules.tile = 7  # no 3-smooth width is a multiple of 7
  with pytest.raises(ConfigError, match=r"none of the 2048 candidate widths .* passes the rules; widen "
                     r"config\.ncas\.space\.\* or enable fewer rules in config\.ncas\.rules\.enabled"):
    search.validate(c)


def test_a_scale_with_no_proxy_head_layout_names_the_field(tmp_path):
  c = search.defaults()
  c.ncas.proxy.scale = 16  # 2592 / 16 = 162 is not a multiple of 4
  with pytest.raises(ConfigError, match=r"config\.ncas\.proxy\.scale.*2592"):
    search.run(c, str(tmp_path), log=lambda line: None)


def test_completion_reproduces_the_paper_rows_except_the_reported_ffn():
  completion = complete.CompletionRules()
  for row, paper in complete.PAPER_ROWS.items():
    derived = complete.complete(paper.d_model, completion)
    differing = {f.name for f in dataclasses.fields(paper) if getattr(paper, f.name) != getattr(derived, f.name)}
    assert differing <= {"expert_ffn_dim"}, (row, derived)
  assert {(m["row"], m["field"]) for m in complete.paper_mismatches(completion)} == {
      ("pi", "expert_ffn_dim"), ("pi_s", "expert_ffn_dim")}


def params_by_hand(d, depth, h, dv, e, f) -> int:
  """A count from the dimensions: per layer the q, k, v, o projections, the per-head norm, λ's four vectors per
  expert, two norms, the router and the experts' two matrices; on each routed layer (every second one) the MoD
  predictor; the embedding, output head and final norm once."""
  vocab, hidden = 65536, 64
  layer = 4 * d * h * dv + dv + 4 * e * dv // 2 + 2 * d + d * e + 2 * e * d * f
  predictor = d * hidden + hidden + hidden + d
  return depth * layer + depth // 2 * predictor + 2 * vocab * d + d


def test_capacity_counts_the_parameters_of_the_completed_model():
  arch = complete.complete(2592, complete.CompletionRules())
  expected = params_by_hand(arch.d_model, arch.num_layers, arch.num_heads, arch.head_dim, arch.num_experts,
                            arch.expert_ffn_dim)
  got = search.static_scores(search.defaults(), arch)
  assert got["total_params"] == expected
  assert got["capacity_gbit"] == pytest.approx(2 * expected / 1e9)


@pytest.mark.parametrize("name", ["pi", "pi_s", "pi_p"])
def test_paper_rows_match_the_configs(name):
  m = config_lib.load_file(os.path.join(ROOT, "configs", f"{name}.py")).model
  row = complete.PAPER_ROWS[name]
  assert (m.d_model, m.num_layers, m.num_heads, m.head_dim, m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn_dim,
          m.max_seq_len) == dataclasses.astuple(row)


def test_proxy_keeps_the_shape_and_relays_heads_when_needed():
  pi_p = complete.complete(2592, complete.CompletionRules())
  p = complete.proxy(pi_p, 8, 2, 32)
  assert (p.d_model, p.num_heads, p.head_dim, p.num_experts) == (324, 27, 12, 4)
  pi = complete.proxy(complete.complete(4608, complete.CompletionRules()), 8, 2, 32)
  assert (pi.d_model, pi.num_heads, pi.head_dim, pi.expert_ffn_dim) == (576, 36, 16, 1536)


def test_tile_efficiency_against_a_direct_count():
  arch = complete.Architecture(d_model=160, num_layers=2, num_heads=2, head_dim=80, num_experts=4, top_k=2,
                               expert_ffn_dim=256, max_seq_len=256)
  keys = 128
  useful = 4 * 160 * 160 + 160 * 4 + 2 * 2 * 160 * 256 + 2 * 2 * 40 * keys + 2 * keys * 80
  padded = 4 * 256 * 256 + 256 * 128 + 2 * 2 * 256 * 256 + 2 * 2 * 128 * keys + 2 * keys * 128
  assert scores.tile_efficiency(arch, 128) == pytest.approx(useful / padded)
  aligned = dataclasses.replace(arch, d_model=256, head_dim=256, num_heads=1, num_experts=128)
  assert scores.tile_efficiency(aligned, 128) == pytest.approx(1.0)


def test_pareto_front_matches_brute_force():
  rng = np.random.default_rng(0)
  table = [{"a": float(a), "b": float(b), "c": float(c)} for a, b, c in rng.integers(0, 5, size=(60, 3))]
  table.append({"a": float("nan"), "b": 9.0, "c": 0.0})
  front = scores.pareto_front(table, {"a": "max", "b": "max", "c": "min"})
  expected = []
  for i, r in enumerate(table[:-1]):
    beaten = False
    for s in table[:-1]:
      better_or_equal = s["a"] >= r["a"] and s["b"] >= r["b"] and s["c"] <= r["c"]
      strictly = s["a"] > r["a"] or s["b"] > r["b"] or s["c"] < r["c"]
      beaten = beaten or (better_or_equal and strictly)
    if not beaten:
      expected.append(i)
  assert front == expected and expected


def test_the_committed_report_is_what_the_readme_rules_and_formulas_give():
  """results/ncas (README: the search over [2048, 4608] with the power-of-two baseline) against the README's
  rules, completion rules and scores, computed here in plain loops, and its fronts by pairwise dominance."""
  out = os.path.join(ROOT, "results", "ncas")
  with open(os.path.join(out, "table.csv")) as f:
    table = list(csv.DictReader(f))
  first_failed = {d: readme_first_failed(d, 2048, 4608) for d in range(2048, 4609) if d % 3 == 0}
  assert {int(r["width"]): r["rejected_by"] or None for r in table if r["family"] == "pi"} == first_failed
  scored = [r for r in table if r["proxy_loss"]]
  assert [r["family"] + "_" + r["width"] for r in scored] == [
      "pi_2304", "pi_2592", "pi_3072", "pi_3456", "pi_4608", "power_of_two_2048", "power_of_two_4096"]
  archs = {}
  for r in scored:
    d = int(r["width"])
    head = 128 if d % 128 == 0 else 144
    layers = 9
    while d / layers > 96 or not smooth(layers):
      layers += 9
    experts = max(n for n in range(2, d // 512 + 1) if smooth(n))
    ffn = round(d * 8 / 3 / 256) * 256
    context = 1
    while 2 * context <= d * d / 512:
      context *= 2
    arch = archs[d] = (layers, d // head, head, experts, 2, ffn, context)
    assert tuple(int(r[k]) for k in ("num_layers", "num_heads", "head_dim", "num_experts", "top_k", "expert_ffn_dim",
                                     "max_seq_len")) == arch, r["width"]
    assert int(r["total_params"]) == params_by_hand(d, layers, d // head, head, experts, ffn)
    assert float(r["capacity_gbit"]) == pytest.approx(2 * int(r["total_params"]) / 1e9, rel=1e-12)
    keys = context / 2  # the average causal context
    matmuls = [(d, d, 4), (d, experts, 1), (d, ffn, 2), (ffn, d, 2), (head / 2, keys, 2 * d // head),
               (keys, head, d // head)]  # (rows, cols, count) per token
    for backend, tile in (("tpu", 128), ("gpu", 64), ("mi300x", 32)):
      useful = sum(a * b * n for a, b, n in matmuls)
      padded = sum(math.ceil(a / tile) * tile * math.ceil(b / tile) * tile * n for a, b, n in matmuls)
      assert float(r[f"efficiency_{backend}"]) == pytest.approx(useful / padded, rel=1e-12), (d, backend)

  def front(rows):
    points = [(float(r["capacity_gbit"]), float(r["efficiency_tpu"]), -float(r["proxy_loss"])) for r in rows]
    return [r["family"] + "_" + r["width"] for r, p in zip(rows, points)
            if not any(q != p and all(a >= b for a, b in zip(q, p)) for q in points)]

  fronts = {"pi": front([r for r in scored if r["family"] == "pi"]),
            "power_of_two": front([r for r in scored if r["family"] == "power_of_two"]), "joint": front(scored)}
  for r in scored:
    assert r["fronts"].split() == [name for name, keys in fronts.items() if r["family"] + "_" + r["width"] in keys]
  with open(os.path.join(out, "front.json")) as f:
    assert {name: [f"{x['family']}_{x['width']}" for x in rows] for name, rows in json.load(f)["fronts"].items()} == fronts
  with open(os.path.join(out, "report.md")) as f:
    report = f.read()
  assert (f"Pareto front, π family: {fronts['pi']}; power-of-two family: {fronts['power_of_two']}; both pooled: "
          f"{fronts['joint']}.") in report
  for rule in set(first_failed.values()):
    assert f"| {rule or '(passes)'} | {list(first_failed.values()).count(rule)} |" in report
  points = {int(key.rpartition("_")[2]) for key in fronts["pi"] + fronts["joint"]}
  assert sorted(os.listdir(os.path.join(out, "configs"))) == sorted(f"ncas_{d}.py" for d in points)
  for d in points:
    m = config_lib.load_file(os.path.join(out, "configs", f"ncas_{d}.py")).model
    assert (m.num_layers, m.num_heads, m.head_dim, m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn_dim,
            m.max_seq_len) == archs[d] and m.d_model == d


def test_measured_throughput_runs_the_real_layer():
  arch = complete.Architecture(d_model=48, num_layers=2, num_heads=2, head_dim=24, num_experts=4, top_k=2,
                               expert_ffn_dim=64, max_seq_len=16)
  assert scores.measured_tokens_per_second(arch, seq_len=16, batch_size=8, repeats=1) > 0


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
    report = f.read()
  assert (f"Wall time: the 2 proxies trained for {trained:.0f} s in all (each over all its invocations); this "
          f"invocation reused 2 of them and took {again['seconds']:.0f} s.") in report
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


@pytest.mark.parametrize("field, value, message", [
    ("layer_multiple", 5, r"layer_multiple: 5 has a prime factor above 3, so none of its multiples is a 3-smooth"),
    ("layer_multiple", 0, r"layer_multiple: must be a positive integer, got 0"),
    ("width_per_expert", 0, r"width_per_expert: must be a positive integer, got 0"),
    ("ffn_ratio", -1.0, r"ffn_ratio: must be a positive number, got -1\.0"),
    ("head_dims", (), r"head_dims: must be positive integers, got \(\)"),
])
def test_completion_settings_that_cannot_complete_a_width_name_their_field(field, value, message):
  """layer_multiple=5 looped forever looking for a 3-smooth depth; zeros divided by zero."""
  c = search.defaults()
  c.ncas.complete[field] = value
  with pytest.raises(ConfigError, match=r"config\.ncas\.complete\." + message):
    search.completion_rules(c.ncas)


@pytest.mark.parametrize("field, value, message", [
    ("top_k", 5, r"top_k: no 3-smooth expert count lies between top_k 5 and 5 \(width 2304 / width_per_expert 512"),
    ("context_divisor", 10 ** 9, r"context_divisor: 1000000000 exceeds width² = 5308416 \(width 2304\)"),
])
def test_completion_settings_that_fail_on_a_width_name_their_field(field, value, message):
  """top_k=5 took the max() of no expert counts (ValueError); a divisor above width² gave a fractional context."""
  rules_ = dataclasses.replace(complete.CompletionRules(), **{field: value})
  with pytest.raises(ConfigError, match=r"config\.ncas\.complete\." + message):
    complete.complete(2304, rules_)


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
                               "training stopped. Skipped updates never touch the weights. Change optimizer.peak_lr.")

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
  with pytest.raises(ConfigError, match=r"proxies/pi_2304 finished with another proxy config \(config\.curriculum\."
                     r"\w+\.steps: \d+ there, \d+ now\); pass a new --workdir"):
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


def finished_proxy(workdir, config, record: dict):
  """Writes a result.json for the proxy pi_2304 of `config`, as a finished one has, plus `record`."""
  arch = complete.complete(2304, search.completion_rules(config.ncas))
  run_dir = os.path.join(workdir, "proxies", "pi_2304")
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, "result.json"), "w") as f:
    json.dump({"loss": 3.0, "config": json.loads(search.proxy_config(config, arch, "pi_2304").to_json_best_effort()),
               **record}, f)
  return arch, run_dir


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


def test_a_report_dir_that_is_a_file_names_the_flag(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(WorkdirError, match=re.escape(f"The report_dir {a_file} is a file, not a directory; pass "
                                                   "another --report_dir.")):
    search.run(smoke_config(), str(tmp_path / "runs"), log=lambda line: None, report_dir=str(a_file))


def test_rewriting_the_report_removes_configs_of_points_no_longer_on_the_front(smoke, tmp_path):
  _, result, _ = smoke
  configs = tmp_path / "configs"
  configs.mkdir()
  (configs / "ncas_9216.py").write_text("# a Pareto point of an earlier search")
  (configs / "mine.py").write_text("# the user's")
  search.write_report(smoke_config(), str(tmp_path), result)
  front = [f"ncas_{k.split('_')[1]}.py" for k in dict.fromkeys(result["fronts"]["pi"] + result["fronts"]["joint"])]
  assert sorted(os.listdir(configs)) == sorted(front + ["mine.py"])
