"""MoE dispatch/combine (capacity and dropless) against a per-token float64 loop over experts."""
import functools
import math
from fractions import Fraction
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax.ops import dispatch, routing

B, T, D, F, E, K = 2, 12, 8, 16, 4, 2
IMPLS = [("capacity", "padded", 100.0), ("dropless", "padded", 1.25), ("dropless", "ragged", 1.25)]


def np_gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def make_inputs(seed, activation, expert_probs=None):
  """Random x, gate weights, distinct experts per token (drawn with `expert_probs`), and parameters."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  weights = rng.uniform(0.1, 1.0, size=(B, T, K)).astype(np.float32)
  experts = np.stack([rng.choice(E, size=K, replace=False, p=expert_probs) for _ in range(B * T)])
  params = {"w_in": rng.normal(size=(E, D, F)) / np.sqrt(D), "w_out": rng.normal(size=(E, F, D)) / np.sqrt(F)}
  if activation == "swiglu":
    params["w_gate"] = rng.normal(size=(E, D, F)) / np.sqrt(D)
  params = {name: p.astype(np.float32) for name, p in params.items()}
  return x, weights, experts.reshape(B, T, K).astype(np.int32), params


def slots(t, k, e, capacity_factor):
  """ceil(capacity_factor · T · k / E) in exact rational arithmetic, at least 1 and at most T."""
  return min(t, max(1, math.ceil(Fraction(str(capacity_factor)) * t * k / e)))


def expected_kept(experts, capacity, token_mask=None, num_experts=E):
  """Per sequence, a running count per expert in token order: an assignment is kept while below C.

  Masked-out tokens (token_mask False) take no slot and are never kept.
  """
  kept = np.zeros(experts.shape, bool)
  for b in range(experts.shape[0]):
    count = np.zeros(num_experts, int)
    for t in range(experts.shape[1]):
      if token_mask is not None and not token_mask[b, t]:
        continue
      for j in range(experts.shape[2]):
        e = experts[b, t, j]
        kept[b, t, j] = count[e] < capacity
        count[e] += 1
  return kept


def reference_moe(x, weights, experts, params, activation, kept=None):
  """y_t = Σ_j kept · w[t, j] · FFN_{e[t, j]}(x_t), one token and one expert at a time, in float64."""
  p = {name: np.asarray(v, np.float64) for name, v in params.items()}
  kept = np.ones(experts.shape, bool) if kept is None else kept
  y = np.zeros(x.shape)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      xt = np.asarray(x[b, t], np.float64)
      for j in range(experts.shape[2]):
        if not kept[b, t, j]:
          continue
        e = experts[b, t, j]
        h = xt @ p["w_in"][e]
        h = np_gelu(h) if activation == "gelu" else np_silu(xt @ p["w_gate"][e]) * h
        y[b, t] += weights[b, t, j] * (h @ p["w_out"][e])
  return y


def naive_jnp(x, weights, w_in, w_out, w_gate, *, experts, activation, kept):
  """The same formula densely in jnp (every expert on every token), for reference gradients."""
  h = jnp.einsum("btd,edf->btef", x, w_in)
  if activation == "gelu":
    h = 0.5 * h * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  else:
    h = jax.nn.silu(jnp.einsum("btd,edf->btef", x, w_gate)) * h
  out = jnp.einsum("btef,efd->bted", h, w_out)
  chosen = jnp.take_along_axis(out, jnp.asarray(experts)[..., None], axis=2)  # [B, T, K, D]
  return jnp.sum((weights * kept)[..., None] * chosen, axis=2)


@functools.lru_cache(maxsize=None)
def jitted_moe(activation, mode, impl, capacity_factor):
  return jax.jit(functools.partial(dispatch.moe_ffn, activation=activation, mode=mode,
                                   capacity_factor=capacity_factor, dropless_impl=impl))


def run_moe(x, weights, experts, params, activation, mode, impl, capacity_factor):
  fn = jitted_moe(activation, mode, impl, capacity_factor)
  return fn(jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts), params["w_in"], params["w_out"],
            params.get("w_gate"))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("mode,impl,capacity_factor", IMPLS)
def test_matches_naive_loop(activation, mode, impl, capacity_factor):
  x, weights, experts, params = make_inputs(0, activation)
  y, stats = run_moe(x, weights, experts, params, activation, mode, impl, capacity_factor)
  assert y.shape == (B, T, D) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, reference_moe(x, weights, experts, params, activation), rtol=1e-5, atol=1e-5)
  assert float(stats["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_capacity_drops_later_tokens(activation):
  # Skewed routing: experts 0 and 1 overflow their C = ceil(0.5 · 12 · 2 / 4) = 3 slots.
  x, weights, experts, params = make_inputs(1, activation, expert_probs=[0.45, 0.35, 0.1, 0.1])
  capacity = dispatch.moe_capacity(T, K, E, 0.5)
  assert capacity == 3
  kept = expected_kept(experts, capacity)
  assert 0 < (~kept).sum() < kept.size
  y, stats = run_moe(x, weights, experts, params, activation, "capacity", "padded", 0.5)
  ref = reference_moe(x, weights, experts, params, activation, kept)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["dropped_fraction"], (~kept).sum() / kept.size, rtol=1e-6)
  np.testing.assert_allclose(stats["slot_fill"], kept.sum() / (E * B * capacity), rtol=1e-6)


def test_capacity_everyone_to_the_same_experts():
  x, weights, _, params = make_inputs(2, "gelu")
  experts = np.broadcast_to(np.asarray([2, 0], np.int32), (B, T, K))
  y, stats = run_moe(x, weights, experts, params, "gelu", "capacity", "padded", 0.5)
  kept = np.zeros((B, T, K), bool)
  kept[:, :3] = True  # C = 3: the first three tokens of every sequence, in both of their experts
  ref = reference_moe(x, weights, experts, params, "gelu", kept)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats["dropped_fraction"], 9 / 12, rtol=1e-6)


@pytest.mark.parametrize("mode,impl,capacity_factor", [("capacity", "padded", 0.5)] + IMPLS)
def test_masked_tokens_take_no_slot_and_contribute_nothing(mode, impl, capacity_factor):
  # Skewed routing so that, without the mask, the masked tokens would take capacity from later ones.
  x, weights, experts, params = make_inputs(12, "gelu", expert_probs=[0.45, 0.35, 0.1, 0.1])
  token_mask = np.random.default_rng(13).uniform(size=(B, T)) < 0.5
  token_mask[:, 0] = False  # the earliest token, which would win any slot it asked for
  capacity = slots(T, K, E, capacity_factor) if mode == "capacity" else T
  kept = expected_kept(experts, capacity, token_mask)
  fn = jax.jit(functools.partial(dispatch.moe_ffn, activation="gelu", mode=mode,
                                 capacity_factor=capacity_factor, dropless_impl=impl))
  y, stats = fn(jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts), params["w_in"], params["w_out"],
                token_mask=jnp.asarray(token_mask))
  ref = reference_moe(x, weights, experts, params, "gelu", kept)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(y)[~token_mask], 0.0)
  # Dropped assignments are counted among the real tokens' assignments only.
  real = np.broadcast_to(token_mask[..., None], kept.shape)
  np.testing.assert_allclose(stats["dropped_fraction"], (real & ~kept).sum() / real.sum(), rtol=1e-6)


def test_ragged_rows_past_the_last_group_are_never_read():
  """ragged_dot leaves the rows past its last group undefined (XLA:CPU happens to write zeros there, TPU need
  not): here they are NaN, and the masked tokens' assignments, which sort there, still contribute nothing."""
  ragged_dot = jax.lax.ragged_dot

  def undefined_past_the_groups(lhs, rhs, group_sizes, **kwargs):
    out = ragged_dot(lhs, rhs, group_sizes, **kwargs)
    return jnp.where((jnp.arange(out.shape[0]) < jnp.sum(group_sizes))[:, None], out, jnp.nan)

  x, weights, experts, params = make_inputs(12, "gelu")
  token_mask = np.random.default_rng(13).uniform(size=(B, T)) < 0.5
  with mock.patch.object(jax.lax, "ragged_dot", undefined_past_the_groups):
    y, _ = dispatch.moe_ffn(jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts), params["w_in"],
                            params["w_out"], activation="gelu", mode="dropless", dropless_impl="ragged",
                            token_mask=jnp.asarray(token_mask))
  np.testing.assert_array_equal(np.asarray(y)[~token_mask], 0.0)
  kept = np.broadcast_to(token_mask[..., None], experts.shape)
  np.testing.assert_allclose(y, reference_moe(x, weights, experts, params, "gelu", kept), rtol=1e-5, atol=1e-5)


