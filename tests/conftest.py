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

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def golden_dir():
  return GOLDEN_DIR


def load_task_config(name: str, arg: str | None = None):
  """`configs/<name>.py:get_config(arg)`, loaded from its file as config_flags does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = _ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="session")
def task_config():
  return load_task_config
