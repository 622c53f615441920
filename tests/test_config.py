"""Config files load and validate; every bad field fails with a message naming it."""
import contextlib
import os
import subprocess
import sys

import ml_collections
import pytest

from diffmoe_jax import config as config_lib, validation
from diffmoe_jax.config import ConfigError


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
  return config_lib.load_file(f"configs/{name}.py")


@pytest.mark.parametrize("name", ["tiny", "pi", "pi_s", "pi_p"])
def test_configs_validate(name):
  validation.validate(load(name))


def test_paper_table():
  """The PI family as the paper's table gives it."""
  table = {"pi": (4608, 54, 36, 128, 9, 15360, 32768), "pi_s": (3456, 36, 27, 128, 6, 10240, 16384),
           "pi_p": (2592, 27, 18, 144, 4, 6912, 8192)}
  for name, (d, layers, heads, head_dim, experts, ffn, context) in table.items():
    m = load(name).model
    assert (m.d_model, m.num_layers, m.num_heads, m.head_dim, m.moe.num_experts, m.moe.expert_ffn_dim,
            m.max_seq_len) == (d, layers, heads, head_dim, experts, ffn, context)
    assert m.moe.top_k == 2 and m.mod.enabled and m.mod.every == 2 and m.mod.capacity == 0.125
    assert m.rope_theta == pytest.approx(31415.926, abs=1e-3)


def set_field(config, dotted: str, value, ignore_type: bool = False) -> None:
  """config.<dotted> = value; with `ignore_type`, a value of another type than the field's (ConfigDict refuses
  that on assignment, but not in a config built from a dict)."""
  *path, leaf = dotted.split(".")
  node = config
  for part in path:
    node = node[part]
  with node.ignore_type() if ignore_type else contextlib.nullcontext():
    node[leaf] = value


def _bad(**fields):
  c = load("tiny")
  for key, value in fields.items():
    set_field(c, key, value)
  return c


