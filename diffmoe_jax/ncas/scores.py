"""The scores of a candidate, and the Pareto front over them.

- capacity: the knowledge a model can store, at 2 bits per parameter (Allen-Zhu & Li, "Physics of Language
  Models 3.3", measure about 2 bits per parameter for a wide range of architectures), over the exact
  parameter count of the completed full-scale architecture.
- hardware efficiency: useful over padded multiply-adds of one layer's matmuls per token, each operand
  dimension padded to the backend's matrix tile; and, where an accelerator is present, the measured
  training throughput of the real layer.
- proxy loss: validation loss of the width-scaled proxy (`search.py`).
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections

from diffmoe_jax import config as config_lib, estimate, memory
from diffmoe_jax.ncas.complete import Architecture, set_model
from diffmoe_jax.nn import model as model_lib

BITS_PER_PARAM = 2.0
# Matrix tile edge per backend: TPU MXU 128x128; GPU 64 (the K step and smallest N tile of 16-bit
# tensor-core GEMM kernels); MI300X 32 (its 32x32 MFMA instructions, the paper's hardware).
BACKEND_TILES = {"tpu": 128, "gpu": 64, "mi300x": 32}


def capacity_bits(total_params: int) -> float:
  """Storable bits: 2 per parameter."""
  return BITS_PER_PARAM * total_params


def _padded(n: int, tile: int) -> int:
  return -(-n // tile) * tile


def tile_efficiency(arch: Architecture, tile: int) -> float:
  """Useful / tile-padded multiply-adds of a layer per token, attention over the average causal context."""
  d, f, h = arch.d_model, arch.expert_ffn_dim, arch.num_heads
  qk, v = arch.head_dim // 2, arch.head_dim
  keys = arch.max_seq_len / 2
  # (rows, cols, multiplicity) of each matmul a token passes through.
  shapes = [(d, d, 4), (d, arch.num_experts, 1), (d, f, arch.top_k), (f, d, arch.top_k),
            (qk, keys, 2 * h), (keys, v, h)]
  useful = sum(r * c * n for r, c, n in shapes)
  padded = sum(_padded(r, tile) * _padded(int(c), tile) * n for r, c, n in shapes)
  return useful / padded


def measured_model(arch: Architecture, seq_len: int) -> ml_collections.ConfigDict:
  """What `measured_tokens_per_second` times: one layer group (a full and a routed layer) of the real width, bf16."""
  cfg = config_lib.defaults().model
  cfg.vocab_size = 256
  set_model(cfg, arch)
  cfg.update(num_layers=cfg.mod.every, max_seq_len=seq_len, dtype="bfloat16", param_dtype="bfloat16")
  return cfg


def measurement_bytes(arch: Architecture, *, seq_len: int, batch_size: int) -> float:
  """The memory `measured_tokens_per_second` needs: the bf16 weights and their gradients, the gradients in
  float32 before their cast (as the compiled program holds them), and the activations."""
  cfg = measured_model(arch, seq_len)
  return (2 + 2 + 4) * estimate.count_params(cfg).total + memory.activation_bytes(cfg, batch_size, seq_len)


def measured_tokens_per_second(arch: Architecture, *, seq_len: int, batch_size: int, repeats: int = 3) -> float:
  """Training throughput of `measured_model`."""
  cfg = measured_model(arch, seq_len)
  model = model_lib.build_model(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (batch_size, seq_len), 0, cfg.vocab_size)
  rngs = {"params": jax.random.PRNGKey(1), "noise": jax.random.PRNGKey(2)}
  params = jax.jit(lambda t: model.init(rngs, t)["params"])(tokens)

  def loss(p, t):
    token_ce, _ = model.apply({"params": p}, t, train=True, targets=t, rngs={"noise": jax.random.PRNGKey(3)})
    return jnp.mean(token_ce)

  grad = jax.jit(jax.grad(loss))
  jax.block_until_ready(grad(params, tokens))  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(grad(params, tokens))
  return batch_size * seq_len * repeats / (time.perf_counter() - start)


def pareto_front(rows: list[dict], objectives: dict[str, str]) -> list[int]:
  """Indices of the rows no other row dominates; objectives maps a key to "max" or "min".

  Row a dominates b if it is at least as good on every objective and better on one. Rows missing an
  objective (NaN) take part in no front.
  """
  signs = {k: (1.0 if how == "max" else -1.0) for k, how in objectives.items()}
  points = [None if any(math.isnan(float(r[k])) for k in signs) else [signs[k] * float(r[k]) for k in signs]
            for r in rows]

  def dominates(a, b):
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

  return [i for i, p in enumerate(points)
          if p is not None and not any(q is not None and dominates(q, p) for q in points)]
