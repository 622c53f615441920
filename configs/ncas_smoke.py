"""A short search that checks the whole pipeline: two π widths (2304, 2592), no baseline, proxies of
width / 24 (96 and 108 wide), 2 layers, context 32, 6 steps of 256 tokens."""
from diffmoe_jax.ncas import search


def get_config():
  c = search.defaults()
  c.ncas.space.update(min_width=2304, max_width=2592, step=288)
  c.ncas.baseline = False
  c.ncas.proxy.update(scale=24, steps=6, eval_batches=1)
  return c
