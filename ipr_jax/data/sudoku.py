"""MNIST Sudoku puzzle batches (spec §5.1), built on device under jit.

A batch is a dict:
* 'image': float32 [B, H, W, 1] in [-1, 1], the solved grid drawn with MNIST digits (white on a -1
  background), H = W = n * cell_size (252 for 9x9 with 28-pixel cells);
* 'mask': float32 [B, H, W, 1], 1 = cell to generate, 0 = given, constant over each cell;
* 'cell_mask': bool [B, n*n], True = unknown, cells in row-major order;
* 'grid': int32 [B, n, n], the solution's digits 1..n;
* 'num_given': int32 [B], the number of given cells.

Given-cell counts are uniform integers in an inclusive range: training U{0..n*n-1} (U{0..80} for
9x9, as the reference); test difficulties by name (`difficulty_range`): hard [0, 26], medium
[27, 53], easy [54, 80] for 9x9. For 4x4 (16 cells) the same thirds of 0..15 are used: hard [0, 5],
medium [6, 10], easy [11, 15]. `(n*n, n*n)` (everything given) is allowed too.

Uniquely solvable test puzzles (`test_batch(..., unique_solution=True)`, 4x4 only): the given
cells are a minimal set that leaves exactly one solution, found by removing cells from the full
grid in the puzzle's random cell order whenever the rest still has a single completion among all
288 solved 4x4 grids (`minimal_unique_masks`). They have 4-6 given cells (about 64% / 35% /
0.5% with 4 / 5 / 6), the hardest puzzles with one solution: the 4x4 analogue of the "extreme"
split of later work.

Usage::

  task = make_sudoku_task(box_size=3, cell_size=28, seed=0)
  batch = task.train_batch(jax.random.key(0), 32)                   # jitted, on device
  hard = task.test_batch(seed=0, indices=jnp.arange(100), given_range='hard')

Inside pmap, pass the task as an argument (it is a pytree of arrays) rather than closing over it,
so the digit bank is not baked into the compiled program as a constant:
`jax.pmap(lambda task, key: task.train_batch(key, per_device), in_axes=(None, 0))`.

Deviations from the reference, on purpose: grids are generated (`sudoku_grids`) instead of read
from `sudokus.npy`; randomness is JAX's counter-based PRNG instead of numpy's, so test puzzle i is a
pure function of (task, seed, i) but not the reference's puzzle i; test puzzles use held-out digits
(the reference draws test digits from the same top-1000 MNIST-train bank as training).
"""

import functools
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp

from ipr_jax.data import digits as digits_lib
from ipr_jax.data import sudoku_grids
from ipr_jax.runtime import errors

DIFFICULTIES = ("hard", "medium", "easy")


def difficulty_range(name: str, box_size: int = 3) -> tuple[int, int]:
  """Inclusive given-cell range of a test difficulty: thirds of 0..n*n-1.

  9x9: hard (0, 26), medium (27, 53), easy (54, 80) as in the reference's eval configs;
  4x4: hard (0, 5), medium (6, 10), easy (11, 15).
  """
  last = (sudoku_grids.check_box_size(box_size) ** 2) ** 2 - 1
  first_cut, second_cut = last // 3, 2 * last // 3
  ranges = {
      "hard": (0, first_cut),
      "medium": (first_cut + 1, second_cut),
      "easy": (second_cut + 1, last),
  }
  if name not in ranges:
    raise errors.ConfigError(f"difficulty {name!r}: expected one of {DIFFICULTIES}")
  return ranges[name]


def check_given_range(given_range, box_size: int = 3) -> tuple[int, int]:
  """Validates a given-cell range: a difficulty name or an inclusive pair 0 <= lo <= hi <= n*n."""
  if isinstance(given_range, str):
    return difficulty_range(given_range, box_size)
  num_cells = (sudoku_grids.check_box_size(box_size) ** 2) ** 2
  try:
    lo, hi = given_range
    lo, hi = int(lo), int(hi)
    ok = (lo, hi) == tuple(given_range)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise errors.ConfigError(
        f"given_range={given_range!r}: expected a difficulty name {DIFFICULTIES} or "
        "a pair of integers (lo, hi)"
    )
  if not 0 <= lo <= hi <= num_cells:
    raise errors.ConfigError(
        f"given_range={given_range!r}: need 0 <= lo <= hi <= {num_cells} (the number " "of cells)"
    )
  return lo, hi


