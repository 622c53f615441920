"""Exact parameter counts, FLOPs per token and memory of a config, beside the paper's claims.

    python -m diffmoe_jax.estimate --config=configs/pi.py

Parameter counts come from `jax.eval_shape` of the real model's `init` (nothing is allocated, so the 74B
flagship runs on a laptop). FLOPs are counted from the same shapes: 2 per multiply-add of every weight
matrix a token passes through, plus attention scores and the value product over the causal context.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffmoe_jax import cli, config as config_lib, validation
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.nn.moe import dense_ffn_dim
from diffmoe_jax.ops import attention as attention_ops
from diffmoe_jax.ops import dispatch
from diffmoe_jax.ops import routing

PAPER_TRAINING_FLOPS = 3.2e22  # the paper's training compute (through the curriculum: its training tokens)
# The paper's own figures (its table and its per-layer FFN arithmetic), keyed by config.name. The paper
# does not say whether "active" counts the embedding and output head; its PI-S figure matches the count
# without them (3.84B computed vs ~3.8B), so claims are compared with that count.
PAPER_CLAIMS = {
    # "Total training compute is approximately 3.2 × 10²² FLOPs" (the flagship): configs/pi.py's steps
    # are set so that its curriculum costs that.
    "pi": {"total_params": 54e9, "active_params_non_embedding": 9.2e9, "expert_params_per_layer": 1.28e9,
           "curriculum_train_flops": PAPER_TRAINING_FLOPS},
    "pi_s": {"total_params": 18e9, "active_params_non_embedding": 3.8e9},
    "pi_p": {"total_params": 5e9, "active_params_non_embedding": 1.4e9},
}
CLAIM_TOLERANCE = 0.10  # a computed figure more than 10% off the paper's is flagged


def abstract_params(model_config: ml_collections.ConfigDict) -> dict:
  """Parameter shapes of the real model, without allocating them."""
  model = model_lib.build_model(model_config)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
  variables = jax.eval_shape(lambda t: model.init(rngs, t), tokens)
  return nn.meta.unbox(variables["params"])


def _category(path: tuple[str, ...]) -> str:
  name = path[-1]
  if path[0] == "embed":
    return "embedding"
  if path[0] == "lm_head":
    return "lm_head"
  if "mod_router" in path:
    return "mod_router"
  if "moe" in path:
    return "router" if name == "router" else "experts"
  if "ffn" in path:
    return "dense_ffn"
  if "attention" in path and name.startswith("lambda_"):
    return "lambda"  # λ re-parameterisation vectors: parameters, but no matmul
  if "attention" in path and "head_norm" not in path:
    return "attention"
  return "norms"


def _layer_kind(path: tuple[str, ...], cfg) -> str:
  """"global" (embedding, head, final norm), "full" or "routed" (a mixture-of-depths layer)."""
  if path[0] in ("groups",) or path[0].startswith("group_"):
    size, _, _ = model_lib.layer_layout(cfg)
    return "routed" if cfg.mod.enabled and path[1] == f"layer_{size - 1}" else "full"
  return "full" if path[0].startswith("tail_") else "global"


@dataclasses.dataclass
class ParamCounts:
  by_kind: dict  # (layer kind, category) -> number of parameters
  total: int

  def sum(self, kinds=None, categories=None) -> int:
    return sum(n for (k, c), n in self.by_kind.items()
               if (kinds is None or k in kinds) and (categories is None or c in categories))


def count_params(model_config: ml_collections.ConfigDict) -> ParamCounts:
  params = abstract_params(model_config)
  by_kind: dict = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(str(getattr(k, "key", k)) for k in key_path)
    key = (_layer_kind(path, model_config), _category(path))
    by_kind[key] = by_kind.get(key, 0) + math.prod(leaf.shape)
  return ParamCounts(by_kind, sum(by_kind.values()))


def _expert_fraction(cfg) -> float:
  return cfg.moe.top_k / cfg.moe.num_experts if cfg.ffn == "moe" else 1.0


def active_params(cfg, counts: ParamCounts, *, with_mod: bool) -> float:
  """Parameters one token passes through: k of E experts; with MoD, routed layers weighted by capacity."""
  def layer_active(kind):
    return counts.sum({kind}) - counts.sum({kind}, {"experts"}) * (1 - _expert_fraction(cfg))
  routed_block = layer_active("routed") - counts.sum({"routed"}, {"mod_router"})
  capacity = cfg.mod.capacity if with_mod else 1.0
  return (counts.sum({"global"}) + layer_active("full") + capacity * routed_block
          + counts.sum({"routed"}, {"mod_router"}))


def train_flops_per_token(cfg, counts: ParamCounts, seq_len: int, *, mod_mode: str, mod_capacity: float) -> float:
  """Training FLOPs per token of a curriculum step (MoD `mod_mode` at `mod_capacity`): three forwards, the
  backward costing two."""
  return 3 * forward_flops_per_token(cfg, counts, seq_len, mod_capacity=1.0 if mod_mode == "off" else mod_capacity)


def forward_flops_per_token(cfg, counts: ParamCounts, seq_len: int, *, mod_capacity: float | None = None) -> float:
  """Forward FLOPs per token at `seq_len`: weight matmuls plus attention over the causal context.

  mod_capacity: the fraction of tokens routed layers process (default the config's; 1.0 = MoD saves nothing).
  """
  def matmul_params(kind):
    n = counts.sum({kind}, {"attention", "dense_ffn", "mod_router"})
    n += counts.sum({kind}, {"experts"}) * _expert_fraction(cfg)
    router = counts.sum({kind}, {"router"})
    # With route_from="ffn_input" the λ gate runs the router a second time, on the attention input;
    # with "attention_input" one routing serves both.
    twice = cfg.expert_conditional_lambda and cfg.moe.route_from == "ffn_input"
    return n + router * (2 if twice else 1)
  def attention_core(tokens):
    # Scores q·k over the query/key width (d) and one product with v (the two maps combine first).
    return 2 * 2 * cfg.d_model * (tokens + 1) / 2
  layers_routed = len(model_lib.routed_layer_indices(cfg))
  layers_full = cfg.num_layers - layers_routed
  head = counts.sum({"global"}, {"lm_head"}) or counts.sum({"global"}, {"embedding"})
  full = 2 * matmul_params("full") + layers_full * attention_core(seq_len)
  capacity = cfg.mod.capacity if mod_capacity is None else mod_capacity
  selected = routing.mod_capacity_tokens(capacity, seq_len) if layers_routed else 0  # as the routed layer counts
  mod_params = counts.sum({"routed"}, {"mod_router"})
  routed = (capacity * (2 * (matmul_params("routed") - mod_params) + layers_routed * attention_core(selected))
            + 2 * mod_params)
  return 2 * head + full + routed


def curriculum_training_flops(config: ml_collections.ConfigDict, counts: ParamCounts) -> tuple[float, int]:
  """(training FLOPs, tokens) of the config's whole curriculum: each step's tokens at its phase's sequence
  length and MoD mode and capacity (`train_flops_per_token`; MoD off or at capacity 1 saves nothing), summed."""
  from diffmoe_jax.train.curriculum import Curriculum  # the curriculum imports the model's validation
  flops, tokens = 0.0, 0
  for (seq_len, mod_mode, capacity), n in Curriculum(config).tokens_by_setting().items():
    flops += n * train_flops_per_token(config.model, counts, seq_len, mod_mode=mod_mode, mod_capacity=capacity)
    tokens += n
  return flops, tokens


def estimate(config: ml_collections.ConfigDict) -> dict:
  cfg = config.model
  counts = count_params(cfg)
  seq = cfg.max_seq_len
  fwd = forward_flops_per_token(cfg, counts, seq)
  # The decoding cache (nn.attention) holds K (query/key width d), V (d) and a filled flag per position in
  # every layer: a routed layer keeps a slot per position too, it only skips writing the tokens it rejects.
  kv_bytes = lambda itemsize: cfg.num_layers * seq * (2 * cfg.d_model * itemsize + 1)
  result = {
      "total_params": counts.total,
      "embedding_params": counts.sum({"global"}, {"embedding", "lm_head"}),
      "attention_params": counts.sum(None, {"attention", "lambda"}),
      "expert_params": counts.sum(None, {"experts"}),
      "expert_params_per_layer": counts.sum(None, {"experts"}) / cfg.num_layers,
      "dense_ffn_params": counts.sum(None, {"dense_ffn"}),
      "active_params_no_mod": active_params(cfg, counts, with_mod=False),
      "active_params": active_params(cfg, counts, with_mod=True),
      "active_params_non_embedding": (active_params(cfg, counts, with_mod=True)
                                      - counts.sum({"global"}, {"embedding", "lm_head"})),
      "forward_flops_per_token": fwd,
      "forward_flops_per_token_no_mod": forward_flops_per_token(cfg, counts, seq, mod_capacity=1.0),
      "train_flops_per_token": 3 * fwd,
      "train_flops_per_token_full_remat": 4 * fwd,
      "weights_bytes_bf16": 2 * counts.total,
      "weights_bytes_fp32": 4 * counts.total,
      "adam_state_bytes_fp32": 8 * counts.total,
      "train_state_bytes": 12 * counts.total,  # fp32 master weights + Adam m and v
      "kv_cache_bytes_bf16": kv_bytes(2),
      "kv_cache_bytes_fp32": kv_bytes(4),
  }
  flops, tokens = curriculum_training_flops(config, counts)
  result["curriculum_tokens"], result["curriculum_train_flops"] = tokens, flops
  result["curriculum_train_flops_per_token"] = flops / tokens
  # The curriculum's mix of shorter contexts and MoD at capacity 1 costs more per token than full context
  # at the target capacity (`train_flops_per_token`): 114G against 94G for PI.
  result["paper_training_tokens"] = PAPER_TRAINING_FLOPS / result["curriculum_train_flops_per_token"]
  return result


def abstract_state(config: ml_collections.ConfigDict):
  """The train state's arrays as boxed shapes with their logical axes (`jax.eval_shape`: nothing allocated)."""
  from diffmoe_jax.train import state as state_lib
  model = model_lib.build_model(config.model)
  init = state_lib.init_fn(model, state_lib.make_optimizer(config.optimizer), seq_len=config.model.max_seq_len)
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def state_bytes_per_device(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], boxed) -> int:
  """One device's share of `boxed` (`abstract_state(config)`, or a part of it such as its params), in bytes.

  Each array's shard is read off the sharding the trainer gives it: its logical axes mapped to mesh axes
  by `mesh.axis_rules`, each dimension split by the sizes of its mesh axes. So only what really shards
  over an axis is divided by it (on an expert axis, just the expert weights). A mesh that does not divide
  a dimension is a ConfigError naming it.
  """
  from diffmoe_jax import parallel
  shards = parallel.shard_shapes(boxed, mesh_shape, parallel.axis_rules(config.mesh))
  return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in shards)