def test_huge_capacity_equals_dropless():
  x, weights, experts, params = make_inputs(3, "gelu", expert_probs=[0.7, 0.1, 0.1, 0.1])
  y_capacity, stats = run_moe(x, weights, experts, params, "gelu", "capacity", "padded", 1e3)
  y_dropless, _ = run_moe(x, weights, experts, params, "gelu", "dropless", "padded", 1.25)
  np.testing.assert_allclose(y_capacity, y_dropless, rtol=1e-6, atol=1e-6)
  assert float(stats["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("mode,impl,capacity_factor", [("capacity", "padded", 0.5)] + IMPLS[1:])
def test_gradients_match_naive_jnp(activation, mode, impl, capacity_factor):
  x, weights, experts, params = make_inputs(4, activation, expert_probs=[0.45, 0.35, 0.1, 0.1])
  kept = expected_kept(experts, slots(T, K, E, capacity_factor) if mode == "capacity" else T)
  cot = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, D)), jnp.float32)
  w_gate = params.get("w_gate")
  args = (jnp.asarray(x), jnp.asarray(weights), params["w_in"], params["w_out"], w_gate)
  argnums = (0, 1, 2, 3, 4) if activation == "swiglu" else (0, 1, 2, 3)

  def moe_loss(x_, w_, w_in, w_out, w_gate_):
    y, _ = dispatch.moe_ffn(x_, w_, jnp.asarray(experts), w_in, w_out, w_gate_, activation=activation,
                            mode=mode, capacity_factor=capacity_factor, dropless_impl=impl)
    return jnp.sum(y * cot)

  def naive_loss(*a):
    return jnp.sum(naive_jnp(*a, experts=experts, activation=activation, kept=kept) * cot)

  grads = jax.jit(jax.grad(moe_loss, argnums=argnums))(*args)
  ref_grads = jax.grad(naive_loss, argnums=argnums)(*args)
  for g, ref in zip(grads, ref_grads):
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)
  if mode == "capacity":
    np.testing.assert_array_equal(np.asarray(grads[1])[~kept], 0.0)  # dropped gates get no gradient


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_ffn_per_expert_and_batched_agree(activation):
  # The CPU path (per-expert 2-D matmuls) and the accelerator path (one batched einsum per weight).
  _, _, _, params = make_inputs(8, activation)
  rows = np.random.default_rng(9).normal(size=(2, E, 3, D)).astype(np.float32)
  w_gate = params.get("w_gate")
  looped, batched = (dispatch._expert_ffn(jnp.asarray(rows), params["w_in"], params["w_out"], w_gate,
                                          activation, per_expert=per_expert) for per_expert in (True, False))
  ref = np.zeros(rows.shape)
  for e in range(E):
    h = rows[:, e].astype(np.float64) @ params["w_in"][e]
    h = np_gelu(h) if activation == "gelu" else np_silu(rows[:, e] @ w_gate[e]) * h
    ref[:, e] = h @ params["w_out"][e]
  np.testing.assert_allclose(looped, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batched, ref, rtol=1e-5, atol=1e-5)


