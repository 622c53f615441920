"""The train/validation split: by file, with near-duplicate files kept on one side.

Hashing paths alone puts near-copies on both sides (`encodings/cp858.py` is 99 % `cp850.py`), so
validation would measure memorisation. Instead each text of a file (each view of its source: the code and
its docstrings for the built-in corpus) becomes its set of shingles: every run of SHINGLE_WORDS
whitespace-separated words, or for a shorter text one shingle of all its words. Two files are
near-duplicates when, in some view, one shares at least NEAR_DUPLICATE of its shingles with the other;
near-duplicates are joined transitively into groups, and a group goes to validation when the hash of its
first path is below `val_fraction`. So no validation file shares NEAR_DUPLICATE of a view's shingles with
any training file's same view. The files of all domains are grouped together, and a group has one side in
every domain that holds its files (corpus.py), since training mixes the domains.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

SHINGLE_WORDS = 8
NEAR_DUPLICATE = 0.5
# A shingle in more files than this is boilerplate (a license header), not a sign of a copy: it is left out
# of the comparison, which also bounds its cost (quadratic in the number of files sharing a shingle).
COMMON_FILES = 1000

_MIX = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(0x100000001B3)
_PIECE = 1 << 20  # characters of a text split into words at a time
_SPACE = re.compile(r"\s")  # the whitespace str.split() splits at


def shingles(text: str) -> np.ndarray:
  """A text's sorted distinct uint64 shingle hashes."""
  found, ids = [], np.zeros(0, np.uint64)  # ids: hashes of the words no shingle starts at yet
  for piece in _pieces(text):
    words = piece.split()
    # Each word is hashed, not numbered in a dictionary of all texts' words (which took 3x the memory of the
    # shingles it served): among a million distinct words, two share a hash with probability about 5e-8.
    word_hashes = {word: _word_hash(word) for word in set(words)}
    ids = np.concatenate([ids, np.fromiter(map(word_hashes.__getitem__, words), np.uint64, len(words))])
    if len(ids) >= SHINGLE_WORDS:
      found.append(_shingle_hashes(ids))
      ids = ids[len(ids) - SHINGLE_WORDS + 1:]
  if not found and len(ids):  # fewer words than a shingle: one shingle of them all
    found.append(_shingle_hashes(np.concatenate([ids, np.zeros(SHINGLE_WORDS - len(ids), np.uint64)])))
  if not found:
    return np.zeros(0, np.uint64)
  h = np.concatenate(found)
  found.clear()
  h.sort()  # in place, where np.unique sorts a copy
  return h[np.concatenate([[True], h[1:] != h[:-1]])]


def _pieces(text: str):
  """The text in pieces of about _PIECE characters, cut at whitespace: the words of a whole large file as
  Python strings took about 60 bytes each."""
  start = 0
  while start < len(text):
    space = _SPACE.search(text, start + _PIECE)
    end = space.start() if space else len(text)
    yield text[start:end]
    start = end


def _shingle_hashes(ids: np.ndarray) -> np.ndarray:
  """The hash of each run of SHINGLE_WORDS word hashes (0 is no word)."""
  x = ids * _MIX
  x ^= x >> np.uint64(29)
  n = len(ids) - SHINGLE_WORDS + 1
  h = np.zeros(n, np.uint64)
  for i in range(SHINGLE_WORDS):
    h = (h ^ x[i:i + n]) * _PRIME
    h ^= h >> np.uint64(31)
  return h


def _word_hash(word: str) -> int:
  """A word's odd (so nonzero) 64-bit hash, the same in every process (unlike `hash`)."""
  digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
  return int.from_bytes(digest, "little") | 1


def near_duplicate_groups(views: list[list[np.ndarray]]) -> list[int]:
  """For each file, the index of the first file of its group of near-duplicates.

  views[v][i]: the shingles of file i's view v; files are compared view by view.
  """
  n = len(views[0])
  parent = list(range(n))

  def root(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for shingle_sets in views:
    for i, j in _near_duplicate_pairs(shingle_sets):
      parent[root(i)] = root(j)
  roots = [root(i) for i in range(n)]
  first_member = {}
  for i, r in enumerate(roots):
    first_member.setdefault(r, i)
  return [first_member[r] for r in roots]


def _near_duplicate_pairs(shingle_sets: list[np.ndarray]):
  """(i, j): file i shares at least NEAR_DUPLICATE of its (not too common) shingles with file j.

  Only the shingles of two to COMMON_FILES files are indexed (most are in one file): memory beyond the
  shingle sets is one sorted copy of them, briefly, and arrays the size of the shared ones.
  """
  if not sum(len(s) for s in shingle_sets):
    return
  values = np.concatenate(shingle_sets)
  values.sort()
  repeated = values[1:][values[1:] == values[:-1]]  # a shingle of k files appears k - 1 times
  del values
  distinct, repeats = np.unique(repeated, return_counts=True)
  shared, common = distinct[repeats < COMMON_FILES], distinct[repeats >= COMMON_FILES]
  # Each file's shared shingles (indices into `shared`), then the files holding each shared shingle.
  held = [_members(shared, s) for s in shingle_sets]
  runs = np.concatenate(held)
  holders = np.repeat(np.arange(len(shingle_sets), dtype=np.int32), [len(h) for h in held])[
      np.argsort(runs, kind="stable")]
  count = np.bincount(runs, minlength=len(shared))
  first = np.cumsum(count) - count
  for i, (shingles_i, g) in enumerate(zip(shingle_sets, held)):
    compared = len(shingles_i) - len(_members(common, shingles_i))  # its shingles that are not too common
    if not len(g):
      continue
    c = count[g]
    # Concatenate the ranges holders[first[g]:first[g] + c] without a Python loop.
    offsets = np.repeat(first[g] - (np.cumsum(c) - c), c) + np.arange(c.sum())
    others, n_shared = np.unique(holders[offsets], return_counts=True)
    for j in others[(n_shared >= NEAR_DUPLICATE * compared) & (others != i)]:
      yield i, int(j)


def _members(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
  """The indices in `sorted_values` of the elements of `x` it holds."""
  at = np.searchsorted(sorted_values, x)
  found = at < len(sorted_values)
  found[found] = sorted_values[at[found]] == x[found]
  return at[found]


def assign_val(keys: dict[str, list[str]], val_fraction: float) -> set[str]:
  """The validation groups: those whose key (the group's first path) hashes below `val_fraction`.

  keys: {domain: each of its files' group key}. A group has one side in every domain. Each domain (in
  order) gets both splits non-empty by moving its group with the lowest hash into validation, or its one
  with the highest into train, when needed; that takes at least two groups, and a move for one domain can
  empty a side of an earlier one that shares the group (the caller checks).
  """
  h = {key: _unit_hash(key) for domain_keys in keys.values() for key in domain_keys}
  val_keys = {key for key, x in h.items() if x < val_fraction}
  for domain_keys in keys.values():
    own = set(domain_keys)
    if not own & val_keys:
      val_keys.add(min(own, key=h.get))
    if own <= val_keys:
      val_keys.remove(max(own, key=h.get))
  return val_keys


def _unit_hash(key: str) -> float:
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
