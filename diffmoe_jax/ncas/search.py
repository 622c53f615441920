"""The search: candidates, π-constraints, completion, scores, proxies, the Pareto front and its report.

`run(config, workdir)` writes into workdir: `proxies/<family>_<width>/` (each proxy's training run and its
`result.json`; a candidate that has one is not retrained, so an interrupted search resumes; one that finished
with another config or on other data is an error), and the report (`report.py`) into the report directory
(default: the workdir).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time

import ml_collections

from diffmoe_jax import config as config_lib, validation
from diffmoe_jax import data, estimate
from diffmoe_jax.config import ConfigError
from diffmoe_jax.ncas import complete as complete_lib
from diffmoe_jax.ncas import rules as rules_lib
from diffmoe_jax.ncas import scores
from diffmoe_jax.ncas.report import BASELINE, PI, foreign_report_file, row_key, write_report
from diffmoe_jax.train import preflight, workdir as workdir_lib


def defaults() -> ml_collections.ConfigDict:
  """The search's settings; `data` is the training data section (the proxies train on it)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = config_lib.defaults().data
  c.ncas = n = ml_collections.ConfigDict()
  n.space = ml_collections.ConfigDict({"min_width": 2048, "max_width": 8192, "step": 3})
  n.rules = ml_collections.ConfigDict({"enabled": rules_lib.DEFAULT_RULES, "tile": 32, "head_dims": (128, 144)})
  n.complete = ml_collections.ConfigDict(dataclasses.asdict(complete_lib.CompletionRules()))
  # backend: which tile the Pareto front uses; measure: "auto" (on an accelerator), "on", "off".
  n.hardware = ml_collections.ConfigDict({"backend": "tpu", "measure": "auto", "measure_seq_len": 2048,
                                           "measure_batch_size": 8})
  n.baseline = True  # also run the power-of-two widths of the space, at the same proxy budget
  # The proxy: width / scale (a power of two: the only integers dividing both families), `steps` steps of
  # `tokens_per_batch` tokens (the fixed token budget), all six phases, validation loss at the end.
  n.proxy = ml_collections.ConfigDict({
      "scale": 8, "num_layers": 2, "seq_len": 32, "tokens_per_batch": 256, "steps": 20, "peak_lr": 3e-3,
      "mod_capacity": 0.25, "eval_batches": 4, "eval_batch_size": 8})
  return c


def _rule_settings(n) -> rules_lib.RuleSettings:
  return rules_lib.RuleSettings(min_width=n.space.min_width, max_width=n.space.max_width, tile=n.rules.tile,
                                head_dims=tuple(n.rules.head_dims))


def completion_rules(n) -> complete_lib.CompletionRules:
  fields = {f.name for f in dataclasses.fields(complete_lib.CompletionRules)}
  unknown = sorted(set(n.complete.keys()) - fields)
  if unknown:
    raise ConfigError(f"config.ncas.complete: {unknown} are no completion settings; they are {sorted(fields)}.")
  values = dict(n.complete)
  values["head_dims"] = tuple(values["head_dims"])
  for field, value in values.items():
    numbers = value if field == "head_dims" else (value,)
    kind = (int, float) if field == "ffn_ratio" else int
    if not numbers or not all(isinstance(v, kind) and not isinstance(v, bool) and v > 0 for v in numbers):
      what = {"head_dims": "positive integers", "ffn_ratio": "a positive number"}.get(field, "a positive integer")
      raise ConfigError(f"config.ncas.complete.{field}: must be {what}, got {value!r}.")
  if not complete_lib.is_three_smooth(values["layer_multiple"]):
    raise ConfigError(f"config.ncas.complete.layer_multiple: {values['layer_multiple']} has a prime factor above 3, "
                      "so none of its multiples is a 3-smooth depth; use a product of 2s and 3s such as 9.")
  return complete_lib.CompletionRules(**values)


