"""Completing an architecture from its width, and the width-scaled proxy each candidate trains.

The paper gives three rows (PI 4608, PI-S 3456, PI-P 2592) but no rule for the rest of a row. The rules
below are the simplest found that reproduce the rows from the width alone; they are fits to three points,
not derivations, and `paper_mismatches` reports where they miss (the expert FFN width of PI and PI-S,
15360 and 10240, which carry a factor 5 and so follow no 3-smooth rule).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import ml_collections

from diffmoe_jax import config as config_lib
from diffmoe_jax.config import ConfigError
from diffmoe_jax.ncas.rules import is_three_smooth


@dataclasses.dataclass(frozen=True)
class Architecture:
  d_model: int
  num_layers: int
  num_heads: int
  head_dim: int
  num_experts: int
  top_k: int
  expert_ffn_dim: int
  max_seq_len: int


@dataclasses.dataclass(frozen=True)
class CompletionRules:
  head_dims: tuple[int, ...] = (128, 144)  # in order of preference
  max_width_per_layer: int = 96
  layer_multiple: int = 9
  width_per_expert: int = 512
  top_k: int = 2
  ffn_ratio: float = 8 / 3
  ffn_multiple: int = 256
  context_divisor: int = 512


# The paper's table (its text, not the configs, which are checked against it in the tests).
PAPER_ROWS = {
    "pi": Architecture(4608, 54, 36, 128, 9, 2, 15360, 32768),
    "pi_s": Architecture(3456, 36, 27, 128, 6, 2, 10240, 16384),
    "pi_p": Architecture(2592, 27, 18, 144, 4, 2, 6912, 8192),
}


def head_dim_for(width: int, rules: CompletionRules) -> int:
  """Head width: the first preferred one that divides the width (128 for PI and PI-S, 144 for PI-P)."""
  for head_dim in rules.head_dims:
    if width % head_dim == 0:
      return head_dim
  raise ConfigError(f"config.ncas.complete.head_dims: none of {list(rules.head_dims)} divides the width "
                    f"{width}; add a head width that does, or enable the differential_heads rule.")


def layers_for(width: int, rules: CompletionRules) -> int:
  """Depth: the smallest 3-smooth multiple of 9 with width / depth <= 96 (54, 36, 27 for the rows)."""
  layers = rules.layer_multiple * max(1, math.ceil(width / rules.max_width_per_layer / rules.layer_multiple))
  while not is_three_smooth(layers):
    layers += rules.layer_multiple
  return layers


def experts_for(width: int, rules: CompletionRules) -> int:
  """Experts: the largest 3-smooth count <= width / 512, at least top_k (9, 6, 4 for the rows)."""
  limit = max(rules.top_k, width // rules.width_per_expert)
  counts = [n for n in range(rules.top_k, limit + 1) if is_three_smooth(n)]
  if not counts:
    raise ConfigError(f"config.ncas.complete.top_k: no 3-smooth expert count lies between top_k {rules.top_k} and "
                      f"{limit} (width {width} / width_per_expert {rules.width_per_expert}, at least top_k); "
                      "use a 3-smooth top_k such as 2, or a smaller width_per_expert.")
  return max(counts)


def expert_ffn_for(width: int, rules: CompletionRules) -> int:
  """Expert FFN: 8/3 of the width rounded to a multiple of 256 (exact and 3-smooth for 3-smooth widths)."""
  return max(rules.ffn_multiple, round(width * rules.ffn_ratio / rules.ffn_multiple) * rules.ffn_multiple)


def context_for(width: int, rules: CompletionRules) -> int:
  """Context: the largest power of two <= width² / 512 (32768, 16384, 8192 for the rows)."""
  if width * width < rules.context_divisor:  # below one token: the power of two would be a fraction
    raise ConfigError(f"config.ncas.complete.context_divisor: {rules.context_divisor} exceeds width² = "
                      f"{width * width} (width {width}), leaving a context below one token; use at most "
                      f"{width * width}, such as 512.")
  return 2 ** int(math.floor(math.log2(width * width / rules.context_divisor)))


def complete(width: int, rules: CompletionRules) -> Architecture:
  """The full architecture the completion rules give a width."""
  head_dim = head_dim_for(width, rules)
  return Architecture(d_model=width, num_layers=layers_for(width, rules), num_heads=width // head_dim,
                      head_dim=head_dim, num_experts=experts_for(width, rules), top_k=rules.top_k,
                      expert_ffn_dim=expert_ffn_for(width, rules), max_seq_len=context_for(width, rules))


def paper_mismatches(rules: CompletionRules) -> list[dict]:
  """Every (row, field) where the completed architecture differs from the paper's table."""
  out = []
  for row, paper in PAPER_ROWS.items():
    derived = complete(paper.d_model, rules)
    for field in dataclasses.fields(Architecture):
      want, got = getattr(paper, field.name), getattr(derived, field.name)
      if want != got:
        out.append({"row": row, "field": field.name, "paper": want, "rules": got})
  return out


