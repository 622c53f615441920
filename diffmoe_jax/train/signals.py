"""Stopping a run by signal: SIGTERM or SIGINT asks for a checkpoint and a stop after the current step, in every
process of a multi-process run at the same step; a second SIGINT interrupts at once."""
from __future__ import annotations

import signal
import sys

import jax
import numpy as np
from absl import logging

from diffmoe_jax import distributed


class StopSignals:
  """SIGTERM / SIGINT set a flag the loop checks between steps; a second SIGINT interrupts at once.

  A handler runs inside whatever Python code is current, so the second SIGINT's KeyboardInterrupt can land where
  Python cannot propagate it (a garbage-collection callback, a __del__). It is then dropped quietly and `check`
  raises it again at the loop's next check.
  """

  def __init__(self):
    self.received: int | None = None
    self.interrupted = False
    self._gathered = None  # a multi-process run's comparison of signals started at the previous check
    self._previous = {}
    self._previous_unraisablehook = None

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with whoever owns them
        pass
    self._previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, self._unraisable
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      self.interrupted = True
      raise KeyboardInterrupt
    self.received = signum
    logging.warning("Received %s: saving a checkpoint after this step, then stopping.",
                    signal.Signals(signum).name)

  def _unraisable(self, unraisable):
    if not (self.interrupted and isinstance(unraisable.exc_value, KeyboardInterrupt)):
      self._previous_unraisablehook(unraisable)

  def check(self) -> str | None:
    """The name of the signal that asked the run to stop, if any; raises KeyboardInterrupt after a second SIGINT.

    In a multi-process run every process gets the same answer at the same step: a signal that reached any of them
    stops them all there (one process leaving the loop alone left the others waiting in the next step's
    collectives forever, and nothing was saved). The processes' signals are compared after each step and the
    comparison read at the next check, one step later, so that reading it never waits for the step queued since.
    """
    if self.interrupted:
      raise KeyboardInterrupt
    if jax.process_count() == 1:
      return self.received_name
    agreed = 0 if self._gathered is None else int(np.asarray(self._gathered.addressable_data(0)))
    self._gathered = distributed.max_over_processes(self.received or 0)
    if not agreed:
      return None
    self.received = agreed
    return self.received_name

  @property
  def received_name(self) -> str | None:
    return None if self.received is None else signal.Signals(self.received).name

  def __exit__(self, *exc):
    sys.unraisablehook = self._previous_unraisablehook
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
