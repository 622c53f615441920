"""Feed-forward modules: the sparse mixture-of-experts layer (with its router) and the dense ablation."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from diffmoe_jax.nn.layers import RESIDUAL, constrain, dtype_of, param
from diffmoe_jax.ops import dispatch, expert_parallel, routing
from diffmoe_jax.parallel import logical_mesh_axes


class MoEFeedForward(nn.Module):
  """E experts (gelu: w_in, w_out; swiglu: w_gate, w_in, w_out), top-k noisy routing, fp32 router.

  `gate(x)` is the noise-free top-k choice for the same router and `route(x)` the (noisy) routing, used by
  the attention's expert-conditional λ (see `model.moe.route_from`).
  """
  config: ml_collections.FrozenConfigDict  # the model section

  def setup(self):
    cfg, moe = self.config, self.config.moe
    pdtype = dtype_of(cfg.param_dtype)
    e, d, f = moe.num_experts, cfg.d_model, moe.expert_ffn_dim
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.router = param(self, "router", (d, e), ("embed", None), std=cfg.init_std, dtype=pdtype)
    self.w_in = param(self, "w_in", (e, d, f), ("expert", "embed", "mlp"), std=cfg.init_std, dtype=pdtype)
    self.w_out = param(self, "w_out", (e, f, d), ("expert", "mlp", "embed"), std=out_std, dtype=pdtype)
    if moe.activation == "swiglu":
      self.w_gate = param(self, "w_gate", (e, d, f), ("expert", "embed", "mlp"), std=cfg.init_std, dtype=pdtype)

  def router_logits(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("btd,de->bte", x.astype(jnp.float32), self.router.astype(jnp.float32))

  def gate(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return routing.top_k_gating(self.router_logits(x), self.config.moe.top_k)

  def route(self, x: jax.Array, *, noise_std=0.0, train: bool = False):
    """(router logits `[B, T, E]`, top-k weights, top-k experts); noisy in training."""
    logits = self.router_logits(x)
    rng = self.make_rng("noise") if train else None
    weights, experts = routing.top_k_gating(logits, self.config.moe.top_k, noise_std=noise_std if train else 0.0,
                                            rng=rng)
    return logits, weights, experts

  def __call__(self, x: jax.Array, *, noise_std=0.0, train: bool = False, route=None, token_mask=None,
               capacity_tokens: int | None = None):
    """x: `[B, T, d]` -> (`[B, T, d]`, stats: load_balance_loss, z_loss, expert_load [E], dropped_fraction).

    route: a `route(...)` result computed elsewhere (the attention input), else x is routed here.
    token_mask: bool `[B, T]`; False tokens take no expert slot, get 0 and are left out of the stats.
    capacity_tokens: in capacity mode, the tokens per sequence each expert's slots are figured from (default
    T; a routed layer at inference passes the count training runs it on).
    Training dispatches by `moe.dispatch`; inference by `moe.eval_dispatch` (dropless by default, so a
    token's output does not depend on the other tokens of the batch).
    """
    cfg, moe = self.config, self.config.moe
    dtype = dtype_of(cfg.dtype)
    logits, weights, experts = route if route is not None else self.route(x, noise_std=noise_std, train=train)
    w_gate = self.w_gate.astype(dtype) if moe.activation == "swiglu" else None
    args = (x.astype(dtype), weights, experts, self.w_in.astype(dtype), self.w_out.astype(dtype), w_gate)
    mode = moe.dispatch if train else moe.eval_dispatch
    capacity = None
    if mode == "capacity" and capacity_tokens is not None:
      capacity = dispatch.moe_capacity(capacity_tokens, moe.top_k, moe.num_experts, moe.capacity_factor)
    kwargs = dict(activation=moe.activation, mode=mode, capacity_factor=moe.capacity_factor,
                  dropless_impl=dispatch.resolve_dropless_impl(moe.dropless_impl), token_mask=token_mask,
                  capacity=capacity)
    layout = expert_parallel_layout(moe.expert_parallel, x.shape[0])
    if layout is None:
      y, dispatch_stats = dispatch.moe_ffn(*args, **kwargs)
    else:
      y, dispatch_stats = expert_parallel.moe_ffn(*args, **layout, **kwargs, strategy=moe.expert_parallel)
    stats = {
        "load_balance_loss": routing.load_balance_loss(logits, experts, moe.num_experts, token_mask),
        "z_loss": routing.router_z_loss(logits, token_mask),
        "expert_load": routing.expert_load(experts, moe.num_experts, token_mask),
        "dropped_fraction": jnp.asarray(dispatch_stats["dropped_fraction"], jnp.float32),
    }
    return checkpoint_name(constrain(y.astype(dtype), RESIDUAL), "ffn_out"), stats


def expert_parallel_layout(setting: str, batch_size: int) -> dict | None:
  """The mesh axes for expert parallelism under the current mesh and logical-axis rules, or None.

  Expert parallelism runs when the "expert" logical axis maps to a mesh axis of more than one device,
  `setting` (model.moe.expert_parallel) is not "off", and the batch splits evenly over its mesh axes (the
  trainer checks that its batches do; parameter init and single-sequence decoding do not). Otherwise XLA
  places the layer from its shardings: the same function, computed without explicit collectives.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if setting == "off" or mesh.empty:
    return None
  # The rules in context (nn.logical_axis_rules).
  batch, length, expert, mlp = (logical_mesh_axes(None, name) for name in ("batch", "length", "expert", "mlp"))
  # The experts split over one mesh axis (parallel.check_expert_parallel); others the rule names have size 1.
  split = [a for a in expert if mesh.shape[a] > 1]
  if not split or batch_size % math.prod(mesh.shape[a] for a in batch):
    return None
  if length:
    raise ValueError(f"expert parallelism routes whole sequences per device; the 'length' axis must not be "
                     f"sharded (it maps to {length} in mesh.axis_rules).")
  return dict(mesh=mesh, batch_axes=batch, expert_axis=split[0], tensor_axes=mlp)


class DenseFeedForward(nn.Module):
  """The dense ablation: one FFN of width `dense_ffn_dim` (default top_k · expert_ffn_dim, equal active FLOPs)."""
  config: ml_collections.FrozenConfigDict  # the model section

  @nn.compact
  def __call__(self, x: jax.Array, *, noise_std=0.0, train: bool = False, route=None, token_mask=None,
               capacity_tokens=None):
    # The MoE layer's keyword arguments change nothing here: a dense FFN has no router to route or perturb
    # (route, noise_std, train) and no expert slots to share or count (token_mask, capacity_tokens).
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, f = cfg.d_model, dense_ffn_dim(cfg)
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    w_in = param(self, "w_in", (d, f), ("embed", "mlp"), std=cfg.init_std, dtype=pdtype)
    w_out = param(self, "w_out", (f, d), ("mlp", "embed"), std=out_std, dtype=pdtype)
    x = x.astype(dtype)
    h = jnp.einsum("btd,df->btf", x, w_in.astype(dtype))
    if cfg.moe.activation == "swiglu":
      w_gate = param(self, "w_gate", (d, f), ("embed", "mlp"), std=cfg.init_std, dtype=pdtype)
      h = jax.nn.silu(jnp.einsum("btd,df->btf", x, w_gate.astype(dtype))) * h
    else:
      h = dispatch.gelu(h)
    y = jnp.einsum("btf,fd->btd", h, w_out.astype(dtype))
    zero = jnp.zeros((), jnp.float32)
    stats = {"load_balance_loss": zero, "z_loss": zero, "expert_load": jnp.zeros((1,), jnp.float32),
             "dropped_fraction": zero}
    return checkpoint_name(constrain(y, RESIDUAL), "ffn_out"), stats


def dense_ffn_dim(cfg) -> int:
  return cfg.dense_ffn_dim or cfg.moe.top_k * cfg.moe.expert_ffn_dim
