"""Tests of ipr_jax.data.sudoku_grids and ipr_jax.data.sudoku."""

import hashlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.data import sudoku
from ipr_jax.data import sudoku_grids


def is_valid(grid: np.ndarray) -> bool:
  """Independent check: every row, column and box holds each of 1..n once."""
  grid = np.asarray(grid)
  n = grid.shape[0]
  b = int(round(n**0.5))
  digits = set(range(1, n + 1))
  units = [grid[i] for i in range(n)] + [grid[:, j] for j in range(n)]
  units += [grid[r : r + b, c : c + b].ravel() for r in range(0, n, b) for c in range(0, n, b)]
  return all(set(u.tolist()) == digits and len(u) == n for u in units)


@pytest.fixture(scope="module")
def task9():
  return sudoku.make_sudoku_task(
      box_size=3, cell_size=28, seed=5, num_train_grids=40, num_test_grids=20
  )


@pytest.fixture(scope="module")
def task4():
  return sudoku.make_sudoku_task(box_size=2, cell_size=14, seed=1)


def test_base_grids_valid_and_seeded():
  sets = sudoku_grids.make_grid_sets(11, 3, 30, 10)
  assert sets.train.shape == (30, 9, 9) and sets.test.shape == (10, 9, 9) and sets.transform
  assert all(is_valid(g) for g in np.concatenate([sets.train, sets.test]))
  again = sudoku_grids.make_grid_sets.__wrapped__(11, 3, 30, 10)
  np.testing.assert_array_equal(again.train, sets.train)
  np.testing.assert_array_equal(again.test, sets.test)
  other = sudoku_grids.make_grid_sets.__wrapped__(12, 3, 30, 10)
  assert not np.array_equal(other.train, sets.train)
  # Many pattern families: no two base grids share an orbit fingerprint.
  assert len(set(sudoku_grids.orbit_invariant(sets.train))) == 30


def test_group_transform_keeps_validity_and_orbit():
  base = sudoku_grids.make_grid_sets(11, 3, 30, 10).train
  out = np.asarray(sudoku_grids.transform_grids(jax.random.key(3), jnp.asarray(base), 3))
  assert all(is_valid(g) for g in out)
  assert not np.array_equal(out, base)
  assert sudoku_grids.orbit_invariant(out) == sudoku_grids.orbit_invariant(base)


def test_all_4x4_grids():
  grids = sudoku_grids.all_solved_grids(2)
  assert grids.shape == (288, 4, 4)  # the known number of 4x4 Sudoku grids
  assert len({g.tobytes() for g in grids}) == 288
  assert all(is_valid(g) for g in grids)
  # The 4x4 grids fall into exactly two orbits under the Sudoku group.
  assert len(set(sudoku_grids.orbit_invariant(grids))) == 2


def test_train_and_test_grids_valid_and_disjoint(task9):
  train = np.asarray(task9.train_batch(jax.random.key(0), 16)["grid"])
  test = np.asarray(task9.test_batch(0, jnp.arange(8), "easy")["grid"])
  assert all(is_valid(g) for g in train) and all(is_valid(g) for g in test)
  # Many more group images of the same bases, as the batches draw them.
  base = jnp.asarray(task9.train_grids)[jnp.arange(400) % task9.train_grids.shape[0]]
  more_train = np.asarray(sudoku_grids.transform_grids(jax.random.key(1), base, 3))
  base = jnp.asarray(task9.test_grids)[jnp.arange(400) % task9.test_grids.shape[0]]
  more_test = np.asarray(sudoku_grids.transform_grids(jax.random.key(2), base, 3))
  train = np.concatenate([train, more_train])
  test = np.concatenate([test, more_test])
  assert all(is_valid(g) for g in more_train) and all(is_valid(g) for g in more_test)
  assert len({g.tobytes() for g in train}) == len(train)  # group images are (almost surely) new
  assert not {g.tobytes() for g in train} & {g.tobytes() for g in test}
  # Orbit fingerprints are group invariants, so disjoint fingerprints mean no test grid can
  # ever be drawn in training.
  assert not set(sudoku_grids.orbit_invariant(train)) & set(sudoku_grids.orbit_invariant(test))


def test_4x4_sets_disjoint_and_cover(task4):
  train = {g.tobytes() for g in np.asarray(task4.train_grids)}
  test = {g.tobytes() for g in np.asarray(task4.test_grids)}
  assert not train & test and len(train) + len(test) == 288
  batch = task4.train_batch(jax.random.key(0), 64)
  assert batch["image"].shape == (64, 56, 56, 1) and batch["mask"].shape == (64, 56, 56, 1)
  assert batch["cell_mask"].shape == (64, 16) and batch["grid"].shape == (64, 4, 4)
  assert all(is_valid(g) for g in np.asarray(batch["grid"]))
  assert {g.tobytes() for g in np.asarray(batch["grid"]).astype(np.int8)} <= train
  assert int(batch["num_given"].max()) <= 15


