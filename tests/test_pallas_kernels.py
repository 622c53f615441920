"""The Pallas kernels as compiled programs: lowering for GPU (Triton) and TPU (Mosaic) from this host, the GPU
kernels' blocks and per-kernel launches, and the kernel benchmark. Their numerics against the float64
reference are in test_flash_attention.py."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.ops import attention as attn


@pytest.mark.parametrize("platform, kernel_call, gpu_backward", [("cuda", "__gpu$xla.gpu.triton", "two_pass"),
                                                                 ("cuda", "__gpu$xla.gpu.triton", "one_pass"),
                                                                 ("tpu", "@tpu_custom_call", "one_pass")])
def test_pallas_kernels_lower_for_gpu_through_triton_and_for_tpu_through_mosaic(platform, kernel_call, gpu_backward):
  """Lowered for each accelerator from this host: forward, dq and dk/dv are that platform's kernels at
  a long context in bf16, for both maps and one; on TPU the key-block-grid layout. Left to its default,
  Pallas lowers for GPU through Mosaic GPU, which copies the whole-sequence K/V blocks into shared
  memory and refuses at any useful length ("exceeds available shared memory"). PI-P's head widths, so the
  GPU kernels run on column chunks (72 as 64 + 16). The one-pass GPU backward is one kernel (dq by atomic
  adds); the TPU backward is two passes whatever is asked."""
  b, t, h, d = 1, 4096, 2, 72

  def loss(q, k, v, lam):
    common = dict(implementation="pallas", block_q=128, block_k=128, gpu_backward=gpu_backward)
    differential = attn.differential_attention(q, k, v, lam, **common)
    standard = attn.standard_attention(q[:, :, :, 0], k[:, :, :, 0], v, **common)
    return jnp.sum(differential.astype(jnp.float32)) + jnp.sum(standard.astype(jnp.float32))

  args = (jax.ShapeDtypeStruct((b, t, h, 2, d), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, h, 2, d), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, t, h, 2 * d), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, h), jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
  kernels = 2 if platform == "cuda" and gpu_backward == "one_pass" else 3
  assert sum(kernel_call in line for line in calls) == 2 * kernels, calls  # per attention: fwd, (dq,) dk/dv
  assert not any("@mosaic_gpu" in line for line in calls)  # the call target (kernels carry source paths too)
  if platform == "cuda":
    assert ("flash_multi_map_dkv_dq" in text) == (gpu_backward == "one_pass")
  if platform == "tpu":
    assert all(f"flash_multi_map_{name}_tpu" in text for name in ("forward", "dq", "dkv"))


@pytest.mark.parametrize("num_maps, d, dv", [(2, 64, 128), (2, 128, 256), (1, 128, 128), (2, 256, 512)])
def test_gpu_blocks_keep_accumulators_within_the_register_budget(num_maps, d, dv):
  """The GPU kernels' blocks: powers of two no larger than asked nor than 64 (at PI-S's heads, (2, 64, 128),
  128 fit the budget, but the dk/dv kernel then needs more shared memory than Hopper has), at least 16, and
  the accumulators a program holds (forward, dq, dk/dv) within 32K fp32 values unless the minimum block
  forces more."""
  from diffmoe_jax.ops.pallas_attention import register_blocks
  bq, bk = register_blocks(128, 128, num_maps, d, dv)
  for block in (bq, bk):
    assert 16 <= block <= 64 and block & (block - 1) == 0
  assert register_blocks(8, 8, num_maps, d, dv) == (8, 8)  # never larger than asked
  assert num_maps * bq * max(d, dv) <= 32768 or bq == 16
  assert (num_maps * d + dv) * bk <= 32768 or bk == 16
  assert bq == 64 or num_maps * 2 * bq * max(d, dv) > 32768  # not halved further than needed


def test_gpu_kernels_take_a_launch_per_kernel():
  """Each kernel with its own blocks (forward 16 x 32, dq 32 x 16, dk/dv 16 x 32, and the one-pass
  kernel) equals the XLA driver, and a launch that does not tile the sequence is refused by name."""
  from diffmoe_jax.ops import flash_attention as fa, pallas_attention as pa
  rng = np.random.default_rng(5)
  b, h, m, t, d, dv = 1, 2, 2, 64, 8, 16
  q, k = (jnp.asarray(rng.normal(size=(b, h, m, t, d)), jnp.float32) for _ in range(2))
  v, g = (jnp.asarray(rng.normal(size=(b, h, t, dv)), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.uniform(-1, 1, (b, h, m, t)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  masks = (positions, jnp.zeros((b, t), jnp.int32), positions, jnp.zeros((b, t), jnp.int32),
           jnp.ones((b, t), jnp.int32))
  want_out, lse = fa.xla_forward(q, k, v, masks, True, 16, 16)
  delta = jnp.einsum("bhmtv,bhtv->bhmt", want_out, g)
  want = fa.xla_backward(q, k, v, w, g, lse, delta, masks, True, 16, 16)
  out, _ = pa.forward(q, k, v, masks, True, 0, 0, interpret=True, launches={"forward": pa.Launch(16, 32, 4)})
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  launches = {"dq": pa.Launch(32, 16, 4), "dkv": pa.Launch(16, 32, 4)}
  for one_pass in (False, True):
    got = pa.backward(q, k, v, w, g, lse, delta, masks, True, 0, 0, interpret=True, one_pass=one_pass,
                      launches=launches)
    for name, ours, ref in zip(("dq", "dk", "dv"), got, want):
      np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=f"{name}, one_pass={one_pass}")
  with pytest.raises(ValueError, match="the dq kernel's launch rows=48 must be a power of two"):
    pa.dq(q, k, v, w, g, lse, delta, masks, True, pa.Launch(48, 16, 4), interpret=True)


def test_kernel_benchmark_runs_and_checks_its_settings(capsys):
  """`bench kernels` (interpreted here) times each setting and compares it with the default launch."""
  from diffmoe_jax import bench as bench_lib
  bench_lib.main(["kernels", "--config", "configs/tiny.py", "--seq-len", "32", "--kernels", "dq", "--rows", "16",
              "--steps", "16", "--warps", "4", "--stages", "2", "--reps", "1"])
  lines = capsys.readouterr().out.splitlines()
  rows = [line for line in lines if line.startswith("dq ") and "ms" in line and "best" not in line]
  assert len(rows) == 2 and "(default)" in rows[0], lines  # the default (32, 32) and (16, 16)
  assert float(rows[1].split("vs default")[1].split()[0]) < 1e-2, rows
  best = [line for line in lines if line.startswith("dq      best")]
  assert len(best) == 1 and "; --attention-gpu-launch dq=" in best[0], lines
  # The flag it prints is one `bench train` takes.
  flag = best[0].split("--attention-gpu-launch ")[1].split()[0]
  assert bench_lib._gpu_launch(flag) == ("dq", flag.split("=")[1])


@pytest.mark.parametrize("kernel", ["forward", "dkv_dq"])
def test_kernel_benchmark_passes_the_operands_as_arguments(kernel):
  """Closed over, the operands were constants of each setting's program, which XLA spent seconds folding (on
  an H200 at PI-P's heads and T = 8,192, 2 s a setting, with an error line of XLA's each time)."""
  import argparse
  from diffmoe_jax import bench_kernels, config as config_lib
  args = argparse.Namespace(batch=1, seq_len=32, dtype="float32")
  operands, _, defaults, _ = bench_kernels._operands(config_lib.load_file("configs/tiny.py"), args)
  fn = bench_kernels._kernel_fn(kernel, defaults["dkv" if kernel == "dkv_dq" else kernel], operands, True)
  text = getattr(fn, "func", fn).as_text()  # the compiled program
  shapes = re.findall(r"= \w+\[([\d,]*)\](?:\{[^}]*\})? constant\(", text)
  assert shapes and not [s for s in shapes if math.prod(int(n) for n in s.split(",") if n) >= 32], shapes


def test_kernel_benchmark_recommends_no_launch_that_computes_something_else(capsys, monkeypatch):
  """A launch whose output differs from the default's (a race, say) was recommended when it was fastest."""
  from diffmoe_jax import bench as bench_lib, bench_kernels
  differences = iter([0.0, 0.5])  # the default against itself, then (16, 16) half its largest value off
  monkeypatch.setattr(bench_kernels, "_relative_difference", lambda a, b: next(differences))
  monkeypatch.setattr(bench_lib, "_interleaved_medians", lambda fns, **kwargs: dict.fromkeys(fns, float(
      next(times))))
  times = iter([2e-3, 1e-3])  # the wrong launch is the faster
  bench_lib.main(["kernels", "--config", "configs/tiny.py", "--seq-len", "32", "--kernels", "dq", "--rows", "16",
                  "--steps", "16", "--warps", "4", "--stages", "2", "--reps", "1"])
  lines = capsys.readouterr().out.splitlines()
  assert any(line.startswith("dq        16   16") and "not recommended" in line for line in lines), lines
  best = [line for line in lines if line.startswith("dq      best")]
  assert len(best) == 1 and best[0].startswith("dq      best (32, 32, 4, 2)"), lines


