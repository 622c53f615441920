"""Every config field with its default and a comment; loading config files, and configs saved by earlier
versions.

Every training config file in `configs/` starts from `defaults()` and overrides what differs (the search's,
`ncas.py` and `ncas_smoke.py`, start from `ncas.search.defaults()`).
`validation.validate(config)` turns a bad config into a `ConfigError` naming the field and the fix, before
anything is traced.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import math
from collections.abc import Mapping

import ml_collections

PHASES = ("warmup", "foundation", "sparsify", "specialize", "long_context", "anneal")
ACTIVATIONS = ("gelu", "swiglu")
ATTENTIONS = ("differential", "differential_v2", "standard")
FFNS = ("moe", "dense")
DISPATCH_MODES = ("capacity", "dropless")
ROUTE_FROM = ("attention_input", "ffn_input")
EXPERT_PARALLEL = ("auto", "off", "all_to_all", "gather", "ragged")
DROPLESS_IMPLS = ("auto", "ragged", "padded")
ATTENTION_IMPLS = ("auto", "explicit", "xla", "blockwise", "pallas", "pallas_gpu", "pallas_tpu", "fused")
GPU_BACKWARDS = ("two_pass", "one_pass", "mosaic")  # flash_attention.GPU_BACKWARDS (this module imports no jax)
GPU_FORWARDS = ("triton", "mosaic")  # flash_attention.GPU_FORWARDS
GPU_KERNELS = ("forward", "dq", "dkv")  # pallas_attention.default_launches' keys
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_names")
DTYPES = ("float32", "bfloat16", "float16")
# train.loss_scale_*'s defaults (float16's dynamic loss scaling), also those of train/state.py and train/step.py.
LOSS_SCALE_INIT, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_MIN = 2.0**15, 2000, 1.0
LR_SHAPES = ("constant", "linear", "cosine")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# jax.random.PRNGKey keeps a seed's low 32 bits (JAX's default 32-bit integers): 2**32 would give seed 0's
# weights again, and a seed of 2**63 or more does not convert.
MAX_SEED = 2**32 - 1
# Names the model tags with `checkpoint_name`: what remat_policy="save_names" may keep.
# "flash_residuals" (blockwise and kernel attention paths only): the per-map outputs and log-sum-exp that
# the attention backward reads; kept, remat does not rerun the attention forward.
CHECKPOINT_NAMES = ("query_proj", "key_proj", "value_proj", "attn_out", "ffn_out", "flash_residuals")
# What train.allow_config_change calls the training data's files, which are no field: allowing it resumes a run
# on files added, removed or changed since the save.
DATA_FILES = "data.files"
# Dicts whose keys are the user's to choose: a new key on the command line adds an entry.
OPEN_DICTS = ("data.domains", "curriculum.*.domain_weights")
# The logical axis names the model uses; `parallel.py` maps them to mesh axes through `mesh.axis_rules`.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "head_dim", "mlp", "expert", "vocab", "layers")


class ConfigError(ValueError):
  """A config field holds a value the code cannot run with; the message names the field and the fix."""


def is_open_dict(path: str) -> bool:
  """Whether the dotted `path` names one of OPEN_DICTS, whose keys are the user's."""
  return any(fnmatch.fnmatchcase(path, d) for d in OPEN_DICTS)


def path_matches(path: str, patterns) -> bool:
  """Whether the dotted `path` matches one of `patterns` (fnmatch globs) or lies inside one (a section)."""
  return any(fnmatch.fnmatchcase(path, p) or path.startswith(p + ".") for p in patterns)


def allowed_changes(config) -> list[str]:
  """The field paths and globs of `train.allow_config_change`."""
  return [p.strip() for p in str(config.train.allow_config_change).split(",") if p.strip()]


def flat_fields(d, prefix: str = "") -> dict:
  """{dotted path: value} of every field of a (nested) mapping; an empty section is a field."""
  out = {}
  for key, value in d.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flat_fields(value, path + "."))
    else:
      out[path] = value
  return out