def training_memory_per_device(config: ml_collections.ConfigDict, mesh_shape: dict[str, int],
                               boxed=None) -> dict:
  """Bytes one device needs to train: its shard of the state, the gradients and the update's temporaries
  (`step_temporaries`) and the activations of the largest phase (`activation_bytes`); `largest_phase` is
  that phase's (name, sequences per device in one micro-batch, sequence length).

  The state is summed from the shardings the trainer builds (`state_bytes_per_device`).
  `boxed`: `abstract_state(config)`, when the caller sizes several meshes.
  """
  from diffmoe_jax import parallel
  from diffmoe_jax.train.curriculum import Curriculum  # the phases give the largest batch and length
  boxed = abstract_state(config) if boxed is None else boxed
  state = state_bytes_per_device(config, mesh_shape, boxed)
  rules = parallel.axis_rules(config.mesh)
  batch_split = parallel.logical_axis_size(mesh_shape, rules, "batch")
  activations, largest = 0.0, None
  for phase in Curriculum(config).phases:
    b = max(phase.batch_size // (batch_split * config.optimizer.grad_accum_steps), 1)
    capacity = max(phase.mod_capacity_start, phase.mod_capacity_end) if phase.mod_enabled else 1.0
    phase_bytes = activation_bytes(config.model, b, phase.seq_len, mod_capacity=capacity,
                                   tensor=parallel.logical_axis_size(mesh_shape, rules, "heads"))
    if phase_bytes > activations:
      activations, largest = phase_bytes, (phase.name, b, phase.seq_len)
  gradients = step_temporaries(config, mesh_shape, activations, boxed)
  return {"state": state, "gradients": gradients, "activations": activations,
          "total": state + gradients + activations, "largest_phase": largest}


# The update's peak in weights' shards: measured on the compiled step where it binds, 2.77 data-parallel, 2.44
# and 2.43 on data x expert x tensor and expert x tensor meshes (8 simulated devices), 2.41 for PI-P on one
# device (at 3, as when the new values were all computed before the step knew they were finite: 1.08-1.25x).
UPDATE_WEIGHTS = 2.75
# The compute-dtype weight copies and their gradients the step holds, in copies' shards (measured 1.0-1.85).
CAST_COPIES = 1.5


def step_temporaries(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], activations: float,
                     boxed=None) -> float:
  """What the compiled train step holds beyond the state and `activations`, in bytes, at the larger of its
  two peaks. During the backward: the gradient, sharded like the weights, and one layer group's weights
  whole along "embed", with the activations; where the mesh splits "embed" (FSDP) the group's weights are
  all-gathered for its use and its gradient is whole until it is reduce-scattered, so that twice (an
  expert or tensor split stays). After the backward, when the activations are gone: the gradient and the
  update's new weights and Adam moments, as many of them as XLA does not write into the donated old ones:
  `UPDATE_WEIGHTS` times the weights' shard. At either peak, the matmul weights' compute-dtype copies
  (`model.cast_weights`) and their gradients before these are cast back: XLA keeps them for the update too
  (compiled, 1.0-1.85 times the copies' shard on the meshes of tests/test_estimate.py: `CAST_COPIES`)."""
  from diffmoe_jax import parallel
  boxed = abstract_state(config) if boxed is None else boxed
  weights = state_bytes_per_device(config, mesh_shape, boxed.params)
  gathered = 2 if parallel.logical_axis_size(mesh_shape, parallel.axis_rules(config.mesh), "embed") > 1 else 1
  backward = weights + gathered * _group_weight_bytes(config, mesh_shape, boxed.params) + activations
  cast = CAST_COPIES * _cast_weight_bytes(config, mesh_shape, boxed.params)
  return max(backward, UPDATE_WEIGHTS * weights) + cast - activations


