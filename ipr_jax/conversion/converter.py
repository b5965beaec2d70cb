r"""Imports official SRM PyTorch checkpoints (and the srmbench MNIST classifier) into ipr-jax.

  python -m ipr_jax.convert --torch_checkpoint=last.ckpt \
      --config=configs/mnist_sudoku.py --workdir=runs/ms1000_28_official

writes an Orbax checkpoint in `workdir/checkpoints/<global_step>` that `python -m ipr_jax.evaluate`
(and `python -m ipr_jax.train`, to fine-tune) load as if it had been trained here. The EMA weights
(what the reference samples with) are imported by default; `--weights=live` takes the live ones.
Accepted inputs: a Lightning `.ckpt` (`denoiser.*` / `ema_denoiser.module.*`), a torch
state_dict (`.pth`/`.pt`) or an `.npz` of the denoiser state_dict (no torch needed for `.npz`).

With `--config.model.kind=dit` (and the `model.dit` fields of the checkpoint's network) it reads
the DiT and LightningDiT checkpoints of the SRM authors' framework spatialreasoners
(`denoising_model.ema_denoiser.module.*` / `denoising_model.denoiser.*`); a framework model
with more than one token per region needs `--config.model.dit.token_layout=spatialreasoners`
(its pixel packing; `ipr_jax.models.tokens`). The mapping: `ipr_jax.conversion.dit_state_dict`.

  python -m ipr_jax.convert --torch_classifier=mnist_classifier.pth --classifier_out=clf.npz

converts the srmbench MNIST classifier (`conv1`, `conv2`, `fc1`, `fc2`) for the Sudoku metric.
The mapping is strict: every key used, every shape checked, and for the reference presets the key
count of reference_spec.md §1.10 (424 / 504 / 584) is checked too. The checkpoint written records
the sha256 of its parameters like a training run's (`checkpoint.save`), printed at the end; a
workdir that cannot be written (a file, read-only, a full disk) is one error line, exit status 74,
and leaves no half-written checkpoint.
"""

from typing import Any, Mapping, Optional

import ml_collections
import numpy as np

from ipr_jax import build
from ipr_jax.conversion import dit_state_dict
from ipr_jax.conversion import state_dict as state_dict_lib
from ipr_jax.conversion import torch_files
from ipr_jax.models import classifier as classifier_lib
from ipr_jax.models import dit
from ipr_jax.models import unet
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import errors

# State_dict key counts of the reference presets, duplicated time-embedding keys included.
REFERENCE_KEY_COUNTS = {"unet_32": 424, "unet_128": 504, "unet_256": 584}


def convert_denoiser(
    state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict, weights: str = "ema"
) -> dict[str, Any]:
  """A Lightning or plain SRM state_dict -> Flax U-Net params for `config.model`; with
  `model.kind='dit'`, a spatialreasoners DiT state_dict -> `dit.DiT` params
  (`dit_state_dict`).

  Args:
    state_dict: numpy arrays by reference key name (see `torch_files.load_state_dict_file`).
    config: the task config; its `model` and `data` sections define the expected network.
    weights: 'ema' or 'live' for Lightning state_dicts.

  Returns:
    The params dict (`model.apply({'params': params}, ...)`).

  Raises:
    ValueError: missing, unexpected or mis-shaped keys, or a key count that differs from the
      reference preset's.
  """
  model = build.make_model(config)
  if isinstance(model, dit.DiT):
    dit_sd = dit_state_dict.select_weights(state_dict, weights)
    return dit_state_dict.dit_params_from_state_dict(dit_sd, model)
  assert isinstance(model, unet.UNet)
  denoiser_sd = torch_files.select_denoiser(state_dict, weights)
  expected = REFERENCE_KEY_COUNTS.get(config.model.get("name", ""))
  if expected is not None and _is_reference_preset(config) and len(denoiser_sd) != expected:
    raise errors.ConfigError(
        f"a {config.model.name} denoiser state_dict has {expected} keys, this one has "
        f"{len(denoiser_sd)}: is it a checkpoint of another config?"
    )
  return state_dict_lib.unet_params_from_state_dict(denoiser_sd, model)


def _is_reference_preset(config: ml_collections.ConfigDict) -> bool:
  preset = unet.UNET_PRESETS.get(config.model.name)
  return preset is not None and all(
      tuple(config.model[k]) == tuple(v)
      for k, v in preset.items()
      if k in ("hid_dims", "attention")
  )


def convert_checkpoint(
    torch_checkpoint: str,
    config: ml_collections.ConfigDict,
    workdir: str,
    weights: str = "ema",
    step: Optional[int] = None,
) -> str:
  """Converts a PyTorch SRM checkpoint file into an Orbax checkpoint in `workdir`.

  Returns:
    The written checkpoint step directory.

  Raises:
    errors.StorageError: `workdir` cannot be written (checked before anything is written).
  """
  state_dict, extras = torch_files.load_state_dict_file(torch_checkpoint)
  params = convert_denoiser(state_dict, config, weights)
  errors.check_writable_dir(workdir)
  if step is None:
    step = int(extras.get("global_step", 0))  # type: ignore[call-overload]  # a number
  step_dir = checkpoint.save_params_checkpoint(
      workdir, params, config, build.make_optimizer(config), step=step, seed=config.seed
  )
  return str(step_dir)


def convert_classifier(torch_classifier: str, out_path: str) -> str:
  """Converts the srmbench MNIST classifier state_dict into a Flax params `.npz`."""
  state_dict, _ = torch_files.load_state_dict_file(torch_classifier)
  params = classifier_lib.classifier_params_from_state_dict(state_dict)
  classifier_lib.save_classifier_params(out_path, params, {"source": torch_classifier})
  return out_path
