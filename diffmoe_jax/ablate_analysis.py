"""The ablation report: the table, loss curves, stable rank over training, and λ by expert and by domain.

`lambda_analysis` reads one finished run (its newest checkpoint); `write_report` turns every run's record
and TensorBoard log into README.md, results.json and PNG plots.
"""
from __future__ import annotations

import os
import re

import numpy as np

from diffmoe_jax.train import workdir as workdir_lib

FIGURES = {"loss": "loss_curves.png", "stable_rank": "stable_rank.png", "lambda": "lambda.png"}
TITLE = "# Ablations at proxy scale"  # README.md's first line, by which a rerun knows the file for its own
# The paper's "23% higher stable rank", measured as ||W||_F / ||W||_2; ours is its square (metrics.stable_ranks).
PAPER_STABLE_RANK_GAIN = 0.23


def _restored_params(config, run_dir: str):
  """The newest checkpoint's parameters on the config's mesh, with its mesh and axis rules."""
  from diffmoe_jax import parallel
  from diffmoe_jax.nn import model as model_lib
  from diffmoe_jax.train import checkpoint, state as state_lib
  mesh, rules = parallel.make_mesh(config.mesh), parallel.axis_rules(config.mesh)
  model = model_lib.build_model(config.model)
  abstract, _, _ = state_lib.create_state(model, state_lib.make_optimizer(config.optimizer), mesh, rules,
                                          seed=config.seed, seq_len=config.model.max_seq_len)
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"))
  try:
    state, _ = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  return state.params, mesh, rules


def _layer_of(path: str, group_size: int, groups: int) -> int:
  """Layer index of an unrolled module path such as `group_1/layer_0/...` or `tail_0/...`."""
  match = re.search(r"group_(\d+)/layer_(\d+)", path)
  if match:
    return int(match.group(1)) * group_size + int(match.group(2))
  return groups * group_size + int(re.search(r"tail_(\d+)", path).group(1))


def token_lambdas(lambda_per_expert: np.ndarray, weights: np.ndarray, experts: np.ndarray) -> np.ndarray:
  """Each token's λ, the gate-weighted mix of its top-k experts' λ: `[n]`, `[..., k]`, `[..., k]` -> `[...]`."""
  return np.sum(weights * lambda_per_expert[experts], axis=-1)


