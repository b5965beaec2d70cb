"""JAX's persistent compilation cache for the binaries: a rerun, a resume or the next budget sweep
reads its compiled programs from disk instead of compiling them again.

Where: `config.compilation_cache_dir` ("" or "off": no cache), else $JAX_COMPILATION_CACHE_DIR,
else ~/.cache/ipr_jax/xla. Programs that take over a second to compile are cached.
"""

import os
from typing import Optional

import jax
import ml_collections

DEFAULT_DIR = os.path.join("~", ".cache", "ipr_jax", "xla")


def directory(config: Optional[ml_collections.ConfigDict] = None) -> Optional[str]:
  """Where the binaries cache compiled programs under `config` (None: nowhere)."""
  value = None if config is None else config.get("compilation_cache_dir")
  if value is not None:
    return (
        None
        if str(value).strip().lower() in ("", "off", "none")
        else os.path.expanduser(str(value))
    )
  return os.path.expanduser(os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_DIR)


def enable(config: Optional[ml_collections.ConfigDict] = None) -> Optional[str]:
  """Turns on the cache at `directory(config)` for every program that takes over a second to
  compile; returns the directory (None: left off)."""
  path = directory(config)
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path
