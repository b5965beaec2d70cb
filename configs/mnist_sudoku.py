r"""MNIST Sudoku (9x9 grid of 28x28 MNIST digits): the reference's `ms1000_28` SRM and IPR tests.

Defaults are the reference's values (spec §3, §4.5, §5.1); presets shrink the run.

Train (paper scale, the reference's 2 GPUs x 28 = global batch 56, 250,001 steps):
  python -m ipr_jax.train --config=configs/mnist_sudoku.py --workdir=runs/ms1000_28
Single-GPU run of under an hour:
  python -m ipr_jax.train --config=configs/mnist_sudoku.py:small --workdir=runs/ms_small
CPU demo / tests: 4x4 Sudoku of 14x14 digits, tiny U-Net (minutes on 2 cores):
  python -m ipr_jax.train --config=configs/mnist_sudoku.py:tiny --workdir=runs/ms_tiny
Evaluate (the evaluation binary reads config.sampler, config.ipr and config.eval):
  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:ms_hard_test \
      --workdir=runs/ms1000_28
  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:tiny,ms_corrupted_test \
      --workdir=runs/ms_tiny
Override single fields (a misspelt name fails):
  python -m ipr_jax.train --config=configs/mnist_sudoku.py:tiny --config.batch_size=8 --workdir=/tmp/ms

Preset argument: comma-separated tokens, at most one size (`tiny` | `small`; none = paper scale)
and at most one evaluation (`ms_hard_test` (default) | `ms_medium_test` | `ms_easy_test` |
`ms_corrupted_test`).
"""

import ml_collections
from ml_collections import config_dict

_SIZES = ("tiny", "small")
_EVALS = ("ms_hard_test", "ms_medium_test", "ms_easy_test", "ms_corrupted_test")

# Number of given (clean) cells at test time, inclusive, per evaluation and grid. The 9x9 values
# are the reference's `num_fill` (hard [0, 26]; medium and easy from its comments; corrupted: all
# 81 given, spec §5.1); the 4x4 ones split the 16 cells the same way.
_GIVEN_RANGE = {
    3: {"ms_hard_test": (0, 26), "ms_medium_test": (27, 53), "ms_easy_test": (54, 80),
        "ms_corrupted_test": (81, 81)},
    2: {"ms_hard_test": (0, 5), "ms_medium_test": (6, 10), "ms_easy_test": (11, 15),
        "ms_corrupted_test": (16, 16)},
}


