"""Tests for ipr_jax.noise.schedule against the reference's recorded schedules."""

import numpy as np
import pytest

from ipr_jax.noise import schedule

# (steps_per_patch, overlap) of each group in tests/golden/schedules.npz.
GROUPS = {
    "ms_init": (3, 0.0),
    "ms_ipr": (10, 0.8),
    "ep_init": (30, 0.9),
    "ep_ipr": (30, 0.9),
    "cp_init": (10, 0.9),
    "cp_ipr": (10, 0.9),
}


@pytest.fixture(scope="module")
def golden(golden_dir):
  return dict(np.load(golden_dir / "schedules.npz"))


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_matches_reference_schedules(golden, group):
  p, overlap = GROUPS[group]
  for i, n in enumerate(golden[f"{group}/n"]):
    n = int(n)
    s = schedule.make_schedule(n, p, overlap)
    assert s.max_steps == golden[f"{group}/max_steps"][i], (group, n)
    assert s.block_len == golden[f"{group}/block_len"][i], (group, n)
    assert np.float32(s.ideal_block_len) == golden[f"{group}/ideal_block_len"][i]
    starts = golden[f"{group}/block_starts"][i]
    np.testing.assert_array_equal(s.block_starts, starts[: n + 1], err_msg=f"{group} {n}")
    assert np.all(starts[n + 1 :] == -2)
    proto = golden[f"{group}/prototypes"][i]
    np.testing.assert_array_equal(s.prototype, proto[: s.block_len])
    assert np.all(proto[s.block_len :] == -2)


def test_float32_anomalies_of_the_spec():
  # MS init (3, 0.0): block length 4 at n = 56, 60, 63; starts 0, 2, 5, ... at 61.
  for n in (56, 60, 63):
    s = schedule.make_schedule(n, 3, 0.0)
    assert (s.max_steps, s.block_len) == (3 * n, 4)
    np.testing.assert_array_equal(s.prototype, [1, 0.75, 0.5, 0.25])
    np.testing.assert_array_equal(s.block_starts[:-1], 3 * np.arange(n))
  s = schedule.make_schedule(61, 3, 0.0)
  assert s.block_len == 3
  np.testing.assert_array_equal(s.block_starts[:4], [0, 2, 5, 8])
  assert s.block_starts[60] == 179 and s.block_starts[61] == -1
  # MS IPR (10, 0.8): starts 0, 1, 3, ... at k = 13, 14, 19; L = 11 at k = 17.
  for k in (13, 14, 19):
    s = schedule.make_schedule(k, 10, 0.8)
    np.testing.assert_array_equal(s.block_starts[:3], [0, 1, 3])
  assert schedule.block_len(17, 10, 0.8) == 11


def test_ideal_values_of_the_spec():
  assert schedule.max_steps(64, 30, 0.9) == 219
  assert schedule.max_steps(16, 30, 0.9) == 75
  assert schedule.max_steps(256, 10, 0.9) == 265
  assert schedule.max_steps(64, 10, 0.9) == 73
  for n in range(1, 82):
    assert schedule.max_steps(n, 3, 0.0) == 3 * n
  for k in range(1, 21):
    assert schedule.max_steps(k, 10, 0.8) == 2 * k + 8


# Clean schedules worked out by hand from the formulas in schedule.py's docstring:
# (p, overlap, n) -> (max_steps, block_len, starts without the -1 sentinel).
HAND_DERIVED_CLEAN = {
    # 4 + 2 * 1/2 * 4 = 8 steps; ideal 8 / 2 = 4; starts floor(k * 4 / 2).
    (4, 0.5, 3): (8, 4, [0, 2, 4]),
    # 10 + 12 * 1/5 * 10 = 34; ideal 34 / (17/5) = 10 exactly; starts 2k (float32: 0, 1, 3, ...).
    (10, 0.8, 13): (34, 10, list(range(0, 26, 2))),
    # 10 + 16 * 2 = 42; ideal 42 / (21/5) = 10 exactly (float32: block length 11).
    (10, 0.8, 17): (42, 10, list(range(0, 34, 2))),
    # 7 + 3 * 7/10 * 7 = 21.7 -> 22; ideal 22 / 3.1 = 7.097 -> L = 8; k * 4.968 -> 0, 4, 9, 14.
    (7, 0.3, 4): (22, 8, [0, 4, 9, 14]),
    # 30 + 63 * 3 = 219; ideal 219 / 7.3 = 30; starts 3k.
    (30, 0.9, 64): (219, 30, list(range(0, 192, 3))),
    # No overlap: 3 steps per patch one after another (float32: L = 3 here, but 4 at n = 60).
    (3, 0.0, 60): (180, 3, list(range(0, 180, 3))),
}


