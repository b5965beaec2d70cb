"""MNIST Sudoku: a grid of MNIST digits, given cells as a mask, one SRM patch per cell.

Valid: no digit (as the shipped classifier reads it) repeats in a row, column or box. The given
cells are a test puzzle's content (`config.eval.given_range`); the SRM pass generates the rest.
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ipr_jax.data import sudoku
from ipr_jax.metrics import sudoku as sudoku_metrics
from ipr_jax.models import classifier as classifier_lib
from ipr_jax.runtime import errors
from ipr_jax.tasks import base

NAME = "mnist_sudoku"
HOST_RENDERED = False
CELL_VERIFIER = True


def make_data(config: ml_collections.ConfigDict) -> sudoku.SudokuTask:
  """The on-device Sudoku generator (training images; test puzzles by (seed, index)).

  The top-N digits of the bundled file come from its shipped ranking; other digits are ranked by
  the shipped classifier here. `data.digit_ranking='cell_classifier'` (the 9x9 demo preset) ranks
  them instead by the classifier that reads `data.cell_size`-pixel cells, as the metric does.
  """
  ranking = config.data.get("digit_ranking", "shipped")
  if ranking not in _DIGIT_RANKINGS:
    raise errors.ConfigError(
        f"data.digit_ranking={ranking!r}: expected one of {', '.join(_DIGIT_RANKINGS)}"
    )
  shipped = (
      config.data.get("digits_source", "bundled") == "bundled"
      and config.data.get("digits_path") is None
  )
  confidence = None if shipped else sudoku_metrics.classifier_confidence
  if ranking == "cell_classifier":
    cell_size = int(config.data.cell_size)
    confidence = functools.partial(sudoku_metrics.cell_classifier_confidence, cell_size=cell_size)
  return sudoku.make_sudoku_task_from_config(config.data, digit_confidence=confidence)


_DIGIT_RANKINGS = ("shipped", "cell_classifier")


def unknown_counts(config: ml_collections.ConfigDict) -> list[int]:
  """Every cell count minus a given count of `config.eval.given_range`."""
  num_patches = base.all_patches(config)[0]
  lo, hi = sudoku.check_given_range(tuple(config.eval.given_range), config.data.box_size)
  return [num_patches - given for given in range(lo, hi + 1)]


def score_fn(classifier_params: Any, box_size: int) -> Callable[[jax.Array], dict]:
  """z [B, H, W, 1] -> {'valid', 'duplicate_count'} per puzzle, through the digit classifier."""

  def score(z):
    grids = sudoku_metrics.predict_digit_grids(classifier_params, z, box_size)
    count = sudoku_metrics.duplicate_count(grids)
    return {"valid": count == 0, "duplicate_count": count}

  return score


def invalid_cells(grids: np.ndarray) -> np.ndarray:
  """bool [..., n, n]: True where a cell's digit repeats in its row, column or box."""
  return np.asarray(sudoku_metrics.invalid_cells(np.asarray(grids)))


def cell_verify_fn(classifier_params: Any, box_size: int) -> Callable[[jax.Array], jax.Array]:
  """z [B, H, W, 1] -> [B, n * n] bool: cells (row-major) whose classified digit repeats in their
  row, column or box. The verifier of selection='verifier'."""

  def broken(z):
    grids = sudoku_metrics.predict_digit_grids(classifier_params, z, box_size)
    return sudoku_metrics.invalid_cells(grids).reshape(z.shape[0], -1)

  return broken


def dependency_matrix(box_size: int) -> np.ndarray:
  """`[N, N]` float32, N = box_size**4 cells row-major: 1 where two different cells share a row,
  a column or a box (the SRM reference's Sudoku dependency matrix, self-dependency masked)."""
  side = box_size * box_size
  row, col = np.divmod(np.arange(side * side), side)
  box = (row // box_size) * box_size + col // box_size
  related = (row[:, None] == row[None]) | (col[:, None] == col[None]) | (box[:, None] == box[None])
  return (related & ~np.eye(side * side, dtype=bool)).astype(np.float32)


class Evaluation(base.Evaluation):
  """Sudoku under one config: the test puzzles' given cells, scored by the digit classifier."""

  csv_scores = ("valid", "duplicate_count")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.data = make_data(config)
    self.box_size = config.data.box_size
    self.classifier_params = classifier_lib.load_classifier_params(
        config.eval.classifier_path, cell_size=config.data.cell_size
    )
    self.score_fn = score_fn(self.classifier_params, self.box_size)
    self.cell_verify_fn = cell_verify_fn(self.classifier_params, self.box_size)
    self.dependency_matrix = dependency_matrix(self.box_size)
    self.given_range = tuple(config.eval.given_range)
    # Minimal uniquely solvable puzzles (the ms_unique_test preset; 4x4 only).
    self.unique_solution = bool(config.eval.get("unique_solution", False))
    self.cell_size = config.data.cell_size

  def inputs(self, seed: int, indices: np.ndarray) -> dict[str, Optional[jax.Array]]:
    batch = self.data.test_batch(seed, indices, self.given_range, self.unique_solution)
    return {"image": batch["image"], "mask": batch["mask"]}

  def unknown_patches(self, seed: int, indices: np.ndarray) -> np.ndarray:
    """int [P] the cells of puzzles `indices` that are not given."""
    indices = np.asarray(indices)
    chunks = [
        self.data.test_given_counts(
            seed, indices[i : i + 8192], self.given_range, self.unique_solution
        )
        for i in range(0, len(indices), 8192)
    ]
    given = np.concatenate([np.asarray(c) for c in chunks])
    lo, hi = self.given_range
    outside = (given < lo) | (given > hi)
    if outside.any():  # only unique-solution puzzles have given counts not drawn from the range
      raise errors.ConfigError(
          f"test puzzle {indices[outside][0]} has {given[outside][0]} given cells, "
          f"outside config.eval.given_range={self.given_range}"
      )
    return self.num_patches - given

  def final_fn(self, z: jax.Array) -> dict[str, jax.Array]:
    """'digit_grid' int8 [B, n, n]: the classified digits of the final samples."""
    grids = sudoku_metrics.predict_digit_grids(self.classifier_params, z, self.box_size)
    return {"digit_grid": grids.astype(jnp.int8)}

  def invalid_cells(self, samples: np.ndarray) -> np.ndarray:
    """[..., n, n] bool: cells whose classified digit repeats in their row, column or box."""
    flat = samples.reshape(-1, *samples.shape[-3:])
    grids = np.asarray(
        sudoku_metrics.predict_digit_grids(self.classifier_params, jnp.asarray(flat), self.box_size)
    )
    n = grids.shape[-1]
    return invalid_cells(grids).reshape(*samples.shape[:-3], n, n)

  def puzzle_columns(self, per_puzzle: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """'num_given' [P]: the given cells of each puzzle."""
    return {"num_given": self.num_patches - per_puzzle["unknown_patches"]}
