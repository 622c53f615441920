"""The attention module: differential attention (with expert-conditional λ) or standard attention."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from diffmoe_jax.nn.layers import RESIDUAL, RMSNorm, constrain, dtype_of, param
from diffmoe_jax.ops import attention as attention_ops


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
  Standard (ablation): H softmax heads of width Dv.
  """
  config: "ml_collections.FrozenConfigDict"  # the model section  # noqa: F821

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, layer_index: jax.Array, *,
               lambda_gate: tuple[jax.Array, jax.Array] | None = None, kv_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None):
    """Returns the `[B, T, d]` output and stats {"lambda": λ per expert `[n]` (n = 1 if not conditional)}.

    segment_ids `[B, T]` (packed documents): a token attends only to tokens of its own segment.
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
                   implementation=attention_ops.resolve_attention_impl(cfg.attention_impl, length=length))

    if cfg.attention == "standard":
      q = attention_ops.apply_rope(q, positions, cfg.rope_theta)
      k = attention_ops.apply_rope(k, positions, cfg.rope_theta)
      out = attention_ops.standard_attention(q, k, v, **masking)
      stats = {"lambda": jnp.zeros((1,), jnp.float32)}
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
      out = attention_ops.differential_attention(q, k, v, lam, **masking)
      out = RMSNorm(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, axis_name="head_dim",
                    name="head_norm")(out)
      out = out * (1.0 - lambda_init).astype(dtype)
      stats = {"lambda": lambdas}
    y = jnp.einsum("bthk,hkd->btd", out.astype(dtype), wo.astype(dtype))
    return checkpoint_name(constrain(y, RESIDUAL), "attn_out"), stats
