"""The Mosaic GPU kernels (`mosaic_gpu_attention.py`, `mosaic_gpu_attention_backward.py`): interpreted on
CPU against a float64 NumPy reference over several blocks (online softmax across key blocks, the unmasked
and masked loops, a compute warpgroup whose range is shorter than the other's), their lowering for GPU
from this host, and their refusals. Their runs through the model's attention functions (every mask case,
forward and gradients) are in test_flash_attention.py's bf16 tests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax.ops import attention as attn
from diffmoe_jax.ops import mosaic_gpu_attention as mga
from diffmoe_jax.ops import mosaic_gpu_attention_backward as mgb


def _reference(q, k, v, visible, w=None, g=None):
  """Float64 per-map normalised outputs `[B, H, M, T, Dv]`, natural log-sum-exp `[B, H, M, T]` (0 for a
  row with no visible key, whose output is 0), and with weights w `[B, H, M, T]` and cotangent g
  `[B, H, T, Dv]` of `Σ_m w_m o_m` the textbook chain rule's (dq, dk, dv) and δ_m = g·o_m."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum("bhmtd,bhmsd->bhmts", q, k)
  vis = visible[:, None, None]
  row_max = np.max(np.where(vis, scores, -1e300), axis=-1, keepdims=True)
  e = np.exp(np.where(vis, scores - row_max, -np.inf))
  total = e.sum(-1, keepdims=True)
  seen = total > 0
  p = e / np.where(seen, total, 1.0)
  out = np.einsum("bhmts,bhsv->bhmtv", p, v)
  lse = np.where(seen, row_max + np.log(np.where(seen, total, 1.0)), 0.0)[..., 0]
  if w is None:
    return out, lse
  w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
  delta = np.einsum("bhmtv,bhtv->bhmt", out, g)
  dp = w[..., None] * np.einsum("bhtv,bhsv->bhts", g, v)[:, :, None]  # ∂/∂P_m
  ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
  grads = (np.einsum("bhmts,bhmsd->bhmtd", ds, k), np.einsum("bhmts,bhmtd->bhmsd", ds, q),
           np.einsum("bhmts,bhtv->bhsv", w[..., None] * p, g))
  return out, lse, delta, grads


def _inputs(name):
  """Inputs in the kernel's internal layout, T = S = 256 (four 64-key blocks, two programs)."""
  rng = np.random.default_rng(7)
  b, h, t = 1, 2, 256
  if name == "differential_packed":
    # PI-P's head widths (72 padded to 80, 144); packed documents; the first 70 keys of the row invalid, so
    # queries 0..69 see no key; key 130 invalid inside a document.
    m, d, dv, causal = 2, 72, 144, True
    pos = np.arange(t)[None]
    seg = np.cumsum(np.isin(np.arange(t), (90, 200)))[None]
    valid = np.ones((b, t), bool)
    valid[0, :70] = False
    valid[0, 130] = False
  else:  # "standard_non_causal": one map of width 64 (128-byte swizzle), every query sees later keys too
    m, d, dv, causal = 1, 64, 64, False
    pos, seg = np.arange(t)[None], np.zeros((b, t), int)
    valid = rng.uniform(size=(b, t)) > 0.1
  q = rng.normal(size=(b, h, m, t, d)) * d ** -0.5
  k = rng.normal(size=(b, h, m, t, d))
  v = rng.normal(size=(b, h, t, dv))
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  masks = tuple(jnp.asarray(a, jnp.int32) for a in (pos, seg, pos, seg, valid))
  visible = valid[:, None, :] & (seg[:, None, :] == seg[:, :, None])
  if causal:
    visible &= pos[:, None, :] <= pos[:, :, None]
  rounded = [np.asarray(bf16(a), np.float64) for a in (q, k, v)]
  return (bf16(q), bf16(k), bf16(v)), masks, causal, rounded, visible


@pytest.mark.parametrize("name", ["differential_packed", "standard_non_causal"])
def test_backward_matches_float64_reference_over_several_blocks(name):
  """dq, dk, dv from the saved log-sum-exp and δ (as the VJP passes them), against the float64 chain rule."""
  (q, k, v), masks, causal, rounded, visible = _inputs(name)
  rng = np.random.default_rng(3)
  b, h, num_maps, t = q.shape[:4]
  w = np.stack([np.ones((b, h, t)), -rng.uniform(0.1, 0.9, (b, h, t))], 2)[:, :, :num_maps]
  g = rng.normal(size=(b, h, t, v.shape[-1]))
  _, lse, delta, want = _reference(*rounded, visible, w, g)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  run = jax.jit(lambda *a: mgb.backward(*a, masks, causal, 128, 128, interpret=True))
  got = run(q, k, v, f32(w), f32(g), f32(lse), f32(delta))
  for name_, ours, ref in zip(("dq", "dk", "dv"), got, want):
    assert ours.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, rtol=0, atol=0.02 * np.abs(ref).max(),
                               err_msg=name_)


