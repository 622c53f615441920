"""What the host waits for: a step's settings are computed without the device."""
import math
import os

from diffmoe_jax import config as config_lib
from diffmoe_jax.train import curriculum as curriculum_lib

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
