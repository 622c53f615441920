"""The estimator against an independent hand count, and on the paper's configs."""
import functools
import math
import subprocess
import sys

import jax
import ml_collections
import pytest

from diffmoe_jax import estimate, memory, parallel
from diffmoe_jax.config import ConfigError
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train import state as state_lib
from diffmoe_jax.train.curriculum import Curriculum
from test_config import load


def hand_count_tiny(routed_layers=2):
  """configs/tiny.py by hand: d 288, 4 layers of 4 heads x 72 (sub-heads 36), 4 experts x 768, vocab 256,
  MoD on `routed_layers` layers (predictor hidden 64; tiny routes layers 1 and 3), untied output head."""
  d, layers, heads, dv, experts, f, vocab, hidden = 288, 4, 4, 72, 4, 768, 256, 64
  attention = 4 * d * heads * dv + 4 * experts * (dv // 2) + dv  # q, k, v, o; λ vectors per expert; head norm
  layer = attention + 2 * d + d * experts + experts * 2 * d * f  # two norms, router, gelu experts
  mod = d + d * hidden + hidden + hidden
  total = vocab * d + layers * layer + routed_layers * mod + d + d * vocab
  expert_params = layers * experts * 2 * d * f
  active_no_mod = total - expert_params * (1 - 2 / experts)
  routed_layer_active = layer - experts * 2 * d * f * (1 - 2 / experts)
  active = active_no_mod - routed_layers * routed_layer_active * (1 - 0.25)
  return total, active_no_mod, active


def test_tiny_matches_the_hand_count():
  config = load("tiny")
  result = estimate.estimate(config)
  total, active_no_mod, active = hand_count_tiny()
  assert result["total_params"] == total
  assert result["active_params_no_mod"] == pytest.approx(active_no_mod)
  assert result["active_params"] == pytest.approx(active)
  assert result["weights_bytes_fp32"] == 4 * total and result["train_state_bytes"] == 12 * total
  assert result["weights_bytes_bf16"] == 2 * total and result["adam_state_bytes_fp32"] == 8 * total  # m and v
  # KV cache: per position and layer (routed ones too), K and V of width d in bf16 and a filled flag.
  assert result["kv_cache_bytes_bf16"] == 4 * 256 * (2 * 288 * 2 + 1)


def test_a_router_at_each_layer_as_the_paper_describes():
  # The paper: "a learned binary router at each layer"; mod.every=1 makes every layer a routed one.
  config = load("tiny")
  config.model.mod.every = 1
  assert list(range(config.model.num_layers)[model_lib.routed_layers(config.model)]) == [0, 1, 2, 3]
  result = estimate.estimate(config)
  total, active_no_mod, active = hand_count_tiny(routed_layers=4)
  assert result["total_params"] == total
  assert result["active_params_no_mod"] == pytest.approx(active_no_mod)
  assert result["active_params"] == pytest.approx(active)
  config.model.mod.every = 0
  with pytest.raises(ConfigError, match=r"model\.mod\.every: must be an integer >= 1"):
    estimate.estimate(config)


def test_a_dense_ffn_is_reported_as_one():
  """The dense ablation's table describes a dense FFN of width top_k x expert_ffn_dim, not the unused experts."""
  config = load("tiny")
  config.model.update(ffn="dense", expert_conditional_lambda=False)
  result = estimate.estimate(config)
  assert result["dense_ffn_params"] == 4 * 2 * 288 * (2 * 768)  # 4 layers of w_in, w_out at width 2 x 768
  table = estimate.report(config, result)
  assert "dense FFN 1536 (gelu)" in table.splitlines()[0] and "experts" not in table
  row = next(line for line in table.splitlines() if line.startswith("  dense FFN"))
  assert row.split()[2] == estimate.human(result["dense_ffn_params"]) == "3.539M"
  # main's start-up summary said "4 experts top-2 (dense)".
  from diffmoe_jax import main as main_lib
  from diffmoe_jax.train import curriculum as curriculum_lib
  summary = main_lib.summary(config, "runs/dense", result, {"data": 1}, {"total": 2**30},
                             curriculum_lib.Curriculum(config))
  assert "heads x 72, dense FFN 1536 (gelu), MoD" in summary.splitlines()[1] and "experts" not in summary


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_is_what_decoding_allocates(dtype):
  config = load("tiny")
  config.model.dtype = dtype
  model = model_lib.build_model(config.model)
  params = estimate.abstract_params(config.model)
  cache = jax.eval_shape(lambda p: model_lib.init_cache(model, p, 1, config.model.max_seq_len), params)
  allocated = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(cache))
  result = estimate.estimate(config)
  assert result["kv_cache_bytes_fp32" if dtype == "float32" else "kv_cache_bytes_bf16"] == allocated


