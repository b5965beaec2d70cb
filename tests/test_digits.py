"""Tests of ipr_jax.data.digits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.data import digits
from ipr_jax.metrics import sudoku as sudoku_metrics
from ipr_jax.scorers import digit_ranking


def test_bundled_digits_and_split():
  images, labels = digits.load_bundled_digits()
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
  train_images, train_labels = digits.load_digits("train")
  test_images, test_labels = digits.load_digits("test")
  assert len(train_images) + len(test_images) == 10000
  for d in range(10):
    class_count = int((labels == d).sum())
    assert int((test_labels == d).sum()) == class_count // 5  # every fifth digit of each class
    assert int((train_labels == d).sum()) == class_count - class_count // 5
  # The parts are disjoint and together are the file.
  held_out = digits.holdout_mask(labels)
  np.testing.assert_array_equal(test_images, images[held_out])
  np.testing.assert_array_equal(train_images, images[~held_out])
  positions = np.flatnonzero(labels == 3)
  assert held_out[positions[4]] and not held_out[positions[:4]].any()


def test_missing_or_malformed_digits_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing_digits.npz"):
    digits.load_bundled_digits(tmp_path / "missing_digits.npz")
  bad = tmp_path / "bad.npz"
  np.savez(bad, images=np.zeros((3, 27, 28), np.uint8), labels=np.zeros(3, np.uint8))
  with pytest.raises(ValueError, match="bad.npz"):
    digits.load_bundled_digits(bad)
  with pytest.raises(ValueError, match="digits_source='mnist'"):
    digits.load_digits("train", "mnist")
  with pytest.raises(ValueError, match="part='val'"):
    digits.load_digits("val")


def test_tfds_source_missing_data_raises(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="mnist"):
    digits.load_digits("train", "tfds", data_dir=str(tmp_path))


def test_tfds_source_with_mock_data(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  # mock_data serves examples but does not mark the dataset as prepared.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  with tfds.testing.mock_data(num_examples=12):
    images, labels = digits.load_digits("test", "tfds")
  assert images.shape == (12, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (12,) and labels.max() <= 9


def test_select_top_n():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 500)
  images = np.arange(500)  # stand-ins that identify each item
  confidence = rng.uniform(size=500)
  kept_images, kept_labels = digits.select_top_n(images, labels, confidence, 7)
  for d in range(10):
    expected = np.sort(confidence[labels == d])[::-1][:7]
    np.testing.assert_array_equal(
        np.sort(confidence[kept_images[kept_labels == d]])[::-1], expected
    )
  with pytest.raises(ValueError, match="top_n=0"):
    digits.select_top_n(images, labels, confidence, 0)


def test_top_n_keeps_confident_digits():
  images, labels = digits.load_digits("test")
  confidence = sudoku_metrics.classifier_confidence(images, labels)
  bank = digits.load_digit_bank("test", top_n=40)
  np.testing.assert_array_equal(np.asarray(bank.counts), np.full(10, 40))
  for d in range(10):
    threshold = np.sort(confidence[labels == d])[::-1][39]
    kept_confidence = sudoku_metrics.classifier_confidence(
        np.asarray(bank.images[d, :40]), np.full(40, d)
    )
    assert np.all(kept_confidence >= threshold - 1e-6)


def test_the_shipped_ranking_is_the_shipped_classifiers():
  """The ranking file (`python -m ipr_jax.scorers.digit_ranking`) equals what the shipped
  classifier gives now, and a bank from it equals one ranked by the classifier's confidence."""
  expected = digit_ranking.bundled_ranking()
  with np.load(digits.BUNDLED_RANKING) as shipped:
    assert set(shipped.files) == set(expected)
    for name in expected:
      np.testing.assert_array_equal(shipped[name], expected[name], err_msg=name)
  ranked = digits.load_digit_bank(
      "train", top_n=30, cell_size=14, digit_confidence=sudoku_metrics.classifier_confidence
  )
  shipped_bank = digits.load_digit_bank("train", top_n=30, cell_size=14)
  np.testing.assert_array_equal(np.asarray(ranked.images), np.asarray(shipped_bank.images))


def test_other_digits_need_a_confidence_for_top_n(tmp_path):
  path = tmp_path / "digits.npz"
  images, labels = digits.load_bundled_digits()
  np.savez(path, images=images[::20], labels=labels[::20])
  with pytest.raises(ValueError, match="needs a digit_confidence"):
    digits.load_digit_bank("test", top_n=5, path=str(path))
  bank = digits.load_digit_bank(
      "test",
      top_n=5,
      path=str(path),
      digit_confidence=lambda images, labels: -np.arange(len(labels)),
  )
  assert np.asarray(bank.counts).tolist() == [5] * 10


def test_downsample_is_box_average():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
  small = digits.downsample_digits(images, 14)
  block = images[1, 4:6, 10:12].astype(np.float64)
  assert small.shape == (3, 14, 14) and small[1, 2, 5] == np.floor(block.mean() + 0.5)
  np.testing.assert_array_equal(
      digits.downsample_digits(np.full((1, 28, 28), 77, np.uint8), 14), np.full((1, 14, 14), 77)
  )
  with pytest.raises(ValueError, match="cell_size=12"):
    digits.downsample_digits(images, 12)


def test_digit_bank_gathers_right_class():
  images, labels = digits.load_digits("train")
  bank = digits.make_digit_bank(images, labels)
  np.testing.assert_array_equal(np.asarray(bank.counts), np.bincount(labels, minlength=10))
  query = jnp.array([[1, 9, 4], [4, 0, 7]])
  idx = bank.sample_indices(jax.random.key(0), query)
  assert np.all(np.asarray(idx) < np.asarray(bank.counts)[np.asarray(query)])
  tiles = np.asarray(bank.gather(query, idx))
  for q, tile in zip(np.asarray(query).ravel(), tiles.reshape(-1, 28, 28)):
    assert np.any(np.all(images[labels == q] == tile, axis=(1, 2)))
  with pytest.raises(ValueError, match=r"digit\(s\) \[3\]"):
    digits.make_digit_bank(images[labels != 3], labels[labels != 3])


def test_to_unit_range():
  out = np.asarray(digits.to_unit_range(np.arange(256).astype(np.uint8)))
  assert out[0] == -1.0 and out[255] == 1.0 and np.all(np.diff(out) > 0)
  np.testing.assert_allclose(out, np.arange(256) / 127.5 - 1, rtol=0, atol=1e-7)
