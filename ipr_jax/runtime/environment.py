"""What, besides the code and the settings, can change a result: the software and hardware.

The same code, settings and weights can give other samples elsewhere: another XLA (jaxlib) fuses
and rounds differently, another CPU kind takes other vector paths, a flag such as XLA_FLAGS or the
default matmul precision changes the arithmetic, and a borderline digit flips. `record()` is what
an evaluation writes to run.json and results.json and what every process of a run must agree on;
shards computed under another record are reused only when the user accepts it
(`evaluate --allow_environment_change`).
"""

import hashlib
import importlib.metadata
import json
import os
import platform
from typing import Any, Optional

import jax

# Distributions whose versions change what an evaluation computes (the JAX plugins for GPUs and
# TPUs are found by prefix).
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "ml-collections")
_PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "libtpu")
# jax.config options that change numerics or random streams.
JAX_OPTIONS = (
    "jax_default_matmul_precision",
    "jax_enable_x64",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_disable_most_optimizations",
    "jax_exec_time_optimization_effort",
    "jax_optimization_level",
)
# Environment variables that change how XLA compiles.
VARIABLES = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


def _version(name: str) -> Optional[str]:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _plugins() -> dict[str, str]:
  found = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata["Name"] or ""
    if name.lower().startswith(_PLUGIN_PREFIXES):
      found[name.lower()] = dist.version
  return found


def _cpu_model() -> str:
  """The CPU's model name (Linux: /proc/cpuinfo), else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def record() -> dict[str, Any]:
  """This process's environment: package versions, Python, machine and CPU model, JAX backend,
  device kind and counts, the numerics options of `JAX_OPTIONS` and the variables of `VARIABLES`.
  Equal on every process of a well-formed multi-process run."""
  devices = jax.devices()
  return {
      "packages": {name: _version(name) for name in PACKAGES} | _plugins(),
      "python": platform.python_version(),
      "machine": platform.machine(),
      "cpu": _cpu_model(),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "jax_options": {name: str(jax.config.values.get(name)) for name in JAX_OPTIONS},
      "variables": {name: os.environ.get(name, "") for name in VARIABLES},
  }


def digest(environment: dict[str, Any]) -> str:
  """sha256 of an environment record (as JSON with sorted keys)."""
  return hashlib.sha256(json.dumps(environment, sort_keys=True).encode()).hexdigest()
