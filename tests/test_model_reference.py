"""The whole model against a float64 NumPy forward pass written from the README's formulas ("The model").

The reference shares nothing with the code under test but the parameters: RoPE (θ = model.rope_theta, pairs
(i, i + D/2) of each sub-head), both softmax maps and their difference, λ = exp(λq1·λk1) − exp(λq2·λk2) +
λ_init mixed over each token's top-k experts, the per-head RMSNorm and (1 − λ_init), noise-free top-k with
the softmax over the selected logits, capacity dispatch (ceil(capacity_factor·T·k/E) slots per expert and
sequence, earlier tokens first), mixture-of-depths top-k per sequence with the sigmoid-weighted update, the
causal predictor, and the auxiliary losses (Switch load balance, router z-loss, the predictor's BCE), each a
mean over the layers it applies to, the first two pooled over the batch.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax.nn import model as model_lib

B, T = 2, 9


def _rmsnorm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _gelu(z):
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _silu(z):
  return z / (1 + np.exp(-z))


def _softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


def _rope(x, pos, theta):
  """x `[T, ..., D]`: each pair (x_i, x_{i+D/2}) rotated by pos · θ^(−2i/D), one pair at a time."""
  d = x.shape[-1]
  out = np.empty_like(x)
  for t in range(x.shape[0]):
    for i in range(d // 2):
      c, s = math.cos(pos[t] * theta ** (-2 * i / d)), math.sin(pos[t] * theta ** (-2 * i / d))
      out[t, ..., i] = x[t, ..., i] * c - x[t, ..., i + d // 2] * s
      out[t, ..., i + d // 2] = x[t, ..., i + d // 2] * c + x[t, ..., i] * s
  return out


def _top_k(logits, k):
  """(weights, experts): the k largest logits (ties to the lower expert), softmax over those k."""
  experts = sorted(range(len(logits)), key=lambda e: (-logits[e], e))[:k]
  return _softmax(logits[experts]), experts


def _attention(m, p, h, pos, layer, routes):
  """One sequence's attention output `[T, d]` from its normed input h."""
  n, (heads, dv) = len(h), (m.num_heads, m.head_dim)
  if m.attention == "standard":
    q, k = (_rope(np.einsum("td,dhk->thk", h, p[w]), pos, m.rope_theta) for w in ("wq", "wk"))
    q = q[:, :, None]
    k = k[:, :, None]
  else:
    q, k = (_rope(np.einsum("td,dhk->thk", h, p[w]).reshape(n, heads, 2, dv // 2), pos, m.rope_theta)
            for w in ("wq", "wk"))
  v = np.einsum("td,dhk->thk", h, p["wv"])
  lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer) if m.lambda_init == "schedule" else float(m.lambda_init)
  if m.attention == "differential":
    lam_e = (np.exp((p["lambda_q1"] * p["lambda_k1"]).sum(-1)) - np.exp((p["lambda_q2"] * p["lambda_k2"]).sum(-1))
             + lambda_init)
  out = np.zeros_like(h)
  for t in range(n):
    seen = [s for s in range(n) if pos[s] <= pos[t]]
    for head in range(heads):
      maps = [_softmax(np.array([q[t, head, j] @ k[s, head, j] for s in seen]) / math.sqrt(q.shape[-1]))
              for j in range(q.shape[2])]
      reads = [sum(a[i] * v[s, head] for i, s in enumerate(seen)) for a in maps]
      if m.attention == "standard":
        o = reads[0]
      elif m.attention == "differential_v2":
        o = reads[0] - _sigmoid(h[t] @ p["w_lambda"][:, head]) * reads[1]
      else:
        lam = sum(w * lam_e[e] for w, e in zip(*routes[t])) if m.expert_conditional_lambda else lam_e[0]
        o = _rmsnorm(reads[0] - lam * reads[1], p["head_norm"]["scale"], m.norm_eps) * (1 - lambda_init)
      out[t] += o @ p["wo"][head]
  return out


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


def _ffn(m, p, u, routes, capacity):
  """One sequence's FFN output `[T, d]`: each token's kept experts, gate-weighted; returns (y, dropped)."""
  act = lambda x, w_in, w_gate: _silu(x @ w_gate) * (x @ w_in) if m.moe.activation == "swiglu" else _gelu(x @ w_in)
  if m.ffn == "dense":
    return np.stack([act(x, p["w_in"], p.get("w_gate")) @ p["w_out"] for x in u]), 0
  y, used, dropped = np.zeros_like(u), [0] * m.moe.num_experts, 0
  for t, (weights, experts) in enumerate(routes):  # in token order: earlier tokens take the slots first
    for w, e in zip(weights, experts):
      if used[e] == capacity:
        dropped += 1
        continue
      used[e] += 1
      y[t] += w * act(u[t], p["w_in"][e], p["w_gate"][e] if "w_gate" in p else None) @ p["w_out"][e]
  return y, dropped


def _block(m, p, x, pos, layer, train):
  """One sequence's block update `[T, d]` and its router logits and choices (for the losses)."""
  h = _rmsnorm(x, p["attn_norm"]["scale"], m.norm_eps)
  moe = m.ffn == "moe"
  logits = h @ p["moe"]["router"] if moe else None
  routes = [_top_k(row, m.moe.top_k) for row in logits] if moe else None
  attn = _attention(m, p["attention"], h, pos, layer, routes)
  u = _rmsnorm(x + attn, p["ffn_norm"]["scale"], m.norm_eps)
  if moe and m.moe.route_from == "ffn_input":
    logits = u @ p["moe"]["router"]
    routes = [_top_k(row, m.moe.top_k) for row in logits]
  n, k, e = len(x), m.moe.top_k, m.moe.num_experts
  capacity = min(n, max(1, math.ceil(m.moe.capacity_factor * n * k / e))) if train else n
  y, dropped = _ffn(m, p["ffn" if not moe else "moe"], u, routes, capacity)
  return attn + y, logits, [r[1] for r in routes] if moe else None, dropped


def _layer_params(m, params, layer):
  """(this layer's parameters, whether it is mixture-of-depths routed)."""
  every = m.mod.every if m.mod.enabled else 1
  groups = m.num_layers // every
  if layer >= groups * every:
    return params[f"tail_{layer - groups * every}"], False
  g, j = divmod(layer, every)
  return jax.tree.map(lambda a: a[g], params["groups"][f"layer_{j}"]), m.mod.enabled and j == every - 1


def reference_forward(m, params, tokens, *, train, mod_mode, mod_capacity):
  """Logits `[B, T, V]` and the losses {"load_balance", "router_z", "mod_predictor"}."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs = [params["embed"]["table"][row] for row in tokens]
  pos = np.arange(tokens.shape[1])
  balance, z_loss, bce, dropped = [], [], [], []
  for layer in range(m.num_layers):
    p, routed = _layer_params(m, params, layer)
    logits_seen, experts_seen, layer_dropped = [], [], 0
    for b, x in enumerate(xs):
      run = pos
      if routed:
        r = p["mod_router"]
        score = x @ r["score"]
        predictor = _gelu(x @ r["predictor_hidden"] + r["predictor_hidden_bias"]) @ r["predictor_out"]
        chosen = sorted(sorted(pos, key=lambda t: (-score[t], t))[:max(1, math.ceil(mod_capacity * len(pos)))])
        target = np.isin(pos, chosen)
        bce.append(np.maximum(predictor, 0) - predictor * target + np.log1p(np.exp(-np.abs(predictor))))
        run = np.array(chosen) if mod_mode == "topk" else pos[predictor > 0]
      if len(run) == 0:
        continue
      delta, logits, experts, n_dropped = _block(m, p["block"], x[run], pos[run], layer, train)
      x = x.copy()
      x[run] += (1 / (1 + np.exp(-score[run])))[:, None] * delta if routed else delta
      xs[b] = x
      layer_dropped += n_dropped
      if logits is not None:
        logits_seen.append(logits)
        experts_seen += experts
    if logits_seen:
      logits = np.concatenate(logits_seen)
      f = np.bincount(np.ravel(experts_seen), minlength=m.moe.num_experts) / np.size(experts_seen)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      balance.append(m.moe.num_experts * np.sum(f * (probs / probs.sum(-1, keepdims=True)).mean(0)))
      lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
      z_loss.append(np.mean(lse**2))
    else:
      balance.append(0.0)
      z_loss.append(0.0)
    dropped.append(layer_dropped)
  out = np.stack([_rmsnorm(x, params["final_norm"]["scale"], m.norm_eps) @ params["lm_head"] for x in xs])
  losses = {"load_balance": np.mean(balance), "router_z": np.mean(z_loss),
            "mod_predictor": np.mean(np.concatenate(bce)) if bce else 0.0}
  return out, losses, np.array(dropped)


VARIANTS = {
    # 5 layers: two scanned groups (λ_init follows the layer index through the scan) and a trailing full layer.
    "default": dict(num_layers=5),
    "ffn_input, constant λ_init, swiglu, a router at each layer": {
        "num_layers": 2, "moe.route_from": "ffn_input", "lambda_init": "0.5", "moe.activation": "swiglu",
        "mod.every": 1},
    "one λ per layer, blockwise attention": dict(num_layers=2, expert_conditional_lambda=False,
                                                 attention_impl="blockwise", attention_block_q=4,
                                                 attention_block_k=4),
    "differential v2": dict(num_layers=2, attention="differential_v2", expert_conditional_lambda=False),
    "standard attention, dense FFN": dict(num_layers=2, attention="standard", expert_conditional_lambda=False,
                                          ffn="dense"),
}


def with_trained_norm_scales(params):
  """`params` with every RMSNorm scale drawn from U(0.5, 1.5): at their initial 1 a norm that dropped its scale
  would go unnoticed."""
  rng = np.random.default_rng(7)
  rescale = lambda path, a: (jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype) if path[-1].key == "scale" else a)
  return jax.tree_util.tree_map_with_path(rescale, params)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_model_equals_a_float64_numpy_forward_pass(make_config, variant):
  """Training (top-k MoD at capacity 0.5, capacity dispatch at a factor that drops assignments, router noise
  0) and evaluation (the predictor's MoD, dropless, router noise ignored outside training)."""
  cfg = make_config(**{"moe.capacity_factor": 0.75, **VARIANTS[variant]})
  m = cfg.model
  model = model_lib.build_model(m)
  tokens = np.random.default_rng(0).integers(0, m.vocab_size, (B, T)).astype(np.int32)
  rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
  params = nn.unbox(jax.jit(lambda: model.init(rngs, jnp.asarray(tokens)))())["params"]
  params = with_trained_norm_scales(params)
  for train, mod_mode, noise in ((True, "topk", 0.0), (False, "predictor", 1.0)):
    logits, aux = jax.jit(lambda p: model.apply(
        {"params": p}, jnp.asarray(tokens), train=train, mod_mode=mod_mode, mod_capacity=0.5,
        router_noise_std=noise, rngs={"noise": jax.random.PRNGKey(2)}))(params)
    want, losses, dropped = reference_forward(m, params, tokens, train=train, mod_mode=mod_mode, mod_capacity=0.5)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=2e-5, err_msg=f"{mod_mode} logits")
    for name, value in losses.items():
      np.testing.assert_allclose(float(aux["losses"][name]), value, rtol=1e-5, atol=1e-7, err_msg=name)
    if m.ffn == "moe":
      assert (dropped > 0).any() == train, dropped  # capacity dispatch dropped in training, never at evaluation
      np.testing.assert_array_equal(np.asarray(aux["layers"]["dropped_fraction"]) > 0, dropped > 0)


def test_training_gradients_equal_central_differences_of_the_numpy_forward_pass(make_config):
  """jax.grad of the training loss (logits against a random cotangent plus weighted router losses) against
  float64 central differences of the reference: λ vectors, routers (through the gate weights, the λ mix and
  the losses), the mixture-of-depths score (through the sigmoid) and feature weights."""
  cfg = make_config(num_layers=2, **{"moe.capacity_factor": 0.75})
  m = cfg.model
  model = model_lib.build_model(m)
  tokens = np.random.default_rng(0).integers(0, m.vocab_size, (B, T)).astype(np.int32)
  rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
  params = nn.unbox(jax.jit(lambda: model.init(rngs, jnp.asarray(tokens)))())["params"]
  cotangent = np.random.default_rng(1).normal(size=(B, T, m.vocab_size))

  def loss(p):
    logits, aux = model.apply({"params": p}, jnp.asarray(tokens), train=True, mod_mode="topk", mod_capacity=0.5,
                              router_noise_std=0.0, rngs={"noise": jax.random.PRNGKey(2)})
    return jnp.sum(logits * cotangent) + 3.0 * aux["losses"]["load_balance"] + 2.0 * aux["losses"]["router_z"]

  def reference_loss(p):
    logits, losses, _ = reference_forward(m, p, tokens, train=True, mod_mode="topk", mod_capacity=0.5)
    return np.sum(logits * cotangent) + 3.0 * losses["load_balance"] + 2.0 * losses["router_z"]

  grads = jax.jit(jax.grad(loss))(params)
  params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for *path, index in (("layer_0", "block", "attention", "lambda_q1", (0, 1, 3)),
                       ("layer_1", "block", "moe", "router", (0, 7, 3)),
                       ("layer_1", "mod_router", "score", (0, 4)),
                       ("layer_0", "block", "attention", "wq", (0, 3, 1, 17))):
    at = lambda tree: functools.reduce(lambda node, key: node[key], ["groups", *path], tree)
    sides = []
    for step in (1e-5, -1e-5):
      moved = jax.tree.map(np.copy, params64)
      at(moved)[index] += step
      sides.append(reference_loss(moved))
    np.testing.assert_allclose(float(at(grads)[index]), (sides[0] - sides[1]) / 2e-5, rtol=1e-4, atol=1e-5,
                               err_msg="/".join(path))
