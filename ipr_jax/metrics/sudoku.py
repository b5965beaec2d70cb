"""MNIST Sudoku metrics (spec §6.1): discretisation by a classifier, duplicate count, validity.

* Discretise: cut the image into n x n tiles (row-major), classify each tile, and take the argmax;
  if the argmax is 0, take the second-best class (srmbench's rule). This equals the argmax over
  classes 1..9, which is how it is computed here; for 4x4 grids the argmax runs over classes 1..4.
* duplicate_count: with the predicted digits, count each digit in every row, column and box; the
  count is the sum over all units and digits of |count - 1|. is_valid_sudoku <=> count == 0.
  Digits outside 1..n count in no unit (each such cell leaves one digit missing in its units).

All functions are batched and jit-compiled. The classifier takes 28x28 tiles; smaller tiles (e.g.
14x14 cells) are upsampled to 28x28 by pixel repetition first.
"""

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.data import digits as digits_lib
from ipr_jax.models import classifier as classifier_lib

CLASSIFIER_TILE = 28


def _box_size_of(n: int) -> int:
  box_size = int(round(n**0.5))
  if box_size * box_size != n:
    raise ValueError(f"grid side {n} is not a square (box size * box size)")
  return box_size


@functools.partial(jax.jit, static_argnames="num_digits")
def discretize_logits(logits: jax.Array, num_digits: int = 9) -> jax.Array:
  """Digits from per-tile logits by the zero -> second-best rule.

  Args:
    logits: [..., 10] logits over the classes 0..9.
    num_digits: largest allowed digit (9 for 9x9, 4 for 4x4).

  Returns:
    int32 [...] digits in 1..num_digits.
  """
  return jnp.argmax(logits[..., 1 : num_digits + 1], axis=-1).astype(jnp.int32) + 1


@jax.jit
def duplicate_count(grids: jax.Array) -> jax.Array:
  """srmbench's `duplicate_count`: sum over rows, columns, boxes and digits of |count - 1|.

  Args:
    grids: int [B, n, n] digits 1..n (n = 9 or 4).

  Returns:
    int32 [B].
  """
  grids = jnp.asarray(grids, jnp.int32)
  if grids.ndim != 3 or grids.shape[1] != grids.shape[2]:
    raise ValueError(f"grids of shape {grids.shape}: expected [B, n, n]")
  batch, n, _ = grids.shape
  box = _box_size_of(n)
  one_hot = jax.nn.one_hot(grids - 1, n, dtype=jnp.int32)  # [B, n, n, digit]; 0 outside 1..n
  rows = one_hot.sum(axis=2)  # [B, row, digit]
  cols = one_hot.sum(axis=1)  # [B, col, digit]
  boxes = one_hot.reshape(batch, box, box, box, box, n).sum(axis=(2, 4))  # [B, band, stack, digit]
  return (
      jnp.abs(rows - 1).sum(axis=(1, 2))
      + jnp.abs(cols - 1).sum(axis=(1, 2))
      + jnp.abs(boxes - 1).sum(axis=(1, 2, 3))
  )


def invalid_cells(grids: jax.Array) -> jax.Array:
  """bool [..., n, n]: True where a cell's digit repeats in its row, column or box.

  Args:
    grids: int [..., n, n] digits 1..n (n = 9 or 4).
  """
  grids = jnp.asarray(grids, jnp.int32)
  n = grids.shape[-1]
  box = _box_size_of(n)
  lead = grids.shape[:-2]
  one_hot = grids[..., None] == jnp.arange(1, n + 1)  # [..., row, col, digit]
  counts = one_hot.astype(jnp.int32)
  rows = counts.sum(-2, keepdims=True)
  cols = counts.sum(-3, keepdims=True)
  boxes = counts.reshape(*lead, box, box, box, box, n).sum((-4, -2), keepdims=True)
  boxes = jnp.broadcast_to(boxes, (*lead, box, box, box, box, n)).reshape(*lead, n, n, n)
  repeated = (rows > 1) | (cols > 1) | (boxes > 1)
  return jnp.any(one_hot & repeated, axis=-1)


@jax.jit
def is_valid_sudoku(grids: jax.Array) -> jax.Array:
  """bool [B]: duplicate_count == 0."""
  return duplicate_count(grids) == 0


def sudoku_metrics(grids: jax.Array) -> dict[str, jax.Array]:
  """{'duplicate_count': int32 [B], 'is_valid_sudoku': bool [B]} of digit grids [B, n, n]."""
  count = duplicate_count(grids)
  return {"duplicate_count": count, "is_valid_sudoku": count == 0}


def check_image_shape(shape: tuple[int, ...], grid_size: int) -> int:
  """Validates a Sudoku image batch shape [B, H, W, 1] and returns the cell size H // n."""
  if len(shape) != 4 or shape[-1] != 1:
    raise ValueError(f"Sudoku images of shape {tuple(shape)}: expected [B, H, W, 1]")
  height, width = shape[1], shape[2]
  if height != width or height % grid_size:
    raise ValueError(
        f"Sudoku images of size {height}x{width}: expected a square whose side is a "
        f"multiple of the grid size {grid_size}"
    )
  cell = height // grid_size
  if CLASSIFIER_TILE % cell:
    raise ValueError(
        f"Sudoku images of size {height}x{width}: cell size {cell} does not divide "
        f"the classifier's {CLASSIFIER_TILE}x{CLASSIFIER_TILE} tile"
    )
  return cell


