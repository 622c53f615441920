"""The token cache and `files:` sources: what survives a killed build, a full disk, a damaged cache entry,
files added to a domain, and symlinks; tokenizers that cannot separate documents or leave gaps in their ids."""
import errno
import fcntl
import hashlib
import json
import os

import numpy as np
import pytest

from diffmoe_jax import data
from diffmoe_jax.data import corpus as corpus_lib
from diffmoe_jax.data import sources
from diffmoe_jax.train import loop, workdir
import test_data
from test_data import data_config, documents, english, shingles, unit_hash
from test_tokenizers import check_subword_corpus

text_dir = test_data.text_dir  # the fixture: 8 files of English-like text


def sides(corpus, domain):
  return {f: split for split in ("train", "val") for f in corpus.info(domain, split).files}


def test_adding_a_file_moves_no_other_file_between_splits(tmp_path):
  """Files are named (and hashed into a split) relative to the glob's fixed directory, not to the directory
  the matched files happen to share, which a file added higher up would change."""
  top = tmp_path / "web"
  (top / "2024").mkdir(parents=True)
  for i in range(16):
    (top / "2024" / f"page{i}.txt").write_text(english(i), encoding="utf-8")
  config = data_config({"web": f"files:{top}/**/*.txt"}, val_fraction=0.3)
  before = sides(data.build_corpus(config, cache_root=str(tmp_path / "cache")), "web")
  assert set(before) == {f"2024/page{i}.txt" for i in range(16)}
  assert [unit_hash(f) < 0.3 for f in before] == [before[f] == "val" for f in before]
  (top / "index.txt").write_text(english(100), encoding="utf-8")
  after = sides(data.build_corpus(config, cache_root=str(tmp_path / "cache")), "web")
  assert set(after) == set(before) | {"index.txt"}
  assert {f: after[f] for f in before} == before