def forward_flops_by_hand(d, e, f, vocab, layers, t, selected, routers=1, hidden=64):
  """Forward FLOPs per token of `layers` full/routed pairs (top-2 gelu experts): 2 per multiply-add of the
  attention's four projections, the router(s) and two experts, plus the scores and value product over the
  causal context; a routed layer's block runs for the `selected` tokens of each `t` (among themselves) while
  its MoD router and predictor run for every token; the output head once."""
  matmuls = 4 * d * d + routers * d * e + 2 * 2 * d * f
  full = 2 * matmuls + 2 * 2 * d * (t + 1) / 2
  mod = d + d * hidden + hidden + hidden
  routed = selected / t * (2 * matmuls + 2 * 2 * d * (selected + 1) / 2) + 2 * mod
  return 2 * d * vocab + layers * (full + routed)


@pytest.mark.parametrize("route_from, routers, t, capacity, selected", [
    ("attention_input", 1, 128, 0.5, 64),  # one routing serves the MoE and the λ gate
    ("ffn_input", 2, 25, 0.28, 7),  # the λ gate routes again; 0.28 · 25 (7.000000000000001) selects 7 tokens
    # 7.5 tokens' share rounds up: the block runs for 8 of 30 (counted as the capacity's 7.5 passed every test).
    ("attention_input", 1, 30, 0.25, 8),
])
def test_tiny_forward_flops_by_hand(route_from, routers, t, capacity, selected):
  config = load("tiny")
  config.model.moe.route_from = route_from
  counts = estimate.count_params(config.model)
  want = forward_flops_by_hand(288, 4, 768, 256, 2, t, selected, routers=routers)
  got = estimate.forward_flops_per_token(config.model, counts, t, mod_capacity=capacity)
  assert got == pytest.approx(want, rel=1e-12)


def test_training_flops_are_three_forwards_or_four_with_full_remat_and_a_tied_head_counts():
  """A train step is three forwards (the backward two), four with full remat's recompute; with MoD "off"
  every token runs every layer, whatever the capacity; tied embeddings' output head is the same product as
  an untied one's (each was a mutation every test passed: 3x for full remat, capacity used with "off", no
  head FLOPs when tied)."""
  config = load("tiny")
  counts = estimate.count_params(config.model)
  t, m = 128, config.model
  at = lambda capacity: forward_flops_by_hand(288, 4, 768, 256, 2, t, math.ceil(capacity * t))
  assert estimate.train_flops_per_token(m, counts, t, mod_mode="topk", mod_capacity=0.5) == pytest.approx(
      3 * at(0.5), rel=1e-12)
  assert estimate.train_flops_per_token(m, counts, t, mod_mode="off", mod_capacity=0.5) == pytest.approx(
      3 * at(1.0), rel=1e-12)
  m.max_seq_len = t
  result = estimate.estimate(config)
  fwd = at(m.mod.capacity)
  assert result["forward_flops_per_token"] == pytest.approx(fwd, rel=1e-12)
  assert result["train_flops_per_token"] == pytest.approx(3 * fwd, rel=1e-12)
  assert result["train_flops_per_token_full_remat"] == pytest.approx(4 * fwd, rel=1e-12)
  m.tie_embeddings = True
  tied = estimate.count_params(m)
  assert tied.sum({"global"}, {"lm_head"}) == 0 < counts.sum({"global"}, {"lm_head"})
  assert estimate.forward_flops_per_token(m, tied, t) == pytest.approx(fwd, rel=1e-12)


