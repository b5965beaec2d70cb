"""Tests of ipr_jax.data.even_pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.colors import rgb_to_hsv
from PIL import Image

from ipr_jax.data import even_pixels
from ipr_jax.metrics import even_pixels as ep_metrics


def pil_convert(hsv: np.ndarray) -> np.ndarray:
  flat = np.asarray(hsv, np.uint8).reshape(1, -1, 3)
  return np.asarray(Image.fromarray(flat, mode="HSV").convert("RGB")).reshape(hsv.shape)


def test_pil_hsv_to_rgb_matches_pil():
  rng = np.random.default_rng(0)
  hsv = rng.integers(0, 256, (500_000, 3)).astype(np.uint8)
  # Every hue at the Even Pixels saturation/value, and the corner values.
  extra = np.stack(
      np.meshgrid(np.arange(256), [0, 1, 254, 255], [0, 178, 255], indexing="ij"), axis=-1
  ).reshape(-1, 3)
  hsv = np.concatenate([hsv, extra.astype(np.uint8)])
  np.testing.assert_array_equal(even_pixels.pil_hsv_to_rgb(hsv), pil_convert(hsv))


def to_u8(images):
  return np.round((np.asarray(images) + 1) * 127.5).astype(np.int64)


def test_batches_have_two_balanced_opposite_hues():
  images = even_pixels.EvenPixelsTask().train_batch(jax.random.key(0), 16)["image"]
  assert images.shape == (16, 32, 32, 3) and images.dtype == jnp.float32
  pixels = to_u8(images)
  table = even_pixels.pil_hsv_to_rgb(
      np.stack([np.arange(256), np.full(256, 255), np.full(256, 178)], -1)
  )
  for image in pixels:
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) == 2 and list(counts) == [512, 512]
    # Both colours are PIL conversions of (h, 255, 178) for hue bytes about half a turn apart.
    hues = [np.flatnonzero(np.all(table == c, axis=1)) for c in colours]
    assert all(len(h) for h in hues)
    gap = min(abs(int(a) - int(b)) for a in hues[0] for b in hues[1])
    assert gap in (127, 128)
    hsv = rgb_to_hsv(image.reshape(-1, 3) / 255.0)
    np.testing.assert_allclose(hsv[:, 1], 1.0)
    np.testing.assert_allclose(hsv[:, 2], 178 / 255, rtol=1e-6)


def test_batches_score_even_and_recoloured_pixels_score_k():
  images = np.asarray(even_pixels.EvenPixelsTask().test_batch(0, jnp.arange(8))["image"])
  metrics = ep_metrics.even_pixels_metrics(images)
  assert float(metrics["is_color_count_even"]) == 1.0
  assert float(metrics["color_imbalance_count"]) == 0.0
  recoloured = images.copy()
  for b, k in enumerate([1, 2, 5, 37, 100, 0, 3, 64]):
    flat = recoloured[b].reshape(-1, 3)
    colours = np.unique(flat, axis=0)
    first = np.flatnonzero(np.all(flat == colours[0], axis=1))
    flat[first[:k]] = colours[1]
  per_image = ep_metrics.per_image_metrics(jnp.asarray(recoloured))
  np.testing.assert_array_equal(per_image["color_imbalance"], [1, 2, 5, 37, 100, 0, 3, 64])


def test_test_images_pure_functions_of_seed_and_index():
  task = even_pixels.EvenPixelsTask()
  first = task.test_batch(3, jnp.array([0, 9, 4]))["image"]
  np.testing.assert_array_equal(first, task.test_batch(3, jnp.array([0, 9, 4]))["image"])
  np.testing.assert_array_equal(first[1:2], task.test_batch(3, jnp.array([9]))["image"])
  assert not np.array_equal(first, task.test_batch(4, jnp.array([0, 9, 4]))["image"])
  assert not np.array_equal(first[0], first[2])


def test_odd_pixel_count_rejected():
  with pytest.raises(ValueError, match="image_size=5"):
    even_pixels.even_pixels_images(jax.random.key(0), 1, image_size=5)
