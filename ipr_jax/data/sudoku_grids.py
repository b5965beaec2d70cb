"""Solved Sudoku grids: seeded generation, the validity-preserving group, train/test split.

The reference reads a fixed file of solved grids (`sudokus.npy`, all but the last 10,000 for
training, the last 10,000 for testing; spec §5.1). This module generates grids instead, so the
project needs no download:

* **Base grids.** Random solved grids found by randomized backtracking (row-major cell order,
  random candidate order), seeded by a `numpy.random.Generator`. For box size 2 there are
  only 288 solved 4x4 grids in all; they are enumerated and split between train and test.
* **The Sudoku group.** Relabelling the digits, permuting bands, rows inside each band, stacks,
  columns inside each stack, and transposing all map a valid grid to a valid grid.
  `transform_grids` draws a uniform element of this group on device (pure JAX, jit-able). A 9x9
  base grid with a trivial stabiliser has 9!·6^8·2 ≈ 1.2e12 images, so the training set (every
  image of every training base) is far larger than the reference's file, while the batch only
  gathers from a small array of bases.
* **Disjoint train and test sets.** Test grids are images of other bases under the same group. A
  test base is kept only if its `orbit_invariant` (a group invariant, see there) differs from that
  of every training base; two grids with different invariants lie in different orbits, so no test
  grid can ever be a training grid. For 4x4 the whole set of 288 grids forms only two orbits, so
  there is no group augmentation: the 288 grids themselves are shuffled and split.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BOX_SIZES = (2, 3)


def check_box_size(box_size: int) -> int:
  """Returns `box_size` if supported (2: 4x4 Sudoku, 3: 9x9 Sudoku), else raises ValueError."""
  if box_size not in SUPPORTED_BOX_SIZES:
    raise ValueError(
        f"box_size={box_size!r} is not supported; use 3 (9x9 Sudoku) or 2 (4x4 Sudoku): the "
        "digits come from MNIST, so at most 9 symbols exist."
    )
  return box_size


def _box_index(n: int, box_size: int) -> np.ndarray:
  """[n, n] index of the box each cell lies in (row-major over boxes)."""
  rows, cols = np.indices((n, n))
  return (rows // box_size) * box_size + cols // box_size


def random_solved_grid(rng: np.random.Generator, box_size: int = 3) -> np.ndarray:
  """One random solved grid by randomized backtracking.

  Cells are filled in row-major order; each cell tries its allowed digits in a random order and
  the search backtracks on a dead end (about 130 placements per 9x9 grid on average).

  Args:
    rng: numpy generator; the grid is a deterministic function of its state.
    box_size: 3 for 9x9, 2 for 4x4.

  Returns:
    [n, n] int8 grid with digits 1..n, n = box_size**2.
  """
  n = check_box_size(box_size) ** 2
  box = _box_index(n, box_size).ravel().tolist()
  full = (1 << n) - 1
  row_used, col_used, box_used = [0] * n, [0] * n, [0] * n
  grid = [0] * (n * n)

  def solve(cell: int) -> bool:
    if cell == n * n:
      return True
    r, c = divmod(cell, n)
    b = box[cell]
    free = full & ~(row_used[r] | col_used[c] | box_used[b])
    for d in rng.permutation([d for d in range(n) if free >> d & 1]):
      bit = 1 << int(d)
      grid[cell] = int(d) + 1
      row_used[r] |= bit
      col_used[c] |= bit
      box_used[b] |= bit
      if solve(cell + 1):
        return True
      row_used[r] &= ~bit
      col_used[c] &= ~bit
      box_used[b] &= ~bit
    grid[cell] = 0
    return False

  if not solve(0):  # Cannot happen: the empty grid has solutions.
    raise RuntimeError("backtracking found no grid")
  return np.asarray(grid, np.int8).reshape(n, n)


@functools.lru_cache(maxsize=None)
def all_solved_grids(box_size: int = 2) -> np.ndarray:
  """Every solved grid of a box size, in lexicographic order (only box_size=2: 288 grids)."""
  if box_size != 2:
    raise ValueError(f"box_size={box_size!r}: only the 288 4x4 grids (box_size=2) are enumerated")
  n = 4
  box = _box_index(n, box_size).ravel()
  grids = []
  grid = [0] * (n * n)

  def fill(cell: int) -> None:
    if cell == n * n:
      grids.append(list(grid))
      return
    r, c = divmod(cell, n)
    for d in range(1, n + 1):
      if any(grid[r * n + j] == d for j in range(c)):
        continue
      if any(grid[i * n + c] == d for i in range(r)):
        continue
      if any(grid[k] == d for k in range(cell) if box[k] == box[cell]):
        continue
      grid[cell] = d
      fill(cell + 1)
    grid[cell] = 0

  fill(0)
  return np.asarray(grids, np.int8).reshape(-1, n, n)


def orbit_invariant(grids: np.ndarray) -> list[bytes]:
  """A fingerprint of each grid that is constant on its orbit under the Sudoku group.

  For two digits a, b let pi_ab map row r to the row holding a in the column where row r holds b.
  Row and column permutations conjugate pi_ab or leave it unchanged, relabelling permutes the
  pairs, swapping a and b inverts pi_ab, and transposing turns it into the column analogue with
  the same cycles. So the multiset, over the n(n-1)/2 digit pairs, of the cycle types of pi_ab is
  a group invariant; so is, per pair, the number of mini-lines holding both digits, and the
  fingerprint combines the two per pair. Equal fingerprints do not prove equal orbits (they only
  make them likely); different fingerprints prove different orbits.

  Args:
    grids: [G, n, n] solved grids, digits 1..n.

  Returns:
    G byte strings.
  """
  grids = np.asarray(grids)
  num, n, _ = grids.shape
  # col_of[g, d, r]: the column of digit d+1 in row r.
  col_of = np.argsort(grids - 1, axis=2).transpose(0, 2, 1)
  # row_of[g, d, c]: the row of digit d+1 in column c.
  row_of = np.argsort(grids - 1, axis=1)
  a, b = np.triu_indices(n, k=1)
  # pi[g, p, r] = row_of[g, a_p, col_of[g, b_p, r]].
  pi = np.take_along_axis(row_of[:, a], col_of[:, b], axis=2)
  cycle_length = np.zeros_like(pi)
  image = np.broadcast_to(np.arange(n), pi.shape).copy()
  for step in range(1, n + 1):
    image = np.take_along_axis(pi, image, axis=2)
    cycle_length = np.where((cycle_length == 0) & (image == np.arange(n)), step, cycle_length)
  per_pair = np.sort(cycle_length, axis=2)  # [G, P, n]: cycle type as a sorted vector
  cycle_key = per_pair @ (n + 1) ** np.arange(n)  # injective for lengths <= n
  # How many mini-lines (the box_size cells of one row or one column inside one box) hold both
  # digits: block permutations and line permutations inside blocks only move mini-lines around,
  # and transposition swaps mini-rows with mini-columns.
  box_size = int(round(n**0.5))
  mini_rows = grids.reshape(num, n, box_size, box_size)
  mini_cols = grids.transpose(0, 2, 1).reshape(num, n, box_size, box_size)
  mini_lines = np.concatenate([mini_rows, mini_cols], axis=1).reshape(num, -1, box_size)
  holds = (mini_lines[..., None] == np.arange(1, n + 1)).any(axis=2).astype(np.int64)
  together = np.einsum("gla,glb->gab", holds, holds)[:, a, b]  # [G, P]
  keys = cycle_key * (2 * n * n + 1) + together
  return [np.sort(k).astype(np.int64).tobytes() for k in keys]


def group_uniforms_size(box_size: int) -> int:
  """How many uniforms in [0, 1) `apply_group_element` consumes per grid."""
  n = box_size * box_size
  return n + 2 * box_size + 2 * n + 1


def apply_group_element(grids: jax.Array, uniforms: jax.Array, box_size: int) -> jax.Array:
  """Applies the Sudoku-group element encoded by uniforms to each grid.

  Permutations are argsorts of i.i.d. uniforms (uniform permutations); the last uniform decides
  the transposition. Taking the randomness as an array lets a batch draw all of it at once, which
  keeps the compiled program small (each PRNG call compiles to its own hash computation).

  Args:
    grids: [B, n, n] integer grids, digits 1..n.
    uniforms: [B, group_uniforms_size(box_size)] in [0, 1).
    box_size: b, with n = b*b.

  Returns:
    [B, n, n] grids of the same dtype.
  """
  batch, n, b = grids.shape[0], box_size * box_size, box_size
  u_relabel, u_blocks, u_inner, u_transpose = jnp.split(
      uniforms, [n, n + 2 * b, 3 * n + 2 * b], axis=1
  )
  relabel = jnp.argsort(u_relabel, axis=-1) + 1  # [B, n]
  blocks = jnp.argsort(u_blocks.reshape(batch, 2, b), axis=-1)  # [B, rows/cols, b]
  inner = jnp.argsort(u_inner.reshape(batch, 2, b, b), axis=-1)  # [B, rows/cols, b, b]
  # New line (i, j) of rows (or columns) is old line blocks[i] * b + inner[i, j].
  lines = (blocks[..., :, None] * b + inner).reshape(batch, 2, n)
  out = jax.vmap(lambda g, r, c: g[r][:, c])(grids, lines[:, 0], lines[:, 1])
  out = jnp.where(u_transpose[:, :, None] < 0.5, out.transpose(0, 2, 1), out)
  flat = jnp.take_along_axis(relabel, out.reshape(batch, -1).astype(jnp.int32) - 1, axis=1)
  return flat.reshape(out.shape).astype(grids.dtype)


def transform_grids(key: jax.Array, grids: jax.Array, box_size: int) -> jax.Array:
  """Applies one uniform random element of the Sudoku group to each grid.

  The group: digit relabelling, band permutation, row permutation inside each band, stack
  permutation, column permutation inside each stack, transposition.

  Args:
    key: PRNG key.
    grids: [B, n, n] integer grids, digits 1..n.
    box_size: b, with n = b*b.

  Returns:
    [B, n, n] grids of the same dtype.
  """
  uniforms = jax.random.uniform(key, (grids.shape[0], group_uniforms_size(box_size)))
  return apply_group_element(grids, uniforms, box_size)


class GridSets(NamedTuple):
  """Train and test grids of one box size.

  Attributes:
    train: [Ntr, n, n] int8 training base grids.
    test: [Nte, n, n] int8 test base grids, in other orbits than every training grid when
      `transform` is True, and simply different grids when it is False.
    transform: whether batches apply a random group element to the base grids (True for 9x9).
  """

  train: np.ndarray
  test: np.ndarray
  transform: bool


@functools.lru_cache(maxsize=8)
def make_grid_sets(
    seed: int = 0, box_size: int = 3, num_train: int | None = None, num_test: int | None = None
) -> GridSets:
  """Deterministic train/test grid sets.

  Args:
    seed: seed of the numpy generator that draws the grids.
    box_size: 3 (9x9) or 2 (4x4).
    num_train: number of training base grids. Default 1000 for 9x9; for 4x4 the 288 grids minus
      the test grids.
    num_test: number of test base grids. Default 200 for 9x9, 64 for 4x4.

  Returns:
    GridSets. For 9x9 the sets are images of the bases under the Sudoku group (about 1.2e12 grids
    per base); for 4x4 they are the listed grids themselves.
  """
  check_box_size(box_size)
  rng = np.random.default_rng(seed)
  if box_size == 2:
    grids = all_solved_grids(2)
    num_test = 64 if num_test is None else num_test
    num_train = len(grids) - num_test if num_train is None else num_train
    if num_test < 1 or num_train < 1 or num_train + num_test > len(grids):
      raise ValueError(
          f"num_train={num_train}, num_test={num_test}: 4x4 Sudoku has only "
          f"{len(grids)} grids; both must be >= 1 and sum to at most that"
      )
    order = rng.permutation(len(grids))
    return GridSets(
        train=grids[order[:num_train]],
        test=grids[order[num_train : num_train + num_test]],
        transform=False,
    )

  num_train = 1000 if num_train is None else num_train
  num_test = 200 if num_test is None else num_test
  if num_train < 1 or num_test < 1:
    raise ValueError(f"num_train={num_train}, num_test={num_test}: both must be >= 1")
  train = np.stack([random_solved_grid(rng, box_size) for _ in range(num_train)])
  train_fingerprints = set(orbit_invariant(train))
  test: list[np.ndarray] = []
  while len(test) < num_test:
    candidates = np.stack([random_solved_grid(rng, box_size) for _ in range(num_test - len(test))])
    test.extend(
        g for g, f in zip(candidates, orbit_invariant(candidates)) if f not in train_fingerprints
    )
  return GridSets(train=train, test=np.stack(test), transform=True)