def test_capacity_mode_keeps_batch_sharding():
  # Dispatch and combine gather within a sequence: a batch-sharded layer needs no all-gather.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(10)
  x = rng.normal(size=(8, T, D)).astype(np.float32)
  weights = rng.uniform(size=(8, T, K)).astype(np.float32)
  experts = np.stack([rng.choice(E, size=K, replace=False) for _ in range(8 * T)]).reshape(8, T, K)
  _, _, _, params = make_inputs(11, "gelu")

  def layer_and_grads(x_, w_, e_, w_in, w_out):
    def loss(x_, w_, w_in, w_out):
      y, stats = dispatch.moe_ffn(x_, w_, e_, w_in, w_out, activation="gelu", capacity_factor=0.75)
      return jnp.sum(y * y), (y, stats["dropped_fraction"])
    return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x_, w_, w_in, w_out)

  args = [jax.device_put(a, shard) for a in (x, weights, experts.astype(np.int32))]
  args += [params["w_in"], params["w_out"]]
  compiled = jax.jit(layer_and_grads).lower(*args).compile()
  assert "all-gather" not in compiled.as_text()
  sharded = compiled(*args)
  single = jax.jit(layer_and_grads)(x, weights, experts.astype(np.int32), params["w_in"], params["w_out"])
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_follows_x():
  x, weights, experts, params = make_inputs(6, "swiglu")
  bf16 = {name: jnp.asarray(p, jnp.bfloat16) for name, p in params.items()}
  y, _ = run_moe(jnp.asarray(x, jnp.bfloat16), weights, experts, bf16, "swiglu", "capacity", "padded", 1.25)
  assert y.dtype == jnp.bfloat16
  kept = expected_kept(experts, slots(T, K, E, 1.25))
  ref = reference_moe(x, weights, experts, params, "swiglu", kept)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=5e-2, atol=5e-2)


