"""Every attention path against a float64 NumPy reference (forward and gradients), masks and segments,
linear memory of the blockwise path, and whole-model causality in predictor-routed MoD mode. The kernels'
lowering and launch settings are tested in test_pallas_kernels.py."""
import types
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax import config as config_lib, validation
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.ops import attention as attn

PATHS = ("explicit", "blockwise", "pallas", "pallas_tpu", "fused")  # "pallas": the GPU layout, interpreted
# The GPU layout with model.attention_gpu_backward = "one_pass", and with a launch of its own per kernel
# (model.attention_gpu_launch) whose blocks differ from BLOCK and from each other: the 37 tokens are padded
# to 64, a multiple of the largest.
GPU_VARIANTS = {"pallas_one_pass": dict(implementation="pallas", gpu_backward="one_pass"),
                "pallas_launches": dict(implementation="pallas", gpu_launches=(
                    ("dkv", (32, 16, 4, 2)), ("dq", (16, 32, 4, 2)), ("forward", (32, 16, 4, 2))))}
# The Mosaic GPU kernels (Hopper; 16-bit inputs only, so in the bf16 tests), the GPU layout forced so that
# CPU runs interpret them (`flash_attention._pallas_stage`).
MOSAIC_VARIANTS = {"pallas_mosaic": dict(implementation="pallas_gpu", gpu_forward="mosaic", gpu_backward="mosaic")}
BLOCK = 16  # small blocks, so every case spans several query and key blocks


def reference(q, k, v, w, visible, g):
  """Float64 `Σ_m w_m softmax(q_m k_mᵀ/√D) v` over the visible keys and its VJP for cotangent g.

  q `[B, T, H, M, D]`, k `[B, S, H, M, D]`, v `[B, S, H, Dv]`, w `[B, T, H, M]`, visible `[B, T, S]`.
  Returns out, (dq, dk, dv, dw), written as the textbook full-matrix chain rule.
  """
  q, k, v, w, g = (np.asarray(a, np.float64) for a in (q, k, v, w, g))
  scale = q.shape[-1] ** -0.5
  scores = np.einsum("bthmd,bshmd->bhmts", q, k) * scale
  vis = visible[:, None, None]
  scores = np.where(vis, scores, -np.inf)
  row_max = np.max(np.where(vis, scores, -1e300), axis=-1, keepdims=True)
  e = np.where(vis, np.exp(scores - row_max), 0.0)
  total = e.sum(-1, keepdims=True)
  p = e / np.where(total > 0, total, 1.0)  # a row with no visible key is all zeros
  wm = np.transpose(w, (0, 2, 3, 1))[..., None]  # [B, H, M, T, 1]
  per_map = np.einsum("bhmts,bshv->bhmtv", p, v)
  out = np.einsum("bhmtv,bhmt->bthv", per_map, wm[..., 0])
  gh = np.transpose(g, (0, 2, 1, 3))  # [B, H, T, Dv]
  dw = np.transpose(np.einsum("bhmtv,bhtv->bhmt", per_map, gh), (0, 3, 1, 2))
  dv = np.einsum("bhmts,bhtv->bshv", wm * p, gh)
  dp = wm * np.einsum("bhtv,bshv->bhts", gh, v)[:, :, None]
  ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
  dq = np.einsum("bhmts,bshmd->bthmd", ds, k) * scale
  dk = np.einsum("bhmts,bthmd->bshmd", ds, q) * scale
  return out, (dq, dk, dv, dw)


def visibility(q_pos, kv_pos, kv_mask=None, q_seg=None, kv_seg=None, causal=True):
  visible = np.asarray(kv_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]
  if not causal:
    visible = np.ones_like(visible)
  if kv_mask is not None:
    visible &= np.asarray(kv_mask)[:, None, :]
  if q_seg is not None:
    visible &= np.asarray(kv_seg)[:, None, :] == np.asarray(q_seg)[:, :, None]
  return visible


