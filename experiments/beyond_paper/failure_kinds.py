r"""What a run's broken final grids get wrong (experiments/README.md, "What the paper's IPR leaves
broken" and "The gap"): per run folder, how many final grids are broken, in how many of them a
"wrong cell" (an invalid cell whose digit repeats in both its row and its column) is a given
cell, and how many have duplicate count 6 (one digit repeated in a row, a column and a box).

    python experiments/beyond_paper/failure_kinds.py \
        experiments/results/beyond_paper/seed35/paper_b30/eval/hard

Reads the run's puzzles.npz (final digit grids, duplicate counts, validity at the last budget)
and, for the given cells, regenerates its test puzzles from the settings in its results.json.
"""

import json
import pathlib
import sys

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))

from ipr_jax import sampling  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.build import config_base  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.evaluation import settings as eval_settings  # noqa: E402  pylint: disable=g-import-not-at-top


def wrong_cells(grids: np.ndarray) -> np.ndarray:
  """`[P, n, n]` bool: cells whose digit appears again in their row and again in their column."""
  same_row = (grids[:, :, :, None] == grids[:, :, None, :]).sum(-1) > 1  # [P, r, c]
  same_col = (grids[:, :, :, None] == np.swapaxes(grids, 1, 2)[:, None, :, :]).sum(-1) > 1
  return same_row & same_col


def given_cells(folder: pathlib.Path, indices: np.ndarray) -> np.ndarray:
  """`[P, n * n]` bool: the given cells of the run's test puzzles `indices`."""
  meta = json.loads((folder / "results.json").read_text())["metadata"]
  unique = meta["eval"].get("unique_solution", False)
  config = config_base.load_config("mnist_sudoku:demo" + (",ms_unique_test" if unique else ""))
  for field, value in meta["eval"].items():
    if field in config.eval:
      config.eval[field] = tuple(value) if isinstance(value, list) else value
  task = eval_settings.task_evaluation(config)
  inputs = task.inputs(config.eval.seed, indices)
  unknown = sampling.unknown_patches(inputs["mask"], task.patch_size)
  return ~np.asarray(unknown)


def summary(folder: pathlib.Path) -> dict:
  with np.load(folder / "puzzles.npz") as f:
    indices, grids = f["index"], f["digit_grid"].astype(np.int64)
    valid, duplicates = f["valid"][:, -1].astype(bool), f["duplicate_count"][:, -1]
  broken = ~valid
  given = given_cells(folder, indices).reshape(grids.shape)
  wrong_given = (wrong_cells(grids) & given).any(axis=(1, 2))
  return {
      "broken": int(broken.sum()),
      "wrong_cell_given": int((broken & wrong_given).sum()),
      "duplicate_count_6": int((broken & (duplicates == 6)).sum()),
  }


def main(argv):
  for arg in argv:
    print(arg, json.dumps(summary(pathlib.Path(arg))))


if __name__ == "__main__":
  main(sys.argv[1:])
