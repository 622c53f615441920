"""What training a config takes on one device: its shard of the train state, the step's temporaries and the
activations under each remat policy, each held against the compiled train step in tests/test_estimate.py.
The memory check before training (`train/preflight.py`) sums them per mesh.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.nn.moe import dense_ffn_dim
from diffmoe_jax.ops import attention as attention_ops
from diffmoe_jax.ops import dispatch
from diffmoe_jax.ops import routing


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
  (`step_temporaries`) and the activations of the largest phase (`activation_bytes`), or, where it needs more,
  the evaluation's activations (`eval_activation_bytes`, train.eval_batch_size sequences of model.max_seq_len
  over the batch's split) beside the state alone; `largest_phase` is the larger one's (name, sequences per
  device in one micro-batch, sequence length), its name "evaluation" for the evaluation.

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
  need = {"state": state, "gradients": gradients, "activations": activations, "evaluation": 0.0,
          "total": state + gradients + activations, "largest_phase": largest}
  eval_batch, t = max(config.train.eval_batch_size // batch_split, 1), config.model.max_seq_len
  evaluation = eval_activation_bytes(config.model, eval_batch, t,
                                     tensor=parallel.logical_axis_size(mesh_shape, rules, "heads"))
  if evaluation > gradients + activations:
    need.update(gradients=0.0, activations=0.0, evaluation=evaluation, total=state + evaluation,
                largest_phase=("evaluation", eval_batch, t))
  return need


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

  The residual stream saved at each scanned group, what each layer keeps for its backward under
  `model.remat_policy` (`_kept_for_backward`), and the larger of two working sets that are never live
  together: one group's while it is recomputed for its backward pass (per layer, attention: q, k, v and the
  output, token by model width, and the attention maps' probabilities with their gradient on the explicit
  path (one map for standard attention, two for differential), one block pair per map on the blockwise and
  kernel paths; the FFN's hidden rows and the MoE's dispatched rows, in and out; a routed layer at
  `mod_capacity` (None: the model's) counts only the tokens it selects), and the loss's: the fp32 logits
  with their gradient (`model.logits_chunk_len` positions of them at a time, when set). `tensor`: how many
  ways the heads (and the FFN width) are split; the dispatched rows are model-wide, on every device.
  `tests/test_estimate.py` holds it against the compiled program.
  """
  b, t = batch, seq_len
  size, groups, tail = model_lib.layer_layout(cfg)
  maps = 1 if cfg.attention == "standard" else 2

  def layer(tokens: int) -> float:
    scores = 2 * maps * _score_bytes(cfg, b, tokens)[0]  # each map's probabilities and their gradient
    rows, width = _ffn_rows(cfg, tokens)
    return (5 * b * tokens * cfg.d_model * 4 + scores + 3 * b * rows * width * 4) / tensor + dispatched(rows)

  def dispatched(rows: int) -> float:
    """The MoE's rows gathered for the experts and their outputs before the combine, model-wide; a dense
    FFN reads the normalised tokens in place."""
    return 0 if cfg.ffn == "dense" else 2 * b * rows * cfg.d_model * 4

  residual = (groups + tail + 1) * b * t * cfg.d_model * 4
  routed_tokens = t
  routing_capacity = cfg.mod.capacity if mod_capacity is None else mod_capacity
  if cfg.mod.enabled:
    routed_tokens = routing.mod_capacity_tokens(routing_capacity, t)
  per_group = lambda f: (size - 1) * f(t) + f(routed_tokens) if cfg.mod.enabled else size * f(t)
  # The float32 logits, kept for the backward, with their gradient; in chunks (`model.logits_chunk_len`) one
  # chunk's, recomputed in the backward, with its gradient, and the head's gradient summed in float32.
  if 0 < cfg.logits_chunk_len < t:
    logits = 2 * b * cfg.logits_chunk_len * cfg.vocab_size * 4 + cfg.d_model * cfg.vocab_size * 4
  else:
    logits = 3 * b * t * cfg.vocab_size * 4
  # XLA:CPU runs an unrolled layer's recompute beside its forward pass, keeping what no remat keeps (tiny's
  # step unrolled: 331.9 MiB of temporaries with full remat, 335.1 without; scanned, 200.4 with full remat).
  rematted = cfg.remat_policy != "none" and (cfg.scan_layers or jax.default_backend() != "cpu")
  group, full_layer = _kept_for_backward(cfg, b, t, routing_capacity, tensor, rematted=rematted)
  if rematted:
    kept = groups * group + tail * full_layer
  # Without remat the last of the unrolled layers (or groups) runs its backward at once, holding what full
  # remat's recompute of it would; a scanned group's values go into buffers stacked over the groups.
  elif tail:
    kept = groups * group + (tail - 1) * full_layer
  else:
    kept = (groups - (0 if cfg.scan_layers else 1)) * group
  return residual + kept + max(per_group(layer), logits / tensor)


