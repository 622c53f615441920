"""The six-phase curriculum: every per-step training setting as a pure function of the step.

Phase boundaries, learning rate, router noise, auxiliary-loss weights, mixture-of-depths capacity,
sequence length, batch size and domain mixture depend on the step alone, so a resumed run lands in the
right phase with the right settings. The README ("The curriculum") describes the default phases.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp
import ml_collections

from diffmoe_jax import validation
from diffmoe_jax.ops import routing


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  index: int
  start: int  # first step of the phase
  end: int  # one past its last step
  seq_len: int
  batch_size: int
  domain_weights: tuple[tuple[str, float], ...]  # normalised, in data.domains order
  lr_shape: str
  lr_start: float  # absolute learning rates
  lr_end: float
  router_noise_start: float
  router_noise_end: float
  load_balance_weight: float
  z_loss_weight: float
  mod_predictor_weight: float
  mod_enabled: bool
  mod_capacity_start: float
  mod_capacity_end: float

  @property
  def steps(self) -> int:
    return self.end - self.start


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What one step runs with. `shape_key` holds the settings that change the compiled program."""
  step: int
  phase: Phase
  lr: float
  router_noise: float
  mod_mode: str  # "topk" or "off"
  mod_capacity: float  # quantised to whole tokens: K / T with K = routing.mod_capacity_tokens(capacity, T)

  @property
  def shape_key(self) -> tuple:
    return (self.phase.seq_len, self.phase.batch_size, self.mod_mode, self.mod_capacity)