def missing_field(config, reference: dict, prefix: str = "") -> str | None:
  """The first field of `reference` (the search defaults) that `config` lacks, or None; OPEN_DICTS are the
  user's (a config may list other data domains)."""
  for key, default in reference.items():
    path = prefix + key
    if config_lib.is_open_dict(path):
      continue
    if not hasattr(config, "keys") or key not in config:
      return path
    if isinstance(default, dict):
      missing = missing_field(config[key], default, path + ".")
      if missing:
        return missing
  return None


def unknown_field(config, reference: dict, prefix: str = "") -> tuple[str, list[str]] | None:
  """The first field `config` has inside a section of `reference` (the search defaults) that the section
  lacks, with the section's fields, or None: a misspelt field set in Python would be ignored. Top-level
  sections of the user's own and OPEN_DICTS are the user's."""
  for key in config.keys():
    path = prefix + key
    if key not in reference:
      if prefix:
        return path, list(reference)
    elif (isinstance(reference[key], dict) and hasattr(config[key], "keys")
          and not config_lib.is_open_dict(path)):
      unknown = unknown_field(config[key], reference[key], path + ".")
      if unknown:
        return unknown
  return None


def validate(config) -> None:
  """Raises ConfigError naming the field for a search config that cannot run."""
  missing = missing_field(config, defaults().to_dict())
  if missing:
    raise ConfigError(f"config.{missing}: the config has no such field, so it is no search config; pass "
                      "--config=configs/ncas.py, or build yours from search.defaults() as that file does.")
  unknown = unknown_field(config, defaults().to_dict())
  if unknown:
    raise validation.no_such_field(*unknown)
  validation.check_values(config.to_dict(), defaults().to_dict())  # types, finite numbers, int32, the seed
  n = config.ncas
  rules_lib.check_settings(n.rules.enabled, _rule_settings(n))
  widths = rules_lib.candidate_widths(n.space.min_width, n.space.max_width, n.space.step)
  if not any(r["rejected_by"] is None for r in screen(config) if r["family"] == PI):
    raise ConfigError(f"config.ncas: none of the {len(widths)} candidate widths in [{n.space.min_width}, "
                      f"{n.space.max_width}] passes the rules; widen config.ncas.space.* or enable fewer rules in "
                      f"config.ncas.rules.enabled (now {list(n.rules.enabled)}).")
  p = n.proxy
  for field in ("steps", "tokens_per_batch", "scale", "num_layers", "seq_len", "eval_batches", "eval_batch_size"):
    if not (isinstance(p[field], int) and p[field] > 0):
      raise ConfigError(f"config.ncas.proxy.{field}: must be a positive integer, got {p[field]!r}"
                        + (" (the proxy token budget is steps * tokens_per_batch)." if field in
                           ("steps", "tokens_per_batch") else "."))
  every = config_lib.defaults().model.mod.every
  if p.num_layers < every:
    raise ConfigError(f"config.ncas.proxy.num_layers: {p.num_layers} is below {every}; mixture of depths routes one "
                      f"layer in {every} (model.mod.every), so a proxy needs at least {every} layers.")
  if not (validation.is_number(p.peak_lr) and p.peak_lr > 0):
    raise ConfigError(f"config.ncas.proxy.peak_lr: must be a positive number, got {p.peak_lr!r}.")
  if not (validation.is_number(p.mod_capacity) and 0 < p.mod_capacity <= 1):
    raise ConfigError(f"config.ncas.proxy.mod_capacity: {p.mod_capacity!r} must lie in (0, 1]: the fraction of a "
                      "sequence's tokens a routed layer of the proxy processes.")
  if p.tokens_per_batch < p.seq_len:
    raise ConfigError(f"config.ncas.proxy.tokens_per_batch: {p.tokens_per_batch} is below config.ncas.proxy.seq_len "
                      f"({p.seq_len}), so a batch holds no whole sequence; raise tokens_per_batch or lower seq_len.")
  if p.tokens_per_batch % p.seq_len:
    whole = p.tokens_per_batch // p.seq_len * p.seq_len
    raise ConfigError(f"config.ncas.proxy.tokens_per_batch: {p.tokens_per_batch} is not a multiple of "
                      f"config.ncas.proxy.seq_len ({p.seq_len}), so a batch would hold {whole} tokens and the proxy "
                      f"token budget would not be steps * tokens_per_batch; use a multiple, such as {whole} or "
                      f"{whole + p.seq_len}.")
  if n.hardware.backend not in scores.BACKEND_TILES:
    raise ConfigError(f"config.ncas.hardware.backend: {n.hardware.backend!r} is not one of "
                      f"{list(scores.BACKEND_TILES)}.")
  if n.hardware.measure not in ("auto", "on", "off"):
    raise ConfigError(f"config.ncas.hardware.measure: {n.hardware.measure!r} is not 'auto', 'on' or 'off'.")
  for field in ("measure_seq_len", "measure_batch_size"):
    value = n.hardware[field]
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
      raise ConfigError(f"config.ncas.hardware.{field}: must be a positive integer, got {value!r}.")
  head_dims = completion_rules(n).head_dims
  for width in rules_lib.powers_of_two(n.space.min_width, n.space.max_width) if n.baseline else ():
    if not any(width % head_dim == 0 for head_dim in head_dims):
      raise ConfigError(f"config.ncas.complete.head_dims: none of {list(head_dims)} divides {width}, a width of the "
                        "power-of-two baseline; add a head width that does, such as 128, or leave the baseline out "
                        "with config.ncas.baseline=False.")


