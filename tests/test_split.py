"""The split's near-duplicate search (data/split.py) against a direct comparison of sets, and its memory."""
import itertools
import tracemalloc

import numpy as np

from diffmoe_jax.data import split
from test_data import english, shingles


TEXTS = [english(i) for i in range(5)] + ["café naïve   a\nb", "", "  one\u3000two\x1cthree\t",
                                         " ".join("abcdefgh")]


def test_a_texts_shingles_are_its_distinct_word_runs_whatever_was_hashed_before():
  first = [split.shingles(t) for t in TEXTS]
  for text, got, again in zip(TEXTS, first, [split.shingles(t) for t in reversed(TEXTS)][::-1]):
    assert got.dtype == np.uint64 and len(got) == len(shingles(text))
    np.testing.assert_array_equal(got, again)


def test_a_text_read_in_pieces_has_the_shingles_of_the_whole(monkeypatch):
  """A large text is split into words a piece at a time; runs across the cuts must not be lost or added."""
  whole = [split.shingles(t) for t in TEXTS]
  for piece in (1, 5, 64):
    monkeypatch.setattr(split, "_PIECE", piece)
    for text, expected in zip(TEXTS, whole):
      np.testing.assert_array_equal(split.shingles(text), expected)


def direct_pairs(sets, common_files):
  """(i, j) where i shares at least half of its shingles held by at most common_files files with j."""
  holders = {}
  for s in sets:
    for x in s:
      holders[x] = holders.get(x, 0) + 1
  pairs = set()
  for i, j in itertools.permutations(range(len(sets)), 2):
    compared = {x for x in sets[i] if holders[x] <= common_files}
    if compared and len(compared & sets[j]) >= 0.5 * len(compared):
      pairs.add((i, j))
  return pairs


def test_near_duplicate_pairs_are_those_of_a_direct_comparison(monkeypatch):
  monkeypatch.setattr(split, "COMMON_FILES", 5)
  rng = np.random.default_rng(0)
  pool = rng.integers(1, 2**63, 400, dtype=np.uint64)
  boilerplate = set(pool[:3].tolist())  # in more than COMMON_FILES files: left out of the comparison
  sets = []
  for i in range(40):
    if i % 4 == 3:  # a near-copy of the file before: most of its shingles and a few others
      base = sorted(sets[-1])
      s = set(rng.choice(base, int(len(base) * rng.uniform(0.3, 1.0)), replace=False).tolist())
      s |= set(rng.choice(pool, 3).tolist())
    else:
      s = set(rng.choice(pool[3:], rng.integers(0, 30), replace=False).tolist())
    sets.append(s | (boilerplate if i % 2 else set()))
  sets.append(set(boilerplate))  # nothing but boilerplate: compared on nothing
  arrays = [np.array(sorted(s), np.uint64) for s in sets]
  got = set(split._near_duplicate_pairs(arrays))
  assert got == direct_pairs(sets, 5)
  assert len(got) > 10  # the near-copies are found


def test_near_duplicate_search_holds_little_beyond_the_shingles():
  """It used to hold about ten arrays as long as all files' shingles together (a 34 MB corpus's build
  peaked at 602 MB); now one sorted copy, and arrays of the shingles held by two files or more."""
  rng = np.random.default_rng(1)
  arrays = [np.unique(rng.integers(0, 2**64, 5000, dtype=np.uint64)) for _ in range(100)]
  arrays[1] = arrays[0].copy()
  total = sum(a.nbytes for a in arrays)
  tracemalloc.start()  # numpy reports its arrays' memory to tracemalloc
  try:
    pairs = set(split._near_duplicate_pairs(arrays))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert pairs == {(0, 1), (1, 0)}
  assert peak < 1.5 * total, peak / total


def test_a_large_texts_words_are_not_all_held_at_once(monkeypatch):
  """Its words as Python strings took about 60 bytes each (18x the text, whole); a piece at a time, what is
  held is its shingle hashes (8 bytes a word) while they are sorted."""
  monkeypatch.setattr(split, "_PIECE", 1 << 16)
  text = "".join(english(i, paragraphs=200) for i in range(60))  # 0.6 MB, 10 pieces
  tracemalloc.start()
  try:
    split.shingles(text)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 6 * len(text), peak / len(text)