class Curriculum:
  """Resolves the config's phases into step ranges and answers `settings(step)`."""

  def __init__(self, config: ml_collections.ConfigDict):
    cur, model = config.curriculum, config.model
    self.total_steps = cur.total_steps
    self.mod_levels = cur.mod_anneal_levels
    self.model_has_mod = bool(model.mod.enabled)
    lengths = validation.phase_lengths(cur)
    domains = list(config.data.domains.keys())
    peak = config.optimizer.peak_lr
    phases, start = [], 0
    for index, (name, steps) in enumerate(zip(cur.order, lengths)):
      p = cur[name]
      seq_len = validation.phase_seq_len(config, name)
      batch_size = p.batch_size or cur.tokens_per_batch // seq_len
      weights = dict(p.domain_weights) if len(p.domain_weights) else {d: 1.0 / len(domains) for d in domains}
      phases.append(Phase(
          name=name, index=index, start=start, end=start + steps, seq_len=seq_len, batch_size=batch_size,
          domain_weights=tuple((d, weights.get(d, 0.0)) for d in domains),
          lr_shape=p.lr_shape, lr_start=peak * p.lr_start,
          lr_end=peak * (p.lr_start if p.lr_shape == "constant" else p.lr_end),
          router_noise_start=p.router_noise_start, router_noise_end=p.router_noise_end,
          load_balance_weight=p.load_balance_weight, z_loss_weight=p.z_loss_weight,
          mod_predictor_weight=p.mod_predictor_weight, mod_enabled=bool(p.mod_enabled),
          mod_capacity_start=p.mod_capacity_start or model.mod.capacity,
          mod_capacity_end=p.mod_capacity_end or model.mod.capacity))
      start += steps
    self.phases = tuple(phases)
    self._boundaries = jnp.asarray([p.start for p in self.phases[1:]], jnp.int32)

  def phase_at(self, step: int) -> Phase:
    if not 0 <= step < self.total_steps:
      raise ValueError(f"step {step} lies outside the curriculum's [0, {self.total_steps}).")
    for phase in self.phases:
      if phase.start <= step < phase.end:
        return phase
    raise AssertionError("phases cover [0, total_steps)")  # guaranteed by validation.phase_lengths

  def settings(self, step: int) -> StepSettings:
    phase = self.phase_at(step)
    progress = _progress(step, phase)
    noise = phase.router_noise_start + (phase.router_noise_end - phase.router_noise_start) * progress
    mod_mode, capacity = self._mod_setting(phase, step)
    return StepSettings(step=step, phase=phase, lr=self.lr(step), router_noise=float(noise),
                        mod_mode=mod_mode, mod_capacity=capacity)

  def _mod_setting(self, phase: Phase, step: int) -> tuple[str, float]:
    """(MoD mode, capacity) of `step` in `phase`: "off" at 1.0, or "topk" at the annealed capacity in whole
    tokens, counted as the routed layer counts them, so capacities that select the same number of tokens
    share one compiled step.

    A capacity that selects every token runs "off": the same function (updates scaled by the router's
    sigmoid in both) without the sort and gathers, and no predictor loss, whose target would be all ones.
    """
    if not (self.model_has_mod and phase.mod_enabled):
      return "off", 1.0
    selected = routing.mod_capacity_tokens(self._mod_capacity(phase, step), phase.seq_len)
    return ("off", 1.0) if selected == phase.seq_len else ("topk", selected / phase.seq_len)

  def tokens_by_setting(self) -> dict[tuple[int, str, float], int]:
    """The tokens the whole curriculum trains at each (sequence length, MoD mode, MoD capacity): what its
    training FLOPs are counted from (`estimate.curriculum_training_flops`)."""
    tokens: dict = {}
    for phase in self.phases:
      annealed = phase.mod_capacity_start != phase.mod_capacity_end
      for step in range(phase.start, phase.end if annealed else phase.start + 1):  # else one setting throughout
        key = (phase.seq_len,) + self._mod_setting(phase, step)
        steps = 1 if annealed else phase.steps
        tokens[key] = tokens.get(key, 0) + steps * phase.batch_size * phase.seq_len
    return tokens

  def _mod_capacity(self, phase: Phase, step: int) -> float:
    """Geometric steps from start to end in `mod_anneal_levels` equal segments (1 → 1/8 in 4: 1, ½, ¼, ⅛).

    A phase of fewer steps than levels takes one level a step, so its last step still reaches `end`.
    """
    start, end = phase.mod_capacity_start, phase.mod_capacity_end
    levels = min(self.mod_levels, phase.steps)
    if start == end or levels <= 1:
      return end
    level = min(int((step - phase.start) * levels / phase.steps), levels - 1)
    return start * (end / start) ** (level / (levels - 1))

  def lr(self, step):
    """The learning rate at `step`: a float for a Python int, computed on the host (the training loop asks every
    step, and a device computation there waited for the steps in flight), or a traced array for a traced int."""
    if isinstance(step, numbers.Integral):
      phase = self.phase_at(step)
      return _phase_lr(phase, _progress(step, phase), math.cos)
    step = jnp.asarray(step, jnp.int32)
    index = jnp.searchsorted(self._boundaries, step, side="right")
    return jnp.stack([_phase_lr(p, jnp.clip((step - p.start) / max(p.steps - 1, 1), 0.0, 1.0), jnp.cos)
                      for p in self.phases])[index]

  def tokens_before(self, step: int) -> int:
    """Tokens trained on (batch x sequence length, summed) in the steps before `step`."""
    return sum(p.batch_size * p.seq_len * max(0, min(step, p.end) - p.start) for p in self.phases)

  def shape_keys(self, start: int = 0, end: int | None = None) -> list[tuple]:
    """Every distinct compiled-program key of steps [start, end) (default: the whole run), in order of first use."""
    end = self.total_steps if end is None else end
    keys = []
    for phase in self.phases:
      for step in range(max(phase.start, start), min(phase.end, end)):
        key = self.settings(step).shape_key
        if key not in keys:
          keys.append(key)
        if phase.mod_capacity_start == phase.mod_capacity_end:
          break  # the rest of the phase shares this key
    return keys

  def describe(self) -> str:
    lines = []
    for p in self.phases:
      mix = ", ".join(f"{d} {w:.2f}" for d, w in p.domain_weights if w > 0)
      mod = (f"MoD {p.mod_capacity_start:g}->{p.mod_capacity_end:g}" if self.model_has_mod and p.mod_enabled
             else "MoD off")
      lines.append(f"  {p.index}. {p.name:<13} steps {p.start + 1:>6}-{p.end:<6} seq {p.seq_len:<6} batch "
                   f"{p.batch_size:<5} lr {p.lr_shape} {p.lr_start:.2e}->{p.lr_end:.2e}  noise "
                   f"{p.router_noise_start:g}->{p.router_noise_end:g}  {mod}  [{mix}]")
    return "\n".join(lines)


def _phase_lr(phase: Phase, u, cos):
  """The learning rate at fraction `u` of `phase` (a float or a traced array, with its `cos`)."""
  if phase.lr_shape == "cosine":
    return phase.lr_end + (phase.lr_start - phase.lr_end) * 0.5 * (1 + cos(math.pi * u))
  return phase.lr_start + (phase.lr_end - phase.lr_start) * u


def _progress(step: int, phase: Phase) -> float:
  return (step - phase.start) / max(phase.steps - 1, 1)

