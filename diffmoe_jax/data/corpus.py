"""The token cache, and the Corpus that memory-maps it.

Each domain is tokenized once into `<cache root>/<key>/`: `train.bin` and `val.bin` (raw token ids, uint16
when the vocabulary fits, else uint32) and `meta.json` (files, token and byte counts per split). The key
hashes everything the tokens depend on: format version (which also names the split rule), tokenizer spec and
model file hash, source spec, every file's path, size and mtime, val_fraction, and for a `files:` source the
root its paths are hashed relative to, where that is not the files' common directory. The split is decided
over all domains' files together (split.py), so unless the domains all have the same files, root and views
(one domain, or the built-in corpus's two), the key also holds each other domain's own key. A directory is
written under a temporary name and renamed into place, so an interrupted build never leaves a half cache
(an entry whose files do not match its meta.json, such as an interrupted copy, or whose token width is not
the tokenizer's, is rebuilt). A build holds a lock on its temporary directory; one whose lock is free was left
by a killed build, and the next build removes it.

Each document's tokens are followed by the tokenizer's eos id when it has one; token counts include these
separators and byte counts (UTF-8 bytes of the text) do not, so bits per byte = bits per token / bytes per
token counts the cost of predicting document ends.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import numbers
import os
import re
import secrets
import shutil
import time

import numpy as np
import tqdm
from absl import logging

from diffmoe_jax.data.errors import DataError
from diffmoe_jax.data import split as split_lib
from diffmoe_jax.data.sources import Skipped, Source, parse_source, whole_text
from diffmoe_jax.data.tokenizer import check_no_separator, make_tokenizer

FORMAT_VERSION = 2  # 2: near-duplicate files share a split (split.py); 1 split by path hash alone
SPLITS = ("train", "val")
_COUNT_CHUNK = 1 << 24  # tokens per np.bincount call, to bound the int64 copy it makes
_BUILD_DIR = re.compile(r"\.[0-9a-f]{24}\.[a-z0-9_]{8}")  # _locked_temporary_dir's (tempfile.mkdtemp's, before)


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  """One split of one domain: its files (relative to the source root), tokens and UTF-8 bytes of text."""
  files: tuple[str, ...]
  num_tokens: int
  num_bytes: int


class Corpus:
  """Tokenized domains, memory-mapped from the cache. `domains` is sorted by name (a ConfigDict's order).

  `segment_masking` (config.data.segment_masking): whether its batches carry `segment_ids`.
  """

  def __init__(self, tokenizer, cache_dirs: dict[str, str], segment_masking: bool = True):
    self.tokenizer = tokenizer
    self.segment_masking = segment_masking
    self.domains = tuple(sorted(cache_dirs))
    self.cache_dirs = dict(cache_dirs)
    self.skipped = {}  # domain -> {reason: number of files}
    self._info, self._tokens, self._unigram = {}, {}, {}
    for domain, path in self.cache_dirs.items():
      with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
      self.skipped[domain] = meta["skipped"]
      for split in SPLITS:
        s = meta["splits"][split]
        self._info[domain, split] = SplitInfo(tuple(s["files"]), s["tokens"], s["bytes"])
        self._tokens[domain, split] = np.memmap(os.path.join(path, f"{split}.bin"), dtype=meta["dtype"],
                                                mode="r")

  @property
  def fingerprint(self) -> dict[str, str]:
    """{domain: cache key}: the key covers the tokenizer, the source, its files' paths, sizes and modification
    times, the validation fraction and the other domains' files the split depended on, so equal fingerprints
    mean the same tokens."""
    return {domain: os.path.basename(path) for domain, path in sorted(self.cache_dirs.items())}

  @property
  def content(self) -> dict[str, str]:
    """{domain: digest of its splits' files (relative to the source's root), token and byte counts}: what a
    resumed run checks it still trains on; equal on every host reading the same data (`fingerprint` also
    covers modification times, which differ between hosts' copies)."""
    return {domain: hashlib.sha256(json.dumps([dataclasses.astuple(self.info(domain, split))
                                               for split in ("train", "val")]).encode()).hexdigest()[:16]
            for domain in self.domains}

  def info(self, domain: str, split: str) -> SplitInfo:
    self._check(domain, split)
    return self._info[domain, split]

  def tokens(self, domain: str, split: str) -> np.memmap:
    """The token stream of one split of one domain: its documents, each followed by the separator."""
    self._check(domain, split)
    return self._tokens[domain, split]

  def bytes_per_token(self, domain: str, split: str) -> float:
    info = self.info(domain, split)
    return info.num_bytes / info.num_tokens

  def unigram_bits_per_byte(self, domain: str) -> float:
    """Bits per byte of the validation tokens under the add-one-smoothed unigram model of the train tokens."""
    if domain not in self._unigram:  # computed once: the trainer asks at every evaluation
      vocab = self.tokenizer.vocab_size
      train = _counts(self.tokens(domain, "train"), vocab)
      val = _counts(self.tokens(domain, "val"), vocab)
      log2_p = np.log2(train + 1.0) - np.log2(train.sum() + vocab)
      self._unigram[domain] = float(-(val * log2_p).sum() / self.info(domain, "val").num_bytes)
    return self._unigram[domain]

  def _check(self, domain: str, split: str) -> None:
    if domain not in self.cache_dirs:
      raise DataError(f"unknown domain {domain!r}; config.data.domains has {list(self.domains)}.")
    if split not in SPLITS:
      raise DataError(f"unknown split {split!r}; use one of {SPLITS}.")


def check_sources(data_config) -> None:
  """The DataError of the first mistake in the data section, reading no text, so that `main` says it before
  the run's summary: in the domains' sources (a missing file, a glob that matches nothing) or val_fraction,
  the tokenizer spec, or the token cache's directory (made here if missing)."""
  _parse_sources(data_config)
  make_tokenizer(data_config.tokenizer)
  _cache_root(data_config)


def _parse_sources(data_config) -> dict:
  """The domains' parsed sources {name: source}, or the DataError of the first mistake in them or in
  val_fraction."""
  domains = dict(data_config.domains)
  if not domains:
    raise DataError("config.data.domains is empty; add a source such as 'stdlib:code'.")
  val_fraction = data_config.val_fraction
  if not (isinstance(val_fraction, numbers.Real) and 0.0 < val_fraction < 1.0):
    raise DataError(f"config.data.val_fraction = {val_fraction!r} must lie in (0, 1), such as 0.05: every domain "
                    "is evaluated on its validation split.")
  return {name: parse_source(name, domains[name]) for name in sorted(domains)}


def build_corpus(data_config, cache_root: str | None = None) -> Corpus:
  """Tokenizes each domain of `data_config` (a config's `data` section) once into the cache; memory-maps it.

  The cache root is `cache_root`, else `data_config.cache_dir`, else $DIFFMOE_CACHE, else
  ~/.cache/diffmoe_jax.
  """
  sources, domains = _parse_sources(data_config), dict(data_config.domains)
  val_fraction = data_config.val_fraction
  tokenizer = make_tokenizer(data_config.tokenizer)
  root = _cache_root(data_config, cache_root)
  real_root = os.path.join(os.path.realpath(root), "")  # either may be reached through a symlink
  for source in sources.values():
    # The cache's own files would be read as text, and change the key (and so add an entry) on every build.
    inside = next((f for f in source.files if os.path.realpath(f).startswith(real_root)), None)
    if inside:
      raise DataError(f"{source.field} = {source.spec!r} matches {inside}, in the token cache {root}; narrow the "
                      "glob, or set config.data.cache_dir (or $DIFFMOE_CACHE) to a directory outside it.")
  dirs = {name: os.path.join(root, key) for name, key in _cache_keys(sources, tokenizer, val_fraction).items()}
  notes, plans = {}, None
  # Derived views of a file, shared by the domains of this build: both stdlib domains compute both views of
  # every file, and parsing out the docstrings is most of a build's time.
  derived_views = {}
  dtype = token_dtype(tokenizer.vocab_size)
  for name, source in sources.items():
    if _complete(dirs[name], dtype):
      notes[name] = "reused"
      continue
    if plans is None:  # one split of all domains' files together, made once for the domains to build
      start = time.perf_counter()
      plans = _split_domains(sources, tokenizer, val_fraction, derived_views)
      logging.info("data: split the files of domains %s together in %.1f s.", ", ".join(sources),
                   time.perf_counter() - start)
    start = time.perf_counter()
    if _cached_domain(source, dirs[name], root, dtype,
                      functools.partial(_write_domain, source, plans[name], tokenizer, derived_views)):
      notes[name] = f"tokenized and written in {time.perf_counter() - start:.1f} s, after the joint split"
    else:
      notes[name] = "reused: another process built it during the split"
  corpus = Corpus(tokenizer, dirs, segment_masking=data_config.segment_masking)
  for name in corpus.domains:
    train, val = corpus.info(name, "train"), corpus.info(name, "val")
    skipped = "; ".join(f"{n} files {why}" for why, n in corpus.skipped[name].items()) or "none"
    logging.info("data: %s = %r (%s): %d files, %d tokens, %d bytes; train %d files / %d tokens, "
                 "val %d files / %d tokens; skipped: %s; cache %s (%s)", name, domains[name], tokenizer.name,
                 len(train.files) + len(val.files), train.num_tokens + val.num_tokens,
                 train.num_bytes + val.num_bytes, len(train.files), train.num_tokens, len(val.files),
                 val.num_tokens, skipped, dirs[name], notes[name])
  return corpus


def token_dtype(vocab_size: int) -> type:
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _cache_keys(sources: dict[str, Source], tokenizer, val_fraction: float) -> dict[str, str]:
  """Each domain's cache key: a hash of what its tokens and its split depend on (the module docstring)."""
  key_data, split_inputs = {}, {}
  for name, source in sources.items():
    files = []
    for path in source.files:
      stat = os.stat(path)
      files.append((path, stat.st_size, stat.st_mtime_ns))
    key_data[name] = {"format": FORMAT_VERSION, "tokenizer": tokenizer.fingerprint, "source": source.spec,
                      "files": files, "val_fraction": val_fraction}
    if not source.builtin and source.root != os.path.commonpath([os.path.dirname(f) for f in source.files]):
      # The split hashes paths relative to the root, which for `files:` used to be the matched files' common
      # directory: a cache of that rule is reused (and a finished run's record of its key holds) exactly where
      # the two agree.
      key_data[name]["root"] = source.root
    split_inputs[name] = (source.root, files, source.views)
  own = {name: _hash(data) for name, data in key_data.items()}
  if all(inputs == split_inputs[name] for inputs in split_inputs.values()):
    return own  # one domain, or domains of the same files (the built-in corpus): each splits as if alone
  # The split of each domain depends on every other domain's files (_split_domains).
  return {name: _hash({**data, "split_with": {other: own[other] for other in own if other != name}})
          for name, data in key_data.items()}


def _hash(key_data: dict) -> str:
  return hashlib.sha256(json.dumps(key_data).encode("utf-8")).hexdigest()[:24]


def _cached_domain(source: Source, final: str, root: str, dtype: type, write) -> bool:
  """Builds the cache directory `final` of one domain: `write(directory)` fills a temporary one, which is
  then renamed into place. False if it needs no build: another process finished it since it was looked up."""
  if _complete(final, dtype):  # a run started at the same time, whose split ended first (that run may be reading it)
    return False
  if os.path.exists(final):  # a build renames only a complete directory into place: damaged since, or stale
    logging.warning("data: the token cache %s of %s is incomplete (files missing or cut short) or of another "
                    "token width than the tokenizer's; rebuilding it.", final, source.field)
    shutil.rmtree(final, ignore_errors=True)
  try:
    _remove_killed_builds(root)
    tmp, lock = _locked_temporary_dir(root, os.path.basename(final))
  except OSError as e:  # a read-only or unlistable cache serves the domains built into it, and takes no new ones
    raise _cache_error(root, e) from None
  try:
    write(tmp)
    try:
      os.rename(tmp, final)
    except OSError:
      if not _complete(final, dtype):
        raise
      # Another process built the same cache meanwhile; its copy is complete, so keep that one.
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, OSError):  # writing the cache (a source file that cannot be read is a DataError)
      raise _cache_error(root, e) from None
    raise
  finally:
    os.close(lock)  # after the rename: an unlocked temporary directory is a killed build's
  return True