def test_moe_capacity():
  assert dispatch.moe_capacity(512, 2, 9, 1.25) == 143
  assert dispatch.moe_capacity(10, 1, 1, 1.1) == 10  # 1.1 · 10 is 11.000000000000002; capped at T anyway
  assert dispatch.moe_capacity(12, 2, 4, 1.0) == 6
  assert dispatch.moe_capacity(12, 2, 4, 100.0) == 12  # never more slots than tokens
  assert dispatch.moe_capacity(4, 1, 64, 1.0) == 1
  assert isinstance(dispatch.moe_capacity(512, 2, 9, 1.25), int)
  # Decimal factors whose binary products land just above an integer (0.3 · 10 = 3.0000000000000004) round
  # as the exact product does.
  for cf in (0.3, 0.35, 0.7, 1.1, 1.15, 1.25, 3.3):
    for t, k, e in ((7, 1, 3), (10, 2, 4), (20, 3, 9), (512, 2, 9), (8192, 2, 6)):
      assert dispatch.moe_capacity(t, k, e, cf) == slots(t, k, e, cf), (t, k, e, cf)


def test_resolve_dropless_impl():
  assert jax.default_backend() == "cpu"
  assert dispatch.resolve_dropless_impl("auto") == "padded"
  assert dispatch.resolve_dropless_impl("ragged") == "ragged"
  assert dispatch.resolve_dropless_impl("padded") == "padded"
  with pytest.raises(ValueError, match=r"dropless_impl must be 'auto', 'padded' or 'ragged', got 'fast'"):
    dispatch.resolve_dropless_impl("fast")


@pytest.mark.parametrize("backend, expected", [("gpu", "padded"), ("tpu", "ragged")])
def test_auto_dropless_impl_per_accelerator(monkeypatch, backend, expected):
  """ragged_dot measured slower than the padded form on a GPU (README, `bench moe`): auto keeps it off there."""
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: backend)
  assert dispatch.resolve_dropless_impl("auto") == expected


def test_argument_errors():
  x, weights, experts, params = make_inputs(7, "gelu")
  args = (jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts), params["w_in"], params["w_out"])
  with pytest.raises(ValueError, match=r"w_gate is required for activation='swiglu'"):
    dispatch.moe_ffn(*args, activation="swiglu")
  with pytest.raises(ValueError, match=r"activation must be one of .*, got 'relu'"):
    dispatch.moe_ffn(*args, activation="relu")
  with pytest.raises(ValueError, match=r"mode must be one of .*, got 'sparse'"):
    dispatch.moe_ffn(*args, activation="gelu", mode="sparse")
  with pytest.raises(ValueError, match=r"dropless_impl must be 'padded' or 'ragged', got 'auto'"):
    dispatch.moe_ffn(*args, activation="gelu", mode="dropless", dropless_impl="auto")


@pytest.mark.parametrize("capacity_factor", [0.0, -1.0, float("nan")])
def test_moe_capacity_factor_must_be_positive(capacity_factor):
  with pytest.raises(ValueError, match=r"capacity_factor=.* must be > 0 and finite"):
    dispatch.moe_capacity(12, 2, 4, capacity_factor)