def uniform_integers(uniforms: jax.Array, low, high) -> jax.Array:
  """int32 uniform on {low, ..., high} (inclusive) from uniforms in [0, 1): low + floor(u * span).

  float32 resolution makes the bias negligible for the small ranges used here.
  """
  span = jnp.asarray(high, jnp.int32) - jnp.asarray(low, jnp.int32) + 1
  return low + jnp.minimum(jnp.floor(uniforms * span).astype(jnp.int32), span - 1)


def render_grids_from_uniforms(
    grids: jax.Array, bank: digits_lib.DigitBank, uniforms: jax.Array
) -> jax.Array:
  """Draws each cell's digit with the bank image of that digit that `uniforms` selects.

  Args:
    grids: int [B, n, n] digits (0..9).
    bank: DigitBank with tiles of side c.
    uniforms: [B, n, n] in [0, 1); cell (r, c) shows image floor(u * count) of its digit.

  Returns:
    float32 [B, n*c, n*c, 1] in [-1, 1].
  """
  grids = jnp.asarray(grids, jnp.int32)
  batch, n, _ = grids.shape
  tiles = bank.gather(grids, bank.indices_from_uniforms(uniforms, grids))  # [B, n, n, c, c]
  c = tiles.shape[-1]
  image = tiles.transpose(0, 1, 3, 2, 4).reshape(batch, n * c, n * c, 1)
  return digits_lib.to_unit_range(image)


def render_grids(key: jax.Array, grids: jax.Array, bank: digits_lib.DigitBank) -> jax.Array:
  """Draws each cell's digit with a random image of that digit: float32 [B, n*c, n*c, 1]."""
  return render_grids_from_uniforms(grids, bank, jax.random.uniform(key, jnp.shape(grids)))


def given_masks_from_uniforms(uniforms: jax.Array, num_given: jax.Array) -> jax.Array:
  """bool [B, N] (True = unknown): the num_given[b] cells of smallest uniforms[b] are given."""
  rank = jnp.argsort(jnp.argsort(uniforms, axis=-1), axis=-1)  # rank[b, cell]
  return rank >= num_given[:, None]


def random_given_masks(key: jax.Array, num_given: jax.Array, num_cells: int) -> jax.Array:
  """bool [B, num_cells], True = unknown, with exactly num_given[b] given (False) random cells."""
  return given_masks_from_uniforms(
      jax.random.uniform(key, (*num_given.shape, num_cells)), num_given
  )


def minimal_unique_masks(
    grids: jax.Array, order_uniforms: jax.Array, solutions: jax.Array
) -> jax.Array:
  """bool [B, N] (True = unknown): minimal given sets with exactly one completion.

  Starting from the full grid, the cells are visited in decreasing order of `order_uniforms` (the
  order in which `given_masks_from_uniforms` stops giving them) and a cell is removed when the
  cells still given match exactly one grid of `solutions`.

  Args:
    grids: int [B, n, n] solution grids, each one of `solutions`.
    order_uniforms: [B, N] the cell order, N = n * n.
    solutions: int [S, n, n] every solved grid (4x4: `sudoku_grids.all_solved_grids(2)`).
  """
  batch = grids.shape[0]
  flat = jnp.asarray(grids, jnp.int32).reshape(batch, -1)
  solutions = jnp.asarray(solutions, jnp.int32).reshape(solutions.shape[0], -1)
  order = jnp.argsort(-order_uniforms, axis=-1)

  def one(grid, cell_order):
    agrees = solutions == grid[None]  # [S, N]: does solution s agree with this grid at cell i

    def visit(given, cell):
      trial = given.at[cell].set(False)
      completions = jnp.all(agrees | ~trial[None], axis=1).sum()
      return jnp.where(completions == 1, trial, given), None

    given, _ = jax.lax.scan(visit, jnp.ones(grid.shape, bool), cell_order)
    return ~given

  return jax.vmap(one)(flat, order)


