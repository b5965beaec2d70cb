"""Tests of ipr_jax.metrics: golden reference values, the shipped classifier, rendered puzzles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.colors import rgb_to_hsv as mpl_rgb_to_hsv

from ipr_jax.data import digits
from ipr_jax.data import sudoku
from ipr_jax.data import sudoku_grids
from ipr_jax.metrics import even_pixels as ep_metrics
from ipr_jax.metrics import sudoku as sudoku_metrics
from ipr_jax.models import classifier


@pytest.fixture(scope="module")
def golden(golden_dir):
  with np.load(golden_dir / "metrics.npz") as f:
    return {k: f[k] for k in f.files}


# ---------------------------------------------------------------------------- Even Pixels


def test_even_pixels_golden(golden):
  images = golden["ep_images"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  hsv = ep_metrics.images_to_hsv(images)
  np.testing.assert_allclose(hsv, golden["ep_hsv"], rtol=0, atol=1e-6)
  per_image = ep_metrics.per_image_metrics(images)
  np.testing.assert_array_equal(per_image["color_imbalance"], golden["ep_imbalance_per_image"])
  # numpy's float32 std of a constant image is ~1e-7, not 0 (summation rounding): atol 5e-7.
  np.testing.assert_allclose(
      per_image["saturation_std"], golden["ep_sat_std_per_image"], rtol=1e-5, atol=5e-7
  )
  np.testing.assert_allclose(
      per_image["value_std"], golden["ep_val_std_per_image"], rtol=1e-5, atol=5e-7
  )
  metrics = ep_metrics.even_pixels_metrics(images)
  for name in ("is_color_count_even", "color_imbalance_count"):
    assert float(metrics[name]) == float(golden[f"ep_metric/{name}"])
  for name in ("saturation_std", "value_std"):
    np.testing.assert_allclose(float(metrics[name]), float(golden[f"ep_metric/{name}"]), rtol=1e-5)


def test_rgb_to_hsv_matches_matplotlib_including_ties():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(size=(4000, 3)).astype(np.float32)
  ties = (rng.integers(0, 4, size=(4000, 3)) / 3).astype(np.float32)  # many equal channels
  rgb = np.concatenate([rgb, ties, np.zeros((1, 3), np.float32), np.ones((1, 3), np.float32)])
  np.testing.assert_allclose(ep_metrics.rgb_to_hsv(rgb), mpl_rgb_to_hsv(rgb), rtol=0, atol=2e-7)


def test_hue_histogram_matches_numpy():
  rng = np.random.default_rng(1)
  hue = rng.uniform(size=(3, 32, 32)).astype(np.float32)
  hue[0, 0, :4] = [0.0, 1.0, 0.5, 255 / 256]
  hist = ep_metrics.hue_histogram(jnp.asarray(hue))
  for b in range(3):
    np.testing.assert_array_equal(hist[b], np.histogram(hue[b], bins=256, range=(0, 1))[0])


def test_even_pixels_bad_input():
  with pytest.raises(ValueError, match=r"\(2, 32, 32, 1\)"):
    ep_metrics.even_pixels_metrics(jnp.zeros((2, 32, 32, 1)))
  with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
    ep_metrics.even_pixels_metrics(jnp.zeros((32, 32, 3)))


# ---------------------------------------------------------------------------- Sudoku metric


def reference_duplicate_count(grid: np.ndarray) -> int:
  """Independent loop version of spec §6.1: sum over units and digits of |count - 1|."""
  n = grid.shape[0]
  b = int(round(n**0.5))
  units = [grid[i] for i in range(n)] + [grid[:, j] for j in range(n)]
  units += [grid[r : r + b, c : c + b].ravel() for r in range(0, n, b) for c in range(0, n, b)]
  return sum(abs(int(np.sum(u == d)) - 1) for u in units for d in range(1, n + 1))


def test_sudoku_metrics_golden(golden):
  metrics = sudoku_metrics.sudoku_metrics(golden["sudoku_pred"])
  np.testing.assert_array_equal(metrics["duplicate_count"], golden["sudoku_duplicate_count"])
  np.testing.assert_array_equal(metrics["is_valid_sudoku"], golden["sudoku_is_valid"])


def test_discretize_golden(golden):
  pred = sudoku_metrics.discretize_logits(golden["disc_logits"]).reshape(2, 9, 9)
  np.testing.assert_array_equal(pred, golden["disc_pred"])


def test_discretize_zero_rule():
  logits = jnp.array(
      [
          [5.0, 1, 2, 0, 0, 0, 0, 0, 0, 0],  # argmax 0 -> second best 2
          [0.0, 1, 2, 9, 0, 0, 0, 0, 0, 0],  # argmax 3
          [9.0, 0, 0, 0, 0, 1, 0, 0, 0, 8],
      ]
  )  # argmax 0 -> 9
  np.testing.assert_array_equal(sudoku_metrics.discretize_logits(logits), [2, 3, 9])
  np.testing.assert_array_equal(sudoku_metrics.discretize_logits(logits, num_digits=4), [2, 3, 1])


@pytest.mark.parametrize("box_size", [2, 3])
def test_duplicate_count_matches_loop_version(box_size):
  n = box_size * box_size
  rng = np.random.default_rng(box_size)
  grids = rng.integers(1, n + 1, (50, n, n))
  valid = sudoku_grids.make_grid_sets(0, box_size, 5, 5).train.astype(np.int64)
  grids[:5] = valid
  grids[5:10] = valid
  grids[5:10, 0, 0] = grids[5:10, 0, 0] % n + 1  # one wrong cell
  counts = np.asarray(sudoku_metrics.duplicate_count(grids))
  np.testing.assert_array_equal(counts, [reference_duplicate_count(g) for g in grids])
  assert np.all(counts[:5] == 0) and np.all(counts[5:10] == 6)
  np.testing.assert_array_equal(sudoku_metrics.is_valid_sudoku(grids), counts == 0)


# ---------------------------------------------------------------------------- classifier


def test_shipped_classifier_held_out_accuracy():
  images, labels = digits.load_digits("test")
  params = classifier.load_classifier_params()
  tiles = digits.to_unit_range(images)[..., None]
  pred = np.asarray(jnp.argmax(classifier.classifier_logits(params, tiles), axis=-1))
  accuracy = float(np.mean(pred == labels))
  assert accuracy >= 0.99, accuracy
  metadata = classifier.load_classifier_metadata()
  assert abs(metadata["held_out_accuracy"] - accuracy) < 1e-6


@pytest.fixture(scope="module")
def confident_digits():
  """Held-out digits, top 100 per class by the shipped classifier's confidence (as ms1000 does)."""
  images, labels = digits.load_digits("test")
  confidence = sudoku_metrics.classifier_confidence(images, labels)
  return digits.select_top_n(images, labels, confidence, 100)


