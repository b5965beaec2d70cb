r"""MNIST Sudoku (9x9 grid of 28x28 MNIST digits): the reference's `ms1000_28` SRM and IPR tests.

Defaults are the reference's values (spec §3, §4.5, §5.1); presets shrink the run.

Train (paper scale, the reference's 2 GPUs x 28 = global batch 56, 250,001 steps):
  python -m ipr_jax.train --config=configs/mnist_sudoku.py --workdir=runs/ms1000_28
Single-GPU run of under an hour:
  python -m ipr_jax.train --config=configs/mnist_sudoku.py:small --workdir=runs/ms_small
The shipped demo model (4x4 Sudoku of 7x7 digits; no training needed):
  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:demo --workdir=runs/demo
Train your own demo model (the shipped one's recipe) and evaluate it:
  python -m ipr_jax.train --config=configs/mnist_sudoku.py:demo --workdir=runs/my_demo
  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:demo --workdir=runs/my_demo \
      --checkpoint=runs/my_demo
The paper's 9x9 puzzle at 7 px cells (63x63 images), sized for one accelerator call
(docs/nine_by_nine.md; experiments/device/train_demo9.py is that call; no model is shipped yet):
  python -m ipr_jax.train --config=configs/mnist_sudoku.py:demo9 --workdir=runs/demo9 \
      --checkpoint_every_s=60
  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:demo9 --workdir=runs/demo9
Tests: 4x4 Sudoku of 14x14 digits, tiny U-Net (minutes on 2 cores):
  python -m ipr_jax.train --config=configs/mnist_sudoku.py:tiny --workdir=runs/ms_tiny
Evaluate (the evaluation binary reads config.sampler, config.ipr and config.eval):
  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:ms_hard_test \
      --workdir=runs/ms1000_28
  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:tiny,ms_corrupted_test \
      --workdir=runs/ms_tiny
Override single fields (a misspelt name fails):
  python -m ipr_jax.train --config=configs/mnist_sudoku.py:tiny --config.batch_size=8 \
      --workdir=/tmp/ms

Preset argument: comma-separated tokens, at most one size (`demo` | `demo9` | `demo9_tiny` |
`tiny` | `small`; none = paper scale)
and at most one evaluation (`ms_hard_test` (default) | `ms_medium_test` | `ms_easy_test` |
`ms_corrupted_test` | `ms_unique_test`). `ms_unique_test` (4x4 presets `demo` and `tiny` only):
hard puzzles with exactly one solution, a minimal uniquely solvable set of 4-6 given cells
(`ipr_jax.data.sudoku.minimal_unique_masks`), the 4x4 analogue of the "extreme" split of later
work; it adds the field `eval.unique_solution` (True).

The SRM reference's sampler tests (Chrixtar/SRM config/test/ms_hard_*.yaml) as evaluations of
hard puzzles: `ms_hard_fixed`, `ms_hard_random_seq000`, `ms_hard_random_seq075`,
`ms_hard_graph_seq000`, `ms_hard_graph_seq075`, `ms_hard_seq_adaptive000`,
`ms_hard_seq_adaptive075`, and the `_ddim` (alpha 0) forms of fixed, graph_seq and seq_adaptive.
They set the SRM pass's schedule (config.sampler.schedule, overlap, max_order; 9x9: alpha 1 and
1000 steps as the reference); IPR (config.ipr) stays ms_hard_test's (`--config.ipr.budget=0` for
SRM alone). The 4x4 forms (`demo,ms_hard_fixed`, ...) keep the preset's steps (see
`_use_sampler_test`):
  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:demo,ms_hard_graph_seq000 \
      --workdir=runs/demo
"""

import ml_collections
from ml_collections import config_dict

from ipr_jax.build import config_base

_SIZES = ("demo", "demo9", "demo9_tiny", "tiny", "small")
# Steps the shipped demo model was trained for (ipr_jax/assets/mnist_sudoku_demo.npz).
DEMO_TRAIN_STEPS = 20494
# The SRM reference's sampler test configs (Chrixtar/SRM config/test/ms_hard_<name>.yaml, with
# config/sampler/*.yaml): hard puzzles, SRM with the named schedule, alpha 1 (0 for _ddim), 1000
# steps; graph_seq: max_order 1, random_seq: max_order 0; 000 / 075: overlap 0 / 0.75.
# name -> (schedule, overlap, max_order).
_SRM_SAMPLER_TESTS = {
    "fixed": ("fixed", 0.0, 1),
    "random_seq000": ("random_sequential", 0.0, 0),
    "random_seq075": ("random_sequential", 0.75, 0),
    "graph_seq000": ("graph_sequential", 0.0, 1),
    "graph_seq075": ("graph_sequential", 0.75, 1),
    "seq_adaptive000": ("adaptive", 0.0, 1),
    "seq_adaptive075": ("adaptive", 0.75, 1),
}
_SRM_DDIM_TESTS = ("fixed", "graph_seq000", "graph_seq075", "seq_adaptive000", "seq_adaptive075")
SAMPLER_TESTS = tuple(f"ms_hard_{name}" for name in _SRM_SAMPLER_TESTS) + tuple(
    f"ms_hard_{name}_ddim" for name in _SRM_DDIM_TESTS
)
_EVALS = (
    "ms_hard_test",
    "ms_medium_test",
    "ms_easy_test",
    "ms_corrupted_test",
    "ms_unique_test",
) + SAMPLER_TESTS

