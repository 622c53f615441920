"""The mixture-of-depths router and its causal predictor."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffmoe_jax.nn.layers import dtype_of, param


class MoDRouter(nn.Module):
  """Per-token scalar router score, and a predictor of the top-k decision from the token alone.

  Top-k over a sequence is not causal (a token's selection depends on later tokens' scores), so the
  predictor — a small MLP on the stop-gradient input, trained with BCE against the top-k decision —
  makes the decision causally at inference time (threshold 0.5).
  """
  config: ml_collections.FrozenConfigDict  # the model section

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: `[B, T, d]` -> (router score `[B, T]`, predictor logit `[B, T]`), both fp32."""
    cfg = self.config
    pdtype = dtype_of(cfg.param_dtype)
    d, h = cfg.d_model, cfg.mod.predictor_hidden
    w_score = param(self, "score", (d,), ("embed",), std=cfg.init_std, dtype=pdtype)
    w_hidden = param(self, "predictor_hidden", (d, h), ("embed", None), std=cfg.init_std, dtype=pdtype)
    b_hidden = param(self, "predictor_hidden_bias", (h,), (None,), init=nn.initializers.zeros, dtype=pdtype)
    w_logit = param(self, "predictor_out", (h,), (None,), std=cfg.init_std, dtype=pdtype)
    x32 = x.astype(jnp.float32)
    score = jnp.einsum("btd,d->bt", x32, w_score.astype(jnp.float32))
    hidden = jax.nn.gelu(jnp.einsum("btd,dh->bth", jax.lax.stop_gradient(x32), w_hidden) + b_hidden)
    return score, jnp.einsum("bth,h->bt", hidden, w_logit)