def _case(name):
  """Inputs of one scenario: differential (M = 2) unless named "standard"."""
  rng = np.random.default_rng(zlib.crc32(name.encode()))  # hash() of a str differs per process
  b, h, d = 2, 2, 4
  t = s = 37  # not a multiple of the block
  q_pos, kv_pos = np.broadcast_to(np.arange(t), (b, t)), np.broadcast_to(np.arange(s), (b, s))
  kv_mask = q_seg = kv_seg = None
  lam = rng.uniform(0.1, 0.9, (b, t, h))
  if name == "scalar_lam_kv_mask":
    # Row 0 hides its first 5 keys: queries 0..4 there see no key.
    kv_mask = rng.uniform(size=(b, s)) > 0.3
    kv_mask[0, :5] = False
    lam = np.float32(0.37)
  elif name == "per_head_lam_segments_positions":
    # Packed documents at gathered, non-contiguous positions (a mixture-of-depths subset).
    q_pos = kv_pos = np.sort(rng.choice(200, size=(b, t), replace=False), axis=1)
    q_seg = kv_seg = np.cumsum(rng.uniform(size=(b, t)) < 0.15, axis=1)
    lam = rng.uniform(0.1, 0.9, h).astype(np.float32)
  elif name == "decode":
    # One new query at position 32 over a 37-slot cache whose slots past 32 are empty: its own key is the
    # first of a key block, which only it sees (the block must not be skipped).
    t = 1
    q_pos = np.full((b, 1), 2 * BLOCK)
    kv_mask = np.broadcast_to(np.arange(s) <= 2 * BLOCK, (b, s))
    lam = rng.uniform(0.1, 0.9, (b, t, h))
  elif name == "non_causal":
    # Queries see later keys too: 37 queries over 45 keys (neither a multiple of the block), packed
    # documents, and row 0 hides every key of document 2, whose queries there see no key.
    s = 45
    q_pos, kv_pos = np.broadcast_to(np.arange(t), (b, t)), np.broadcast_to(np.arange(s), (b, s))
    q_seg, kv_seg = (np.broadcast_to(np.arange(n) * 4 // n, (b, n)) for n in (t, s))
    kv_mask = rng.uniform(size=(b, s)) > 0.2
    kv_mask[0, kv_seg[0] == 2] = False
  m = 1 if name == "standard" else 2
  width = 2 * d if m == 1 else d  # standard heads: q, k as wide as v
  q = rng.normal(size=(b, t, h, m, width)).astype(np.float32)
  k = rng.normal(size=(b, s, h, m, width)).astype(np.float32)
  v = rng.normal(size=(b, s, h, 2 * d)).astype(np.float32)
  g = rng.normal(size=(b, t, h, 2 * d)).astype(np.float32)
  masks = dict(q_positions=np.asarray(q_pos, np.int32), kv_positions=np.asarray(kv_pos, np.int32),
               kv_mask=None if kv_mask is None else np.asarray(kv_mask),
               q_segment_ids=None if q_seg is None else np.asarray(q_seg, np.int32),
               kv_segment_ids=None if kv_seg is None else np.asarray(kv_seg, np.int32))
  causal = name != "non_causal"
  if not causal:
    masks["causal"] = False
  visible = visibility(q_pos, kv_pos, kv_mask, q_seg, kv_seg, causal)
  if name == "standard":
    q_seg = kv_seg = np.broadcast_to(np.arange(t) // 10, (b, t)).astype(np.int32)
    masks.update(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    visible = visibility(q_pos, kv_pos, None, q_seg, kv_seg)
    lam = None
  return q, k, v, lam, g, masks, visible


def map_weights(lam, shape):
  """Each map's weight per (batch, query, head) for `reference`: 1 for standard attention's one map, (1, −λ)."""
  return np.ones(shape + (1,)) if lam is None else np.stack([np.ones(shape), -np.broadcast_to(lam, shape)], -1)


def lam_gradient(dw, lam):
  """λ's gradient from the map weights' gradient: λ enters with weight −λ on the second map, and a shared λ
  (scalar, or one per head) sums its rows'."""
  return {0: -dw[..., 1].sum(), 1: -dw[..., 1].sum((0, 1)), 3: -dw[..., 1]}[np.ndim(lam)]


CASES = ("scalar_lam_kv_mask", "per_head_lam_segments_positions", "per_token_lam", "decode", "standard", "non_causal")


def _run(path, q, k, v, lam, g, masks, dtype=jnp.float32):
  """Our output and gradients w.r.t. (q, k, v, lam) for cotangent g."""
  def f(q, k, v, lam):
    common = dict(implementation=path, block_q=BLOCK, block_k=BLOCK, **masks)
    common.update({**GPU_VARIANTS, **MOSAIC_VARIANTS}.get(path, {}))
    if lam is None:
      return attn.standard_attention(q[:, :, :, 0], k[:, :, :, 0], v, **common)
    return attn.differential_attention(q, k, v, lam, **common)
  args = [jnp.asarray(a, dtype) for a in (q, k, v)] + [None if lam is None else jnp.asarray(lam, jnp.float32)]
  out, vjp = jax.vjp(jax.jit(f), *args)
  return out, vjp(jnp.asarray(g, out.dtype))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", PATHS + tuple(GPU_VARIANTS))
def test_path_matches_float64_reference(path, case):
  q, k, v, lam, g, masks, visible = _case(case)
  b, t, h = q.shape[:3]
  w = map_weights(lam, (b, t, h))
  want, (dq, dk, dv, dw) = reference(q, k, v, w, visible, g)
  got, grads = _run(path, q, k, v, lam, g, masks)
  tol = dict(rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(got), want, **tol, err_msg="out")
  if lam is None:
    dq, dk = dq[:, :, :, 0], dk[:, :, :, 0]
    grads = (grads[0], grads[1], grads[2])
  for name, ours, ref in zip(("dq", "dk", "dv"), grads, (dq, dk, dv)):
    np.testing.assert_allclose(np.asarray(ours).reshape(ref.shape), ref, **tol, err_msg=name)
  if lam is not None:
    np.testing.assert_allclose(np.asarray(grads[3]), lam_gradient(dw, lam), **tol, err_msg="dlam")
  unseeing = ~visible.any(-1)  # queries with no visible key: exactly 0
  assert unseeing.any() == (case in ("scalar_lam_kv_mask", "non_causal"))
  np.testing.assert_array_equal(np.asarray(got)[unseeing], 0.0)


# bf16 on every path; non-causal on the kernels, whose non-causal block ranges the other paths do not have;
# every mask case on the Mosaic GPU kernels (λ reaches every kernel as per-row weights).
@pytest.mark.parametrize("path, case", [(path, "per_token_lam") for path in PATHS]
                         + [(path, "non_causal") for path in ("pallas", "pallas_tpu")]
                         + [("pallas_mosaic", case) for case in CASES if case != "per_token_lam"])
def test_bf16_inputs(path, case):
  q, k, v, lam, g, masks, visible = _case(case)
  b, t, h = q.shape[:3]
  round_bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
  q, k, v = round_bf16(q), round_bf16(k), round_bf16(v)
  w = map_weights(lam, (b, t, h))
  want, (dq, dk, dv, dw) = reference(q, k, v, w, visible, g)
  got, grads = _run(path, q, k, v, lam, g, masks, dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  scale = lambda ref: 0.03 * np.abs(ref).max()  # bf16 keeps 8 bits: 2⁻⁸ relative per rounding
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=scale(want))
  np.testing.assert_array_equal(np.asarray(got, np.float32)[~visible.any(-1)], 0.0)  # no visible key
  refs = {"dq": dq, "dk": dk, "dv": dv}
  if lam is not None:
    refs["dlam"] = lam_gradient(dw, lam)
  for (name, ref), ours in zip(refs.items(), grads):
    ours = np.asarray(ours, np.float32).reshape(np.shape(ref))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=scale(ref), err_msg=name)


@pytest.mark.parametrize("t, s", [(0, 40), (3, 0)])
@pytest.mark.parametrize("path", PATHS)
def test_no_queries_or_no_keys_give_an_empty_or_zero_output(path, t, s):
  """A call with no query tokens (how a skipped MoD block is traced at decode) against a long cache, and
  queries with no key at all, which see no key and so give 0 (the blockwise and Pallas paths divided by
  the zero key count)."""
  b, h, d = 1, 2, 8
  positions = jnp.zeros((b, t), jnp.int32), jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  out = attn.differential_attention(jnp.ones((b, t, h, 2, d)), jnp.ones((b, s, h, 2, d)), jnp.ones((b, s, h, 2 * d)),
                                    0.5, q_positions=positions[0], kv_positions=positions[1], implementation=path,
                                    block_q=BLOCK, block_k=BLOCK)
  assert out.shape == (b, t, h, 2 * d)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_fused_path_zeroes_rows_without_keys():
  """jax.nn.dot_product_attention gives a query with no visible key the mean of all values; the fused
  path must return 0 like every other path."""
  q, k, v, lam, _, masks, _ = _case("scalar_lam_kv_mask")
  for fn in (lambda: attn.differential_attention(q, k, v, lam, implementation="fused", **masks),
             lambda: attn.standard_attention(q[:, :, :, 0], k[:, :, :, 0], v[..., :4], implementation="fused",
                                                **masks)):
    np.testing.assert_array_equal(np.asarray(fn())[0, :5], 0.0)


def test_fused_path_uses_cudnn_only_for_head_widths_it_supports():
  """cuDNN's flash attention takes 16-bit heads of a multiple of 8, at most 256 wide from Hopper on (128
  before); other widths go to XLA (cuDNN refused bf16 heads of 4 on a GPU before this rule)."""
  gpu = lambda cc: types.SimpleNamespace(platform="gpu", compute_capability=cc)
  fused = lambda dtype, width, device: attn.fused_implementation(dtype, width, device)
  assert fused(jnp.bfloat16, 4, gpu("9.0")) == "xla"
  assert fused(jnp.bfloat16, 72, gpu("9.0")) == "cudnn"
  assert fused(jnp.float16, 144, gpu("9.0")) == "cudnn"
  assert fused(jnp.bfloat16, 144, gpu("8.0")) == "xla"
  assert fused(jnp.bfloat16, 264, gpu("9.0")) == "xla"
  assert fused(jnp.float32, 72, gpu("9.0")) == "xla"
  assert fused(jnp.bfloat16, 72, types.SimpleNamespace(platform="cpu")) == "xla"


def test_bad_implementation_and_segment_ids_raise():
  q, k, v, lam, _, masks, _ = _case("per_token_lam")
  with pytest.raises(ValueError, match="implementation must be one of"):
    attn.differential_attention(q, k, v, lam, implementation="flash")
  with pytest.raises(ValueError, match="gpu_backward must be one of"):
    attn.differential_attention(q, k, v, lam, implementation="pallas", gpu_backward="atomic")
  with pytest.raises(ValueError, match="segment ids"):
    attn.differential_attention(q[:, :1], k, v, lam[:, :1], q_segment_ids=np.zeros((2, 1), np.int32))


def _blockwise_grad_temp_bytes(t: int) -> int:
  """Compiled temp memory of the gradient through two layers of blockwise attention in a scan, as in the
  model (differentiating a scan partially evaluates what it contains)."""
  b, h, d = 1, 1, 32  # D = 32: the per-token arrays, not the fixed [block, block] scratch, are what grows
  q = jax.ShapeDtypeStruct((b, t, h, 2, d), jnp.float32)
  v = jax.ShapeDtypeStruct((b, t, h, 2 * d), jnp.float32)

  def loss(q, k, v):
    def layer(x, scale):
      out = attn.differential_attention(q * scale, k, v + x, 0.5, implementation="blockwise", block_q=128,
                                        block_k=128)
      return out, None
    return jnp.sum(jax.lax.scan(layer, jnp.zeros(v.shape), jnp.array([1.0, 0.5]))[0])

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, v).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
  small, large = _blockwise_grad_temp_bytes(2048), _blockwise_grad_temp_bytes(8192)
  assert 3.0 < large / small < 5.0, (small, large)
  assert large < 8192 * 8192 * 4 / 4  # below a quarter of one fp32 [T, T] score map (256 MiB)


@pytest.fixture(scope="module")
def predictor_model(make_config):
  """A small model whose MoD predictor selects the tokens with x·u > 0.3 (mixed, token-dependent) and
  whose experts have few slots, so a token's routing can displace a later token's assignment."""
  cfg = make_config(**{"moe.capacity_factor": 0.5, "attention_block_q": 8, "attention_block_k": 8})
  model = model_lib.build_model(cfg.model)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params = nn.unbox(model.init({"params": jax.random.PRNGKey(0)}, tokens))["params"]
  router = params["groups"]["layer_1"]["mod_router"]
  u = jax.random.normal(jax.random.PRNGKey(7), router["predictor_hidden"].shape[1:2] + (1,))
  hidden = jnp.zeros_like(router["predictor_hidden"]).at[:, :, 0].set(4.0 * u[:, 0] / jnp.linalg.norm(u))
  router.update(predictor_hidden=hidden, predictor_hidden_bias=jnp.zeros_like(router["predictor_hidden_bias"])
                .at[:, 0].set(-0.3 * 4.0), predictor_out=jnp.zeros_like(router["predictor_out"]).at[:, 0].set(1.0))
  return cfg, params


@pytest.mark.parametrize("path", PATHS + ("pallas_mosaic",))
def test_predictor_mode_is_causal_on_every_path(predictor_model, path):
  cfg, params = predictor_model
  model_cfg = cfg.model.copy_and_resolve_references()
  model_cfg.attention_impl = path
  if path == "pallas_mosaic":  # in bf16, the kernels' only dtype
    if jax.default_backend() != "gpu":
      pytest.skip("interpreted, the Mosaic GPU kernels take minutes here; launch/gpu_checks.sh runs this on a GPU")
    model_cfg.update(attention_impl="pallas", attention_gpu_forward="mosaic", attention_gpu_backward="mosaic",
                     dtype="bfloat16")
  model = model_lib.build_model(model_cfg)
  apply = jax.jit(lambda t: model.apply({"params": params}, t, mod_mode="predictor"))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 16)), jnp.int32)
  logits, aux = apply(tokens)
  fraction = np.asarray(aux["layers"]["mod_selected_fraction"])
  assert np.all((fraction > 0) & (fraction < 1)), fraction  # a mixed selection in every routed layer
  for cut in range(1, 16):
    changed = tokens.at[:, cut:].set((tokens[:, cut:] * 7 + 3) % 64)
    other, _ = apply(changed)
    np.testing.assert_allclose(np.asarray(other[:, :cut]), np.asarray(logits[:, :cut]), rtol=1e-5, atol=1e-5,
                               err_msg=f"{path}: tokens from {cut} on changed earlier logits")


