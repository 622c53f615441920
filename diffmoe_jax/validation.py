"""Config validation: `validate(config)` turns a config the code cannot run into a `ConfigError` naming the
field and the fix, before anything is traced (`validate_model` checks a model section alone, for
`nn.model.build_model`), and the curriculum's phase lengths the checks and the trainer share.
"""
from __future__ import annotations

import difflib
import math

import ml_collections

from diffmoe_jax import parallel
from diffmoe_jax.config import (ACTIVATIONS, ATTENTION_IMPLS, ATTENTIONS, CHECKPOINT_NAMES, DATA_FILES, DISPATCH_MODES,
                                DROPLESS_IMPLS, DTYPES, EXPERT_PARALLEL, FFNS, GPU_BACKWARDS, GPU_FORWARDS,
                                LOGICAL_AXES, LR_SHAPES, MAX_SEED, MESH_AXES, REMAT_POLICIES, ROUTE_FROM,
                                ConfigError, allowed_changes, defaults, flat_fields, gpu_launches, is_open_dict,
                                path_matches, phase_defaults, require, without_obsolete)
from diffmoe_jax.ops import dispatch

INT32_MAX = 2**31 - 1  # sizes, steps and indices are int32 in JAX


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field the code depends on; raises ConfigError naming the field and the fix."""
  missing = [name for name in defaults() if name not in config]
  if missing:
    raise ConfigError(f"config: has no {', '.join(missing)}, which every training config has; a config file "
                      "starts from diffmoe_jax.config.defaults(), as configs/tiny.py does (configs/ncas.py "
                      "configures the search: python -m diffmoe_jax.ncas).")
  _check_finite(config.to_dict())
  _check_known_fields(config)
  _check_types(config)
  validate_model(config.model)
  m, moe = config.model, config.model.moe
  for axis in config.mesh.shape.keys():
    require(axis in MESH_AXES, f"mesh.shape.{axis}", f"unknown mesh axis; the axes are {MESH_AXES}.")
    size = config.mesh.shape[axis]
    require(isinstance(size, int) and (size >= 1 or size == -1), f"mesh.shape.{axis}",
            f"must be a positive integer or -1 (all remaining devices), got {size!r}.")
  given = config.mesh.axis_rules
  for i, rule in enumerate(given):
    pair = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    target = rule[1] if pair else 0
    require(pair and (target is None or isinstance(target, str) or isinstance(target, (tuple, list)) and all(
        isinstance(axis, str) for axis in target)), "mesh.axis_rules", f"rule {i} is {rule!r}, not a (logical "
        "axis, mesh axis or tuple of mesh axes or None) pair such as ('batch', ('data', 'fsdp')).")
  rule_names = [rule[0] for rule in given]
  for name in LOGICAL_AXES:
    require(name in rule_names, "mesh.axis_rules", f"has no rule for logical axis {name!r}.")
    require(rule_names.count(name) == 1, "mesh.axis_rules", f"has {rule_names.count(name)} rules for logical axis "
            f"{name!r}; keep one.")
  for name, target in config.mesh.axis_rules:
    for axis in (target,) if isinstance(target, str) or target is None else target:
      require(axis is None or axis in MESH_AXES, "mesh.axis_rules",
              f"maps {name!r} to {axis!r}, which is not a mesh axis; the axes are {MESH_AXES}.")
  # The heads and experts split as the rules map them (an axis of -1 is sized, and checked, at the preflight).
  fixed = {axis: size for axis, size in config.mesh.shape.items() if size != -1}
  rules = parallel.axis_rules(config.mesh)
  splits = [("heads", m.num_heads, "model.num_heads")]
  splits += [("expert", moe.num_experts, "model.moe.num_experts")] if m.ffn == "moe" else []
  for logical, count, field in splits:
    ways = parallel.logical_axis_size(fixed, rules, logical)
    axes = [a for a in parallel.logical_mesh_axes(rules, logical) if fixed.get(a, 1) > 1]
    require(count % ways == 0, "mesh.shape." + (axes[0] if len(axes) == 1 else "{" + ",".join(axes) + "}"),
            f"{ways} does not divide {field} ({count}); pick a divisor, or map {logical!r} to other mesh axes "
            "in config.mesh.axis_rules.")
  _validate_training(config)
  return config


def validate_model(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The checks of `validate` that need only the model section (what `nn.model.build_model` takes)."""
  _check_finite(m.to_dict(), "model.")
  _check_types_of(m.to_dict(), defaults().model.to_dict(), "model.")
  for field in ("d_model", "num_layers", "num_heads", "head_dim", "max_seq_len", "vocab_size"):
    require(isinstance(m[field], int) and m[field] > 0, f"model.{field}",
            f"must be a positive integer, got {m[field]!r}.")
  require(m.num_heads * m.head_dim == m.d_model, "model.d_model",
          f"{m.d_model} must equal model.num_heads * model.head_dim = {m.num_heads} * {m.head_dim} = "
          f"{m.num_heads * m.head_dim}; change d_model, num_heads or head_dim.")
  require(m.attention in ATTENTIONS, "model.attention", f"{m.attention!r} is not one of {ATTENTIONS}.")
  differential = m.attention in ("differential", "differential_v2")
  if differential:
    require(m.head_dim % 2 == 0, "model.head_dim",
            f"{m.head_dim} is odd; differential attention splits each head's width into two query/key "
            "sub-heads of head_dim / 2, so head_dim must be even.")
  # RoPE rotates pairs of dimensions within each query/key (sub-)head.
  qk_dim = m.head_dim // 2 if differential else m.head_dim
  require(qk_dim % 2 == 0, "model.head_dim",
          f"the query/key width {qk_dim} must be even for RoPE; use a head_dim divisible by "
          f"{4 if differential else 2}.")
  require(m.rope_theta > 1.0, "model.rope_theta", f"must be > 1, got {m.rope_theta}.")
  if m.lambda_init != "schedule":
    try:
      constant = float(m.lambda_init)
    except ValueError:
      raise ConfigError(f"config.model.lambda_init: {m.lambda_init!r} is neither 'schedule' nor a number "
                        "such as '0.5'.") from None
    require(0.0 <= constant < 1.0, "model.lambda_init", f"a constant λ_init must lie in [0, 1), got {constant}.")
  require(m.ffn in FFNS, "model.ffn", f"{m.ffn!r} is not one of {FFNS}.")
  for field, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("attention_impl", ATTENTION_IMPLS),
                         ("attention_gpu_backward", GPU_BACKWARDS), ("attention_gpu_forward", GPU_FORWARDS),
                         ("remat_policy", REMAT_POLICIES)):
    require(m[field] in allowed, f"model.{field}", f"{m[field]!r} is not one of {allowed}.")
  for field in ("attention_gpu_forward", "attention_gpu_backward"):
    require(m[field] != "mosaic" or m.dtype in ("bfloat16", "float16"), f"model.{field}",
            f"'mosaic' needs 16-bit activations (model.dtype bfloat16 or float16), got model.dtype {m.dtype!r}.")
    if m[field] == "mosaic" and m.attention_impl == "pallas_gpu" and m.remat_policy != "none":
      import jax
      require(jax.default_backend() == "gpu", f"model.{field}",
              "'mosaic' with attention_impl 'pallas_gpu' runs Mosaic GPU's interpreter off a GPU, which cannot run "
              "under remat; set model.remat_policy 'none', or run on a GPU.")
  gpu_launches(m)
  for field in ("attention_block_q", "attention_block_k"):
    require(isinstance(m[field], int) and m[field] >= 0 and m[field] & (m[field] - 1) == 0, f"model.{field}",
            f"must be 0 (per backend) or a power of two, got {m[field]!r}.")
  require(isinstance(m.logits_chunk_len, int) and m.logits_chunk_len >= 0, "model.logits_chunk_len",
          f"must be 0 (the whole sequence) or a positive number of positions, got {m.logits_chunk_len!r}.")
  require(m.norm_eps > 0, "model.norm_eps", f"must be > 0, got {m.norm_eps}.")
  require(m.init_std > 0, "model.init_std", f"must be > 0, got {m.init_std}.")
  if m.remat_policy == "save_names":
    require(len(m.remat_save_names) > 0, "model.remat_save_names",
            "is empty but remat_policy is 'save_names'; list checkpoint names to keep, or pick another policy.")
  if m.remat_policy in ("save_names", "dots", "dots_no_batch"):
    unknown = [n for n in m.remat_save_names if n not in CHECKPOINT_NAMES]
    # On the command line "a,b" is one name; a tuple is written as a Python literal.
    as_tuple = (" (on the command line, several names as a tuple: --config.model.remat_save_names="
                "\"('attn_out','ffn_out')\")" if any("," in str(n) for n in unknown) else "")
    require(not unknown, "model.remat_save_names", f"{unknown} are not checkpoint names of the model; "
            f"choose from {CHECKPOINT_NAMES}{as_tuple}.")
  else:
    # "save_names" keeps the named values, a dots policy them besides the matmuls' outputs; "full" and "none"
    # would ignore them.
    require(not m.remat_save_names, "model.remat_save_names",
            f"{tuple(m.remat_save_names)} is kept only with remat_policy 'save_names', 'dots' or "
            f"'dots_no_batch', but it is {m.remat_policy!r}; set model.remat_policy='save_names', or "
            "remat_save_names to ().")

  moe = m.moe
  require(moe.activation in ACTIVATIONS, "model.moe.activation",
          f"{moe.activation!r} is not one of {ACTIVATIONS}.")
  if m.ffn == "moe" or m.expert_conditional_lambda:
    require(isinstance(moe.num_experts, int) and moe.num_experts > 0, "model.moe.num_experts",
            f"must be a positive integer, got {moe.num_experts!r}.")
    require(isinstance(moe.top_k, int) and 0 < moe.top_k <= moe.num_experts, "model.moe.top_k",
            f"{moe.top_k!r} must be between 1 and model.moe.num_experts ({moe.num_experts}).")
  if m.ffn == "moe":
    require(isinstance(moe.expert_ffn_dim, int) and moe.expert_ffn_dim > 0, "model.moe.expert_ffn_dim",
            f"must be a positive integer, got {moe.expert_ffn_dim!r}.")
    for field in ("dispatch", "eval_dispatch"):
      require(moe[field] in DISPATCH_MODES, f"model.moe.{field}",
              f"{moe[field]!r} is not one of {DISPATCH_MODES}.")
    require(moe.route_from in ROUTE_FROM, "model.moe.route_from",
            f"{moe.route_from!r} is not one of {ROUTE_FROM}.")
    require(moe.expert_parallel in EXPERT_PARALLEL, "model.moe.expert_parallel",
            f"{moe.expert_parallel!r} is not one of {EXPERT_PARALLEL}.")
    require(not (moe.expert_parallel == "all_to_all" and "dropless" in (moe.dispatch, moe.eval_dispatch)),
            "model.moe.expert_parallel", "'all_to_all' needs capacity dispatch (static slot counts), but "
            "model.moe.dispatch or eval_dispatch is 'dropless'; use 'gather' or 'auto'.")
    require(not (moe.expert_parallel == "ragged" and "capacity" in (moe.dispatch, moe.eval_dispatch)),
            "model.moe.expert_parallel", "'ragged' is dropless, but model.moe.dispatch or eval_dispatch is "
            "'capacity'; use 'all_to_all', 'gather' or 'auto'.")
    require(moe.dropless_impl in DROPLESS_IMPLS, "model.moe.dropless_impl",
            f"{moe.dropless_impl!r} is not one of {DROPLESS_IMPLS}.")
    require(moe.capacity_factor > 0, "model.moe.capacity_factor",
            f"must be > 0, got {moe.capacity_factor}.")
    for field in ("dispatch", "eval_dispatch"):  # a sequence's expert slots, and one past them, are int32 indices
      if moe[field] == "capacity":
        per_expert = dispatch.moe_capacity(m.max_seq_len, moe.top_k, moe.num_experts, moe.capacity_factor)
      elif moe.dropless_impl != "ragged":  # "auto" is padded off a TPU; asking which backend would start it, which
        per_expert = m.max_seq_len  # a multi-process run must leave to jax.distributed.initialize
      else:
        continue
      require(moe.num_experts * per_expert < INT32_MAX, "model.moe.num_experts",
              f"{moe.num_experts:,} experts x {per_expert:,} slots per sequence (model.moe.{field} "
              f"{moe[field]!r} at model.max_seq_len {m.max_seq_len:,}) = {moe.num_experts * per_expert:,} expert "
              "slots, more than int32 indices address; use fewer experts or a shorter context.")
    require(m.dense_ffn_dim == 0, "model.dense_ffn_dim",
            f"{m.dense_ffn_dim} is the dense FFN's width, but model.ffn is 'moe' (experts of width "
            "model.moe.expert_ffn_dim); set model.ffn='dense' for the dense ablation, or dense_ffn_dim to 0.")
  else:
    require(m.dense_ffn_dim >= 0, "model.dense_ffn_dim", f"must be >= 0, got {m.dense_ffn_dim}.")
    # 0 means top_k x expert_ffn_dim (nn.moe.dense_ffn_dim), which must then be a width too.
    require(m.dense_ffn_dim > 0 or (moe.top_k > 0 and moe.expert_ffn_dim > 0), "model.dense_ffn_dim",
            f"is 0, so the dense FFN width is model.moe.top_k * model.moe.expert_ffn_dim = {moe.top_k} * "
            f"{moe.expert_ffn_dim} = {moe.top_k * moe.expert_ffn_dim}; set dense_ffn_dim to the dense FFN width.")
  if m.expert_conditional_lambda:
    require(m.attention == "differential", "model.expert_conditional_lambda",
            f"needs model.attention='differential' ({m.attention!r} has no expert λ vectors); set it to False.")
    require(m.ffn == "moe", "model.expert_conditional_lambda",
            "needs model.ffn='moe' (λ is mixed by the layer's MoE router); set it to False for a dense FFN.")

  mod = m.mod
  if mod.enabled:
    # 1 routes every layer (the paper's "a learned binary router at each layer"); 2, the default, every other.
    require(isinstance(mod.every, int) and mod.every >= 1, "model.mod.every",
            f"must be an integer >= 1 (one routed layer per group of `every` layers), got {mod.every!r}.")
    require(mod.every <= m.num_layers, "model.mod.every",
            f"{mod.every} exceeds model.num_layers ({m.num_layers}), so no layer would be routed; set it to at "
            f"most {m.num_layers}, or model.mod.enabled=False for no mixture-of-depths.")
    _check_capacity(mod.capacity, "model.mod.capacity")
    require(mod.predictor_hidden > 0, "model.mod.predictor_hidden",
            f"must be > 0, got {mod.predictor_hidden}.")
  return m


