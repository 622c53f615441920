"""The decoder LM: blocks, mixture-of-depths layer groups, scan and remat, and the forward pass.

Layers come in groups of `mod.every`: the first `every − 1` run every token, the last is routed by
mixture-of-depths. Groups are scanned (`nn.scan`, leading parameter axis "layers") so compile time and
memory do not grow with depth; `num_layers % every` trailing full-depth layers follow unscanned (PI-P's
27 layers are 13 groups and one layer). `scan_layers=False` unrolls groups into `group_<g>` modules with
the same per-layer parameters; `unstack_groups` / `stack_groups` convert between the two layouts.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffmoe_jax import validation
from diffmoe_jax.nn.attention import Attention, is_decoding
from diffmoe_jax.nn.layers import RESIDUAL, Embed, RMSNorm, constrain, dtype_of, logits_product, param
from diffmoe_jax.nn.mod import MoDRouter
from diffmoe_jax.nn.moe import DenseFeedForward, MoEFeedForward
from diffmoe_jax.ops import attention as attention_ops
from diffmoe_jax.ops import loss as loss_lib
from diffmoe_jax.ops import routing

MOD_MODES = ("topk", "predictor", "off")
_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm attention then feed-forward; returns the block's update `attn + ffn` (not x + update).

  With `moe.route_from="attention_input"` the MoE routes each token from the attention's input, and the
  expert-conditional λ mixes over exactly those (noisy, in training) experts; with "ffn_input" the MoE
  routes from its own input and λ is gated by a noise-free top-k of the same router on the attention input.
  `token_mask` (bool `[B, T]`) marks the tokens that run the block: the others take no expert slot.
  `capacity_tokens`: the tokens per sequence the experts' slots are figured from in capacity mode (default T).
  """
  config: ml_collections.FrozenConfigDict
  train: bool = False

  @nn.compact
  def __call__(self, x, positions, layer_index, noise_std, kv_mask=None, token_mask=None, segment_ids=None,
               capacity_tokens=None):
    cfg = self.config
    norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    h = RMSNorm(**norm, name="attn_norm")(x)
    ffn = MoEFeedForward(cfg, name="moe") if cfg.ffn == "moe" else DenseFeedForward(cfg, name="ffn")
    route = None
    if cfg.ffn == "moe" and cfg.moe.route_from == "attention_input":
      route = ffn.route(h, noise_std=noise_std, train=self.train)
    lambda_gate = None
    if cfg.expert_conditional_lambda:
      lambda_gate = route[1:] if route is not None else ffn.gate(h)
    attn, attn_stats = Attention(cfg, name="attention")(h, positions, layer_index, lambda_gate=lambda_gate,
                                                        kv_mask=kv_mask, segment_ids=segment_ids)
    attn = attn.astype(jnp.float32)
    out, ffn_stats = ffn(RMSNorm(**norm, name="ffn_norm")(x + attn), noise_std=noise_std, train=self.train,
                         route=route, token_mask=token_mask, capacity_tokens=capacity_tokens)
    return attn + out.astype(jnp.float32), {**attn_stats, **ffn_stats}


def _mod_stats(selected_fraction, predictor_loss, predictor_accuracy) -> dict:
  return {"mod_selected_fraction": jnp.asarray(selected_fraction, jnp.float32),
          "mod_predictor_loss": jnp.asarray(predictor_loss, jnp.float32),
          "mod_predictor_accuracy": jnp.asarray(predictor_accuracy, jnp.float32)}


class FullLayer(nn.Module):
  config: ml_collections.FrozenConfigDict
  train: bool = False

  @nn.compact
  def __call__(self, x, positions, layer_index, noise_std, segment_ids=None):
    delta, stats = Block(self.config, self.train, name="block")(x, positions, layer_index, noise_std,
                                                                segment_ids=segment_ids)
    return x + delta, {**stats, **_mod_stats(1.0, 0.0, 1.0)}


