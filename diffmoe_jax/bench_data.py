"""`python -m diffmoe_jax.bench data`: the input pipeline alone, as the trainer reads it: the token cache's build
(or reuse), then for each phase of the curriculum the batches/s and tokens/s of `data.train_dataset`, indexed
step by step in one thread as the training loop indexes it, over the same batches twice (the first pass reads
the memory-mapped cache, the second finds it in the OS page cache)."""
from __future__ import annotations

import argparse
import time


def add_parser(commands) -> None:
  from diffmoe_jax.bench import POSITIVE, _config_file
  data = commands.add_parser("data", help="the input pipeline's batches/s and tokens/s at each phase's shape")
  data.add_argument("--config", type=_config_file, default="configs/tiny.py")
  data.add_argument("--phase", nargs="+", default=(), help="the curriculum phases to time (default: all)")
  data.add_argument("--batches", type=POSITIVE, default=100, help="batches read per pass, from the phase's first step")
  data.add_argument("--domain", type=_domain, nargs="+", default=(), metavar="NAME=SPEC",
                    help="replace config.data.domains, e.g. text='files:/data/*.txt' (every phase then mixes "
                         "them in equal parts)")
  data.add_argument("--cache-dir", default="", help="config.data.cache_dir for the run (default: the config's)")
  data.add_argument("--process-count", type=POSITIVE, default=1,
                    help="time process 0's rows of each batch, as each of this many training processes reads them")
  data.set_defaults(run=run)


def _domain(text: str) -> tuple[str, str]:
  name, _, spec = text.partition("=")
  if not (name and spec):
    raise argparse.ArgumentTypeError(f"{text!r} is not NAME=SPEC, such as text='files:/data/*.txt'")
  return name, spec


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
  from diffmoe_jax import config as config_lib
  from diffmoe_jax.train.curriculum import Curriculum
  phases = Curriculum(config_lib.load_file(args.config)).phases
  unknown = [name for name in args.phase if name not in [p.name for p in phases]]
  if unknown:
    parser.error(f"argument --phase: {unknown[0]!r} is not a phase of {args.config}; choose from "
                 f"{[p.name for p in phases]}")
  for p in phases:
    if (not args.phase or p.name in args.phase) and p.batch_size % args.process_count:
      parser.error(f"argument --process-count: {args.process_count} processes cannot share phase {p.name}'s batch of "
                   f"{p.batch_size} sequences; give a divisor of it")


def _config(args: argparse.Namespace):
  from diffmoe_jax import config as config_lib, validation
  config = config_lib.load_file(args.config)
  if args.domain:
    config.data.domains = dict(args.domain)
    for name in config.curriculum.order:  # weights naming the config's own domains
      config.curriculum[name].domain_weights = {}
  if args.cache_dir:
    config.data.cache_dir = args.cache_dir
  validation.validate(config)
  return config


def _rate(dataset, steps: range) -> float:
  """Seconds per batch of reading `dataset[step]` for each step."""
  start = time.perf_counter()
  for step in steps:
    dataset[step]
  return (time.perf_counter() - start) / len(steps)


def run(args: argparse.Namespace) -> None:
  from diffmoe_jax import data
  from diffmoe_jax.train.curriculum import Curriculum
  config = _config(args)
  start = time.perf_counter()
  corpus = data.build_corpus(config.data)
  seconds = time.perf_counter() - start
  tokens = {d: corpus.info(d, "train").num_tokens + corpus.info(d, "val").num_tokens for d in corpus.domains}
  print(f"config {args.config}, tokenizer {corpus.tokenizer.name}, {args.process_count} process(es), "
        f"{args.batches} batches per pass")
  print(f"corpus      {seconds:8.1f} s to build or reuse the token cache: "
        + ", ".join(f"{d} {n:,} tokens" for d, n in tokens.items()))
  print(f"{'phase':13s} {'seq_len':>7s} {'rows':>5s}  {'first pass':>32s}  {'second pass':>32s}")
  for phase in Curriculum(config).phases:
    if args.phase and phase.name not in args.phase:
      continue
    dataset = data.train_dataset(corpus, seed=config.seed, seq_len=phase.seq_len, batch_size=phase.batch_size,
                                 domain_weights=dict(phase.domain_weights), process_count=args.process_count)
    rows = phase.batch_size // args.process_count
    steps = range(phase.start, phase.start + args.batches)
    passes = [_rate(dataset, steps) for _ in range(2)]
    print(f"{phase.name:13s} {phase.seq_len:7,d} {rows:5,d}  " + "  ".join(
        f"{1 / s:8,.1f} batches/s {rows * phase.seq_len / s:13,.0f} tokens/s" for s in passes))