def _cast_weight_bytes(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], params) -> float:
  """The bytes of one device's shard of `model.cast_weights`'s compute-dtype copies (none when the compute
  dtype is the weights', or with `model.cast_weights_once` False)."""
  from diffmoe_jax import parallel
  if not config.model.cast_weights_once:
    return 0.0
  compute = jnp.dtype(config.model.dtype)
  return sum(math.prod(shape) * compute.itemsize
             for path, shape, dtype in parallel.shard_shapes(params, mesh_shape, parallel.axis_rules(config.mesh))
             if path.rpartition("/")[2] in model_lib.COMPUTE_DTYPE_WEIGHTS and jnp.dtype(dtype) != compute)


def _group_weight_bytes(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], params) -> float:
  """The bytes of the largest layer group's weights on one device while it runs: its shard, gathered whole
  along "embed"."""
  from diffmoe_jax import parallel
  rules = tuple((name, None if name == "embed" else axes) for name, axes in parallel.axis_rules(config.mesh))
  _, groups, _ = model_lib.layer_layout(config.model)
  sizes = [sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in parallel.shard_shapes(tree, mesh_shape, rules))
           / (groups if name == "groups" else 1)
           for name, tree in params.items() if name == "groups" or name.startswith(("group_", "tail_"))]
  return max(sizes, default=0.0)


