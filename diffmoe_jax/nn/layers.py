"""Small building blocks: parameters with logical axes, RMSNorm, the token embedding."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffmoe_jax.parallel import mesh_axes_of

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
  """Token embedding table `[vocab, embed]` (with tied embeddings, its transpose is the output head)."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def logits_product(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(spec, x, w)` of operands in the compute dtype, returned in float32 without being rounded to
  that dtype first (bfloat16 keeps 8 significant bits: 0.03 at a logit of 15). The backward is the
  compute-dtype product's, its cotangent cast to x's dtype, so its matmuls stay 16-bit under bf16 compute."""
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _logits_product_fwd(spec, x, w):
  return logits_product(spec, x, w), (x, w)


def _logits_product_bwd(spec, residuals, g):
  x, w = residuals
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)
  return vjp(g.astype(x.dtype))


logits_product.defvjp(_logits_product_fwd, _logits_product_bwd)


def per_shard(fn, arrays: dict[str, jax.Array | None], axes: dict[str, Sequence[str | None]],
              out_axes: Sequence[str | None]):
  """`fn(**arrays)` run on each device's shard inside `jax.shard_map` over the current mesh.

  For computations XLA cannot partition (a Pallas kernel is one custom call): each array is split by its
  logical axes (`axes[name]`, through the current axis rules), fn sees one shard and the result
  `out_axes` comes back split the same way. Exact for work that is independent per batch row and head,
  such as attention. Outside a mesh, with nothing split, or when a split does not divide a dimension (a
  single decoded sequence), fn runs as is and XLA places it.
  """
  mesh = jax.sharding.get_abstract_mesh()
  present = {name: a for name, a in arrays.items() if a is not None}
  if mesh.empty:
    return fn(**arrays)
  specs = {name: nn.logical_to_mesh_axes(tuple(axes[name])) for name in present}
  out_spec = nn.logical_to_mesh_axes(tuple(out_axes))
  if not any(mesh.shape[a] > 1 for spec in specs.values() for entry in spec for a in mesh_axes_of(entry)):
    return fn(**arrays)
  for name, a in present.items():
    for dim, entry in zip(a.shape, specs[name]):
      if dim % math.prod(mesh.shape[axis] for axis in mesh_axes_of(entry)):
        return fn(**arrays)
  names = tuple(present)
  body = lambda *shards: fn(**{**arrays, **dict(zip(names, shards))})
  # check_vma=False: a pallas_call's results do not say which mesh axes they vary over.
  return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs[n] for n in names), out_specs=out_spec,
                       check_vma=False)(*(present[n] for n in names))