def test_model_config_sets_each_gpu_kernels_launch(make_config):
  """`model.attention_gpu_launch` reaches the Triton calls of the model's gradient, lowered for `cuda`: the
  forward and dk/dv kernels run with the rows, warps and stages set, dq with its default launch."""
  cfg = make_config(attention_impl="pallas", max_seq_len=64, dtype="bfloat16", **{"mod.capacity": 1.0})
  cfg.model.attention_gpu_launch.update(forward="32,16,8,3", dkv="16,64,2,1")  # routed layers see all 64 tokens
  model = model_lib.build_model(cfg.model)
  tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32)
  params = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]
  loss = lambda p, t: jnp.sum(model.apply({"params": p}, t)[0].astype(jnp.float32))
  text = jax.jit(jax.grad(loss)).trace(params, tokens).lower(lowering_platforms=("cuda",)).as_text()
  launches = set()
  for line in text.splitlines():
    if "__gpu$xla.gpu.triton" in line:
      name = re.search(r'name = "flash_multi_map_(\w+)"', line).group(1)
      grid, stages, warps = (int(re.search(rf"{key} = (\d+)", line).group(1)) for key in ("grid_z", "num_stages",
                                                                                          "num_warps"))
      launches.add((name, 64 // grid, warps, stages))  # grid_z: the program blocks along the 64 tokens
  assert launches == {("forward", 32, 8, 3), ("dkv", 16, 2, 1), ("dq", 64, 4, 2)}, launches


def test_kernel_benchmark_starts_no_kernel_after_its_time_budget(capsys, monkeypatch):
  """--budget-s bounds the whole command: once spent, the next kernel's reference run (minutes when interpreted
  at PI-P's size) is not started either."""
  from diffmoe_jax import bench as bench_lib, bench_kernels
  monkeypatch.setattr(bench_kernels, "_kernel_fn", lambda *args: pytest.fail("a kernel ran after the budget"))
  bench_lib.main(["kernels", "--config", "configs/tiny.py", "--seq-len", "32", "--kernels", "forward", "dq",
                  "--rows", "16", "--steps", "16", "--budget-s", "1e-9"])
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines if line.endswith("spent: not run")] == ["forward", "dq"], lines


def test_gpu_kernels_leave_the_mask_out_only_where_every_pair_is_visible():
  """The GPU kernels run the blocks `full_blocks` counts without the elementwise mask: a brute-force check over
  every (query, key) pair that each of them is all visible, and that with sorted positions, one document and
  every key valid they are all the pairs below the diagonal. Document boundaries, invalid keys and scattered
  positions shrink the counts (never grow them)."""
  from diffmoe_jax.ops.flash_attention import full_blocks
  rng = np.random.default_rng(5)
  b, t, block = 2, 96, 16
  n = t // block
  sorted_pos = np.broadcast_to(np.arange(t), (b, t))
  scattered = np.sort(rng.choice(400, size=(b, t), replace=False), axis=1)[:, rng.permutation(t)]
  one_document, documents = np.zeros((b, t)), np.broadcast_to(np.arange(t) // 40, (b, t))
  cases = ((sorted_pos, one_document, False, True), (sorted_pos, documents, True, True),
           (scattered, one_document, False, True), (sorted_pos, documents, True, False),
           (sorted_pos, one_document, False, False))
  for positions, segments, holes, causal in cases:
    kv_valid = np.ones((b, t), bool)
    if holes:
      kv_valid[0, 3] = kv_valid[1, 70] = False
    masks = [jnp.asarray(a, jnp.int32) for a in (positions, segments, positions, segments, kv_valid)]
    visible = np.broadcast_to(positions[:, None, :] <= positions[:, :, None] if causal else True, (b, t, t))
    visible = visible & kv_valid[:, None, :] & (segments[:, None, :] == segments[:, :, None])
    all_visible = visible.reshape(b, n, block, n, block).all(axis=(2, 4))  # [B, nq, nk]
    full_keys, full_queries = (np.asarray(a) for a in full_blocks(masks, block, block, causal))
    for row in range(b):
      for i in range(n):
        assert all_visible[row, i, :full_keys[row, i]].all()
      for j in range(n):
        assert all_visible[row, full_queries[row, j]:, j].all()
    if segments is one_document and not holes:
      below = np.tril(np.ones((n, n), bool), -1)
      if positions is sorted_pos and causal:
        np.testing.assert_array_equal(full_keys, np.broadcast_to(np.arange(n), (b, n)))
        np.testing.assert_array_equal(full_queries, np.broadcast_to(np.arange(n) + 1, (b, n)))
        assert np.array_equal(all_visible[0], below)
      elif not causal:
        assert (full_keys == n).all() and (full_queries == 0).all()
    elif holes:
      assert full_keys[0, 1] == 0 and full_queries[1, 70 // block] == n  # a hidden key: that key block needs the mask
