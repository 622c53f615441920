"""The data pipeline: named text domains, tokenizers, a memory-mapped token cache, grain batches.

  corpus = data.build_corpus(config.data)    # tokenizes once into the cache, then memory-maps it
  ds = data.train_dataset(corpus, seed=0, seq_len=256, batch_size=16, domain_weights={"code": 0.7, "docs": 0.3})
  ds[step]                                   # {"inputs", "targets": int32 [B, T], "domain": int32 [B]}
  data.eval_batches(corpus, "docs", seq_len=256, batch_size=16, num_batches=4)
"""
from diffmoe_jax.data.corpus import Corpus, SplitInfo, build_corpus, check_sources
from diffmoe_jax.data.errors import DataError
from diffmoe_jax.data.pipeline import eval_batches, train_dataset
from diffmoe_jax.data.tokenizer import check_separator, make_tokenizer

__all__ = ["Corpus", "DataError", "SplitInfo", "build_corpus", "check_separator", "check_sources",
           "eval_batches", "make_tokenizer", "train_dataset"]