def load_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config()` (or `get_config(arg)`) of the config file at `path`."""
  spec = importlib.util.spec_from_file_location("diffmoe_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*([arg] if arg else []))


def defaults() -> ml_collections.ConfigDict:
  """The one place shared defaults live. Model shape fields are set by each config file."""
  c = ml_collections.ConfigDict()
  c.name = ""  # the model's name in the paper ("pi", "pi_s", "pi_p"), which selects its claims in `estimate`
  c.seed = 0  # 0 to MAX_SEED: the weights, the model noise and the data order

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 65536  # the paper does not give a vocabulary; see README "Choices the paper leaves open"
  m.d_model = 0
  m.num_layers = 0
  m.num_heads = 0  # H: differential heads (each has two query/key sub-heads of width head_dim / 2)
  m.head_dim = 0  # Dv: each head's value width; num_heads * head_dim == d_model
  # or "differential_v2" (per-token λ = sigmoid(W_λ x), no head norm) or "standard" (ablations)
  m.attention = "differential"
  m.rope_theta = 10000.0 * math.pi
  m.max_seq_len = 0  # the context length
  m.lambda_init = "schedule"  # "schedule": 0.8 - 0.6 exp(-0.3 l); or a constant such as "0.5"
  m.expert_conditional_lambda = True
  m.ffn = "moe"  # or "dense" (ablation)
  m.dense_ffn_dim = 0  # with ffn="dense": its width; 0 means top_k * moe.expert_ffn_dim (same active FLOPs)
  m.norm_eps = 1e-5
  m.init_std = 0.02
  m.tie_embeddings = False
  # The loss computes the output logits this many positions of each sequence at a time, forward and backward,
  # never all [B, T, vocab] at once (README "Training"); 0: the whole sequence.
  m.logits_chunk_len = 0
  m.dtype = "bfloat16"  # compute dtype
  m.param_dtype = "float32"  # master weights: training needs float32
  # "auto" (per backend and length, README "Differential attention"), "explicit" (fp32 scores; "xla" is
  # its old name), "blockwise" (flash loops in XLA), "pallas" (flash kernels: Triton on GPU, Mosaic on
  # TPU; "pallas_gpu" / "pallas_tpu" force one layout anywhere), "fused" (cuDNN on GPU)
  m.attention_impl = "auto"
  m.attention_block_q = 0  # query / key block of "blockwise" and "pallas"; 0: 128 on GPU/TPU, 512 on CPU
  m.attention_block_k = 0
  # The GPU backward kernels (README "Differential attention"): Triton's "two_pass" (dq in its own kernel,
  # deterministic) or "one_pass" (atomic adds in the dk/dv kernel: fewer FLOPs, nondeterministic), or
  # "mosaic" (two passes in Mosaic GPU for Hopper: TMA and wgmma, bf16/f16 only).
  m.attention_gpu_backward = "two_pass"
  # The GPU forward kernel: "triton", or "mosaic" (Hopper: TMA and wgmma, bf16/f16 only).
  m.attention_gpu_forward = "triton"
  # Per GPU kernel (the one-pass backward runs "dkv"): "rows,step,warps,stages" instead of the default
  # launch (`pallas_attention.default_launches`), e.g. the best of `python -m diffmoe_jax.bench kernels`.
  m.attention_gpu_launch = ml_collections.ConfigDict({kernel: "" for kernel in GPU_KERNELS})
  m.scan_layers = True
  m.remat_policy = "full"
  # With remat_policy "save_names": the checkpoint names kept, e.g. ("attn_out",); with "dots" or "dots_no_batch":
  # those kept besides the matmuls' outputs, e.g. ("flash_residuals",).
  m.remat_save_names = ()
  # The train step casts the matmul weights to `dtype` once, ahead of the layers, instead of in each (which remat
  # repeats in the backward): faster, for a compute-dtype copy of them and its gradient (README "Training").
  m.cast_weights_once = True

  m.moe = ml_collections.ConfigDict()
  m.moe.num_experts = 0
  m.moe.expert_ffn_dim = 0
  m.moe.top_k = 2
  m.moe.activation = "gelu"  # "gelu": two matrices per expert (the paper's count); "swiglu": three
  m.moe.dispatch = "capacity"  # or "dropless"
  m.moe.capacity_factor = 1.25
  m.moe.dropless_impl = "auto"  # "ragged" (jax.lax.ragged_dot), "padded" (capacity T), "auto" per backend
  m.moe.eval_dispatch = "dropless"  # evaluation and decoding: every token reaches its k experts
  # "attention_input": the MoE routes from the attention's input, the routing that gates λ;
  # "ffn_input": from its own input (x + attention), λ gated by a noise-free top-k on the attention input.
  m.moe.route_from = "attention_input"
  # With a mesh axis of size > 1 for "expert": "all_to_all" (capacity mode), "gather" (any mode, any
  # backend), "ragged" (dropless, GPU/TPU: ragged_all_to_all), "auto" (all_to_all for capacity; for
  # dropless ragged on GPU/TPU, gather on CPU), "off" (XLA places the layer).
  m.moe.expert_parallel = "auto"

  m.mod = ml_collections.ConfigDict()
  m.mod.enabled = True
  m.mod.every = 2  # layers per scanned group: the last layer of each group is routed (1: every layer)
  m.mod.capacity = 0.125  # fraction of each sequence's tokens a routed layer processes
  m.mod.predictor_hidden = 64  # width of the causal predictor MLP

  c.data = d = ml_collections.ConfigDict()
  # domain name -> source spec: "stdlib:code", "stdlib:docs", or "files:<glob>[,<glob>...]"
  d.domains = ml_collections.ConfigDict({"code": "stdlib:code", "docs": "stdlib:docs"})
  d.tokenizer = "bytes"  # "bytes", "sentencepiece:<model file>", "hf:<tokenizer.json>"
  d.cache_dir = ""  # token cache; "" means $DIFFMOE_CACHE or ~/.cache/diffmoe_jax
  # of the groups of near-duplicate files, formed over all domains' files together (data/split.py): the share
  # that goes to validation; each domain gets at least one group a side
  d.val_fraction = 0.05
  # Batches carry `segment_ids` int32 [B, T]: each position's document within its window (README "Data").
  d.segment_masking = True

  c.optimizer = o = ml_collections.ConfigDict()
  o.peak_lr = 3e-3
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.grad_clip = 1.0
  o.grad_accum_steps = 1

  c.curriculum = cur = ml_collections.ConfigDict()
  cur.total_steps = 1000
  # A phase whose batch_size is 0 takes tokens_per_batch // its seq_len sequences (a batch_size set wins)
  cur.tokens_per_batch = 0
  cur.mod_anneal_levels = 4  # MoD capacity anneals in this many discrete levels (each compiles once)
  cur.order = PHASES
  # The six-phase default (README "The curriculum"): fractions sum to 1; seq_len comes from context_fraction.
  # Router noise is relative to each token's logit spread (ops.routing.top_k_gating): at 0.5 about 3/4 of
  # top-1 choices survive it. Load balancing relaxes from 1e-2 to 1e-3 when experts specialise and stays
  # there: restoring it after would undo the specialisation the phase paid for.
  cur.warmup = phase_defaults(fraction=0.05, context_fraction=0.25, lr_shape="linear", lr_start=0.0,
                              router_noise_start=0.5, router_noise_end=0.5, mod_enabled=False)
  cur.foundation = phase_defaults(fraction=0.35, context_fraction=0.5, router_noise_start=0.5,
                                  router_noise_end=0.5, mod_capacity_start=1.0, mod_capacity_end=1.0)
  cur.sparsify = phase_defaults(fraction=0.20, context_fraction=0.5, router_noise_start=0.5,
                                mod_capacity_start=1.0)
  cur.specialize = phase_defaults(fraction=0.15, context_fraction=0.5, load_balance_weight=1e-3)
  cur.long_context = phase_defaults(fraction=0.15, context_fraction=1.0, load_balance_weight=1e-3)
  cur.anneal = phase_defaults(fraction=0.10, context_fraction=1.0, lr_shape="linear", lr_end=0.0,
                              load_balance_weight=1e-3)

  c.train = t = ml_collections.ConfigDict()
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 8  # per domain, from its validation split, at model.max_seq_len
  t.eval_batch_size = 8
  t.checkpoint_every = 200
  t.keep_checkpoints = 3
  t.stable_rank_every = 100
  t.max_nonfinite_in_a_row = 10
  # Dynamic loss scaling, with model.dtype "float16" only (README "Training"): the loss scale starts at
  # loss_scale_init (a resumed run continues with the saved one), doubles after loss_scale_growth_interval
  # finite steps in a row, and halves on a gradient overflow (the update skipped), down to loss_scale_min.
  t.loss_scale_init = LOSS_SCALE_INIT
  t.loss_scale_growth_interval = LOSS_SCALE_GROWTH_INTERVAL
  t.loss_scale_min = LOSS_SCALE_MIN
  t.run_steps = 0  # stop (with a checkpoint) after this many steps of one invocation; 0: run to the end
  t.memory_headroom = 0.9  # refuse to start if the estimate exceeds this fraction of available memory
  # False: a config the estimate says will not fit is trained anyway, with a warning (the estimate errs high on
  # GPUs: README "Too large for the machine").
  t.memory_check = True
  t.peak_flops_per_device = 0.0  # for MFU; 0: known accelerator peaks, or a measured matmul peak on CPU
  t.compilation_cache_dir = "~/.cache/diffmoe_jax/xla"  # "" disables the persistent compilation cache
  # Resuming with a config that differs from the checkpoint's is refused, except in train/resume.py's
  # FREE_FIELDS (name, train.*, mesh.*, data.cache_dir, how attention, the MoE and remat run) and in the fields listed
  # here: comma-separated paths or patterns ("optimizer.peak_lr,data.*"). A change of the model's shapes is
  # always refused.
  t.allow_config_change = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
  c.mesh.axis_rules = (
      ("batch", ("data", "fsdp", "expert")),
      ("length", None),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("head_dim", None),
      ("mlp", "tensor"),
      ("expert", "expert"),
      ("vocab", "tensor"),
      ("layers", None),
  )
  return c


def without_obsolete(saved: dict) -> tuple[dict, list[str]]:
  """A saved config without the fields an earlier version had and the code no longer reads, and their
  dotted paths: a field absent from `defaults()` inside a section `defaults()` has (not a top-level section
  such as `ablation`, not a curriculum phase the user added, not inside OPEN_DICTS)."""
  dropped = []

  def prune(default: dict, values: dict, prefix: str) -> dict:
    out = {}
    for key, value in values.items():
      path = prefix + key
      if key not in default:
        if prefix:
          dropped.append(path)
          continue
      elif (isinstance(value, dict) and isinstance(default[key], dict)
            and not is_open_dict(path)):
        value = prune(default[key], value, path + ".")
      out[key] = value
    return out

  sections = defaults().to_dict()
  # A phase the user added (named in curriculum.order) is the user's section, not an obsolete field.
  for phase, fields in saved.get("curriculum", {}).items():
    sections["curriculum"].setdefault(phase, fields)
  return prune(sections, saved, ""), dropped


def with_defaults(saved: dict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A config saved by an earlier version as a ConfigDict, with the fields added to `defaults()` since then
  at their defaults, and the dotted paths of those fields (to be reported: the saved run did not set them).
  Fields the code no longer has are left out (`without_obsolete`).
  """
  saved, _ = without_obsolete(saved)
  added = []

  def merge(default: dict, values: dict, prefix: str) -> dict:
    out = dict(values)
    for key, value in default.items():
      path = prefix + key
      if key not in values:
        added.append(path)
        out[key] = value
      elif (isinstance(value, dict) and isinstance(values[key], dict)
            and not is_open_dict(path)):  # the user's keys stay as saved
        out[key] = merge(value, values[key], path + ".")
    return out

  return ml_collections.ConfigDict(merge(defaults().to_dict(), saved, "")), added


def phase_defaults(**overrides) -> ml_collections.ConfigDict:
  """A curriculum phase's fields at their defaults, with `overrides` (how a config adds a phase of its own)."""
  p = ml_collections.ConfigDict()
  p.fraction = 0.0  # of curriculum.total_steps; used when steps == 0
  p.steps = 0
  p.context_fraction = 1.0  # seq_len = context_fraction * model.max_seq_len, unless seq_len is set
  p.seq_len = 0
  p.batch_size = 0  # 0: curriculum.tokens_per_batch // seq_len
  p.domain_weights = ml_collections.ConfigDict()  # empty: all domains, equal weight
  p.lr_shape = "constant"  # "constant" (lr_start), "linear" or "cosine" from lr_start to lr_end
  p.lr_start = 1.0  # multiples of optimizer.peak_lr at the phase's first and last step
  p.lr_end = 1.0
  p.router_noise_start = 0.0  # std of Gaussian noise on router logits, in units of each token's logit std
  p.router_noise_end = 0.0
  p.load_balance_weight = 1e-2
  p.z_loss_weight = 1e-3
  p.mod_predictor_weight = 1e-2
  p.mod_enabled = True
  p.mod_capacity_start = 0.0  # 0: model.mod.capacity
  p.mod_capacity_end = 0.0
  p.update(overrides)
  return p


def gpu_launches(model: ml_collections.ConfigDict) -> tuple[tuple[str, tuple[int, int, int, int]], ...]:
  """The GPU kernels' launches set in `model.attention_gpu_launch`: ((kernel, (rows, step, warps, stages)),
  ...), sorted by kernel; ConfigError for one that is not four such numbers."""
  launches = []
  for kernel, spec in sorted(model.attention_gpu_launch.items()):
    field = f"model.attention_gpu_launch.{kernel}"
    require(kernel in GPU_KERNELS, field, f"is not a GPU kernel; set one of {GPU_KERNELS}.")
    if spec == "":
      continue
    parts = str(spec).replace(" ", "").split(",")
    require(len(parts) == 4 and all(p.isdigit() for p in parts), field,
            f"{spec!r} is not 'rows,step,warps,stages' (four integers, such as '64,64,4,2'), or '' for the default.")
    rows, step, warps, stages = map(int, parts)
    for name, value, least in (("rows", rows, 16), ("step", step, 16), ("warps", warps, 1)):  # 16: Triton's dots
      require(value >= least and value & (value - 1) == 0, field,
              f"{name} = {value} in {spec!r} must be a power of two of at least {least}.")
    require(stages > 0, field, f"stages = {stages} in {spec!r} must be at least 1.")
    launches.append((kernel, (rows, step, warps, stages)))
  return tuple(launches)


def require(cond: bool, field: str, message: str) -> None:
  """ConfigError "config.<field>: <message>" unless `cond`."""
  if not cond:
    raise ConfigError(f"config.{field}: {message}")
