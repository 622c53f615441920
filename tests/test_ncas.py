"""The π-constrained architecture search: rules, completion, scores, Pareto front and the committed report
(tests/test_ncas_search.py runs the search)."""
import csv
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

from diffmoe_jax import config as config_lib
from diffmoe_jax.config import ConfigError
from diffmoe_jax.ncas import complete, rules, scores, search
from test_config import set_field

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
    ("not_power_of_two", [3072, 2592, 6], [1, 2, 2048, 4096, 8192]),
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
    ("ncas.proxy.peak_lr", float("inf"), "config.ncas.proxy.peak_lr: must be a finite number, got inf"),
    ("ncas.proxy.mod_capacity", 0.0, "config.ncas.proxy.mod_capacity: 0.0 must lie in"),
    ("ncas.proxy.mod_capacity", 1.5, "config.ncas.proxy.mod_capacity: 1.5 must lie in"),
    ("ncas.proxy.num_layers", 1, "config.ncas.proxy.num_layers: 1 is below 2; mixture of depths routes one layer in 2"),
])
def test_bad_settings_name_their_field(path, value, field):
  c = search.defaults()
  set_field(c, path, value)
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    search.validate(c)


@pytest.mark.parametrize("path, value, message", [
    ("ncas.rules.head_dims", ("a",), r"^config\.ncas\.rules\.head_dims: holds 'a'; each entry is an integer, as in "
     r"\(128, 144\)\.$"),
    ("ncas.rules.enabled", None, r"^config\.ncas\.rules\.enabled: must be a tuple \(such as \('in_range', "),
    ("ncas.complete.ffn_ratio", float("inf"), r"^config\.ncas\.complete\.ffn_ratio: must be a finite number, got inf\.$"),
    ("ncas.proxy.num_layers", 10**12, r"^config\.ncas\.proxy\.num_layers: 1000000000000 is beyond int32"),
    ("seed", -1, r"^config\.seed: must be an integer from 0 to 2\*\*32 - 1"),
])
def test_values_of_the_wrong_kind_name_their_field(path, value, message):
  """Each was a TypeError or OverflowError traceback from the rules or the completion, a proxy of 10**12 layers
  ran out of memory, and a bad seed was refused only after the screening's first line."""
  c = search.defaults()
  set_field(c, path, value, ignore_type=True)
  with pytest.raises(ConfigError, match=message):
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
  c = search.defaults()
  c.seed = -1
  arch = complete.complete(2304, search.completion_rules(c.ncas))
  with pytest.raises(ConfigError, match=r"^config\.seed: must be an integer from 0 to 2\*\*32 - 1 \(the random keys "
                                        r"hold 32 bits\), got -1\.$"):
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


def test_head_widths_that_complete_no_baseline_width_name_the_baseline():
  """It was "none of [144] divides the width 2048; add a head width that does, or enable the differential_heads
  rule", which was enabled: the rules do not apply to the baseline."""
  c = search.defaults()
  c.ncas.complete.head_dims = c.ncas.rules.head_dims = (144,)
  with pytest.raises(ConfigError, match=re.escape(
      "config.ncas.complete.head_dims: none of [144] divides 2048, a width of the power-of-two baseline; add a head "
      "width that does, such as 128, or leave the baseline out with config.ncas.baseline=False.")):
    search.validate(c)
  c.ncas.baseline = False
  search.validate(c)


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


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
  return out


@pytest.mark.parametrize("name", ["pi", "pi_s", "pi_p"])
def test_the_config_a_search_writes_for_a_paper_width_trains_as_its_pi_config(name, tmp_path):
  """The paper's table: the config file a search writes for a row's width (`configs/ncas_<width>.py`) is
  configs/<row>.py but for its name and the expert FFN the completion rules miss (PI, PI-S). It once kept the defaults' learning rate, 3e-3: 5-10 times the
  PI configs' 3e-4, 4e-4 and 6e-4 at the same widths."""
  arch = complete.complete(complete.PAPER_ROWS[name].d_model, complete.CompletionRules())
  path = tmp_path / "generated.py"
  path.write_text(complete.config_file_text(arch, name, "generated"))
  generated = _flat(config_lib.load_file(str(path)).to_dict())
  assert generated == _flat(complete.training_config(arch, name).to_dict())
  written = _flat(config_lib.load_file(os.path.join(ROOT, "configs", f"{name}.py")).to_dict())
  differing = {key for key in generated if generated[key] != written[key]}
  expected = {"model.moe.expert_ffn_dim"} if name in ("pi", "pi_s") else set()
  assert differing == expected
  assert generated["optimizer.peak_lr"] == {"pi": 3e-4, "pi_s": 4e-4, "pi_p": 6e-4}[name]


def test_proxy_keeps_the_shape_and_relays_heads_when_needed():
  pi_p = complete.complete(2592, complete.CompletionRules())
  p = complete.proxy(pi_p, 8, 2, 32)
  assert (p.d_model, p.num_heads, p.head_dim, p.num_experts) == (324, 27, 12, 4)
  pi = complete.proxy(complete.complete(4608, complete.CompletionRules()), 8, 2, 32)
  assert (pi.d_model, pi.num_heads, pi.head_dim, pi.expert_ffn_dim) == (576, 36, 16, 1536)
  # The expert FFN width / scale to the nearest multiple of 4, at least 4 (rounded down, 15 became 12).
  for ffn, want in ((120, 16), (100, 12), (8, 4)):
    assert complete.proxy(dataclasses.replace(pi_p, expert_ffn_dim=ffn), 8, 2, 32).expert_ffn_dim == want


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


