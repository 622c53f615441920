"""The search's report: every candidate's row, the Pareto fronts, a config file for each Pareto point.

`write_report` writes `table.csv`, `table.md`, `front.json`, `front.png`, `configs/ncas_<width>.py` and
`report.md` into a report directory; `foreign_report_file` finds a file there that no report wrote (which the
search then refuses to replace before anything trains).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import re

from diffmoe_jax.ncas import complete as complete_lib
from diffmoe_jax.ncas import scores
from diffmoe_jax.train import workdir as workdir_lib

PI, BASELINE = "pi", "power_of_two"
OBJECTIVES_TEXT = "capacity (max), hardware efficiency on ncas.hardware.backend (max), proxy loss (min)"
TITLE = "# NCAS search report"
CONFIG_FILE = re.compile(r"ncas_\d+\.py")
CONFIG_MARK = "written by python -m diffmoe_jax.ncas."  # in the first line of each config file the report writes


def row_key(row: dict) -> str:
  """A candidate's name: its family and width (a width may appear in both families with rules switched off)."""
  return f"{row['family']}_{row['width']}"


ARCH_COLUMNS = [f.name for f in dataclasses.fields(complete_lib.Architecture)]
SCORE_COLUMNS = ["total_params", "capacity_gbit"] + [f"efficiency_{b}" for b in scores.BACKEND_TILES] + [
    "measured_tokens_per_second", "proxy_loss"]


