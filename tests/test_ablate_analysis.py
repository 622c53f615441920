"""The ablation report's arithmetic: token λ, mean ± spread and Δ, stable-rank series and the sides they are divided by,
and the stable-rank comparison's text (tests/test_ablate.py runs the ablation)."""
import os
import re

import numpy as np
import pytest

from diffmoe_jax import ablate_analysis, estimate
from diffmoe_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_token_lambdas_mix_experts_by_gate_weight():
  lam = np.array([0.2, 0.5, 0.9])
  weights = np.array([[0.75, 0.25], [0.5, 0.5]])
  experts = np.array([[2, 0], [1, 2]])
  np.testing.assert_allclose(ablate_analysis.token_lambdas(lam, weights, experts), [0.725, 0.7])


def test_table_gives_the_seeds_sample_spread_and_none_for_one_seed():
  def record(arm, seed, loss):
    return {"arm": arm, "seed": seed, "change": "none", "params": {"total": 10, "active": 5}, "final_step": 6,
            "wall_seconds": 1.0, "eval": {"loss": loss, "code/bits_per_byte": 2 * loss}}
  labels = {"full": "Full", "no_mod": "No MoD"}
  losses = {"full": [2.0, 2.5, 3.5], "no_mod": [3.0, 3.0, 3.3]}
  records = [record(arm, seed, loss) for arm, values in losses.items() for seed, loss in enumerate(values)]
  arms = ablate_analysis.summarize(["full", "no_mod"], records, ["code"])
  assert arms["full"]["std"]["loss"] == pytest.approx(np.sqrt(((2 - 8 / 3) ** 2 + (2.5 - 8 / 3) ** 2
                                                                + (3.5 - 8 / 3) ** 2) / 2))
  assert "| No MoD | 10 (5) | 3.1000 ± 0.1732 | +0.4333 |" in ablate_analysis.table(["full", "no_mod"], arms, ["code"],
                                                                                  labels)
  # One seed has no spread: the table gives the mean alone, not "± 0.0000".
  one = ablate_analysis.summarize(["full", "no_mod"], [r for r in records if r["seed"] == 0], ["code"])
  assert one["full"]["std"]["loss"] is None
  assert "| No MoD | 10 (5) | 3.0000 | +1.0000 | 6.0000 | +2.0000 |" in ablate_analysis.table(
      ["full", "no_mod"], one, ["code"], labels)


def test_stable_rank_series_averages_each_step_raw_and_per_smaller_side():
  """Per logged step, the mean stable rank over the matrices logged there and the mean of each divided by its
  matrix's smaller side (plain loops): the mean of the ranks over the mean of the sides passed every test."""
  scalars = {"stable_rank/groups/layer_0/attention/wq": [(3, 12.0), (6, 10.0)],
             "stable_rank/groups/layer_0/moe/w_in": [(3, 6.0), (6, 4.0)],
             "stable_rank/tail_0/ffn/w_out": [(6, 3.0)],
             "train/loss": [(3, 2.0), (6, 1.5)]}
  sides = {"wq": 48, "w_in": 16, "w_out": 8}
  got = ablate_analysis.stable_rank_series(scalars, sides)
  want = {"steps": [3, 6], "mean": [], "relative": []}
  for step in (3, 6):
    logged = [(value, sides[tag.rsplit("/", 1)[1]]) for tag, series in scalars.items()
              if tag.startswith("stable_rank/") for s, value in series if s == step]
    want["mean"].append(sum(v for v, _ in logged) / len(logged))
    want["relative"].append(sum(v / side for v, side in logged) / len(logged))
  assert got["steps"] == want["steps"]
  np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-12)
  np.testing.assert_allclose(got["relative"], want["relative"], rtol=1e-12)
  assert want["relative"][1] == pytest.approx((10 / 48 + 4 / 16 + 3 / 8) / 3)


@pytest.mark.parametrize("changes", [{}, {"moe": {"expert_ffn_dim": 32}},
                                     {"moe": {"expert_ffn_dim": 32, "activation": "swiglu"}},
                                     {"ffn": "dense", "moe": {"expert_ffn_dim": 32}}])
