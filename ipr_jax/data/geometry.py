"""The image geometry of a config: the shape of a training image and its SRM patch grid.

Shared by the tasks (`ipr_jax.tasks.base`), the model builder (`build.init_params`), the training
and the evaluation; it imports nothing of the package but its error type, so every layer may
read it.
"""

import ml_collections

from ipr_jax.runtime import errors


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """[H, W, d] of one training image."""
  return (config.data.image_size, config.data.image_size, config.data.channels)


def patch_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(gh, gw) of the SRM patch grid; the patch size must divide the image size."""
  size, p = config.data.image_size, config.data.patch_size
  if p < 1 or size % p:
    raise errors.ConfigError(f"data.patch_size={p} does not divide data.image_size={size}")
  return size // p, size // p
