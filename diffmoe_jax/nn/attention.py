"""The attention module: differential attention (with expert-conditional λ) or standard attention."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from diffmoe_jax import config as config_lib
from diffmoe_jax.nn.layers import RESIDUAL, RMSNorm, constrain, dtype_of, param, per_shard
from diffmoe_jax.ops import attention as attention_ops


def is_decoding(module: nn.Module) -> bool:
  """Whether `module` runs with a KV cache: applied (not initialised) with a mutable "cache" collection."""
  return module.is_mutable_collection("cache") and not module.is_initializing()


_MASK_ARRAYS = ("q_positions", "kv_positions", "kv_mask", "q_segment_ids", "kv_segment_ids")


def _attend(op, q, k, v, lam, masking: dict) -> jax.Array:
  """`op(q, k, v[, lam], **masking)`. A Pallas kernel is one custom call XLA cannot partition, so under a
  mesh it runs per device shard (`per_shard`: rows over the batch axes, heads over tensor; sequences
  whole); the other paths are partitioned by XLA."""
  static = {name: value for name, value in masking.items() if name not in _MASK_ARRAYS}
  head_axes = lambda a: ("batch", None, "heads") + (None,) * (a.ndim - 3)
  arrays = dict(q=q, k=k, v=v, lam=lam, **{name: masking[name] for name in _MASK_ARRAYS})

  def call(q, k, v, lam, **mask):
    return op(q, k, v, **mask, **static) if lam is None else op(q, k, v, lam, **mask, **static)

  if not static["implementation"].startswith("pallas"):
    return call(**arrays)
  axes = {"q": head_axes(q), "k": head_axes(k), "v": head_axes(v),
          "lam": None if lam is None else ((), ("heads",), None, ("batch", None, "heads"))[jnp.ndim(lam)],
          **{name: ("batch", None) for name in _MASK_ARRAYS}}
  return per_shard(call, arrays, axes, head_axes(v))


def lambda_init_value(lambda_init, layer_index) -> jax.Array:
  """The config's λ_init: the layer schedule, or a constant."""
  if lambda_init == "schedule":
    return attention_ops.lambda_init_schedule(layer_index)
  return jnp.asarray(float(lambda_init), jnp.float32)