def eval_activation_bytes(cfg: ml_collections.ConfigDict, batch: int, seq_len: int, *, tensor: int = 1) -> float:
  """Activation memory of one device's evaluation step (`train/step.make_eval_step`: a forward alone, its
  mixture-of-depths routed by the predictor, so a routed layer's block may see every token) on `batch`
  sequences of `seq_len` tokens, in bytes: a layer's input and output, with the larger of the layer's working
  sets (attention: q, k, v and the output, and each map's probabilities, or on the blockwise paths a block
  pair's scores and probabilities per map; the FFN: its hidden rows under model.moe.eval_dispatch and the
  dispatched rows) and the fp32 logits. `tests/test_preflight.py` holds it against the compiled step."""
  b, t = batch, seq_len
  maps = 1 if cfg.attention == "standard" else 2
  pair_bytes, blockwise = _score_bytes(cfg, b, t)
  attention = 4 * b * t * cfg.d_model * 4 / tensor + (2 if blockwise else 1) * maps * pair_bytes / tensor
  rows, width = _ffn_rows(cfg, t, dispatch_mode=cfg.moe.eval_dispatch)
  hidden = 2 if cfg.moe.activation == "swiglu" else 1  # the gate's rows too
  ffn = hidden * b * rows * width * 4 / tensor + (0 if cfg.ffn == "dense" else b * rows * cfg.d_model * 4)
  chunk = cfg.logits_chunk_len if 0 < cfg.logits_chunk_len < t else t
  logits = b * chunk * cfg.vocab_size * 4 / tensor
  return 2 * b * t * cfg.d_model * 4 + max(attention, ffn, logits)


def _score_bytes(cfg: ml_collections.ConfigDict, b: int, tokens: int) -> tuple[float, bool]:
  """The bytes of one map's fp32 scores over `tokens` positions, whole on the explicit path or one block pair's
  on the blockwise and kernel paths, and whether the path is blockwise."""
  impl = attention_ops.resolve_attention_impl(cfg.attention_impl, length=tokens)
  if impl in attention_ops.BLOCKWISE:
    block = math.prod(min(size or attention_ops.default_block_size(), tokens)  # as flash_attention.block_sizes
                      for size in (cfg.attention_block_q, cfg.attention_block_k))
    return b * cfg.num_heads * block * 4, True
  return b * cfg.num_heads * tokens * tokens * 4, False


def _ffn_rows(cfg: ml_collections.ConfigDict, tokens: int, dispatch_mode: str | None = None) -> tuple[int, int]:
  """Hidden activations of the FFN per sequence, as (rows, width) (`dispatch.moe_ffn`), under `dispatch_mode`
  (by default the train step's, model.moe.dispatch)."""
  moe = cfg.moe
  if cfg.ffn == "dense":
    return tokens, dense_ffn_dim(cfg)
  if (dispatch_mode or moe.dispatch) == "capacity":
    rows = moe.num_experts * dispatch.moe_capacity(tokens, moe.top_k, moe.num_experts, moe.capacity_factor)
  elif dispatch.resolve_dropless_impl(moe.dropless_impl) == "padded":
    rows = moe.num_experts * tokens  # room for every token in every expert
  else:
    rows = tokens * moe.top_k  # ragged: the assignments alone
  return rows, moe.expert_ffn_dim


