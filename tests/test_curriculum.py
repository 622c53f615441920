"""The curriculum: phase boundaries, schedules and settings as pure functions of the step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax import config as config_lib, validation
from diffmoe_jax.config import ConfigError
from diffmoe_jax.ops import routing
from diffmoe_jax.train import step as step_lib
from diffmoe_jax.train.curriculum import Curriculum
from test_config import load


@pytest.fixture
def tiny():
  """configs/tiny.py with the step count and anneal levels these tests are written for."""
  config = load("tiny")
  config.curriculum.total_steps = 600
  config.curriculum.mod_anneal_levels = 4
  return config


def test_phases_tile_the_run(tiny):
  cur = Curriculum(tiny)
  assert [p.name for p in cur.phases] == list(config_lib.PHASES)
  assert cur.phases[0].start == 0 and cur.phases[-1].end == tiny.curriculum.total_steps
  for a, b in zip(cur.phases, cur.phases[1:]):
    assert a.end == b.start and a.steps > 0
  # Fractions 0.05/0.35/0.2/0.15/0.15/0.1 of 600 steps.
  assert [p.steps for p in cur.phases] == [30, 210, 120, 90, 90, 60]
  # The run's summary counts steps from 1, as the training log does ("step 31/600 phase foundation").
  assert [line.split()[3] for line in cur.describe().splitlines()] == [
      "1-30", "31-240", "241-360", "361-450", "451-540", "541-600"]


def test_explicit_steps_and_fractions_mix(tiny):
  """Explicit steps first; the phases without steps split the rest in proportion to their fractions."""
  cur = tiny.curriculum
  cur.total_steps = 100
  cur.warmup.steps = 7
  lengths = validation.phase_lengths(cur)
  # 93 steps left, shared as 0.35 : 0.2 : 0.15 : 0.15 : 0.1 (of 0.95): cumulative 7/19, 11/19, 14/19,
  # 17/19, 1 of them = 34.26, 53.84, 68.53, 83.21, 93, rounded half up: 34, 54, 69, 83, 93.
  assert lengths == [7, 34, 20, 15, 14, 10]


def test_fractions_that_do_not_sum_to_one_are_rejected_not_rescaled(tiny):
  tiny.curriculum.warmup.fraction = 0.5  # the rest as in the default: 1.45 in all
  with pytest.raises(ConfigError, match=r"fractions sum to 1\.45, not 1 \(warmup 0\.5, "
                                        r"foundation 0\.35, sparsify 0\.2, specialize 0\.15, long_context 0\.15, "
                                        r"anneal 0\.1\)"):
    validation.validate(tiny)
  # A phase with explicit steps keeps its fraction in the sum; the others split the rest in proportion.
  tiny.curriculum.warmup.update(fraction=0.05, steps=7)
  lengths = validation.phase_lengths(tiny.curriculum)
  assert lengths[0] == 7 and sum(lengths) == tiny.curriculum.total_steps
  expected = [593 * f / 0.95 for f in (0.35, 0.2, 0.15, 0.15, 0.1)]
  assert all(abs(got - want) <= 1 for got, want in zip(lengths[1:], expected))
  tiny.curriculum.warmup.fraction = 0.0
  with pytest.raises(ConfigError, match=r"fractions sum to 0\.95, not 1 \(warmup 0, foundation 0\.35, .*\) "
                                        r"\(a phase with explicit steps keeps its fraction in the sum\)"):
    validation.validate(tiny)


def test_settings_are_a_pure_function_of_the_step(tiny):
  a, b = Curriculum(tiny), Curriculum(tiny)
  for step in (0, 29, 30, 250, 359, 599):
    assert a.settings(step) == b.settings(step)


def test_tokens_seen_sum_every_earlier_step(tiny):
  cur = Curriculum(tiny)
  seen = 0
  for step in range(tiny.curriculum.total_steps + 1):
    assert cur.tokens_before(step) == seen, step
    if step < tiny.curriculum.total_steps:
      settings = cur.settings(step)
      seen += settings.phase.batch_size * settings.phase.seq_len
  assert seen == 600 * 8 * 256  # tiny: 2,048 tokens a step in every phase


def test_learning_rate_shapes(tiny):
  cur = Curriculum(tiny)
  peak = tiny.optimizer.peak_lr
  warmup, anneal = cur.phases[0], cur.phases[-1]
  # Warmup: linear from 0 to peak over its 30 steps; anneal: linear from peak to 0.
  for step in range(warmup.start, warmup.end):
    assert cur.settings(step).lr == pytest.approx(peak * step / (warmup.steps - 1), rel=1e-5, abs=1e-9)
  for step in range(anneal.start, anneal.end):
    want = peak * (1 - (step - anneal.start) / (anneal.steps - 1))
    assert cur.settings(step).lr == pytest.approx(want, rel=1e-5, abs=1e-9), step
  assert cur.settings(anneal.end - 1).lr == pytest.approx(0.0, abs=1e-9)
  assert cur.settings(300).lr == pytest.approx(peak, rel=1e-6)
  # The traced schedule equals the Python one (it is what the optimizer sees).
  steps = jnp.arange(600)
  traced = np.asarray(jax.jit(jax.vmap(cur.lr))(steps))
  np.testing.assert_allclose(traced, [cur.settings(s).lr for s in range(600)], rtol=1e-5, atol=1e-9)


def test_each_phase_starts_at_its_own_learning_rate(tiny):
  """Phases whose learning rates do not meet at the boundaries (the default's do, which hides an off-by-one there):
  a phase's first step has its own lr_start and its last its lr_end, in the Python and the traced schedule."""
  starts = [0, 30, 240, 360, 450, 540, 600]  # test_phases_tile_the_run
  want = {}
  for i, name in enumerate(config_lib.PHASES):
    tiny.curriculum[name].update(lr_shape="linear", lr_start=0.1 * (i + 1), lr_end=0.1 * (i + 1) + 0.05)
    want[starts[i]] = tiny.optimizer.peak_lr * 0.1 * (i + 1)
    want[starts[i + 1] - 1] = tiny.optimizer.peak_lr * (0.1 * (i + 1) + 0.05)
  cur = Curriculum(tiny)
  steps = sorted(want)
  assert [cur.settings(s).lr for s in steps] == pytest.approx([want[s] for s in steps], rel=1e-5)
  traced = np.asarray(jax.jit(jax.vmap(cur.lr))(jnp.asarray(steps)))
  np.testing.assert_allclose(traced, [want[s] for s in steps], rtol=1e-5)


def test_cosine_shape(tiny):
  tiny.curriculum.anneal.lr_shape = "cosine"
  cur = Curriculum(tiny)
  p = cur.phases[-1]
  u = 17 / (p.steps - 1)
  want = tiny.optimizer.peak_lr * 0.5 * (1 + math.cos(math.pi * u))
  assert cur.settings(p.start + 17).lr == pytest.approx(want, rel=1e-5)


def test_router_noise_and_mod_capacity_anneal(tiny):
  cur = Curriculum(tiny)
  sparsify = cur.phases[2]
  assert cur.settings(sparsify.start).router_noise == pytest.approx(0.5)
  assert cur.settings(sparsify.end - 1).router_noise == pytest.approx(0.0)
  # Linear in between (a noise reaching 0 halfway passed the ends' checks).
  for step in range(sparsify.start, sparsify.end):
    want = 0.5 * (1 - (step - sparsify.start) / (sparsify.steps - 1))
    assert cur.settings(step).router_noise == pytest.approx(want, abs=1e-12), step
  # Four geometric levels from 1.0 to 0.25, each held for a quarter of the phase, in whole tokens.
  levels = [1.0, 0.25 ** (1 / 3), 0.25 ** (2 / 3), 0.25]
  for i, level in enumerate(levels):
    step = sparsify.start + i * sparsify.steps // 4
    assert cur.settings(step).mod_capacity == math.ceil(level * 128) / 128
  assert cur.settings(0).mod_mode == "off"  # warmup runs every token
  assert cur.settings(sparsify.start + sparsify.steps // 4).mod_mode == "topk"


def test_capacity_one_runs_mod_off_and_leaves_the_predictor_untrained(tiny):
  """At capacity 1 top-k selects every token: "off" computes the same function without the sort and gathers,
  and the predictor is not taught that every token runs (its target from then on is the sparse decision)."""
  cur = Curriculum(tiny)
  foundation, sparsify = cur.phases[1], cur.phases[2]
  for step in (foundation.start, foundation.end - 1, sparsify.start):
    settings = cur.settings(step)
    assert (settings.mod_mode, settings.mod_capacity) == ("off", 1.0)
    assert step_lib.dynamic_settings(settings)["mod_predictor_weight"] == 0.0
  later = cur.settings(sparsify.start + sparsify.steps // 4)
  assert later.mod_mode == "topk" and later.mod_capacity < 1.0
  assert step_lib.dynamic_settings(later)["mod_predictor_weight"] == later.phase.mod_predictor_weight > 0.0


def test_shape_keys_list_every_program(tiny):
  cur = Curriculum(tiny)
  seen = {cur.settings(s).shape_key for s in range(tiny.curriculum.total_steps)}
  assert set(cur.shape_keys()) == seen and len(cur.shape_keys()) == len(seen)
  # A resumed or shortened invocation compiles only the programs of its own steps.
  later = {cur.settings(s).shape_key for s in range(400, 500)}
  assert set(cur.shape_keys(400, 500)) == later and len(cur.shape_keys(400, 500)) == len(later) < len(seen)


def test_bad_step_counts_name_the_phase_and_the_cause(tiny):
  tiny.curriculum.total_steps = 5
  with pytest.raises(ConfigError, match=r"curriculum\.warmup: its share 0\.05 of curriculum\.total_steps \(5\) "
                                        r"is 0\.25 steps, which rounds to 0.*total_steps to 20 or more"):
    validation.validate(tiny)
  # Explicit steps leave one step for five phases: the first phase it cannot reach is named, with the cause.
  tiny.curriculum.total_steps = 8
  tiny.curriculum.warmup.steps = 7
  with pytest.raises(ConfigError, match=r"curriculum\.foundation: its share 0\.37 of the 1 step\(s\) left after "
                                        r"the explicit ones \(warmup 7\) is 0\.37 steps.*total_steps to 17 or more"):
    validation.validate(tiny)
  tiny.curriculum.total_steps = 17
  assert min(validation.phase_lengths(tiny.curriculum)) == 1
  tiny.curriculum.total_steps = 600
  tiny.curriculum.warmup.steps = 700
  with pytest.raises(ConfigError, match=r"explicit steps \(warmup 700\) add up to 700, more than"):
    validation.validate(tiny)
  tiny.curriculum.warmup.steps = 0
  tiny.curriculum.order = ("warmup", "foundation")
  tiny.curriculum.warmup.fraction, tiny.curriculum.foundation.fraction = 0.0, 1.0
  with pytest.raises(ConfigError, match=r"curriculum\.warmup: has neither steps nor a fraction"):
    validation.validate(tiny)


@pytest.mark.parametrize("capacity, seq_len, tokens", [(0.07, 100, 7), (0.55, 100, 55), (0.125, 256, 32),
                                                       (0.1, 30, 3), (0.14, 100, 14), (0.01, 16, 1)])
def test_mod_capacity_is_quantised_to_the_tokens_the_model_selects(tiny, capacity, seq_len, tokens):
  """The curriculum's capacity is K / T with the K the model's routed layer runs (capacity 0.07 at T=100: 7)."""
  tiny.model.max_seq_len = 256
  tiny.curriculum.specialize.update(seq_len=seq_len, mod_capacity_start=capacity, mod_capacity_end=capacity)
  cur = Curriculum(tiny)
  specialize = next(p for p in cur.phases if p.name == "specialize")
  settings = cur.settings(specialize.start)
  assert settings.mod_capacity == tokens / seq_len
  # The model, given the quantised capacity, runs the same count again.
  assert routing.mod_capacity_tokens(settings.mod_capacity, seq_len) == tokens


@pytest.mark.parametrize("steps", [2, 3, 4, 5])
def test_mod_capacity_reaches_the_target_in_a_phase_shorter_than_the_levels(tiny, steps):
  """A sparsify phase of fewer steps than curriculum.mod_anneal_levels (4) still ends at the target capacity,
  through equal segments of geometric levels from 1.0."""
  tiny.curriculum.sparsify.steps = steps
  cur = Curriculum(tiny)
  sparsify = cur.phases[2]
  capacities = [cur.settings(s).mod_capacity for s in range(sparsify.start, sparsify.end)]
  levels = min(steps, 4)
  want = [0.25 ** (min(i * levels // steps, levels - 1) / (levels - 1)) for i in range(steps)]
  assert capacities == [math.ceil(c * 128) / 128 for c in want], capacities
  assert capacities[0] == 1.0 and capacities[-1] == 0.25


def test_a_run_resumed_at_each_phase_boundary_gets_the_readme_table(tiny):
  """What a run resumed at a phase's first step (or stopped at its last) trains with, against the README's curriculum
  table written out by hand for tiny at 600 steps: context (of 256), batch (2,048 tokens), LR, router noise, MoD,
  domain mix and the loss weights (load balance 10⁻² up to specialize, 10⁻³ from there; z 10⁻³; predictor 10⁻²
  while MoD selects fewer than every token)."""
  peak, even = 3e-3, {"code": 0.5, "docs": 0.5}
  # step: (phase, seq_len, batch, lr, router noise, MoD capacity or None for off (so at capacity 1), load balance, domain mix)
  table = {
      0: ("warmup", 64, 32, 0.0, 0.5, None, 1e-2, even),
      29: ("warmup", 64, 32, peak, 0.5, None, 1e-2, even),
      30: ("foundation", 128, 16, peak, 0.5, None, 1e-2, even),
      240: ("sparsify", 128, 16, peak, 0.5, None, 1e-2, even),
      359: ("sparsify", 128, 16, peak, 0.0, 0.25, 1e-2, even),
      360: ("specialize", 128, 16, peak, 0.0, 0.25, 1e-3, {"code": 0.7, "docs": 0.3}),
      450: ("long_context", 256, 8, peak, 0.0, 0.25, 1e-3, even),
      540: ("anneal", 256, 8, peak, 0.0, 0.25, 1e-3, {"code": 1.0, "docs": 0.0}),
      599: ("anneal", 256, 8, 0.0, 0.0, 0.25, 1e-3, {"code": 1.0, "docs": 0.0}),
  }
  for step, (name, seq_len, batch, lr, noise, capacity, load_balance, mix) in table.items():
    s = Curriculum(tiny).settings(step)  # a fresh curriculum, as a resumed run builds
    assert (s.phase.name, s.phase.seq_len, s.phase.batch_size) == (name, seq_len, batch), step
    assert dict(s.phase.domain_weights) == pytest.approx(mix), step
    assert (s.mod_mode, s.mod_capacity) == (("off", 1.0) if capacity is None else ("topk", capacity)), step
    dyn = step_lib.dynamic_settings(s)
    want = {"lr": lr, "router_noise": noise, "load_balance_weight": load_balance, "z_loss_weight": 1e-3,
            "mod_predictor_weight": 0.0 if capacity is None else 1e-2}
    assert dyn == pytest.approx(want, abs=1e-9), step
