"""Top-k gating, auxiliary router losses and mixture-of-depths selection against float64 NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax.ops import routing


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def reference_top_k(logits, k):
  """Float64: experts by descending logit, weights = softmax over the selected logits."""
  logits = np.asarray(logits, np.float64)
  experts = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
  return _softmax(np.take_along_axis(logits, experts, axis=-1)), experts


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_gating_matches_reference(k):
  logits = np.random.default_rng(k).normal(size=(3, 5, 6)).astype(np.float32)
  weights, experts = routing.top_k_gating(jnp.asarray(logits), k)
  ref_weights, ref_experts = reference_top_k(logits, k)
  assert experts.dtype == jnp.int32 and weights.dtype == jnp.float32
  np.testing.assert_array_equal(experts, ref_experts)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)


def test_top_k_gating_ties_go_to_the_lower_expert():
  weights, experts = routing.top_k_gating(jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), 2)
  np.testing.assert_array_equal(experts, [[1, 2], [0, 1]])
  np.testing.assert_allclose(weights, np.full((2, 2), 0.5))
  with pytest.raises(ValueError, match="k=5"):
    routing.top_k_gating(jnp.zeros((3, 4)), 5)


def test_a_masked_expert_is_chosen_last_with_weight_zero():
  """A −inf logit masks its expert: the k argmax passes chose expert 0 again once only −inf was left, and
  the noise's spread (a std over experts) was NaN, so every weight was."""
  logits = np.array([[0.5, -np.inf, -np.inf, 1.0], [-np.inf, -np.inf, 2.0, -np.inf]], np.float32)
  weights, experts = routing.top_k_gating(jnp.asarray(logits), 4)
  ref_weights, ref_experts = reference_top_k(logits, 4)
  np.testing.assert_array_equal(experts, ref_experts)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)
  noisy_weights, noisy_experts = routing.top_k_gating(jnp.asarray(logits), 3, noise_std=0.5,
                                                      rng=jax.random.PRNGKey(0))
  assert np.isfinite(noisy_weights).all()
  np.testing.assert_array_equal(np.sort(noisy_experts[1, 1:]), [0, 1])  # the masked ones, after expert 2
  np.testing.assert_array_equal(noisy_weights[1], [1.0, 0.0, 0.0])
  # The finite logits get noise of the spread of the finite ones alone (a spread over every logit, NaN with a
  # −inf among them and then read as 0, left such rows without noise).
  rng = jax.random.PRNGKey(0)
  finite = np.where(np.isfinite(logits), logits, np.nan)
  noisy_logits = logits + 0.5 * np.nanstd(finite, axis=-1, keepdims=True) * np.asarray(
      jax.random.normal(rng, logits.shape, jnp.float32))
  ref_weights, ref_experts = reference_top_k(noisy_logits, 3)
  noisy_weights, noisy_experts = routing.top_k_gating(jnp.asarray(logits), 3, noise_std=0.5, rng=rng)
  np.testing.assert_array_equal(noisy_experts, ref_experts)
  np.testing.assert_allclose(noisy_weights, ref_weights, rtol=1e-5, atol=1e-6)


def test_top_k_gating_casts_to_fp32():
  logits = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
  w16, e16 = routing.top_k_gating(jnp.asarray(logits, jnp.bfloat16), 2)
  ref_weights, ref_experts = reference_top_k(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64), 2)
  assert w16.dtype == jnp.float32
  np.testing.assert_array_equal(e16, ref_experts)
  np.testing.assert_allclose(w16, ref_weights, rtol=1e-6)


def test_noise_changes_selection_only_when_positive_and_is_reproducible():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(64, 8)), jnp.float32)
  rng, other = jax.random.split(jax.random.PRNGKey(0))
  clean = routing.top_k_gating(logits, 2)
  zero = routing.top_k_gating(logits, 2, noise_std=0.0, rng=rng)
  for a, b in zip(clean, zero):
    np.testing.assert_array_equal(a, b)

  noisy = routing.top_k_gating(logits, 2, noise_std=3.0, rng=rng)
  assert (np.asarray(noisy[1]) != np.asarray(clean[1])).any()
  for a, b in zip(noisy, routing.top_k_gating(logits, 2, noise_std=3.0, rng=rng)):
    np.testing.assert_array_equal(a, b)
  other_noise = routing.top_k_gating(logits, 2, noise_std=3.0, rng=other)
  assert (np.asarray(other_noise[1]) != np.asarray(noisy[1])).any()

  # Selection and weights both come from the noisy logits: normal(rng) · noise_std · the token's logit std.
  spread = np.asarray(logits).std(axis=-1, keepdims=True)
  noisy_logits = np.asarray(logits) + 3.0 * spread * np.asarray(jax.random.normal(rng, logits.shape, jnp.float32))
  ref_weights, ref_experts = reference_top_k(noisy_logits, 2)
  np.testing.assert_array_equal(noisy[1], ref_experts)
  np.testing.assert_allclose(noisy[0], ref_weights, rtol=1e-5, atol=1e-6)


