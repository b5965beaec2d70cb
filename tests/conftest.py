"""Test-wide settings: two host CPU devices for pmap tests and a compilation cache.

These must be set before JAX initialises its backends, so they live here.
"""

import os
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parent.parent

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402

from golden_io import GOLDEN_DIR  # noqa: E402,F401  pylint: disable=unused-import
from golden_io import load_golden_unet  # noqa: E402,F401  pylint: disable=unused-import


@pytest.fixture(scope="session")
def golden_dir():
  return GOLDEN_DIR


def load_task_config(name: str, arg: str | None = None):
  """`configs/<name>.py:get_config(arg)`, loaded from its file as config_flags does."""
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

  return config_base.load_config(f"{_ROOT / 'configs' / name}.py:{arg or ''}")


@pytest.fixture(scope="session")
def task_config():
  return load_task_config
