"""One XLA CPU device per core for the binaries, so that pmap uses every core of a CPU machine.

A single XLA CPU device runs a jitted U-Net on little more than one core: measured on a 2-core
machine, the 4x4 Sudoku U-Net of the `tiny` preset did 15-23 images/s as one device and 37 as two
devices under pmap. The training and evaluation binaries therefore ask XLA for one host device
per core (for training, the most that divide the batch), unless XLA_FLAGS already sets the count.
Results do not depend on the device count (every random draw derives from the example or puzzle
index). On a machine with accelerators the flag only adds host devices, which JAX does not use by
default.
"""

import os
from typing import Any, Optional

from ipr_jax.runtime import errors

_FLAG = "--xla_force_host_platform_device_count"


def available_cores() -> int:
  """Cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return max(len(os.sched_getaffinity(0)), 1)
  return max(os.cpu_count() or 1, 1)


def use_cpu_cores(batch_size: Optional[int] = None) -> None:
  """Sets XLA_FLAGS for one host device per core, before JAX initialises its backends.

  Args:
    batch_size: if given, the device count is the largest one up to the core count that divides
      it (a pmap step splits the batch evenly over the devices).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if _FLAG in flags:
    return
  count = available_cores()
  if batch_size:
    count = max(d for d in range(1, count + 1) if int(batch_size) % d == 0)
  os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={count}".strip()


# Explicit multi-process settings for launches that JAX cannot detect by itself (several
# processes on one machine, or GPU nodes started by hand rather than by SLURM or Open MPI).
COORDINATOR_ENV = "IPR_JAX_COORDINATOR"  # host:port of process 0
NUM_PROCESSES_ENV = "IPR_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "IPR_JAX_PROCESS_ID"


def initialize_distributed() -> None:
  """Joins this process to a multi-process JAX run (`jax.distributed.initialize`).

  With IPR_JAX_COORDINATOR, IPR_JAX_NUM_PROCESSES and IPR_JAX_PROCESS_ID all set, they are
  passed to JAX; otherwise JAX detects the cluster itself (Cloud TPU pod slices, SLURM, Open MPI,
  Kubernetes). CPU devices exchange collectives through gloo, so that several CPU processes can
  run one pmap together. Call before any other JAX call.

  Raises:
    ValueError: only some of the three variables are set, or they are not integers.
  """
  import jax  # pylint: disable=g-import-not-at-top  (this module is imported before XLA_FLAGS)

  names = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
  values = [os.environ.get(name) for name in names]
  kwargs: dict[str, Any] = {}
  if any(values):
    if not all(values):
      missing = [n for n, v in zip(names, values) if not v]
      raise errors.ConfigError(
          f"{', '.join(missing)} not set: set all of {', '.join(names)} or none."
      )
    try:
      num_processes, process_id = int(str(values[1])), int(str(values[2]))
    except ValueError:
      raise errors.ConfigError(
          f"{NUM_PROCESSES_ENV}={values[1]!r} and {PROCESS_ID_ENV}={values[2]!r} "
          "must be integers"
      ) from None
    if not 0 <= process_id < num_processes:
      raise errors.ConfigError(f"{PROCESS_ID_ENV}={process_id} must be in [0, {num_processes})")
    kwargs = dict(coordinator_address=values[0], num_processes=num_processes, process_id=process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