def proxy_head_dim(width: int, head_dim: int, scale: int) -> int:
  """The proxy's head width: the multiple of 4 dividing width / scale nearest head_dim / scale (larger on a tie).

  A multiple of 4 because each differential head splits into two sub-heads that RoPE rotates in pairs.
  PI-P's 144 / 8 = 18 is not one, so its proxy (width 324) takes heads of 12.
  """
  proxy_width = width // scale
  options = [h for h in range(4, proxy_width + 1, 4) if proxy_width % h == 0]
  if width % scale or not options:
    raise ConfigError(f"config.ncas.proxy.scale: {scale} leaves width {width} no proxy head layout (the proxy "
                      f"width {width / scale:g} must be a whole multiple of 4); use a smaller scale, such as 8.")
  return min(options, key=lambda h: (abs(h - head_dim / scale), -h))


def proxy(arch: Architecture, scale: int, num_layers: int, seq_len: int) -> Architecture:
  """The width-scaled proxy: width, head width and FFN / scale; the experts and top-k kept; short and shallow."""
  head_dim = proxy_head_dim(arch.d_model, arch.head_dim, scale)
  width = arch.d_model // scale
  return Architecture(d_model=width, num_layers=num_layers, num_heads=width // head_dim, head_dim=head_dim,
                      num_experts=arch.num_experts, top_k=arch.top_k,
                      expert_ffn_dim=max(4, round(arch.expert_ffn_dim / scale / 4) * 4), max_seq_len=seq_len)


class Training(NamedTuple):
  peak_lr: float
  total_steps: int


# The training settings of configs/pi.py, pi_s.py and pi_p.py by width (the paper gives no learning rate;
# PI's length is set by its training compute).
PAPER_ROW_TRAINING = {4608: Training(3e-4, 66_700), 3456: Training(4e-4, 100_000), 2592: Training(6e-4, 100_000)}


def training_for(width: int) -> Training:
  """The training settings of the PI config nearest in width (the wider on a tie): PI-P's for 2304."""
  return PAPER_ROW_TRAINING[min(PAPER_ROW_TRAINING, key=lambda w: (abs(w - width), -w))]


def set_model(model: ml_collections.ConfigDict, arch: Architecture) -> None:
  """Writes the architecture's shape into a config's model section."""
  model.update(d_model=arch.d_model, num_layers=arch.num_layers, num_heads=arch.num_heads,
               head_dim=arch.head_dim, max_seq_len=arch.max_seq_len)
  model.moe.update(num_experts=arch.num_experts, expert_ffn_dim=arch.expert_ffn_dim, top_k=arch.top_k)


def training_config(arch: Architecture, name: str) -> ml_collections.ConfigDict:
  """The full-scale training config of an architecture, as the PI configs set theirs: 128 sequences a batch,
  the steps and peak learning rate of the PI config nearest in width (`training_for`)."""
  c = config_lib.defaults()
  c.name = name
  set_model(c.model, arch)
  c.curriculum.tokens_per_batch = 128 * arch.max_seq_len
  training = training_for(arch.d_model)
  c.curriculum.total_steps, c.optimizer.peak_lr = training.total_steps, training.peak_lr
  c.mesh.shape.update(data=1, fsdp=-1)
  return c


def config_file_text(arch: Architecture, name: str, summary: str) -> str:
  """A config file `main` accepts, equal to `training_config(arch, name)`."""
  return f'''"""{summary}"""
from diffmoe_jax import config as config_lib


def get_config():
  c = config_lib.defaults()
  c.name = "{name}"
  c.model.update(d_model={arch.d_model}, num_layers={arch.num_layers}, num_heads={arch.num_heads},
                 head_dim={arch.head_dim}, max_seq_len={arch.max_seq_len})
  c.model.moe.update(num_experts={arch.num_experts}, expert_ffn_dim={arch.expert_ffn_dim}, top_k={arch.top_k})
  c.curriculum.tokens_per_batch = {128 * arch.max_seq_len}
  # Steps and peak learning rate: those of the PI config nearest in width.
  c.curriculum.total_steps = {training_for(arch.d_model).total_steps:_}
  c.optimizer.peak_lr = {training_for(arch.d_model).peak_lr!r}
  # Weights, gradients and optimizer state shard over every device (FSDP), as in configs/pi.py.
  c.mesh.shape.update(data=1, fsdp=-1)
  return c
'''