def test_matrix_sides_are_the_smaller_side_of_each_weight_the_model_has(changes):
  """The side each stable rank is divided by, against the model's own parameter shapes laid out as
  metrics.stable_ranks reads them (rows x columns): the larger side would pass the ranks off as fractions too."""
  import jax
  from diffmoe_jax.train import metrics
  model = config_lib.load_file(os.path.join(REPO, "tests", "train_config.py")).model
  model.moe.update(**changes.get("moe", {}))
  if "ffn" in changes:
    model.update(ffn=changes["ffn"], expert_conditional_lambda=False)
  sides = ablate_analysis.matrix_smaller_sides(model)
  seen = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(estimate.abstract_params(model))[0]:
    name = str(getattr(path[-1], "key", path[-1]))
    if name not in metrics.WEIGHT_MATRICES:
      continue
    axes, rows = metrics.WEIGHT_MATRICES[name]
    matrix = leaf.shape[len(leaf.shape) - axes:]
    assert sides[name] == min(int(np.prod(matrix[:rows])), int(np.prod(matrix[rows:]))), (name, leaf.shape)
    seen.add(name)
  assert {"wq", "wk", "wv", "wo", "w_in", "w_out"} | ({"w_gate"} if model.moe.activation == "swiglu" else set()) <= seen


def test_stable_rank_text_gives_the_papers_claim_in_our_squared_measure():
  # Two matrices whose unsquared ||W||_F / ||W||_2 differ by the paper's 23%: their squared stable ranks
  # (what metrics.stable_ranks computes) differ by the percentage the report quotes for the paper.
  def squared_stable_rank(singular_values):
    w = np.diag(np.asarray(singular_values, np.float64))
    return np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2
  base = [1.0, 0.5, 0.25]
  unsquared = np.sqrt(squared_stable_rank(base))
  second = np.sqrt(((1.23 * unsquared) ** 2 - 1.0 - 0.25) / 2)  # chosen so the unsquared ratio is 1.23
  pi, p2 = squared_stable_rank([1.0, second, second, 0.5]), squared_stable_rank(base)
  assert np.sqrt(pi / p2) == pytest.approx(1.23)
  curves = {"full": {"steps": [10], "mean": [pi], "relative": [1.0]},
            "power_of_two": {"steps": [10], "mean": [p2], "relative": [1.0]}}
  text, _ = ablate_analysis._stable_rank_text(curves, {"full": "Full", "power_of_two": "Pow2"})
  ours = re.search(r"full model's is ([+-][\d.]+)%", text).group(1)
  paper = re.search(r"which is ([+-]\d+)% on this squared measure", text).group(1)
  assert round(float(ours)) == int(paper) == 51


def test_two_seeds_have_a_sample_spread():
  """Two values' sample standard deviation is their distance over √2 (two seeds showed none before)."""
  mean, std = ablate_analysis.mean_spread([3.0, 3.5])
  assert mean == 3.25 and std == pytest.approx(0.5 / np.sqrt(2), rel=1e-12)
  assert ablate_analysis.mean_spread([3.0]) == (3.0, None)


def test_a_step_logged_twice_reads_as_its_last_value(tmp_path):
  """A step's later point replaces its earlier one (the first kept passed every test)."""
  from diffmoe_jax.train import metrics
  writer = metrics.MetricWriter(tmp_path / "tb")
  writer.scalars(3, {"train/loss": 3.0})
  writer.scalars(3, {"train/loss": 2.0})
  writer.scalars(4, {"train/loss": 2.5})
  writer.close()
  assert ablate_analysis.read_scalars(str(tmp_path))["train/loss"] == [(3, 2.0), (4, 2.5)]


