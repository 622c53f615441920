"""Training and evaluation batches: pure functions of (seed, step), read from the memory-mapped corpus.

A window is `seq_len + 1` consecutive tokens of one domain's stream starting at a multiple of `seq_len`, so
window k holds the inputs of positions [k*seq_len, (k+1)*seq_len) and their next-token targets. A batch is a
dict of numpy arrays: `inputs` and `targets` int32 [B, T] (targets are inputs shifted by one) and `domain`
int32 [B], the index of each row's domain in `corpus.domains`. With `corpus.segment_masking`, also
`segment_ids` int32 [B, T]: the index of each input position's document within its window, counting from 0
and going up by one after each separator (the tokenizer's eos id), so a separator is the last token of the
document it ends. A tokenizer without a separator gives all zeros (training refuses one when segment masking
is on).
"""
from __future__ import annotations

import math
import numbers

import grain
import numpy as np
from absl import logging

from diffmoe_jax.data.errors import DataError


def train_dataset(corpus, *, seed: int, seq_len: int, batch_size: int, domain_weights=None,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The training mixture: `ds[step]` is this process's rows of the global batch of `step`.

  Each domain's train windows are shuffled with a seed derived from (seed, domain index) and repeated with a
  new shuffle every epoch; `MapDataset.mix` interleaves the domains in proportion to `domain_weights`
  (domain -> weight; empty or None: all domains, equal weights; zero-weight domains are left out), and the
  mixed stream is cut into global batches of `batch_size` rows. No iterator state is kept, so resuming needs
  only the step. Process p of P reads only rows [p*B/P, (p+1)*B/P) of each global batch, so the rows of all
  processes concatenate to the same global batch for any P.
  """
  _check_sizes(seq_len=seq_len, batch_size=batch_size, process_count=process_count)
  if not (isinstance(seed, numbers.Integral) and seed >= 0):
    raise DataError(f"seed must be a non-negative integer (config.seed), got {seed!r}.")
  _check_process_share(batch_size, process_index, process_count)
  weights = _mixture_weights(corpus, domain_weights)
  parts, total = [], 0
  for domain in weights:
    tokens = corpus.tokens(domain, "train")
    n = _num_windows(tokens, seq_len)
    if n == 0:
      raise DataError(f"domain {domain!r}: its train split has {len(tokens)} tokens, fewer than one window of "
                      f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or add text to "
                      f"config.data.domains.{domain}.")
    total += n
    index = corpus.domains.index(domain)
    domain_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    parts.append(grain.MapDataset.range(n).shuffle(seed=domain_seed).repeat()
                 .map(_Window(tokens, seq_len, index)))
  if total < batch_size:
    raise DataError(f"the domains {list(weights)} have {total} windows of seq_len {seq_len} in all, fewer than "
                    f"one batch of {batch_size}; use a smaller batch_size or seq_len, or add text.")
  mixed = grain.MapDataset.mix(parts, list(weights.values()))
  # The mixture is endless (its length is sys.maxsize). drop_remainder makes the batched length the integer
  # maxsize // B; without it grain computes ceil(maxsize / B) in floating point, which for B = 1 is 2**63,
  # too large for len(). Batch k is rows [k*B, (k+1)*B) of the mixture either way.
  collate = _Collate(corpus.tokenizer.eos_id, corpus.segment_masking)
  return mixed.batch(batch_size // process_count, drop_remainder=True, batch_fn=collate).slice(
      slice(process_index, None, process_count))


def eval_batches(corpus, domain: str, *, seq_len: int, batch_size: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """`num_batches` fixed batches of evenly spaced windows of `domain`'s validation split, the same every call.

  With several processes, process p gets rows [p*B/P, (p+1)*B/P) of each batch.
  """
  _check_sizes(seq_len=seq_len, batch_size=batch_size, num_batches=num_batches, process_count=process_count)
  _check_process_share(batch_size, process_index, process_count)
  tokens = corpus.tokens(domain, "val")
  n = _num_windows(tokens, seq_len)
  if n == 0:
    raise DataError(f"domain {domain!r}: its validation split has {len(tokens)} tokens, fewer than one window "
                    f"of seq_len + 1 = {seq_len + 1}; use a shorter seq_len, a larger config.data.val_fraction, "
                    f"or more text in config.data.domains.{domain}.")
  count = batch_size * num_batches
  covering = -(-n // batch_size)  # the batches that hold every window once
  if num_batches > covering:  # the later batches would only repeat windows (10**9 of them ran out of memory)
    raise DataError(f"domain {domain!r}: its validation split has {n:,} windows of seq_len {seq_len}, which "
                    f"{covering:,} batches of {batch_size} rows hold; {num_batches:,} batches would only repeat "
                    f"them. Ask for at most {covering:,} (train.eval_batches, or evaluate's --eval_batches).")
  if count > n:
    logging.warning("data: the validation split of %r has %d windows of seq_len %d; the %d evaluation rows "
                    "repeat some of them.", domain, n, seq_len, count)
  starts = (np.arange(count) * n // count) * seq_len
  windows = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], np.int32)
  local = batch_size // process_count
  rows = windows.reshape(num_batches, batch_size, seq_len + 1)
  rows = rows[:, process_index * local:(process_index + 1) * local]
  domain_index = np.full(local, corpus.domains.index(domain), np.int32)
  batches = [{"inputs": w[:, :-1], "targets": w[:, 1:], "domain": domain_index.copy()} for w in rows]
  if corpus.segment_masking:
    for b in batches:
      b["segment_ids"] = segment_ids(b["inputs"], corpus.tokenizer.eos_id)
  return batches


def segment_ids(inputs: np.ndarray, eos_id: int | None) -> np.ndarray:
  """int32 like `inputs`: per row, the number of separators strictly before each position."""
  if eos_id is None:
    return np.zeros(inputs.shape, np.int32)
  is_separator = (inputs == eos_id).astype(np.int32)
  return np.cumsum(is_separator, axis=-1, dtype=np.int32) - is_separator


class _Window:
  """Window k of a token stream, tagged with its domain index."""

  def __init__(self, tokens: np.ndarray, seq_len: int, domain_index: int):
    self.tokens, self.seq_len, self.domain_index = tokens, seq_len, domain_index

  def __call__(self, k: int) -> tuple[np.ndarray, int]:
    return self.tokens[k * self.seq_len:(k + 1) * self.seq_len + 1], self.domain_index


class _Collate:
  """Windows -> a batch dict; with `with_segments`, `segment_ids` too."""

  def __init__(self, eos_id: int | None, with_segments: bool):
    self.eos_id, self.with_segments = eos_id, with_segments

  def __call__(self, windows: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    tokens = np.stack([w for w, _ in windows]).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "domain": np.array([d for _, d in windows], np.int32)}
    if self.with_segments:
      batch["segment_ids"] = segment_ids(batch["inputs"], self.eos_id)
    return batch


def _num_windows(tokens: np.ndarray, seq_len: int) -> int:
  return (len(tokens) - 1) // seq_len


def _check_process_share(batch_size: int, process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} must lie in [0, process_count={process_count}).")
  if batch_size % process_count:
    raise DataError(f"batch_size {batch_size} is not divisible by process_count {process_count}; use a batch "
                    "size that is a multiple of the process count.")


def _check_sizes(**sizes: int) -> None:
  for name, value in sizes.items():
    if not (isinstance(value, numbers.Integral) and value > 0):
      raise DataError(f"{name} must be a positive integer, got {value!r}.")


def _mixture_weights(corpus, domain_weights) -> dict[str, float]:
  """Domain -> weight for the domains with positive weight, in `corpus.domains` order."""
  given = dict(domain_weights) if domain_weights else {d: 1.0 for d in corpus.domains}
  unknown = sorted(set(given) - set(corpus.domains))
  if unknown:
    raise DataError(f"domain_weights name unknown domains {unknown}; config.data.domains has "
                    f"{list(corpus.domains)}.")
  bad = {d: w for d, w in given.items() if not (isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0)}
  if bad:
    raise DataError(f"domain_weights {bad} must be finite numbers >= 0.")
  weights = {d: float(given[d]) for d in corpus.domains if given.get(d, 0) > 0}
  if not weights:
    raise DataError(f"domain_weights {given} are all zero; give at least one domain a positive weight.")
  return weights