class RoutedLayer(nn.Module):
  """A mixture-of-depths layer. The block's update is always scaled by sigmoid(score), so the router learns
  and every mode computes the same function of the tokens it runs (MoD "off" equals top-k at capacity 1).

  "topk" (training): the top ceil(capacity·T) tokens of each sequence by router score run the block among
  themselves at their original positions; the rest pass unchanged. "predictor" (causal inference): tokens
  whose predictor says yes run the block; the others are hidden from attention, take no expert slot and
  pass unchanged; capacity dispatch gives each expert the slots of training's ceil(capacity·T) tokens.
  "off": every token runs the block.

  Decoding (a mutable "cache" collection) in "predictor" mode with `mod_skip`: when the predictor rejects
  every token of the call (a one-token step at batch 1: the token), the block does not run at all and
  leaves its cache as it was, which is where mixture-of-depths saves compute at inference.
  """
  config: ml_collections.FrozenConfigDict
  train: bool = False
  mod_mode: str = "topk"
  mod_capacity: float = 0.125
  mod_skip: bool = True

  @nn.compact
  def __call__(self, x, positions, layer_index, noise_std, segment_ids=None):
    block = Block(self.config, self.train, name="block")
    score, predictor_logit = MoDRouter(self.config, name="mod_router")(x)
    weight = jax.nn.sigmoid(score)[..., None]
    if self.mod_mode == "off":
      delta, stats = block(x, positions, layer_index, noise_std, segment_ids=segment_ids)
      return x + weight * delta, {**stats, **_mod_stats(1.0, 0.0, 1.0)}
    num_selected = routing.mod_capacity_tokens(self.mod_capacity, x.shape[1])
    indices = routing.mod_select(score, num_selected)
    slots = routing.selected_slots(indices, x.shape[1])
    target = slots < num_selected
    if self.mod_mode == "topk":
      selected_x = routing.move_rows(x, indices, slots)
      selected_positions = routing.take_rows(positions, indices)
      selected_segments = None if segment_ids is None else routing.take_rows(segment_ids, indices)
      delta, stats = block(selected_x, selected_positions, layer_index, noise_std,
                           segment_ids=selected_segments)
      # The updates go back to their tokens as a gather (zero rows elsewhere) added to x.
      update = routing.move_rows(routing.take_rows(weight, indices) * delta, slots, indices)
      x = (x + update).astype(x.dtype)
      selected = target
    else:
      selected = predictor_logit > 0.0
      args = (x, positions, layer_index, noise_std, selected, selected, segment_ids)
      # Capacity dispatch gives each expert the slots of training, which runs the block on num_selected tokens.
      run = lambda blk, *a: blk(*a, capacity_tokens=num_selected)
      if self.mod_skip and is_decoding(self) and self.has_variable("cache", "block"):  # not while creating it
        delta, stats = nn.cond(jnp.any(selected), run, _block_not_run, block, *args)
      else:
        delta, stats = run(block, *args)
      x = x + jnp.where(selected[..., None], weight * delta, 0.0)
    target_f = target.astype(jnp.float32)
    predictor_loss = jnp.mean(optax.sigmoid_binary_cross_entropy(predictor_logit, target_f))
    accuracy = jnp.mean(((predictor_logit > 0.0) == target).astype(jnp.float32))
    return x, {**stats, **_mod_stats(jnp.mean(selected.astype(jnp.float32)), predictor_loss, accuracy)}


def _block_not_run(block, x, positions, layer_index, noise_std, *token_arrays):
  """A skipped block's result: no update, zero stats. The block runs on none of the tokens (a length-0
  slice) only for its stats' shapes, so it computes nothing and writes nothing into the cache."""
  none = lambda a: None if a is None else a[:, :0]
  _, stats = block(none(x), none(positions), layer_index, noise_std, *map(none, token_arrays))
  return jnp.zeros_like(x), jax.tree.map(jnp.zeros_like, stats)


class LayerGroup(nn.Module):
  """`size` consecutive layers; the last is routed when `routed_last`. Returns stats stacked `[size, ...]`."""
  config: ml_collections.FrozenConfigDict
  size: int
  routed_last: bool
  train: bool = False
  mod_mode: str = "topk"
  mod_capacity: float = 0.125
  mod_skip: bool = True

  @nn.compact
  def __call__(self, x, group_index, positions, noise_std, segment_ids=None):
    stats = []
    for j in range(self.size):
      layer_index = group_index * self.size + j
      if self.routed_last and j == self.size - 1:
        layer = RoutedLayer(self.config, self.train, self.mod_mode, self.mod_capacity, self.mod_skip,
                            name=f"layer_{j}")
      else:
        layer = FullLayer(self.config, self.train, name=f"layer_{j}")
      x, layer_stats = layer(x, positions, layer_index, noise_std, segment_ids)
      x = constrain(x, RESIDUAL)
      stats.append(layer_stats)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *stats)


def layer_layout(cfg) -> tuple[int, int, int]:
  """(group size, number of scanned groups, number of trailing full layers)."""
  size = cfg.mod.every if cfg.mod.enabled else 1
  groups, tail = divmod(cfg.num_layers, size)
  return size, groups, tail


def routed_layers(cfg) -> slice:
  """The mixture-of-depths layers, the last of each group, as a slice of the layer axis (empty without MoD);
  a slice, not a list, so a config of absurdly many layers costs nothing to describe."""
  size, groups, _ = layer_layout(cfg)
  return slice(size - 1, groups * size, size) if cfg.mod.enabled else slice(0, 0)


