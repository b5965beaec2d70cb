"""All processes of a multi-process run end the same way: errors and stops agreed by a collective.

A process that raises while the others wait in a collective would leave them blocked, and a
SIGTERM that only one process receives would stop that process alone. `agree` is the remedy: every
process calls it at the same points of the program, the same number of times, passing the error
it met since the last call (or None) and whether it was asked to stop; one all-gather later every
process knows every process's outcome. If any process met an error, every process raises it: the
first failing process (lowest index) re-raises its own exception, the others an exception of the
same type with the same message (`ProcessError` when the type cannot be rebuilt from its message),
so that they all exit within a collective's time with the same message. A stop requested on any
process is reported to all.

With one process, `agree` communicates nothing: it re-raises the error, returns the stop flag.

A process that dies without reaching `agree` (SIGKILL, a lost machine) cannot report; the others
then fail in the collective when its connection closes, or when JAX's coordination service misses
its heartbeats (`jax.distributed.initialize(heartbeat_timeout_seconds=100)` by default) and ends
the run. JAX's public barrier (`multihost_utils.sync_global_devices`) takes no timeout.
"""

import dataclasses
import importlib
import json
from typing import Any, Optional

import jax
import numpy as np


class ProcessError(RuntimeError):
  """Another process failed with an exception that cannot be rebuilt here."""


@dataclasses.dataclass
class Outcome:
  """What all processes reported: any stop request, and each process's payload."""

  stop: bool
  payloads: list[Any]


def _error_class(module: str, name: str) -> Optional[type]:
  """The exception class `module.name` if it is a builtin or an ipr_jax exception."""
  if module != "builtins" and not module.startswith("ipr_jax"):
    return None
  try:
    cls = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError):
    return None
  return cls if isinstance(cls, type) and issubclass(cls, Exception) else None


def rebuild_error(process: int, module: str, name: str, message: str) -> Exception:
  """The exception another process raised, as this process raises it: the same type with the
  same message when the type is a builtin or an ipr_jax exception built from its message, else a
  ProcessError naming the process and the type."""
  cls = _error_class(module, name)
  if cls is not None:
    try:
      error = cls(message)
      if str(error) == message:
        return error
    except Exception:  # pylint: disable=broad-except  (a constructor with other arguments)
      pass
  return ProcessError(f"process {process} failed: {module}.{name}: {message}")


def _allgather_bytes(data: bytes) -> list[bytes]:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  lengths = np.asarray(multihost_utils.process_allgather(np.asarray(len(data), np.int64)))
  buffer = np.zeros(int(lengths.max()), np.uint8)
  buffer[: len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [gathered[p, : int(n)].tobytes() for p, n in enumerate(lengths.reshape(-1))]


def agree(
    error: Optional[BaseException] = None, stop: bool = False, payload: Any = None
) -> Outcome:
  """A collective of all processes (each must call it at the same point): raises on every
  process if any process passes an error, else returns whether any process asked to stop and
  every process's `payload` (JSON-serialisable), in process order.

  Raises:
    The first failing process's error (see the module docstring).
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return Outcome(bool(stop), [payload])
  report = {"stop": bool(stop), "payload": payload, "error": None}
  if error is not None:
    report["error"] = [type(error).__module__, type(error).__qualname__, str(error)]
  text = json.dumps(report, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
  reports = [json.loads(b) for b in _allgather_bytes(text.encode())]
  for process, other in enumerate(reports):
    if other["error"] is not None:
      if process == jax.process_index() and error is not None:
        raise error
      raise rebuild_error(process, *other["error"])
  return Outcome(any(r["stop"] for r in reports), [r["payload"] for r in reports])
