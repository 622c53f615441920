"""Subword tokenizers (SentencePiece, Hugging Face) through the data pipeline: the token stream, byte accounting,
unigram baseline and batches of a `files:` corpus, against each library's own encode."""
import collections
import io
import math
import os

import numpy as np
import pytest

from diffmoe_jax import data
import test_data
from test_data import data_config, english, rows, window_index, windows_of

text_dir = test_data.text_dir  # the fixture: 8 files of English-like text


def check_subword_corpus(corpus, text_dir, encode, eos_id):
  """Stream, byte accounting, baseline and batches of a `files:` corpus, against the library's own encode."""
  tok = corpus.tokenizer
  sample = english(99)
  assert tok.decode(tok.encode(sample)) == sample
  assert tok.eos_id == eos_id
  for split in ("train", "val"):
    info = corpus.info("text", split)
    expected = []
    for name in info.files:
      expected += encode((text_dir / name).read_text(encoding="utf-8")) + [eos_id]
    np.testing.assert_array_equal(corpus.tokens("text", split), expected)
    assert info.num_bytes == sum(os.path.getsize(text_dir / name) for name in info.files)
    assert corpus.bytes_per_token("text", split) == info.num_bytes / len(expected) > 1.0
  train = corpus.tokens("text", "train").tolist()
  counts, vocab = collections.Counter(train), tok.vocab_size
  bits = -sum(math.log2((counts[t] + 1) / (len(train) + vocab)) for t in corpus.tokens("text", "val").tolist())
  assert corpus.unigram_bits_per_byte("text") == pytest.approx(bits / corpus.info("text", "val").num_bytes,
                                                               rel=1e-9)
  batch = data.train_dataset(corpus, seed=0, seq_len=16, batch_size=4)[3]
  assert batch["inputs"].shape == (4, 16) and batch["inputs"].max() < vocab
  windows = windows_of(corpus.tokens("text", "train"), 16)
  assert all(len(window_index(windows, row)) for row in rows(batch))


def test_sentencepiece_corpus(text_dir, tmp_path):
  spm = pytest.importorskip("sentencepiece")
  model = io.BytesIO()
  lines = [line for i in range(8) for line in english(i).splitlines()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
      hard_vocab_limit=False, minloglevel=2)
  path = tmp_path / "tiny.model"
  path.write_bytes(model.getvalue())
  corpus = data.build_corpus(data_config({"text": f"files:{text_dir}/*.txt"}, f"sentencepiece:{path}",
                                         val_fraction=0.3), cache_root=str(tmp_path / "cache"))
  reference = spm.SentencePieceProcessor(model_file=str(path))
  check_subword_corpus(corpus, text_dir, reference.encode, reference.eos_id())


def test_hf_tokenizers_corpus(text_dir, tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([english(i) for i in range(8)], trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  config = data_config({"text": f"files:{text_dir}/*.txt"}, f"hf:{path}", val_fraction=0.3)
  corpus = data.build_corpus(config, cache_root=str(tmp_path / "cache"))
  check_subword_corpus(corpus, text_dir, lambda s: tok.encode(s, add_special_tokens=False).ids,
                       tok.token_to_id("<|endoftext|>"))
  # Text that would encode to the separator is refused, with the file and the byte offset.
  (text_dir / "doc3.txt").write_text("café <|endoftext|>", encoding="utf-8")
  with pytest.raises(data.DataError, match=r"doc3\.txt contains '<\|endoftext\|>' at byte offset 6"):
    data.build_corpus(config, cache_root=str(tmp_path / "cache"))
