"""Flax modules against float64 NumPy references built from their own parameters."""
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.nn.attention import Attention
from diffmoe_jax.nn.layers import RMSNorm
from diffmoe_jax.nn.mod import MoDRouter
from diffmoe_jax.nn.moe import MoEFeedForward
from diffmoe_jax.ops import routing
from test_attention import reference_differential

B, T = 2, 6


def _rope(x, pos, theta):
  d = x.shape[-1]
  freqs = theta ** (-np.arange(0, d, 2) / d)
  z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * pos[:, :, None, None, None] * freqs)
  return np.concatenate([z.real, z.imag], -1)


@pytest.mark.parametrize("lambda_init", ["schedule", "0.5"])
def test_expert_conditional_attention_layer(make_config, lambda_init):
  cfg = make_config(lambda_init=lambda_init).model
  m = ml_collections.FrozenConfigDict(cfg)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, cfg.d_model)).astype(np.float32)
  pos = np.broadcast_to(np.arange(T), (B, T))
  experts = np.stack([rng.choice(cfg.moe.num_experts, 2, replace=False) for _ in range(B * T)]).reshape(B, T, 2)
  weights = rng.dirichlet([1, 1], size=(B, T)).astype(np.float32)
  layer_index = 3
  module = Attention(m)
  gate = (jnp.asarray(weights), jnp.asarray(experts, jnp.int32))
  variables = module.init(jax.random.PRNGKey(0), x, pos, layer_index, lambda_gate=gate)
  out, stats = module.apply(variables, x, pos, layer_index, lambda_gate=gate)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])
  h, dv = cfg.num_heads, cfg.head_dim
  x64 = x.astype(np.float64)
  q = _rope(np.einsum("btd,dhk->bthk", x64, p["wq"]).reshape(B, T, h, 2, dv // 2), pos, cfg.rope_theta)
  k = _rope(np.einsum("btd,dhk->bthk", x64, p["wk"]).reshape(B, T, h, 2, dv // 2), pos, cfg.rope_theta)
  v = np.einsum("btd,dhk->bthk", x64, p["wv"])
  lambda_init = 0.8 - 0.6 * np.exp(-0.3 * layer_index) if lambda_init == "schedule" else 0.5
  lam_e = (np.exp((p["lambda_q1"] * p["lambda_k1"]).sum(-1)) - np.exp((p["lambda_q2"] * p["lambda_k2"]).sum(-1))
           + lambda_init)
  token_lam = (weights * lam_e[experts]).sum(-1)
  attn = reference_differential(q, k, v, np.repeat(token_lam[..., None], h, -1), pos, pos, None)
  normed = attn / np.sqrt((attn**2).mean(-1, keepdims=True) + cfg.norm_eps) * p["head_norm"]["scale"]
  want = np.einsum("bthk,hkd->btd", normed * (1 - lambda_init), p["wo"])
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(stats["lambda"]), lam_e, rtol=1e-5)


def test_moe_layer_against_a_per_token_loop(make_config):
  cfg = make_config(**{"moe.dispatch": "dropless"}).model
  module = MoEFeedForward(ml_collections.FrozenConfigDict(cfg))
  x = np.random.default_rng(1).normal(size=(B, T, cfg.d_model)).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(1), x)
  y, stats = module.apply(variables, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)["params"])
  logits = x.astype(np.float64) @ p["router"]
  gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
  want = np.zeros_like(x, dtype=np.float64)
  for b in range(B):
    for t in range(T):
      top = np.argsort(-logits[b, t])[:2]
      w = np.exp(logits[b, t, top] - logits[b, t, top].max())
      w /= w.sum()
      for weight, e in zip(w, top):
        want[b, t] += weight * gelu(x[b, t] @ p["w_in"][e]) @ p["w_out"][e]
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
  assert float(stats["dropped_fraction"]) == 0.0

  # With a token mask: skipped tokens get 0 and are left out of the router's statistics (NumPy).
  mask = np.random.default_rng(2).uniform(size=(B, T)) < 0.6
  y, stats = module.apply(variables, x, token_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y), np.where(mask[..., None], want, 0.0), rtol=1e-4, atol=1e-5)
  real = logits[mask]
  counts = np.bincount(np.argsort(-real, axis=-1)[:, :2].ravel(), minlength=cfg.moe.num_experts)
  probs = np.exp(real - real.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  lse = real.max(-1) + np.log(np.exp(real - real.max(-1, keepdims=True)).sum(-1))
  np.testing.assert_allclose(np.asarray(stats["expert_load"]), counts / counts.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(stats["load_balance_loss"]),
                             cfg.moe.num_experts * np.sum(counts / counts.sum() * probs.mean(0)), rtol=1e-5)
  np.testing.assert_allclose(float(stats["z_loss"]), np.mean(lse**2), rtol=1e-5)


def test_mixture_of_depths_over_packed_documents(make_config):
  """Top-k routing over a row of packed documents: the selected tokens of each document run the block
  among themselves (per-document runs here), scaled by sigmoid(score); no token sees another document."""
  cfg = make_config()
  frozen = ml_collections.FrozenConfigDict(cfg.model)
  segments = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]], np.int32)
  positions = np.concatenate([np.arange(n) for n in np.bincount(segments[0])])[None].astype(np.int32)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 10, cfg.model.d_model)), jnp.float32)
  layer = model_lib.RoutedLayer(frozen, train=False, mod_mode="topk", mod_capacity=0.5)
  args = (x, jnp.asarray(positions), jnp.asarray(1), 0.0, jnp.asarray(segments))
  init = jax.jit(lambda: layer.init({"params": jax.random.PRNGKey(5), "noise": jax.random.PRNGKey(6)}, *args))
  params = nn.unbox(init())["params"]
  out, _ = jax.jit(lambda p: layer.apply({"params": p}, *args))(params)
  score, _ = jax.jit(MoDRouter(frozen).apply)({"params": params["mod_router"]}, x)
  selected = np.sort(np.argsort(-np.asarray(score[0]), kind="stable")[:5])
  assert len(set(segments[0, selected])) > 1, "the test needs tokens of several documents selected"
  run_block = jax.jit(lambda x_, pos: model_lib.Block(frozen, train=False).apply(
      {"params": params["block"]}, x_, pos, jnp.asarray(1), 0.0)[0])
  want = np.asarray(x[0]).copy()
  for doc in np.unique(segments[0, selected]):
    idx = selected[segments[0, selected] == doc]
    delta = run_block(x[:, idx], jnp.asarray(positions[:, idx]))
    want[idx] += np.asarray(jax.nn.sigmoid(score[0, idx])[:, None] * delta[0])
  np.testing.assert_allclose(np.asarray(out[0]), want, rtol=1e-5, atol=1e-5)