def test_stable_rank_text_quotes_the_last_common_step():
  """At the last step both arms logged (the first step's figures passed every test), the ratio of the means and of
  the per-side ranks, each the full model's over the baseline's, less 1."""
  curves = {"full": {"steps": [10, 20, 30], "mean": [2.0, 3.0, 9.0], "relative": [0.5, 0.6, 0.9]},
            "power_of_two": {"steps": [10, 20], "mean": [2.0, 2.5], "relative": [0.5, 0.5]}}
  text, numbers = ablate_analysis._stable_rank_text(curves, {"full": "Full", "power_of_two": "Pow2"})
  assert "step 10: +0.0%, step 20: +20.0%. At the last step 20 the full model's is +20.0%" in text
  assert text.endswith("divided by each matrix's smaller side (the width differs between the arms) it is +20.0%.")
  assert numbers == {"steps": [10, 20], "relative_difference": pytest.approx([0.0, 0.2]),
                     "relative_difference_per_side": pytest.approx([0.0, 0.2])}


def test_lambda_text_names_the_layer_with_the_largest_gap_between_domains():
  """Layer 1's domains differ most (0.3 against 0.1): its gap and its within-domain std, the mean of the domains'
  (the smallest gap's layer, or the largest std, passed every test)."""
  lam = {"per_layer": {"code": [[0.2, 0.4], [0.1, 0.5]]},
         "tokens": {"code": [{"mean": 0.5, "std": 0.02}, {"mean": 0.6, "std": 0.04}],
                    "docs": [{"mean": 0.4, "std": 0.03}, {"mean": 0.3, "std": 0.08}]}}
  text = ablate_analysis._lambda_text(lam, ["code", "docs"])
  assert text.endswith("By expert, λ spans 0.200 to 0.400 across a layer's experts. By domain, the largest gap "
                       "between domains' mean token λ is 0.3000 (layer 1), against a within-domain token spread "
                       "(std) of 0.0600 there.")


def test_a_report_of_two_seeds_averages_each_arms_seeds(tmp_path):
  """Per arm, the per-seed numbers in seed order, the stable-rank curves (raw and per side) averaged over both seeds,
  and the wall time of every run summed (a curve from the first seed alone, seeds in reverse order, and the longest
  run's time each passed every test, which wrote one seed's report)."""
  from diffmoe_jax.train import metrics
  from test_ablate import smoke_config
  config = smoke_config()
  names, records, ranks = ["full", "power_of_two"], [], {}
  for i, (arm, seed) in enumerate([(a, s) for a in names for s in (1, 0)]):
    ranks[arm, seed] = {"wq": 10.0 + i + seed, "w_in": 4.0 + 2 * seed}
    writer = metrics.MetricWriter(tmp_path / arm / f"seed{seed}" / "tb")
    ranked = {f"stable_rank/{name}": value for name, value in ranks[arm, seed].items()}
    writer.scalars(6, {"train/loss": 3.0, "eval/loss": 3.5, **ranked})
    writer.close()
    records.append({"arm": arm, "seed": seed, "change": "none", "params": {"total": 10, "active": 5}, "final_step": 6,
                    "wall_seconds": 1.0 + i, "lambda": None,
                    "eval": {"loss": 3.0 + seed, "code/bits_per_byte": 4.0, "docs/bits_per_byte": 4.5}})
  report_dir = tmp_path / "report"
  report_dir.mkdir()
  summary = ablate_analysis.write_report(config, names, {"full": "Full", "power_of_two": "Pow2"},
                                         {arm: config.model for arm in names}, [0, 1], records, str(tmp_path),
                                         str(report_dir))
  assert summary["train_wall_seconds"] == 1.0 + 2.0 + 3.0 + 4.0
  full = summary["arms"]["full"]
  assert full["seeds"] == [0, 1] and [r["loss"] for r in full["per_seed"]] == [3.0, 4.0]
  sides = ablate_analysis.matrix_smaller_sides(config.model)
  for arm in names:
    curve = summary["stable_rank"]["curves"][arm]
    assert curve["steps"] == [6]
    assert curve["mean"] == pytest.approx([np.mean([np.mean(list(ranks[arm, s].values())) for s in (0, 1)])])
    assert curve["relative"] == pytest.approx([np.mean([np.mean([v / sides[n] for n, v in ranks[arm, s].items()])
                                                        for s in (0, 1)])])
