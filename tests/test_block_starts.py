"""Schedules whose block starts repeat, and sequential planning stopped at max_steps blocks.

The SRM reference's precomputed schedules (its fixed sampler and its graph_sequential time
scheduler, which is random_sequential at max_order 0) build the whole scheduling matrix first,
so blocks with the same start step ramp down together, and its planning loop stops after
max_steps blocks, leaving the other patches at start step 0 (Chrixtar/SRM
src/sampler/time_scheduler/graph_sequential.py, `get_scheduling_matrix`). Its adaptive sampler
starts one block per step: settings that repeat its starts are refused. The reference's own runs
of such schedules are checked in tests/test_sampler_family.py (sampler_family_repeats.npz); here
the time maps are written out by hand from the reference's rules.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax import sampling
from ipr_jax.models.denoiser import DenoiserOutput
from ipr_jax.noise import schedule
from ipr_jax.sampling import planning
from ipr_jax.tasks import mnist_sudoku

N = 16  # a 4x4 grid of one-pixel patches


def _denoise(z, t):
  """Cheap, state-dependent: u pulls z towards 0.3, sigma varies with the patch's value."""
  u = jnp.tanh(z) * (0.5 + t) - 0.3
  sigma = jnp.exp(jnp.sin(3.0 * z.mean(-1, keepdims=True)))
  return DenoiserOutput(u=u, v=jax.nn.sigmoid(z), logvar=2 * jnp.log(sigma), sigma=sigma)


def _lowest_index_ties(keys, num_patches):
  """Tie priorities that plan the lowest patch index first (instead of random draws)."""
  return jnp.broadcast_to(
      -jnp.arange(num_patches, dtype=jnp.float32), (keys.shape[0], num_patches, num_patches)
  )


def _srm(config, unknown, record=True):
  z = np.random.default_rng(0).standard_normal((len(unknown), 4, 4, 1)).astype(np.float32)
  return sampling.srm_sample(
      sampling.Denoiser(_denoise, 1, mnist_sudoku.dependency_matrix(2)),
      sampling.Puzzles(sampling.puzzle_keys(jax.random.key(0), jnp.arange(len(unknown))), noise=z),
      config,
      unknown=unknown,
      record=record,
  )


def _unknown(patches):
  row = np.zeros((1, N), bool)
  row[0, patches] = True
  return row


# Time maps written out by hand from the reference's rules (graph_sequential.py): b = min(n, M)
# blocks, L = floor(M / ((b - 1)(1 - overlap) + 1)), block k starts at floor(k L (1 - overlap)),
# a patch at t = 1 until its start, then (L - j) / L at j steps after it, then 0; patches left
# unplanned start at step 0; the last of the M rows is 0 (M - 1 passes). One column per block.
_THIRD = 1 / 3

# graph_sequential, M = 8 steps, overlap 0.75, n = 6: L = floor(8 / 2.25) = 3, starts 0, 0, 1,
# 2, 3, 3 (blocks 0 and 1 start together, and blocks 4 and 5).
_REPEAT = np.array(
    [
        [1, 1, 1, 1, 1, 1],
        [2 * _THIRD, 2 * _THIRD, 1, 1, 1, 1],
        [_THIRD, _THIRD, 2 * _THIRD, 1, 1, 1],
        [0, 0, _THIRD, 2 * _THIRD, 1, 1],
        [0, 0, 0, _THIRD, 2 * _THIRD, 2 * _THIRD],
        [0, 0, 0, 0, _THIRD, _THIRD],
        [0, 0, 0, 0, 0, 0],
    ]
)

# random_sequential, M = 5 steps, overlap 0.75, n = 7: planning stops at b = 5 blocks; L =
# floor(5 / 2) = 2, starts 0, 0, 1, 1, 2; the 2 unplanned patches (last columns) start at 0.
_TRUNCATED = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [0.5, 0.5, 1, 1, 1, 0.5, 0.5],
        [0, 0, 0.5, 0.5, 1, 0, 0],
        [0, 0, 0, 0, 0.5, 0, 0],
    ]
)