def test_batch_layout_and_masks(task9):
  batch = task9.train_batch(jax.random.key(1), 16)
  assert batch["image"].shape == (16, 252, 252, 1) and batch["image"].dtype == jnp.float32
  assert float(batch["image"].min()) == -1.0 and float(batch["image"].max()) <= 1.0
  assert batch["cell_mask"].dtype == jnp.bool_ and batch["grid"].dtype == jnp.int32
  num_given = np.asarray(batch["num_given"])
  cell_mask = np.asarray(batch["cell_mask"])
  assert np.all((0 <= num_given) & (num_given <= 80))
  np.testing.assert_array_equal((~cell_mask).sum(axis=1), num_given)
  # The pixel mask is the cell mask, constant over each 28x28 cell.
  mask = np.asarray(batch["mask"])[..., 0].reshape(16, 9, 28, 9, 28)
  assert np.all(mask == mask[:, :, :1, :, :1])
  np.testing.assert_array_equal(mask[:, :, 0, :, 0].reshape(16, 81), cell_mask.astype(np.float32))


@pytest.mark.parametrize(
    "given_range,expected",
    [
        ("hard", (0, 26)),
        ("medium", (27, 53)),
        ("easy", (54, 80)),
        ((81, 81), (81, 81)),
        ((10, 10), (10, 10)),
    ],
)
def test_test_given_counts(task9, given_range, expected):
  batch = task9.test_batch(4, jnp.arange(8), given_range)
  num_given = np.asarray(batch["num_given"])
  assert np.all((expected[0] <= num_given) & (num_given <= expected[1]))
  np.testing.assert_array_equal((~np.asarray(batch["cell_mask"])).sum(axis=1), num_given)


def test_difficulty_ranges():
  assert [sudoku.difficulty_range(d, 3) for d in sudoku.DIFFICULTIES] == [
      (0, 26),
      (27, 53),
      (54, 80),
  ]
  ranges = [sudoku.difficulty_range(d, 2) for d in sudoku.DIFFICULTIES]
  covered = [g for lo, hi in ranges for g in range(lo, hi + 1)]
  assert covered == list(range(16))  # the three ranges partition 0..15


def test_test_puzzle_shows_solution_digits(task9):
  """Every cell (so every given cell) is an image of the solution's digit from the held-out bank."""
  batch = task9.test_batch(7, jnp.arange(8), "easy")
  bank = np.asarray(task9.test_digits.images)
  counts = np.asarray(task9.test_digits.counts)
  pixels = np.round((np.asarray(batch["image"])[..., 0] + 1) * 127.5).astype(np.uint8)
  tiles = pixels.reshape(8, 9, 28, 9, 28).transpose(0, 1, 3, 2, 4)
  grids = np.asarray(batch["grid"])
  for b in range(8):
    for r in range(9):
      for c in range(9):
        digit = grids[b, r, c]
        candidates = bank[digit, : counts[digit]]
        assert np.any(np.all(candidates == tiles[b, r, c], axis=(1, 2))), (b, r, c)


def test_test_puzzles_are_pure_functions_of_seed_and_index(task9):
  indices = jnp.array([0, 5, 17, 1, 2, 3, 4, 6])
  first = task9.test_batch(3, indices, "hard")
  again = task9.test_batch(3, indices, "hard")
  other_batch = task9.test_batch(3, jnp.array([5, 90, 91, 92, 93, 94, 0, 96]), "hard")
  other_seed = task9.test_batch(4, indices, "hard")
  for name in ("image", "mask", "grid", "cell_mask"):
    np.testing.assert_array_equal(first[name], again[name])
    np.testing.assert_array_equal(first[name][1], other_batch[name][0])
    np.testing.assert_array_equal(first[name][0], other_batch[name][6])
  assert not np.array_equal(first["grid"], other_seed["grid"])
  assert not np.array_equal(first["grid"][0], first["grid"][1])
  # The difficulty changes the given cells, not the solution or its digit images.
  easy = task9.test_batch(3, indices, "easy")
  np.testing.assert_array_equal(first["image"], easy["image"])
  assert np.all(np.asarray(easy["num_given"]) >= 54)