def activation_bytes(cfg: ml_collections.ConfigDict, batch: int, seq_len: int, *, mod_capacity: float | None = None,
                     tensor: int = 1) -> float:
  """Activation memory of one device's train step on `batch` sequences of `seq_len` tokens, in bytes.

  With full remat (and with the other policies but "none", plus what each layer keeps: `_kept_by_remat`): the
  residual stream saved at each scanned group, one group's working set while it is
  recomputed for its backward pass (per layer, attention: q, k, v and the output, token by model width,
  and the attention maps' probabilities with their gradient on the explicit path (one map for standard
  attention, two for differential), one block pair per map on the blockwise and kernel paths; the FFN's
  hidden rows and the MoE's dispatched rows, in and out; a routed layer at `mod_capacity` (None: the
  model's) counts only the tokens it selects) and the fp32 logits with their gradient. `tensor`: how many
  ways the heads (and the FFN width) are split; the dispatched rows are model-wide, on every device.
  `tests/test_estimate.py` holds it against the compiled program.
  """
  b, t = batch, seq_len
  size, groups, tail = model_lib.layer_layout(cfg)
  maps = 1 if cfg.attention == "standard" else 2

  def layer(tokens: int) -> float:
    impl = attention_ops.resolve_attention_impl(cfg.attention_impl, length=tokens)
    if impl in attention_ops.BLOCKWISE:
      block = math.prod(min(size or attention_ops.default_block_size(), tokens)  # as flash_attention.block_sizes
                        for size in (cfg.attention_block_q, cfg.attention_block_k))
      scores = 2 * maps * b * cfg.num_heads * block * 4
    else:
      scores = 2 * maps * b * cfg.num_heads * tokens * tokens * 4  # each map's probabilities, their gradient
    rows, width = _ffn_rows(cfg, tokens)
    return (5 * b * tokens * cfg.d_model * 4 + scores + 3 * b * rows * width * 4) / tensor + dispatched(rows)

  def dispatched(rows: int) -> float:
    """The MoE's rows gathered for the experts and their outputs before the combine, model-wide; a dense
    FFN reads the normalised tokens in place."""
    return 0 if cfg.ffn == "dense" else 2 * b * rows * cfg.d_model * 4

  residual = (groups + tail + 1) * b * t * cfg.d_model * 4
  routed_tokens = t
  if cfg.mod.enabled:
    capacity = cfg.mod.capacity if mod_capacity is None else mod_capacity
    routed_tokens = routing.mod_capacity_tokens(capacity, t)
  per_group = lambda f: (size - 1) * f(t) + f(routed_tokens) if cfg.mod.enabled else size * f(t)
  logits = 3 * b * t * cfg.vocab_size * 4
  kept = groups * per_group(lambda tokens: _kept_by_remat(cfg, b, tokens, tensor)) + tail * _kept_by_remat(
      cfg, b, t, tensor)
  return residual + kept + per_group(layer) + logits / tensor