def test_the_noise_scale_carries_no_gradient():
  """The gradient through noisy top-k is that of the selected softmax with the noise a constant: the noise's
  scale (noise_std times the token's logit spread) passes none back (with it, 16% of the gradient's norm at
  noise_std 0.5 went to every expert of the token, the unselected ones too)."""
  logits = np.random.default_rng(6).normal(size=(32, 8)).astype(np.float32)
  cotangent = np.random.default_rng(7).normal(size=(32, 2)).astype(np.float32)
  rng = jax.random.PRNGKey(8)
  grad = jax.grad(lambda l: jnp.sum(routing.top_k_gating(l, 2, noise_std=0.5, rng=rng)[0] * cotangent))(
      jnp.asarray(logits))
  noisy = logits + 0.5 * logits.std(axis=-1, keepdims=True) * np.asarray(jax.random.normal(rng, logits.shape))
  _, experts = reference_top_k(noisy, 2)
  # d/dlogits of sum(c · softmax(selected noisy logits)), in float64: the softmax's Jacobian on the selected.
  weights = _softmax(np.take_along_axis(noisy.astype(np.float64), experts, axis=-1))
  d_selected = weights * (cotangent - np.sum(weights * cotangent, axis=-1, keepdims=True))
  want = np.zeros(logits.shape)
  np.put_along_axis(want, experts, d_selected, axis=-1)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def test_noise_is_relative_to_the_logit_spread():
  """Scaling a router's logits (a fresh router vs a trained one) keeps the noisy choice the same."""
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(256, 6)), jnp.float32)
  rng = jax.random.PRNGKey(5)
  for scale in (0.05, 20.0):
    small = routing.top_k_gating(logits * scale, 2, noise_std=0.5, rng=rng)[1]
    np.testing.assert_array_equal(small, routing.top_k_gating(logits, 2, noise_std=0.5, rng=rng)[1])
  # ... and the noise at 0.5 explores without making routing random: most top-1 choices survive.
  agree = np.mean(np.asarray(routing.top_k_gating(logits, 2, noise_std=0.5, rng=rng)[1][:, 0])
                  == np.asarray(routing.top_k_gating(logits, 2)[1][:, 0]))
  assert 0.5 < agree < 0.95, agree


def test_noise_without_rng_is_an_error():
  with pytest.raises(ValueError, match="rng"):
    routing.top_k_gating(jnp.zeros((2, 4)), 2, noise_std=0.5)


def test_traced_noise_std_under_jit():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(64, 8)), jnp.float32)
  rng = jax.random.PRNGKey(3)
  traces = []

  @jax.jit
  def gate(std):
    traces.append(None)
    return routing.top_k_gating(logits, 2, noise_std=std, rng=rng)

  clean = routing.top_k_gating(logits, 2)
  at_zero = gate(jnp.float32(0.0))
  at_three = gate(jnp.float32(3.0))
  assert len(traces) == 1
  np.testing.assert_array_equal(at_zero[1], clean[1])
  np.testing.assert_allclose(at_zero[0], clean[0], rtol=1e-6)
  np.testing.assert_array_equal(at_three[1], routing.top_k_gating(logits, 2, noise_std=3.0, rng=rng)[1])
  assert (np.asarray(at_three[1]) != np.asarray(clean[1])).any()


def test_router_probs_is_fp32_softmax():
  logits = np.random.default_rng(4).normal(size=(2, 3, 5))
  probs = routing.router_probs(jnp.asarray(logits, jnp.bfloat16))
  assert probs.dtype == jnp.float32
  rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)
  np.testing.assert_allclose(probs, _softmax(rounded), rtol=1e-6)


def reference_load_balance(logits, experts, num_experts, mask=None):
  logits = np.asarray(logits, np.float64).reshape(-1, num_experts)
  experts = np.asarray(experts).reshape(logits.shape[0], -1)
  mask = np.ones(logits.shape[0], bool) if mask is None else np.asarray(mask).reshape(-1)
  counts = np.zeros(num_experts)
  for token in np.flatnonzero(mask):
    for e in experts[token]:
      counts[e] += 1
  f = counts / counts.sum()
  p = _softmax(logits)[mask].mean(axis=0)
  return num_experts * np.sum(f * p), f


