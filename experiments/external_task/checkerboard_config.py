r"""Checkerboard (8x8 grayscale, 2x2 patches): the config of the external-task example.

    python -m ipr_jax.train --config=experiments/external_task/checkerboard_config.py \
        --workdir=/tmp/checkerboard
    python -m ipr_jax.evaluate --config=experiments/external_task/checkerboard_config.py \
        --workdir=/tmp/checkerboard

Importing the task's module registers it (`ipr_jax.tasks.register_task`); a task in an installed
package of one's own would simply be imported here.
"""

import pathlib
import sys

import ml_collections

from ipr_jax.build import config_base

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import checkerboard_task  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """A CPU-sized run: a tiny U-Net, a few hundred steps; no presets (`arg` is stored only)."""
  config = config_base.base_config(checkerboard_task.NAME, arg, unet_preset="unet_32")
  config_base.use_tiny_model(config, hid_dims=(16, 16), attention=(False, False))
  config.model.num_head_channels = 16
  config.batch_size = 16
  config.num_train_steps = 300
  # Image height = width in pixels, grayscale, 2x2 patches (a 4x4 grid).
  config.data.image_size = 8
  config.data.channels = 1
  config.data.patch_size = 2
  config.time_sampler.density_num_samples = 2_000
  config.sampler.steps_per_patch = 3
  config.sampler.overlap = 0.0
  config.ipr.budget = 2
  config.ipr.steps_per_patch = 3
  config.ipr.overlap = 0.0
  config.eval.name = "checkerboard_test"
  config.eval.num_puzzles = 8
  config.eval.batch_size = 8
  config.eval.given_range = (4, 10)
  config.eval.num_plot_puzzles = 2
  return config
