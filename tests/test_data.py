"""The data pipeline: sources, split, token cache, tokenizers, grain batches and baselines (its errors:
test_data_errors.py).

References are computed independently here (hashlib, tokenize, ast, the tokenizer libraries themselves,
collections.Counter), never by the code under test.
"""
import ast
import collections
import hashlib
import os
import random
import sysconfig
import tokenize

import ml_collections
import numpy as np
import pytest

from diffmoe_jax import config as config_lib
from diffmoe_jax import data
from diffmoe_jax.data import corpus as corpus_lib
from diffmoe_jax.data import tokenizer as tokenizer_lib

SEQ = 64


def data_config(domains, tokenizer="bytes", val_fraction=0.05):
  c = config_lib.defaults().data
  c.domains = domains
  c.tokenizer = tokenizer
  c.val_fraction = val_fraction
  return c


def unit_hash(relpath):
  return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2**64


def windows_of(stream, seq_len):
  """Every window a batch row may be: seq_len + 1 tokens starting at a multiple of seq_len."""
  return np.lib.stride_tricks.sliding_window_view(np.asarray(stream), seq_len + 1)[::seq_len]


def window_index(windows, row):
  """The indices of the windows equal to `row` (inputs followed by the last target)."""
  return np.flatnonzero((windows == row).all(axis=1))


def rows(batch):
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def english(seed, paragraphs=20):
  """A few KB of deterministic text with some non-ASCII words, so bytes and characters differ."""
  rng = random.Random(seed)
  words = ("the a of to in data model token expert router café naïve layer attention is was and with for on "
           "sparse dense depth mixture batch").split()
  return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."
                   for _ in range(paragraphs)) + "\n"


def build_text(tmp_path, files, spec="files:{d}/*.txt", **kwargs):
  """A corpus of one domain, "text", from `files` (name: bytes) written to tmp_path/src."""
  d = tmp_path / "src"
  d.mkdir(exist_ok=True)
  for name, content in files.items():
    (d / name).write_bytes(content)
  return data.build_corpus(data_config({"text": spec.format(d=d)}, **kwargs), cache_root=str(tmp_path / "c"))


@pytest.fixture(scope="module")
def stdlib():
  root = os.environ["DIFFMOE_CACHE"]  # the session's cache (tests/conftest.py), shared with training tests
  return data.build_corpus(data_config({"code": "stdlib:code", "docs": "stdlib:docs"}), cache_root=root), root


@pytest.fixture
def text_dir(tmp_path):
  d = tmp_path / "text"
  d.mkdir()
  for i in range(8):
    (d / f"doc{i}.txt").write_text(english(i), encoding="utf-8")
  return d


# --- the built-in corpus and the cache -------------------------------------------------------------------