def _ffn_rows(cfg: ml_collections.ConfigDict, tokens: int) -> tuple[int, int]:
  """Hidden activations of the train step's FFN per sequence, as (rows, width) (`dispatch.moe_ffn`)."""
  moe = cfg.moe
  if cfg.ffn == "dense":
    return tokens, dense_ffn_dim(cfg)
  if moe.dispatch == "capacity":
    rows = moe.num_experts * dispatch.moe_capacity(tokens, moe.top_k, moe.num_experts, moe.capacity_factor)
  elif dispatch.resolve_dropless_impl(moe.dropless_impl) == "padded":
    rows = moe.num_experts * tokens  # room for every token in every expert
  else:
    rows = tokens * moe.top_k  # ragged: the assignments alone
  return rows, moe.expert_ffn_dim


# The remat policies whose activations `activation_bytes` models; "none" keeps every intermediate value of
# every layer, more than is counted, and is counted as full remat.
MODELED_REMAT_POLICIES = ("full", "save_names", "dots", "dots_no_batch")
# Checkpoint names that tag a matmul's output: a "dots" policy keeps them already.
_MATMUL_NAMES = ("query_proj", "key_proj", "value_proj", "attn_out")


def _kept_by_remat(cfg: ml_collections.ConfigDict, b: int, tokens: int, tensor: int) -> float:
  """Bytes a layer keeps for its backward beyond the residual stream: the values named in
  `remat_save_names` (q, k, v split over heads by `tensor`; the flash residuals, fp32 per-map outputs and
  log-sum-exp, only on the blockwise and kernel paths), and with remat_policy "dots" / "dots_no_batch" the
  outputs of the layer's matmuls (`_matmul_outputs`). "full" keeps nothing; "none" is counted as "full"."""
  if cfg.remat_policy in ("full", "none"):
    return 0.0
  width = b * tokens * cfg.d_model * _kept_itemsize(cfg)
  maps = 1 if cfg.attention == "standard" else 2
  flash = attention_ops.resolve_attention_impl(cfg.attention_impl, length=tokens) in attention_ops.BLOCKWISE
  sizes = {"query_proj": width / tensor, "key_proj": width / tensor, "value_proj": width / tensor,
           "attn_out": width, "ffn_out": width,
           "flash_residuals": maps * b * tokens * (cfg.d_model + cfg.num_heads) * 4 / tensor if flash else 0.0}
  if cfg.remat_policy == "save_names":
    return sum(sizes[name] for name in cfg.remat_save_names)
  named = sum(sizes[name] for name in cfg.remat_save_names if name not in _MATMUL_NAMES)
  return named + _matmul_outputs(cfg, b, tokens, tensor, batched=cfg.remat_policy == "dots")


