"""The train step and the evaluation step, as pure functions to be jitted over the mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffmoe_jax.config import LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_MIN
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train.state import LossScale, TrainState


def dynamic_settings(settings) -> dict:
  """The per-step scalars that vary inside one compiled step (no recompilation)."""
  p = settings.phase
  return {"lr": settings.lr, "router_noise": settings.router_noise,
          "load_balance_weight": p.load_balance_weight, "z_loss_weight": p.z_loss_weight,
          "mod_predictor_weight": p.mod_predictor_weight if settings.mod_mode == "topk" else 0.0}


def make_train_step(model, optimizer: optax.GradientTransformation, *, mod_mode: str, mod_capacity: float,
                    grad_accum_steps: int = 1, loss_scale_growth_interval: int = LOSS_SCALE_GROWTH_INTERVAL,
                    loss_scale_min: float = LOSS_SCALE_MIN):
  """(state, batch, dynamic) -> (state, metrics). Static: the MoD mode and capacity, the accumulation, and
  how a state's LossScale (float16 compute) changes: doubled after `loss_scale_growth_interval` finite steps
  in a row, halved on an overflow down to `loss_scale_min`.

  batch: "inputs", "targets" int32 `[B, T]`, and optional "segment_ids" `[B, T]` (packed documents: attention
  stays inside each).
  """

  def loss_fn(params, batch, rng, dyn, scale):
    variables = {"params": model_lib.cast_weights(params, model.config)}
    token_ce, aux = model.apply(variables, batch["inputs"], train=True, mod_mode=mod_mode,
                                mod_capacity=mod_capacity, router_noise_std=dyn["router_noise"],
                                segment_ids=batch.get("segment_ids"), targets=batch["targets"], rngs={"noise": rng})
    ce = jnp.mean(token_ce)
    losses = aux["losses"]
    total = (ce + dyn["load_balance_weight"] * losses["load_balance"] + dyn["z_loss_weight"] * losses["router_z"]
             + dyn["mod_predictor_weight"] * losses["mod_predictor"])
    # Differentiated: the loss times the loss scale S (in float32: S x loss may exceed float16's range).
    scaled = total if scale is None else total.astype(jnp.float32) * scale
    return scaled, {"loss": total, "cross_entropy": ce, **{f"{k}_loss": v for k, v in losses.items()},
                   "layers": aux["layers"]}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict, dyn: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    batch = {k: batch[k] for k in ("inputs", "targets", "segment_ids") if k in batch}
    scale = None if state.loss_scale is None else state.loss_scale.scale
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch, rng, dyn, scale)
    else:
      # Micro-batch i is rows i, i + A, i + 2A, ... (A = grad_accum_steps): with the batch split over
      # devices in contiguous blocks, every device then holds its share of every micro-batch, and nothing
      # moves between devices. (Contiguous micro-batches would each sit on a fraction of the devices.)
      micro = lambda x: jnp.swapaxes(
          x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps) + x.shape[1:]), 0, 1)

      micro_batches = jax.tree.map(micro, batch)

      def accumulate(carry, xs):
        i, micro_batch = xs
        (_, m), g = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, i), dyn, scale)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                           jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro_batches),
                                                          rng, dyn, scale)))
      zeros = (zeros[1], zeros[0][1])
      (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches))
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
    if scale is not None:  # the float32 gradients (of the float32 master weights), unscaled
      grads = jax.tree.map(lambda g: g / scale, grads)

    grad_norm = optax.tree.norm(grads)
    # A non-finite loss, gradient or learning rate leaves params and optimizer state as they were, and is
    # counted: the state stays the last good one. Decided before the update, so XLA fuses the choice into
    # the update's one pass over the weights and both moments (from finite gradients and learning rate,
    # Adam's steps are bounded, so the updated weights are finite too). Checking the updated weights
    # instead took a reduction over them and a select over all three trees after the update: the selects
    # alone were 6.8 ms of a PI-P 4-layer step of 51 ms on an H200.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(dyn["lr"])
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = jax.tree.map(lambda p, u: p - dyn["lr"] * u.astype(p.dtype), state.params, updates)
    counted = ~finite
    loss_scale, scale_metrics = state.loss_scale, {}
    if loss_scale is not None:
      # Gradients that overflowed from a finite loss: skipped and the scale halved, not counted as non-finite
      # unless the scale is already at its floor.
      overflow = jnp.isfinite(metrics["loss"]) & ~jnp.isfinite(grad_norm) & (loss_scale.scale > loss_scale_min)
      counted = counted & ~overflow
      loss_scale = next_loss_scale(loss_scale, finite, overflow, loss_scale_growth_interval, loss_scale_min)
      scale_metrics = {"loss_scale": loss_scale.scale, "overflow_skipped": overflow.astype(jnp.int32),
                       "overflow_total": loss_scale.overflow_total}
    streak = jnp.where(finite, 0, state.nonfinite_streak + counted.astype(jnp.int32))
    new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                              opt_state=keep(new_opt_state, state.opt_state),
                              nonfinite_total=state.nonfinite_total + counted.astype(jnp.int32),
                              nonfinite_streak=streak, loss_scale=loss_scale)
    metrics = {**metrics, "grad_norm": grad_norm, "lr": jnp.asarray(dyn["lr"], jnp.float32),
               "router_noise": jnp.asarray(dyn["router_noise"], jnp.float32),
               "update_skipped": (~finite).astype(jnp.int32), "nonfinite_total": new_state.nonfinite_total,
               "nonfinite_streak": streak, **scale_metrics}
    return new_state, metrics

  return train_step


def config_train_step(config, model, optimizer: optax.GradientTransformation, *, mod_mode: str, mod_capacity: float):
  """`make_train_step` with `config`'s gradient accumulation and float16 loss-scale settings: the step that
  `python -m diffmoe_jax.main` trains with (the benchmarks time this one too)."""
  return make_train_step(model, optimizer, mod_mode=mod_mode, mod_capacity=mod_capacity,
                         grad_accum_steps=config.optimizer.grad_accum_steps,
                         loss_scale_growth_interval=config.train.loss_scale_growth_interval,
                         loss_scale_min=config.train.loss_scale_min)


def next_loss_scale(loss_scale: LossScale, finite: jax.Array, overflow: jax.Array, growth_interval: int,
                    minimum: float) -> LossScale:
  """The LossScale after a step: halved (down to `minimum`) on an overflow, doubled after `growth_interval`
  finite steps in a row (while twice it is a finite float32), else as it was; any skipped step restarts the
  count."""
  good_steps = jnp.where(finite, loss_scale.good_steps + 1, 0)
  grow = (good_steps >= growth_interval) & jnp.isfinite(loss_scale.scale * 2)
  scale = jnp.where(overflow, jnp.maximum(loss_scale.scale / 2, minimum),
                    jnp.where(grow, loss_scale.scale * 2, loss_scale.scale))
  return LossScale(scale=scale, good_steps=jnp.where(grow, 0, good_steps),
                   overflow_total=loss_scale.overflow_total + overflow.astype(jnp.int32))


def make_eval_step(model):
  """(params, batch) -> (sum of token cross-entropies in nats, token count).

  Evaluation routes mixture-of-depths by the causal predictor (the inference-time mode), so validation
  loss never sees a later token. Optional batch["weights"] (float `[B, T]`) weigh the tokens: 0 leaves
  one out (padding), and the count is their sum; optional batch["segment_ids"] as in `make_train_step`.
  """
  def eval_step(params, batch):
    ce, _ = model.apply({"params": params}, batch["inputs"], train=False, mod_mode="predictor",
                        segment_ids=batch.get("segment_ids"), targets=batch["targets"])
    if "weights" not in batch:
      return jnp.sum(ce), jnp.asarray(ce.size, jnp.float32)
    return jnp.sum(ce * batch["weights"]), jnp.sum(batch["weights"])
  return eval_step
