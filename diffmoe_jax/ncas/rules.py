"""The π-constraints on the model width, reconstructed, and the candidate space they filter.

The paper defers its constraints to a companion paper that is not available. These rules are a
reconstruction: each is a small pure function of the width and the rule settings, named, documented in one
docstring line, and switchable through `ncas.rules.enabled`. With the defaults they keep 9 of the 2,048
candidate widths of [2048, 8192], among them the paper's 4608, 3456 and 2592, and reject 4096.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from diffmoe_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class RuleSettings:
  min_width: int
  max_width: int
  tile: int  # the width must be a multiple of this (`tile_aligned`)
  head_dims: tuple[int, ...]  # allowed differential head widths Dv (`differential_heads`)


def largest_power_dividing(n: int, p: int) -> int:
  """The exponent of the prime p in n."""
  exponent = 0
  while n % p == 0:
    n //= p
    exponent += 1
  return exponent


def is_three_smooth(n: int) -> bool:
  """Whether n > 0 has no prime factor above 3."""
  return n > 0 and n // (2 ** largest_power_dividing(n, 2) * 3 ** largest_power_dividing(n, 3)) == 1


def in_range(width: int, s: RuleSettings) -> bool:
  """The paper's search range [2048, 8192]: between its smallest and largest power-of-two baselines."""
  return s.min_width <= width <= s.max_width


def three_smooth(width: int, s: RuleSettings) -> bool:
  """Only prime factors 2 and 3, so halving or thirding the width (heads, sub-heads, proxies) stays whole."""
  return is_three_smooth(width)


def not_power_of_two(width: int, s: RuleSettings) -> bool:
  """No power of two (with three_smooth: a factor 3): the paper's departure from powers of two (4096 fails)."""
  return width & (width - 1) != 0


def tile_aligned(width: int, s: RuleSettings) -> bool:
  """A multiple of the target's matrix tile (32: MI300X's 32x32 MFMA), so the width wastes no tile lanes."""
  return width % s.tile == 0


def differential_heads(width: int, s: RuleSettings) -> bool:
  """Divides into heads of an allowed even head width, each split into two differential sub-heads."""
  return any(width % head_dim == 0 for head_dim in s.head_dims)


RULES: dict[str, Callable[[int, RuleSettings], bool]] = {
    rule.__name__: rule for rule in (in_range, three_smooth, not_power_of_two, tile_aligned, differential_heads)}
DEFAULT_RULES = tuple(RULES)


def check_settings(rule_names, s: RuleSettings) -> None:
  """Raises ConfigError naming the field for an unknown rule or an unusable setting."""
  unknown = [name for name in rule_names if name not in RULES]
  if unknown:
    raise ConfigError(f"config.ncas.rules.enabled: {unknown} name no rule; the rules are {list(RULES)}.")
  if s.tile <= 0:
    raise ConfigError(f"config.ncas.rules.tile: must be a positive integer, got {s.tile}.")
  bad = [d for d in s.head_dims if d <= 0 or d % 4]
  if not s.head_dims or bad:
    raise ConfigError(f"config.ncas.rules.head_dims: {list(s.head_dims)} must be non-empty multiples of 4 "
                      "(two differential sub-heads of head_dim / 2, each rotated in pairs by RoPE).")


def rejecting_rule(width: int, rule_names, s: RuleSettings) -> str | None:
  """The first enabled rule `width` fails, or None if it passes them all."""
  for name in rule_names:
    if not RULES[name](width, s):
      return name
  return None


MAX_CANDIDATES = 100_000  # 50 times the paper's space; screening them takes about 2 s


def candidate_widths(min_width: int, max_width: int, step: int) -> list[int]:
  """The multiples of `step` in [min_width, max_width] (step 3: 2,048 widths in [2048, 8192])."""
  for field, value in (("min_width", min_width), ("max_width", max_width), ("step", step)):
    if not (isinstance(value, int) and value > 0):
      raise ConfigError(f"config.ncas.space.{field}: must be a positive integer, got {value!r}.")
  if min_width > max_width:
    raise ConfigError(f"config.ncas.space.min_width: {min_width} exceeds max_width {max_width}; swap them, such as "
                      f"min_width={max_width} and max_width={min_width}.")
  first = -(-min_width // step) * step
  count = max(0, (max_width - first) // step + 1)
  if count > MAX_CANDIDATES:  # counted before listing: 10^8 widths took many minutes and gigabytes of rows
    raise ConfigError(f"config.ncas.space: [min_width, max_width] = [{min_width}, {max_width}] in steps of {step} "
                      f"holds {count:,} candidate widths, more than the {MAX_CANDIDATES:,} a search screens (each "
                      "is a row of table.csv; the paper's space has ~2,000); narrow the range or raise the step.")
  widths = list(range(first, max_width + 1, step))
  if not widths:
    raise ConfigError(f"config.ncas.space: no multiple of step {step} lies in [min_width, max_width] = "
                      f"[{min_width}, {max_width}]; widen the range or lower the step.")
  return widths


def powers_of_two(min_width: int, max_width: int) -> list[int]:
  """The power-of-two baseline family in the range (2048, 4096, 8192 for the default space)."""
  return [2 ** k for k in range(max_width.bit_length()) if min_width <= 2 ** k <= max_width]
