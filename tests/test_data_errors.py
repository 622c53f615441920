"""Every bad input to the data pipeline is a DataError naming what is wrong and how to fix it."""
import sys

import pytest

from diffmoe_jax import data
from test_data import build_text, english


@pytest.mark.parametrize("files, spec, message", [
    ({"a.txt": b"x"}, "files:{d}/*.md", r"config\.data\.domains\.text .*the glob '.*/\*\.md' matches no file"),
    ({"a[1].txt": b"x"}, "files:{d}/a[1].txt", r"the glob '.*/a\[1\]\.txt' matches no file \(a '\[' starts a "
     r"character class; write a literal one as '\[\[\]'\); fix or remove it\.$"),
    ({"a.txt": b"x"}, "files:{d}/a.txt,{d}/gone.txt", r"'.*/gone\.txt' does not exist"),
    ({"a.txt": b"x"}, "files:{d}", r"'.*/src' is a directory; name its files with a glob, such as "
     r"'files:.*/src/\*\*/\*\.txt'\.$"),
    ({"a.txt": b"", "b.txt": b""}, "files:{d}/*.txt", r"none of its 2 files has any text"),
    ({"a.txt": b"hello", "b.txt": b""}, "files:{d}/*.txt", r"only one file has text \(.*/src/a\.txt\)"),
    ({"a.txt": b"hi", "b.txt": b"caf\xc3\xa9 \xff!"}, "files:{d}/*.txt",
     r"/src/b\.txt is not valid UTF-8 \(byte offset 6"),
    ({"a.txt": b"hi", "b.txt": b"ab\x00c"}, "files:{d}/*.txt", r"/src/b\.txt contains '\\x00' at byte offset 2"),
    ({"a.txt": b"x"}, "files:{d}/*.txt,", r"'files:.*/src/\*\.txt,' has an empty pattern; remove the stray comma"),
    ({"a.txt": b"x"}, "web:https://example.com", r"config\.data\.domains\.text = 'web:.*' is not a source spec"),
    ({"a.txt": english(1).encode(), "b.txt": english(1).encode() + b"One more line.\n"}, "files:{d}/*.txt",
     r"its 2 files with text are near-copies of one another .*add files with different text"),
])
def test_bad_sources(tmp_path, files, spec, message):
  with pytest.raises(data.DataError, match=message):
    build_text(tmp_path, files, spec)


@pytest.mark.parametrize("kwargs, message", [
    ({"tokenizer": "sentencepiece:/nonexistent/tiny.model"},
     r"config\.data\.tokenizer = 'sentencepiece:/nonexistent/tiny\.model': .*/nonexistent/tiny\.model does not"),
    ({"tokenizer": "hf:/nonexistent/tokenizer.json"}, r"tokenizer\.json file /nonexistent/tokenizer\.json does"),
    ({"tokenizer": "hf:/"}, r"^config\.data\.tokenizer = 'hf:/': the Hugging Face tokenizer\.json file / is a "
     r"directory; fix the path, or use 'bytes'\.$"),
    ({"tokenizer": "word"}, r"config\.data\.tokenizer = 'word' is not a tokenizer spec"),
    ({"val_fraction": 1.0}, r"config\.data\.val_fraction = 1\.0 must lie in \(0, 1\)"),
    ({"val_fraction": 0.0}, r"config\.data\.val_fraction = 0\.0 must lie in \(0, 1\), such as 0\.05: every domain "
     r"is evaluated on its validation split\."),  # not silently given a validation file anyway
])
def test_bad_config(tmp_path, kwargs, message):
  with pytest.raises(data.DataError, match=message):
    build_text(tmp_path, {"a.txt": b"one", "b.txt": b"two"}, **kwargs)


def test_bad_tokenizer_file_and_missing_package(tmp_path, monkeypatch):
  model = tmp_path / "broken.model"
  model.write_bytes(b"not a model")
  with pytest.raises(data.DataError, match=r"broken\.model is not a valid SentencePiece"):
    data.make_tokenizer(f"sentencepiece:{model}")
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # makes `import sentencepiece` fail
  with pytest.raises(data.DataError,
                     match=r"needs the `sentencepiece` package.*from a clone of the repository: "
                           r"`pip install -e '\.\[tokenizers\]'`"):
    data.make_tokenizer(f"sentencepiece:{model}")


def test_bad_batch_requests(tmp_path):
  corpus = build_text(tmp_path, {f"{i}.txt": english(i, paragraphs=2).encode() for i in range(4)},
                      val_fraction=0.3)
  train = corpus.info("text", "train").num_tokens
  with pytest.raises(data.DataError, match=rf"domain 'text': its train split has {train} tokens, fewer than "
                                           r"one window of seq_len \+ 1 = 100001; use a shorter seq_len"):
    data.train_dataset(corpus, seed=0, seq_len=100_000, batch_size=1)
  windows = (train - 1) // 32
  with pytest.raises(data.DataError, match=rf"have {windows} windows of seq_len 32 in all, fewer than one"):
    data.train_dataset(corpus, seed=0, seq_len=32, batch_size=windows + 1)
  with pytest.raises(data.DataError, match=r"unknown domains \['prose'\]"):
    data.train_dataset(corpus, seed=0, seq_len=32, batch_size=2, domain_weights={"prose": 1.0})
  with pytest.raises(data.DataError, match=r"are all zero"):
    data.train_dataset(corpus, seed=0, seq_len=32, batch_size=2, domain_weights={"text": 0.0})
  with pytest.raises(data.DataError, match=r"must be finite numbers >= 0"):
    data.train_dataset(corpus, seed=0, seq_len=32, batch_size=2, domain_weights={"text": -1.0})
  with pytest.raises(data.DataError, match=r"batch_size 6 is not divisible by process_count 4"):
    data.train_dataset(corpus, seed=0, seq_len=32, batch_size=6, process_count=4)
  with pytest.raises(data.DataError, match=r"seq_len must be a positive integer, got 0"):
    data.train_dataset(corpus, seed=0, seq_len=0, batch_size=2)
  val = corpus.info("text", "val").num_tokens
  with pytest.raises(data.DataError, match=rf"domain 'text': its validation split has {val} tokens"):
    data.eval_batches(corpus, "text", seq_len=val, batch_size=1, num_batches=1)
  n = (val - 1) // 8  # 10**9 batches ran out of memory building rows that repeat these windows
  with pytest.raises(data.DataError, match=rf"has {n:,} windows of seq_len 8, which {-(-n // 3):,} batches of 3 rows "
                     rf"hold; {n:,} batches would only repeat them\. Ask for at most {-(-n // 3):,} \(train\.eval_"):
    data.eval_batches(corpus, "text", seq_len=8, batch_size=3, num_batches=n)
  assert len(data.eval_batches(corpus, "text", seq_len=8, batch_size=3, num_batches=-(-n // 3))) == -(-n // 3)
  with pytest.raises(data.DataError, match=r"unknown domain 'prose'"):
    data.eval_batches(corpus, "prose", seq_len=8, batch_size=1, num_batches=1)
  with pytest.raises(data.DataError, match=r"unknown split 'test'"):
    corpus.tokens("text", "test")