def _complete(cache_dir: str, dtype: type) -> bool:
  """Whether a cache directory holds its meta.json and split files of the sizes that records, of tokens of
  `dtype` (a Hugging Face vocabulary with gaps in its ids was once given too narrow a one, under the same key)."""
  try:
    with open(os.path.join(cache_dir, "meta.json"), encoding="utf-8") as f:
      meta = json.load(f)
    if meta["dtype"] != np.dtype(dtype).name:
      return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all(os.path.getsize(os.path.join(cache_dir, f"{split}.bin")) == meta["splits"][split]["tokens"] * itemsize
               for split in SPLITS)
  except (OSError, ValueError, KeyError, TypeError):
    return False


def _locked_temporary_dir(root: str, key: str) -> tuple[str, int]:
  """A new temporary directory for building `key`, and a descriptor holding its lock until closed.

  It is made with the permissions the umask gives, as the entry it becomes: tempfile.mkdtemp's 0700 kept
  every entry of a cache shared by several users from all but the one who built it.
  """
  while True:
    tmp = os.path.join(root, f".{key}.{secrets.token_hex(4)}")
    try:
      os.mkdir(tmp)
    except FileExistsError:
      continue
    lock = os.open(tmp, os.O_RDONLY)
    try:
      fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:  # a filesystem without locks: no build's directory is removed there either
      return tmp, lock
    if os.path.isdir(tmp):  # else another build found it unlocked, before this lock, and removed it
      return tmp, lock
    os.close(lock)