@pytest.mark.parametrize("field, value, match", [("attention_impl", "flash", "attention_impl"),
                                                 ("attention_block_q", 100, "power of two"),
                                                 ("attention_gpu_backward", "atomic", "attention_gpu_backward")])
def test_bad_attention_config_raises(make_config, field, value, match):
  cfg = make_config(**{field: value})
  with pytest.raises(config_lib.ConfigError, match=match):
    validation.validate(cfg)


@pytest.mark.parametrize("path", ["explicit", "blockwise"])
def test_packed_documents_do_not_see_each_other(make_config, path):
  """Two documents packed in one row: with segment ids, editing the first leaves the second's logits as they
  were (dropless experts, so no capacity is shared either); without them, it does not."""
  cfg = make_config(attention_impl=path, attention_block_q=8, attention_block_k=8,
                    **{"moe.dispatch": "dropless", "mod.enabled": False})
  model = model_lib.build_model(cfg.model)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 16)), jnp.int32)
  variables = model.init({"params": jax.random.PRNGKey(0)}, tokens)
  segments = jnp.broadcast_to(jnp.arange(16) >= 9, (2, 16)).astype(jnp.int32)
  apply = jax.jit(lambda t, seg: model.apply(variables, t, mod_mode="off", segment_ids=seg)[0])
  edited = tokens.at[:, :9].set((tokens[:, :9] + 5) % 64)
  np.testing.assert_allclose(np.asarray(apply(edited, segments)[:, 9:]), np.asarray(apply(tokens, segments)[:, 9:]),
                             rtol=1e-5, atol=1e-5)
  one_document = jnp.zeros_like(segments)
  assert not np.allclose(np.asarray(apply(edited, one_document)[:, 9:]), np.asarray(apply(tokens, one_document)[:, 9:]))