@pytest.mark.parametrize("p,overlap,n", sorted(HAND_DERIVED_CLEAN))
def test_clean_schedule_matches_hand_derived_values(p, overlap, n):
  steps, length, starts = HAND_DERIVED_CLEAN[(p, overlap, n)]
  s = schedule.make_schedule(n, p, overlap, clean=True)
  assert (s.max_steps, s.block_len) == (steps, length)
  assert list(s.block_starts) == starts + [-1]
  np.testing.assert_array_equal(
      s.prototype, np.array([(length - j) / length for j in range(length)], np.float32)
  )


def test_clean_schedule_has_no_float32_anomalies():
  for n in range(1, 82):
    s = schedule.make_schedule(n, 3, 0.0, clean=True)
    assert s.block_len == 3
    np.testing.assert_array_equal(s.block_starts[:-1], 3 * np.arange(n))


def test_degenerate_block_starts_are_refused():
  # The cases: p * (1 - overlap) < 1 repeats starts.
  with pytest.raises(ValueError, match=r"steps_per_patch=5 and overlap=0.9 .* n=64 .*0, 0, 1, 1"):
    schedule.check_block_starts([64], 5, 0.9)
  with pytest.raises(ValueError, match=r"ipr: steps_per_patch=2 and overlap=0.9 .* n=16"):
    schedule.check_block_starts([16], 2, 0.9, name="ipr")
  with pytest.raises(ValueError, match=r"steps_per_patch=10 and overlap=0.9 .* n=8"):
    schedule.check_block_starts([1, 8], 10, 0.9)
  # n = 0 and 1 have nothing to repeat; p * (1 - overlap) >= 1 is fine.
  schedule.check_block_starts([0, 1], 2, 0.9)
  schedule.check_block_starts(range(82), 3, 0.0)
  schedule.check_block_starts(range(65), 30, 0.9)
  schedule.check_block_starts(range(65), 5, 0.5)


def test_degenerate_means_one_thing_per_kind():
  """Adaptive: repeated starts (one block per step), the message naming max_steps instead of
  steps_per_patch where it is set, and top_k; fixed and the sequential schedules start repeated
  blocks together and are refused only without a pass or with a block length of 0."""
  with pytest.raises(ValueError, match=r"sampler: max_steps=30 and overlap=0.9 give repeated"):
    schedule.check_block_starts([64], 5, 0.9, total_steps=30)
  with pytest.raises(
      ValueError, match=r"ipr: steps_per_patch=5, overlap=0.9 and top_k=2 .* n=64 patches in 32 "
  ):
    schedule.check_block_starts([64], 5, 0.9, name="ipr", top_k=2)
  for kind in ("fixed", "random_sequential", "graph_sequential"):
    schedule.check_block_starts(range(82), 5, 0.9, kind=kind)
    schedule.check_block_starts(range(82), 3, 0.75, kind=kind, total_steps=52)
    schedule.check_block_starts(range(82), 3, 0.0, kind=kind, total_steps=8)
  with pytest.raises(ValueError, match=r"sampler: max_steps=1 leaves no denoiser pass"):
    schedule.check_block_starts([3], 3, 0.0, kind="random_sequential", total_steps=1)
  # M = 41 blocks of 41 steps at overlap 0: float32 41 / 41 < 1 floors to 0 in the reference.
  with pytest.raises(
      ValueError, match=r"max_steps=41 and overlap=0.0 leave a block length of 0 for n=50"
  ):
    schedule.check_block_starts([50], 3, 0.0, kind="graph_sequential", total_steps=41)
  schedule.check_block_starts([50], 3, 0.0, kind="graph_sequential", total_steps=42)


