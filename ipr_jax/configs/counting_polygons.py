r"""Counting Polygons (128x128 RGB, 8x8 patches): the reference's `cp_ffhq_8` SRM and `cp_test` IPR.

Defaults are the reference's values (spec §3, §4.5, §5.3); presets shrink the run. Images are
rendered on the host (ipr_jax/data/counting_polygons.py) by `data.render_workers` background
workers; backgrounds are procedural unless `data.background_dir` names a folder (e.g. FFHQ
128x128, the reference's backgrounds). Samples are scored by the polygon scorer shipped in the
package (ipr_jax/models/polygon_scorer.py) or `eval.scorer_path`.

Train (paper scale, 1 GPU of the reference: batch 56, 250,001 steps):
  python -m ipr_jax.train --config=configs/counting_polygons.py --workdir=runs/cp_ffhq_8
  python -m ipr_jax.train --config=configs/counting_polygons.py \
      --config.data.background_dir=/data/ffhq128 --workdir=runs/cp_ffhq_8
Single-GPU run of a few hours:
  python -m ipr_jax.train --config=configs/counting_polygons.py:small --workdir=runs/cp_small
CPU demo / tests (minutes on 2 cores; 32x32 patches, a tiny U-Net):
  python -m ipr_jax.train --config=configs/counting_polygons.py:tiny --workdir=runs/cp_tiny
Evaluate (the evaluation binary reads config.sampler, config.ipr and config.eval):
  python -m ipr_jax.evaluate --config=configs/counting_polygons.py:cp_test --workdir=runs/cp_ffhq_8

Preset argument: comma-separated tokens, at most one size (`tiny` | `small`; none = paper scale)
and at most one evaluation (`cp_test`, the default).
"""

import ml_collections
from ml_collections import config_dict

from ipr_jax.build import config_base

_SIZES = ("tiny", "small")
_EVALS = ("cp_test",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for preset string `arg` (see the module docstring)."""
  size, eval_name = config_base.parse_preset(arg, _SIZES, _EVALS, "cp_test")
  # Shared sections and their documentation: ipr_jax/build/config_base.py.
  config = config_base.base_config("counting_polygons", arg, unet_preset="unet_128")
  # Reference cp_ffhq_8: batch 56 on one GPU, 250,001 steps, lr 1e-4 (the defaults).

  # Image height = width in pixels (the task renders 128x128).
  config.data.image_size = 128
  # Image channels (RGB).
  config.data.channels = 3
  # Side of a square SRM patch in pixels (grid 16x16 = 256 patches).
  config.data.patch_size = 8
  # Seed of the circle layouts (train and test sets) and of the test images.
  config.data.seed = 0
  # Folder of background images (any subfolders; resized and centre-cropped to 128), e.g. FFHQ;
  # None: procedural backgrounds.
  config.data.background_dir = config_dict.placeholder(str)
  # Host workers rendering training batches ahead of the accelerator (one renders about 140
  # images/s on one CPU core; the trainer logs `input_wait` when they fall behind).
  config.data.render_workers = 8
  # Render in processes (each its own core) instead of threads (which share the GIL).
  config.data.render_processes = True
  # Training batches rendered ahead, per host.
  config.data.prefetch_batches = 8

  config.time_sampler.beta_sharpness = 0.5
  config.time_sampler.add_zeros = True

  # cp_test (spec §4.5): SRM 10 steps per patch at overlap 0.9, IPR the same, budget 30.
  config.sampler.steps_per_patch = 10
  config.sampler.overlap = 0.9
  config.ipr.steps_per_patch = 10
  config.ipr.overlap = 0.9
  config.eval.name = eval_name
  # Seed of the evaluation randomness (reference cp_test: 193).
  config.eval.seed = 193
  # Polygon scorer weights (.npz); None: the weights shipped in the package.
  config.eval.scorer_path = config_dict.placeholder(str)

  if size == "small":
    # A few hours on one H100-class GPU (estimate, not measured): narrower U-Net.
    config.batch_size = 32
    config.num_train_steps = 30_000
    config.checkpoint_every_steps = 2_000
    config.model.hid_dims = (64, 64, 128, 128, 256)
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 1_000
    config.eval.num_puzzles = 32
    config.eval.batch_size = 32
    config.ipr.budget = 10
  elif size == "tiny":
    # 32x32 patches (a 4x4 grid) and a tiny U-Net: minutes on 2 CPU cores; for tests and demos.
    config_base.use_tiny_model(config, hid_dims=(16, 32, 32), attention=(False, False, True))
    config.data.patch_size = 32
    config.data.render_workers = 1
    config.data.render_processes = False
    config.data.prefetch_batches = 2
    config.batch_size = 8
    config.num_train_steps = 100
    # 2 steps per patch need overlap <= 0.5 for distinct block starts (steps * (1 - overlap)
    # >= 1): 17 passes for the 16 patches.
    config.sampler.steps_per_patch = 2
    config.sampler.overlap = 0.5
    config.ipr.steps_per_patch = 2
    config.ipr.overlap = 0.5
    config.ipr.budget = 2
    config.eval.num_puzzles = 4
    config.eval.batch_size = 4
  return config
