"""Reading the golden U-Net cases of tests/golden (no environment changes, unlike conftest.py:
experiments/device/bench.py imports this on an accelerator)."""

import json
import pathlib

import numpy as np

from ipr_jax.models import unet as unet_lib

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"


def load_golden_unet(case: str):
  """A golden U-Net case ('ms' or 'ep'): (arrays, config, state_dict, model).

  `arrays` holds every array of the case's file(s) (NCHW/OIHW, keys as in tests/golden/README.md),
  `config` its config_json, `state_dict` the merged `sd/` entries without the prefix, and `model`
  the matching `UNet`.
  """
  arrays = dict(np.load(GOLDEN_DIR / f"unet_{case}_tiny.npz"))
  config = json.loads(str(arrays["config_json"]))
  if config["state_dict_split"]:
    extra = np.load(GOLDEN_DIR / config["state_dict_split"])
    arrays.update({k: extra[k] for k in extra.files if k.startswith("sd/")})
  state_dict = {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}
  model = unet_lib.UNet(
      hid_dims=tuple(config["hid_dims"]),
      attention=tuple(config["attention"]),
      d_in=config["d_in"],
      d_out=config["d_out"],
      num_blocks=config["num_blocks"],
      t_emb_dim=config["t_emb_dim"],
      d_emb=config["sinusoid_d_emb"],
      num_head_channels=config["num_head_channels"],
      dropout=config["dropout"],
      num_groups=config["groupnorm_groups"],
  )
  return arrays, config, state_dict, model