# Number of given (clean) cells at test time, inclusive, per evaluation and grid. The 9x9 values
# are the reference's `num_fill` (hard [0, 26]; medium and easy from its comments; corrupted: all
# 81 given, spec §5.1); the 4x4 ones split the 16 cells the same way.
_GIVEN_RANGE = {
    3: {
        "ms_hard_test": (0, 26),
        "ms_medium_test": (27, 53),
        "ms_easy_test": (54, 80),
        "ms_corrupted_test": (81, 81),
    },
    2: {
        "ms_hard_test": (0, 5),
        "ms_medium_test": (6, 10),
        "ms_easy_test": (11, 15),
        "ms_corrupted_test": (16, 16),
        # Minimal uniquely solvable puzzles have 4-6 given cells (4x4 only); the evaluation
        # refuses a puzzle outside this range.
        "ms_unique_test": (4, 6),
    },
}


def _use_four_by_four(config: ml_collections.ConfigDict, cell_size: int, eval_name: str) -> None:
  """4x4 Sudoku (digits 1-4) of `cell_size`-pixel cells and the tiny U-Net, for CPU runs."""
  config.data.box_size = 2
  config.data.cell_size = cell_size
  config.data.image_size = 4 * cell_size
  config.data.patch_size = cell_size
  config.data.train_given_range = (0, 15)
  config_base.use_tiny_model(config, hid_dims=(32, 32, 32), attention=(False, False, True))
  config.ipr.num_corruption_swaps = 2
  config.eval.given_range = _GIVEN_RANGE[2][_given_range_name(eval_name)]


def _use_nine_by_nine_demo(config: ml_collections.ConfigDict, tiny: bool) -> None:
  """The paper's 9x9 Sudoku at 7 px cells (63x63 images, 81 patches): `demo9` and its test form.

  The recipe and the costs it was chosen from: docs/nine_by_nine.md. The digits of both banks are
  the 100 per class that the 7 px classifier reads most surely (`data.digit_ranking`): with the
  shipped 28 px ranking only 7.2% of 1,000 correct 9x9 solutions score valid at 7 px, with this
  one all of them do.
  """
  config.data.cell_size = 7
  config.data.image_size = 63
  config.data.patch_size = 7
  # Which classifier ranks the digits for top_n: 'shipped' (the 28 px one, as shipped data) or
  # 'cell_classifier' (the metric's classifier for data.cell_size). Only this preset has the
  # field, so that other runs' settings stay as they were.
  config.data.digit_ranking = "cell_classifier"
  config_base.use_tiny_model(config, hid_dims=(32, 32, 32), attention=(False, False, True))
  config.optim.ema_decay = 0.999
  config.checkpoint_every_steps = 1_000
  config.log_every_steps = 100
  config.eval.num_puzzles = 1_000
  config.eval.batch_size = 250
  if tiny:
    # The suite's form: the same task and U-Net, seconds of training.
    config.batch_size = 8
    config.num_train_steps = 20
    config.checkpoint_every_steps = 10
    config.log_every_steps = 5
    config.ipr.budget = 2
    config.eval.num_puzzles = 4
    config.eval.batch_size = 4
  else:
    config.batch_size = 64
    config.num_train_steps = 20_000


def _given_range_name(eval_name: str) -> str:
  """The split whose given cells an evaluation uses (the sampler tests: hard)."""
  return "ms_hard_test" if eval_name in SAMPLER_TESTS else eval_name