def test_a_cache_key_holds_where_the_files_common_directory_is_the_root(text_dir, tmp_path):
  """Where files were already named relative to the glob's directory, the key (which finished ablation and
  search runs record) is what it was: the format, tokenizer, spec, files and val_fraction; elsewhere it also
  holds the root."""
  def key_of(spec, files, **extra):
    key_data = {"format": 2, "tokenizer": "bytes", "source": spec,
                "files": [[str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in sorted(files)],
                "val_fraction": 0.3, **extra}
    return hashlib.sha256(json.dumps(key_data).encode("utf-8")).hexdigest()[:24]

  spec = f"files:{text_dir}/*.txt"
  corpus = data.build_corpus(data_config({"text": spec}, val_fraction=0.3), cache_root=str(tmp_path / "cache"))
  assert corpus.fingerprint == {"text": key_of(spec, text_dir.glob("*.txt"))}
  (text_dir / "sub").mkdir()
  for f in text_dir.glob("*.txt"):
    f.rename(text_dir / "sub" / f.name)
  spec = f"files:{text_dir}/**/*.txt"
  corpus = data.build_corpus(data_config({"text": spec}, val_fraction=0.3), cache_root=str(tmp_path / "cache"))
  assert corpus.fingerprint == {"text": key_of(spec, text_dir.glob("sub/*.txt"), root=str(text_dir))}


def test_a_file_reached_through_symlinks_is_one_document(text_dir, tmp_path):
  """A link to a file is that file, named by its own path whatever the link's name (which decides its split); under
  `**`, a link back up the tree is followed once, not until the path is too long (each file 41 times; two such
  links made the glob run without end), and hidden directories are skipped, as glob's `**` skips them."""
  os.symlink("doc0.txt", text_dir / "latest.txt")
  os.symlink("doc1.txt", text_dir / "a.txt")  # sorts before its file
  os.symlink(".", text_dir / "again")
  (text_dir / ".hidden").mkdir()
  (text_dir / ".hidden" / "doc9.txt").write_text(english(9), encoding="utf-8")
  corpus = data.build_corpus(data_config({"text": f"files:{text_dir}/**/*.txt"}, val_fraction=0.3),
                             cache_root=str(tmp_path / "cache"))
  assert sorted(sides(corpus, "text")) == [f"doc{i}.txt" for i in range(8)]
  stream = bytes(np.concatenate([corpus.tokens("text", s) for s in ("train", "val")]).astype(np.uint8))
  assert all(stream.count(english(i).encode()) == 1 for i in range(8))


@pytest.mark.parametrize("target", ["/nonexistent/volume/doc8.txt", "doc8.txt"])  # a moved file; a link loop
def test_a_glob_matching_a_link_to_nothing_is_a_data_error(text_dir, target):
  """glob lists a link whose target is gone, and the domain was built without its text, unseen."""
  os.symlink(target, text_dir / "doc8.txt")
  with pytest.raises(data.DataError, match=rf"^config\.data\.domains\.text = .*: .*/text/doc8\.txt is a symbolic "
                                           rf"link to '{target}', which does not exist \(or is a loop of links\); "
                                           r"fix the link or narrow the glob\.$"):
    sources.parse_source("text", f"files:{text_dir}/*.txt")


def test_a_comma_in_a_path_is_written_as_a_character_class(tmp_path):
  """A comma separates a spec's globs, so a path holding one could not be named at all: '[,]' was cut too."""
  (tmp_path / "Smith, John").mkdir()
  for i in range(3):
    (tmp_path / "Smith, John" / f"{i}.txt").write_text(english(i), encoding="utf-8")
  with pytest.raises(data.DataError, match=r"^config\.data\.domains\.text = .*: '.*/Smith' does not exist or is not "
                                           r"a file \(a ',' separates globs: write one in a name as '\[,\]'\)"):
    sources.parse_source("text", f"files:{tmp_path}/Smith, John/*.txt")
  source = sources.parse_source("text", f"files:{tmp_path}/Smith[,] John/*.txt,{tmp_path}/Smith[,] John/0.txt")
  assert [source.relpath(f) for f in source.files] == [f"Smith, John/{i}.txt" for i in range(3)]


def test_a_killed_builds_temporary_directory_is_removed_by_the_next_build(text_dir, tmp_path):
  root = tmp_path / "cache"
  killed, running = root / ".0123456789abcdef01234567.k1ll3d_x", root / ".fedcba9876543210fedcba98.runn1ng_"
  for d in (killed, running):
    d.mkdir(parents=True)
    (d / "all.bin").write_bytes(b"\1" * 1000)
  (root / ".notes").write_text("not the cache's")
  lock = os.open(running, os.O_RDONLY)  # a build in progress holds its directory's lock
  fcntl.flock(lock, fcntl.LOCK_EX)
  try:
    data.build_corpus(data_config({"text": f"files:{text_dir}/*.txt"}), cache_root=str(root))
  finally:
    os.close(lock)
  assert not killed.exists() and (running / "all.bin").exists() and (root / ".notes").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_cache_entry_has_the_permissions_the_umask_gives(text_dir, tmp_path, umask):
  """Entries were made 0700 (tempfile.mkdtemp), so the other users of a shared cache could not read them: they
  were told the entry was incomplete, and then that the cache could not be written."""
  before = os.umask(umask)
  try:
    corpus = data.build_corpus(data_config({"text": f"files:{text_dir}/*.txt"}), cache_root=str(tmp_path / "cache"))
  finally:
    os.umask(before)
  entry = corpus.cache_dirs["text"]
  assert [oct(os.stat(p).st_mode & 0o777) for p in [entry] + [os.path.join(entry, f) for f in os.listdir(entry)]] == [
      oct(0o777 & ~umask)] + [oct(0o666 & ~umask)] * 3


def test_a_cache_entry_cut_short_or_missing_a_file_is_rebuilt(text_dir, tmp_path):
  """An interrupted copy of a cache directory (meta.json is copied before the token files) trained on a cut
  stream, or stopped with a traceback."""
  config = data_config({"text": f"files:{text_dir}/*.txt"}, val_fraction=0.3)
  corpus = data.build_corpus(config, cache_root=str(tmp_path / "cache"))
  path, expected = corpus.cache_dirs["text"], {s: np.array(corpus.tokens("text", s)) for s in ("train", "val")}
  del corpus
  for damage in (lambda: os.truncate(os.path.join(path, "train.bin"), 10),
                 lambda: os.remove(os.path.join(path, "val.bin"))):
    damage()
    corpus = data.build_corpus(config, cache_root=str(tmp_path / "cache"))
    assert corpus.cache_dirs["text"] == path
    for split, tokens in expected.items():
      np.testing.assert_array_equal(corpus.tokens("text", split), tokens)
    del corpus


def test_a_cache_entry_another_run_finishes_during_the_split_is_reused(text_dir, tmp_path, monkeypatch):
  """Two runs building the same cache at once: the one whose split ended second called the other's complete
  entry incomplete, deleted it (under the run reading it) and tokenized the domain again."""
  config = data_config({"text": f"files:{text_dir}/*.txt"}, val_fraction=0.3)
  root = str(tmp_path / "cache")
  real_split, real_write, writes = corpus_lib._split_domains, corpus_lib._write_domain, []

  def split_while_another_run_builds(*args):
    plans = real_split(*args)
    monkeypatch.setattr(corpus_lib, "_split_domains", real_split)
    split_while_another_run_builds.other = data.build_corpus(config, cache_root=root)
    return plans

  monkeypatch.setattr(corpus_lib, "_split_domains", split_while_another_run_builds)
  monkeypatch.setattr(corpus_lib, "_write_domain", lambda *args: writes.append(real_write(*args)))
  corpus = data.build_corpus(config, cache_root=root)
  other = split_while_another_run_builds.other
  assert len(writes) == 1 and os.listdir(root) == [os.path.basename(other.cache_dirs["text"])]
  assert corpus.cache_dirs == other.cache_dirs
  for split in ("train", "val"):
    np.testing.assert_array_equal(corpus.tokens("text", split), other.tokens("text", split))


def test_a_full_disk_or_an_unreadable_file_is_a_data_error(text_dir, tmp_path, monkeypatch):
  root = tmp_path / "cache"
  config = data_config({"text": f"files:{text_dir}/*.txt"})
  real_write = corpus_lib._write_domain

  def disk_fills(*args):
    real_write(*args)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(corpus_lib, "_write_domain", disk_fills)
  with pytest.raises(data.DataError, match=rf"^the token cache {root} cannot be written \(No space left on device\); "
                                           r"free space there, or set config\.data\.cache_dir"):
    data.build_corpus(config, cache_root=str(root))
  assert os.listdir(root) == []
  monkeypatch.undo()

  def cannot_list(path):  # another user's cache directory, which this one may not read
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

  monkeypatch.setattr(corpus_lib.os, "listdir", cannot_list)
  with pytest.raises(data.DataError, match=rf"^the token cache {root} cannot be written \(Permission denied\)"):
    data.build_corpus(config, cache_root=str(root))
  monkeypatch.undo()

  def no_permission(path, mode="r"):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

  monkeypatch.setattr(sources, "open", no_permission, raising=False)
  with pytest.raises(data.DataError, match=r"^config\.data\.domains\.text: .*/doc0\.txt cannot be read \(Permission "
                                           r"denied\); fix its permissions or leave it out of the source\.$"):
    data.build_corpus(config, cache_root=str(root))


def test_no_validation_file_of_any_domain_is_a_copy_of_a_training_file_of_another(tmp_path):
  """Training mixes the domains, so a file (or a near-copy of it) in validation in one domain and in training
  in another would be measured on text the model trained on: domains are split together."""
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  for i in range(12):
    (a / f"doc{i}.txt").write_text(english(i), encoding="utf-8")
    (b / f"copy{i}.txt").write_text(english(i) + ("One more line.\n" if i % 2 else ""), encoding="utf-8")
  domains = {"a": f"files:{a}/*.txt", "b": f"files:{b}/*.txt", "both": f"files:{tmp_path}/**/doc1*.txt"}
  corpus = data.build_corpus(data_config(domains, val_fraction=0.3), cache_root=str(tmp_path / "cache"))
  val = [shingles(text) for domain in corpus.domains for text in documents(corpus, domain, "val").values()]
  train = [shingles(text) for domain in corpus.domains for text in documents(corpus, domain, "train").values()]
  assert val and train
  assert max(len(v & t) / len(v) for v in val for t in train) < 0.5
  # Each domain's key covers the other domains' files, which its split depended on.
  (b / "copy5.txt").write_text(english(50), encoding="utf-8")
  again = data.build_corpus(data_config(domains, val_fraction=0.3), cache_root=str(tmp_path / "cache"))
  assert all(again.fingerprint[d] != corpus.fingerprint[d] for d in domains)


def test_domains_whose_shared_copies_leave_one_a_single_side_are_refused(tmp_path):
  """a = {x, y}, b = {y, z}, c = {z, x}: no sides for x, y, z give every domain both."""
  for domain, names in {"a": "xy", "b": "yz", "c": "zx"}.items():
    (tmp_path / domain).mkdir()
    for name in names:
      (tmp_path / domain / f"{name}.txt").write_text(english(ord(name)), encoding="utf-8")
  domains = {d: f"files:{tmp_path / d}/*.txt" for d in "abc"}
  with pytest.raises(data.DataError, match=r"^config\.data\.domains\.[abc] = .*: all its 2 files with text lie "
                                           r"in (training|validation): near-copies of other domains' files take "
                                           r"their side .*; add files with different text to this domain\.$"):
    data.build_corpus(data_config(domains, val_fraction=0.3), cache_root=str(tmp_path / "cache"))
  assert not os.listdir(tmp_path / "cache")


def test_a_source_of_only_undecodable_files_is_a_data_error(tmp_path, monkeypatch):
  """Built-in corpus files that cannot be decoded are skipped: with none left, no file has text."""
  lib = tmp_path / "lib"
  lib.mkdir()
  for i in range(2):
    (lib / f"mod{i}.py").write_text("# -*- coding: no-such-codec -*-\nx = 1\n")
  monkeypatch.setattr(sources, "_stdlib_files", lambda field: (str(lib), tuple(sorted(map(str, lib.iterdir())))))
  with pytest.raises(data.DataError, match=r"^config\.data\.domains\.code = 'stdlib:code': none of its 2 files "
                                           r"has any text; point it at files with text\.$"):
    data.build_corpus(data_config({"code": "stdlib:code"}), cache_root=str(tmp_path / "cache"))


def test_a_finished_run_on_domains_split_together_names_them_all_when_one_changes(tmp_path):
  """A file changed in one of two domains split together changes both keys: the refusal must not say that
  the other domain's files changed."""
  for d in ("a", "b"):
    (tmp_path / d).mkdir()
    for i in range(3):
      (tmp_path / d / f"{i}.txt").write_text(english(i if d == "a" else 10 + i), encoding="utf-8")
  config = data_config({"a": f"files:{tmp_path}/a/*.txt", "b": f"files:{tmp_path}/b/*.txt"}, val_fraction=0.3)
  saved = data.build_corpus(config, cache_root=str(tmp_path / "cache")).fingerprint
  (tmp_path / "b" / "0.txt").write_text(english(50), encoding="utf-8")
  now = data.build_corpus(config, cache_root=str(tmp_path / "cache")).fingerprint
  with pytest.raises(workdir.WorkdirError, match=r"finished on other training data \(config\.data\.domains a, b: "
                                                 r"their files, or files they are split with, changed since\)"):
    workdir.check_data("run", saved, now, print)


@pytest.mark.parametrize("pattern", ["**/*.txt", "*/*.txt", "private/*.txt", "private/*/**/*.txt"])
def test_a_directory_a_glob_cannot_list_is_a_data_error(text_dir, monkeypatch, pattern):
  """os.walk and glob skip a directory they cannot list, which left its files out of the domain unseen (or
  called the glob one that matches no file)."""
  (text_dir / "private").mkdir()
  (text_dir / "private" / "notes.txt").write_text(english(9), encoding="utf-8")
  real_scandir = os.scandir

  def no_permission(path="."):
    if os.fspath(path).endswith("private"):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", no_permission)  # a user's chmod 000 does not stop root, who runs tests
  with pytest.raises(data.DataError, match=r"^config\.data\.domains\.text = .*: the directory .*/text/private "
                                           r"cannot be listed \(Permission denied\); fix its permissions or "
                                           r"narrow the glob\.$"):
    sources.parse_source("text", f"files:{text_dir}/{pattern}")
  with pytest.raises(data.DataError, match=r"the glob '.*/nowhere/\*\*/\*\.txt' matches no file"):  # no directory
    sources.parse_source("text", f"files:{text_dir}/nowhere/**/*.txt")


def test_a_glob_that_matches_the_token_caches_own_files_is_refused(text_dir):
  """Its meta.json was read as text, and each build added a cache entry for the one before."""
  (text_dir / "a.json").write_text('{"a": "one two three"}')
  (text_dir / "b.json").write_text('{"b": "four five six seven"}')
  config = data_config({"text": f"files:{text_dir}/**/*.json"})
  cache = text_dir / "cache"
  data.build_corpus(config, cache_root=str(cache))  # nothing in the cache yet
  with pytest.raises(data.DataError, match=rf"^config\.data\.domains\.text = .* matches {cache}/\w+/meta\.json, "
                                           rf"in the token cache {cache}; narrow the glob, or set config\.data\."
                                           r"cache_dir \(or \$DIFFMOE_CACHE\) to a directory outside it\.$"):
    data.build_corpus(config, cache_root=str(cache))
  assert len(os.listdir(cache)) == 1
  os.symlink(cache, text_dir.parent / "cache_link")  # the cache named through a link, and globbed by its real path
  with pytest.raises(data.DataError, match=rf"^config\.data\.domains\.text = .* matches {cache}/\w+/meta\.json, "
                                           rf"in the token cache {text_dir.parent}/cache_link; narrow the glob"):
    data.build_corpus(config, cache_root=str(text_dir.parent / "cache_link"))
  assert len(os.listdir(cache)) == 1


def byte_level_bpe(tmp_path, special_token):
  """A small byte-level BPE of the `english` texts with one special token, and its tokenizer.json."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator([english(i) for i in range(8)], tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=[special_token], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  return tok, path


def test_llama3s_end_of_text_separates_documents(text_dir, tmp_path):
  """'<|end_of_text|>' ends a text in Llama 3's vocabulary, which had no separator: its documents ran together.
  Its fingerprint names it, so a cache built before, with no separators, is not reused."""
  tok, path = byte_level_bpe(tmp_path, "<|end_of_text|>")
  corpus = data.build_corpus(data_config({"text": f"files:{text_dir}/*.txt"}, f"hf:{path}", val_fraction=0.3),
                             cache_root=str(tmp_path / "cache"))
  check_subword_corpus(corpus, text_dir, lambda s: tok.encode(s, add_special_tokens=False).ids,
                       tok.token_to_id("<|end_of_text|>"))
  assert corpus.tokenizer.fingerprint == f"hf:{path}:{hashlib.sha256(path.read_bytes()).hexdigest()}:<|end_of_text|>"


def test_training_refuses_a_tokenizer_without_a_separator_while_segment_masking_is_on(text_dir, tmp_path,
                                                                                      make_config):
  """A Hugging Face vocabulary with none of the separators (a BERT-like one, with '[SEP]'): its documents ran
  together and every segment id was 0, with data.segment_masking on. The refusal comes before anything is
  compiled; the corpus (the same either way) still builds, for the run that turns masking off and for
  evaluating a run trained so."""
  tok, path = byte_level_bpe(tmp_path, "[SEP]")
  config = make_config(vocab_size=320)  # room for the tokenizer's 300: the separator is the only thing at fault
  config.data = data_config({"text": f"files:{text_dir}/*.txt"}, f"hf:{path}", val_fraction=0.3)
  corpus = data.build_corpus(config.data, cache_root=str(tmp_path / "cache"))
  assert corpus.segment_masking and corpus.tokenizer.eos_id is None
  with pytest.raises(data.DataError, match=r"^config\.data\.tokenizer = 'hf:.*' has no document separator \(a "
                                           r"Hugging Face vocabulary with none of <\|endoftext\|>, </s>, <eos>, .*, "
                                           r"so documents would run together .*; use a tokenizer with one, or set "
                                           r"config\.data\.segment_masking=False"):
    loop.train(config, str(tmp_path / "run"), corpus=corpus)
  config.data.segment_masking = False  # the documents joined, as asked
  corpus = data.build_corpus(config.data, cache_root=str(tmp_path / "cache"))
  files = corpus.info("text", "train").files
  np.testing.assert_array_equal(corpus.tokens("text", "train"), [
      t for name in files for t in tok.encode((text_dir / name).read_text(encoding="utf-8")).ids])


def test_a_vocabulary_whose_ids_leave_gaps_is_sized_by_its_largest_id(text_dir, tmp_path):
  """vocab_size was the number of tokens (10 here), so id 70000 was stored as a uint16 (4464) and passed the
  check of model.vocab_size against it; the cache entry so made is not reused."""
  tokenizers = pytest.importorskip("tokenizers")
  words = sorted(set(" ".join(english(i) for i in range(8)).split()))
  vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words[:7])}, words[7]: 70000}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["<|endoftext|>"])
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  config = data_config({"text": f"files:{text_dir}/*.txt"}, f"hf:{path}", val_fraction=0.3)
  corpus = data.build_corpus(config, cache_root=str(tmp_path / "cache"))
  assert corpus.tokenizer.vocab_size == 70001
  expected = {}
  for split in ("train", "val"):
    expected[split] = [t for name in corpus.info("text", split).files
                       for t in tok.encode((text_dir / name).read_text(encoding="utf-8")).ids + [1]]
    assert 70000 in expected[split]
    np.testing.assert_array_equal(corpus.tokens("text", split), expected[split])
  # The entry such a vocabulary was given before, under the same key: uint16, its ids cut. It is rebuilt.
  entry = corpus.cache_dirs["text"]
  del corpus
  with open(os.path.join(entry, "meta.json")) as f:
    meta = json.load(f)
  for split in ("train", "val"):
    np.array(expected[split]).astype(np.uint16).tofile(os.path.join(entry, f"{split}.bin"))
  with open(os.path.join(entry, "meta.json"), "w") as f:
    json.dump({**meta, "dtype": "uint16"}, f)
  corpus = data.build_corpus(config, cache_root=str(tmp_path / "cache"))
  assert corpus.cache_dirs["text"] == entry
  for split in ("train", "val"):
    np.testing.assert_array_equal(corpus.tokens("text", split), expected[split])
