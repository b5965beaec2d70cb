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
from typing import Optional

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