def check_tokenizer_vocab(config: ml_collections.ConfigDict, tokenizer) -> None:
  """ConfigError if `tokenizer` (the one config.data.tokenizer names) has ids past the model's embedding table,
  whose lookup gives NaN: a loss of NaN, logits of NaN."""
  vocab = tokenizer.vocab_size
  if vocab > config.model.vocab_size:
    raise ConfigError(f"config.model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's "
                      f"vocabulary ({vocab}, {config.data.tokenizer}); raise it to at least {vocab} (for a new "
                      f"run), or use a tokenizer of at most {config.model.vocab_size} tokens, such as the run's.")


def phase_lengths(cur: ml_collections.ConfigDict) -> list[int]:
  """Steps per phase of `curriculum.order`.

  The phases' fractions are their shares of `total_steps` and must sum to 1 (nothing is rescaled to make
  them). A phase with `steps` > 0 gets exactly that many instead of its share; the phases without split
  what is left in proportion to their fractions. Every phase needs at least one step.
  """
  explicit = {name: cur[name].steps for name in cur.order if cur[name].steps}
  fractions = {name: cur[name].fraction for name in cur.order if not cur[name].steps}
  remaining = cur.total_steps - sum(explicit.values())
  explicit_text = ", ".join(f"{name} {steps}" for name, steps in explicit.items())
  if remaining < 0:
    raise ConfigError(
        f"config.curriculum: the phases' explicit steps ({explicit_text}) add up to {sum(explicit.values())}, "
        f"more than curriculum.total_steps ({cur.total_steps}); raise total_steps or lower the phases' steps.")
  if not fractions:
    if remaining:
      raise ConfigError(
          f"config.curriculum: every phase has explicit steps ({explicit_text}), and they add up to "
          f"{sum(explicit.values())}, not curriculum.total_steps ({cur.total_steps}); make them add up to it.")
    return [cur[name].steps for name in cur.order]
  fraction_sum = sum(cur[name].fraction for name in cur.order)
  if abs(fraction_sum - 1.0) > 1e-6:
    shares = ", ".join(f"{name} {cur[name].fraction:g}" for name in cur.order)
    kept = " (a phase with explicit steps keeps its fraction in the sum)" if explicit else ""
    raise ConfigError(f"config.curriculum: the phases' fractions sum to {fraction_sum:.6g}, not 1 ({shares})"
                      f"{kept}; they are not rescaled, so change them to sum to 1.")
  for name, f in fractions.items():
    require(f > 0, f"curriculum.{name}", "has neither steps nor a fraction, so it gets no steps; give it a "
            "fraction or steps, or remove it from curriculum.order.")
  free_sum = sum(fractions.values())
  shared = _split_by_fraction([f / free_sum for f in fractions.values()], remaining)
  for (name, f), steps in zip(fractions.items(), shared):
    if steps == 0:
      of = (f"the {remaining} step(s) left after the explicit ones ({explicit_text})" if explicit
            else f"curriculum.total_steps ({cur.total_steps})")
      # From here on every phase's share is at least one step, so none rounds to 0.
      enough = cur.total_steps - remaining + math.ceil(free_sum / min(fractions.values()) - 1e-9)
      raise ConfigError(
          f"config.curriculum.{name}: its share {f / free_sum:.2g} of {of} is {f / free_sum * remaining:.2g} "
          f"steps, which rounds to 0, and every phase needs at least one step; raise curriculum.total_steps "
          f"to {enough} or more, or give curriculum.{name} explicit steps.")
  shared = iter(shared)
  return [cur[name].steps or next(shared) for name in cur.order]