def _parse_arg(arg: str | None) -> tuple[str | None, str]:
  """Splits 'tiny,ms_hard_test' into (size, eval_name); unknown/repeated tokens raise ValueError."""
  size, eval_name = None, None
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    if token in _SIZES and size is None:
      size = token
    elif token in _EVALS and eval_name is None:
      eval_name = token
    else:
      raise ValueError(
          f"Unknown or repeated preset token {token!r} in {arg!r}; expected at most one of "
          f"{_SIZES} and at most one of {_EVALS}.")
  return size, eval_name or "ms_hard_test"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for preset string `arg` (see the module docstring)."""
  size, eval_name = _parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.task = "mnist_sudoku"
  # Preset tokens this config was built from (informational).
  config.preset = arg or ""

  # Root seed of model init and of every training random draw (data, times, noise, dropout).
  config.seed = 0
  # Global batch over all devices and hosts (reference: 28 per GPU x 2 GPUs).
  config.batch_size = 56
  # Optimizer steps (reference max_steps: 250,001).
  config.num_train_steps = 250_001
  # Save a checkpoint every this many steps (and always at the end or on SIGTERM).
  config.checkpoint_every_steps = 5_000
  # Keep the newest this many checkpoints.
  config.keep_checkpoints = 3
  # Print a progress line and append to metrics.jsonl every this many steps.
  config.log_every_steps = 100
  # Call jax.distributed.initialize() first (multi-host TPU pods / multi-node GPU); env-detected.
  config.distributed = False

  config.data = ml_collections.ConfigDict()
  # Sudoku box side: 3 gives the 9x9 Sudoku, 2 the 4x4 variant.
  config.data.box_size = 3
  # Side of one digit cell in pixels (MNIST: 28).
  config.data.cell_size = 28
  # Image height = width = box_size**2 * cell_size.
  config.data.image_size = 252
  # Image channels (grayscale).
  config.data.channels = 1
  # SRM patch side = one Sudoku cell.
  config.data.patch_size = 28
  # Digit bank: the top_n digits per class the classifier is most confident about, in the training
  # and in the held-out part. The reference's ms1000 keeps 1000 of ~6000 per class of MNIST-train
  # (use 1000 with digits_source='tfds'). The bundled source has ~800 training and ~200 held-out
  # digits per class: 100 keeps the confident half of the held-out part, so that a correct
  # solution also scores valid (with every digit kept, a per-cell accuracy of 99.1% makes only
  # about half of the correct 81-cell solutions score valid).
  config.data.top_n = 100
  # Where the digits come from: 'bundled' (package asset, offline) or 'tfds' (local MNIST).
  config.data.digits_source = "bundled"
  # Another .npz in the bundled format (digits_source='bundled'; None: the shipped file).
  config.data.digits_path = config_dict.placeholder(str)
  # tensorflow-datasets data_dir (digits_source='tfds'; None: the TFDS default).
  config.data.tfds_data_dir = config_dict.placeholder(str)
  # Seed of the solved-grid generation (grids are generated, not read from sudokus.npy).
  config.data.seed = 0
  # Base grids for training / testing (None: the data module's defaults).
  config.data.num_train_grids = config_dict.placeholder(int)
  config.data.num_test_grids = config_dict.placeholder(int)
  # Given cells per training puzzle, inclusive (reference: randint(0, 81)).
  config.data.train_given_range = (0, 80)

  # U-Net denoiser (spec §1), reference preset unet_256 (119M parameters).
  config.model = ml_collections.ConfigDict()
  # Reference preset name (informational; the fields below define the network).
  config.model.name = "unet_256"
  # Channels per resolution level.
  config.model.hid_dims = (128, 128, 256, 256, 512, 512)
  # Self-attention at each level.
  config.model.attention = (False, False, False, False, True, True)
  # ResBlocks per encoder level (the decoder has one more).
  config.model.num_blocks = 2
  # Width of the time-embedding MLP output.
  config.model.t_emb_dim = 512
  # Width of the sinusoidal time features.
  config.model.d_emb = 256
  # Channels per attention head.
  config.model.num_head_channels = 64
  # GroupNorm groups.
  config.model.num_groups = 32
  # Dropout inside ResBlocks during training.
  config.model.dropout = 0.1
  # Compute dtype; params stay float32 (reference: bf16-mixed).
  config.model.dtype = "bfloat16"

  # Per-patch time sampler (spec §3.1); given cells then get t = 0 and weight 0 (spec §3.2).
  config.time_sampler = ml_collections.ConfigDict()
  # Two-stage mean-then-recursive-Beta split.
  config.time_sampler.name = "mean_beta"
  # Scale of the Beta(a_n, a_n) parameters a_n = (n - 1 - n mod 2)^1.05 * sharpness.
  config.time_sampler.beta_sharpness = 1.0
  # No random zeroing: the given cells of the mask are the clean context.
  config.time_sampler.add_zeros = False
  # Time samples drawn for the loss-weight histogram (each gives N patch times).
  config.time_sampler.density_num_samples = 80_000
  # Histogram bins on [0, 1].
  config.time_sampler.density_num_bins = 1000
  # Gaussian smoothing of the histogram: odd kernel size and sigma in bins (reference: 5 and 0.2;
  # 0.2 is effectively no smoothing, spec §7.11).
  config.time_sampler.density_blur_kernel_size = 5
  config.time_sampler.density_blur_sigma = 0.2

  # Loss = mse + vlb_weight * vlb + sigma_nll_weight * sigma-NLL (spec §3.3).
  config.loss = ml_collections.ConfigDict()
  # Weight of the VLB term (learned-range variance; u detached).
  config.loss.vlb_weight = 1.0
  # Weight of the sigma NLL term (u detached).
  config.loss.sigma_nll_weight = 0.01
  # The VLB and sigma terms apply when step > this (reference apply_after_step).
  config.loss.aux_after_step = 0
  # VLB step size: s = t - vlb_time_step.
  config.loss.vlb_time_step = 1e-3
  # s below this counts as 0 (discretized NLL branch).
  config.loss.time_eps = 1e-5

  # AdamW with linear warm-up, global-norm clipping and an EMA (spec §3.4).
  config.optim = ml_collections.ConfigDict()
  # Peak learning rate.
  config.optim.learning_rate = 1e-4
  # Adam betas.
  config.optim.b1 = 0.95
  config.optim.b2 = 0.999
  # Adam epsilon; None derives it like the reference: 1e-7 under bf16, 1e-8 in float32.
  config.optim.eps = config_dict.placeholder(float)
  # Decoupled weight decay, applied to all parameters.
  config.optim.weight_decay = 1e-6
  # The learning rate ramps linearly from warmup_start_factor * lr over warmup_steps.
  config.optim.warmup_steps = 5_000
  config.optim.warmup_start_factor = 2e-4
  # Global L2 gradient-norm clip.
  config.optim.grad_clip_norm = 1.0
  # EMA decay (first update copies the weights).
  config.optim.ema_decay = 0.9999

  # SRM greedy sampler (spec §4.4), ms_hard_test values.
  config.sampler = ml_collections.ConfigDict()
  # Denoising steps each patch takes.
  config.sampler.steps_per_patch = 3
  # Overlap of consecutive patches' denoising blocks, in [0, 1).
  config.sampler.overlap = 0.0
  # Reverse-kernel stochasticity alpha.
  config.sampler.stochasticity = 0.5
  # Reverse-kernel temperature.
  config.sampler.temperature = 1.0
  # Patches selected per selection step.
  config.sampler.top_k = 1
  # False: reproduce the reference's float32 schedule arithmetic (spec §4.3); True: exact.
  config.sampler.clean_schedule = False

  # Iterative Partial Refinement (spec §4.5), ms_hard_test values.
  config.ipr = ml_collections.ConfigDict()
  # Refinement iterations.
  config.ipr.budget = 30
  # Denoising steps per re-noised patch.
  config.ipr.steps_per_patch = 10
  # Block overlap of the re-noised patches.
  config.ipr.overlap = 0.8
  # Fraction of candidate patches re-noised per iteration.
  config.ipr.resampling_ratio = 0.25
  # 'random': fresh noise; 'fixed': the initial noise of the patch (ablation).
  config.ipr.noise_type = "random"
  # 'standard' (SRM pass, then refine) or 'correction' (refine a corrupted solution).
  config.ipr.mode = "standard"
  # Cell swaps that corrupt a solution in 'correction' mode.
  config.ipr.num_corruption_swaps = 5
  # Stop refining once the task check passes (reference: False).
  config.ipr.immediate_stop = False

  # Evaluation run (spec §4.5, §5.1, §5.4).
  config.eval = ml_collections.ConfigDict()
  # Name of the evaluation preset.
  config.eval.name = eval_name
  # Puzzles solved (the reference yaml runs 1, spec §7.2).
  config.eval.num_puzzles = 100
  # Puzzles per sampler call.
  config.eval.batch_size = 100
  # Seed of the evaluation randomness (reference ms_hard_test: 35).
  config.eval.seed = 35
  # Given cells per test puzzle, inclusive (min, max), drawn uniformly.
  config.eval.given_range = _GIVEN_RANGE[3][eval_name]
  # Sample with the EMA weights (reference use_ema: true).
  config.eval.use_ema = True
  # Puzzles shown in ipr_process.png (the first ones of the first batch).
  config.eval.num_plot_puzzles = 4
  # Digit classifier weights (.npz) of the Sudoku metric; None: the weights shipped in the package.
  config.eval.classifier_path = config_dict.placeholder(str)

  if eval_name == "ms_corrupted_test":
    # Reference ms_corrupted_test: all cells given, 5 swaps, then 15 refinement iterations.
    config.eval.seed = 4
    config.ipr.budget = 15
    config.ipr.mode = "correction"

  if size == "small":
    # Under an hour on one H100-class GPU (estimate, not measured): narrower U-Net.
    config.batch_size = 32
    config.num_train_steps = 10_000
    config.checkpoint_every_steps = 1_000
    config.model.hid_dims = (64, 64, 128, 128, 256, 256)
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 500
    config.eval.num_puzzles = 32
    config.eval.batch_size = 32
    config.ipr.budget = min(config.ipr.budget, 10)
  elif size == "tiny":
    # 4x4 Sudoku of 14x14 digits (56x56 images, 16 patches): minutes on 2 CPU cores.
    config.data.box_size = 2
    config.data.cell_size = 14
    config.data.image_size = 56
    config.data.patch_size = 14
    config.data.train_given_range = (0, 15)
    config.batch_size = 16
    config.num_train_steps = 300
    config.checkpoint_every_steps = 100
    config.log_every_steps = 25
    config.model.name = "tiny"
    config.model.hid_dims = (32, 32, 32)
    config.model.attention = (False, False, True)
    config.model.num_blocks = 1
    config.model.t_emb_dim = 64
    config.model.d_emb = 32
    config.model.num_head_channels = 32
    config.model.num_groups = 8
    config.model.dtype = "float32"
    config.time_sampler.density_num_samples = 10_000
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 50
    config.optim.ema_decay = 0.99
    config.ipr.budget = 3
    config.ipr.num_corruption_swaps = 2
    config.eval.given_range = _GIVEN_RANGE[2][eval_name]
    config.eval.num_puzzles = 8
    config.eval.batch_size = 8
  return config
