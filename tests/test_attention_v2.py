"""Differential Transformer V2 attention (per-token λ = sigmoid(W_λ x)) against float64 NumPy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffmoe_jax import config as config_lib, validation
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.nn.attention import Attention
from diffmoe_jax.ops import attention as attn


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _masked_softmax(scores, visible):
  """Row softmax over visible keys in float64; a row with no visible key is all zeros."""
  scores = np.where(visible, scores, -np.inf)
  top = np.max(np.where(visible, scores, -1e300), axis=-1, keepdims=True)
  e = np.where(visible, np.exp(scores - top), 0.0)
  total = e.sum(-1, keepdims=True)
  return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def reference_v2(q, k, v, lambda_logits, q_pos, kv_pos, kv_mask=None, q_seg=None, kv_seg=None):
  """V2 in float64: A₀v − sigmoid(ℓ)·A₁v with A_j = softmax(q_j k_jᵀ/√D) over the visible keys.

  q `[B,T,H,2,D]`, k `[B,S,H,2,D]`, v `[B,S,H,Dv]`, lambda_logits `[B,T,H]`.
  """
  q, k, v, lambda_logits = (np.asarray(a, np.float64) for a in (q, k, v, lambda_logits))
  d = q.shape[-1]
  visible = np.asarray(kv_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]  # [B, T, S]
  if kv_mask is not None:
    visible &= np.asarray(kv_mask)[:, None, :]
  if q_seg is not None:
    visible &= np.asarray(kv_seg)[:, None, :] == np.asarray(q_seg)[:, :, None]
  maps = [_masked_softmax(np.einsum("bthd,bshd->bhts", q[:, :, :, j], k[:, :, :, j]) / np.sqrt(d),
                          visible[:, None]) for j in (0, 1)]
  first, second = (np.einsum("bhts,bshv->bthv", a, v) for a in maps)
  return first - _sigmoid(lambda_logits)[..., None] * second


def _inputs(rng, b=2, t=6, s=6, h=3, d=4):
  q = rng.normal(size=(b, t, h, 2, d)).astype(np.float32)
  k = rng.normal(size=(b, s, h, 2, d)).astype(np.float32)
  v = rng.normal(size=(b, s, h, 2 * d)).astype(np.float32)
  logits = rng.normal(scale=2.0, size=(b, t, h)).astype(np.float32)
  return q, k, v, logits


@pytest.mark.parametrize("implementation", ["explicit", "fused", "blockwise"])
def test_v2_op_matches_float64_reference(implementation):
  rng = np.random.default_rng(0)
  q, k, v, logits = _inputs(rng)
  pos = np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6))
  got = attn.differential_v2_attention(q, k, v, logits, q_positions=pos, kv_positions=pos,
                                       implementation=implementation, block_q=4, block_k=4)
  np.testing.assert_allclose(np.asarray(got), reference_v2(q, k, v, logits, pos, pos), rtol=1e-5, atol=1e-5)
  # One logit for every token and head, as differential_attention takes a scalar λ.
  got = attn.differential_v2_attention(q, k, v, 0.3, implementation=implementation, block_q=4, block_k=4)
  want = reference_v2(q, k, v, np.full(logits.shape, 0.3), pos, pos)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_v2_op_masking_decode_gathered_and_segments():
  """Cache slots hidden by kv_mask, queries at gathered (non-contiguous) positions, packed documents."""
  rng = np.random.default_rng(1)
  q, k, v, logits = _inputs(rng, t=2, s=8)
  q_pos = np.array([[6, 7], [5, 7]], np.int32)
  kv_pos = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))
  kv_mask = np.ones((2, 8), bool)
  kv_mask[0, 2] = kv_mask[1, 5] = False
  got = attn.differential_v2_attention(q, k, v, logits, q_positions=q_pos, kv_positions=kv_pos, kv_mask=kv_mask)
  want = reference_v2(q, k, v, logits, q_pos, kv_pos, kv_mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  q, k, v, logits = _inputs(rng, t=6, s=6)
  pos = np.array([[0, 2, 3, 5, 8, 9], [1, 2, 4, 6, 7, 11]], np.int32)
  seg = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]], np.int32)
  got = attn.differential_v2_attention(q, k, v, logits, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                       kv_segment_ids=seg)
  np.testing.assert_allclose(np.asarray(got), reference_v2(q, k, v, logits, pos, pos, q_seg=seg, kv_seg=seg),
                             rtol=1e-5, atol=1e-5)


def test_v2_lambda_logit_gradient_matches_float64():
  """d/dℓ of Σ g·out = −sigmoid'(ℓ) · ⟨A₁v, g⟩ per (token, head), through the op's hand-written VJP."""
  rng = np.random.default_rng(2)
  q, k, v, logits = _inputs(rng)
  g = rng.normal(size=(2, 6, 3, 8))
  pos = np.broadcast_to(np.arange(6, dtype=np.int32), (2, 6))
  grad = jax.grad(lambda l: jnp.sum(attn.differential_v2_attention(q, k, v, l) * g))(jnp.asarray(logits))
  # A₁v alone: the V2 output at ℓ → −∞ (λ = 0) minus the output at λ = 1, each in float64.
  second = (reference_v2(q, k, v, np.full_like(logits, -np.inf), pos, pos)
            - reference_v2(q, k, v, np.full_like(logits, np.inf), pos, pos))
  s = _sigmoid(logits.astype(np.float64))
  want = -s * (1 - s) * np.einsum("bthv,bthv->bth", second, g)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-5)


def _rope(x, pos, theta):
  d = x.shape[-1]
  freqs = theta ** (-np.arange(0, d, 2) / d)
  z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * pos[:, :, None, None, None] * freqs)
  return np.concatenate([z.real, z.imag], -1)


def _v2_model_config(make_config, **overrides):
  return make_config(attention="differential_v2", expert_conditional_lambda=False, **overrides)


def test_v2_attention_layer_matches_float64(make_config):
  """The whole layer from its own parameters: projections, RoPE, λ = sigmoid(x W_λ), no head norm, W_o."""
  cfg = _v2_model_config(make_config).model
  b, t = 2, 6
  rng = np.random.default_rng(3)
  x = rng.normal(size=(b, t, cfg.d_model)).astype(np.float32)
  pos = np.broadcast_to(np.arange(t), (b, t))
  module = Attention(ml_collections.FrozenConfigDict(cfg))
  variables = module.init(jax.random.PRNGKey(0), x, pos, 2)
  out, stats = module.apply(variables, x, pos, 2)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])
  assert set(p) == {"wq", "wk", "wv", "wo", "w_lambda"}  # no per-head RMSNorm, no λ vectors
  h, dv = cfg.num_heads, cfg.head_dim
  x64 = x.astype(np.float64)
  q = _rope(np.einsum("btd,dhk->bthk", x64, p["wq"]).reshape(b, t, h, 2, dv // 2), pos, cfg.rope_theta)
  k = _rope(np.einsum("btd,dhk->bthk", x64, p["wk"]).reshape(b, t, h, 2, dv // 2), pos, cfg.rope_theta)
  v = np.einsum("btd,dhk->bthk", x64, p["wv"])
  logits = x64 @ p["w_lambda"]
  want = np.einsum("bthk,hkd->btd", reference_v2(q, k, v, logits, pos, pos), p["wo"])
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(stats["lambda"]), [_sigmoid(logits).mean()], rtol=1e-5)


def test_v2_model_builds_and_trains_a_step(make_config):
  cfg = _v2_model_config(make_config)
  model = model_lib.build_model(cfg.model)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 16)), jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
  variables = model.init(rngs, tokens)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, tokens, rngs={"noise": jax.random.PRNGKey(2)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

  grads = jax.grad(loss)(variables["params"])
  w_lambda_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(nn.unbox(grads))
                    if "w_lambda" in jax.tree_util.keystr(path)]
  assert w_lambda_grads and all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
                                for g in w_lambda_grads)


def test_v2_config_validation(make_config):
  def validate(config):
    config.curriculum.tokens_per_batch = 256
    return validation.validate(config)
  validate(_v2_model_config(make_config))
  with pytest.raises(config_lib.ConfigError, match="model.expert_conditional_lambda"):
    validate(make_config(attention="differential_v2"))
  with pytest.raises(config_lib.ConfigError, match="model.head_dim"):
    validate(_v2_model_config(make_config, num_heads=8, head_dim=6))


def test_v2_decoding_with_a_cache_equals_the_full_pass(make_config):
  """Token by token through the layer's KV cache gives the full-sequence outputs (per-token λ included)."""
  cfg = ml_collections.FrozenConfigDict(_v2_model_config(make_config).model)
  b, t = 2, 6
  x = np.random.default_rng(5).normal(size=(b, t, cfg.d_model)).astype(np.float32)
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  module = Attention(cfg)
  variables = module.init(jax.random.PRNGKey(0), x, pos, 1)
  full, _ = module.apply(variables, x, pos, 1)
  _, cache = jax.eval_shape(lambda: module.apply(variables, x, pos, 1, mutable=["cache"]))
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache)
  steps = []
  for i in range(t):
    (out, _), cache = module.apply({**variables, **cache}, x[:, i:i + 1], pos[:, i:i + 1], 1, mutable=["cache"])
    steps.append(np.asarray(out))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), rtol=1e-5, atol=1e-5)