def _split_by_fraction(fractions: list[float], total: int) -> list[int]:
  """`total` split by fractions summing to 1; cumulative rounding (half up) makes the parts add up exactly."""
  ends, cumulative = [], 0.0
  for f in fractions[:-1]:
    cumulative += f
    ends.append(min(total, math.floor(cumulative * total + 0.5)))
  ends.append(total)
  return [end - start for start, end in zip([0] + ends[:-1], ends)]


def phase_seq_len(config: ml_collections.ConfigDict, name: str) -> int:
  p = config.curriculum[name]
  return p.seq_len or int(round(p.context_fraction * config.model.max_seq_len))


def _check_finite(values: dict, prefix: str = "") -> None:
  """No field may be infinite or NaN (a learning rate of inf would pass `> 0` and then skip every update), and
  no integer but the seed (32 bits, checked with the others) may pass int32's range: each is a size, count or
  step that JAX holds, or indexes with, as an int32 (10**12 experts overflowed deep in the MoE dispatch)."""
  for key, value in values.items():
    if isinstance(value, dict):
      _check_finite(value, f"{prefix}{key}.")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config.{prefix}{key}: must be a finite number, got {value}.")
    elif isinstance(value, int) and abs(value) > INT32_MAX and prefix + key != "seed":
      raise ConfigError(f"config.{prefix}{key}: {value} is beyond int32 (at most 2**31 - 1 = {INT32_MAX:,}), "
                        "which JAX holds sizes, steps and indices in; use a smaller value.")