class Attention(nn.Module):
  """Self-attention over `[B, T, d]` with RoPE at the given positions.

  Differential (Diff-Transformer): H heads, each with two query/key sub-heads of width Dv/2 and one
  value of width Dv; λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init (fp32), per-head RMSNorm, then the
  (1 − λ_init) scale. With `lambda_gate` (the layer's MoE top-k weights and experts for each token) each
  expert has its own λ vectors and a token's λ is the gate-weighted mix over its experts.
  Differential V2 (ablation, Differential Transformer V2's λ): the same heads, λ = sigmoid(W_λ x) per
  token and head from a `[d, H]` projection, no per-head RMSNorm and no (1 − λ_init) scale.
  Standard (ablation): H softmax heads of width Dv.
  """
  config: ml_collections.FrozenConfigDict  # the model section

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, layer_index: jax.Array, *,
               lambda_gate: tuple[jax.Array, jax.Array] | None = None, kv_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None):
    """Returns the `[B, T, d]` output and stats {"lambda": λ per expert `[n]` (n = 1 if not conditional)}.

    segment_ids `[B, T]` (packed documents): a token attends only to tokens of its own segment.

    Decoding: applied with a mutable "cache" collection, the layer keeps its keys (after RoPE) and values
    in preallocated slots, slot = position, and a mask of the filled slots. A call writes its tokens at
    their positions (a position past the cache's end writes nothing: padding), marks those in `kv_mask`
    (all if None) as filled, and attends over every filled slot. The call that creates the cache (e.g.
    under `jax.eval_shape` on `[B, S]` tokens) sizes it to S and attends as without one.
    """
    cfg = self.config
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, heads, dv = cfg.d_model, cfg.num_heads, cfg.head_dim
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    wq = param(self, "wq", (d, heads, dv), ("embed", "heads", "head_dim"), std=cfg.init_std, dtype=pdtype)
    wk = param(self, "wk", (d, heads, dv), ("embed", "heads", "head_dim"), std=cfg.init_std, dtype=pdtype)
    wv = param(self, "wv", (d, heads, dv), ("embed", "heads", "head_dim"), std=cfg.init_std, dtype=pdtype)
    wo = param(self, "wo", (heads, dv, d), ("heads", "head_dim", "embed"), std=out_std, dtype=pdtype)
    x = x.astype(dtype)
    q = checkpoint_name(jnp.einsum("btd,dhk->bthk", x, wq.astype(dtype)), "query_proj")
    k = checkpoint_name(jnp.einsum("btd,dhk->bthk", x, wk.astype(dtype)), "key_proj")
    v = checkpoint_name(jnp.einsum("btd,dhk->bthk", x, wv.astype(dtype)), "value_proj")
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "heads", "head_dim"))
    v = constrain(v, ("batch", "length", "heads", "head_dim"))
    batch, length = x.shape[:2]
    masking = dict(q_positions=positions, kv_positions=positions, kv_mask=kv_mask, q_segment_ids=segment_ids,
                   kv_segment_ids=segment_ids, block_q=cfg.attention_block_q, block_k=cfg.attention_block_k,
                   gpu_backward=cfg.attention_gpu_backward, gpu_launches=config_lib.gpu_launches(cfg),
                   gpu_forward=cfg.attention_gpu_forward,
                   implementation=attention_ops.resolve_attention_impl(cfg.attention_impl, length=length))

    if cfg.attention == "standard":
      q = attention_ops.apply_rope(q, positions, cfg.rope_theta)
      k = attention_ops.apply_rope(k, positions, cfg.rope_theta)
      k, v, masking = self._decoding_cache(k, v, positions, kv_mask, masking)
      out = _attend(attention_ops.standard_attention, q, k, v, None, masking)
      stats = {"lambda": jnp.zeros((1,), jnp.float32)}
    elif cfg.attention == "differential_v2":
      half = dv // 2
      q = attention_ops.apply_rope(q.reshape(batch, length, heads, 2, half), positions, cfg.rope_theta)
      k = attention_ops.apply_rope(k.reshape(batch, length, heads, 2, half), positions, cfg.rope_theta)
      w_lambda = param(self, "w_lambda", (d, heads), ("embed", "heads"), std=cfg.init_std, dtype=pdtype)
      lambda_logits = jnp.einsum("btd,dh->bth", x, w_lambda.astype(dtype))
      k, v, masking = self._decoding_cache(k, v, positions, kv_mask, masking)
      out = _attend(attention_ops.differential_v2_attention, q, k, v, lambda_logits, masking)
      stats = {"lambda": jnp.mean(jax.nn.sigmoid(lambda_logits.astype(jnp.float32)))[None]}  # the mean λ
    else:
      half = dv // 2
      q = attention_ops.apply_rope(q.reshape(batch, length, heads, 2, half), positions, cfg.rope_theta)
      k = attention_ops.apply_rope(k.reshape(batch, length, heads, 2, half), positions, cfg.rope_theta)
      num_lambdas = cfg.moe.num_experts if cfg.expert_conditional_lambda else 1
      lam_axes = ("expert" if cfg.expert_conditional_lambda else None, "head_dim")
      lam_params = [param(self, name, (num_lambdas, half), lam_axes, std=0.1, dtype=jnp.float32)
                    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")]
      lq1, lk1, lq2, lk2 = lam_params
      lambda_init = lambda_init_value(cfg.lambda_init, layer_index)
      lambdas = jnp.exp(jnp.sum(lq1 * lk1, -1)) - jnp.exp(jnp.sum(lq2 * lk2, -1)) + lambda_init  # [n]
      if lambda_gate is not None:
        gate_weights, gate_experts = lambda_gate
        token_lambda = jnp.sum(gate_weights.astype(jnp.float32) * lambdas[gate_experts], axis=-1)  # [B, T]
        lam = jnp.broadcast_to(token_lambda[:, :, None], (batch, length, heads))
      else:
        lam = lambdas[0]
      k, v, masking = self._decoding_cache(k, v, positions, kv_mask, masking)
      out = _attend(attention_ops.differential_attention, q, k, v, lam, masking)
      out = RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, axis_name="head_dim",
                    name="head_norm")(out)
      out = out * (1.0 - lambda_init).astype(dtype)
      stats = {"lambda": lambdas}
    y = jnp.einsum("bthk,hkd->btd", out.astype(dtype), wo.astype(dtype))
    return checkpoint_name(constrain(y, RESIDUAL), "attn_out"), stats

  def _decoding_cache(self, k, v, positions, written, masking):
    """(keys, values, masking) to attend over: this call's own, or with a "cache" collection the cache's
    after writing this call's into it (see `__call__`)."""
    if not is_decoding(self):
      return k, v, masking
    creating = not self.has_variable("cache", "key")
    cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
    filled = self.variable("cache", "filled", jnp.zeros, k.shape[:2], jnp.bool_)
    if creating:
      return k, v, masking
    batch, slots = filled.value.shape
    rows = jnp.arange(batch)[:, None]
    written = jnp.ones(positions.shape, jnp.bool_) if written is None else written
    cached_k.value = cached_k.value.at[rows, positions].set(k.astype(cached_k.value.dtype), mode="drop")
    cached_v.value = cached_v.value.at[rows, positions].set(v.astype(cached_v.value.dtype), mode="drop")
    filled.value = filled.value.at[rows, positions].set(written, mode="drop")
    masking = dict(masking, kv_positions=attention_ops.default_positions(batch, slots), kv_mask=filled.value,
                   q_segment_ids=None, kv_segment_ids=None,
                   implementation=attention_ops.resolve_attention_impl(self.config.attention_impl, length=slots))
    return cached_k.value, cached_v.value, masking