def _flat(row: dict, fronts: dict) -> dict:
  out = {"family": row["family"], "width": row["width"], "rejected_by": row["rejected_by"] or ""}
  arch = row.get("arch")
  for column in ARCH_COLUMNS[1:]:
    out[column] = getattr(arch, column) if arch else ""
  for column in SCORE_COLUMNS:
    out[column] = row.get(column, "")
  for domain, bpb in (row.get("proxy") or {}).get("bits_per_byte", {}).items():
    out[f"proxy_bits_per_byte_{domain}"] = bpb
  out["proxy_seconds"] = (row.get("proxy") or {}).get("seconds", "")
  out["fronts"] = " ".join(name for name, keys in fronts.items() if row_key(row) in keys)
  return out


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _plot(path: str, scored: list[dict], fronts: dict, backend: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for ax, key, label in ((axes[0], "capacity_gbit", "capacity (Gbit, 2 bits/parameter)"),
                         (axes[1], "efficiency", f"tile efficiency ({backend})")):
    for family, color, marker in ((PI, "tab:blue", "o"), (BASELINE, "tab:orange", "s")):
      rows = [r for r in scored if r["family"] == family and math.isfinite(r["proxy_loss"])]
      ax.scatter([r[key] for r in rows], [r["proxy_loss"] for r in rows], c=color, marker=marker,
                 label="π-constrained" if family == PI else "power of two")
      for r in rows:
        on_front = row_key(r) in fronts[family]
        ax.annotate(str(r["width"]) + ("*" if on_front else ""), (r[key], r["proxy_loss"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(label)
    ax.set_ylabel("proxy validation loss (nats/token)")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle("NCAS candidates (* = on its family's Pareto front)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(config, report_dir: str, result: dict) -> None:
  """table.csv, table.md, front.json, front.png, configs/*.py and report.md under report_dir; front.json
  first, so that a report cut short is still recognised as one (`foreign_report_file`)."""
  rows, fronts = result["rows"], result["fronts"]
  flat = [_flat(r, fronts) for r in rows]
  scored = [r for r in rows if "proxy_loss" in r]
  by_key = {row_key(r): r for r in scored}
  front_json = {
      "objectives": result["objectives"],
      "fronts": {name: [_flat(by_key[key], fronts) for key in keys] for name, keys in fronts.items()},
      "proxy": dict(config.ncas.proxy), "paper_mismatches": result["paper_mismatches"],
      "seconds": result["seconds"], "proxy_seconds": sum(r["proxy"]["seconds"] for r in scored)}
  workdir_lib.write_json(os.path.join(report_dir, "front.json"), front_json)
  columns = list(dict.fromkeys(k for row in flat for k in row))
  with open(os.path.join(report_dir, "table.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
  shown = [c for c in columns if c not in ("rejected_by", "measured_tokens_per_second") or
           any(r.get(c) not in ("", None) for r in flat if c == "measured_tokens_per_second")]
  lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
  lines += ["| " + " | ".join(_fmt(row[c]) if c in row else "" for c in shown) + " |"
            for row in flat if row["proxy_seconds"] != ""]
  counts: dict = {}
  for r in rows:
    if r["family"] == PI:
      counts[r["rejected_by"] or "(passes)"] = counts.get(r["rejected_by"] or "(passes)", 0) + 1
  rejection = ["| first rule failed | candidates |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()]
  baseline = [f"| {r['width']} | {r['rejected_by'] or '(passes)'} |" for r in rows if r["family"] == BASELINE]
  table_md = "\n".join(["## Scored candidates", ""] + lines + ["", "## π candidates by the first rule that rejects "
                        "them (every candidate is in table.csv)", ""] + rejection
                       + (["", "## Power-of-two baseline under the rules", "", "| width | first rule failed |",
                           "|---|---|"] + baseline if baseline else [])) + "\n"
  with open(os.path.join(report_dir, "table.md"), "w", encoding="utf-8") as f:
    f.write(table_md)
  _plot(os.path.join(report_dir, "front.png"), scored, fronts, config.ncas.hardware.backend)
  config_dir = os.path.join(report_dir, "configs")
  os.makedirs(config_dir, exist_ok=True)
  points = [by_key[key] for key in dict.fromkeys(fronts[PI] + fronts["joint"])]
  files = {f"ncas_{row['width']}.py" for row in points}
  for stale in set(_report_configs(config_dir)) - files:  # an earlier search's Pareto points no longer on the front
    os.remove(os.path.join(config_dir, stale))
  for row in points:
    name = f"ncas_{row['width']}"
    summary = (f"NCAS Pareto point d_model {row['width']} ({row['family']} family): {row['total_params'] / 1e9:.1f}B "
               f"parameters; {CONFIG_MARK}")
    with open(os.path.join(config_dir, name + ".py"), "w", encoding="utf-8") as f:
      f.write(complete_lib.config_file_text(row["arch"], name, summary))
  p = config.ncas.proxy
  diverged = [r for r in scored if "diverged" in r["proxy"]]
  mismatches = "\n".join(f"- {m['row']}: {m['field']} is {m['paper']} in the paper, {m['rules']} by the rules"
                         for m in result["paper_mismatches"]) or "- none"
  report = [
      TITLE, "",
      f"Space: multiples of {config.ncas.space.step} in [{config.ncas.space.min_width}, "
      f"{config.ncas.space.max_width}] ({sum(r['family'] == PI for r in rows)} widths); rules "
      f"{list(config.ncas.rules.enabled)}; {sum(r['family'] == PI and r['rejected_by'] is None for r in rows)} "
      f"survive.",
      f"Proxy: width / {p.scale}, {p.num_layers} layers, context {p.seq_len}, {p.steps} steps of "
      f"{p.tokens_per_batch} tokens ({p.steps * p.tokens_per_batch} tokens) on {dict(config.data.domains)}.",
      f"Objectives: {OBJECTIVES_TEXT}.",
      f"Wall time: the {len(scored)} proxies trained for {front_json['proxy_seconds']:.0f} s in all (each over all "
      f"its invocations); this invocation reused {sum(bool(r['proxy'].get('reused')) for r in scored)} of them "
      f"and took {result['seconds']:.0f} s.", "",
      f"Pareto front, π family: {fronts['pi']}; power-of-two family: {fronts['power_of_two']}; both pooled: "
      f"{fronts['joint']}."] + ([
      "Diverged proxies (no proxy loss, so on no front): "
      + "; ".join(f"{row_key(r)} ({r['proxy']['diverged']})" for r in diverged) + "."] if diverged else []) + [
      "", "Completion rules against the paper's rows:", mismatches, "", table_md]
  with open(os.path.join(report_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(report))


def _first_line(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.readline().rstrip("\n")


def _report_configs(config_dir: str) -> list[str]:
  """The names of the config files in config_dir a report wrote (`CONFIG_MARK` in their first line)."""
  if not os.path.isdir(config_dir):
    return []
  return [name for name in os.listdir(config_dir)
          if CONFIG_FILE.fullmatch(name) and CONFIG_MARK in _first_line(os.path.join(config_dir, name))]


def foreign_report_file(report_dir: str) -> str | None:
  """The path of a file in report_dir that `write_report` would replace or remove but no report wrote, or None.

  A report's report.md opens with TITLE and its front.json holds a report's keys; where neither is there, the
  tables and the plot are no report's either. A configs/ncas_<width>.py is a report's when it carries CONFIG_MARK."""
  foreign = workdir_lib.foreign_report_file(report_dir, text_file="report.md", title=TITLE, json_file="front.json",
                                            json_keys={"objectives", "fronts"},
                                            outputs=("table.csv", "table.md", "front.png"))
  if foreign:
    return foreign
  config_dir = os.path.join(report_dir, "configs")
  if os.path.exists(config_dir) and not os.path.isdir(config_dir):
    return config_dir
  ours = set(_report_configs(config_dir))
  for name in sorted(os.listdir(config_dir)) if os.path.isdir(config_dir) else []:
    if CONFIG_FILE.fullmatch(name) and name not in ours:
      return os.path.join(config_dir, name)
  return None