@pytest.mark.parametrize(
    "settings,patches,by_hand",
    [
        (
            dict(schedule="graph_sequential", max_steps=8, overlap=0.75, max_order=1),
            [1, 4, 6, 9, 11, 14],
            _REPEAT,
        ),
        (
            dict(schedule="random_sequential", max_steps=5, overlap=0.75, max_order=0),
            [0, 2, 5, 7, 8, 13, 15],
            _TRUNCATED,
        ),
    ],
    ids=["repeated_starts", "planning_stops_at_max_steps"],
)
def test_every_pass_follows_the_hand_written_time_map(monkeypatch, settings, patches, by_hand):
  """srm_sample with a repeated-start graph_sequential schedule (and a random_sequential one
  with fewer steps than patches): the patch times of every pass equal the map written out by
  hand, block k's column at its planned patch, every other patch at 0; every patch is generated
  on that schedule (with one block per step, those behind the first repeated start would stay
  at t = 1 until the last pass)."""
  monkeypatch.setattr(planning, "tie_priorities", _lowest_index_ties)
  config = sampling.SamplerConfig(stochasticity=0.0, clamp_noise=False, **settings)
  unknown = _unknown(patches)
  weights = None
  if config.schedule == "graph_sequential":
    weights = planning.weighted_adjacency(mnist_sudoku.dependency_matrix(2), 1, 0.5)
  # Block k's patch: the k-th of the planned order (planning block by block, the first
  # min(n, M) blocks are those the reference plans before it stops).
  order = np.asarray(
      planning.sequential_order(
          jnp.asarray(unknown), weights, config.overlap, _lowest_index_ties(jnp.zeros(1), N)
      )
  )[0]
  blocks = min(len(patches), config.max_steps)
  columns = list(order[:blocks]) + sorted(set(patches) - set(order[:blocks]))
  expected = np.zeros((len(by_hand), N), np.float32)
  expected[:, columns] = by_hand
  out = jax.device_get(_srm(config, unknown))
  passes = len(by_hand)
  assert int(out.nfe[0]) == passes == config.max_steps - 1
  np.testing.assert_allclose(out.t_rows[:passes, 0], expected, atol=1e-7)
  # Blocks that start together are selected together (in index order within a step).
  selected = {int(p): int(s) for p, s in zip(out.order[0], out.order_step[0]) if p >= 0}
  assert sorted(selected) == sorted(patches)
  for p in patches:  # selected at the last pass it is at t = 1 (its block's start)
    assert selected[p] == int(np.flatnonzero(expected[:, p] == 1).max())


def test_the_issue_s_9x9_schedule_generates_every_cell():
  """The issue's case: graph_sequential at overlap 0.75 with 52 steps for 51 unknown cells of a
  9x9 grid (starts 0, 0, 1, 2, 3, 3, ...): every cell leaves t = 1 on its block's step and
  reaches 0 after L = 3 more, none jumps from noise to the prediction in the last pass."""
  table = schedule.schedule_table(81, 3, 0.75, kind="graph_sequential", total_steps=52)
  assert table.block_len[51] == 3 and table.num_blocks[51] == 51
  np.testing.assert_array_equal(table.block_starts[51, :8], [0, 0, 1, 2, 3, 3, 4, 5])
  unknown = np.zeros((1, 81), bool)
  unknown[0, np.random.default_rng(1).permutation(81)[:51]] = True
  config = sampling.SamplerConfig(schedule="graph_sequential", max_steps=52, overlap=0.75)
  z = np.random.default_rng(2).standard_normal((1, 9, 9, 1)).astype(np.float32)
  out = jax.device_get(
      sampling.srm_sample(
          sampling.Denoiser(_denoise, 1, mnist_sudoku.dependency_matrix(3)),
          sampling.Puzzles(sampling.puzzle_keys(jax.random.key(0), jnp.arange(1)), noise=z),
          config,
          unknown=unknown,
          record=True,
      )
  )
  rows = out.t_rows[:51, 0]  # 51 passes
  assert int(out.nfe[0]) == 51
  starts = np.sort(out.order_step[0, :51])
  np.testing.assert_array_equal(starts, table.block_starts[51, :51])
  for p, start in zip(out.order[0, :51], out.order_step[0, :51]):
    np.testing.assert_allclose(
        rows[start : start + 4, p], [1, 2 / 3, 1 / 3, 0], atol=1e-7, err_msg=str(p)
    )
  assert not np.any(rows[:, ~unknown[0]])


def _verdict(fn):
  try:
    fn()
  except ValueError as e:
    return str(e)
  return None