def test_rendered_solved_and_swapped_grids(confident_digits):
  bank = digits.make_digit_bank(*confident_digits)
  grid = sudoku_grids.make_grid_sets(3, 3, 5, 5).test[0].astype(np.int64)
  # Swap two different digits in row 0, columns 1 and 7 (different stacks): the row stays
  # complete, and each of the two columns and two boxes gets one digit twice and misses one,
  # so the count is 4 units x 2 = 8.
  swapped = grid.copy()
  swapped[0, 1], swapped[0, 7] = grid[0, 7], grid[0, 1]
  # Swapping inside one box across rows and columns, (3,3) <-> (4,4), adds 2 rows + 2 columns.
  two_swaps = swapped.copy()
  two_swaps[3, 3], two_swaps[4, 4] = swapped[4, 4], swapped[3, 3]
  relabelled = 10 - grid  # still valid
  grids = np.stack([grid, swapped, two_swaps, relabelled])
  images = sudoku.render_grids(jax.random.key(0), grids, bank)
  result = sudoku_metrics.evaluate_sudoku_images(images)
  np.testing.assert_array_equal(result["pred"], grids)
  np.testing.assert_array_equal(result["duplicate_count"], [0, 8, 16, 0])
  np.testing.assert_array_equal(result["is_valid_sudoku"], [True, False, False, True])


def test_rendered_test_batch_classified(confident_digits):
  bank = digits.make_digit_bank(*confident_digits)
  grids = sudoku_grids.make_grid_sets(3, 3, 5, 5)
  task = sudoku.SudokuTask(
      train_digits=bank, test_digits=bank, train_grids=grids.train, test_grids=grids.test
  )
  batch = task.test_batch(1, jnp.arange(4), "hard")
  result = sudoku_metrics.evaluate_sudoku_images(batch["image"])
  np.testing.assert_array_equal(result["pred"], batch["grid"])
  np.testing.assert_array_equal(result["duplicate_count"], np.zeros(4))


def test_small_cells_and_4x4(confident_digits):
  bank = digits.make_digit_bank(*confident_digits, cell_size=14)
  grids = sudoku_grids.make_grid_sets(0, 2)
  task = sudoku.SudokuTask(
      train_digits=bank,
      test_digits=bank,
      train_grids=grids.train,
      test_grids=grids.test,
      box_size=2,
      transform_grids=False,
      train_given_range=(0, 15),
  )
  batch = task.test_batch(0, jnp.arange(16), "easy")
  assert batch["image"].shape == (16, 56, 56, 1)
  result = sudoku_metrics.evaluate_sudoku_images(batch["image"], box_size=2)
  pred = np.asarray(result["pred"])
  assert pred.shape == (16, 4, 4) and np.all((pred >= 1) & (pred <= 4))
  # 14-pixel digits, upsampled by repetition, still read correctly almost always.
  assert np.mean(pred == np.asarray(batch["grid"])) >= 0.95


@pytest.mark.parametrize(
    "shape",
    [(2, 252, 252, 3), (2, 250, 250, 1), (2, 252, 126, 1), (252, 252, 1), (2, 9 * 10, 9 * 10, 1)],
)
def test_sudoku_images_bad_shape(shape):
  with pytest.raises(ValueError, match="Sudoku images"):
    sudoku_metrics.evaluate_sudoku_images(jnp.zeros(shape), params={})