_TYPE_NAMES = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}


def _has_type(value, expected: type) -> bool:
  """`value` fits a field whose default is of type `expected`: a float field also takes an int, and a bool
  is no integer."""
  if expected is float:
    return is_number(value)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, expected)


def _check_types_of(values: dict, reference: dict, prefix: str) -> None:
  """Each field of `reference` (defaults) that `values` has holds its default's type; OPEN_DICTS are the
  user's."""
  for key, default in reference.items():
    path = prefix + key
    if key not in values:
      continue
    value = values[key]
    if isinstance(default, dict):
      if not isinstance(value, dict):
        raise ConfigError(f"config.{path}: must be a section of fields (a dict such as {default!r}), got {value!r}.")
      if not is_open_dict(path):
        _check_types_of(value, default, path + ".")
    elif isinstance(default, tuple):
      if not isinstance(value, (tuple, list)):
        raise ConfigError(f"config.{path}: must be a tuple (such as {default!r}), got {value!r}.")
      kinds = {type(v) for v in default}  # a tuple of names (curriculum.order) or numbers: its entries' type
      kind = kinds.pop() if len(kinds) == 1 and default else None
      wrong = [v for v in value if not _has_type(v, kind)] if kind in _TYPE_NAMES else []
      if wrong:
        raise ConfigError(f"config.{path}: holds {wrong[0]!r}; each entry is {_TYPE_NAMES[kind]}, as in {default!r}.")
    elif type(default) in _TYPE_NAMES and not _has_type(value, type(default)):
      raise ConfigError(f"config.{path}: must be {_TYPE_NAMES[type(default)]}, got {value!r} "
                        f"({type(value).__name__}).")