def _remove_killed_builds(root: str) -> None:
  """Removes the temporary directories whose lock no build holds: a killed build's, as large as its corpus."""
  for name in os.listdir(root):
    if not _BUILD_DIR.fullmatch(name):
      continue
    path = os.path.join(root, name)
    try:
      lock = os.open(path, os.O_RDONLY)
    except OSError:
      continue
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      shutil.rmtree(path, ignore_errors=True)
    except OSError:  # a build in progress holds it (or this filesystem has no locks)
      pass
    finally:
      os.close(lock)


def _cache_root(data_config, cache_root: str | None = None) -> str:
  """The token cache's directory (see `build_corpus`), made if missing."""
  root = os.path.expanduser(cache_root or data_config.cache_dir or os.environ.get("DIFFMOE_CACHE")
                            or "~/.cache/diffmoe_jax")
  try:
    os.makedirs(root, exist_ok=True)
  except OSError as e:
    raise _cache_error(root, e) from None
  return root


def _cache_error(root: str, e: OSError) -> DataError:
  why = "it is a file, not a directory" if os.path.isfile(root) else e.strerror or e
  free = "free space there, or " if e.errno == errno.ENOSPC else ""
  return DataError(f"the token cache {root} cannot be written ({why}); {free}set config.data.cache_dir (or "
                   "$DIFFMOE_CACHE) to a directory you can write.")