def test_every_layer_draws_its_own_router_noise(make_config):
  """Each MoE layer's noisy top-k gets a key of its own, in every scanned layer group (the groups sharing one
  key passed every other test: a layer drew the same noise as its counterpart in each other group)."""
  cfg = make_config()
  _, groups, _ = model_lib.layer_layout(cfg.model)
  assert cfg.model.scan_layers and groups > 1
  model = model_lib.build_model(cfg.model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (B, T)), jnp.int32)
  variables = model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}, tokens)
  keys, gating = [], routing.top_k_gating

  def recording_keys(logits, k, *, noise_std=0.0, rng=None):
    if rng is not None:
      data = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
      jax.debug.callback(lambda key: keys.append(np.asarray(key).tobytes()), data)
    return gating(logits, k, noise_std=noise_std, rng=rng)

  with mock.patch.object(routing, "top_k_gating", recording_keys):
    jax.block_until_ready(model.apply(variables, tokens, train=True, router_noise_std=0.5,
                                      rngs={"noise": jax.random.PRNGKey(2)}))
  assert len(set(keys)) == len(keys) == cfg.model.num_layers, keys


def test_rms_norm_of_bfloat16_is_the_float64_norm_rounded_once():
  """In bfloat16, RMSNorm's output is within half a bfloat16 unit of the float64 norm (its statistics are
  taken in float32; computed in bfloat16, 30% of the outputs were further off)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(64, 144)) * 3, jnp.bfloat16)
  norm = RMSNorm(eps=1e-5, dtype="bfloat16")
  params = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 144), jnp.float32)}}
  out = np.asarray(norm.apply(params, x), np.float64)
  x64 = np.asarray(x, np.float64)
  want = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + 1e-5) * np.asarray(params["params"]["scale"])
  half_unit = 2.0 ** (np.floor(np.log2(np.abs(want))) - 8)  # bfloat16 keeps 8 significant bits
  assert (np.abs(out - want) <= half_unit + 1e-6 * np.abs(want)).all()