def readme_architecture(d: int) -> tuple:
  """(layers, heads, head width, experts, top-k, expert FFN, context) by README's completion rules, in plain loops:
  head width 128, else 144; the fewest layers, a 3-smooth multiple of 9, with d / layers <= 96; the most 3-smooth
  experts <= d / 512; FFN 8/3 d to a multiple of 256; context the largest power of two <= d² / 512."""
  head = 128 if d % 128 == 0 else 144
  layers = 9
  while d / layers > 96 or not smooth(layers):
    layers += 9
  experts = max(n for n in range(2, d // 512 + 1) if smooth(n))
  ffn = round(d * 8 / 3 / 256) * 256
  context = 1
  while 2 * context <= d * d / 512:
    context *= 2
  return layers, d // head, head, experts, 2, ffn, context


def test_completion_follows_the_readme_rules_at_every_width():
  """Every width with a head layout in [2048, 8192], not only the paper's rows: a depth rounded down (PI's 4608 and
  PI-S's 3456 give the same either way) gave 2304 18 layers of width 128, past the 96 a layer may take."""
  widths = [d for d in range(2048, 8193, 16) if d % 128 == 0 or d % 144 == 0]
  for d in widths:
    arch = complete.complete(d, complete.CompletionRules())
    assert arch.d_model == d
    assert dataclasses.astuple(arch)[1:] == readme_architecture(d), d


def test_proxy_head_width_and_training_settings_take_the_larger_on_a_tie():
  """The docstrings' tie rules, against a plain loop: the proxy head width nearest head_dim / scale among the
  multiples of 4 dividing width / scale, the larger on a tie (384 / 8 = 48 has heads of 12 and 16, both 2 from
  112 / 8 = 14); the training settings of the PI config nearest in width, the wider on a tie (3024 lies midway
  between PI-P's 2592 and PI-S's 3456, 4032 between PI-S and PI)."""
  for width, head_dim, scale in [(384, 112, 8), (2592, 144, 8), (4608, 128, 8), (480, 72, 4), (960, 100, 4)]:
    best = None
    for h in range(4, width // scale + 1, 4):
      distance = abs(h - head_dim / scale)
      if (width // scale) % h == 0 and (best is None or distance <= best[0]):
        best = (distance, h)
    assert complete.proxy_head_dim(width, head_dim, scale) == best[1], (width, head_dim, scale)
  assert complete.proxy_head_dim(384, 112, 8) == 16
  rows = complete.PAPER_ROW_TRAINING
  for width, row in [(3023, 2592), (3024, 3456), (3025, 3456), (4031, 3456), (4032, 4608), (2048, 2592),
                     (8192, 4608)]:
    assert complete.training_for(width) == rows[row], width


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
    arch = archs[d] = readme_architecture(d)
    layers, _, head, experts, _, ffn, context = arch
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


@pytest.mark.parametrize("seq_len, batch_size", [(512, 2), (2048, 4)])
def test_the_measurements_memory_is_what_its_compiled_program_holds(seq_len, batch_size):
  """Within 15%: the search refuses a measurement larger than the device by this figure before any proxy trains.
  The gradients XLA computes in float32 before their cast were missing (0.63 and 0.74 of the compiled figure)."""
  import jax
  import jax.numpy as jnp
  from diffmoe_jax.nn import model as model_lib
  arch = complete.complete(2304, search.completion_rules(search.defaults().ncas))
  model = model_lib.build_model(scores.measured_model(arch, seq_len))
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  params = jax.eval_shape(lambda t: model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)},
                                               t)["params"], tokens)

  def loss(p, t):  # as scores.measured_tokens_per_second differentiates it
    token_ce, _ = model.apply({"params": p}, t, train=True, targets=t, rngs={"noise": jax.random.PRNGKey(2)})
    return jnp.mean(token_ce)

  held = jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis()
  compiled = held.temp_size_in_bytes + held.argument_size_in_bytes + held.output_size_in_bytes
  assert scores.measurement_bytes(arch, seq_len=seq_len, batch_size=batch_size) == pytest.approx(compiled, rel=0.15)


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


def test_a_proxys_steps_split_by_the_phases_fractions_largest_remainders_first():
  """10 steps at 25/35/40%: 2.5, 3.5 and 4 give 2 + 3 + 4 and the step left goes to the first of the two
  halves (to the smallest remainder, 2 + 3 + 5, passed every test); each phase keeps at least one, taken
  from the longest."""
  assert search.phase_steps(10, [0.25, 0.35, 0.4]) == [3, 3, 4]
  assert search.phase_steps(4, [0.9, 0.05, 0.05]) == [2, 1, 1]


@pytest.mark.parametrize("backend", sorted(scores.BACKEND_TILES))
def test_the_front_uses_the_tile_efficiency_of_the_configured_backend(backend):
  """ncas.hardware.backend picks the tile the front scores (TPU's passed every test: no test set another)."""
  config = search.defaults()
  config.ncas.hardware.update(backend=backend, measure="off")
  arch = complete.complete(2592, complete.CompletionRules())
  out = search.static_scores(config, arch)
  assert out["efficiency"] == scores.tile_efficiency(arch, scores.BACKEND_TILES[backend])
  assert len({out[f"efficiency_{b}"] for b in scores.BACKEND_TILES}) == 3  # PI-P's tiles differ on each