@dataclasses.dataclass(frozen=True)
class _DomainSplit:
  """One domain's documents, each (path, path relative to the source root, whether in validation), and the
  number of files skipped for each reason."""
  docs: list[tuple[str, str, bool]]
  skipped: dict[str, int]


def _split_domains(sources: dict[str, Source], tokenizer, val_fraction: float,
                   derived_views: dict) -> dict[str, _DomainSplit]:
  """Each domain's documents and their sides, decided over the files of all domains together.

  A file is one node however many domains list it (by its real path), named by its path in the first domain
  (by name) that lists it; near-copies are grouped across domains (split.py), and a group lies on one side
  in every domain: training mixes the domains, so no validation file of any domain may be a near-copy of a
  training file of another. With one domain this is that domain's own split.
  """
  node_of, names = {}, []  # real path -> node; node -> its name
  shingle_sets = {}  # view -> {node: its shingles}; every readable file's, documents or not
  docs, skipped = {}, {}  # domain -> [(path, node)], domain -> Counter of reasons
  for name, source in sources.items():
    docs[name], skipped[name] = [], collections.Counter()
    for path in tqdm.tqdm(source.files, desc=f"splitting {source.spec}", unit="file", disable=None):
      try:
        file_text = source.read(path)
      except Skipped as e:
        skipped[name][str(e)] += 1
        continue
      node = node_of.setdefault(os.path.realpath(path), len(names))
      if node == len(names):
        names.append(source.relpath(path))
      views = [_view(view, file_text, path, derived_views) for view in source.views]
      for view, text in zip(source.views, views):
        of_view = shingle_sets.setdefault(view, {})
        if node not in of_view:
          of_view[node] = split_lib.shingles(text if isinstance(text, str) else "")
      why = _not_a_document(source, tokenizer, path, views[source.document_view])
      if why:
        skipped[name][why] += 1
      else:
        docs[name].append((path, node))
  for name, source in sources.items():
    _check_documents(source, [source.relpath(path) for path, _ in docs[name]])
  none = np.zeros(0, np.uint64)
  group_of = split_lib.near_duplicate_groups([[of_view.get(node, none) for node in range(len(names))]
                                              for of_view in shingle_sets.values()])
  del shingle_sets
  keys = {}  # domain -> each document's group, named by its first file
  for name, source in sources.items():
    keys[name] = [names[group_of[node]] for _, node in docs[name]]
    if len(set(keys[name])) == 1:
      raise DataError(f"{source.field} = {source.spec!r}: its {len(docs[name])} files with text are near-copies "
                      f"of one another (each shares at least {split_lib.NEAR_DUPLICATE:.0%} of its "
                      f"{split_lib.SHINGLE_WORDS}-word runs with another), so no validation file can be held out "
                      "whose text is not also in training; add files with different text.")
  val_keys = split_lib.assign_val(keys, val_fraction)
  splits = {}
  for name, source in sources.items():
    in_val = [key in val_keys for key in keys[name]]
    if all(in_val) or not any(in_val):
      raise DataError(f"{source.field} = {source.spec!r}: all its {len(in_val)} files with text lie in "
                      f"{'validation' if all(in_val) else 'training'}: near-copies of other domains' files take "
                      "their side (no validation file may be a copy of a training file) and left none for the "
                      "other; add files with different text to this domain.")
    splits[name] = _DomainSplit([(path, source.relpath(path), v) for (path, _), v in zip(docs[name], in_val)],
                                dict(skipped[name]))
  return splits