def _kept_itemsize(cfg: ml_collections.ConfigDict) -> int:
  """Bytes per element of a compute-dtype value kept through remat: XLA:CPU keeps 16-bit ones in float32
  (twice what the values take on an accelerator, measured on the compiled step)."""
  return 4 if jax.default_backend() == "cpu" else jnp.dtype(cfg.dtype).itemsize


def _matmul_outputs(cfg: ml_collections.ConfigDict, b: int, tokens: int, tensor: int, *, batched: bool) -> float:
  """Bytes of a layer's matmul outputs that a "dots" remat policy keeps (`jax.checkpoint_policies`): the q,
  k, v and output projections, the router's fp32 logits, the FFN's (or each expert's) hidden and output rows;
  with `batched` ("dots", not "dots_no_batch") also the attention's own products, which have batch
  dimensions: on the explicit path each map's fp32 scores and the weighted values, on the blockwise and
  kernel paths the fp32 combination of the maps' outputs (the products inside their loops are not kept).
  Left out: the mixture-of-depths router and predictor, a few values per token; ragged dropless experts
  (`ragged_dot` is not a matmul to the policy)."""
  size = _kept_itemsize(cfg)
  width = b * tokens * cfg.d_model * size
  kept = 3 * width / tensor + width  # q, k, v, output projection
  rows, hidden = _ffn_rows(cfg, tokens)
  if cfg.ffn == "moe":
    kept += b * tokens * cfg.moe.num_experts * 4  # router logits
    if cfg.moe.dispatch == "dropless" and dispatch.resolve_dropless_impl(cfg.moe.dropless_impl) == "ragged":
      rows = 0
  ups = 2 if cfg.moe.activation == "swiglu" else 1
  kept += b * rows * (ups * hidden / tensor + cfg.d_model) * size
  if batched:
    if attention_ops.resolve_attention_impl(cfg.attention_impl, length=tokens) in attention_ops.BLOCKWISE:
      kept += b * tokens * cfg.d_model * 4 / tensor
    else:
      maps = 1 if cfg.attention == "standard" else 2
      kept += (maps * b * cfg.num_heads * tokens * tokens * 4 + width) / tensor
  return kept


def human(x: float) -> str:
  for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if abs(x) >= scale:
      return f"{x / scale:.3f}{suffix}"
  return f"{x:.0f}"


def _scientific(x: float) -> str:
  return f"{x:.2e}"


def human_bytes(x: float) -> str:
  for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if x >= scale:
      return f"{x / scale:.2f} {suffix}"
  return f"{x:.0f} B"


def ffn_description(cfg: ml_collections.ConfigDict) -> str:
  """The model's feed-forward layer in a few words: its experts, or its one dense FFN."""
  ffn = (f"{cfg.moe.num_experts} experts x {cfg.moe.expert_ffn_dim} top-{cfg.moe.top_k}" if cfg.ffn == "moe"
         else f"dense FFN {dense_ffn_dim(cfg)}")
  return f"{ffn} ({cfg.moe.activation})"


def mod_description(cfg: ml_collections.ConfigDict) -> str:
  """The model's mixture-of-depths in a few words: which layers it routes, at what capacity, or "off"."""
  return f"every {cfg.mod.every} at {cfg.mod.capacity}" if cfg.mod.enabled else "off"


