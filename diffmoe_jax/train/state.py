"""The train state, the optimizer, and sharded initialisation."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffmoe_jax import parallel
from diffmoe_jax.config import LOSS_SCALE_INIT

# The weight matrices that carry the model's features (embedding, attention, FFN / experts, head) get
# weight decay. Norms, λ vectors, biases and all routing parameters (the MoE router, the MoD score and
# predictor) do not: a router's scale is how decisive its routing is, which the z-loss governs (MoE) or
# the top-k needs no prior on (MoD), and the predictor is fit by its own BCE loss. By name, not by rank,
# because scanned parameters carry an extra leading layer axis (a stacked norm scale is 2-D).
DECAYED = frozenset({"table", "lm_head", "wq", "wk", "wv", "wo", "w_in", "w_out", "w_gate"})


@flax.struct.dataclass
class LossScale:
  """Dynamic loss scaling of float16 training (model.dtype "float16"): the loss is multiplied by `scale` before
  differentiation, so that small gradients stay above float16's smallest subnormal (~6e-8), and the
  gradients are divided by it in float32. An overflow (non-finite gradients from a finite loss) skips the
  update and halves the scale; `train.loss_scale_growth_interval` finite steps in a row double it."""
  scale: jax.Array  # float32: S
  good_steps: jax.Array  # int32: finite steps in a row since the last skipped step or growth of the scale
  overflow_total: jax.Array  # int32: updates skipped for an overflow, which halved the scale


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32: steps completed (the index of the next step)
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 base key; step s uses fold_in(rng, s), so the stream depends on the step alone
  # int32: updates skipped for a non-finite loss, gradient or weight (with a loss scale, a gradient overflow
  # counts only at the scale's floor: above it, the scale halves instead)
  nonfinite_total: jax.Array
  nonfinite_streak: jax.Array  # int32: updates counted in nonfinite_total since the last applied one
  # float16 compute only; None otherwise, so the state (and its checkpoints) of other dtypes has no such leaves
  loss_scale: LossScale | None = None


def decay_mask(params) -> Any:
  return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[-1], "key", "")) in DECAYED, params)


def make_optimizer(opt_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW without its learning rate: the step scales updates by the curriculum's lr(step)."""
  return optax.chain(
      optax.clip_by_global_norm(opt_config.grad_clip),
      optax.scale_by_adam(b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps),
      optax.add_decayed_weights(opt_config.weight_decay, mask=decay_mask),
  )


def init_fn(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int,
            loss_scale_init: float = LOSS_SCALE_INIT) -> Callable:
  """rng -> TrainState with logically-partitioned (boxed) params, for eval_shape and jit; with a LossScale
  starting at `loss_scale_init` when the model computes in float16."""
  def init(rng):
    params_rng, noise_rng, state_rng = jax.random.split(rng, 3)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init({"params": params_rng, "noise": noise_rng}, tokens)["params"]
    zero = jnp.zeros((), jnp.int32)
    loss_scale = (LossScale(scale=jnp.float32(loss_scale_init), good_steps=zero, overflow_total=zero)
                  if model.config.dtype == "float16" else None)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params), rng=state_rng,
                      nonfinite_total=zero, nonfinite_streak=zero, loss_scale=loss_scale)
  return init


def with_loss_scale(state: TrainState, scaled: bool, init: float = LOSS_SCALE_INIT) -> TrainState:
  """`state`, concrete or abstract (ShapeDtypeStructs), with its loss scale if `scaled` (a new one at `init`,
  placed as `state.step` is, where it has none), else without one: how a checkpoint saved with model.dtype
  "float16" resumes with another dtype, and the other way round."""
  if not scaled:
    return state.replace(loss_scale=None)
  if state.loss_scale is not None:
    return state
  step = state.step
  if isinstance(step, jax.ShapeDtypeStruct):
    new = lambda value, dtype: jax.ShapeDtypeStruct((), dtype, sharding=step.sharding)
  else:
    new = lambda value, dtype: jax.device_put(jnp.asarray(value, dtype), step.sharding)
  return state.replace(loss_scale=LossScale(scale=new(init, jnp.float32), good_steps=new(0, jnp.int32),
                                            overflow_total=new(0, jnp.int32)))


def create_state(model, optimizer, mesh, rules, *, seed: int, seq_len: int,
                 loss_scale_init: float = LOSS_SCALE_INIT):
  """(abstract state with shardings, state shardings, a function making the real state on the mesh).

  Parameters are created directly in their shards by a jit with out_shardings: nothing full-size is
  ever materialised on one device.
  """
  init = init_fn(model, optimizer, seq_len, loss_scale_init)
  rng = jax.random.PRNGKey(seed)
  boxed = jax.eval_shape(init, rng)
  parallel.shard_shapes(boxed, dict(mesh.shape), rules)  # a dimension the mesh cannot split: a ConfigError
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                          shardings)

  def make():
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return abstract, shardings, make