def _not_a_document(source: Source, tokenizer, path: str, text: str | Skipped) -> str | None:
  """Why a file's document view is no document (a skip reason, counted), or None."""
  if isinstance(text, Skipped):
    return str(text)
  if not text:
    return "have no text"
  if source.builtin and tokenizer.reserved_text is not None and tokenizer.reserved_text in text:
    return f"contain the separator {tokenizer.reserved_text!r}"
  check_no_separator(tokenizer, text, path, source.field)
  return None


def _check_documents(source: Source, relpaths: list[str]) -> None:
  """A domain needs two files with text: the split is by file."""
  if not relpaths:
    raise DataError(f"{source.field} = {source.spec!r}: none of its {len(source.files)} files has any text; "
                    "point it at files with text.")
  if len(relpaths) == 1:
    raise DataError(f"{source.field} = {source.spec!r}: only one file has text "
                    f"({os.path.join(source.root, relpaths[0])}); the train/validation split is by file, so a "
                    "domain needs at least two: add files, or split this one into several.")


def _write_domain(source: Source, split: _DomainSplit, tokenizer, derived_views: dict, out_dir: str) -> None:
  """Tokenizes a domain's documents into `out_dir`: {train,val}.bin and meta.json."""
  dtype = token_dtype(tokenizer.vocab_size)
  for why, n in split.skipped.items():
    logging.info("data: %s = %r: skipped %d files that %s.", source.field, source.spec, n, why)
  chosen = {s: [] for s in SPLITS}  # split -> [(relative path, number of tokens, number of bytes)]
  paths = {s: os.path.join(out_dir, f"{s}.bin") for s in SPLITS}
  with open(paths["train"], "wb") as train, open(paths["val"], "wb") as val:
    for path, relpath, in_val in tqdm.tqdm(split.docs, desc=f"tokenizing {source.spec}", unit="file",
                                           disable=None):
      view = source.views[source.document_view]
      text = _view(view, source.read(path), path, derived_views)
      out = val if in_val else train
      ids = np.asarray(tokenizer.encode(text)).astype(dtype, copy=False)
      out.write(ids)  # its buffer: a large file's tokens are not copied again
      num_tokens = len(ids)
      if tokenizer.eos_id is not None:
        out.write(np.array([tokenizer.eos_id], dtype))
        num_tokens += 1
      chosen["val" if in_val else "train"].append((relpath, num_tokens, len(text.encode("utf-8"))))
  meta = {"format": FORMAT_VERSION, "source": source.spec, "tokenizer": tokenizer.name,
          "dtype": np.dtype(dtype).name, "skipped": split.skipped, "splits": {}}
  for name, docs in chosen.items():
    if sum(d[1] for d in docs) == 0:
      raise DataError(f"{source.field} = {source.spec!r}: the {name} split's files "
                      f"({', '.join(d[0] for d in docs)}) encode to no tokens with {tokenizer.name!r}; add text.")
    meta["splits"][name] = {"files": [d[0] for d in docs], "tokens": sum(d[1] for d in docs),
                            "bytes": sum(d[2] for d in docs)}
  with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)


def _view(view, text: str, path: str, derived_views: dict) -> str | Skipped:
  """A view of a file's text; a derived one is computed once per build (a whole text is not kept: a user's
  corpus can be large)."""
  if view is whole_text:
    return text
  if (view, path) not in derived_views:
    try:
      derived_views[view, path] = view(text, path)
    except Skipped as e:
      derived_views[view, path] = e
  return derived_views[view, path]


def _counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  counts = np.zeros(vocab_size, np.int64)
  for i in range(0, len(tokens), _COUNT_CHUNK):
    counts += np.bincount(tokens[i:i + _COUNT_CHUNK], minlength=vocab_size)
  return counts