def test_load_balance_loss_is_one_under_uniform_routing():
  num_experts, k, tokens = 4, 2, 8
  # Token t picks experts t and t + 1 (mod 4): every expert gets 4 of the 16 assignments.
  experts = np.stack([(np.arange(tokens) + j) % num_experts for j in range(k)], axis=-1)
  uniform = jnp.zeros((tokens, num_experts))
  assert float(routing.load_balance_loss(uniform, jnp.asarray(experts), num_experts)) == pytest.approx(1.0)
  np.testing.assert_allclose(routing.expert_load(jnp.asarray(experts), num_experts), np.full(4, 0.25))
  # With f uniform, any router probabilities give Σ f·P = 1/E.
  skewed = jnp.asarray(np.random.default_rng(5).normal(size=(tokens, num_experts)), jnp.float32)
  loss = routing.load_balance_loss(skewed, jnp.asarray(experts), num_experts)
  assert float(loss) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_load_balance_loss_matches_reference(with_mask):
  rng = np.random.default_rng(6)
  num_experts, k = 6, 2
  logits = rng.normal(size=(3, 7, num_experts)).astype(np.float32)
  _, experts = routing.top_k_gating(jnp.asarray(logits), k)
  mask = rng.random((3, 7)) < 0.7 if with_mask else None
  ref_loss, ref_f = reference_load_balance(logits, experts, num_experts, mask)
  jmask = None if mask is None else jnp.asarray(mask)
  loss = routing.load_balance_loss(jnp.asarray(logits), experts, num_experts, jmask)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(routing.expert_load(experts, num_experts, jmask), ref_f, rtol=1e-6, atol=1e-7)
  grad = jax.grad(routing.load_balance_loss)(jnp.asarray(logits), experts, num_experts, jmask)
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0


@pytest.mark.parametrize("with_mask", [False, True])
def test_router_z_loss_matches_reference(with_mask):
  rng = np.random.default_rng(7)
  logits = 3.0 * rng.normal(size=(2, 9, 5))
  mask = rng.random((2, 9)) < 0.6 if with_mask else np.ones((2, 9), bool)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  loss = routing.router_z_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(mask) if with_mask else None)
  np.testing.assert_allclose(loss, np.mean(lse[mask] ** 2), rtol=1e-5)


def test_mod_capacity_tokens():
  assert routing.mod_capacity_tokens(0.125, 512) == 64
  assert routing.mod_capacity_tokens(0.3, 10) == 3  # 0.3 · 10 is 3.0000000000000004 in floating point
  assert routing.mod_capacity_tokens(0.5, 7) == 4
  assert routing.mod_capacity_tokens(1e-4, 10) == 1
  assert routing.mod_capacity_tokens(1.0, 7) == 7
  assert isinstance(routing.mod_capacity_tokens(0.25, 16), int)


def test_mod_select_sorted_top_k():
  rng = np.random.default_rng(8)
  scores = rng.normal(size=(4, 16)).astype(np.float32)
  k = routing.mod_capacity_tokens(0.25, 16)
  indices = np.asarray(jax.jit(routing.mod_select, static_argnums=1)(jnp.asarray(scores), k))
  assert indices.shape == (4, k) and indices.dtype == np.int32
  assert (np.diff(indices, axis=1) > 0).all()
  for row, chosen in zip(scores, indices):
    assert set(chosen) == set(np.argsort(-row)[:k])
  mask = np.asarray(routing.selected_slots(jnp.asarray(indices), 16) < k)
  expected = np.zeros((4, 16), bool)
  np.put_along_axis(expected, indices, True, axis=1)
  np.testing.assert_array_equal(mask, expected)
  slots = np.asarray(routing.selected_slots(jnp.asarray(indices), 16))  # each position's place, k if none
  expected_slots = np.full((4, 16), k)
  for b in range(4):
    expected_slots[b, indices[b]] = np.arange(k)
  np.testing.assert_array_equal(slots, expected_slots)


def test_mod_select_ties_go_to_the_earlier_position():
  # Row 0: four tokens tie for the top score, two are chosen; row 1: all equal (a fresh router's scores).
  scores = np.array([[0.0, 2.0, 1.0, 2.0, 2.0, 3.0, 2.0, 0.0], np.full(8, 0.5)], np.float32)
  np.testing.assert_array_equal(routing.mod_select(jnp.asarray(scores), 3), [[1, 3, 5], [0, 1, 2]])
  # At a length past the one up to which XLA:CPU's unstable sort happens to keep the order too.
  np.testing.assert_array_equal(routing.mod_select(jnp.full((2, 64), 0.5), 16), np.tile(np.arange(16), (2, 1)))


