"""Reading PyTorch state_dicts from `.ckpt` / `.pth` / `.pt` / `.npz` files.

torch is an optional dependency (the `convert` extra) and is imported only here, only for torch's
own file formats; `.npz` state_dicts (a numpy archive whose entries are the reference key names)
need nothing beyond numpy.
"""

import os
from typing import Mapping

import numpy as np

from ipr_jax.runtime import errors

# Prefixes of the SRM LightningModule's checkpoint (reference_spec.md §1.10).
LIVE_PREFIX = "denoiser."
EMA_PREFIX = "ema_denoiser.module."
_EMA_EXTRA_KEYS = ("ema_denoiser.n_averaged",)


def load_state_dict_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, object]]:
  """Loads a state_dict file into numpy arrays.

  Args:
    path: a Lightning `.ckpt`, a torch `.pth`/`.pt` (a state_dict, or a dict holding one under
      'state_dict'), or an `.npz` archive whose entries are state_dict keys (an optional `sd/`
      prefix, as in the golden files, is stripped).

  Returns:
    (state_dict, extras): the arrays by key, and scalar metadata found beside them
    (e.g. 'global_step').

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not a readable checkpoint.
    ImportError: a torch file was given but torch is not installed.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as archive:
        state_dict = {
            k[3:] if k.startswith("sd/") else k: np.asarray(archive[k])
            for k in archive.files
            if k != "config_json"
        }
    except Exception as e:  # zipfile / pickle errors of a corrupt archive.
      raise errors.ConfigError(f"{path!r} is not a readable .npz state_dict: {e}") from e
    return state_dict, {}
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"reading {path!r} needs torch: pip install 'ipr-jax[convert]' (or torch==2.13.0 for "
        "the CPU build); .npz state_dicts work without it"
    ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as first_error:  # Lightning checkpoints may hold non-tensor objects.
    try:
      obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
      raise errors.ConfigError(
          f"{path!r} is not a readable PyTorch checkpoint: {first_error}"
      ) from e
  if not isinstance(obj, Mapping):
    raise errors.ConfigError(
        f"{path!r} holds a {type(obj).__name__}, not a state_dict or checkpoint dict"
    )
  extras = {k: obj[k] for k in ("global_step", "epoch") if k in obj}
  tensors = obj.get("state_dict", obj)
  if not isinstance(tensors, Mapping):
    raise errors.ConfigError(f"{path!r}: 'state_dict' is a {type(tensors).__name__}, not a mapping")
  state_dict = {}
  for key, value in tensors.items():
    if not hasattr(value, "detach"):
      raise errors.ConfigError(f"{path!r}: entry {key!r} is a {type(value).__name__}, not a tensor")
    state_dict[key] = (
        value.detach().to(torch.float32 if value.is_floating_point() else value.dtype).cpu().numpy()
    )
  return state_dict, extras


def select_denoiser(
    state_dict: Mapping[str, np.ndarray], weights: str = "ema"
) -> dict[str, np.ndarray]:
  """Picks the denoiser's own keys out of a Lightning state_dict.

  Args:
    state_dict: a Lightning SRM state_dict (`denoiser.*`, `ema_denoiser.module.*`) or a plain
      denoiser state_dict (`time_embedding.*`, `model.*`).
    weights: 'ema' (default; what the reference samples with) or 'live'.

  Returns:
    The denoiser state_dict with the prefix removed.
  """
  if weights not in ("ema", "live"):
    raise errors.ConfigError(f"weights must be 'ema' or 'live', got {weights!r}")
  has_live = any(k.startswith(LIVE_PREFIX) for k in state_dict)
  has_ema = any(k.startswith(EMA_PREFIX) for k in state_dict)
  if not has_live and not has_ema:
    return dict(state_dict)  # Already a plain denoiser state_dict.
  prefix = EMA_PREFIX if weights == "ema" else LIVE_PREFIX
  if not any(k.startswith(prefix) for k in state_dict):
    raise errors.ConfigError(
        f"the checkpoint has no {weights} weights (no keys starting with {prefix!r}); "
        f"use the other --weights choice"
    )
  return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