def test_stdlib_corpus_builds_with_the_expected_content(stdlib):
  corpus, _ = stdlib
  assert corpus.domains == ("code", "docs")
  assert corpus.tokenizer.vocab_size == 256 and corpus.tokenizer.eos_id == 0
  root = sysconfig.get_paths()["stdlib"]
  for domain in corpus.domains:
    for split in ("train", "val"):
      info = corpus.info(domain, split)
      tokens = corpus.tokens(domain, split)
      assert tokens.dtype == np.uint16 and len(tokens) == info.num_tokens > 0
      assert len(info.files) > 0 and not any("site-packages" in f for f in info.files)
      # One NUL separator per document, and the bytes are the text's bytes.
      assert np.count_nonzero(np.asarray(tokens) == 0) == len(info.files)
      assert info.num_bytes == info.num_tokens - len(info.files)
      assert corpus.bytes_per_token(domain, split) == info.num_bytes / info.num_tokens
  # The code stream starts with the first train file, decoded by its PEP 263 encoding, then a separator.
  first = corpus.info("code", "train").files[0]
  with tokenize.open(os.path.join(root, first)) as f:
    expected = np.frombuffer(f.read().encode("utf-8"), np.uint8)
  code = corpus.tokens("code", "train")
  np.testing.assert_array_equal(code[:len(expected)], expected)
  assert code[len(expected)] == 0
  # The docs stream starts with the first docs file's docstrings, in source order, joined by blank lines.
  first = corpus.info("docs", "train").files[0]
  with tokenize.open(os.path.join(root, first)) as f:
    tree = ast.parse(f.read())
  nodes = sorted((n for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
                 key=lambda n: getattr(n, "lineno", 0))
  doc = "\n\n".join(d for d in map(ast.get_docstring, nodes) if d).encode("utf-8")
  docs = corpus.tokens("docs", "train")
  assert bytes(docs[:len(doc)].astype(np.uint8)) == doc and docs[len(doc)] == 0


def test_reopen_reuses_the_cache_without_tokenizing(stdlib, monkeypatch):
  corpus, root = stdlib
  # Only this corpus's entries: other test processes build theirs in the same session cache meanwhile.
  written = lambda: {(d, name): os.stat(os.path.join(d, name)).st_mtime_ns for d in corpus.cache_dirs.values()
                     for name in os.listdir(d)}
  before = written()

  def fail(self, text):
    raise AssertionError("re-tokenized")

  monkeypatch.setattr(tokenizer_lib.ByteTokenizer, "encode", fail)
  again = data.build_corpus(data_config({"code": "stdlib:code", "docs": "stdlib:docs"}), cache_root=root)
  assert again.cache_dirs == corpus.cache_dirs and written() == before
  for domain in corpus.domains:
    assert isinstance(again.tokens(domain, "train"), np.memmap)
    np.testing.assert_array_equal(again.tokens(domain, "val"), corpus.tokens(domain, "val"))


def test_cache_is_keyed_by_content_and_an_interrupted_build_leaves_nothing(text_dir, tmp_path, monkeypatch):
  root = str(tmp_path / "cache")
  config = data_config({"text": f"files:{text_dir}/*.txt"})
  real_encode = tokenizer_lib.ByteTokenizer.encode
  calls = []

  def interrupted(self, text):
    calls.append(text)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real_encode(self, text)

  monkeypatch.setattr(tokenizer_lib.ByteTokenizer, "encode", interrupted)
  with pytest.raises(KeyboardInterrupt):
    data.build_corpus(config, cache_root=root)
  assert os.listdir(root) == []  # no half cache, no temporary directory
  monkeypatch.setattr(tokenizer_lib.ByteTokenizer, "encode", real_encode)
  data.build_corpus(config, cache_root=root)
  assert len(os.listdir(root)) == 1
  (text_dir / "doc0.txt").write_text(english(100), encoding="utf-8")  # new content: a new cache entry
  corpus = data.build_corpus(config, cache_root=root)
  assert len(os.listdir(root)) == 2
  assert bytes(np.concatenate([corpus.tokens("text", s) for s in ("train", "val")]).astype(np.uint8)).count(
      english(100).encode("utf-8")) == 1


def test_both_stdlib_domains_parse_each_file_once(tmp_path, monkeypatch):
  """Both domains need both views of every file (they split alike); the docstrings are parsed once per build."""
  from diffmoe_jax.data import sources
  lib = tmp_path / "lib"
  lib.mkdir()
  for i in range(6):
    (lib / f"mod{i}.py").write_text(f'"""Module {i}: {english(i, 2)}"""\n\ndef f():\n  """{english(i + 9, 1)}"""\n')
  monkeypatch.setattr(sources, "_stdlib_files", lambda field: (str(lib), tuple(sorted(map(str, lib.iterdir())))))
  parsed = collections.Counter()
  real_docstrings = sources.docstrings

  def counting_docstrings(text, path):
    parsed[path] += 1
    return real_docstrings(text, path)

  monkeypatch.setattr(sources, "docstrings", counting_docstrings)
  corpus = data.build_corpus(data_config({"code": "stdlib:code", "docs": "stdlib:docs"}, val_fraction=0.3),
                             cache_root=str(tmp_path / "cache"))
  assert sorted(parsed.values()) == [1] * 6
  docs = np.concatenate([corpus.tokens("docs", split) for split in ("train", "val")])
  assert bytes(docs.astype(np.uint8)).count(b"Module ") == 6


def test_a_token_cache_path_that_is_a_file_is_a_data_error(tmp_path):
  a_file = tmp_path / "cache"
  a_file.write_text("")
  with pytest.raises(data.DataError, match=f"the token cache {a_file} cannot be written .*set config.data.cache_dir"):
    data.build_corpus(data_config({"code": "stdlib:code"}), cache_root=str(a_file))


def test_token_dtype_widens_past_uint16():
  assert corpus_lib.token_dtype(65536) == np.uint16 and corpus_lib.token_dtype(65537) == np.uint32


# --- the split --------------------------------------------------------------------------------------------

def test_split_keeps_near_copies_together_and_agrees_across_domains(stdlib):
  corpus, _ = stdlib
  val = {}
  for domain in corpus.domains:
    train, val[domain] = set(corpus.info(domain, "train").files), set(corpus.info(domain, "val").files)
    assert train and val[domain] and not train & val[domain]
    assert 0.03 < len(val[domain]) / len(train | val[domain]) < 0.08
    # A file with no near-copy goes by the hash of its own path: most files.
    by_path = [(unit_hash(f) < 0.05) == (f in val[domain]) for f in train | val[domain]]
    assert np.mean(by_path) > 0.95
    # Near-copies (the same code page tables with a few characters changed) share a side.
    for a, b in (("cp858", "cp850"), ("cp865", "cp437"), ("mac_iceland", "mac_roman")):
      a, b = f"encodings/{a}.py", f"encodings/{b}.py"
      if a in train | val[domain]:
        assert (a in val[domain]) == (b in val[domain]), (domain, a, b)
  # A file's docstrings are part of its code, and training mixes both domains: each file has one side.
  code_files = set(corpus.info("code", "train").files) | val["code"]
  docs_files = set(corpus.info("docs", "train").files) | val["docs"]
  assert all((f in val["code"]) == (f in val["docs"]) for f in code_files & docs_files)


def test_split_is_deterministic_and_both_splits_are_never_empty(text_dir, tmp_path):
  config = data_config({"text": f"files:{text_dir}/*.txt"}, val_fraction=1e-9)
  a = data.build_corpus(config, cache_root=str(tmp_path / "a"))
  b = data.build_corpus(config, cache_root=str(tmp_path / "b"))
  names = [f"doc{i}.txt" for i in range(8)]
  # A val_fraction too small for any file still gives a validation file: the one whose path hashes lowest.
  assert a.info("text", "val").files == b.info("text", "val").files == (min(names, key=unit_hash),)
  assert a.info("text", "train").files == tuple(sorted(set(names) - {min(names, key=unit_hash)}))
  np.testing.assert_array_equal(a.tokens("text", "train"), b.tokens("text", "train"))
  high = data.build_corpus(data_config({"text": f"files:{text_dir}/*.txt"}, val_fraction=0.999),
                           cache_root=str(tmp_path / "a"))
  assert high.info("text", "train").files == (max(names, key=unit_hash),)


def test_unigram_bits_per_byte_from_the_files_themselves(text_dir, tmp_path):
  """The baseline next to each domain's bits per byte: the validation tokens' bits under the add-one-smoothed byte
  counts of the training files (a separator after each document), per byte of the validation files' UTF-8 text,
  which the separators are not (the texts hold non-ASCII words, so bytes are not characters either)."""
  corpus = data.build_corpus(data_config({"text": f"files:{text_dir}/*.txt"}, val_fraction=0.3),
                             cache_root=str(tmp_path / "cache"))
  text = {s: [(text_dir / f).read_text(encoding="utf-8").encode("utf-8") for f in corpus.info("text", s).files]
          for s in ("train", "val")}
  counts = {s: np.bincount(np.frombuffer(b"\0".join(docs) + b"\0", np.uint8), minlength=256).astype(np.float64)
            for s, docs in text.items()}
  log2_p = np.log2((counts["train"] + 1) / (counts["train"].sum() + 256))
  want = -(counts["val"] * log2_p).sum() / sum(len(doc) for doc in text["val"])
  assert corpus.unigram_bits_per_byte("text") == pytest.approx(want, rel=1e-9)

SHINGLE_WORDS = 8


def shingles(text):
  """A text's distinct runs of 8 whitespace-separated words (a shorter text: its whole word sequence)."""
  words = text.split()
  if len(words) < SHINGLE_WORDS:
    return {tuple(words)} if words else set()
  return {tuple(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def documents(corpus, domain, split):
  """Each file's text as the token stream holds it (bytes tokenizer: documents end with NUL)."""
  texts = bytes(np.asarray(corpus.tokens(domain, split), np.uint8)).decode("utf-8").split("\0")[:-1]
  assert len(texts) == len(corpus.info(domain, split).files)
  return dict(zip(corpus.info(domain, split).files, texts))


def test_no_validation_file_is_mostly_one_training_file(stdlib):
  """Coverage of a validation file by a training file: the fraction of the validation file's shingles that
  occur in the training file. Near-duplicates (encodings/cp858.py and cp850.py) must share a split, in each
  domain and across them: a file's docstrings are in its code, and training mixes both domains."""
  corpus, _ = stdlib
  worst = {}
  for val_domain, train_domains in (("code", ("code", "docs")), ("docs", ("docs", "code"))):
    val = {f: shingles(text) for f, text in documents(corpus, val_domain, "val").items()}
    holders = collections.defaultdict(list)  # shingle -> the validation files that have it
    for f, found in val.items():
      for shingle in found:
        holders[shingle].append(f)
    for train_domain in train_domains:
      for t, text in documents(corpus, train_domain, "train").items():
        shared = collections.Counter(f for s in shingles(text) if s in holders for f in holders[s])
        for f, n in shared.items():
          key = (val_domain, f)
          worst[key] = max(worst.get(key, (0.0,)), (n / len(val[f]), train_domain, t))
  leaks = {key: value for key, value in worst.items() if value[0] >= 0.8}
  assert not leaks, sorted(leaks.items(), key=lambda kv: -kv[1][0])[:10]
  assert len(worst) > 50  # validation files do share some text with training files; it is measured


# --- training batches -------------------------------------------------------------------------------------

def test_batch_is_a_pure_function_of_seed_and_step(stdlib):
  corpus, _ = stdlib
  kwargs = dict(seed=3, seq_len=SEQ, batch_size=8, domain_weights={"code": 0.8, "docs": 0.2})
  ds = data.train_dataset(corpus, **kwargs)
  late = ds[1_000_003]  # random access: no iterator state, any order
  first = ds[5]
  fresh = data.train_dataset(corpus, **kwargs)
  for key in ("inputs", "targets", "domain"):
    np.testing.assert_array_equal(fresh[5][key], first[key])
    np.testing.assert_array_equal(fresh[1_000_003][key], late[key])
  assert first["inputs"].shape == first["targets"].shape == (8, SEQ) and first["domain"].shape == (8,)
  assert first["inputs"].dtype == first["targets"].dtype == first["domain"].dtype == np.int32
  assert not np.array_equal(ds[6]["inputs"], first["inputs"])
  other_seed = data.train_dataset(corpus, **{**kwargs, "seed": 4})
  assert not np.array_equal(other_seed[5]["inputs"], first["inputs"])


def test_each_domain_is_shuffled_with_its_own_seed(text_dir, tmp_path):
  """Two domains of the same files: the same windows, read in two orders (seeds from (seed, domain index)). One
  shuffle seed for every domain passed every test: the built-in domains differ in length, so their orders did too."""
  spec = f"files:{text_dir}/*.txt"
  corpus = data.build_corpus(data_config({"a": spec, "b": spec}), cache_root=str(tmp_path / "cache"))
  np.testing.assert_array_equal(corpus.tokens("a", "train"), corpus.tokens("b", "train"))
  windows = windows_of(corpus.tokens("a", "train"), 16)
  ds = data.train_dataset(corpus, seed=0, seq_len=16, batch_size=8)
  order = {0: [], 1: []}
  for step in range(6):
    batch = ds[step]
    for row, domain in zip(rows(batch), batch["domain"]):
      order[int(domain)].append(int(window_index(windows, row)[0]))
  n = min(len(order[0]), len(order[1]))
  assert n >= 16 and order[0][:n] != order[1][:n], order


def test_a_batch_of_one_is_the_mixed_stream_one_row_at_a_time(stdlib):
  """Batch 1 (a phase whose tokens_per_batch equals its seq_len) reads the same stream batch 2 cuts in pairs."""
  corpus, _ = stdlib
  kwargs = dict(seed=5, seq_len=SEQ, domain_weights={"code": 0.6, "docs": 0.4})
  ones = data.train_dataset(corpus, batch_size=1, **kwargs)
  twos = data.train_dataset(corpus, batch_size=2, **kwargs)
  for step in (0, 3, 500_001):
    pair = twos[step]
    for i in range(2):
      row = ones[2 * step + i]
      assert row["inputs"].shape == row["targets"].shape == (1, SEQ) and row["domain"].shape == (1,)
      for key in ("inputs", "targets", "domain"):
        np.testing.assert_array_equal(row[key][0], pair[key][i])


@pytest.mark.parametrize("step", [0, 7, 123_456])
def test_process_shards_concatenate_to_the_global_batch(stdlib, step):
  corpus, _ = stdlib
  kwargs = dict(seed=0, seq_len=SEQ, batch_size=8, domain_weights={"code": 0.7, "docs": 0.3})
  whole = data.train_dataset(corpus, **kwargs)[step]
  for count in (2, 4):
    parts = [data.train_dataset(corpus, process_index=p, process_count=count, **kwargs)[step]
             for p in range(count)]
    assert all(part["inputs"].shape == (8 // count, SEQ) for part in parts)
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


@pytest.mark.parametrize("weights, code_share", [(ml_collections.ConfigDict({"code": 0.8, "docs": 0.2}), 0.8),
                                                 (ml_collections.ConfigDict(), 0.5), (None, 0.5),
                                                 ({"code": 1.0, "docs": 0.0}, 1.0)])
def test_mixture_proportions_match_the_weights(stdlib, weights, code_share):
  corpus, _ = stdlib
  ds = data.train_dataset(corpus, seed=1, seq_len=SEQ, batch_size=10, domain_weights=weights)
  domains = np.concatenate([ds[i]["domain"] for i in range(300)])  # 3000 rows
  assert set(np.unique(domains)) <= {0, 1}
  assert abs(np.mean(domains == corpus.domains.index("code")) - code_share) <= 0.01


def test_windows_are_shifted_by_one_and_lie_in_their_domains_train_stream(stdlib):
  corpus, _ = stdlib
  windows = {d: windows_of(corpus.tokens(d, "train"), SEQ) for d in corpus.domains}
  ds = data.train_dataset(corpus, seed=2, seq_len=SEQ, batch_size=8)
  seen = collections.Counter()
  for step in (0, 1, 50_000):
    batch = ds[step]
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    for row, d in zip(rows(batch), batch["domain"]):
      assert len(window_index(windows[corpus.domains[d]], row)) >= 1
      seen[d] += 1
  assert seen[0] and seen[1]


def naive_segment_ids(inputs, eos_id):
  """Per row: 0 for the first document; a separator is the last token of its document."""
  out = np.zeros(inputs.shape, np.int64)
  for b in range(inputs.shape[0]):
    document = 0
    for t in range(inputs.shape[1]):
      out[b, t] = document
      if inputs[b, t] == eos_id:
        document += 1
  return out


def test_segment_ids_number_the_documents_of_each_window(tmp_path):
  # Documents of a few hundred bytes, so 128-byte windows cross several separators.
  corpus = build_text(tmp_path, {f"{i}.txt": english(i, paragraphs=2).encode() for i in range(12)},
                      val_fraction=0.3)
  eos = corpus.tokenizer.eos_id
  train = data.train_dataset(corpus, seed=0, seq_len=128, batch_size=4)
  batches = [train[step] for step in range(6)]
  batches += data.eval_batches(corpus, "text", seq_len=128, batch_size=4, num_batches=1)
  for batch in batches:
    assert batch["segment_ids"].dtype == np.int32 and batch["segment_ids"].shape == batch["inputs"].shape
    np.testing.assert_array_equal(batch["segment_ids"], naive_segment_ids(batch["inputs"], eos))
  assert max(b["segment_ids"].max() for b in batches) >= 2  # windows do span several documents
  # Off: the batches are as before, with no segment_ids.
  config = data_config({"text": f"files:{tmp_path}/src/*.txt"}, val_fraction=0.3)
  config.segment_masking = False
  plain = data.build_corpus(config, cache_root=str(tmp_path / "c"))
  batch = data.train_dataset(plain, seed=0, seq_len=128, batch_size=4)[0]
  assert set(batch) == {"inputs", "targets", "domain"}
  np.testing.assert_array_equal(batch["inputs"], batches[0]["inputs"])
  assert "segment_ids" not in data.eval_batches(plain, "text", seq_len=128, batch_size=2, num_batches=1)[0]


# --- evaluation batches -----------------------------------------------------------------------------------

def test_eval_batches_are_fixed_evenly_spaced_validation_windows(stdlib):
  corpus, _ = stdlib
  batches = data.eval_batches(corpus, "docs", seq_len=SEQ, batch_size=4, num_batches=3)
  again = data.eval_batches(corpus, "docs", seq_len=SEQ, batch_size=4, num_batches=3)
  assert len(batches) == 3
  val = np.asarray(corpus.tokens("docs", "val"))
  n = (len(val) - 1) // SEQ
  found = []
  for b, c in zip(batches, again):
    for key in b:
      np.testing.assert_array_equal(b[key], c[key])
    assert (b["domain"] == corpus.domains.index("docs")).all()
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    found += [window_index(windows_of(val, SEQ), row)[0] for row in rows(b)]
  assert found == [i * n // 12 for i in range(12)]
  halves = [data.eval_batches(corpus, "docs", seq_len=SEQ, batch_size=4, num_batches=3, process_index=p,
                              process_count=2) for p in (0, 1)]
  for b, h0, h1 in zip(batches, *halves):
    np.testing.assert_array_equal(np.concatenate([h0["inputs"], h1["inputs"]]), b["inputs"])


def test_a_byte_order_mark_is_no_text(tmp_path):
  """Windows editors start UTF-8 files with a byte-order mark; it was trained on as three bytes of text at
  the start of every such document, and counted in an evaluated file's bytes."""
  from diffmoe_jax import evaluate as evaluate_lib
  texts = {f"doc{i}.txt": english(i) for i in range(8)}
  corpus = build_text(tmp_path, {name: b"\xef\xbb\xbf" + t.encode() for name, t in texts.items()})
  stream = bytes(np.concatenate([corpus.tokens("text", s) for s in ("train", "val")]).astype(np.uint8))
  assert b"\xef\xbb\xbf" not in stream
  assert all(stream.count(t.encode()) == 1 for t in texts.values())
  (tokens, bytes_per_token), = evaluate_lib.read_text_files([str(tmp_path / "src" / "doc0.txt")],
                                                           data.make_tokenizer("bytes")).values()
  assert bytes(tokens.astype(np.uint8)) == texts["doc0.txt"].encode() and bytes_per_token == 1.0