def no_such_field(path: str, known) -> ConfigError:
  """The error for `config.<path>`, a field its section lacks: the closest of the `known` names there, or
  all of them when none is close."""
  section, _, name = path.rpartition(".")
  close = difflib.get_close_matches(name, list(known), n=1)
  return ConfigError(f"config.{path}: no such field; " + (f"did you mean {section + '.' if section else ''}{close[0]}?"
                     if close else f"the fields there are {', '.join(sorted(known))}."))


def _check_known_fields(config: ml_collections.ConfigDict) -> None:
  """A field inside a section `defaults()` has must be one of its fields: set in Python (a notebook's
  `config.model.update(d_modle=48)`), a misspelt one was ignored; the command line refuses it already."""
  values = config.to_dict()
  _, unknown = without_obsolete(values)  # takes a phase the user added as all known: checked here
  unknown = [path for path in unknown if not path.startswith("mesh.shape.")]  # named below as mesh axes
  phase_fields, standard_phases = phase_defaults().to_dict(), defaults().curriculum.to_dict()
  # A top-level section of the user's own (configs/ablation.py's `ablation`) is a dict; a misspelt
  # top-level value (`config.seedd = 3`) is not.
  unknown += [key for key, value in values.items() if key not in defaults() and not isinstance(value, dict)]
  unknown += [f"curriculum.{name}.{key}" for name, phase in values.get("curriculum", {}).items()
              if isinstance(phase, dict) and name not in standard_phases for key in phase if key not in phase_fields]
  if unknown:
    known = defaults().to_dict()
    for key in unknown[0].split(".")[:-1]:
      known = known.get(key, phase_fields)  # only a phase the user added is a section defaults() lacks
    raise no_such_field(unknown[0], known)