def test_pi_curriculum_costs_the_papers_training_compute():
  """The paper ("Training"): "Total training compute is approximately 3.2 × 10²² FLOPs". configs/pi.py's
  curriculum, phase by phase from the README's table (shares 5/35/20/15/15/10 %, contexts ¼ ½ ½ ½ 1 1 of
  32,768 at 4M tokens a step, MoD off, at 1, annealed 1 → ½ → ¼ → ⅛ over sparsify's quarters, then at
  ⅛), at 3 forward passes per token, costs that; the estimate's curriculum figures match the count."""
  config = load("pi")
  steps = config.curriculum.total_steps
  tokens_per_step = 4 * 1024 * 1024
  fwd = lambda t, capacity: forward_flops_by_hand(4608, 9, 15360, 65536, 27, t, math.ceil(capacity * t))
  quarter = steps * 20 // 100 // 4
  phases = [(steps * 5 // 100, 8192, 1.0), (steps * 35 // 100, 16384, 1.0)]
  phases += [(quarter, 16384, c) for c in (1.0, 0.5, 0.25, 0.125)]
  phases += [(steps * 15 // 100, 16384, 0.125), (steps * 15 // 100, 32768, 0.125), (steps * 10 // 100, 32768, 0.125)]
  assert sum(n for n, _, _ in phases) == steps
  flops = sum(n * tokens_per_step * 3 * fwd(t, c) for n, t, c in phases)
  result = estimate.estimate(config)
  assert result["curriculum_tokens"] == steps * tokens_per_step
  assert result["curriculum_train_flops"] == pytest.approx(flops, rel=1e-9)
  assert flops == pytest.approx(3.2e22, rel=0.01)
  # The training tokens 3.2e22 FLOPs buy are counted through the curriculum (280B), not at full context
  # and MoD ⅛ throughout (341B): the curriculum spends 40% of its steps at MoD capacity 1 or off.
  assert result["paper_training_tokens"] == pytest.approx(3.2e22 * steps * tokens_per_step / flops, rel=1e-9)
  table = estimate.report(config, result)
  assert "training FLOPs of the curriculum                3.20e+22    3.20e+22  agrees (1.00x)" in table


@pytest.mark.parametrize("name, flagged", [("pi", {"total_params", "active_params_non_embedding"}),
                                           ("pi_s", set()),
                                           ("pi_p", {"active_params_non_embedding"})])
def test_paper_configs_and_their_flags(name, flagged):
  config = load(name)
  result = estimate.estimate(config)
  claims = estimate.PAPER_CLAIMS[name]
  disagree = {k for k, v in claims.items() if abs(result[k] / v - 1) > estimate.CLAIM_TOLERANCE}
  assert disagree == flagged
  table = estimate.report(config, result)
  assert table.count("DISAGREES") == len(flagged)
  # The paper's own per-layer FFN arithmetic (9 x 15360 x 4608 x 2) against its 54B total: 54 such layers
  # alone hold 68.8B parameters.
  if name == "pi":
    assert result["expert_params_per_layer"] == 9 * 15360 * 4608 * 2
    assert result["expert_params"] == 54 * 9 * 15360 * 4608 * 2 > 54e9


def test_cli_runs():
  out = subprocess.run([sys.executable, "-m", "diffmoe_jax.estimate", "--config=configs/pi_p.py"],
                       capture_output=True, text=True, check=True).stdout
  assert "total parameters" in out and "4.938B" in out


def test_ctrl_c_ends_the_command_in_one_line():
  """Ctrl-C (here raised where the model is built) ends the command with one line and exit 130, not a traceback."""
  code = ("import runpy, sys\nfrom diffmoe_jax.nn import model\n"
          "def interrupted(*args, **kwargs):\n  raise KeyboardInterrupt\n"
          "model.build_model = interrupted\nsys.argv = ['estimate', '--config=configs/tiny.py']\n"
          "runpy.run_module('diffmoe_jax.estimate', run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 130 and proc.stderr.strip() == "error: interrupted.", proc.stderr[-2000:]


@pytest.mark.parametrize("mesh", [{"data": 1, "fsdp": 2, "expert": 4, "tensor": 1},
                                  {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2},
                                  {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}])
def test_state_memory_is_the_sum_of_the_trainers_shards(make_config, mesh):
  """The preflight's state figure is what the trainer's shardings put on one device (8 simulated ones)."""
  config = make_config()
  config.mesh.shape.update(mesh)
  model = model_lib.build_model(config.model)
  devices = parallel.make_mesh(config.mesh)
  abstract, _, _ = state_lib.create_state(model, state_lib.make_optimizer(config.optimizer), devices,
                                          parallel.axis_rules(config.mesh), seed=0, seq_len=8)
  on_device = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                  for leaf in jax.tree.leaves(abstract))
  need = memory.training_memory_per_device(config, parallel.mesh_shape(config.mesh, 8))
  assert need["state"] == on_device


@pytest.mark.parametrize("mesh", [{"data": 8}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"expert": 4, "tensor": 2}])
def test_step_temporaries_agree_with_the_compiled_step_when_weights_dominate(make_config, mesh):
  """Wide weights, one short sequence per device (8 simulated ones): what the step holds beyond its state is
  the larger of the backward's peak (the gradient, one layer group's weights, gathered over fsdp with their
  whole gradient, the activations) and the update's (`memory.UPDATE_WEIGHTS` times the weights' shard),
  within 15%. Counted as twice the weights' shard, it was 0.68x of it data-parallel, 0.28x over fsdp and
  0.47x over fsdp x tensor; as three times, 1.23x over expert x tensor once a skipped update was decided
  before it (XLA then writes part of the new values in place)."""
  config = make_config(d_model=192, num_heads=4, head_dim=48, dtype="bfloat16", **{"moe.expert_ffn_dim": 512})
  config.mesh.shape.update(dict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, **mesh))
  temp = _compiled_mesh_step_temp_bytes(config, 8, 16)
  shape, rules = parallel.mesh_shape(config.mesh, 8), parallel.axis_rules(config.mesh)
  activations = memory.activation_bytes(config.model, 1, 16, tensor=parallel.logical_axis_size(shape, rules, "heads"))
  held = memory.step_temporaries(config, shape, activations) + activations
  assert held == pytest.approx(temp, rel=0.15)
  config.model.cast_weights_once = False  # the layers cast their own weights: no copies to hold
  cast = memory.CAST_COPIES * sum(math.prod(s) * 2 for p, s, _ in parallel.shard_shapes(
      memory.abstract_state(config).params, shape, rules) if p.rpartition("/")[2] in model_lib.COMPUTE_DTYPE_WEIGHTS)
  assert memory.step_temporaries(config, shape, activations) + activations == pytest.approx(held - cast)


def _compiled_step_temp_bytes(config: ml_collections.ConfigDict, batch: int, t: int, *, mod_mode: str = "topk",
                              mod_capacity: float | None = None) -> int:
  """The temporary memory of `config`'s compiled train step on `batch` sequences of t tokens (one device)."""
  import flax.linen as nn
  import jax.numpy as jnp
  from diffmoe_jax.train import step as step_lib
  model = model_lib.build_model(config.model)
  optimizer = state_lib.make_optimizer(config.optimizer)
  capacity = config.model.mod.capacity if mod_capacity is None else mod_capacity
  step = jax.jit(step_lib.make_train_step(model, optimizer, mod_mode=mod_mode, mod_capacity=capacity),
                 donate_argnums=0)
  state = jax.eval_shape(lambda r: nn.unbox(state_lib.init_fn(model, optimizer, 16)(r)), jax.random.PRNGKey(0))
  dyn = {k: jnp.float32(v) for k, v in step_lib.dynamic_settings(Curriculum(config).settings(0)).items()}
  batch = {k: jax.ShapeDtypeStruct((batch, t), jnp.int32) for k in ("inputs", "targets")}
  return step.lower(state, batch, dyn).compile().memory_analysis().temp_size_in_bytes


def _compiled_mesh_step_temp_bytes(config: ml_collections.ConfigDict, batch: int, t: int) -> int:
  """The temporary memory per device of `config`'s train step on its mesh (8 simulated devices), lowered as
  the trainer lowers it, on `batch` sequences of t tokens in all."""
  import flax.linen
  import jax.numpy as jnp
  from diffmoe_jax.train import step as step_lib
  model, optimizer = model_lib.build_model(config.model), state_lib.make_optimizer(config.optimizer)
  devices, rules = parallel.make_mesh(config.mesh), parallel.axis_rules(config.mesh)
  abstract, shardings, _ = state_lib.create_state(model, optimizer, devices, rules, seed=0, seq_len=8)
  tokens = parallel.batch_sharding(devices, rules)
  batch = {k: jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=tokens) for k in ("inputs", "targets")}
  dyn = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in step_lib.dynamic_settings(Curriculum(config).settings(0))}
  step = step_lib.make_train_step(model, optimizer, mod_mode="topk", mod_capacity=config.model.mod.capacity)
  scalar = parallel.replicated(devices)
  with jax.set_mesh(devices), flax.linen.logical_axis_rules(rules):
    compiled = jax.jit(step, in_shardings=(shardings, {k: tokens for k in batch}, scalar),
                       out_shardings=(shardings, scalar), donate_argnums=0).lower(abstract, batch, dyn).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _small_pi_p(**model_overrides) -> ml_collections.ConfigDict:
  """PI-P's shape at test width."""
  config = load("pi_p")
  config.model.update(d_model=96, num_heads=2, head_dim=48, num_layers=4, vocab_size=512, max_seq_len=4096,
                      **model_overrides)
  config.model.moe.expert_ffn_dim = 128
  return config