@pytest.mark.parametrize(
    "settings,n,refused",
    [
        # adaptive, one block per step: 5 steps per patch at overlap 0.9 repeat starts.
        (dict(steps_per_patch=5, overlap=0.9), 16, r"sampler: steps_per_patch=5 and overlap=0\.9 "),
        # adaptive with the reference's max_steps and top_k: those are the fields named.
        (
            dict(max_steps=6, overlap=0.5, top_k=2),
            16,
            r"sampler: max_steps=6, overlap=0\.5 and top_k=2 give repeated block starts for "
            r"n=16 patches in 8 blocks",
        ),
        # No pass at all.
        (
            dict(schedule="random_sequential", max_steps=1),
            5,
            r"sampler: max_steps=1 leaves no denoiser pass",
        ),
        # The precomputed schedules start repeated blocks together: allowed.
        (dict(schedule="graph_sequential", overlap=0.75), 16, None),
        (dict(schedule="random_sequential", overlap=0.9, max_steps=10), 16, None),
        (dict(schedule="fixed", max_steps=2), 16, None),
        (dict(steps_per_patch=4, overlap=0.75), 16, None),
    ],
)
def test_srm_sample_refuses_what_the_evaluation_refuses(settings, n, refused):
  """srm_sample checks its settings as the evaluation's check_schedules does (the same message,
  naming the fields that set the schedule), before anything is traced; under jit, where the
  patch counts are unknown, for every count."""
  config = sampling.SamplerConfig(**settings)
  unknown = np.zeros((2, N), bool)
  unknown[:, :n] = True
  evaluation = _verdict(
      lambda: sampling.check_schedules(config, sampling.IPRConfig(budget=0), N, [n])
  )
  sampler = _verdict(lambda: _srm(config, unknown, record=False))
  assert sampler == evaluation
  if refused is None:
    assert sampler is None
  else:
    assert sampler is not None and re.match(refused, sampler), sampler
    traced = _verdict(lambda: jax.jit(lambda u: _srm(config, u, record=False).nfe)(unknown))
    assert traced is not None


def test_a_jitted_srm_sample_checks_every_count():
  """Under jit the counts are unknown: a setting degenerate only for some counts is refused
  (10 steps at overlap 0.5, adaptive: n = 16 repeats starts, n = 4 does not)."""
  config = sampling.SamplerConfig(max_steps=10, overlap=0.5)
  unknown = np.zeros((1, N), bool)
  unknown[0, :4] = True
  assert int(_srm(config, unknown, record=False).nfe[0]) > 0
  with pytest.raises(ValueError, match=r"max_steps=10 and overlap=0\.5 .* for n=\d+ patches"):
    jax.jit(lambda u: _srm(config, u, record=False).nfe)(unknown)


def test_ipr_regenerates_every_patch_with_repeated_starts():
  """IPR's regeneration of k = 12 patches with graph_sequential at 3 steps per patch and overlap
  0.75 (13 steps: L = 3, starts 0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8): the times fed to the
  denoiser at every pass are the schedule's (the re-noised patches take the block columns in
  some order; every other patch is at 0)."""
  ipr_config = sampling.IPRConfig(
      budget=2, steps_per_patch=3, overlap=0.75, resampling_ratio=0.75, schedule="graph_sequential"
  )
  sampler_config = sampling.SamplerConfig(stochasticity=0.0, clamp_noise=False)
  sampling.check_schedules(sampler_config, ipr_config, N, [N])  # allowed
  table = schedule.schedule_table(N, 3, 0.75, kind="graph_sequential")
  assert table.max_steps[12] == 12 and table.block_len[12] == 3
  starts = table.block_starts[12, :12]
  np.testing.assert_array_equal(starts, [0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8])
  steps = np.arange(12)[:, None]
  age = steps - starts[None]
  by_block = np.where(age < 0, 1.0, np.clip((3 - age) / 3, 0, 1))  # [pass, block]
  recorded = []

  def denoise(z, t):
    jax.debug.callback(lambda t: recorded.append(np.asarray(t)), t[..., 0], ordered=True)
    return _denoise(z, t)

  batch = 2
  z = np.random.default_rng(3).uniform(-1, 1, (batch, 4, 4, 1)).astype(np.float32)
  result = sampling.ipr_refine(
      sampling.Denoiser(denoise, 1, mnist_sudoku.dependency_matrix(2)),
      sampling.Puzzles(
          sampling.puzzle_keys(jax.random.key(4), jnp.arange(batch)), noise=np.zeros_like(z)
      ),
      z,
      sampler_config,
      ipr_config,
      candidates=np.ones((batch, N), bool),
  )
  jax.effects_barrier()
  resampled = np.asarray(result.resampled)  # [budget, B, N]
  assert resampled.sum(-1).tolist() == [[12, 12], [12, 12]]
  rows = np.stack(recorded).reshape(2, 12, batch, N)  # [iteration, pass, B, N]
  for j in range(2):
    for b in range(batch):
      chosen = resampled[j, b]
      assert not np.any(rows[j, :, b, ~chosen])
      np.testing.assert_allclose(
          np.sort(rows[j, :, b, chosen].T, axis=1), np.sort(by_block, axis=1), atol=1e-7
      )