@pytest.mark.parametrize("change", ["experts", "weights", "w_out"])
def test_misshaped_moe_arguments_are_named(change):
  x, weights, experts, params = make_inputs(0, "gelu")
  args = dict(weights=weights, experts=experts, w_out=params["w_out"])
  args[change] = args[change][:, :-1]
  with pytest.raises(ValueError, match=r"moe_ffn expects x \[B, T, d\], weights and experts \[B, T, k\]"):
    dispatch.moe_ffn(jnp.asarray(x), args["weights"], args["experts"], params["w_in"], args["w_out"],
                     activation="gelu")


# (B, T, E, k, capacity_factor or None for dropless, dropless_impl, how experts are chosen).
EDGES = {
    "one expert": (2, 6, 1, 1, 1.0, "padded", "random"),
    "one expert, half the slots": (2, 6, 1, 1, 0.5, "padded", "random"),
    "k = E": (2, 5, 3, 3, 1.0, "padded", "random"),
    "k = E ragged": (2, 5, 3, 3, None, "ragged", "random"),
    "C = T·k/E exactly": (2, 8, 4, 2, 1.0, "padded", "skewed"),
    "C = T·k/E - 1": (2, 8, 4, 2, 0.75, "padded", "skewed"),
    "k = 1, all to expert 2": (2, 8, 4, 1, 1.0, "padded", "all to 2"),
    "T = B = 1": (1, 1, 4, 2, 1.25, "padded", "random"),
    "T = B = 1 ragged": (1, 1, 4, 2, None, "ragged", "random"),
    "experts 0 and 3 idle, ragged": (2, 8, 4, 2, None, "ragged", "experts 1, 2"),
    "experts 0 and 3 idle, padded": (2, 8, 4, 2, None, "padded", "experts 1, 2"),
}


@pytest.mark.parametrize("edge", EDGES)
def test_edge_cases_match_the_loop(edge):
  b, t, e, k, capacity_factor, impl, choice = EDGES[edge]
  rng = np.random.default_rng(16)
  x = rng.normal(size=(b, t, D)).astype(np.float32)
  weights = rng.uniform(0.1, 1.0, size=(b, t, k)).astype(np.float32)
  if choice == "all to 2":
    experts = np.full((b, t, k), 2)
  elif choice == "experts 1, 2":
    experts = np.where(rng.uniform(size=(b, t, 1)) < 0.5, [1, 2], [2, 1])
  else:
    probs = [0.6] + [0.4 / (e - 1)] * (e - 1) if choice == "skewed" else None
    experts = np.stack([rng.choice(e, size=k, replace=False, p=probs) for _ in range(b * t)]).reshape(b, t, k)
  experts = experts.astype(np.int32)
  params = {"w_in": (rng.normal(size=(e, D, F)) / np.sqrt(D)).astype(np.float32),
            "w_out": (rng.normal(size=(e, F, D)) / np.sqrt(F)).astype(np.float32)}
  mode = "dropless" if capacity_factor is None else "capacity"
  capacity = t if mode == "dropless" else slots(t, k, e, capacity_factor)
  if edge.startswith("C = T·k/E"):
    assert capacity == t * k // e - (edge.endswith("- 1"))
  kept = expected_kept(experts, capacity, num_experts=e)
  y, stats = run_moe(x, weights, experts, params, "gelu", mode, impl, capacity_factor or 1.0)
  np.testing.assert_allclose(y, reference_moe(x, weights, experts, params, "gelu", kept), rtol=1e-5, atol=1e-5)
  assert float(stats["dropped_fraction"]) == pytest.approx((~kept).sum() / kept.size)
  if choice == "all to 2":  # the earliest C tokens of each sequence win expert 2's slots
    np.testing.assert_array_equal(kept[..., 0], np.broadcast_to(np.arange(t) < capacity, (b, t)))