@pytest.mark.parametrize("fields, message", [
    ({"model.d_model": 300}, r"model\.d_model: 300 must equal model\.num_heads \* model\.head_dim"),
    ({"model.moe.top_k": 5}, r"model\.moe\.top_k: 5 must be between 1 and model\.moe\.num_experts \(4\)"),
    ({"model.mod.capacity": 0.0}, r"model\.mod\.capacity: 0\.0 must lie in \(0, 1\]"),
    ({"model.mod.capacity": 1.5}, r"model\.mod\.capacity: 1\.5 must lie in \(0, 1\]"),
    ({"model.moe.activation": "relu"}, r"model\.moe\.activation: 'relu' is not one of"),
    ({"model.attention": "linear"}, r"model\.attention: 'linear' is not one of"),
    ({"model.head_dim": 70, "model.d_model": 280}, r"model\.head_dim: the query/key width 35 must be even"),
    ({"mesh.shape.tensor": 2, "model.num_heads": 3, "model.head_dim": 96},
     r"mesh\.shape\.tensor: 2 does not divide model\.num_heads \(3\)"),
    ({"mesh.shape.expert": 3}, r"mesh\.shape\.expert: 3 does not divide model\.moe\.num_experts \(4\)"),
    ({"model.lambda_init": "1.5"}, r"model\.lambda_init: a constant λ_init must lie in \[0, 1\)"),
    ({"model.lambda_init": "half"}, r"model\.lambda_init: 'half' is neither 'schedule' nor a number"),
    ({"model.remat_policy": "save_names", "model.remat_save_names": ("nope",)},
     r"model\.remat_save_names: \['nope'\] are not checkpoint names"),
    ({"model.remat_policy": "save_names", "model.remat_save_names": ("attn_out", 3)},
     r"model\.remat_save_names: \[3\] are not checkpoint names of the model; choose from"),
    ({"model.remat_policy": "save_names", "model.remat_save_names": ("attn_out,ffn_out",)},
     r"model\.remat_save_names: \['attn_out,ffn_out'\] are not checkpoint names .*on the command line, several "
     r"names as a tuple: --config\.model\.remat_save_names=\"\('attn_out','ffn_out'\)\""),
    # Fields the chosen model would ignore are refused, not dropped: with the default remat policy, without a
    # dense FFN, with fewer layers than a mixture-of-depths group.
    ({"model.remat_save_names": ("attn_out",)}, r"model\.remat_save_names: \('attn_out',\) is kept only with "
     r"remat_policy 'save_names', 'dots' or 'dots_no_batch', but it is 'full'; set model\.remat_policy='save_names', "
     r"or remat_save_names to"),
    ({"model.remat_policy": "dots", "model.remat_save_names": ("nope",)},
     r"model\.remat_save_names: \['nope'\] are not checkpoint names"),
    ({"model.dense_ffn_dim": 1024}, r"model\.dense_ffn_dim: 1024 is the dense FFN's width, but model\.ffn is "
     r"'moe' .*; set model\.ffn='dense' for the dense ablation, or dense_ffn_dim to 0\."),
    ({"model.num_layers": 1}, r"model\.mod\.every: 2 exceeds model\.num_layers \(1\), so no layer would be "
     r"routed; set it to at most 1, or model\.mod\.enabled=False"),
    ({"model.ffn": "dense"}, r"model\.expert_conditional_lambda: needs model\.ffn='moe'"),
    ({"model.ffn": "dense", "model.expert_conditional_lambda": False, "model.moe.top_k": 0},
     r"model\.dense_ffn_dim: is 0, so the dense FFN width is model\.moe\.top_k \* model\.moe\.expert_ffn_dim = "
     r"0 \* 768 = 0; set dense_ffn_dim"),
    ({"model.moe.expert_parallel": "ragged"}, r"model\.moe\.expert_parallel: 'ragged' is dropless, but "
     r"model\.moe\.dispatch or eval_dispatch is 'capacity'"),
    ({"curriculum.warmup.seq_len": 512}, r"curriculum\.warmup\.seq_len: the phase's sequence length 512"),
    ({"curriculum.specialize.domain_weights": {"web": 1.0}},
     r"curriculum\.specialize\.domain_weights\.web: names no domain"),
    ({"curriculum.anneal.lr_shape": "step"}, r"curriculum\.anneal\.lr_shape: 'step' is not one of"),
    ({"curriculum.foundation.lr_end": 0.5}, r"curriculum\.foundation\.lr_end: 0\.5 differs from lr_start \(1\.0\), "
     r"but lr_shape 'constant' holds lr_start throughout; set curriculum\.foundation\.lr_shape to 'linear' or "
     r"'cosine', or lr_end equal to lr_start\."),
    ({"curriculum.anneal.lr_end": -0.1}, r"curriculum\.anneal\.lr_end: LR multipliers must be >= 0, got -0\.1\."),
    ({"optimizer.grad_accum_steps": 0}, r"optimizer\.grad_accum_steps: must be an integer >= 1"),
    ({"mesh.shape.model": 2}, r"mesh\.shape\.model: unknown mesh axis"),
    ({"curriculum.order": ("warmup", "total_steps")},
     r"curriculum\.order: names 'total_steps', but curriculum\.total_steps is a setting, not a phase; the phases "
     r"defined are \['anneal', 'foundation', 'long_context', 'sparsify', 'specialize', 'warmup'\]"),
    ({"curriculum.order": ("warmup", "order")},
     r"curriculum\.order: names 'order', but curriculum\.order is a setting"),
    ({"curriculum.order": ("warmup", "cooldown")},
     r"curriculum\.order: names 'cooldown', but curriculum\.cooldown is not defined; the phases defined are "
     r"\['anneal', 'foundation', 'long_context', 'sparsify', 'specialize', 'warmup'\]"),
    ({"curriculum.order": ("warmup", "warmup")}, r"curriculum\.order: names 'warmup' twice"),
    # --config.curriculum.order=warmup,anneal: one name with a comma; the message shows the tuple to write.
    ({"curriculum.order": ("warmup,foundation",)},
     r"^config\.curriculum\.order: 'warmup,foundation' is one phase name, not a list; on the command line give "
     r"the phases as a tuple: --config\.curriculum\.order=\"\('warmup','foundation'\)\"\.$"),
    ({"curriculum.order": ("",)}, r"^config\.curriculum\.order: is empty; list at least one phase\.$"),  # order=
    ({"curriculum.warmup.mod_capacity_start": 0.5},  # warmup runs MoD off: the capacity would be ignored
     r"^config\.curriculum\.warmup\.mod_capacity_start: is 0\.5, but curriculum\.warmup\.mod_enabled is False, so "
     r"every token runs the routed layers in this phase; set curriculum\.warmup\.mod_enabled=True, or "
     r"mod_capacity_start to 0\.$"),
    ({"seed": -1}, r"config\.seed: must be an integer from 0 to 2\*\*32 - 1 \(the random keys hold 32 bits\), got -1\."),
    ({"seed": 2**32}, r"config\.seed: must be an integer from 0 to 2\*\*32 - 1 .*got 4294967296\."),  # seed 0's weights
    ({"seed": 2**64}, r"config\.seed: must be an integer from 0 to 2\*\*32 - 1"),  # an OverflowError traceback
    ({"optimizer.b2": 1.0}, r"optimizer\.b2: Adam's decay rate must lie in \[0, 1\), got 1\.0"),
    ({"optimizer.eps": 0.0}, r"optimizer\.eps: must be > 0"),
    ({"optimizer.weight_decay": -0.1}, r"optimizer\.weight_decay: must be >= 0, got -0\.1"),
    ({"train.memory_headroom": 0.0}, r"train\.memory_headroom: the fraction of memory .* must lie in \(0, 1\]"),
    ({"train.peak_flops_per_device": -1.0}, r"train\.peak_flops_per_device: must be >= 0"),
    ({"curriculum.long_context.batch_size": -8},
     r"curriculum\.long_context\.batch_size: must be an integer >= 0 .*got -8"),
    ({"curriculum.anneal.domain_weights": {"code": "1/3"}},
     r"curriculum\.anneal\.domain_weights\.code: must be a number >= 0 \(such as 0\.3\), got '1/3'"),
    ({"curriculum.specialize.domain_weights": {"code": 0.2, "docs": 0.1}},  # not rescaled to 1
     r"curriculum\.specialize\.domain_weights: the weights sum to 0\.3; they are the fractions of each batch "
     r"per domain \(a domain left out gets 0\) and must sum to 1\."),
    ({"curriculum.anneal.domain_weights": {"code": 0.0}}, r"curriculum\.anneal\.domain_weights: the weights sum to 0;"),
    ({"curriculum.tokens_per_batch": 1000}, r"config\.curriculum\.tokens_per_batch: 1000 is not a multiple of "
     r"phase warmup's seq_len 64, so its batches would hold 960 tokens; use a multiple, or set "
     r"curriculum\.warmup\.batch_size\."),
    ({"mesh.axis_rules": (("batch", ("data", "fsdp")), ("length", None), ("embed", "bogus"), ("heads", "tensor"),
                          ("head_dim", None), ("mlp", "tensor"), ("expert", "expert"), ("vocab", "tensor"),
                          ("layers", None))},
     r"config\.mesh\.axis_rules: maps 'embed' to 'bogus', which is not a mesh axis; the axes are"),
    ({"mesh.axis_rules": (("batch", ("data", "fsdp")), ("length",))},  # each of these was a traceback
     r"config\.mesh\.axis_rules: rule 1 is \('length',\), not a \(logical axis, mesh axis or tuple of mesh axes or "
     r"None\) pair such as \('batch', \('data', 'fsdp'\)\)\.$"),
    ({"mesh.axis_rules": (("batch", "data", "fsdp"),)}, r"config\.mesh\.axis_rules: rule 0 is \('batch', 'data', "),
    ({"mesh.axis_rules": (("batch", 3),)}, r"config\.mesh\.axis_rules: rule 0 is \('batch', 3\), not a"),
    ({"mesh.axis_rules": (3,)}, r"config\.mesh\.axis_rules: rule 0 is 3, not a"),
    ({"mesh.axis_rules": ("batch",)}, r"config\.mesh\.axis_rules: rule 0 is 'batch', not a"),  # --...axis_rules=batch
    ({"mesh.axis_rules": config_lib.defaults().mesh.axis_rules + (("batch", None),)},
     r"config\.mesh\.axis_rules: has 2 rules for logical axis 'batch'; keep one\.$"),
    ({"data.domains": {"code": "stdlib:code", " ": "stdlib:docs"}},  # tags eval/ /loss before
     r"config\.data\.domains\.' ': a domain's name is not blank and has no leading or trailing space"),
    ({"optimizer.peak_lr": float("inf")}, r"config\.optimizer\.peak_lr: must be a finite number, got inf\."),
    ({"curriculum.warmup.lr_start": float("nan")}, r"config\.curriculum\.warmup\.lr_start: must be a finite number"),
    ({"model.attention_gpu_launch.dkv": "64,64,4"}, r"model\.attention_gpu_launch\.dkv: '64,64,4' is not "
     r"'rows,step,warps,stages' \(four integers, such as '64,64,4,2'\), or '' for the default"),
    ({"model.attention_gpu_launch.dq": "64,8,4,2"},
     r"model\.attention_gpu_launch\.dq: step = 8 in '64,8,4,2' must be a power of two of at least 16"),
    ({"model.attention_gpu_launch.forward": "64,64,3,2"},
     r"model\.attention_gpu_launch\.forward: warps = 3 in '64,64,3,2' must be a power of two of at least 1"),
    ({"model.attention_gpu_launch.dkv": "64,64,4,0"}, r"stages = 0 in '64,64,4,0' must be at least 1"),
    ({"model.attention_gpu_forward": "cutlass"}, r"model\.attention_gpu_forward: 'cutlass' is not one of "
     r"\('triton', 'mosaic'\)"),
    ({"model.attention_gpu_forward": "mosaic", "model.dtype": "float32"}, r"model\.attention_gpu_forward: 'mosaic' "
     r"needs 16-bit activations \(model\.dtype bfloat16 or float16\), got model\.dtype 'float32'\."),
    ({"model.attention_gpu_backward": "mosaic", "model.dtype": "float32"}, r"model\.attention_gpu_backward: "
     r"'mosaic' needs 16-bit activations"),
    ({"model.logits_chunk_len": -256}, r"^config\.model\.logits_chunk_len: must be 0 \(the whole sequence\) or a "
     r"positive number of positions, got -256\.$"),
    # Named the start's field, which the user had not set.
    ({"curriculum.warmup.router_noise_end": -1.0},
     r"^config\.curriculum\.warmup\.router_noise_end: a router noise std must be >= 0, got -1\.0\.$"),
    # Past int32: OverflowError tracebacks from JAX, a list of 10**12 layers, a mesh search over 2**40 splits.
    ({"model.vocab_size": 10**12}, r"^config\.model\.vocab_size: 1000000000000 is beyond int32 \(at most 2\*\*31 - 1 "
     r"= 2,147,483,647\)"),
    ({"model.num_layers": 10**12}, r"^config\.model\.num_layers: 1000000000000 is beyond int32"),
    ({"curriculum.tokens_per_batch": 2**40}, r"^config\.curriculum\.tokens_per_batch: 1099511627776 is beyond int32"),
    # Within int32, but not its slots: tiny evaluates with the padded dropless dispatch, T slots per expert.
    ({"model.moe.num_experts": 10**8}, r"^config\.model\.moe\.num_experts: 100,000,000 experts x 256 slots per "
     r"sequence \(model\.moe\.eval_dispatch 'dropless' at model\.max_seq_len 256\) = 25,600,000,000 expert slots, "
     r"more than int32 indices address"),
    ({"model.moe.num_experts": 2**31 - 1, "model.moe.eval_dispatch": "capacity"}, r"^config\.model\.moe\.num_experts: "
     r"2,147,483,647 experts x 1 slots per sequence \(model\.moe\.dispatch 'capacity'"),
])
def test_bad_fields_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    validation.validate(_bad(**fields))