@pytest.mark.parametrize("name", ["differential_packed", "standard_non_causal"])
def test_forward_matches_float64_reference_over_several_key_blocks(name):
  (q, k, v), masks, causal, rounded, visible = _inputs(name)
  out, lse = jax.jit(lambda q, k, v: mga.forward(q, k, v, masks, causal, 128, 128, interpret=True))(q, k, v)
  want_out, want_lse = _reference(*rounded, visible)
  # P is rounded to bf16 for the P·v product, as in every 16-bit flash kernel: 2⁻⁸ relative per value.
  np.testing.assert_allclose(np.asarray(out), want_out, rtol=0, atol=0.02 * np.abs(want_out).max())
  np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=0, atol=1e-4 * np.abs(want_lse).max())
  unseeing = ~visible.any(-1)[:, None, None]
  assert unseeing.any() == (name == "differential_packed")
  np.testing.assert_array_equal(np.asarray(out)[np.broadcast_to(unseeing, out.shape[:-1])], 0.0)


@pytest.mark.parametrize("gpu_backward, mosaic_calls, triton_calls, d", [("two_pass", 2, 4, 72), ("mosaic", 6, 0, 72),
                                                                        ("mosaic", 6, 0, 64)])
def test_mosaic_kernels_lower_for_gpu(gpu_backward, mosaic_calls, triton_calls, d):
  """Lowered for GPU from this host at a long context in bf16, PI-P's head widths (72 a map) and PI-S's and
  PI's (64, whose 128-byte rows took a 128-byte swizzle the dk/dv kernel's 32-query products cannot run
  with): each attention's forward is one Mosaic GPU kernel, its backward the Triton dq and dk/dv kernels or
  the Mosaic GPU ones."""
  b, t, h = 1, 4096, 2

  def loss(q, k, v, lam):
    common = dict(implementation="pallas", gpu_forward="mosaic", gpu_backward=gpu_backward)
    differential = attn.differential_attention(q, k, v, lam, **common)
    standard = attn.standard_attention(q[:, :, :, 0], k[:, :, :, 0], v, **common)
    return jnp.sum(differential.astype(jnp.float32)) + jnp.sum(standard.astype(jnp.float32))

  args = (jax.ShapeDtypeStruct((b, t, h, 2, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, h, 2, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, t, h, 2 * d), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, h), jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
  assert sum("@mosaic_gpu" in line for line in calls) == mosaic_calls, calls
  assert sum("__gpu$xla.gpu.triton" in line for line in calls) == triton_calls, calls
  assert "flash_multi_map_forward" not in text


def test_refuses_32_bit_inputs_and_unknown_kernels():
  (q, k, v), masks, causal, _, _ = _inputs("standard_non_causal")
  with pytest.raises(ValueError, match=r"need bfloat16 or float16 q, k, v, got float32, float32, float32: set "
                     r"model\.dtype"):
    mga.forward(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), masks, causal, 128, 128,
                interpret=True)
  with pytest.raises(ValueError, match=r"at most 256 columns wide; got head widths 72 and 288"):
    mga.widths(72, 288)
  with pytest.raises(ValueError, match=r"tile 128 queries and keys, got T=256, S=192"):
    mga.check_inputs(256, 192, q)
  with pytest.raises(ValueError, match=r"gpu_forward must be one of \('triton', 'mosaic'\), got 'cuda'"):
    attn.standard_attention(jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1, 16)), jnp.zeros((1, 8, 1, 16)),
                            implementation="pallas", gpu_forward="cuda")


def test_swizzle_is_the_widest_that_tiles_a_row():
  assert [mga.swizzle(n) for n in (128, 160, 288, 64, 576)] == [128, 32, 32, 64, 64]
  with pytest.raises(ValueError, match="a 48-byte row fits no wgmma swizzle"):
    mga.swizzle(48)


def test_interpreting_the_kernels_under_remat_is_refused(make_config):
  """Off a GPU, "pallas_gpu" interprets the Mosaic GPU kernels, whose interpreter's ordered effects remat
  cannot partially evaluate (JAX refused them with a traceback from inside the model); without remat they
  run."""
  from diffmoe_jax import validation
  from diffmoe_jax.config import ConfigError
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU the kernels run compiled, under remat too")
  cfg = make_config(**{"attention_impl": "pallas_gpu", "attention_gpu_backward": "mosaic", "dtype": "bfloat16"})
  with pytest.raises(ConfigError, match=r"config\.model\.attention_gpu_backward: 'mosaic' with attention_impl "
                     r"'pallas_gpu' runs Mosaic GPU's interpreter off a GPU, which cannot run under remat; set "
                     r"model\.remat_policy 'none', or run on a GPU\."):
    validation.validate_model(cfg.model)
  cfg.model.remat_policy = "none"
  validation.validate_model(cfg.model)
