"""Run the π-constrained architecture search.

    python -m diffmoe_jax.ncas --config=configs/ncas.py --workdir=runs/ncas [--report_dir=results/ncas]

Filters the candidate widths by the π-constraints, completes each survivor (and each power-of-two
baseline width) into an architecture, scores it, trains its width-scaled proxy, and writes the table, the
Pareto front (JSON and PNG), a config for each Pareto point and report.md into the workdir. Rerunning on
the same workdir resumes: finished proxies are not retrained (a proxy that finished with another config or
on other training data is an error). Exit 1 with one line on stderr on an error, 3 when a proxy's training
stopped early (SIGTERM, a first Ctrl-C): rerun to resume; 130 on a Ctrl-C outside a proxy's training steps,
141 when the output's reader closes it early (`| head`).
"""
from __future__ import annotations

import sys

from absl import app, flags

from diffmoe_jax import cli

DEFAULT_CONFIG = "configs/ncas.py"

_CONFIG = cli.define_config_flag(DEFAULT_CONFIG, "Path to a search config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/ncas", "Directory for the proxies' runs (and the report).")
_REPORT_DIR = flags.DEFINE_string("report_dir", "", "Directory for the report; empty: the workdir.")


def main(argv):
  cli.refuse_arguments(argv)
  cli.quiet_library_output()
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.data import DataError
  from diffmoe_jax.ncas import search
  from diffmoe_jax.train.checkpoint import CheckpointError
  from diffmoe_jax.train.loop import TrainingStopped
  from diffmoe_jax.train.preflight import InsufficientMemoryError
  from diffmoe_jax.train.workdir import WorkdirError
  try:
    search.run(_CONFIG.value, _WORKDIR.value, log=lambda line: print(line, flush=True),
               report_dir=_REPORT_DIR.value)
  except search.SearchStopped as e:
    print(f"stopped: {e}", file=sys.stderr)
    cli.exit_now(3)
  except (CheckpointError, ConfigError, DataError, InsufficientMemoryError, TrainingStopped, WorkdirError) as e:
    print(f"error: {e}", file=sys.stderr)
    cli.exit_now(1)
  except KeyboardInterrupt:
    print("error: interrupted; finished proxies are kept, rerun the same command to resume.", file=sys.stderr)
    cli.exit_now(130)


if __name__ == "__main__":
  app.run(cli.interruptible(main), flags_parser=cli.parse_flags(DEFAULT_CONFIG))