@functools.lru_cache
def _compiled_temp_bytes(t: int, **model_overrides) -> tuple[int, ml_collections.ConfigDict]:
  """PI-P's shape at test width: the compiled train step's temporary memory on one sequence of t tokens."""
  config = _small_pi_p(**model_overrides)
  return _compiled_step_temp_bytes(config, 1, t), config


@pytest.mark.parametrize("chunk", [0, 256])
def test_the_losss_logits_are_counted_whole_or_by_chunk(chunk):
  """A vocabulary of 16,384 at test width, 2 x 2,048 tokens: the logits (128 MiB a sequence in float32) set the
  step's activations, unless model.logits_chunk_len computes them 256 positions at a time (16 MiB); either
  way the estimate is the compiled step's temporaries within 25%. The chunks' logits are not live with a
  layer's working set: counting both (the sum) gave 2.1x the compiled chunked step."""
  config = _small_pi_p(logits_chunk_len=chunk)
  config.model.vocab_size = 16384
  temp = _compiled_step_temp_bytes(config, 2, 2048)
  activations = memory.activation_bytes(config.model, 2, 2048)
  assert memory.step_temporaries(config, {}, activations) + activations == pytest.approx(temp, rel=0.25)
  assert (temp < 128 * 2**20) == (chunk > 0)