def test_pallas_kernel_runs_per_shard_under_a_mesh():
  """On data 4 x tensor 2, the kernel runs on each device's rows and heads (shard_map: XLA cannot split a
  custom call) and equals the float64 reference; no device gathers another's queries, keys or values."""
  from jax.sharding import NamedSharding
  from diffmoe_jax import parallel
  from diffmoe_jax.nn import layers
  rng = np.random.default_rng(0)
  b, t, h, d = 8, 24, 2, 4
  q, k = (rng.normal(size=(b, t, h, 2, d)).astype(np.float32) for _ in range(2))
  v = rng.normal(size=(b, t, h, 2 * d)).astype(np.float32)
  lam = rng.uniform(0.2, 0.8, size=(b, t, h)).astype(np.float32)
  positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
  config = config_lib.defaults()
  config.mesh.shape.update(data=4, tensor=2)
  mesh, rules = parallel.make_mesh(config.mesh), parallel.axis_rules(config.mesh)
  per_head = ("batch", None, "heads", None, None)
  axes = {"q": per_head, "k": per_head, "v": per_head[:4], "lam": ("batch", None, "heads"),
          "q_positions": ("batch", None), "kv_positions": ("batch", None)}

  def attention(**arrays):
    return attn.differential_attention(**arrays, implementation="pallas", block_q=8, block_k=8)

  def sharded(q, k, v, lam, positions):
    arrays = dict(q=q, k=k, v=v, lam=lam, q_positions=positions, kv_positions=positions)
    return layers.per_shard(attention, arrays, axes, per_head[:4])

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    placed = [jax.device_put(a, NamedSharding(mesh, nn.logical_to_mesh_axes(ax)))
              for a, ax in ((q, per_head), (k, per_head), (v, per_head[:4]), (lam, axes["lam"]),
                            (positions, axes["q_positions"]))]
    fn = jax.jit(sharded)
    out = fn(*placed)
    hlo = fn.lower(*placed).compile().as_text()
  w = map_weights(lam, lam.shape)
  want, _ = reference(q, k, v, w, visibility(positions, positions), np.zeros_like(v))
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)
  assert parallel.collective_bytes(hlo, "all-gather") == 0
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, nn.logical_to_mesh_axes(per_head[:4], rules)), 4)