def test_gpu_launches_parse_from_the_command_line():
  config = _bad(**{"model.attention_gpu_launch.dkv": "32, 64,8,3", "model.attention_gpu_launch.forward": "64,64,4,2"})
  assert config_lib.gpu_launches(config.model) == (("dkv", (32, 64, 8, 3)), ("forward", (64, 64, 4, 2)))
  command = [sys.executable, "-m", "diffmoe_jax.estimate", "--config=configs/tiny.py"]
  ok = subprocess.run(command + ["--config.model.attention_gpu_launch.dkv=32,64,8,3"], capture_output=True,
                      text=True, cwd=ROOT, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  bad = subprocess.run(command + ["--config.model.attention_gpu_launch.dkv=32,64"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip() == (
      "error: config.model.attention_gpu_launch.dkv: '32,64' is not 'rows,step,warps,stages' (four integers, "
      "such as '64,64,4,2'), or '' for the default."), bad.stderr[-2000:]


def test_odd_head_count_is_fine_without_tensor_parallelism():
  """PI-S's 27 heads: valid on a mesh whose tensor axis is 1 or divides 27."""
  c = load("pi_s")
  c.mesh.shape.tensor = 3
  validation.validate(c)


def test_with_defaults_fills_fields_a_saved_config_lacks_and_keeps_the_users_dicts():
  saved = load("tiny").to_dict()
  del saved["model"]["attention_gpu_backward"], saved["train"]["log_every"]
  saved["data"]["domains"] = {"web": "files:/data/*.txt"}  # the user's keys: nothing is added to them
  config, added = config_lib.with_defaults(saved)
  assert sorted(added) == ["model.attention_gpu_backward", "train.log_every"]
  assert config.model.attention_gpu_backward == "two_pass"
  assert config.train.log_every == config_lib.defaults().train.log_every
  assert dict(config.data.domains) == {"web": "files:/data/*.txt"} and config.model.d_model == 288


def test_fields_the_code_dropped_are_left_out_of_a_saved_config():
  saved = load("tiny").to_dict()
  saved["data"]["eval_domain"] = ""  # read by no code any more
  saved["ablation"] = {"arms": "full", "seeds": 1}  # a section of the user's (configs/ablation.py)
  saved["curriculum"]["cooldown"] = dict(saved["curriculum"]["anneal"], fraction=0.0)  # a phase of the user's
  kept, dropped = config_lib.without_obsolete(saved)
  assert dropped == ["data.eval_domain"]
  assert kept["ablation"] == saved["ablation"] and kept["curriculum"]["cooldown"] == saved["curriculum"]["cooldown"]
  config, added = config_lib.with_defaults(saved)
  assert "eval_domain" not in config.data and added == []


@pytest.mark.parametrize("field, value, message", [
    ("model.scan_layers", "false", r"config\.model\.scan_layers: must be True or False, got 'false' \(str\)\."),
    ("model.mod.enabled", "no", r"config\.model\.mod\.enabled: must be True or False, got 'no'"),
    ("model.moe.top_k", True, r"config\.model\.moe\.top_k: must be an integer, got True \(bool\)\."),
    ("model.mod.predictor_hidden", 3.5, r"config\.model\.mod\.predictor_hidden: must be an integer, got 3\.5"),
    ("model.rope_theta", "1e4", r"config\.model\.rope_theta: must be a number, got '1e4' \(str\)\."),
    ("model.moe.capacity_factor", "1.25", r"config\.model\.moe\.capacity_factor: must be a number, got '1\.25'"),
    ("curriculum.warmup.mod_enabled", "False", r"config\.curriculum\.warmup\.mod_enabled: must be True or False"),
    # Sequences and sections: each gave a TypeError or AttributeError traceback.
    ("curriculum.order", None, r"^config\.curriculum\.order: must be a tuple \(such as \('warmup', 'foundation'"),
    ("curriculum.order", ("warmup", 1), r"^config\.curriculum\.order: holds 1; each entry is a string, as in \(.warmup."),
    ("mesh.axis_rules", None, r"^config\.mesh\.axis_rules: must be a tuple \(such as \(\('batch', "),
    ("model.remat_save_names", None, r"^config\.model\.remat_save_names: must be a tuple \(such as \(\)\), got None"),
    ("curriculum.warmup.domain_weights", "code", r"^config\.curriculum\.warmup\.domain_weights: must be a section "
     r"of fields \(a dict such as \{\}\), got 'code'\.$"),
])
def test_a_value_of_the_wrong_type_names_the_field(field, value, message):
  """A config built from a dict, or set under ignore_type(), is not type-checked by ConfigDict: "false" in a
  boolean field would read as True, True in an integer field as 1."""
  c = load("tiny")
  set_field(c, field, value, ignore_type=True)
  with pytest.raises(ConfigError, match=message):
    validation.validate(c)


def test_a_phase_the_user_adds_is_type_checked_too():
  c = load("tiny")
  c.curriculum.cooldown = config_lib.phase_defaults(fraction=0.0, steps=1)
  c.curriculum.order = c.curriculum.order + ("cooldown",)
  with c.curriculum.cooldown.ignore_type():
    c.curriculum.cooldown.steps = "1"
  with pytest.raises(ConfigError, match=r"config\.curriculum\.cooldown\.steps: must be an integer, got '1'"):
    validation.validate(c)


@pytest.mark.parametrize("fields, message", [
    ({"model.d_modle": 48}, r"^config\.model\.d_modle: no such field; did you mean model\.d_model\?$"),
    ({"curriculum.warmup.lr_ends": 1.0},
     r"^config\.curriculum\.warmup\.lr_ends: no such field; did you mean curriculum\.warmup\.lr_end\?$"),
    ({"train.zzz": 1}, r"^config\.train\.zzz: no such field; the fields there are allow_config_change, checkpoint_every, \S+, "),
    ({"seedd": 3}, r"^config\.seedd: no such field; did you mean seed\?$"),
])
def test_a_misspelt_field_set_in_python_is_named(fields, message):
  """ConfigDict takes new fields in Python (a notebook's `config.model.update(d_modle=48)`), and validate
  ignored them, so the run went on with the default; the command line already refused them."""
  with pytest.raises(ConfigError, match=message):
    validation.validate(_bad(**fields))


def test_sections_and_phases_of_the_users_own_are_not_unknown_fields():
  c = load("tiny")
  c.ablation = ml_collections.ConfigDict({"arms": "full"})  # a top-level section, as configs/ablation.py has
  c.data.domains = ml_collections.ConfigDict({"web": "files:/data/*.txt"})  # OPEN_DICTS are the user's
  c.curriculum.cooldown = ml_collections.ConfigDict(config_lib.phase_defaults().to_dict())
  c.curriculum.order = (*c.curriculum.order, "cooldown")
  validation._check_known_fields(c)
  c.curriculum.cooldown.lr_strat = 0.1
  with pytest.raises(ConfigError, match=r"^config\.curriculum\.cooldown\.lr_strat: no such field; did you mean "
                     r"curriculum\.cooldown\.lr_start\?$"):
    validation._check_known_fields(c)


def test_a_search_config_is_not_taken_for_a_training_config():
  """configs/ncas.py has no model section; validate names what is missing instead of an AttributeError."""
  with pytest.raises(ConfigError, match=r"config: has no curriculum, mesh, model, name, optimizer, train, which "
                                        r"every training config has"):
    validation.validate(load("ncas"))


@pytest.mark.parametrize("patterns, message", [
    ("bogus.field", r"^config\.train\.allow_config_change: 'bogus\.field' names no field of the config"),
    ("optimizer.peak_lr,optimizer.peak_lrr",
     r"^config\.train\.allow_config_change: 'optimizer\.peak_lrr' names no field of the config; did you mean "
     r"optimizer\.peak_lr\?$"),
    ("model.moee.*", r"'model\.moee\.\*' names no field of the config"),
])
def test_an_allowed_change_that_names_no_field_is_refused(patterns, message):
  """A misspelt entry allowed nothing: the run resumed as if it were not there, or refused the change the user
  meant to allow with a line that never named the misspelling."""
  with pytest.raises(ConfigError, match=message):
    validation.validate(_bad(**{"train.allow_config_change": patterns}))


def test_allowed_changes_may_name_fields_sections_patterns_and_keys_of_the_users_dicts():
  c = load("tiny")
  # A field, a section, a glob, everything, a domain the saved run had that this config dropped, the data.
  c.train.allow_config_change = "optimizer.peak_lr, curriculum,model.moe.*,*,data.domains.docs,data.files"
  validation.validate(c)
