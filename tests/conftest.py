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


def load_golden_unet(case: str):
  """A golden U-Net case ('ms' or 'ep'): (arrays, config, state_dict, model).

  `arrays` holds every array of the case's file(s) (NCHW/OIHW, keys as in tests/golden/README.md),
  `config` its config_json, `state_dict` the merged `sd/` entries without the prefix, and `model`
  the matching `UNet`.
  """
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ipr_jax.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  arrays = dict(np.load(GOLDEN_DIR / f"unet_{case}_tiny.npz"))
  config = json.loads(str(arrays["config_json"]))
  if config["state_dict_split"]:
    extra = np.load(GOLDEN_DIR / config["state_dict_split"])
    arrays.update({k: extra[k] for k in extra.files if k.startswith("sd/")})
  state_dict = {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}
  model = unet_lib.UNet(
      hid_dims=tuple(config["hid_dims"]), attention=tuple(config["attention"]),
      d_in=config["d_in"], d_out=config["d_out"], num_blocks=config["num_blocks"],
      t_emb_dim=config["t_emb_dim"], d_emb=config["sinusoid_d_emb"],
      num_head_channels=config["num_head_channels"], dropout=config["dropout"],
      num_groups=config["groupnorm_groups"])
  return arrays, config, state_dict, model
