"""SIGTERM, SIGINT (or a deadline) as a request to stop at the next safe point, agreed by all
processes.

Preemptible machines get SIGTERM shortly before they go, and Ctrl-C sends SIGINT; the training
loop checks `Preemption.any_process()` between steps, the evaluation passes `this_process()` to
its `agreement.agree` between rounds of batches (a collective that also shares errors), and both
save what they have and stop, every process at the same step or round. A second SIGINT
interrupts at once (KeyboardInterrupt), as Ctrl-C does without this handler: an impatient user is
never stuck.
"""

import signal
import threading
import time
from typing import Any, Optional

from absl import logging
import jax
import numpy as np

# The signals that ask for a stop at the next safe point.
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """Sets a flag on SIGTERM or SIGINT (when installed from the main thread) or once `deadline`
  (a time.time() value) has passed; a second SIGINT raises KeyboardInterrupt. Restores the old
  handlers."""

  def __init__(self, message: str = "stopping after the current step."):
    self.message = message
    self.requested = threading.Event()
    self.deadline: Optional[float] = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.requested.is_set():
      raise KeyboardInterrupt
    logging.warning("Received signal %d: %s", signum, self.message)
    if signum == signal.SIGINT:
      print(f"Interrupted: {self.message} Press Ctrl-C again to stop at once.", flush=True)
    self.requested.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def this_process(self) -> bool:
    """Whether this process received SIGTERM or passed the deadline (no communication)."""
    if self.deadline is not None and time.time() >= self.deadline:
      self.requested.set()
    return self.requested.is_set()

  def any_process(self) -> bool:
    """Whether any process received SIGTERM or passed the deadline (a collective when there are
    several processes)."""
    flag = self.this_process()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
    return flag