def image_tiles(images: jax.Array, grid_size: int) -> jax.Array:
  """Cuts images [B, H, W, 1] into classifier tiles [B, n*n, 28, 28, 1] (row-major cells)."""
  cell = check_image_shape(images.shape, grid_size)
  batch = images.shape[0]
  tiles = images.reshape(batch, grid_size, cell, grid_size, cell).transpose(0, 1, 3, 2, 4)
  tiles = tiles.reshape(batch, grid_size * grid_size, cell, cell)
  factor = CLASSIFIER_TILE // cell
  tiles = jnp.repeat(jnp.repeat(tiles, factor, axis=2), factor, axis=3)
  return tiles[..., None]


@functools.partial(jax.jit, static_argnames="box_size")
def cell_logits(params: Mapping, images: jax.Array, box_size: int = 3) -> jax.Array:
  """Classifier logits of every cell: float32 [B, n, n, 10] for images [B, H, W, 1] in [-1, 1]."""
  n = box_size * box_size
  tiles = image_tiles(jnp.asarray(images, jnp.float32), n)
  batch = tiles.shape[0]
  logits = classifier_lib.MNISTClassifier().apply(
      {"params": params}, tiles.reshape(-1, *tiles.shape[2:])
  )
  return logits.reshape(batch, n, n, 10)


@functools.partial(jax.jit, static_argnames="box_size")
def predict_digit_grids(params: Mapping, images: jax.Array, box_size: int = 3) -> jax.Array:
  """Predicted digits int32 [B, n, n] of images [B, H, W, 1] in [-1, 1] (no rescaling/clamping)."""
  return discretize_logits(cell_logits(params, images, box_size), box_size * box_size)


@functools.partial(jax.jit, static_argnames="box_size")
def _evaluate(params, images, box_size):
  pred = predict_digit_grids(params, images, box_size)
  count = duplicate_count(pred)
  return {"pred": pred, "duplicate_count": count, "is_valid_sudoku": count == 0}


def evaluate_sudoku_images(
    images: jax.Array, params: Mapping | None = None, box_size: int = 3
) -> dict[str, jax.Array]:
  """Images -> predicted digit grids and the Sudoku metrics.

  Args:
    images: [B, H, W, 1] in [-1, 1], H = W = n * cell (cell 28, or a divisor of 28).
    params: classifier params; default: the weights shipped for the images' cell size.
    box_size: 3 (9x9) or 2 (4x4).

  Returns:
    {'pred': int32 [B, n, n], 'duplicate_count': int32 [B], 'is_valid_sudoku': bool [B]}.
  """
  images = jnp.asarray(images)
  cell = check_image_shape(images.shape, box_size * box_size)
  params = shipped_classifier_params(cell) if params is None else params
  return _evaluate(params, images, box_size)


@functools.lru_cache(maxsize=4)
def shipped_classifier_params(cell_size: int = 28):
  """The shipped classifier's params for cells of `cell_size` pixels (loaded once)."""
  return classifier_lib.load_classifier_params(cell_size=cell_size)


def cell_classifier_confidence(
    images: np.ndarray, labels: np.ndarray, cell_size: int
) -> np.ndarray:
  """`classifier_confidence` as the metric reads `cell_size`-pixel cells: each digit box-averaged
  to `cell_size`, repeated back to 28 px and read by the weights shipped for that cell size.

  Args:
    images: uint8 [N, 28, 28].
    labels: [N].
    cell_size: a divisor of 28.

  Returns:
    float32 [N].
  """
  factor = CLASSIFIER_TILE // cell_size
  coarse = digits_lib.downsample_digits(np.asarray(images), cell_size)
  coarse = np.repeat(np.repeat(coarse, factor, axis=1), factor, axis=2)
  return classifier_confidence(coarse, labels, params=shipped_classifier_params(cell_size))


def classifier_confidence(
    images: np.ndarray, labels: np.ndarray, params=None, batch_size: int = 1000
) -> np.ndarray:
  """Softmax probability that the classifier gives each digit's own label (what ranks the digits
  of `config.data.top_n`, `digits.load_digit_bank`).

  Args:
    images: uint8 [N, 28, 28].
    labels: [N].
    params: classifier params; default: the shipped weights.
    batch_size: tiles per forward pass.

  Returns:
    float32 [N].
  """
  params = classifier_lib.load_classifier_params() if params is None else params
  confidence = []
  for start in range(0, len(images), batch_size):
    tiles = digits_lib.to_unit_range(images[start : start + batch_size])[..., None]
    probs = jax.nn.softmax(classifier_lib.classifier_logits(params, tiles))
    lab = jnp.asarray(labels[start : start + batch_size], jnp.int32)
    confidence.append(np.asarray(jnp.take_along_axis(probs, lab[:, None], axis=1)[:, 0]))
  return np.concatenate(confidence) if confidence else np.zeros((0,), np.float32)