@pytest.mark.parametrize("trailing", [(5,), (2, 3)])
def test_gather_scatter_round_trip(trailing):
  rng = np.random.default_rng(9)
  b, t, k = 3, 10, 4
  x = rng.normal(size=(b, t) + trailing).astype(np.float32)
  indices = np.sort(np.stack([rng.permutation(t)[:k] for _ in range(b)]), axis=1).astype(np.int32)
  gathered = routing.take_rows(jnp.asarray(x), jnp.asarray(indices))
  np.testing.assert_array_equal(gathered, np.stack([x[i, indices[i]] for i in range(b)]))
  np.testing.assert_array_equal(routing.scatter_tokens(jnp.asarray(x), gathered, jnp.asarray(indices)), x)

  updates = rng.normal(size=(b, k) + trailing).astype(np.float32)
  out = np.asarray(routing.scatter_tokens(jnp.asarray(x), jnp.asarray(updates), jnp.asarray(indices)))
  expected = x.copy()
  for i in range(b):
    expected[i, indices[i]] = updates[i]
  np.testing.assert_array_equal(out, expected)


def test_scatter_tokens_gradients():
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
  updates = jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
  indices = jnp.asarray([[1, 4], [0, 5]], jnp.int32)
  def loss(x_, u):
    return jnp.sum(routing.scatter_tokens(x_, u, indices) * cot)

  dx, du = jax.grad(loss, argnums=(0, 1))(x, updates)
  selected = np.asarray(routing.selected_slots(indices, 6) < 2)[..., None]
  np.testing.assert_allclose(dx, np.where(selected, 0.0, cot))
  np.testing.assert_allclose(du, routing.take_rows(cot, indices))


def test_batch_sharded_routing_needs_no_all_gather():
  # lax.top_k and index-array scatters would make XLA all-gather a batch-sharded operand.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(11)
  logits, scores, x = (rng.normal(size=s).astype(np.float32) for s in [(8, 6, 5), (8, 12), (8, 12, 3)])

  def route(logits, scores, x):
    weights, experts = routing.top_k_gating(logits, 2)
    indices = routing.mod_select(scores, 4)
    updated = routing.scatter_tokens(x, 2.0 * routing.take_rows(x, indices), indices)
    return weights, experts, updated, routing.selected_slots(indices, 12) < 4

  args = [jax.device_put(a, shard) for a in (logits, scores, x)]
  compiled = jax.jit(route).lower(*args).compile()
  assert "all-gather" not in compiled.as_text()
  for sharded, single in zip(compiled(*args), route(logits, scores, x)):
    np.testing.assert_array_equal(sharded, single)


@pytest.mark.parametrize("capacity", [0.0, -0.5, 1.5])
def test_mod_capacity_outside_its_range_is_an_error_not_clamped(capacity):
  with pytest.raises(ValueError, match=rf"mod capacity {capacity} must lie in \(0, 1\]"):
    routing.mod_capacity_tokens(capacity, 16)


def test_mod_select_more_tokens_than_the_sequence_is_an_error():
  with pytest.raises(ValueError, match=r"mod_select: num_selected=6 must be between 0 and the sequence length 4"):
    routing.mod_select(jnp.zeros((1, 4)), 6)