def _check_allowed_changes(config: ml_collections.ConfigDict) -> None:
  """Each entry of train.allow_config_change names a field or section of the config (a glob may), or a key of
  one of the user's dicts (a domain the saved run had), or the data's files: a misspelt entry allowed nothing,
  without a word."""
  patterns = allowed_changes(config)
  fields = list(flat_fields(config.to_dict())) if patterns else []
  for pattern in patterns:
    parts = pattern.split(".")
    in_users_dict = any(is_open_dict(".".join(parts[:i])) for i in range(1, len(parts)))
    if in_users_dict or pattern == DATA_FILES or any(path_matches(f, [pattern]) for f in fields):
      continue
    sections = {path.rsplit(".", i)[0] for path in fields for i in range(1, path.count(".") + 1)}
    close = difflib.get_close_matches(pattern, sorted(sections.union(fields)), n=1)
    raise ConfigError(f"config.train.allow_config_change: {pattern!r} names no field of the config"
                      + (f"; did you mean {close[0]}?" if close else "; list fields as dotted paths, e.g. "
                         "optimizer.peak_lr, or sections such as curriculum."))


def check_values(values: dict, reference: dict) -> None:
  """`_check_finite`, `_check_types_of` against `reference` (defaults) and `check_seed` for a config of another
  command's own (the NCAS search's)."""
  _check_finite(values)
  _check_types_of(values, reference, "")
  check_seed(values["seed"])


def check_seed(seed) -> None:
  require(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED, "seed",
          f"must be an integer from 0 to 2**32 - 1 (the random keys hold 32 bits), got {seed!r}.")


def _check_types(config: ml_collections.ConfigDict) -> None:
  """Each field `defaults()` has (and each phase field) holds its default's type: a config built from a dict
  or set under `ignore_type()` could hold the string "false" in a boolean field, which would read as True."""
  values = config.to_dict()
  reference = defaults().to_dict()
  for name, phase in values.get("curriculum", {}).items():  # a phase the user added has the phase fields
    if isinstance(phase, dict):
      reference["curriculum"].setdefault(name, phase_defaults().to_dict())
  _check_types_of(values, reference, "")


