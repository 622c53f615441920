"""The π-constrained architecture search (python -m diffmoe_jax.ncas --config=configs/ncas.py).

Space: the 2,048 multiples of 3 in [2048, 8192] (the paper's "~2,000 candidates"); the default rules keep
9 (2304, 2592, 3072, 3456, 4608, 5184, 6144, 6912, 7776). Each survivor and each power-of-two width of the
space (2048, 4096, 8192) trains a proxy of width / 8 (the largest power-of-two scale that leaves PI-P's
2592 a proxy width divisible by 4), 2 layers, context 32, 20 steps of 256 tokens (5,120 tokens), through
the six phases. On a quiet 2-core CPU a proxy takes 0.5-1 minute, mostly compilation; the committed report
in results/ncas/ searches [2048, 4608] (--config.ncas.space.max_width=4608): 5 survivors and 2 baselines.
"""
from diffmoe_jax.ncas import search


def get_config():
  return search.defaults()
