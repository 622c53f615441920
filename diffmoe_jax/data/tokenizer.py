"""Tokenizers behind one interface: UTF-8 bytes, SentencePiece models, Hugging Face `tokenizers` files.

A tokenizer has `name` (its spec), `vocab_size`, `encode(text) -> ids`, `decode(ids) -> text`, `eos_id` (the
token that separates documents in the token stream, or None), `reserved_text` (text that encodes to that
separator, which documents must therefore not contain; None if there is none) and `fingerprint` (the spec
plus a hash of the model file, and a separator looked up only since: part of the token cache's key).
"""
from __future__ import annotations

import hashlib
import importlib
import os

import numpy as np

from diffmoe_jax.data.errors import DataError

FIELD = "config.data.tokenizer"
INSTALL_HINT = ("install the optional tokenizer packages from a clone of the repository: "
                "`pip install -e '.[tokenizers]'` (or `pip install sentencepiece tokenizers`)")
# Looked up in this order in a Hugging Face vocabulary; the first present separates documents.
HF_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
# Separators looked up since caches were built without them: a vocabulary separated by one of these names it in
# its fingerprint, so the cache it had before (its documents joined) is not reused.
_LATER_EOS_TOKENS = ("<|end_of_text|>",)  # Llama 3


class ByteTokenizer:
  """UTF-8 bytes, vocabulary 256; byte 0 (NUL, which text files do not contain) separates documents."""
  name = "bytes"
  fingerprint = "bytes"
  vocab_size = 256
  eos_id = 0
  reserved_text = "\0"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

  def decode(self, ids) -> str:
    # A window may cut a multi-byte character; decoding model output must not fail on that.
    return bytes(np.asarray(ids, dtype=np.int64).tolist()).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model file; its eos id (if the model has one) separates documents."""
  reserved_text = None  # SentencePiece encodes the text "</s>" as ordinary pieces, never as eos

  def __init__(self, sentencepiece, spec: str, path: str):
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.name = spec
    self.fingerprint = f"{spec}:{_file_sha256(path)}"
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face `tokenizer.json`; the first of HF_EOS_TOKENS in its vocabulary separates documents."""

  def __init__(self, tokenizers, spec: str, path: str):
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.name = spec
    # One more than the largest id, not get_vocab_size (the number of tokens): ids may leave gaps, and an id at
    # or past vocab_size was stored cut to the cache's dtype (70000 as 4464) and passed the model's size check.
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    found = [t for t in HF_EOS_TOKENS if self._tok.token_to_id(t) is not None]
    # Special tokens are matched in raw text too, so a document must not contain the separator's text.
    self.reserved_text = found[0] if found else None
    self.eos_id = self._tok.token_to_id(found[0]) if found else None
    later = f":{found[0]}" if found and found[0] in _LATER_EOS_TOKENS else ""
    self.fingerprint = f"{spec}:{_file_sha256(path)}{later}"

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


_KINDS = {"sentencepiece": ("sentencepiece", SentencePieceTokenizer, "SentencePiece .model"),
          "hf": ("tokenizers", HFTokenizer, "Hugging Face tokenizer.json")}


def check_no_separator(tokenizer, text: str, path: str, field: str) -> None:
  """DataError if `text` holds the tokenizer's document separator (it would read as a document end)."""
  reserved = tokenizer.reserved_text
  if reserved is not None and reserved in text:
    offset = len(text[:text.index(reserved)].encode("utf-8"))
    raise DataError(f"{field}: {path} contains {reserved!r} at byte offset {offset}, which the tokenizer "
                    f"{tokenizer.name!r} reserves to separate documents; remove it from the file.")


def check_separator(tokenizer, segment_masking: bool) -> None:
  """DataError if `segment_masking` asks to keep documents apart and the tokenizer has no separator: its
  documents run together with no token between them, and every segment id would be 0. Training checks this
  (its cache, the same either way, is kept); evaluating a run trained so does not."""
  if segment_masking and tokenizer.eos_id is None:
    raise DataError(f"{FIELD} = {tokenizer.name!r} has no document separator (a Hugging Face vocabulary with none "
                    f"of {', '.join(HF_EOS_TOKENS)}, or a SentencePiece model without eos), so documents would run "
                    "together and config.data.segment_masking could not keep them apart; use a tokenizer with one, "
                    "or set config.data.segment_masking=False to train on the documents joined.")


def make_tokenizer(spec: str):
  """The tokenizer a `config.data.tokenizer` spec names: "bytes", "sentencepiece:<file>" or "hf:<file>"."""
  if spec == "bytes":
    return ByteTokenizer()
  kind, _, path = spec.partition(":")
  if kind not in _KINDS or not path:
    raise DataError(f"{FIELD} = {spec!r} is not a tokenizer spec; use 'bytes', 'sentencepiece:<model file>' "
                    "or 'hf:<tokenizer.json>'.")
  module, cls, what = _KINDS[kind]
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    problem = "is a directory" if os.path.isdir(path) else "does not exist"
    raise DataError(f"{FIELD} = {spec!r}: the {what} file {path} {problem}; fix the path, or use 'bytes'.")
  try:
    lib = importlib.import_module(module)
  except ImportError as e:
    raise DataError(f"{FIELD} = {spec!r} needs the `{module}` package, which is not installed; "
                    f"{INSTALL_HINT}.") from e
  try:
    return cls(lib, spec, path)
  except Exception as e:  # both libraries raise plain RuntimeError / Exception for a bad file
    raise DataError(f"{FIELD} = {spec!r}: {path} is not a valid {what} file ({e}).") from e


def _file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()