def cell_mask_to_image(cell_mask: jax.Array, n: int, cell_size: int) -> jax.Array:
  """bool [B, n*n] (True = unknown) -> float32 [B, n*c, n*c, 1] (1 = unknown), cell-constant."""
  grid = cell_mask.reshape(-1, n, n).astype(jnp.float32)
  return jnp.repeat(jnp.repeat(grid, cell_size, axis=1), cell_size, axis=2)[..., None]


def make_puzzles(
    key: jax.Array, grids: jax.Array, bank: digits_lib.DigitBank, num_given: jax.Array
) -> dict[str, jax.Array]:
  """A batch dict (see the module docstring) for given solution grids and given-cell counts."""
  grids = jnp.asarray(grids, jnp.int32)
  n = grids.shape[1]
  uniforms = jax.random.uniform(key, (grids.shape[0], 2, n * n))
  return _puzzles(grids, bank, jnp.asarray(num_given, jnp.int32), uniforms[:, 0], uniforms[:, 1])


def _puzzles(grids, bank, num_given, digit_uniforms, cell_uniforms, solutions=None):
  """`solutions` [S, n, n] (all solved grids): minimal uniquely solvable givens instead of
  `num_given` random ones."""
  batch, n, _ = grids.shape
  if solutions is None:
    cell_mask = given_masks_from_uniforms(cell_uniforms, num_given)
  else:
    cell_mask = minimal_unique_masks(grids, cell_uniforms, solutions)
    num_given = n * n - cell_mask.sum(axis=-1, dtype=jnp.int32)
  return {
      "image": render_grids_from_uniforms(grids, bank, digit_uniforms.reshape(batch, n, n)),
      "mask": cell_mask_to_image(cell_mask, n, bank.cell_size),
      "cell_mask": cell_mask,
      "grid": grids,
      "num_given": num_given,
  }