def test_model_with_the_pallas_kernel_on_a_mesh_equals_one_device(predictor_model):
  """The whole model (predictor-routed MoD, so kv masks reach the kernel) on data 4 x tensor 2 with the
  Pallas kernel run per shard gives the explicit path's logits on one device, and no device gathers
  another's activations (left to XLA, the kernel's inputs were all-gathered)."""
  from diffmoe_jax import parallel
  cfg, params = predictor_model
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (8, 16)), jnp.int32)
  logits = {}
  for path in ("explicit", "pallas"):
    model_cfg = cfg.model.copy_and_resolve_references()
    model_cfg.attention_impl = path
    model = model_lib.build_model(model_cfg)
    apply = jax.jit(lambda t, model=model: model.apply({"params": params}, t, mod_mode="predictor")[0])
    if path == "explicit":
      logits[path] = apply(tokens)
      continue
    mesh_config = cfg.copy_and_resolve_references().mesh
    mesh_config.shape.update(data=4, tensor=2)
    with jax.set_mesh(parallel.make_mesh(mesh_config)), nn.logical_axis_rules(parallel.axis_rules(mesh_config)):
      logits[path] = apply(tokens)
      assert parallel.collective_bytes(apply.lower(tokens).compile().as_text(), "all-gather") == 0
  np.testing.assert_allclose(np.asarray(logits["pallas"]), np.asarray(logits["explicit"]), rtol=1e-5, atol=1e-5)


