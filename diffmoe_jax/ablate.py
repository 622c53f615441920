"""The paper's ablation table at proxy scale: the full model and each arm, one budget, several seeds.

    python -m diffmoe_jax.ablate --config=configs/ablation.py --workdir=runs/ablation --report_dir=results/ablation
    python -m diffmoe_jax.ablate --config=configs/ablation.py --config.ablation.arms=full,no_mod --workdir=runs/a

Every arm is the config's model with exactly one change (no per-arm tuning), trained through the same
curriculum on the same data. Each (arm, seed) trains in `<workdir>/<arm>/seed<k>` and writes `result.json`
there when it finishes; a rerun skips those (refusing one that finished with another config or on other
training data) and resumes an interrupted one from its checkpoint. Then the report (a markdown table in the
paper's layout, loss-curve / stable-rank / λ plots and a JSON of every number) is written to --report_dir
(default `<workdir>/report`), replacing a plot of an earlier report that this one does not draw; a
report_dir whose README.md or results.json no ablation report wrote is refused before anything trains. A run
that non-finite updates stop is its arm's result under the shared settings: the other runs go on, the report
leaves that arm out (naming it), and the command ends with an error line.

Exit codes: 0 done; 1 error (a diverged run included), one line on stderr; 3 a run stopped early (signal or
train.run_steps) and the command can be rerun to go on; 130 stopped at once by Ctrl-C outside a run's steps or
by a second one (rerun to go on).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable

import ml_collections
from absl import app, flags

from diffmoe_jax import cli, config as config_lib

DEFAULT_CONFIG = "configs/ablation.py"
EXIT_ERROR, EXIT_STOPPED_EARLY, EXIT_INTERRUPTED = 1, 3, 130
RESULT_FILE = "result.json"


def _define_flags() -> dict:
  """Defined when run as a program, not at import, so that importing this module never claims the flags
  `main` and the other command lines define too."""
  return {"config": cli.define_config_flag(DEFAULT_CONFIG, "Path to an ablation config (a training config "
                                           "with an `ablation` section)."),
          "workdir": flags.DEFINE_string("workdir", "runs/ablation", "Directory of the arms' runs."),
          "report_dir": flags.DEFINE_string("report_dir", "", "Where the report goes; default <workdir>/report.")}


class AblationError(RuntimeError):
  """A mistake in the ablation section or the workdir, with what to change."""


@dataclasses.dataclass(frozen=True)
class Arm:
  label: str  # the table's row, in the paper's words where it has a row
  change: Callable[[ml_collections.ConfigDict], str]  # edits the model section; returns what it changed


def _set(**fields) -> Callable[[ml_collections.ConfigDict], str]:
  """An arm's change: model fields to set, `__` standing for `.` (`mod__enabled` is model.mod.enabled)."""
  def change(model):
    for key, value in fields.items():
      *parents, leaf = key.split("__")
      node = model
      for part in parents:
        node = node[part]
      node[leaf] = value
    return ", ".join(f"model.{k.replace('__', '.')}={v!r}" for k, v in fields.items())
  return change