@pytest.mark.parametrize("impl", ["padded", "ragged"])
def test_bfloat16_dropless(impl):
  x, weights, experts, params = make_inputs(17, "gelu")
  bf16 = {name: jnp.asarray(p, jnp.bfloat16) for name, p in params.items()}
  y, _ = run_moe(jnp.asarray(x, jnp.bfloat16), weights, experts, bf16, "gelu", "dropless", impl, 1.25)
  assert y.dtype == jnp.bfloat16
  rounded = {name: np.asarray(p, np.float32) for name, p in bf16.items()}
  ref = reference_moe(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), weights, experts, rounded, "gelu")
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("change, message", [
    ("x 2-D", r"moe_ffn expects x \[B, T, d\].*got x \(12, 8\)"),
    ("float experts", r"moe_ffn: experts must hold integer expert ids, got float32"),
    ("token_mask", r"moe_ffn: token_mask must be \[B, T\] = \(2, 12\), got \(2, 11\)"),
    ("capacity 0", r"moe_ffn: capacity=0 slots per expert must be at least 1"),
])
def test_bad_moe_inputs_are_named(change, message):
  x, weights, experts, params = make_inputs(0, "gelu")
  args = dict(x=jnp.asarray(x), experts=jnp.asarray(experts), token_mask=None, capacity=None)
  if change == "x 2-D":
    args["x"] = args["x"][0]
  elif change == "float experts":
    args["experts"] = args["experts"].astype(jnp.float32)
  elif change == "token_mask":
    args["token_mask"] = jnp.ones((B, T - 1), bool)
  else:
    args["capacity"] = 0
  with pytest.raises(ValueError, match=message):
    dispatch.moe_ffn(args["x"], jnp.asarray(weights), args["experts"], params["w_in"], params["w_out"],
                     activation="gelu", token_mask=args["token_mask"], capacity=args["capacity"])


@pytest.mark.parametrize("k, capacity_factor, message", [
    (5, 1.0, r"top-k k=5 must be between 1 and the number of experts 4"),
    (0, 1.0, r"top-k k=0 must be between 1"),
    (2, float("inf"), r"capacity_factor=inf must be > 0 and finite"),
])
def test_moe_capacity_refuses_k_outside_the_experts_and_infinite_factors(k, capacity_factor, message):
  with pytest.raises(ValueError, match=message):
    dispatch.moe_capacity(12, k, 4, capacity_factor)


@pytest.mark.parametrize("group", [1, K])
def test_move_rows_gradient_is_the_transposed_move(group):
  """move_rows's gradient (a gather through the inverse) against a NumPy scatter-add of the cotangent: rows
  named by no index get 0, a row's `group` sub-rows add up; out-of-range indices give zero rows."""
  rng = np.random.default_rng(3)
  rows, taken = 5, 7  # 5 rows of `group` sub-rows; 7 outputs, some naming none (the sentinel rows·group)
  index = np.full((B, taken), rows * group, np.int32)
  inverse = np.full((B, rows * group), taken, np.int32)
  for b in range(B):
    chosen = rng.choice(rows * group, size=taken - 2, replace=False)
    at = rng.choice(taken, size=taken - 2, replace=False)
    index[b, at], inverse[b, chosen] = chosen, at
  x = rng.normal(size=(B, rows, D)).astype(np.float32)
  g = rng.normal(size=(B, taken, D)).astype(np.float32)

  out, vjp = jax.vjp(lambda a: routing.move_rows(a, jnp.asarray(index), jnp.asarray(inverse), group), x)
  (dx,) = vjp(jnp.asarray(g))
  expected_out, expected_dx = np.zeros((B, taken, D)), np.zeros((B, rows, D))
  for b in range(B):
    for i in range(taken):
      if index[b, i] < rows * group:
        expected_out[b, i] = x[b, index[b, i] // group]
        expected_dx[b, index[b, i] // group] += g[b, i]
  np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dx), expected_dx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode,impl,capacity_factor", IMPLS)
def test_the_layer_gradient_moves_rows_by_gathers_alone(mode, impl, capacity_factor):
  """Dispatch and combine are transposed by gathers: no scatter-add into zero arrays of the tokens' or the
  expert rows' shape (only the routing plan's small integer permutations are scatters)."""
  x, weights, experts, params = make_inputs(0, "gelu")
  loss = lambda x_, w_, w_in, w_out: jnp.sum(dispatch.moe_ffn(
      x_, w_, jnp.asarray(experts), w_in, w_out, activation="gelu", mode=mode, dropless_impl=impl,
      capacity_factor=capacity_factor)[0] ** 2)
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, weights, params["w_in"], params["w_out"])
  scatters = [line for line in lowered.as_text(dialect="hlo").splitlines() if " scatter(" in line]
  assert scatters and all(line.split(" = ")[1].startswith("s32[") for line in scatters), scatters