def remat_layer(cls, cfg, *, scanned: bool):
  """`cls` under `model.remat_policy` (itself when "none")."""
  if cfg.remat_policy == "none":
    return cls
  names = jax.checkpoint_policies.save_only_these_names(*cfg.remat_save_names)
  if cfg.remat_policy == "save_names":
    policy = names
  elif cfg.remat_save_names:  # a dots policy, and the named values besides (validation allows no other)
    policy = jax.checkpoint_policies.save_from_both_policies(_REMAT_POLICIES[cfg.remat_policy], names)
  else:
    policy = _REMAT_POLICIES[cfg.remat_policy]
  # Inside a scan the loop already stops XLA from merging the recomputation away.
  return nn.remat(cls, policy=policy, prevent_cse=not scanned)


class Transformer(nn.Module):
  """Decoder-only LM. `__call__(tokens [B, T]) -> (logits [B, T, V] fp32, aux)`; optional `segment_ids`
  `[B, T]` keep attention inside each packed document. With `targets` (token ids `[B, T]`) it returns each
  token's cross-entropy `[B, T]` in nats instead of the logits, computed `model.logits_chunk_len` positions
  at a time when that is shorter than T (`loss.chunked_token_cross_entropy`: the whole logits never exist).
  Token ids must lie in [0, vocab_size): traced ids cannot be checked, and the embedding lookup gives NaN
  for an id past the table (a negative one wraps).

  aux = {"losses": {"load_balance", "router_z", "mod_predictor"} (means over the layers they apply to),
         "layers": {"expert_load" [L, E], "dropped_fraction" [L], "lambda" [L, n],
                    "mod_selected_fraction" [L_routed], "mod_predictor_accuracy" [L_routed]}}

  Decoding: apply with `mutable=["cache"]` and a "cache" collection (from `init_cache`), in "predictor"
  mode, with each token's `positions`; every attention layer then reads and extends its KV cache (see
  `Attention`), and routed layers skip their block for a step the predictor rejects unless `mod_skip` is
  False (then they mask, as the full forward pass does).
  """
  config: ml_collections.FrozenConfigDict  # the model section

  @nn.compact
  def __call__(self, tokens, positions=None, *, train: bool = False, mod_mode: str = "topk",
               mod_capacity: float | None = None, router_noise_std=0.0, segment_ids=None, mod_skip: bool = True,
               targets=None):
    cfg = self.config
    if mod_mode not in MOD_MODES:
      raise ValueError(f"mod_mode must be one of {MOD_MODES}, got {mod_mode!r}.")
    _check_token_arrays(tokens, positions, segment_ids)
    batch, length = tokens.shape
    if positions is None:
      positions = attention_ops.default_positions(batch, length)
    embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, cfg.dtype, cfg.param_dtype, name="embed")
    x = constrain(embed(tokens).astype(jnp.float32), RESIDUAL)
    noise_std = jnp.asarray(router_noise_std, jnp.float32)
    size, groups, tail = layer_layout(cfg)
    group_args = dict(config=cfg, size=size, routed_last=cfg.mod.enabled, train=train, mod_mode=mod_mode,
                      mod_capacity=cfg.mod.capacity if mod_capacity is None else mod_capacity, mod_skip=mod_skip)
    group_cls = remat_layer(LayerGroup, cfg, scanned=cfg.scan_layers)
    if cfg.scan_layers:
      scanned = nn.scan(group_cls, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "noise": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=groups,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, stats = scanned(**group_args, name="groups")(x, jnp.arange(groups), positions, noise_std, segment_ids)
      per_layer = [jax.tree.map(lambda a: a.reshape((groups * size,) + a.shape[2:]), stats)]
    else:
      per_layer = []
      for g in range(groups):
        x, stats = group_cls(**group_args, name=f"group_{g}")(x, jnp.asarray(g), positions, noise_std,
                                                              segment_ids)
        per_layer.append(stats)
    tail_cls = remat_layer(FullLayer, cfg, scanned=False)  # the layers after the last whole group
    for i in range(tail):
      x, stats = tail_cls(cfg, train, name=f"tail_{i}")(x, positions, groups * size + i, noise_std, segment_ids)
      per_layer.append(jax.tree.map(lambda a: a[None], stats))
    stats = jax.tree.map(lambda *a: jnp.concatenate(a), *per_layer)

    x = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      w = embed.table.T
    else:
      w = param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std,
                dtype=dtype_of(cfg.param_dtype))
    aux = _summarize(stats, routed_layers(cfg))
    as_logits = lambda logits: constrain(logits, ("batch", "length", "vocab"))  # float32 under 16-bit compute
    if targets is not None and 0 < cfg.logits_chunk_len < length:
      return loss_lib.chunked_token_cross_entropy(x, w.astype(x.dtype), targets, cfg.logits_chunk_len,
                                                  as_logits), aux
    logits = as_logits(logits_product("btd,dv->btv", x, w.astype(x.dtype)))
    return (logits if targets is None else loss_lib.token_cross_entropy(logits, targets)), aux