@pytest.mark.parametrize("call, message", [
    (lambda: routing.top_k_gating(jnp.arange(8).reshape(2, 4), 2),
     r"top_k_gating: logits must be a floating-point array \[..., E\]; got int32 \(2, 4\)"),
    (lambda: routing.top_k_gating(jnp.zeros(()), 1), r"top_k_gating: logits must be .* got float32 \(\)"),
    (lambda: routing.top_k_gating(jnp.zeros((2, 4)), 2.0), r"top_k_gating: k=2\.0 must be an integer"),
    (lambda: routing.router_probs(jnp.ones((2, 4), bool)), r"router_probs: logits must be a floating-point"),
    # Two tokens of logits with three tokens of experts: f and P would be averaged over different tokens.
    (lambda: routing.load_balance_loss(jnp.zeros((2, 4)), jnp.zeros((3, 1), jnp.int32), 4),
     r"load_balance_loss: experts must be an integer array \(2, 'k'\); got int32 \(3, 1\)"),
    (lambda: routing.load_balance_loss(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32), 5),
     r"load_balance_loss: logits \(2, 4\) must have num_experts=5 entries"),
    (lambda: routing.load_balance_loss(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32), 4, jnp.ones(3, bool)),
     r"load_balance_loss: mask must be shaped like the tokens \(2,\); got \(3,\)"),
    (lambda: routing.expert_load(jnp.zeros((2, 1)), 4), r"expert_load: experts must be an integer array"),
    (lambda: routing.expert_load(jnp.zeros((2, 1), jnp.int32), 0), r"expert_load: num_experts=0 must be at least 1"),
    (lambda: routing.router_z_loss(jnp.zeros((2, 3, 4)), jnp.ones((3, 2), bool)),
     r"router_z_loss: mask must be shaped like the tokens \(2, 3\); got \(3, 2\)"),
    (lambda: routing.router_z_loss(jnp.arange(4)), r"router_z_loss: logits must be a floating-point"),
    (lambda: routing.mod_select(jnp.zeros((4,)), 1), r"mod_select: scores must be \[B, T\]"),
])
def test_bad_router_arguments_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_top_k_gating_at_one_expert_and_at_k_equal_to_e():
  logits = np.random.default_rng(12).normal(size=(2, 3, 5)).astype(np.float32)
  weights, experts = routing.top_k_gating(jnp.asarray(logits[..., :1]), 1)
  np.testing.assert_array_equal(experts, np.zeros((2, 3, 1)))
  np.testing.assert_array_equal(weights, np.ones((2, 3, 1)))
  weights, experts = routing.top_k_gating(jnp.asarray(logits), 5)  # every expert, by descending logit
  ref_weights, ref_experts = reference_top_k(logits, 5)
  np.testing.assert_array_equal(experts, ref_experts)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), np.argsort(ref_experts, -1), -1),
                             _softmax(logits.astype(np.float64)), rtol=1e-6, atol=1e-7)


def test_router_losses_at_their_edges():
  rng = np.random.default_rng(14)
  logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
  # k = E: every token picks every expert, f is uniform and E · Σ_e f_e · P_e = Σ_e P_e = 1 for any P.
  all_experts = np.broadcast_to(np.arange(5), (3, 4, 5)).astype(np.int32)
  assert float(routing.load_balance_loss(jnp.asarray(logits), jnp.asarray(all_experts), 5)) == pytest.approx(1.0)
  # One expert: f = P = 1, so the loss is 1, and logsumexp over one logit is the logit itself.
  one = jnp.asarray(logits[..., :1])
  assert float(routing.load_balance_loss(one, jnp.zeros((3, 4, 1), jnp.int32), 1)) == pytest.approx(1.0)
  np.testing.assert_allclose(routing.router_z_loss(one), np.mean(logits[..., 0].astype(np.float64) ** 2), rtol=1e-6)
  # Every token routed to one expert (k = 1): f is one-hot and the loss is E · P_0.
  to_first = jnp.zeros((3, 4, 1), jnp.int32)
  np.testing.assert_allclose(routing.load_balance_loss(jnp.asarray(logits), to_first, 5),
                             5 * _softmax(logits.astype(np.float64))[..., 0].mean(), rtol=1e-6)
  # No real token at all: zeros, not NaN (0/0), so a fully padded batch adds nothing to the loss.
  nothing = jnp.zeros((3, 4), bool)
  assert float(routing.load_balance_loss(jnp.asarray(logits), to_first, 5, nothing)) == 0.0
  assert float(routing.router_z_loss(jnp.asarray(logits), nothing)) == 0.0


def test_mod_select_zero_one_and_all_tokens():
  scores = np.array([[0.5, 2.0, -1.0, 2.0, 0.1], [3.0, 1.0, 1.0, 0.0, 4.0]], np.float32)
  x = np.random.default_rng(15).normal(size=(2, 5, 3)).astype(np.float32)
  none = routing.mod_select(jnp.asarray(scores), 0)
  assert none.shape == (2, 0)
  np.testing.assert_array_equal(routing.scatter_tokens(jnp.asarray(x), jnp.zeros((2, 0, 3)), none), x)
  np.testing.assert_array_equal(routing.selected_slots(none, 5), 0)  # K = 0: no position selected
  # One token: the best score, the earlier of a tie.
  np.testing.assert_array_equal(routing.mod_select(jnp.asarray(scores), 1), [[1], [4]])
  # All T: every position in order, whatever the scores.
  np.testing.assert_array_equal(routing.mod_select(jnp.asarray(scores), 5), np.broadcast_to(np.arange(5), (2, 5)))
  assert routing.mod_capacity_tokens(1e-9, 5) == 1 and routing.mod_capacity_tokens(1.0, 1) == 1
