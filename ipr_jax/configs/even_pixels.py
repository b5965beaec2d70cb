r"""Even Pixels (32x32 RGB, 4x4 patches): the reference's `ep_4` SRM and its `ep_test` IPR run.

Defaults are the reference's values (spec §3, §4.5); presets shrink the run.

Train (paper scale, 1 GPU of the reference: batch 2048, 100,001 steps):
  python -m ipr_jax.train --config=configs/even_pixels.py --workdir=runs/ep_4
Single-GPU run of under an hour:
  python -m ipr_jax.train --config=configs/even_pixels.py:small --workdir=runs/ep_small
CPU demo / tests (minutes on 2 cores):
  python -m ipr_jax.train --config=configs/even_pixels.py:tiny --workdir=runs/ep_tiny
Override single fields (a misspelt name fails):
  python -m ipr_jax.train --config=configs/even_pixels.py:tiny --config.num_train_steps=50 \
      --workdir=/tmp/ep
Evaluate (the evaluation binary reads config.sampler, config.ipr and config.eval):
  python -m ipr_jax.evaluate --config=configs/even_pixels.py:tiny,ep_test --workdir=runs/ep_tiny

Preset argument: comma-separated tokens, at most one size (`tiny` | `small`; none = paper scale)
and at most one evaluation (`ep_test`, the default).
"""

import ml_collections

from ipr_jax.build import config_base

_SIZES = ("tiny", "small")
_EVALS = ("ep_test",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for preset string `arg` (see the module docstring)."""
  size, eval_name = config_base.parse_preset(arg, _SIZES, _EVALS, "ep_test")
  # Shared sections and their documentation: ipr_jax/build/config_base.py.
  config = config_base.base_config("even_pixels", arg, unet_preset="unet_32")
  # Reference ep_4: batch 2048 on one GPU, 100,001 steps.
  config.batch_size = 2048
  config.num_train_steps = 100_001

  # Image height = width in pixels.
  config.data.image_size = 32
  # Image channels (RGB).
  config.data.channels = 3
  # Side of a square SRM patch in pixels (grid 8x8 = 64 patches).
  config.data.patch_size = 4

  config.time_sampler.beta_sharpness = 0.75
  config.optim.learning_rate = 8e-4

  # ep_test (spec §4.5): 30 steps per patch at overlap 0.9 for both the SRM pass and each IPR
  # iteration.
  config.sampler.steps_per_patch = 30
  config.sampler.overlap = 0.9
  config.ipr.steps_per_patch = 30
  config.ipr.overlap = 0.9
  config.eval.name = eval_name
  config.eval.seed = 42

  if size == "small":
    # About 25 min of training on one H100-class GPU (estimate, not measured).
    config.batch_size = 256
    config.num_train_steps = 20_000
    config.checkpoint_every_steps = 2_000
    config.model.hid_dims = (64, 128, 128, 128)
    config.optim.warmup_steps = 1_000
    config.eval.num_puzzles = 32
    config.eval.batch_size = 32
    config.ipr.budget = 10
  elif size == "tiny":
    # Minutes on 2 CPU cores; for tests and demos.
    config_base.use_tiny_model(config, hid_dims=(32, 32), attention=(False, True))
    config.batch_size = 32
    config.num_train_steps = 300
    # 5 steps per patch need overlap <= 0.8 for distinct block starts (steps * (1 - overlap)
    # >= 1); 0.5 leaves a margin: 163 passes for the 64 patches, 43 per IPR iteration.
    config.sampler.steps_per_patch = 5
    config.sampler.overlap = 0.5
    config.ipr.budget = 2
    config.ipr.steps_per_patch = 5
    config.ipr.overlap = 0.5
    config.eval.num_puzzles = 8
    config.eval.batch_size = 8
  return config