def report(config: ml_collections.ConfigDict, result: dict | None = None) -> str:
  """The table `python -m diffmoe_jax.estimate` prints: computed figures, the paper's beside them, disagreements
  flagged."""
  result = result or estimate(config)
  cfg = config.model
  claims = PAPER_CLAIMS.get(config.name, {})
  lines = [f"config {config.name or '(unnamed)'}: d_model {cfg.d_model}, {cfg.num_layers} layers, "
           f"{cfg.num_heads} heads x {cfg.head_dim}, {ffn_description(cfg)}, vocab {cfg.vocab_size}, "
           f"context {cfg.max_seq_len}, "
           f"MoD {mod_description(cfg)}",
           f"{'quantity':<40}{'computed':>16}{'paper':>12}  flag"]
  rows = [
      ("total_params", "total parameters", human),
      ("embedding_params", "  embedding + output head", human),
      ("attention_params", "  attention", human),
      ("expert_params", "  experts", human),
      ("expert_params_per_layer", "  experts per layer", human),
      ("dense_ffn_params", "  dense FFN", human),
      ("active_params_no_mod", "active parameters / token (no MoD)", human),
      ("active_params", "active parameters / token (with MoD)", human),
      ("active_params_non_embedding", "  the same, without embedding and head", human),
      ("forward_flops_per_token", "forward FLOPs / token (at context)", human),
      ("forward_flops_per_token_no_mod", "forward FLOPs / token (no MoD)", human),
      ("train_flops_per_token", "training FLOPs / token (3x fwd)", human),
      ("train_flops_per_token_full_remat", "training FLOPs / token, full remat", human),
      ("curriculum_train_flops_per_token", "training FLOPs / token, curriculum mean", human),
      ("curriculum_tokens", "tokens trained by the curriculum", human),
      ("curriculum_train_flops", "training FLOPs of the curriculum", _scientific),
      ("weights_bytes_bf16", "weights, bf16", human_bytes),
      ("weights_bytes_fp32", "weights, fp32", human_bytes),
      ("adam_state_bytes_fp32", "AdamW state (m, v), fp32", human_bytes),
      ("train_state_bytes", "training state (fp32 master + m + v)", human_bytes),
      ("kv_cache_bytes_bf16", "KV cache / sequence at context, bf16", human_bytes),
      ("kv_cache_bytes_fp32", "KV cache / sequence at context, fp32", human_bytes),
      ("paper_training_tokens", "tokens that 3.2e22 training FLOPs buy", human),
  ]
  if not claims:
    rows = [row for row in rows if row[0] != "paper_training_tokens"]
  # One FFN kind per model: its rows alone.
  absent = ("dense_ffn_params",) if cfg.ffn == "moe" else ("expert_params", "expert_params_per_layer")
  rows = [row for row in rows if row[0] not in absent]
  flagged = 0
  for key, label, fmt in rows:
    claim = claims.get(key)
    paper, flag = "", ""
    if claim is not None:
      paper = fmt(claim)
      ratio = result[key] / claim
      if abs(ratio - 1) > CLAIM_TOLERANCE:
        flag = f"DISAGREES ({ratio:.2f}x the paper)"
        flagged += 1
      else:
        flag = f"agrees ({ratio:.2f}x)"
    lines.append(f"{label:<40}{fmt(result[key]):>16}{paper:>12}  {flag}")
  if claims:
    lines.append(f"{flagged} of {len(claims)} paper figures disagree by more than {CLAIM_TOLERANCE:.0%}.")
  return "\n".join(lines)


def _main(argv) -> None:
  cli.refuse_arguments(argv, "pass --config=<file> and --config.<field>=<value> only")
  cli.quiet_library_output()
  try:
    config = validation.validate(_CONFIG.value)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(report(config))


if __name__ == "__main__":
  from absl import app, flags
  # Defined here, not at import, so that importing this module never claims the --config flag.
  _CONFIG = cli.define_config_flag(None, "Path to a config file, e.g. configs/pi.py.")
  flags.mark_flags_as_required(["config"])
  app.run(cli.interruptible(_main), flags_parser=cli.parse_flags(None))