def test_standard_attention_is_counted_with_its_one_map():
  """Standard attention (an ablation arm) on the explicit path keeps one map's probabilities, not the
  differential two: the activations are the compiled step's temporaries less the gradients within 25%
  (they were 1.30x)."""
  config = _small_pi_p(attention="standard", expert_conditional_lambda=False, attention_impl="explicit")
  temp = _compiled_step_temp_bytes(config, 2, 512)
  activations = memory.activation_bytes(config.model, 2, 512)
  assert activations == pytest.approx(temp - memory.step_temporaries(config, {}, activations), rel=0.25)


def test_memory_estimate_agrees_with_the_compiled_train_step():
  """One sequence at 4,096 tokens (blockwise attention): the estimator's gradients + activations are the
  compiled step's temporary memory within 25%, and it grows linearly. With remat_policy="save_names",
  what keeping the flash residuals adds is what the estimator adds, within 25%."""
  temp_1k, _ = _compiled_temp_bytes(1024)
  temp, config = _compiled_temp_bytes(4096)
  activations = memory.activation_bytes(config.model, 1, 4096)
  assert memory.step_temporaries(config, {}, activations) + activations == pytest.approx(temp, rel=0.25)
  assert temp / temp_1k < 4.5  # four times the tokens: linear, not the explicit maps' 16x

  temp_kept, kept_config = _compiled_temp_bytes(4096, remat_policy="save_names", remat_save_names=("flash_residuals",))
  kept = memory.activation_bytes(kept_config.model, 1, 4096) - activations
  assert kept > 0
  assert temp_kept - temp == pytest.approx(kept, rel=0.25)


