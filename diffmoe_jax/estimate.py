"""Exact parameter counts, FLOPs per token and state sizes of a config, beside the paper's claims (the
memory of training on a mesh: `memory.py`).

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
  layers_routed = len(range(cfg.num_layers)[model_lib.routed_layers(cfg)])
  layers_full = cfg.num_layers - layers_routed
  head = counts.sum({"global"}, {"lm_head"}) or counts.sum({"global"}, {"embedding"})
  full = 2 * matmul_params("full") + layers_full * attention_core(seq_len)
  capacity = cfg.mod.capacity if mod_capacity is None else mod_capacity
  # A routed layer's block runs on the ceil(capacity · T) tokens the layer selects, among themselves.
  selected = routing.mod_capacity_tokens(capacity, seq_len) if layers_routed else 0
  mod_params = counts.sum({"routed"}, {"mod_router"})
  routed = (selected / seq_len * (2 * (matmul_params("routed") - mod_params) + layers_routed * attention_core(selected))
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