def test_benchmark_baselines_compute_what_they_stand_for():
  """`bench attention`'s baselines: the official layout's four flash calls are differential attention
  (float64 reference); standard_flash is softmax attention over the maps' queries and keys concatenated."""
  from diffmoe_jax.bench_attention import _flash_baseline
  q, k, v, lam, g, masks, visible = _case("per_token_lam")
  b, t, h = q.shape[:3]
  want, _ = reference(q, k, v, map_weights(lam, (b, t, h)), visible, g)
  got = _flash_baseline("four_flash_calls", *(jnp.asarray(a) for a in (q, k, v, lam)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)
  wide = lambda x: x.reshape(x.shape[:3] + (1, -1))
  want, _ = reference(wide(q), wide(k), v, map_weights(None, (b, t, h)), visible, g)
  got = _flash_baseline("standard_flash", *(jnp.asarray(a) for a in (q, k, v, lam)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


def test_tpu_block_bounds_are_conservative_and_exact_on_the_diagonal():
  """The TPU kernels skip the (query block, key block) pairs `block_bounds` rules out: never one with a
  visible pair (a brute-force check over every pair), and with sorted positions all the others; the
  fetch schedule's last live key block / first live query block agree with the pairs. Without causality
  the live pairs are exactly those whose key block has a valid key (row 0 hides key block 1 whole)."""
  from diffmoe_jax.ops.flash_attention import block_bounds, live_pairs
  rng = np.random.default_rng(3)
  b, t, block = 2, 64, 16
  sorted_pos = np.broadcast_to(np.arange(t), (b, t))
  scattered = np.sort(rng.choice(300, size=(b, t), replace=False), axis=1)[:, rng.permutation(t)]
  for positions, causal, exact in ((sorted_pos, True, True), (scattered, True, False), (sorted_pos, False, True)):
    kv_valid = rng.uniform(size=(b, t)) < 0.8
    kv_valid[0, block:2 * block] = False
    masks = [jnp.asarray(a, jnp.int32) for a in (positions, np.zeros((b, t)), positions, np.zeros((b, t)), kv_valid)]
    visible = visibility(positions, positions, kv_valid, causal=causal)  # [B, T, S]
    truth = visible.reshape(b, t // block, block, t // block, block).any(axis=(2, 4))
    latest, earliest, last_key, first_query = block_bounds(masks, block, block, causal=causal)
    live = np.asarray(live_pairs(latest, earliest))
    assert np.all(live[truth])
    if exact:
      np.testing.assert_array_equal(live, truth)
    for row in range(b):
      for i in range(t // block):
        if live[row, i].any():
          assert last_key[row, i] == np.flatnonzero(live[row, i]).max()
      for j in range(t // block):
        if live[row, :, j].any():
          assert first_query[row, j] == np.flatnonzero(live[row, :, j]).min()


@pytest.mark.parametrize("causal, t, s, all_valid", [(True, 260, 260, False), (True, 260, 260, True),
                                                     (False, 20, 300, False)])
def test_tpu_kernels_pad_blocks_mosaic_cannot_tile(causal, t, s, all_valid):
  """Asked for 8-query and 32-key blocks, the TPU kernels use 16 and 128 (padding the sequences): 260
  tokens are 17 query blocks by 3 key blocks, accumulated across the key grid axis, against the float64
  reference (forward and gradients) with a kv mask and per-token λ. Non-causal, 20 queries see all 300
  keys but those of the middle key block, which the kv mask hides whole (a block pair that is skipped
  between live ones). With every key valid, the pairs below the diagonal run without the mask."""
  rng = np.random.default_rng(11)
  b, h, d = 1, 2, 4
  q, g = (rng.normal(size=(b, t, h) + shape).astype(np.float32) for shape in ((2, d), (2 * d,)))
  k, v = (rng.normal(size=(b, s, h) + shape).astype(np.float32) for shape in ((2, d), (2 * d,)))
  lam = rng.uniform(0.1, 0.9, (b, t, h)).astype(np.float32)
  q_pos, kv_pos = (np.broadcast_to(np.arange(n), (b, n)).astype(np.int32) for n in (t, s))
  kv_mask = rng.uniform(size=(b, s)) < (1.0 if all_valid else 0.9)
  if not causal:
    kv_mask[:, 128:256] = False
  want, (dq, dk, dv, dw) = reference(q, k, v, map_weights(lam, lam.shape),
                                     visibility(q_pos, kv_pos, kv_mask, causal=causal), g)
  def f(q, k, v, lam):
    return attn.differential_attention(q, k, v, lam, causal=causal, q_positions=q_pos, kv_positions=kv_pos,
                                       kv_mask=kv_mask, implementation="pallas_tpu", block_q=8, block_k=32)
  out, vjp = jax.vjp(jax.jit(f), *(jnp.asarray(a) for a in (q, k, v, lam)))
  tol = dict(rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(out), want, **tol)
  for name, ours, ref in zip(("dq", "dk", "dv", "dlam"), vjp(jnp.asarray(g)), (dq, dk, dv, -dw[..., 1])):
    np.testing.assert_allclose(np.asarray(ours), ref, **tol, err_msg=name)


@pytest.mark.parametrize("gpu_backward", ["two_pass", "one_pass"])
def test_gpu_kernels_split_head_widths_into_power_of_two_chunks(gpu_backward):
  """Widths that are not powers of two (PI-P's 72 and 144) run as column chunks of at least 16: against
  the float64 reference, forward and gradients, with two chunks for q/k (40 -> 32 + 16) and v (80 -> 64 + 16),
  in either backward (the one-pass dq adding its first chunk alone passed every test)."""
  from diffmoe_jax.ops.pallas_attention import column_chunks
  assert column_chunks(72) == ((0, 64), (64, 16)) and column_chunks(144) == ((0, 128), (128, 16))
  assert column_chunks(4) == ((0, 16),) and column_chunks(112) == ((0, 64), (64, 32), (96, 16))
  rng = np.random.default_rng(11)
  b, t, h, d, dv = 1, 40, 2, 40, 80
  q, k = (rng.normal(size=(b, t, h, 2, d)).astype(np.float32) * 0.3 for _ in range(2))
  v, g = (rng.normal(size=(b, t, h, dv)).astype(np.float32) for _ in range(2))
  lam = rng.uniform(0.1, 0.9, (b, t, h)).astype(np.float32)
  positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)
  want, (dq, dk, dv_ref, dw) = reference(q, k, v, map_weights(lam, lam.shape),
                                         visibility(positions, positions), g)
  def f(q, k, v, lam):
    return attn.differential_attention(q, k, v, lam, q_positions=positions, kv_positions=positions,
                                       implementation="pallas", block_q=16, block_k=16, gpu_backward=gpu_backward)
  out, vjp = jax.vjp(jax.jit(f), *(jnp.asarray(a) for a in (q, k, v, lam)))
  tol = dict(rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(out), want, **tol)
  for name, ours, ref in zip(("dq", "dk", "dv", "dlam"), vjp(jnp.asarray(g)), (dq, dk, dv_ref, -dw[..., 1])):
    np.testing.assert_allclose(np.asarray(ours), ref, **tol, err_msg=name)