def test_test_puzzles_identical_across_processes(task9):
  code = textwrap.dedent("""
      import hashlib, jax.numpy as jnp, numpy as np
      from ipr_jax.data import sudoku
      task = sudoku.make_sudoku_task(box_size=3, cell_size=28, seed=5, num_train_grids=40,
                                     num_test_grids=20)
      batch = task.test_batch(3, jnp.arange(8), 'hard')
      print(hashlib.sha256(b''.join(np.asarray(batch[k]).tobytes()
                                    for k in ('image', 'mask', 'grid'))).hexdigest())
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  batch = task9.test_batch(3, jnp.arange(8), "hard")
  local = hashlib.sha256(
      b"".join(np.asarray(batch[k]).tobytes() for k in ("image", "mask", "grid"))
  ).hexdigest()
  assert out.stdout.strip().splitlines()[-1] == local


def test_train_batch_under_pmap(task9):
  devices = jax.local_devices()
  keys = jax.random.split(jax.random.key(0), len(devices))
  batch = jax.pmap(lambda task, key: task.train_batch(key, 2), in_axes=(None, 0))(task9, keys)
  assert batch["image"].shape == (len(devices), 2, 252, 252, 1)
  if len(devices) > 1:
    assert not np.array_equal(batch["grid"][0], batch["grid"][1])


@pytest.mark.parametrize("given_range", [(0, 82), (-1, 5), (30, 10), "impossible", (1.5, 3)])
def test_bad_given_range(task9, given_range):
  with pytest.raises(ValueError, match="given_range|difficulty"):
    task9.test_batch(0, jnp.arange(8), given_range)


def test_bad_task_arguments():
  with pytest.raises(ValueError, match="box_size=4"):
    sudoku.make_sudoku_task(box_size=4)
  with pytest.raises(ValueError, match="cell_size=10"):
    sudoku.make_sudoku_task(box_size=2, cell_size=10)
  with pytest.raises(ValueError, match="81"):
    sudoku.make_sudoku_task(box_size=2, train_given_range=(0, 81))
  with pytest.raises(FileNotFoundError, match="no_such_digits.npz"):
    sudoku.make_sudoku_task(box_size=2, digits_path="/nonexistent/no_such_digits.npz")
  with pytest.raises(ValueError, match="image_size=252"):
    sudoku.make_sudoku_task_from_config({"box_size": 2, "cell_size": 28, "image_size": 252})


def test_task_from_config():
  task = sudoku.make_sudoku_task_from_config(
      {
          "box_size": 2,
          "cell_size": 28,
          "image_size": 112,
          "channels": 1,
          "patch_size": 28,
          "train_given_range": [2, 3],
          "seed": 0,
          "unrelated": 1,
      }
  )
  assert task.image_size == 112 and task.train_given_range == (2, 3)
  num_given = np.asarray(task.train_batch(jax.random.key(0), 32)["num_given"])
  assert np.all((num_given >= 2) & (num_given <= 3))


def _count_completions(cells: list[int], n: int = 4, box: int = 2, limit: int = 2) -> int:
  """Completions of a 4x4 grid (0 = empty, row-major) by plain backtracking, up to `limit`."""
  try:
    empty = cells.index(0)
  except ValueError:
    return 1
  r, c = divmod(empty, n)
  used = {cells[r * n + j] for j in range(n)} | {cells[i * n + c] for i in range(n)}
  br, bc = r - r % box, c - c % box
  used |= {cells[(br + i) * n + bc + j] for i in range(box) for j in range(box)}
  found = 0
  for digit in range(1, n + 1):
    if digit not in used:
      cells[empty] = digit
      found += _count_completions(cells, n, box, limit - found)
      cells[empty] = 0
      if found >= limit:
        break
  return found


def test_unique_solution_puzzles_have_one_completion_and_are_minimal(task4):
  indices = jnp.arange(120)
  batch = task4.test_batch(35, indices, "hard", unique_solution=True)
  grids = np.asarray(batch["grid"]).reshape(-1, 16)
  unknown = np.asarray(batch["cell_mask"])
  num_given = np.asarray(batch["num_given"])
  np.testing.assert_array_equal(num_given, 16 - unknown.sum(1))
  np.testing.assert_array_equal(
      task4.test_given_counts(35, indices, "hard", unique_solution=True), num_given
  )
  assert num_given.min() >= 4 and num_given.max() <= 6  # 4x4 needs at least 4 clues
  for grid, hidden in zip(grids, unknown):
    puzzle = [int(d) if not h else 0 for d, h in zip(grid, hidden)]
    assert _count_completions(list(puzzle)) == 1
    for cell in np.flatnonzero(~hidden):  # removing any given cell admits a second solution
      fewer = list(puzzle)
      fewer[cell] = 0
      assert _count_completions(fewer) == 2
  # The mask agrees with the image mask, and the grid and digits are the puzzle's usual ones.
  np.testing.assert_array_equal(
      np.asarray(batch["mask"])[:, ::14, ::14, 0].reshape(-1, 16), unknown.astype(np.float32)
  )
  plain = task4.test_batch(35, indices, "hard")
  np.testing.assert_array_equal(plain["grid"], batch["grid"])
  np.testing.assert_array_equal(plain["image"], batch["image"])


def test_unique_solution_needs_4x4(task9):
  with pytest.raises(ValueError, match="unique_solution=True needs 4x4 Sudoku.*box_size=3"):
    task9.test_batch(0, jnp.arange(2), "hard", unique_solution=True)
