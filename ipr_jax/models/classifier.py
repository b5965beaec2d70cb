"""The MNIST digit classifier of the Sudoku metric (spec §6.1), with srmbench-compatible weights.

Architecture of srmbench's `MNISTClassifier`: conv1 (1->32, 3x3, pad 1) -> ReLU -> max-pool 2 ->
channel dropout 0.25 -> conv2 (32->64, 3x3, pad 1) -> ReLU -> max-pool 2 -> channel dropout 0.5 ->
flatten in PyTorch's (C, H, W) order (3136 values) -> fc1 (3136->128) -> ReLU -> fc2 (128->10).
Inputs are 28x28 tiles in [-1, 1] (white digit on a -1 background), NHWC.

The shipped weights (`ipr_jax/metrics/assets/mnist_classifier.npz`, trained by
`python -m ipr_jax.scorers.train_classifier`) are stored as a PyTorch-layout state dict with the
srmbench key names, so srmbench's own `mnist_classifier.pth` / hub weights can be used instead
through `classifier_params_from_state_dict`.
"""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ASSETS = pathlib.Path(__file__).resolve().parent.parent / "metrics" / "assets"
DEFAULT_WEIGHTS = _ASSETS / "mnist_classifier.npz"
# Cells smaller than 14 px lose too much detail for the 28 px weights (7 px digits, classes 1-4:
# 95.3% of the 400 held-out top-100 digits right); they get weights fine-tuned on digits coarsened
# to their size (`python -m ipr_jax.scorers.train_classifier --cell_size=7`).
_WEIGHTS_BY_CELL_SIZE = {7: _ASSETS / "mnist_classifier_cell7.npz"}


def default_weights(cell_size: int = 28) -> pathlib.Path:
  """The shipped weights for Sudoku cells of `cell_size` pixels (upsampled to 28 px tiles)."""
  return _WEIGHTS_BY_CELL_SIZE.get(int(cell_size), DEFAULT_WEIGHTS)


# PyTorch state-dict key -> (Flax module, Flax parameter, expected PyTorch shape).
_STATE_DICT_LAYOUT = {
    "conv1.weight": ("conv1", "kernel", (32, 1, 3, 3)),
    "conv1.bias": ("conv1", "bias", (32,)),
    "conv2.weight": ("conv2", "kernel", (64, 32, 3, 3)),
    "conv2.bias": ("conv2", "bias", (64,)),
    "fc1.weight": ("fc1", "kernel", (128, 3136)),
    "fc1.bias": ("fc1", "bias", (128,)),
    "fc2.weight": ("fc2", "kernel", (10, 128)),
    "fc2.bias": ("fc2", "bias", (10,)),
}


class MNISTClassifier(nn.Module):
  """srmbench's MNIST classifier in Flax. Call with tiles [B, 28, 28, 1] -> logits [B, 10].

  The dropout rates only matter in training (srmbench: 0.25 and 0.5); they have no parameters.
  """

  dropout1_rate: float = 0.25  # channel dropout after the first conv block
  dropout2_rate: float = 0.5  # channel dropout after the second conv block

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Classifies tiles.

    Args:
      x: [B, 28, 28, 1] tiles in [-1, 1].
      train: enables the channel dropout (needs rngs={'dropout': key}).

    Returns:
      [B, 10] float32 logits.
    """
    if x.ndim != 4 or x.shape[1:] != (28, 28, 1):
      raise ValueError(f"classifier input shape {x.shape}: expected [B, 28, 28, 1]")
    x = nn.Conv(32, (3, 3), padding=1, name="conv1")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    # Dropout2d drops whole channels: share the mask over the spatial axes.
    x = nn.Dropout(self.dropout1_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
    x = nn.Conv(64, (3, 3), padding=1, name="conv2")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.Dropout(self.dropout2_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # PyTorch's (C, H, W) flatten order
    x = nn.relu(nn.Dense(128, name="fc1")(x))
    return nn.Dense(10, name="fc2")(x)


@jax.jit
def init_classifier_params(key: jax.Array) -> dict:
  """Randomly initialised parameters (Flax's default initialisers)."""
  return MNISTClassifier().init(key, jnp.zeros((1, 28, 28, 1)))["params"]


def classifier_params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Converts srmbench's PyTorch state dict into Flax parameters (strict).

  Args:
    state_dict: the eight arrays `conv{1,2}.{weight,bias}` (OIHW conv weights) and
      `fc{1,2}.{weight,bias}` ([out, in] linear weights), as numpy arrays or torch tensors
      converted with `.numpy()`.

  Returns:
    params for `MNISTClassifier().apply({'params': params}, x)`.

  Raises:
    ValueError: on a missing or unexpected key or a wrong shape.
  """
  missing = sorted(set(_STATE_DICT_LAYOUT) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(_STATE_DICT_LAYOUT))
  if missing or unexpected:
    raise ValueError(f"classifier state dict: missing keys {missing}, unexpected keys {unexpected}")
  params: dict[str, Any] = {}
  for key, (module, name, shape) in _STATE_DICT_LAYOUT.items():
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != shape:
      raise ValueError(f"classifier state dict: {key} has shape {value.shape}, expected {shape}")
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T  # [out, in] -> [in, out]
    params.setdefault(module, {})[name] = jnp.asarray(value)
  return params


def state_dict_from_classifier_params(params: Mapping) -> dict[str, np.ndarray]:
  """The inverse of `classifier_params_from_state_dict`: PyTorch layouts and srmbench key names."""
  state_dict = {}
  for key, (module, name, _) in _STATE_DICT_LAYOUT.items():
    value = np.asarray(params[module][name], np.float32)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif value.ndim == 2:
      value = value.T
    state_dict[key] = value
  return state_dict


def save_classifier_params(
    path: str | pathlib.Path, params: Mapping, metadata: Mapping | None = None
) -> None:
  """Writes params as an .npz state dict (srmbench keys), plus optional JSON metadata."""
  arrays = state_dict_from_classifier_params(params)
  if metadata is not None:
    arrays["metadata_json"] = np.asarray(json.dumps(dict(metadata), sort_keys=True))
  with open(path, "wb") as f:
    np.savez_compressed(f, **arrays)


def load_classifier_params(path: str | pathlib.Path | None = None, cell_size: int = 28) -> dict:
  """Loads classifier params from an .npz state dict.

  Args:
    path: the .npz file; None: the weights shipped for cells of `cell_size` pixels.
    cell_size: side of the Sudoku cells the classifier reads (used only when path is None).

  Raises:
    FileNotFoundError: if the file does not exist.
  """
  path = pathlib.Path(default_weights(cell_size) if path is None else path)
  if not path.is_file():
    raise FileNotFoundError(f"classifier weights not found: {str(path)!r}")
  with np.load(path) as f:
    state_dict = {k: f[k] for k in f.files if k != "metadata_json"}
  return classifier_params_from_state_dict(state_dict)


def load_classifier_metadata(path: str | pathlib.Path | None = None, cell_size: int = 28) -> dict:
  """The JSON metadata stored with the weights (training settings, held-out accuracy)."""
  path = pathlib.Path(default_weights(cell_size) if path is None else path)
  if not path.is_file():
    raise FileNotFoundError(f"classifier weights not found: {str(path)!r}")
  with np.load(path) as f:
    return json.loads(str(f["metadata_json"])) if "metadata_json" in f.files else {}


@jax.jit
def classifier_logits(params: Mapping, tiles: jax.Array) -> jax.Array:
  """Logits [B, 10] of tiles [B, 28, 28, 1] in [-1, 1] (eval mode)."""
  return MNISTClassifier().apply({"params": params}, tiles)
