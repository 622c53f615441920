"""What the host waits for: a step's settings are computed without the device, and evaluation reads a batch's
loss only after the next batch is dispatched."""
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffmoe_jax import config as config_lib
from diffmoe_jax.train import curriculum as curriculum_lib, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _NoDevice:
  def __getattr__(self, name):
    raise AssertionError(f"jax.numpy.{name} was called")


def test_step_settings_are_computed_on_the_host(monkeypatch):
  """The loop asks for a step's settings while the step before runs. Their learning rate was computed with
  jax.numpy, a device computation queued behind that step, and reading it waited for the step: the device then
  idled while the host built the next batch. No jax.numpy call is left on that path; the values are the
  schedule's (a linear warmup from 0, a cosine phase, a linear anneal to 0)."""
  config = config_lib.load_file(os.path.join(ROOT, "configs", "tiny.py"))
  config.curriculum.foundation.update(lr_shape="cosine", lr_start=1.0, lr_end=0.1)
  cur = curriculum_lib.Curriculum(config)
  monkeypatch.setattr(curriculum_lib, "jnp", _NoDevice())
  peak = config.optimizer.peak_lr
  for phase in cur.phases:
    for step in (phase.start, (phase.start + phase.end) // 2, phase.end - 1):
      u = (step - phase.start) / (phase.steps - 1)
      if phase.name == "warmup":
        want = peak * u
      elif phase.name == "anneal":
        want = peak * (1 - u)
      elif phase.name == "foundation":
        want = peak * (0.1 + 0.9 * (1 + math.cos(math.pi * u)) / 2)
      else:
        want = peak
      settings = cur.settings(step)
      assert isinstance(settings.lr, float) and math.isclose(settings.lr, want, rel_tol=1e-12, abs_tol=1e-15)


class _Result:
  """A device value whose reading is recorded: the host waits for the device there."""

  def __init__(self, value: float, events: list):
    self.value, self.events = value, events

  def __array__(self, dtype=None, copy=None):
    self.events.append("read")
    return np.asarray(self.value, dtype)

  def __float__(self):
    self.events.append("read")
    return float(self.value)


def test_evaluation_reads_a_batch_after_dispatching_the_next():
  """Reading each batch's loss before dispatching the next made the device wait for the host between batches;
  reading all at the end would let the host put every batch on the device at once. The sums are still each
  set's, in nats and tokens (against NumPy)."""
  rng = np.random.default_rng(0)
  sets = {name: [{"inputs": rng.integers(0, 9, (2, 4)), "targets": rng.integers(0, 9, (2, 4)),
                  "domain": np.zeros(2, np.int32)} for _ in range(3)] for name in ("code", "docs")}
  events = []

  def eval_fn(params, batch):
    events.append("dispatch")
    targets = np.asarray(batch["targets"])
    return _Result(float(targets.sum()) * params, events), _Result(targets.size, events)

  sharding = NamedSharding(Mesh(jax.devices()[:1], ("data",)), PartitionSpec())
  sums = loop.eval_loss_sums(eval_fn, 0.5, sets, sharding)
  assert events == ["dispatch"] * 2 + ["read", "read", "dispatch"] * 4 + ["read", "read"] * 2, events
  for name, batches in sets.items():
    assert sums[name] == (0.5 * sum(b["targets"].sum() for b in batches), 24.0)