@pytest.mark.parametrize("policy, names", [("dots_no_batch", ()), ("dots", ()),
                                           ("save_names", ("query_proj", "key_proj", "value_proj", "attn_out",
                                                           "ffn_out"))])
def test_what_a_remat_policy_keeps_is_what_it_adds_to_the_compiled_step(policy, names):
  """With remat_policy "dots" / "dots_no_batch" each layer keeps its matmuls' outputs (on the blockwise path
  "dots" also the maps' combination), with "save_names" the values named: the compiled step's temporary
  memory grows by the estimator's count within 15%. The dots policies were counted as full remat; the
  named bfloat16 values as half what XLA:CPU keeps (it keeps them in float32)."""
  full, config = _compiled_temp_bytes(4096)
  temp, kept_config = _compiled_temp_bytes(4096, remat_policy=policy, remat_save_names=names)
  kept = memory.activation_bytes(kept_config.model, 1, 4096) - memory.activation_bytes(config.model, 1, 4096)
  assert kept > 0
  assert temp - full == pytest.approx(kept, rel=0.15)


def test_without_remat_the_last_unrolled_layer_keeps_what_its_recompute_would():
  """Without remat each layer keeps every value its backward reads (it was counted as full remat). Five
  layers: two scanned groups and a trailing layer, which runs its backward first, at once, so that full
  remat's recompute of it holds its values as well. So dropping remat grows the step by the groups' values
  alone: the estimator's count within 15% (counting the trailing layer's too, it was about 1.3 times what
  the step adds)."""
  temps, activations = {}, {}
  for policy in ("full", "none"):
    config = _small_pi_p(remat_policy=policy)
    config.model.num_layers = 5
    temps[policy] = _compiled_step_temp_bytes(config, 1, 2048)
    activations[policy] = memory.activation_bytes(config.model, 1, 2048)
  assert model_lib.layer_layout(config.model) == (2, 2, 1)
  assert temps["none"] - temps["full"] == pytest.approx(activations["none"] - activations["full"], rel=0.15)


def test_without_remat_a_tensor_split_device_keeps_its_part_of_the_values():
  """On data 4 x tensor 2, one sequence of 1,024 tokens per device: dropping remat grows each device's step
  by the count for its heads and FFN width, within 15% (the values counted whole were 1.50 times it)."""
  temps, activations = {}, {}
  for policy in ("full", "none"):
    config = _small_pi_p(remat_policy=policy)
    config.mesh.shape.update(data=4, fsdp=1, expert=1, tensor=2)
    temps[policy] = _compiled_mesh_step_temp_bytes(config, 4, 1024)
    activations[policy] = memory.activation_bytes(config.model, 1, 1024, tensor=2)
  assert temps["none"] - temps["full"] == pytest.approx(activations["none"] - activations["full"], rel=0.15)


def test_on_the_cpu_unrolled_layers_keep_what_no_remat_keeps():
  """XLA:CPU runs an unrolled layer's recompute beside its forward pass: tiny's step with its layers unrolled
  needs the temporaries of a step without remat, which the estimate counts within 25% (it counted full
  remat, 0.54 of them). Counting the expert weights' slices each layer reads as its values too was 1.39."""
  config = load("tiny")
  config.model.scan_layers = False
  temp = _compiled_step_temp_bytes(config, 8, 256)
  activations = memory.activation_bytes(config.model, 8, 256)
  assert memory.step_temporaries(config, {}, activations) + activations == pytest.approx(temp, rel=0.25)