def _check_token_arrays(tokens, positions, segment_ids) -> None:
  """tokens, positions and segment ids are integer `[B, T]` arrays of one shape (a mismatch would otherwise
  surface as a broadcasting error deep inside attention)."""
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array [batch, length]; got {tokens.dtype} {tokens.shape}.")
  for name, array in (("positions", positions), ("segment_ids", segment_ids)):
    if array is not None and (array.shape != tokens.shape or not jnp.issubdtype(array.dtype, jnp.integer)):
      raise ValueError(f"{name} must be an integer array shaped like tokens {tokens.shape}; got {array.dtype} "
                       f"{array.shape}.")


def _summarize(stats: dict, routed: slice) -> dict:
  has_routed = len(range(stats["mod_predictor_loss"].shape[0])[routed]) > 0
  losses = {
      "load_balance": jnp.mean(stats["load_balance_loss"]),
      "router_z": jnp.mean(stats["z_loss"]),
      "mod_predictor": jnp.mean(stats["mod_predictor_loss"][routed]) if has_routed else jnp.zeros(()),
  }
  layers = {
      "expert_load": stats["expert_load"],
      "dropped_fraction": stats["dropped_fraction"],
      "lambda": stats["lambda"],
      "mod_selected_fraction": stats["mod_selected_fraction"][routed],
      "mod_predictor_accuracy": stats["mod_predictor_accuracy"][routed],
  }
  return {"losses": losses, "layers": layers}


def init_cache(model: Transformer, params, batch: int, length: int):
  """An empty KV cache (the "cache" collection) for `batch` sequences of up to `length` tokens."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.apply({"params": params}, tokens, mod_mode="predictor",
                                              mutable=["cache"])[1]["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# The weights whose one use is a matmul in the compute dtype (each layer casts them just before it).
COMPUTE_DTYPE_WEIGHTS = frozenset({"wq", "wk", "wv", "wo", "w_lambda", "w_in", "w_out", "w_gate", "lm_head"})


def cast_weights(params: dict, model_config) -> dict:
  """`params` with the `COMPUTE_DTYPE_WEIGHTS` cast to the compute dtype, for `apply` inside a train step
  (unchanged with `model.cast_weights_once` False).

  Cast once, ahead of the layers, rather than in each layer: a rematerialised layer casts its weights again
  in the backward pass (a fp32 read and a bf16 write of every weight: 1.8 ms of the 27.8 ms an H100 needs at
  least for a step of PI-P's 4-layer stack, `bench gpu_compile --step`). The values are the same either way
  and, each weight having one use, so are the gradients. The embedding table stays: its rows' gradients add
  up in fp32. The step then holds the copies and their gradients (`memory.step_temporaries`).
  """
  if not model_config.cast_weights_once:
    return params
  dtype = dtype_of(model_config.dtype)
  cast = lambda path, a: a.astype(dtype) if path[-1].key in COMPUTE_DTYPE_WEIGHTS else a
  return jax.tree_util.tree_map_with_path(cast, params)


def build_model(model_config: ml_collections.ConfigDict) -> Transformer:
  """The Transformer of a config's model section, which `validation.validate_model` checks first (a model built
  from an unchecked section could run with a width that is not heads x head width)."""
  validation.validate_model(model_config)
  return Transformer(ml_collections.FrozenConfigDict(model_config))


def unrolled(model: Transformer, params: dict) -> tuple[Transformer, dict]:
  """The same model with its layer groups unrolled, and `params` to match (unchanged if not scanned).

  For token-by-token decoding: a scan over stacked layers slices (copies) every layer's weights and cache
  out of the stacks at each step and writes a whole new cache; unrolled, a step reads each weight where
  it lies and updates the donated cache in place.
  """
  if not model.config.scan_layers:
    return model, params
  config = model.config.as_configdict()
  config.scan_layers = False
  return build_model(config), unstack_groups(params, layer_layout(model.config)[1])


def unstack_groups(params: dict, num_groups: int) -> dict:
  """Scanned parameters (`groups`, leading axis G) -> unrolled parameters (`group_0` … `group_{G-1}`)."""
  out = {k: v for k, v in params.items() if k != "groups"}
  for g in range(num_groups):
    out[f"group_{g}"] = jax.tree.map(lambda a: a[g], params["groups"])
  return out


def stack_groups(params: dict) -> dict:
  """The inverse of `unstack_groups`."""
  names = sorted((k for k in params if k.startswith("group_")), key=lambda k: int(k.split("_")[1]))
  out = {k: v for k, v in params.items() if not k.startswith("group_")}
  out["groups"] = jax.tree.map(lambda *a: jnp.stack(a), *(params[k] for k in names))
  return out
