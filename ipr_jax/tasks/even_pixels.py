"""Even Pixels: 32x32 RGB images with exactly half of the pixels in each of two hues.

Valid: exactly even (`color_imbalance` 0). No given content: the SRM pass generates every patch.
"""

import jax
import ml_collections

from ipr_jax.data import even_pixels as even_pixels_data
from ipr_jax.metrics import even_pixels as even_pixels_metrics
from ipr_jax.runtime import errors
from ipr_jax.tasks import base

NAME = "even_pixels"
HOST_RENDERED = False
CELL_VERIFIER = False


def make_data(config: ml_collections.ConfigDict) -> even_pixels_data.EvenPixelsTask:
  """The on-device image generator (`train_batch(key, batch)`)."""
  if config.data.channels != 3:
    raise errors.ConfigError(f"even_pixels images are RGB; data.channels={config.data.channels}")
  return even_pixels_data.EvenPixelsTask(image_size=config.data.image_size)


unknown_counts = base.all_patches


def score_fn(z: jax.Array) -> dict:
  """z [B, 32, 32, 3] -> {'valid' (exactly even), 'color_imbalance', 'saturation_std',
  'value_std'} per image."""
  per_image = even_pixels_metrics.per_image_metrics(z)
  return {"valid": per_image["color_imbalance"] == 0, **per_image}


class Evaluation(base.Evaluation):
  """Even Pixels under one config: generated from noise alone, scored by its hue counts."""

  csv_scores = ("valid", "color_imbalance")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.score_fn = score_fn