def lambda_analysis(config, run_dir: str, corpus) -> dict | None:
  """λ after training, on each domain's validation batches (the evaluation's MoD mode).

  "per_layer": λ per layer `[L][n]` (n experts with expert-conditional λ, else 1; the V2 arm's is the mean
  of sigmoid(W_λ x) over the domain's tokens). With expert-conditional λ also, per domain and layer, the
  mean and standard deviation of the λ tokens get through the router (every token at every layer) and each
  expert's share of the gate weight. None for standard attention.
  """
  import flax.linen as nn
  import jax
  from diffmoe_jax import data, parallel
  from diffmoe_jax.nn import model as model_lib
  from diffmoe_jax.nn.moe import MoEFeedForward
  cfg = config.model
  if cfg.attention == "standard":
    return None
  params, mesh, rules = _restored_params(config, run_dir)
  unrolled = cfg.copy_and_resolve_references()
  unrolled.update(scan_layers=False, remat_policy="none", remat_save_names=())  # per-layer paths for the gates
  size, groups, _ = model_lib.layer_layout(cfg)
  if cfg.scan_layers:
    params = model_lib.unstack_groups(params, groups)
  model = model_lib.build_model(unrolled)
  gate_method = "route" if cfg.moe.route_from == "attention_input" else "gate"

  @jax.jit
  def forward(params, batch):
    (_, aux), captured = model.apply(
        {"params": params}, batch["inputs"], train=False, mod_mode="predictor",
        segment_ids=batch.get("segment_ids"), mutable=["intermediates"],
        capture_intermediates=lambda module, method: isinstance(module, MoEFeedForward) and method == gate_method)
    return aux["layers"]["lambda"], captured.get("intermediates", {})  # nothing captured without experts

  out = {"per_layer": {}, "tokens": {}}
  batch_sharding = parallel.batch_sharding(mesh, rules)
  for domain in corpus.domains:
    batches = data.eval_batches(corpus, domain, seq_len=cfg.max_seq_len, batch_size=config.train.eval_batch_size,
                                num_batches=config.train.eval_batches)
    per_layer, per_token = [], [[] for _ in range(cfg.num_layers)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for b in batches:
        inputs = {k: b[k] for k in ("inputs", "segment_ids") if k in b}  # as evaluation sees them
        lambdas, captured = forward(params, parallel.global_batch(inputs, batch_sharding))
        lambdas = np.asarray(lambdas, np.float64)
        per_layer.append(lambdas)
        if not cfg.expert_conditional_lambda:
          continue
        for path, calls in jax.tree_util.tree_flatten_with_path(captured, is_leaf=lambda x: isinstance(x, tuple))[0]:
          layer = _layer_of(jax.tree_util.keystr(path, simple=True, separator="/"), size, groups)
          weights, experts = (np.asarray(a) for a in calls[0][-2:])
          per_token[layer].append((token_lambdas(lambdas[layer], weights, experts).ravel(),
                                   np.bincount(experts.ravel(), weights.ravel(), cfg.moe.num_experts)))
    out["per_layer"][domain] = np.mean(per_layer, axis=0).tolist()
    if cfg.expert_conditional_lambda:
      out["tokens"][domain] = [{
          "mean": float(np.mean(np.concatenate([t for t, _ in layer]))),
          "std": float(np.std(np.concatenate([t for t, _ in layer]))),
          "expert_share": (sum(s for _, s in layer) / sum(s.sum() for _, s in layer)).tolist(),
      } for layer in per_token]
  return out


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar series of a run's TensorBoard log: tag -> [(step, value)] in step order."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0, "tensors": 0})
  acc.Reload()
  series = {}
  for tag in acc.Tags()["scalars"]:
    by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run logs some steps twice: keep the last
    series[tag] = sorted(by_step.items())
  return series


def stable_rank_series(scalars: dict, smaller_side: dict[str, int]) -> dict:
  """Mean stable rank ‖W‖²_F/‖W‖²_2 over the weight matrices at each logged step, raw and divided by each
  matrix's smaller side (the most it can be); smaller_side maps a parameter name to that side."""
  tags = [t for t in scalars if t.startswith("stable_rank/")]
  steps = sorted({s for t in tags for s, _ in scalars[t]})
  raw, relative = [], []
  for step in steps:
    values = [(dict(scalars[t])[step], smaller_side[t.rsplit("/", 1)[-1]]) for t in tags if step in dict(scalars[t])]
    raw.append(float(np.mean([v for v, _ in values])))
    relative.append(float(np.mean([v / side for v, side in values])))
  return {"steps": steps, "mean": raw, "relative": relative}


def matrix_smaller_sides(model) -> dict[str, int]:
  """The smaller side of each weight matrix stable_ranks measures (attention: d_model; FFN: min(d, f))."""
  from diffmoe_jax.nn.moe import dense_ffn_dim
  ffn = model.moe.expert_ffn_dim if model.ffn == "moe" else dense_ffn_dim(model)
  side = min(model.d_model, ffn)
  return {"wq": model.d_model, "wk": model.d_model, "wv": model.d_model, "wo": model.d_model,
          "w_in": side, "w_gate": side, "w_out": side}


def mean_spread(values) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for one value: one seed shows no spread, not a spread of 0)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else None


def _metrics(domains) -> list[str]:
  return ["loss"] + [f"{d}/bits_per_byte" for d in domains]


def summarize(names: list[str], records: list[dict], domains) -> dict:
  """Per arm: the per-seed numbers, mean ± std over seeds, Δ of the means vs the full model."""
  arms = {}
  for arm in names:
    runs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
    stats = {m: mean_spread([r["eval"][m] for r in runs]) for m in _metrics(domains)}
    arms[arm] = {"change": runs[0]["change"], "params": runs[0]["params"], "seeds": [r["seed"] for r in runs],
                 "final_step": runs[0]["final_step"], "per_seed": [r["eval"] for r in runs],
                 "wall_seconds": [r["wall_seconds"] for r in runs],
                 "mean": {m: s[0] for m, s in stats.items()}, "std": {m: s[1] for m, s in stats.items()}}
  for arm in names:
    arms[arm]["delta_vs_full"] = {m: arms[arm]["mean"][m] - arms["full"]["mean"][m] for m in _metrics(domains)}
  return arms