def _use_sampler_test(config: ml_collections.ConfigDict, eval_name: str, four_by_four: bool):
  """The SRM schedule of a sampler test `ms_hard_<name>[_ddim]`.

  9x9: the reference's settings (alpha 1, or 0 for _ddim; max_steps 1000). 4x4 (demo, tiny):
  only the schedule, its overlap and max_order (and alpha 0 for _ddim); the steps stay the
  preset's 3 per patch, at overlap 0.75 12 per patch with a new patch every 3 steps (about the
  same passes: 3n + 9 for n unknown cells instead of 3n), so that the schedules compare at
  (nearly) equal passes on the shipped model.
  """
  name = eval_name[len("ms_hard_") :]
  ddim = name.endswith("_ddim")
  schedule, overlap, max_order = _SRM_SAMPLER_TESTS[name.removesuffix("_ddim")]
  config.sampler.schedule = schedule
  config.sampler.overlap = overlap
  config.sampler.max_order = max_order
  if four_by_four:
    if overlap:
      config.sampler.steps_per_patch = 12
  else:
    config.sampler.stochasticity = 1.0
    config.sampler.max_steps = 1000
  if ddim:
    config.sampler.stochasticity = 0.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The config for preset string `arg` (see the module docstring)."""
  size, eval_name = config_base.parse_preset(arg, _SIZES, _EVALS, "ms_hard_test")
  if eval_name == "ms_unique_test" and size not in ("demo", "tiny"):
    raise ValueError(
        f"preset {arg!r}: ms_unique_test needs a 4x4 preset (demo or tiny); "
        "uniqueness is checked against all 288 solved 4x4 grids"
    )
  # Shared sections and their documentation: ipr_jax/build/config_base.py.
  config = config_base.base_config("mnist_sudoku", arg, unet_preset="unet_256")
  # Reference ms1000_28: 28 per GPU x 2 GPUs = global batch 56, 250,001 steps (the defaults).

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

  # Given cells get t = 0 and weight 0 (spec §3.2); no random zeroing on top of them.
  config.time_sampler.beta_sharpness = 1.0
  config.time_sampler.add_zeros = False

  # ms_hard_test (spec §4.5): 3 steps per cell without overlap, IPR 10 steps at overlap 0.8.
  config.sampler.steps_per_patch = 3
  config.sampler.overlap = 0.0
  config.ipr.overlap = 0.8
  config.eval.name = eval_name
  # Seed of the evaluation randomness (reference ms_hard_test: 35).
  config.eval.seed = 35
  # Given cells per test puzzle, inclusive (min, max), drawn uniformly.
  # (ms_unique_test exists for 4x4 only: its range is set by _use_four_by_four.)
  config.eval.given_range = _GIVEN_RANGE[3].get(
      _given_range_name(eval_name), _GIVEN_RANGE[3]["ms_hard_test"]
  )
  # Digit classifier weights (.npz) of the Sudoku metric; None: the weights shipped in the package.
  config.eval.classifier_path = config_dict.placeholder(str)

  if eval_name == "ms_unique_test":
    # Only this preset has the field, so that other runs' settings stay as they were.
    config.eval.unique_solution = True
  if eval_name == "ms_corrupted_test":
    # Reference ms_corrupted_test: all cells given, 5 swaps, then 15 refinement iterations.
    config.eval.seed = 4
    config.ipr.budget = 15
    config.ipr.mode = "correction"

  if eval_name in SAMPLER_TESTS:
    _use_sampler_test(config, eval_name, four_by_four=size in ("demo", "tiny"))

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
  elif size == "demo":
    # The shipped demo model (`ipr_jax.build.pretrained.load("mnist_sudoku_demo")`) and its recipe:
    # 4x4 Sudoku of 7x7 digits (28x28 images, 16 patches), the tiny U-Net. 7 px cells make the
    # U-Net about 4x faster than 14 px ones on a CPU (measured: 147 vs 38 images/s on 2 cores),
    # which lets the demo evaluate 128 puzzles at budgets 0..10 in minutes; the metric reads
    # them with a classifier fine-tuned on 7 px digits (chosen by the cell size).
    _use_four_by_four(config, cell_size=7, eval_name=eval_name)
    config.batch_size = 32
    config.num_train_steps = DEMO_TRAIN_STEPS
    config.optim.ema_decay = 0.999
    config.checkpoint_every_steps = 250
    config.log_every_steps = 50
    config.ipr.budget = 10
    config.eval.num_puzzles = 128
    config.eval.batch_size = 64
    config.eval.pretrained = "mnist_sudoku_demo"
  elif size in ("demo9", "demo9_tiny"):
    _use_nine_by_nine_demo(config, tiny=size == "demo9_tiny")
  elif size == "tiny":
    # 4x4 Sudoku of 14x14 digits (56x56 images, 16 patches): minutes on 2 CPU cores.
    _use_four_by_four(config, cell_size=14, eval_name=eval_name)
    config.batch_size = 16
    config.num_train_steps = 300
    config.ipr.budget = 3
    config.eval.num_puzzles = 8
    config.eval.batch_size = 8
  return config