def test_sequential_blocks_may_start_together():
  """The issue's 9x9 case, 52 steps for 51 cells at overlap 0.75: L = floor(52 / 13.5) = 3,
  starts floor(0.75 k) = 0, 0, 1, 2, 3, 3, ...: every cell its own block, 51 passes."""
  s = schedule.make_schedule(51, 3, 0.75, kind="graph_sequential", total_steps=52)
  assert (s.max_steps, s.block_len) == (51, 3)
  np.testing.assert_array_equal(s.block_starts[:-1], np.floor(0.75 * np.arange(51)))
  assert len(s.block_starts) == 52 and s.block_starts[-1] == -1


@pytest.mark.parametrize("clean", [False, True])
def test_sequential_planning_stops_at_max_steps_blocks(clean):
  """Fewer steps than patches: the reference plans M blocks (its loop's block_cnt < max_steps)
  and computes L from them: M = 8, n = 14, overlap 0.75: L = floor(8 / 2.75) = 2, starts
  floor(k / 2) for k < 8; the table's num_blocks says how many patches are planned."""
  s = schedule.make_schedule(14, 3, 0.75, clean, kind="random_sequential", total_steps=8)
  assert (s.max_steps, s.block_len) == (7, 2)
  assert list(s.block_starts) == [0, 0, 1, 1, 2, 2, 3, 3, -1]
  table = schedule.schedule_table(16, 3, 0.75, clean, kind="random_sequential", total_steps=8)
  np.testing.assert_array_equal(table.num_blocks, [0] + list(range(1, 9)) + [8] * 8)
  # The derived steps (max_steps 0) of 3 steps per patch at overlap 0.75, M = ceil(3 + 0.75
  # (n - 1)) + 1, fall below n from n = 17 on: n = 51 plans 42 blocks in 41 passes.
  for n, steps in ((16, 16), (17, 16), (51, 42)):
    s = schedule.make_schedule(n, 3, 0.75, clean, kind="graph_sequential")
    assert s.max_steps == steps - 1 and len(s.block_starts) == min(n, steps) + 1


@pytest.mark.parametrize("p,overlap,clean", [(3, 0.0, False), (10, 0.8, False), (30, 0.9, True)])
def test_every_patch_starts_before_the_end(p, overlap, clean):
  for n in range(1, 82):
    s = schedule.make_schedule(n, p, overlap, clean)
    starts = s.block_starts[:-1]
    assert starts[0] == 0 and np.all(np.diff(starts) > 0)
    assert starts[-1] < s.max_steps


def test_table_rows_equal_single_schedules():
  table = schedule.schedule_table(81, 3, 0.0)
  assert table.max_steps.shape == (82,) and table.block_starts.shape == (82, 82)
  assert table.max_steps[0] == 0 and table.block_starts[0, 0] == -1
  for n in (1, 56, 61, 81):
    s = schedule.make_schedule(n, 3, 0.0)
    assert table.max_steps[n] == s.max_steps and table.block_len[n] == s.block_len
    np.testing.assert_array_equal(table.block_starts[n, : n + 1], s.block_starts)
    assert np.all(table.block_starts[n, n + 1 :] == -1)
    np.testing.assert_array_equal(table.prototypes[n, : s.block_len], s.prototype)
    assert np.all(table.prototypes[n, s.block_len :] == 0)
  assert table.steps_bound() == 243
  assert table.steps_bound([55, 60]) == 180


@pytest.mark.parametrize(
    "kwargs", [dict(n=-1), dict(steps_per_patch=0), dict(overlap=1.0), dict(overlap=-0.1)]
)
def test_bad_arguments_raise(kwargs):
  args = dict(n=3, steps_per_patch=3, overlap=0.0) | kwargs
  bad = [k for k in kwargs][0]
  with pytest.raises(ValueError, match=bad):
    schedule.make_schedule(**args)