def table(names: list[str], arms: dict, domains, labels: dict[str, str]) -> str:
  """The paper's layout (configuration, metric, Δ vs full) with validation loss and bits per byte per domain."""
  from diffmoe_jax.estimate import human
  head = ["Configuration", "Params (active)", "Val loss (nats/token)", "Δ vs Full"]
  for d in domains:
    head += [f"{d} bits/byte", "Δ"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for arm in names:
    a = arms[arm]
    row = [labels[arm], f"{human(a['params']['total'])} ({human(a['params']['active'])})"]
    for m in _metrics(domains):
      delta = "—" if arm == "full" else f"{a['delta_vs_full'][m]:+.4f}"
      spread = "" if a["std"][m] is None else f" ± {a['std'][m]:.4f}"
      row += [f"{a['mean'][m]:.4f}{spread}", delta]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _smoothed(values: np.ndarray, window: int) -> np.ndarray:
  window = max(1, min(window, len(values)))
  return np.convolve(values, np.ones(window) / window, mode="valid")


def _mean_curve(series_per_seed: list[list[tuple[int, float]]]) -> tuple[np.ndarray, np.ndarray]:
  """Steps every seed logged, and the mean value over seeds there."""
  common = sorted(set.intersection(*(set(s for s, _ in series) for series in series_per_seed)))
  return np.asarray(common), np.mean([[dict(series)[s] for s in common] for series in series_per_seed], axis=0)


def plot_losses(path: str, names, labels, scalars_by_arm: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
  for arm in names:
    steps, loss = _mean_curve([s["train/loss"] for s in scalars_by_arm[arm]])
    window = max(1, len(loss) // 25)
    train_ax.plot(steps[window - 1:], _smoothed(loss, window), label=labels[arm], lw=1.2)
    steps, loss = _mean_curve([s["eval/loss"] for s in scalars_by_arm[arm]])
    eval_ax.plot(steps, loss, marker="o", ms=3, label=labels[arm], lw=1.2)
  train_ax.set(title="Training loss (moving mean; mean over seeds)", xlabel="step", ylabel="nats/token")
  eval_ax.set(title="Validation loss, all domains (mean over seeds)", xlabel="step", ylabel="nats/token")
  eval_ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_stable_rank(path: str, curves: dict, labels) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for arm, curve in curves.items():
    axes[0].plot(curve["steps"], curve["mean"], marker="o", label=labels[arm])
    axes[1].plot(curve["steps"], curve["relative"], marker="o", label=labels[arm])
  axes[0].set(title="Mean stable rank ‖W‖²_F / ‖W‖²_2", xlabel="step")
  axes[1].set(title="... divided by the matrix's smaller side", xlabel="step")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_lambda(path: str, lam: dict, domains) -> None:
  """λ per expert at each layer (bars), and the mean λ of each domain's tokens (lines)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  per_layer = np.asarray(lam["per_layer"][domains[0]])  # parameters only: the same for every domain
  layers, experts = per_layer.shape
  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.8 / experts
  for e in range(experts):
    ax.bar(np.arange(layers) + (e - (experts - 1) / 2) * width, per_layer[:, e], width, label=f"expert {e}")
  for d, marker in zip(domains, "Dos^v"):
    ax.plot(np.arange(layers), [t["mean"] for t in lam["tokens"][d]], color="black", marker=marker, lw=1,
            label=f"{d} tokens (mean)")
  ax.set(title="λ per expert after training (full model, first seed)", xlabel="layer", ylabel="λ",
         xticks=np.arange(layers))
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _stable_rank_text(curves: dict, labels) -> tuple[str, dict]:
  pi, p2 = curves["full"], curves["power_of_two"]
  steps = sorted(set(pi["steps"]) & set(p2["steps"]))
  ratio = {s: pi["mean"][pi["steps"].index(s)] / p2["mean"][p2["steps"].index(s)] - 1 for s in steps}
  rel = {s: pi["relative"][pi["steps"].index(s)] / p2["relative"][p2["steps"].index(s)] - 1 for s in steps}
  last = steps[-1]
  text = (f"Mean stable rank of the weight matrices, {labels['full']} vs {labels['power_of_two']} "
          f"(mean over seeds), at each logged step: "
          + ", ".join(f"step {s}: {ratio[s]:+.1%}" for s in steps)
          + f". At the last step {last} the full model's is {ratio[last]:+.1%} (the paper claims "
          f"{PAPER_STABLE_RANK_GAIN:+.0%} on ||W||_F / ||W||_2, unsquared, which is "
          f"{(1 + PAPER_STABLE_RANK_GAIN) ** 2 - 1:+.0%} on this squared measure); divided "
          f"by each matrix's smaller side (the width differs between the arms) it is {rel[last]:+.1%}.")
  return text, {"steps": steps, "relative_difference": [ratio[s] for s in steps],
                "relative_difference_per_side": [rel[s] for s in steps]}


def _lambda_text(lam: dict, domains) -> str:
  per_layer = np.asarray(lam["per_layer"][domains[0]])
  lines = ["| Layer | λ per expert | range over experts | " + " | ".join(f"{d} tokens: mean ± std" for d in domains)
           + " |", "|" + "---|" * (3 + len(domains))]
  for layer, row in enumerate(per_layer):
    tokens = [f"{lam['tokens'][d][layer]['mean']:.4f} ± {lam['tokens'][d][layer]['std']:.4f}" for d in domains]
    lines.append(f"| {layer} | {', '.join(f'{v:.3f}' for v in row)} | {row.max() - row.min():.4f} | "
                 + " | ".join(tokens) + " |")
  means = np.asarray([[t["mean"] for t in lam["tokens"][d]] for d in domains])  # [domains, layers]
  stds = np.asarray([[t["std"] for t in lam["tokens"][d]] for d in domains])
  gap = means.max(0) - means.min(0)
  worst = int(np.argmax(gap))
  lines.append(f"\nBy expert, λ spans {np.ptp(per_layer, axis=1).min():.3f} to {np.ptp(per_layer, axis=1).max():.3f} "
               f"across a layer's experts. By domain, the largest gap between domains' mean token λ is "
               f"{gap[worst]:.4f} (layer {worst}), against a within-domain token spread (std) of "
               f"{stds[:, worst].mean():.4f} there.")
  return "\n".join(lines)


def corpus_text(domains) -> str:
  """What the report says the runs trained on: config.data.domains, and whether that is the built-in corpus."""
  specs = ", ".join(f"{name} = {spec!r}" for name, spec in sorted(domains.items()))
  if all(str(spec).startswith("stdlib:") for spec in domains.values()):
    return f"the built-in corpus ({specs})"
  return f"the corpus {specs}"


def write_report(config, names: list[str], labels: dict[str, str], models: dict, seed_list: list[int],
                 records: list[dict], workdir: str, report_dir: str, diverged: dict | None = None) -> dict:
  """README.md, results.json and the plots in report_dir (removing a plot of FIGURES an earlier report drew and
  this one does not); returns the JSON's content.

  labels: arm -> table row; models: arm -> its model config; records: every run's result.json; diverged: arm ->
  its runs that non-finite updates stopped (described), arms left out of `names` and named under the table.
  """
  domains = sorted(config.data.domains.keys())
  arms = summarize(names, records, domains)
  scalars = {arm: [read_scalars(os.path.join(workdir, arm, f"seed{s}")) for s in seed_list] for arm in names}
  plot_losses(os.path.join(report_dir, FIGURES["loss"]), names, labels, scalars)
  drawn = {FIGURES["loss"]}
  wall = sum(r["wall_seconds"] for r in records)
  summary = {"config": config.name, "budget": {"steps": config.curriculum.total_steps,
                                               "tokens_per_batch": config.curriculum.tokens_per_batch,
                                               "seeds": seed_list, "context": config.model.max_seq_len},
             "arms": arms, "train_wall_seconds": wall, "cpu_count": os.cpu_count()}
  if diverged:
    summary["diverged"] = diverged
  cur = config.curriculum
  sections = [
      TITLE,
      f"Produced by `python -m diffmoe_jax.ablate` with config `{config.name}`: every arm is the full model with "
      f"one change, trained through the same {cur.total_steps}-step curriculum ({cur.tokens_per_batch} tokens per "
      f"batch, context {config.model.max_seq_len}) on {corpus_text(config.data.domains)}, seeds {seed_list}, no "
      "per-arm tuning. Validation loss (nats/token, all domains) and bits per byte per domain replace the paper's "
      "LiveBench score; " + ("mean ± sample standard deviation over seeds" if len(seed_list) > 1 else
                             "one seed, so no spread") + ", Δ = arm − full (positive is worse). Training "
      f"wall time of the {len(records)} runs: {wall / 60:.1f} minutes on {os.cpu_count()} CPU cores (compiling each "
      "arm's programs included). These are proxy-scale numbers, not the paper's.",
      table(names, arms, domains, labels),
      "Changes: " + "; ".join(f"{arm}: {arms[arm]['change']}" for arm in names) + ".",
      *(["Not in the table, stopped by non-finite updates: " + "; ".join(
          f"{labels[arm]}, {', '.join(which)}" for arm, which in diverged.items()) + "."] if diverged else []),
      f"![loss curves]({FIGURES['loss']})",
  ]
  if "power_of_two" in names:
    sections.append("## Stable rank: 3-smooth width vs power-of-two width")
    per_seed = {arm: [stable_rank_series(s, matrix_smaller_sides(models[arm])) for s in scalars[arm]]
                for arm in ("full", "power_of_two")}
    if not all(c["steps"] for runs in per_seed.values() for c in runs):
      sections.append(f"Not measured: the runs logged no stable rank (train.stable_rank_every="
                      f"{config.train.stable_rank_every}, curriculum of {cur.total_steps} steps); set "
                      f"train.stable_rank_every to at most {cur.total_steps} (with a new --workdir) to compare.")
    else:
      curves = {arm: {"steps": runs[0]["steps"], "mean": np.mean([c["mean"] for c in runs], axis=0).tolist(),
                      "relative": np.mean([c["relative"] for c in runs], axis=0).tolist()}
                for arm, runs in per_seed.items()}
      text, numbers = _stable_rank_text(curves, labels)
      summary["stable_rank"] = {"curves": curves, **numbers}
      plot_stable_rank(os.path.join(report_dir, FIGURES["stable_rank"]), curves, labels)
      drawn.add(FIGURES["stable_rank"])
      sections += [text, f"![stable rank]({FIGURES['stable_rank']})"]
  full_lambda = next(r["lambda"] for r in sorted(records, key=lambda r: r["seed"]) if r["arm"] == "full")
  if full_lambda and full_lambda["tokens"]:
    summary["lambda"] = {r["arm"] + f"/seed{r['seed']}": r["lambda"] for r in records if r["lambda"]}
    plot_lambda(os.path.join(report_dir, FIGURES["lambda"]), full_lambda, domains)
    drawn.add(FIGURES["lambda"])
    sections += ["## λ per expert and by domain (full model, first seed)",
                 "λ_e of each expert after training, and the λ tokens of each domain get through the router "
                 "(gate-weighted mix of their top-k experts' λ; validation batches, every token at every layer):",
                 _lambda_text(full_lambda, domains), f"![lambda]({FIGURES['lambda']})"]
    if "differential_v2" in names:
      v2 = next(r["lambda"] for r in records if r["arm"] == "differential_v2")
      per_domain = [f"{d}: " + ", ".join(f"{row[0]:.3f}" for row in v2["per_layer"][d]) for d in domains]
      sections.append("Differential Transformer V2 arm (first seed), mean per-token λ = sigmoid(W_λ x) per layer: "
                      + "; ".join(per_domain) + ".")
  for name in set(FIGURES.values()) - drawn:
    if os.path.exists(os.path.join(report_dir, name)):
      os.remove(os.path.join(report_dir, name))
  workdir_lib.write_json(os.path.join(report_dir, "results.json"), summary)  # whole: a rerun reads it back
  with open(os.path.join(report_dir, "README.md"), "w", encoding="utf-8") as f:
    f.write("\n\n".join(sections) + "\n")
  return summary


def foreign_report_file(report_dir: str) -> str | None:
  """The path of a file in report_dir that no ablation report wrote and write_report would replace or remove,
  or None: a README.md or results.json not a report's, or one of FIGURES where neither of those is."""
  return workdir_lib.foreign_report_file(report_dir, text_file="README.md", title=TITLE, json_file="results.json",
                                         json_keys={"arms", "budget"}, outputs=tuple(FIGURES.values()))