def test_the_explicit_paths_scores_are_kept_by_the_dots_policy():
  """On the explicit path "dots" also keeps each map's fp32 scores, T² per head, and the weighted values:
  what the compiled step adds, within 15%."""
  configs = {policy: _small_pi_p(attention_impl="explicit", remat_policy=policy) for policy in ("full", "dots")}
  temps = {policy: _compiled_step_temp_bytes(config, 2, 512) for policy, config in configs.items()}
  activations = {policy: memory.activation_bytes(config.model, 2, 512) for policy, config in configs.items()}
  kept = activations["dots"] - activations["full"]
  scores = 2 * 2 * configs["dots"].model.num_heads * 512 * 512 * 4  # two maps, two sequences
  assert kept > scores
  assert temps["dots"] - temps["full"] == pytest.approx(kept, rel=0.15)


def test_memory_estimate_agrees_with_tinys_warmup_step():
  """tiny's warmup step (32 x 64 tokens, MoD off), on the explicit path: the activations are the compiled
  step's temporaries less the step's other temporaries within 25%, and so is the sum. The estimate counted
  the attention maps and the experts' hidden rows only, leaving out q, k, v, the attention output and the
  MoE's dispatched rows: 0.64 of the compiled activations (as for the foundation's 16 x 128 tokens)."""
  config = load("tiny")
  settings = next(p for p in Curriculum(config).phases if p.name == "warmup")
  temp = _compiled_step_temp_bytes(config, settings.batch_size, settings.seq_len, mod_mode="off", mod_capacity=1.0)
  activations = memory.activation_bytes(config.model, settings.batch_size, settings.seq_len, mod_capacity=1.0)
  gradients = memory.step_temporaries(config, {}, activations)
  assert activations == pytest.approx(temp - gradients, rel=0.25)
  assert gradients + activations == pytest.approx(temp, rel=0.25)


def test_with_gradient_accumulation_a_step_keeps_one_micro_batchs_activations():
  """Accumulating over 2 micro-batches keeps the activations of half the batch, as a batch half as large
  would (the whole batch's counted passed every test, and the memory check refused configs that fit)."""
  config = load("tiny")
  whole = memory.training_memory_per_device(config, {})
  config.optimizer.grad_accum_steps = 2
  accumulated = memory.training_memory_per_device(config, {})
  half = load("tiny")
  half.curriculum.tokens_per_batch //= 2
  want = memory.training_memory_per_device(half, {})
  assert accumulated["activations"] == want["activations"] < whole["activations"]
  assert accumulated["largest_phase"] == want["largest_phase"]


def test_activation_memory_counts_the_ffn_rows_the_step_computes():
  """Dropless padded gives every expert room for every token (the capacity path at factor E/k = 2 for tiny);
  ragged keeps the assignments alone (factor 1, E dividing T·k), as does a dense FFN of width k·f, which
  has no dispatched rows: 2 sequences x 256 tokens x k = 2, in and out, 288 wide (one layer, the working set
  the backward recomputes, with mixture-of-depths off)."""
  def with_moe(**moe):
    config = load("tiny")
    config.model.moe.update(moe)
    return memory.activation_bytes(config.model, 2, 256)
  assert with_moe(dispatch="dropless", dropless_impl="padded") == with_moe(capacity_factor=2.0)
  assert with_moe(dispatch="dropless", dropless_impl="ragged") == with_moe(capacity_factor=1.0)
  dense = load("tiny")
  dense.model.update(ffn="dense", expert_conditional_lambda=False)
  moe = load("tiny")
  moe.model.moe.capacity_factor = 1.0
  for config in (dense, moe):
    config.model.mod.enabled = False
  dispatched = 2 * (2 * 256 * 2) * 288 * 4
  assert memory.activation_bytes(dense.model, 2, 256) == memory.activation_bytes(moe.model, 2, 256) - dispatched


@pytest.mark.parametrize("layout", ["pallas_gpu", "pallas_tpu"])
def test_a_forced_kernel_layout_is_counted_as_the_kernel(layout):
  """The kernels keep O(T·block) memory whichever layout is forced, not the explicit path's T² maps."""
  def activations(impl):
    config = load("tiny")
    config.model.update(attention_impl=impl, attention_block_q=32, attention_block_k=32, remat_policy="save_names",
                        remat_save_names=("flash_residuals",))
    return memory.activation_bytes(config.model, 2, 256)
  assert activations(layout) == activations("pallas") < activations("explicit")