def _kept_for_backward(cfg: ml_collections.ConfigDict, b: int, t: int, mod_capacity: float, tensor: int, *,
                       rematted: bool) -> tuple[float, float]:
  """Bytes one device's scanned layer group, and a trailing full layer, keep for their backward beyond
  their input: the residuals of their vjp in training, under `model.remat_policy` if `rematted` (what the
  policy saves: named values, matmul outputs), else all of them. Traced by `jax.make_jaxpr` on one sequence
  of `t` tokens (nothing compiled or allocated), times `b` (each sequence's values are its own); only the
  values computed from the tokens count, not the inputs (the residual stream is counted elsewhere) or
  values of the weights alone. The layers are traced as one device's part of them: `tensor` splits the
  heads and the FFN width. On the CPU 16-bit values count at 4 bytes, as XLA:CPU keeps them in float32."""
  if rematted and cfg.remat_policy == "full":
    return 0.0, 0.0  # the group's input alone
  group, full_layer = _kept_per_sequence(ml_collections.FrozenConfigDict(_one_devices_part(cfg, tensor)), t,
                                         mod_capacity, jax.default_backend(), rematted)
  return b * group, b * full_layer


def _one_devices_part(cfg: ml_collections.ConfigDict, tensor: int) -> ml_collections.ConfigDict:
  """The model section with the heads and the FFN width a `tensor`-way split leaves one device."""
  if tensor == 1:
    return cfg
  part = ml_collections.ConfigDict(cfg.to_dict())
  part.num_heads = -(-cfg.num_heads // tensor)
  part.moe.expert_ffn_dim = -(-cfg.moe.expert_ffn_dim // tensor)
  part.dense_ffn_dim = -(-dense_ffn_dim(cfg) // tensor) if cfg.ffn == "dense" else cfg.dense_ffn_dim
  return part


@functools.lru_cache(maxsize=64)  # the memory check sizes many meshes, each phase at the same lengths
def _kept_per_sequence(cfg: ml_collections.FrozenConfigDict, t: int, mod_capacity: float, backend: str,
                       rematted: bool) -> tuple[float, float]:
  size, groups, tail = model_lib.layer_layout(cfg)
  key = jax.random.PRNGKey(0)
  x = jax.ShapeDtypeStruct((1, t, cfg.d_model), jnp.float32)
  positions = jax.ShapeDtypeStruct((1, t), jnp.int32)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
  itemsize = lambda dtype: 4 if backend == "cpu" and dtype.itemsize == 2 else dtype.itemsize
  as_trained = lambda cls, scanned: model_lib.remat_layer(cls, cfg, scanned=scanned) if rematted else cls

  def kept(layer, *args) -> float:
    variables = jax.eval_shape(lambda x, *a: layer.init({"params": key, "noise": key}, x, *a), x, *args)
    params = jax.eval_shape(lambda p: model_lib.cast_weights(p, cfg), nn.unbox(variables["params"]))
    forward = lambda params, x, *a: layer.apply({"params": params}, x, *a, rngs={"noise": key})[0]
    jaxpr = jax.make_jaxpr(lambda p, x, *a: jax.vjp(lambda p, x: forward(p, x, *a), p, x)[1])(
        params, x, *args).jaxpr
    # The values computed from the tokens (x, positions, ...), not those from the weights alone (an
    # expert's slice of the stacked expert weights): the latter are no activations, and XLA reads the
    # weights in place.
    named = lambda values: [v for v in values if not isinstance(v, jax.extend.core.Literal)]
    per_token = set(jaxpr.invars[len(jax.tree.leaves(params)):])
    for eqn in jaxpr.eqns:
      if any(v in per_token for v in named(eqn.invars)):
        per_token.update(eqn.outvars)
    residuals = per_token.intersection(named(jaxpr.outvars)) - set(jaxpr.invars)
    return sum(math.prod(v.aval.shape) * itemsize(v.aval.dtype) for v in residuals)

  group = full_layer = 0.0
  if groups:
    layer_group = as_trained(model_lib.LayerGroup, cfg.scan_layers)(
        cfg, size, routed_last=cfg.mod.enabled, train=True, mod_mode="topk", mod_capacity=mod_capacity)
    group = kept(layer_group, scalar(jnp.int32), positions, scalar(jnp.float32))
  if tail:
    full_layer = kept(as_trained(model_lib.FullLayer, False)(cfg, train=True), positions, scalar(jnp.int32),
                      scalar(jnp.float32))
  return group, full_layer
