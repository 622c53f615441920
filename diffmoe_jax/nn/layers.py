"""Small building blocks: parameters with logical axes, RMSNorm, the token embedding."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  return DTYPES[name]


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None], *,
          std: float | None = None, init=None, dtype=jnp.float32) -> jax.Array:
  """A parameter annotated with logical axis names (one per dimension), normal(std) unless `init`."""
  if len(shape) != len(axes):
    raise ValueError(f"parameter {name!r}: shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank.")
  init = init if init is not None else nn.initializers.normal(stddev=std)
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


# The residual stream's layout: split over the batch, features whole. Weights shard their "embed" axis
# over fsdp; activations must not (the batch already uses that mesh axis).
RESIDUAL = ("batch", "length", None)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding hint by logical axes; a no-op outside a mesh with axis rules."""
  return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
  """`x / rms(x) * w` over the last axis, computed in fp32, returned in `dtype`."""
  eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  axis_name: str | None = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = param(self, "scale", (x.shape[-1],), (self.axis_name,), init=nn.initializers.ones,
              dtype=dtype_of(self.param_dtype))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * w.astype(jnp.float32)).astype(dtype_of(self.dtype))


class Embed(nn.Module):
  """Token embedding table `[vocab, embed]`; `attend` gives tied output logits."""
  vocab_size: int
  features: int
  std: float
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    self.table = param(self, "table", (self.vocab_size, self.features), ("vocab", "embed"), std=self.std,
                       dtype=dtype_of(self.param_dtype))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # Gather the table's fsdp-sharded feature axis first (FSDP's weight gather), so the looked-up rows
    # come out split by the batch like the tokens, not by features.
    table = constrain(self.table, ("vocab", None))
    return constrain(jnp.take(table, tokens, axis=0), RESIDUAL).astype(dtype_of(self.dtype))

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x, self.table.astype(x.dtype))