def power_of_two_shape(model: ml_collections.ConfigDict) -> dict:
  """The paper's "standard dimensions" at this scale: the power-of-two width below d_model (the paper's
  4096 under 4608), the same heads, and the expert (or dense) FFN width, a multiple of 32, whose total
  parameter count is closest to the full model's (by `estimate.count_params`)."""
  from diffmoe_jax import estimate
  width = 2 ** int(math.floor(math.log2(model.d_model)))
  if width == model.d_model or width % model.num_heads:
    raise AblationError(f"config.model.d_model={model.d_model}: the power-of-two arm needs a width that is not "
                        f"already a power of two and a power-of-two width ({width}) that "
                        f"model.num_heads={model.num_heads} divides.")
  ffn_field = "expert_ffn_dim" if model.ffn == "moe" else "dense_ffn_dim"
  target = estimate.count_params(model).total

  def total(ffn: int) -> int:
    trial = ml_collections.ConfigDict(model.to_dict())
    trial.update(d_model=width, head_dim=width // model.num_heads)
    (trial.moe if ffn_field == "expert_ffn_dim" else trial)[ffn_field] = ffn
    return estimate.count_params(trial).total
  # The count is affine in the FFN width: two points give the slope, then the nearest multiples of 32.
  low, high = total(32), total(64)
  exact = 32 + (target - low) * 32 / (high - low)
  candidates = {max(32, 32 * math.floor(exact / 32)), max(32, 32 * math.ceil(exact / 32))}
  ffn = min(candidates, key=lambda f: abs(total(f) - target))
  overrides = {"d_model": width, "head_dim": width // model.num_heads}
  overrides["moe__expert_ffn_dim" if ffn_field == "expert_ffn_dim" else "dense_ffn_dim"] = ffn
  return overrides


def _power_of_two(model) -> str:
  return _set(**power_of_two_shape(model))(model)


ARMS = {
    "full": Arm("Full NCAS-DiffMoE", lambda model: "none"),
    "power_of_two": Arm("Standard dimensions (power-of-two width)", _power_of_two),
    "standard_attention": Arm("Standard attention (no Diff)",
                              _set(attention="standard", expert_conditional_lambda=False)),
    "no_mod": Arm("No Mixture-of-Depths", _set(mod__enabled=False)),
    "rope_10000": Arm("Standard RoPE θ=10000", _set(rope_theta=10000.0)),
    "dense_ffn": Arm("Dense (no MoE), equal active FLOPs", _set(ffn="dense", dense_ffn_dim=0,
                                                                expert_conditional_lambda=False)),
    "lambda_per_layer": Arm("One λ per layer (no expert-conditional λ)", _set(expert_conditional_lambda=False)),
    "differential_v2": Arm("Diff-Transformer V2 λ = sigmoid(W_λ x) per token",
                           _set(attention="differential_v2", expert_conditional_lambda=False)),
}


def arm_names(config: ml_collections.ConfigDict) -> list[str]:
  if "ablation" not in config:
    raise AblationError("the config has no ablation section (config.ablation.arms, config.ablation.seeds); use "
                        "--config=configs/ablation.py, or add one to your config as that file does.")
  names = [n.strip() for n in str(config.ablation.arms).split(",") if n.strip()]
  unknown = [n for n in names if n not in ARMS]
  repeated = sorted({n for n in names if names.count(n) > 1})
  problem = (f"unknown: {','.join(unknown)}" if unknown else f"listed twice: {','.join(repeated)}" if repeated else
             "full, the Δ column's reference, is missing" if "full" not in names else None)
  if problem:
    raise AblationError(f"config.ablation.arms={config.ablation.arms!r}: {problem}; list distinct arms from "
                        f"{','.join(ARMS)}, comma-separated, including full.")
  return names


def seeds(config: ml_collections.ConfigDict) -> list[int]:
  count = config.ablation.seeds
  if not isinstance(count, int) or count < 1:
    raise AblationError(f"config.ablation.seeds={count!r}: must be a positive number of seeds.")
  if isinstance(config.seed, int) and config.seed + count - 1 > config_lib.MAX_SEED:  # validation takes the rest
    raise AblationError(f"config.seed={config.seed} with config.ablation.seeds={count}: the seeds run from "
                        f"config.seed to {config.seed + count - 1}, past 2**32 - 1; lower config.seed.")
  return [config.seed + i for i in range(count)]


def arm_config(config: ml_collections.ConfigDict, arm: str, seed: int) -> tuple[ml_collections.ConfigDict, str]:
  """The training config of (arm, seed) and a description of the arm's change."""
  from diffmoe_jax import validation
  c = ml_collections.ConfigDict(config.to_dict())
  del c["ablation"]
  base = c.model.to_dict()
  change = ARMS[arm].change(c.model)
  if arm != "full" and c.model.to_dict() == base:  # it would train the full model again as if it were an arm
    raise AblationError(f"config.ablation.arms: the {arm} arm changes nothing in this config ({change} already); "
                        "drop it from config.ablation.arms.")
  c.seed = seed
  c.name = f"{config.name}/{arm}/seed{seed}"
  return validation.validate(c), change


def _run_dir(workdir: str, arm: str, seed: int) -> str:
  return os.path.join(workdir, arm, f"seed{seed}")


def _finished(run_dir: str, config: ml_collections.ConfigDict, fingerprint: dict) -> dict | None:
  """The run's saved result, if it finished with this same config and on the same data (`Corpus.fingerprint`);
  AblationError if with another config, WorkdirError if on other data."""
  path = os.path.join(run_dir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  from diffmoe_jax.train import resume, workdir as workdir_lib
  record = workdir_lib.read_result(path)
  # Fields the code added or dropped since do not count.
  changed = resume.changed_fields(record.get("config", {}), config)
  if changed:
    field, saved, now = changed[0]
    raise AblationError(f"{run_dir} finished with a different config than this command's (config.{field}: "
                        f"{saved!r} there, {now!r} now); pass a new --workdir (or delete that run) to train it "
                        "again.")
  workdir_lib.check_data(run_dir, record.get("data"), fingerprint, lambda line: print(line, flush=True))
  return record


def _eta(left: list, workdir: str, trained_seconds: dict[bool, list[float]], first_seed: int) -> float:
  """Seconds the unfinished runs of `left` should take, from the mean time of runs of the same kind."""
  every = trained_seconds[True] + trained_seconds[False]
  mean = {kind: sum(t) / len(t) if t else sum(every) / len(every) for kind, t in trained_seconds.items()}
  return sum(mean[seed == first_seed] for arm, seed, _, _ in left
             if not os.path.exists(os.path.join(_run_dir(workdir, arm, seed), RESULT_FILE)))


def run(config: ml_collections.ConfigDict, workdir: str, report_dir: str = "") -> dict:
  """Trains every unfinished (arm, seed), then writes the report; returns its summary (the report's JSON). One
  ablation at a time in a workdir: a second is refused at once, not when it reaches the run the first trains."""
  from diffmoe_jax.train import workdir as workdir_lib
  names, seed_list = arm_names(config), seeds(config)
  plan = [(arm, seed, *arm_config(config, arm, seed)) for arm in names for seed in seed_list]
  created = workdir_lib.first_missing(workdir)
  workdir = workdir_lib.prepare(workdir)
  with workdir_lib.removed_unless_used(workdir, created), workdir_lib.WorkdirLock(workdir):
    workdir_lib.check_contents(workdir, "an ablation")
    return _ablate(config, workdir, report_dir, names, seed_list, plan)


def _ablate(config: ml_collections.ConfigDict, workdir: str, report_dir: str, names: list, seed_list: list,
            plan: list) -> dict:
  from diffmoe_jax import ablate_analysis, data, estimate
  from diffmoe_jax.train import loop, preflight, workdir as workdir_lib
  report_dir = workdir_lib.prepare(report_dir or os.path.join(workdir, "report"), "report_dir")
  workdir_lib.check_no_other_report(report_dir, "ablation")
  foreign = ablate_analysis.foreign_report_file(report_dir)
  if foreign:  # refused before anything trains, not after
    raise AblationError(f"{foreign} is not from an ablation report, and the report would replace it; pass "
                        "another --report_dir (a new directory, or one an earlier report was written to).")
  cli.use_compilation_cache(config)  # a second seed of an arm reuses the first one's programs
  corpus = data.build_corpus(config.data)
  # Every finished run is read (and one of another config or data refused) before anything trains.
  finished = {(arm, seed): _finished(_run_dir(workdir, arm, seed), run_config, corpus.fingerprint)
              for arm, seed, run_config, _ in plan}
  preflight.check_runs_fit({f"the {arm} arm": run_config for arm, seed, run_config, _ in plan
                            if finished[(arm, seed)] is None})
  records, start = [], time.time()
  # Seconds of the runs trained here, by whether they were their arm's first seed: a later seed reuses the
  # first one's compiled programs from the compilation cache, so it takes much less.
  trained_seconds: dict[bool, list[float]] = {True: [], False: []}
  diverged: dict[str, list[str]] = {}  # arm -> its runs that non-finite updates stopped, described
  for i, (arm, seed, run_config, change) in enumerate(plan):
    run_dir = _run_dir(workdir, arm, seed)
    prefix = f"[{i + 1}/{len(plan)}] {arm} seed {seed}"
    record = finished[(arm, seed)]
    if record is not None:
      print(f"{prefix}: finished earlier (validation loss {record['eval']['loss']:.4f}), skipped", flush=True)
      records.append(record)
      continue
    print(f"{prefix}: training ({change})", flush=True)
    try:
      outcome = loop.train(run_config, run_dir, corpus=corpus)
    except loop.TrainingStopped as e:  # the arm's result under the shared settings: the other runs go on
      diverged.setdefault(arm, []).append(f"seed {seed} at step {e.step} of {run_config.curriculum.total_steps}")
      print(f"{prefix}: stopped by non-finite updates at step {e.step}; going on with the other runs", flush=True)
      continue
    if outcome.stopped is not None:
      print(f"{prefix}: stopped early ({outcome.stopped}); rerun the same command to go on", flush=True)
      return {"stopped": outcome.stopped}
    counts = estimate.count_params(run_config.model)
    record = {
        "arm": arm, "seed": seed, "change": change, "final_step": outcome.final_step, "eval": outcome.eval,
        "wall_seconds": outcome.seconds,  # every invocation's, for a run resumed after a stop
        "params": {"total": counts.total, "active": estimate.active_params(run_config.model, counts, with_mod=True)},
        "lambda": ablate_analysis.lambda_analysis(run_config, run_dir, corpus),
        "config": json.loads(run_config.to_json_best_effort()), "data": corpus.fingerprint,
    }
    workdir_lib.write_json(os.path.join(run_dir, RESULT_FILE), record)
    records.append(record)
    trained_seconds[seed == seed_list[0]].append(record["wall_seconds"])
    if outcome.received_signal is not None:  # it arrived during the last step: this run finished, the rest wait
      print(f"{prefix}: done, validation loss {outcome.eval['loss']:.4f}; {outcome.received_signal} received, so "
            "stopping here; rerun the same command to go on", flush=True)
      return {"stopped": outcome.received_signal}
    eta = _eta(plan[i + 1:], workdir, trained_seconds, seed_list[0])
    took = workdir_lib.duration_text
    print(f"{prefix}: done in {took(record['wall_seconds'])}, validation loss {outcome.eval['loss']:.4f}; "
          f"{took(time.time() - start)} so far, about {took(eta)} to go", flush=True)
  reported = [arm for arm in names if arm not in diverged]
  summary = {}
  if "full" in reported:
    summary = ablate_analysis.write_report(
        config, reported, {arm: ARMS[arm].label for arm in names},
        {arm: c.model for arm, seed, c, _ in plan if seed == seed_list[0]}, seed_list,
        [r for r in records if r["arm"] in reported], workdir, report_dir, diverged)
    print(f"report: {os.path.join(report_dir, 'README.md')}", flush=True)
  if diverged:
    runs = "; ".join(f"{arm} {', '.join(which)}" for arm, which in diverged.items())
    every_arm = "change optimizer.peak_lr or optimizer.grad_clip for every arm with a new --workdir."
    raise AblationError(
        f"non-finite updates stopped {runs}. " + (
            f"The report in {report_dir} lists the other arms. Under the shared settings that is the arm's result: "
            f"drop it from config.ablation.arms to report without it, or {every_arm}" if summary else
            f"No report without the full arm (the Δ column's reference): {every_arm}"))
  return summary


def main(argv, flag_values: dict):
  cli.refuse_arguments(argv)
  cli.quiet_library_output()
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.data import DataError
  from diffmoe_jax.train.checkpoint import CheckpointError
  from diffmoe_jax.train.preflight import InsufficientMemoryError
  from diffmoe_jax.train.workdir import WorkdirError
  try:
    summary = run(*(flag_values[name].value for name in ("config", "workdir", "report_dir")))
  except (AblationError, CheckpointError, ConfigError, DataError, InsufficientMemoryError, WorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    cli.exit_now(EXIT_ERROR)
  except KeyboardInterrupt:  # before or between the runs' training, or a second Ctrl-C during one
    print("error: interrupted at once; finished runs and the checkpoints saved earlier are intact. Rerun the same "
          "command to go on.", file=sys.stderr)
    cli.exit_now(EXIT_INTERRUPTED)
  if "stopped" in summary:
    sys.exit(EXIT_STOPPED_EARLY)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS), flags_parser=cli.parse_flags(DEFAULT_CONFIG))
