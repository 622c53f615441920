"""Subword tokenizers (SentencePiece, Hugging Face) through the data pipeline: the token stream, byte accounting,
unigram baseline and batches of a `files:` corpus, against each library's own encode."""
import collections
import io
import math
import os

import numpy as np
import pytest

from diffmoe_jax import data
from diffmoe_jax.data import tokenizer as tokenizer_lib
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


def test_a_sentencepiece_eos_at_id_0_separates_documents(tmp_path):
  """Id 0 is a model's eos like any other (read as no eos, the documents ran together)."""
  spm = pytest.importorskip("sentencepiece")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(english(0).splitlines()), model_writer=model, vocab_size=100, model_type="bpe",
      eos_id=0, unk_id=1, bos_id=-1, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  path = tmp_path / "eos0.model"
  path.write_bytes(model.getvalue())
  tok = tokenizer_lib.SentencePieceTokenizer(spm, f"sentencepiece:{path}", str(path))
  assert tok.eos_id == 0


def test_of_several_eos_tokens_the_first_listed_separates_documents(tmp_path):
  """A vocabulary holding "</s>" (id 0) and "<|endoftext|>" (id 1): the separator's id and the text refused in
  documents are both the first of HF_EOS_TOKENS's, "<|endoftext|>" (the last's id passed every test: documents
  were split by one token and checked for another)."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<|endoftext|>"],
                                           show_progress=False)
  tok.train_from_iterator([english(0)], trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  hf = tokenizer_lib.HFTokenizer(tokenizers, f"hf:{path}", str(path))
  assert tokenizer_lib.HF_EOS_TOKENS[:2] == ("<|endoftext|>", "</s>")
  assert (hf.reserved_text, hf.eos_id) == ("<|endoftext|>", tok.token_to_id("<|endoftext|>")) == ("<|endoftext|>", 1)