def is_number(value) -> bool:
  """An int or a float, not a bool (True is an int to Python, but no number a field takes)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_capacity(value, field: str) -> None:
  require(isinstance(value, (int, float)) and 0.0 < value <= 1.0, field,
          f"{value!r} must lie in (0, 1]: the fraction of a sequence's tokens a routed layer processes.")


def _validate_training(config: ml_collections.ConfigDict) -> None:
  o, cur, m = config.optimizer, config.curriculum, config.model
  require(is_number(o.peak_lr) and o.peak_lr > 0, "optimizer.peak_lr", f"must be > 0, got {o.peak_lr!r}.")
  for field in ("b1", "b2"):
    require(is_number(o[field]) and 0.0 <= o[field] < 1.0, f"optimizer.{field}",
            f"Adam's decay rate must lie in [0, 1), got {o[field]!r}.")
  require(is_number(o.eps) and o.eps > 0, "optimizer.eps", f"must be > 0, got {o.eps!r}.")
  require(is_number(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay",
          f"must be >= 0, got {o.weight_decay!r}.")
  # The optimizer updates the parameters in their own dtype: in 16 bits, an update below half a step of
  # the weight (lr x weight decay always, most updates at small lr) would round away.
  require(m.param_dtype == "float32", "model.param_dtype",
          f"{m.param_dtype!r}: training keeps float32 master weights, as 16-bit ones would round away small "
          "AdamW updates; set it to 'float32' (model.dtype sets the compute dtype, e.g. 'bfloat16').")
  check_seed(config.seed)
  require(is_number(config.train.memory_headroom) and 0.0 < config.train.memory_headroom <= 1.0,
          "train.memory_headroom", f"the fraction of memory a run may plan to use must lie in (0, 1], got "
          f"{config.train.memory_headroom!r}.")
  require(is_number(config.train.peak_flops_per_device) and config.train.peak_flops_per_device >= 0,
          "train.peak_flops_per_device", f"must be >= 0 (0: the device's known peak), got "
          f"{config.train.peak_flops_per_device!r}.")
  require(config.train.run_steps >= 0, "train.run_steps", f"must be >= 0, got {config.train.run_steps}.")
  require(isinstance(config.train.allow_config_change, str), "train.allow_config_change",
          f"must be a string of comma-separated field paths, got {config.train.allow_config_change!r}.")
  _check_allowed_changes(config)
  for field in ("log_every", "eval_every", "checkpoint_every", "stable_rank_every", "eval_batches",
                "eval_batch_size", "keep_checkpoints", "max_nonfinite_in_a_row"):
    require(config.train[field] >= 1, f"train.{field}", f"must be >= 1, got {config.train[field]}.")
  t = config.train
  for field in ("loss_scale_min", "loss_scale_init"):  # the scale is a float32
    require(is_number(t[field]) and 2.0**-126 <= t[field] <= 2.0**127, f"train.{field}",
            f"the float16 loss scale must lie in float32's normal range [2**-126, 2**127], got {t[field]!r}.")
  require(t.loss_scale_init >= t.loss_scale_min, "train.loss_scale_init",
          f"{t.loss_scale_init!r} is below train.loss_scale_min ({t.loss_scale_min!r}), the loss scale's floor; "
          "raise it or lower loss_scale_min.")
  require(isinstance(t.loss_scale_growth_interval, int) and t.loss_scale_growth_interval >= 1,
          "train.loss_scale_growth_interval", f"must be an integer >= 1 (finite steps in a row before the float16 "
          f"loss scale doubles), got {t.loss_scale_growth_interval!r}.")
  require(isinstance(o.grad_accum_steps, int) and o.grad_accum_steps >= 1, "optimizer.grad_accum_steps",
          f"must be an integer >= 1, got {o.grad_accum_steps!r}.")
  require(o.grad_clip > 0, "optimizer.grad_clip", f"must be > 0, got {o.grad_clip}.")
  require(isinstance(cur.total_steps, int) and cur.total_steps > 0, "curriculum.total_steps",
          f"must be a positive integer, got {cur.total_steps!r}.")
  # An empty --config.curriculum.order= on the command line sets the one name ''.
  require(len(cur.order) > 0 and cur.order != ("",), "curriculum.order", "is empty; list at least one phase.")
  require(isinstance(cur.mod_anneal_levels, int) and cur.mod_anneal_levels >= 1, "curriculum.mod_anneal_levels",
          f"must be an integer >= 1, got {cur.mod_anneal_levels!r}.")
  domains = set(config.data.domains.keys())
  require(len(domains) > 0, "data.domains", "is empty; add a source such as 'stdlib:code'.")
  for name in domains:  # a domain names TensorBoard tags (eval/<domain>/loss) and evaluate's rows
    require(bool(name.strip()) and name == name.strip(), f"data.domains.{name!r}", "a domain's name is not blank "
            "and has no leading or trailing space; name it such as 'code' or 'web_en'.")
  require(isinstance(config.data.segment_masking, bool), "data.segment_masking",
          f"must be True or False, got {config.data.segment_masking!r}.")
  phases = [key for key, value in cur.items() if isinstance(value, ml_collections.ConfigDict)]
  for i, name in enumerate(cur.order):
    if name not in phases:
      if "," in name:  # --config.curriculum.order=warmup,anneal sets the one name 'warmup,anneal'
        names = ",".join(repr(n.strip(" '\"")) for n in name.strip("()[] ").split(",") if n.strip(" '\""))
        raise ConfigError(f"config.curriculum.order: {name!r} is one phase name, not a list; on the command line "
                          f"give the phases as a tuple: --config.curriculum.order=\"({names})\".")
      what = "a setting, not a phase" if name in cur else "not defined"
      raise ConfigError(f"config.curriculum.order: names {name!r}, but curriculum.{name} is {what}; the "
                        f"phases defined are {phases}.")
    require(name not in cur.order[:i], "curriculum.order", f"names {name!r} twice; list each phase once.")
    p = cur[name]
    f = f"curriculum.{name}"
    require(isinstance(p.steps, int) and p.steps >= 0 and is_number(p.fraction) and 0 <= p.fraction <= 1, f,
            f"steps ({p.steps!r}) must be an integer >= 0 and fraction ({p.fraction!r}) in [0, 1].")
    require(isinstance(p.batch_size, int) and p.batch_size >= 0, f"{f}.batch_size",
            f"must be an integer >= 0 (0: curriculum.tokens_per_batch // seq_len), got {p.batch_size!r}.")
    seq_len = phase_seq_len(config, name)
    require(0 < seq_len <= m.max_seq_len, f"{f}.seq_len",
            f"the phase's sequence length {seq_len} (seq_len={p.seq_len}, context_fraction="
            f"{p.context_fraction}) must lie in (0, model.max_seq_len={m.max_seq_len}].")
    if p.batch_size == 0:
      require(cur.tokens_per_batch >= seq_len, f"{f}.batch_size",
              f"is 0 and curriculum.tokens_per_batch ({cur.tokens_per_batch}) is below the phase's seq_len "
              f"({seq_len}); set one of them.")
      require(cur.tokens_per_batch % seq_len == 0, "curriculum.tokens_per_batch",
              f"{cur.tokens_per_batch} is not a multiple of phase {name}'s seq_len {seq_len}, so its batches would "
              f"hold {cur.tokens_per_batch // seq_len * seq_len} tokens; use a multiple, or set {f}.batch_size.")
    require(p.lr_shape in LR_SHAPES, f"{f}.lr_shape", f"{p.lr_shape!r} is not one of {LR_SHAPES}.")
    for lr in ("lr_start", "lr_end"):
      require(p[lr] >= 0, f"{f}.{lr}", f"LR multipliers must be >= 0, got {p[lr]}.")
    require(p.lr_shape != "constant" or p.lr_end == p.lr_start, f"{f}.lr_end",
            f"{p.lr_end} differs from lr_start ({p.lr_start}), but lr_shape 'constant' holds lr_start throughout; set "
            f"{f}.lr_shape to 'linear' or 'cosine', or lr_end equal to lr_start.")
    for noise in ("router_noise_start", "router_noise_end"):
      require(p[noise] >= 0, f"{f}.{noise}", f"a router noise std must be >= 0, got {p[noise]}.")
    for w in ("load_balance_weight", "z_loss_weight", "mod_predictor_weight"):
      require(p[w] >= 0, f"{f}.{w}", f"must be >= 0, got {p[w]}.")
    for cap in ("mod_capacity_start", "mod_capacity_end"):
      if p[cap]:
        _check_capacity(p[cap], f"{f}.{cap}")
        require(p.mod_enabled, f"{f}.{cap}", f"is {p[cap]:g}, but {f}.mod_enabled is False, so every token runs "
                f"the routed layers in this phase; set {f}.mod_enabled=True, or {cap} to 0.")
    for domain in p.domain_weights.keys():
      require(domain in domains, f"{f}.domain_weights.{domain}",
              f"names no domain in data.domains ({sorted(domains)}).")
      require(is_number(p.domain_weights[domain]) and p.domain_weights[domain] >= 0,
              f"{f}.domain_weights.{domain}", f"must be a number >= 0 (such as 0.3), got "
              f"{p.domain_weights[domain]!r}.")
    total = sum(p.domain_weights.values())
    require(not len(p.domain_weights) or abs(total - 1.0) < 1e-6, f"{f}.domain_weights",
            f"the weights sum to {total:g}; they are the fractions of each batch per domain (a domain left out "
            "gets 0) and must sum to 1.")
  phase_lengths(cur)