@flax.struct.dataclass
class SudokuTask:
  """Everything needed to draw MNIST Sudoku batches on device; a pytree (jit/pmap argument).

  Build it with `make_sudoku_task`. Training puzzles use the training grids and the training
  digits; test puzzles use the test grids and the held-out digits.

  Attributes:
    train_digits: DigitBank of the training digits.
    test_digits: DigitBank of the held-out digits.
    train_grids: int8 [Ntr, n, n] training base grids.
    test_grids: int8 [Nte, n, n] test base grids.
    box_size: 3 (9x9) or 2 (4x4).
    transform_grids: apply a random Sudoku-group element to each base grid (9x9).
    train_given_range: inclusive given-count range of training puzzles.
  """

  train_digits: digits_lib.DigitBank
  test_digits: digits_lib.DigitBank
  train_grids: jax.Array
  test_grids: jax.Array
  box_size: int = flax.struct.field(pytree_node=False, default=3)
  transform_grids: bool = flax.struct.field(pytree_node=False, default=True)
  train_given_range: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 80))

  @property
  def grid_size(self) -> int:
    """n, the number of cells per row."""
    return self.box_size * self.box_size

  @property
  def cell_size(self) -> int:
    return self.train_digits.cell_size

  @property
  def image_size(self) -> int:
    return self.grid_size * self.cell_size

  @property
  def _uniforms_per_puzzle(self) -> int:
    # base grid, given count, digit images (n*n), given cells (n*n), group element.
    return 2 + 2 * self.grid_size**2 + sudoku_grids.group_uniforms_size(self.box_size)

  def _grids_from_uniforms(self, base_grids, uniforms):
    """int32 [B, n, n]: the solution grid of each row of uniforms."""
    base_index = uniform_integers(uniforms[:, 0], 0, base_grids.shape[0] - 1)
    grids = jnp.asarray(base_grids, jnp.int32)[base_index]
    if self.transform_grids:
      nn = self.grid_size**2
      grids = sudoku_grids.apply_group_element(grids, uniforms[:, 2 + 2 * nn :], self.box_size)
    return grids

  def _puzzles_from_uniforms(self, base_grids, bank, uniforms, lo, hi, unique_solution=False):
    """Puzzles from one row of uniforms each (all randomness drawn at once: small programs)."""
    nn = self.grid_size**2
    num_given = uniform_integers(uniforms[:, 1], lo, hi)
    grids = self._grids_from_uniforms(base_grids, uniforms)
    solutions = sudoku_grids.all_solved_grids(self.box_size) if unique_solution else None
    return _puzzles(
        grids, bank, num_given, uniforms[:, 2 : 2 + nn], uniforms[:, 2 + nn : 2 + 2 * nn], solutions
    )

  @functools.partial(jax.jit, static_argnames="batch_size")
  def train_batch(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    """A random training batch (pure function of the key).

    Args:
      key: PRNG key.
      batch_size: B (static).

    Returns:
      the batch dict of the module docstring.
    """
    uniforms = jax.random.uniform(key, (batch_size, self._uniforms_per_puzzle))
    lo, hi = self.train_given_range
    return self._puzzles_from_uniforms(self.train_grids, self.train_digits, uniforms, lo, hi)

  def test_batch(
      self, seed: int | jax.Array, indices, given_range="hard", unique_solution: bool = False
  ) -> dict[str, jax.Array]:
    """Test puzzles `indices`: puzzle i is a pure function of (task, seed, i, given_range).

    The grid and the digit images of puzzle i do not depend on the given range; its given count
    and given cells do.

    Args:
      seed: integer seed of the test set.
      indices: int [B] puzzle indices (any non-negative integers).
      given_range: 'hard' | 'medium' | 'easy' or an inclusive (lo, hi) pair of given-cell counts
        (ignored with `unique_solution`).
      unique_solution: 4x4 only: minimal uniquely solvable givens (`minimal_unique_masks`)
        instead of a random given count from `given_range`.

    Returns:
      the batch dict of the module docstring.
    """
    lo, hi = check_given_range(given_range, self.box_size)
    indices = self._check_test_request(indices, unique_solution)
    return self._test_batch(
        jnp.asarray(seed, jnp.uint32), indices, jnp.int32(lo), jnp.int32(hi), bool(unique_solution)
    )

  def test_given_counts(
      self, seed: int | jax.Array, indices, given_range="hard", unique_solution: bool = False
  ) -> jax.Array:
    """int32 [B] the given-cell counts of test puzzles `indices`, as `test_batch` draws them,
    without rendering the puzzles (cheap enough for a whole test set)."""
    lo, hi = check_given_range(given_range, self.box_size)
    indices = self._check_test_request(indices, unique_solution)
    seed = jnp.asarray(seed, jnp.uint32)
    if unique_solution:
      return self._unique_given_counts(seed, indices)
    uniforms = self._test_uniforms(seed, indices)
    return uniform_integers(uniforms[:, 1], jnp.int32(lo), jnp.int32(hi))

  def _check_test_request(self, indices, unique_solution: bool) -> jax.Array:
    if unique_solution and self.box_size != 2:
      raise errors.ConfigError(
          f"unique_solution=True needs 4x4 Sudoku (box_size=2), got box_size="
          f"{self.box_size}: uniqueness is checked against all 288 4x4 grids"
      )
    indices = jnp.asarray(indices, jnp.int32)
    if indices.ndim != 1:
      raise ValueError(f"indices shape {indices.shape}: expected [B]")
    return indices

  @jax.jit
  def _unique_given_counts(self, seed, indices):
    uniforms = self._test_uniforms(seed, indices)
    nn = self.grid_size**2
    grids = self._grids_from_uniforms(self.test_grids, uniforms)
    masks = minimal_unique_masks(
        grids, uniforms[:, 2 + nn : 2 + 2 * nn], sudoku_grids.all_solved_grids(self.box_size)
    )
    return nn - masks.sum(axis=-1, dtype=jnp.int32)

  @jax.jit
  def _test_uniforms(self, seed, indices):
    root = jax.random.key(seed)
    return jax.vmap(
        lambda i: jax.random.uniform(jax.random.fold_in(root, i), (self._uniforms_per_puzzle,))
    )(indices)

  @functools.partial(jax.jit, static_argnums=5)
  def _test_batch(self, seed, indices, lo, hi, unique_solution):
    uniforms = self._test_uniforms(seed, indices)
    return self._puzzles_from_uniforms(
        self.test_grids, self.test_digits, uniforms, lo, hi, unique_solution
    )


def make_sudoku_task(
    box_size: int = 3,
    cell_size: int = 28,
    digits_source: str = "bundled",
    top_n: int | None = None,
    seed: int = 0,
    train_given_range: tuple[int, int] | None = None,
    num_train_grids: int | None = None,
    num_test_grids: int | None = None,
    digits_path: str | None = None,
    tfds_data_dir: str | None = None,
    digit_confidence: digits_lib.ConfidenceFn | None = None,
) -> SudokuTask:
  """Builds a SudokuTask from config-like arguments (host work: a few seconds for 9x9).

  Args:
    box_size: 3 for 9x9 Sudoku (252x252 images at cell_size 28), 2 for 4x4 (digits 1-4).
    cell_size: 28, or 14 (digits box-averaged 2x down).
    digits_source: 'bundled' (offline default) or 'tfds'.
    top_n: if set, keep only the top-N digits per class by classifier confidence (the reference's
      ms1000 uses 1000 from MNIST-train), in both the training and the held-out part.
    seed: seed of the grid generation.
    train_given_range: inclusive given-count range of training puzzles; default (0, n*n-1).
    num_train_grids, num_test_grids: numbers of base grids (see `sudoku_grids.make_grid_sets`).
    digits_path: bundled source only: another .npz in the bundled format.
    tfds_data_dir: tfds source only.
    digit_confidence: the confidence that ranks the digits for top-N (`digits.load_digit_bank`;
      default: the shipped ranking of the bundled digits).

  Returns:
    SudokuTask whose arrays are on the default device.
  """
  sudoku_grids.check_box_size(box_size)
  n = box_size * box_size
  train_given_range = (0, n * n - 1) if train_given_range is None else train_given_range
  train_given_range = check_given_range(train_given_range, box_size)
  grids = sudoku_grids.make_grid_sets(seed, box_size, num_train_grids, num_test_grids)
  banks = [
      digits_lib.load_digit_bank(
          part,
          digits_source,
          cell_size=cell_size,
          top_n=top_n,
          digit_confidence=digit_confidence,
          path=digits_path,
          data_dir=tfds_data_dir,
      )
      for part in ("train", "test")
  ]
  return jax.device_put(
      SudokuTask(
          train_digits=banks[0],
          test_digits=banks[1],
          train_grids=grids.train,
          test_grids=grids.test,
          box_size=box_size,
          transform_grids=grids.transform,
          train_given_range=train_given_range,
      )
  )


_TASK_KEYS = (
    "box_size",
    "cell_size",
    "digits_source",
    "top_n",
    "seed",
    "train_given_range",
    "num_train_grids",
    "num_test_grids",
    "digits_path",
    "tfds_data_dir",
)


def make_sudoku_task_from_config(
    data_config: Mapping, digit_confidence: digits_lib.ConfidenceFn | None = None
) -> SudokuTask:
  """`make_sudoku_task` from a config mapping (e.g. `config.data`), checking its image fields.

  Keys read (all optional): box_size, cell_size, digits_source, top_n, seed (the grid seed;
  default 0), train_given_range, num_train_grids, num_test_grids, digits_path, tfds_data_dir.
  If present, `image_size` must equal n * cell_size, `channels` must be 1 and `patch_size` must
  equal cell_size. Other keys are ignored. digit_confidence: as in `make_sudoku_task`.
  """
  kwargs = {k: data_config[k] for k in _TASK_KEYS if k in data_config}
  if "train_given_range" in kwargs and kwargs["train_given_range"] is not None:
    kwargs["train_given_range"] = tuple(kwargs["train_given_range"])
  box_size = kwargs.get("box_size", 3)
  cell_size = kwargs.get("cell_size", 28)
  sudoku_grids.check_box_size(box_size)
  expected = {"image_size": box_size * box_size * cell_size, "channels": 1, "patch_size": cell_size}
  for name, value in expected.items():
    if name in data_config and data_config[name] != value:
      raise errors.ConfigError(
          f"data.{name}={data_config[name]!r} does not fit box_size={box_size}, "
          f"cell_size={cell_size}: expected {value}"
      )
  return make_sudoku_task(**kwargs, digit_confidence=digit_confidence)