def proxy_config(config, arch: complete_lib.Architecture, name: str) -> ml_collections.ConfigDict:
  """The training config of a proxy: the proxy shape, the six phases in `proxy.steps` steps at one length."""
  p = config.ncas.proxy
  shape = complete_lib.proxy(arch, p.scale, p.num_layers, p.seq_len)
  c = config_lib.defaults()
  c.name, c.seed = name, config.seed
  c.data = copy.deepcopy(config.data)
  complete_lib.set_model(c.model, shape)
  c.model.update(vocab_size=256, dtype="float32")
  c.model.mod.update(capacity=p.mod_capacity, predictor_hidden=16)
  c.curriculum.update(total_steps=p.steps, tokens_per_batch=p.tokens_per_batch, mod_anneal_levels=1)
  fractions = [c.curriculum[q].fraction for q in config_lib.PHASES]
  for phase, steps in zip(config_lib.PHASES, phase_steps(p.steps, fractions)):
    c.curriculum[phase].update(seq_len=p.seq_len, steps=steps)  # one length: fewer compiled programs
  # MoD at capacity 1 computes what MoD off computes (README "Mixture of depths"); so the warmup shares
  # the foundation's compiled step, one compile fewer per proxy.
  c.curriculum.warmup.update(mod_enabled=True, mod_capacity_start=1.0, mod_capacity_end=1.0)
  c.optimizer.peak_lr = p.peak_lr
  c.train.update(log_every=max(1, p.steps // 4), eval_every=p.steps, checkpoint_every=p.steps,
                 stable_rank_every=p.steps, eval_batches=p.eval_batches, eval_batch_size=p.eval_batch_size)
  try:
    return validation.validate(c)
  except ConfigError as e:
    if str(e).startswith(("config.data.", "config.seed:")):  # fields of the search config itself
      raise
    raise ConfigError(f"config.ncas.proxy: the proxy of width {arch.d_model} is not a valid training config "
                      f"({e}).") from None


def phase_steps(total: int, fractions: list[float]) -> list[int]:
  """`total` steps split by the phases' fractions, largest remainders first, at least one step each."""
  if total < len(fractions):
    raise ConfigError(f"config.ncas.proxy.steps: {total} steps cannot give each of the {len(fractions)} "
                      f"phases one; use at least {len(fractions)}.")
  steps = [max(1, math.floor(f * total)) for f in fractions]
  by_remainder = sorted(range(len(fractions)), key=lambda i: fractions[i] * total - steps[i], reverse=True)
  for i in by_remainder[:max(0, total - sum(steps))]:
    steps[i] += 1
  while sum(steps) > total:  # minimum steps taken from the longest phase
    steps[steps.index(max(steps))] -= 1
  return steps


class SearchStopped(Exception):
  """A proxy's training stopped early (SIGTERM, a first Ctrl-C, train.run_steps): rerunning resumes it."""


def proxy_name(family: str, arch: complete_lib.Architecture) -> str:
  return f"{family}_{arch.d_model}"


def finished_result(config, arch, family: str, workdir: str, corpus, log) -> dict | None:
  """The proxy's result.json if it finished before with the same config and data, None if it has none;
  ConfigError or WorkdirError if it finished with another config or on other data."""
  from diffmoe_jax.train import resume
  name = proxy_name(family, arch)
  run_dir = os.path.join(workdir, "proxies", name)
  result_path = os.path.join(run_dir, "result.json")
  if not os.path.exists(result_path):
    return None
  result = workdir_lib.read_result(result_path)
  if "config" not in result:  # written before results recorded their config
    log(f"note: {run_dir} has no record of its proxy config, so a change in it could not be checked.")
  changed = []
  if "proxy_settings" in result:  # the search's own settings first, named as the user sets them
    changed = [(f"ncas.proxy.{path}", saved, now)
               for path, saved, now in resume.changed_fields(result["proxy_settings"], config.ncas.proxy)]
  changed = changed or resume.changed_fields(result.get("config", {}), proxy_config(config, arch, name))
  if changed:
    path, saved, now = changed[0]
    raise ConfigError(f"{run_dir} finished with another proxy config (config.{path}: {saved!r} there, {now!r} "
                      "now); pass a new --workdir, or delete that proxy to train it again.")
  workdir_lib.check_data(run_dir, result.get("data"), corpus.fingerprint, log)
  log(f"  {name}: " + (f"diverged before ({result['diverged']}), no proxy loss" if "diverged" in result else
                       f"finished before, validation loss {result['loss']:.4f}"))
  return {**result, "reused": True}


def train_proxy(config, arch, family: str, workdir: str, corpus, log) -> dict:
  """The proxy's validation result, from its result.json if it finished before with the same config and data,
  else by training it."""
  from diffmoe_jax.train import loop, resume
  finished = finished_result(config, arch, family, workdir, corpus, log)
  if finished is not None:
    return finished
  name = proxy_name(family, arch)
  run_dir = os.path.join(workdir, "proxies", name)
  result_path = os.path.join(run_dir, "result.json")
  cfg = proxy_config(config, arch, name)
  try:
    outcome = loop.train(cfg, run_dir, corpus=corpus)
  except resume.SavedWithAnotherConfig as e:  # its advice, train.allow_config_change, is no field of the search
    changes = resume.describe(e.changes) or "a train state of another shape"
    raise ConfigError(f"{run_dir} holds a proxy trained part way with another proxy config ({changes}); rerun "
                      "with the config.ncas settings it was started with, pass a new --workdir, or delete that "
                      "proxy to train it again.") from None
  except loop.TrainingStopped as e:
    # Non-finite updates: the proxy diverged at this width, a result of the search (it is on no front), which
    # goes on; a rerun would resume it into the same stop.
    outcome, diverged = None, str(e).split(". ")[0]
  if outcome is not None and outcome.stopped is not None:
    raise SearchStopped(f"the proxy {name} stopped early ({outcome.stopped}); finished proxies are kept, rerun "
                        "the same command to resume.")
  record = {"tokens": cfg.curriculum.total_steps * cfg.curriculum.tokens_per_batch,
            "proxy": dataclasses.asdict(complete_lib.proxy(arch, config.ncas.proxy.scale,
                                                           config.ncas.proxy.num_layers, config.ncas.proxy.seq_len)),
            "proxy_settings": config.ncas.proxy.to_dict(), "config": json.loads(cfg.to_json_best_effort()),
            "data": corpus.fingerprint}
  if outcome is None:
    result = {"loss": math.nan, "diverged": diverged, "seconds": workdir_lib.add_seconds(run_dir, 0.0, write=False),
              "bits_per_byte": {}, **record}
    workdir_lib.write_json(result_path, result)
    log(f"  {name}: diverged ({diverged}), so it has no proxy loss and is on no Pareto front; a lower "
        "config.ncas.proxy.peak_lr in a new --workdir trains every proxy again.")
    return result
  result = {"loss": outcome.eval["loss"], "seconds": outcome.seconds,  # a resumed proxy's invocations, all
            "bits_per_byte": {k.split("/")[0]: v for k, v in outcome.eval.items() if k.endswith("/bits_per_byte")},
            **record}
  workdir_lib.write_json(result_path, result)
  log(f"  {name}: validation loss {result['loss']:.4f} in {result['seconds']:.0f} s")
  if outcome.received_signal is not None:  # it arrived during the last step: the proxy finished, the search stops
    raise SearchStopped(f"{outcome.received_signal} received as the proxy {name} finished; finished proxies are "
                        "kept, rerun the same command to resume.")
  return result


def screen(config) -> list[dict]:
  """One row per candidate (and per baseline width): its family, and the first rule that rejects it."""
  n = config.ncas
  settings = _rule_settings(n)
  rows = [{"family": PI, "width": w, "rejected_by": rules_lib.rejecting_rule(w, n.rules.enabled, settings)}
          for w in rules_lib.candidate_widths(n.space.min_width, n.space.max_width, n.space.step)]
  if n.baseline:
    rows += [{"family": BASELINE, "width": w, "rejected_by": rules_lib.rejecting_rule(w, n.rules.enabled, settings)}
             for w in rules_lib.powers_of_two(n.space.min_width, n.space.max_width)]
  return rows


def evaluated(row: dict) -> bool:
  """Survivors of the π family and every baseline width (which the rules reject by design) are scored."""
  return row["family"] == BASELINE or row["rejected_by"] is None


def static_scores(config, arch) -> dict:
  """Capacity and hardware scores of a full-scale architecture (no training)."""
  n = config.ncas
  model = complete_lib.training_config(arch, "candidate").model
  total = estimate.count_params(model).total
  out = {"total_params": total, "capacity_gbit": scores.capacity_bits(total) / 1e9}
  for backend, tile in scores.BACKEND_TILES.items():
    out[f"efficiency_{backend}"] = scores.tile_efficiency(arch, tile)
  out["efficiency"] = out[f"efficiency_{n.hardware.backend}"]
  if measures(n):
    out["measured_tokens_per_second"] = scores.measured_tokens_per_second(
        arch, seq_len=n.hardware.measure_seq_len, batch_size=n.hardware.measure_batch_size)
  return out


def measures(n) -> bool:
  """Whether the search measures each candidate's throughput (ncas.hardware.measure)."""
  import jax
  return n.hardware.measure == "on" or (n.hardware.measure == "auto" and jax.default_backend() != "cpu")


def check_measurement_fits(n, archs: list) -> None:
  """The throughput measurement of every candidate fits this machine's device (InsufficientMemoryError)."""
  h = n.hardware
  need, arch = max(((scores.measurement_bytes(a, seq_len=h.measure_seq_len, batch_size=h.measure_batch_size), a)
                    for a in archs), key=lambda pair: pair[0])
  have = preflight.available_bytes_per_device()
  if need > config_lib.defaults().train.memory_headroom * have:
    raise preflight.InsufficientMemoryError(
        f"measuring the throughput of d_model {arch.d_model} ({h.measure_batch_size} sequences of "
        f"{h.measure_seq_len:,} tokens, config.ncas.hardware.measure = {h.measure!r}) needs about "
        f"{estimate.human_bytes(need)}, but a device here has {estimate.human_bytes(have)} available; lower "
        "config.ncas.hardware.measure_seq_len or measure_batch_size, or set config.ncas.hardware.measure='off'.")


def run(config, workdir: str, log=print, report_dir: str = "") -> dict:
  """The whole search; returns the report's data, also written to report_dir (default: the workdir). One search
  at a time in a workdir: a second is refused at once, not when it reaches the proxy the first is training."""
  validate(config)
  created = workdir_lib.first_missing(workdir)
  workdir = workdir_lib.prepare(workdir)
  with workdir_lib.removed_unless_used(workdir, created):
    workdir_lib.check_contents(workdir, "an NCAS search")
    report_dir = workdir_lib.prepare(report_dir, "report_dir") if report_dir else workdir
    workdir_lib.check_no_other_report(report_dir, "search")
    foreign = foreign_report_file(report_dir)
    if foreign:  # refused before any proxy trains, not after
      raise workdir_lib.WorkdirError(f"{foreign} is not from an NCAS report, and the report would replace or "
                                     "remove it; pass another --report_dir (a new directory, or one an earlier "
                                     "report was written to).")
    with workdir_lib.WorkdirLock(workdir):
      return _search(config, workdir, log, report_dir)


def _search(config, workdir: str, log, report_dir: str) -> dict:
  start = time.perf_counter()
  rows = screen(config)
  pi_rows = [r for r in rows if r["family"] == PI]
  survivors = [r for r in rows if evaluated(r)]
  pi_rows_kept = [r for r in pi_rows if r["rejected_by"] is None]
  log(f"{len(pi_rows)} candidate widths, {len(pi_rows_kept)} pass the rules "
      f"{list(config.ncas.rules.enabled)}; {len(survivors)} to score"
      + (f" ({len(survivors) - len(pi_rows_kept)} of them the power-of-two baseline)."
         if len(survivors) > len(pi_rows_kept) else "."))
  rules = completion_rules(config.ncas)
  for row in survivors:  # completion and proxy layout first, so a bad setting fails before any training
    row["arch"] = complete_lib.complete(row["width"], rules)
  names = [proxy_name(row["family"], row["arch"]) for row in survivors]
  preflight.check_runs_fit({f"the proxy {name}": proxy_config(config, row["arch"], name)
                            for name, row in zip(names, survivors)},
                           advice="lower config.ncas.space.max_width, or raise config.ncas.proxy.scale "
                                  "(a smaller proxy)")
  if measures(config.ncas):
    check_measurement_fits(config.ncas, [row["arch"] for row in survivors])
  corpus = data.build_corpus(config.data)
  for row in survivors:  # a proxy finished with other settings is refused before any proxy trains
    finished_result(config, row["arch"], row["family"], workdir, corpus, log=lambda line: None)
  for i, row in enumerate(survivors):
    log(f"[{i + 1}/{len(survivors)}] {row['family']} {row['width']}: {row['arch']}")
    row.update(static_scores(config, row["arch"]))
    row["proxy"] = train_proxy(config, row["arch"], row["family"], workdir, corpus, log)
    row["proxy_loss"] = row["proxy"]["loss"]
  objectives = {"capacity_gbit": "max", "efficiency": "max", "proxy_loss": "min"}
  fronts = {}
  for name, members in ((PI, [r for r in survivors if r["family"] == PI]),
                        (BASELINE, [r for r in survivors if r["family"] == BASELINE]),
                        ("joint", survivors)):
    fronts[name] = [row_key(members[i]) for i in scores.pareto_front(members, objectives)]
  result = {"rows": rows, "fronts": fronts, "objectives": objectives,
            "paper_mismatches": complete_lib.paper_mismatches(rules),
            "seconds": time.perf_counter() - start}
  write_report(config, report_dir, result)
  log(f"Pareto front (π family): {fronts[PI]}; joint with the baseline: {fronts['joint']}. "
      f"Report in {report_dir} ({result['seconds']:.0f} s).")
  return result
