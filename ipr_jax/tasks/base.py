"""The interface of a task module (`ipr_jax/tasks/<task>.py`, or registered from another project
with `ipr_jax.tasks.register_task`) and its shared defaults.

A task module provides, for the registry (`ipr_jax.tasks`):

  NAME            the task's name, `config.task` of its config file (`configs/<task>.py`);
  HOST_RENDERED   True if its training images are rendered on the host (then `make_data` returns
                  a host-side generator fed by `train.py`'s prefetcher), else False (an on-device
                  pytree with `train_batch(key, batch)`);
  CELL_VERIFIER   True if its `Evaluation` has a per-cell rule check (`config.ipr.selection=
                  'verifier'` needs one);
  make_data(config)
                  its data generator (training images; test puzzles for tasks with given content);
  unknown_counts(config)
                  every number of patches the SRM pass can have to generate under `config.eval`
                  (checked against the sampler's schedules before anything compiles);
  Evaluation(config)
                  what the evaluation needs under one config: a subclass of `Evaluation` below
                  that sets `score_fn` and overrides what the task has beyond the defaults.

and, if HOST_RENDERED, the training feed that `train.py` uses:

  train_feed(data, config, example_index, first_step)
                  a prefetcher of the images of steps first_step + 1, ...: `.get()` -> uint8
                  [num_local, per_device, H, W, d] (example_index: int [num_local, per_device],
                  the global indices of this process's examples), `.wait_seconds`, `.close()`;
  images_on_device(images)
                  uint8 images -> float32 in [-1, 1], traced inside the train step.
"""

from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from ipr_jax.data import geometry


def all_patches(config: ml_collections.ConfigDict) -> list[int]:
  """`unknown_counts` of a task without given content: every patch is generated."""
  grid_h, grid_w = geometry.patch_grid(config)
  return [grid_h * grid_w]


class Evaluation:
  """What the evaluation needs of a task under one config: test inputs, unknown-patch counts, a
  score function, and what the result files and plots show of it.

  Attributes:
    name: the task (`config.task`).
    patch_size: the SRM patch size; num_patches: patches per image; image_shape: [H, W, d].
    cell_size: the side in pixels of a cell in the plots (Sudoku: a digit cell; else a patch).
    score_fn: z [B, H, W, d] in [-1, 1] -> {name: [B]} per-image scores, 'valid' among them
      (traced on the devices, after every IPR budget).
    cell_verify_fn: None, or z [B, H, W, d] -> bool [B, num_patches] the patches (row-major)
      that break a rule: the verifier of `config.ipr.selection='verifier'`.
    dependency_matrix: None, or `[num_patches, num_patches]` float 1 where two patches depend on
      each other (Sudoku: same row, column or box): the graph of the graph_sequential schedule.
    csv_scores: the per-budget scores that get columns in puzzles.csv.
    plot_metrics: the row means drawn beside the valid rate in valid_rate_vs_budget.png.
    metadata: task facts written into results.json.
  """

  csv_scores: tuple[str, ...] = ("valid",)
  plot_metrics: tuple[str, ...] = ()
  cell_verify_fn: Optional[Callable[[jax.Array], jax.Array]] = None
  dependency_matrix: Optional[np.ndarray] = None

  def __init__(self, config: ml_collections.ConfigDict):
    self.name = config.task
    self.patch_size = config.data.patch_size
    self.num_patches = int(np.prod(geometry.patch_grid(config)))
    self.image_shape = geometry.image_shape(config)
    self.cell_size = config.data.patch_size
    self.metadata: dict[str, Any] = {}
    self.score_fn: Callable[[jax.Array], dict] = None

  def inputs(self, seed: int, indices: np.ndarray) -> dict[str, Optional[jax.Array]]:
    """Test inputs of puzzles `indices`: image [B, H, W, d] and mask [B, H, W, 1], or None for
    both (a task without given content)."""
    del seed, indices
    return {"image": None, "mask": None}

  def unknown_patches(self, seed: int, indices: np.ndarray) -> np.ndarray:
    """int [P] how many patches the SRM pass generates for puzzles `indices` (default: all)."""
    del seed
    return np.full(len(np.asarray(indices)), self.num_patches)

  def final_fn(self, z: jax.Array) -> dict[str, jax.Array]:
    """Per-puzzle facts of the final samples z [B, H, W, d] kept in puzzles.npz (traced on the
    devices; default: none)."""
    del z
    return {}

  def invalid_cells(self, samples: np.ndarray) -> Optional[np.ndarray]:
    """[..., gh, gw] bool rule violations of samples [..., H, W, d] outlined in the plots, or
    None (default: the task has no per-cell rules)."""
    del samples
    return None

  def puzzle_columns(self, per_puzzle: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-puzzle arrays added to puzzles.npz / puzzles.csv from the merged ones (default:
    none)."""
    del per_puzzle
    return {}
