"""Tests for ipr_jax.sampling: greedy SRM and IPR on batches of puzzles.

Test data is made with numpy (eager JAX ops would each compile), and the
jitted programs are shared between tests where they can be: compilation is
most of this file's CPU time.
"""

import dataclasses
import functools
import json
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax import sampling
from ipr_jax.models.denoiser import DenoiserOutput
from ipr_jax.noise import schedule

# ---------------------------------------------------------------------------
# Test data and fake denoisers.


def _pixels(patch_values, patch_size):
  """[B, gh, gw] -> [B, H, W, 1] by repeating each patch value (numpy)."""
  x = np.repeat(np.repeat(np.asarray(patch_values), patch_size, 1), patch_size, 2)
  return x[..., None].astype(np.float32)


def _random_mask(seed, grid, patch_size, num_unknown):
  """Pixel mask [B, H, W, 1] with num_unknown[b] random unknown patches."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((len(num_unknown), grid[0] * grid[1]), np.float32)
  for b, k in enumerate(num_unknown):
    rows[b, rng.permutation(rows.shape[1])[:k]] = 1.0
  return _pixels(rows.reshape((-1,) + grid), patch_size)


def _unknown(mask, patch_size):
  return np.asarray(mask)[:, ::patch_size, ::patch_size, 0].reshape(mask.shape[0], -1) > 0.5


def _uniform(seed, shape, low=-1.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_jit_puzzle_keys = jax.jit(sampling.puzzle_keys)


def _keys(ids, seed=0):
  return _jit_puzzle_keys(jax.random.key(seed), jnp.asarray(ids))


def fixed_sigma_denoiser(x, patch_sigma, patch_size, gain=1.0):
  """Velocity towards the clean image x, scaled by `gain`; fixed patch sigmas.

  gain = 1 is the oracle: from z = (1 - t) x + t eps and u = eps - x (spec
  §2.1), u = (z - x) / t for t > 0, so x_hat = z - t u = x exactly. Other gains
  give x_hat = (1 - gain) z + gain x, which depends on the path (and noise).
  sigma is the fixed per-patch table `patch_sigma` [B, gh, gw].
  """
  sigma = jnp.repeat(jnp.repeat(patch_sigma, patch_size, 1), patch_size, 2)[..., None]

  def denoise(z, t):
    u = gain * jnp.where(t > 0, (z - x) / jnp.where(t > 0, t, 1.0), 0.0)
    return DenoiserOutput(u=u, v=jnp.full_like(z, 0.5), logvar=2 * jnp.log(sigma), sigma=sigma)

  return denoise


def toy_denoiser(patch_size, scale=1.0):
  """A cheap per-example denoiser whose sigma depends on the state."""

  def denoise(z, t):
    b, h, w, _ = z.shape
    u = scale * jnp.tanh(z) * (0.5 + t) + 0.1
    pooled = (
        z.mean(-1).reshape(b, h // patch_size, patch_size, w // patch_size, patch_size).mean((2, 4))
    )
    sigma = jnp.repeat(jnp.repeat(jnp.exp(jnp.sin(3.0 * pooled)), patch_size, 1), patch_size, 2)[
        ..., None
    ]
    return DenoiserOutput(u=u, v=jax.nn.sigmoid(z), logvar=2 * jnp.log(sigma), sigma=sigma)

  return denoise


def reference_rows(unknown, sigma, steps_per_patch, overlap):
  """The reference's scheduling-matrix algorithm (spec §4.4) for fixed sigmas.

  Args:
    unknown: [N] bool.
    sigma: [N] patch sigmas (constant over steps).
    steps_per_patch, overlap: the schedule.

  Returns:
    (t_rows [max_steps, N], order, order_steps) of one puzzle.
  """
  s = schedule.make_schedule(int(unknown.sum()), steps_per_patch, overlap)
  max_steps, starts, proto = s.max_steps, s.block_starts, s.prototype
  matrix = np.tile(unknown.astype(np.float32), (max_steps + 1, 1))
  waiting = unknown.copy()
  counter, target, rows, order, steps = 0, 0, [], [], []
  for step in range(max_steps):
    rows.append(matrix[step].copy())
    predict = target == step
    if predict:
      counter += 1
      target = starts[counter]
    if predict and waiting.any():
      q = int(np.argmin(sigma + (~waiting) * (sigma.max() + 1)))
      waiting[q] = False
      order.append(q)
      steps.append(step)
      length = min(len(proto), max_steps - step)
      matrix[step : step + length, q] = np.minimum(proto[:length], matrix[step : step + length, q])
      if step + length < max_steps:
        matrix[step + length :, q] = 0
      matrix[max_steps] = 0
  return np.array(rows).reshape(max_steps, -1), order, steps


# ---------------------------------------------------------------------------
# Greedy SRM.


@functools.lru_cache(maxsize=None)
def _srm_run(steps_per_patch, overlap, stochasticity, clamp_noise, gain):
  """A jitted SRM run (patch size 1) with recorded rows; one compile per setting."""
  config = sampling.SamplerConfig(
      steps_per_patch, overlap, stochasticity=stochasticity, clamp_noise=clamp_noise
  )

  @jax.jit
  def run(x, patch_sigma, mask, noise, keys):
    return sampling.srm_sample(
        sampling.Denoiser(fixed_sigma_denoiser(x, patch_sigma, 1, gain), 1),
        sampling.Puzzles(keys, image=x, mask=mask, noise=noise),
        config,
        record=True,
    )

  return run


@pytest.fixture(scope="module")
def ms_oracle_run():
  """Three 9x9 one-pixel-cell puzzles (n = 61, 56, 81) with tied sigmas."""
  x = _uniform(1, (3, 9, 9, 1))
  mask = _random_mask(5, (9, 9), 1, [61, 56, 81])
  # Few distinct values: many ties.
  patch_sigma = (np.random.default_rng(6).integers(0, 6, (3, 9, 9)) * 0.25 + 0.5).astype(np.float32)
  out = _srm_run(3, 0.0, 0.5, True, 1.0)(
      x, patch_sigma, mask, _normal(7, x.shape), _keys([0, 1, 2])
  )
  return x, mask, patch_sigma, jax.device_get(out)


def test_oracle_srm_reproduces_the_image_and_keeps_given_cells(ms_oracle_run):
  x, mask, _, out = ms_oracle_run
  np.testing.assert_allclose(out.z, x, atol=2e-5)
  given = mask == 0
  np.testing.assert_array_equal(out.z[given], x[given])
  # Given patches are never noised: their time is 0 at every step.
  assert np.all(out.t_rows[:, ~_unknown(mask, 1)] == 0)
  np.testing.assert_array_equal(out.nfe, [3 * 61, 3 * 56, 3 * 81])


def test_generation_order_is_ascending_sigma_with_ties_to_lowest_index(ms_oracle_run):
  _, mask, patch_sigma, out = ms_oracle_run
  sig = patch_sigma.reshape(3, -1)
  unknown = _unknown(mask, 1)
  for b in range(3):
    ids = np.flatnonzero(unknown[b])
    expected = ids[np.argsort(sig[b, ids], kind="stable")]
    np.testing.assert_array_equal(out.order[b, : len(ids)], expected)
    assert np.all(out.order[b, len(ids) :] == -1)
    # The reference's S-matrix algorithm gives the same order, steps and rows
    # (n = 61: starts 0, 2, 5, ...; n = 56: L = 4 with a truncated last block).
    rows, order, steps = reference_rows(unknown[b], sig[b], 3, 0.0)
    np.testing.assert_array_equal(out.order[b, : len(ids)], order)
    np.testing.assert_array_equal(out.order_step[b, : len(ids)], steps)
    np.testing.assert_array_equal(out.t_rows[: len(rows), b], rows)
    assert np.all(out.t_rows[len(rows) :, b] == 0)


@pytest.mark.parametrize(
    "steps_per_patch,overlap,num_unknown",
    [
        (10, 0.8, [17, 13, 19, 1]),  # L = 11 truncated; starts 0, 1, 3; n = 1
        (30, 0.9, [9, 12, 16, 2]),  # L = 31 in float32
    ],
)
def test_time_rows_match_the_reference_matrix_algorithm(steps_per_patch, overlap, num_unknown):
  mask = _random_mask(8, (5, 5), 1, num_unknown)
  patch_sigma = _uniform(9, (4, 5, 5), 0.0, 1.0)
  x, noise = _uniform(10, (4, 5, 5, 1)), _normal(11, (4, 5, 5, 1))
  run = _srm_run(steps_per_patch, overlap, 0.0, False, 0.9)
  out = jax.device_get(run(x, patch_sigma, mask, noise, _keys([0, 1, 2, 3])))
  unknown = _unknown(mask, 1)
  for b in range(4):
    rows, order, _ = reference_rows(unknown[b], patch_sigma[b].ravel(), steps_per_patch, overlap)
    np.testing.assert_array_equal(out.t_rows[: len(rows), b], rows)
    np.testing.assert_array_equal(out.order[b, : len(order)], order)
    assert out.nfe[b] == len(rows)
  # Stochasticity 0 without clamp noise is deterministic: keys do not matter.
  other = run(x, patch_sigma, mask, noise, _keys([4, 5, 6, 7], seed=1))
  np.testing.assert_array_equal(other.z, out.z)
  if steps_per_patch == 10:  # the reference's clamp noise: tiny but present
    noisy = _srm_run(steps_per_patch, overlap, 0.0, True, 0.9)(
        x, patch_sigma, mask, noise, _keys([0, 1, 2, 3])
    )
    diff = float(np.abs(np.asarray(noisy.z) - out.z).max())
    assert 0 < diff < 1e-4, diff


# ---------------------------------------------------------------------------
# NFE (spec §4.6), with oracle IPR checks.

_DETERMINISTIC = dict(stochasticity=0.0, clamp_noise=False)


def test_nfe_even_pixels():
  fn = jax.jit(
      lambda keys: sampling.srm_ipr(
          sampling.Denoiser(toy_denoiser(1), 1),
          sampling.Puzzles(keys, noise=jnp.zeros((1, 8, 8, 3))),
          sampling.SamplerConfig(30, 0.9, **_DETERMINISTIC),
          sampling.IPRConfig(budget=30, steps_per_patch=30, overlap=0.9),
      )
  )
  result = jax.device_get(fn(_keys([0])))
  assert int(result.nfe[0]) == 219 + 30 * 75 == 2469
  assert np.all(result.initial_order >= 0)  # all 64 generated
  np.testing.assert_array_equal(result.nfe_per_budget[:, 0], 219 + 75 * np.arange(31))
  assert np.all(result.resampled.sum(-1) == 16)


def test_nfe_counting_polygons():
  # cp_test on a 16x16 grid (n = 256): SRM 265 passes, each IPR iteration 73 (k = 64).
  fn = jax.jit(
      lambda keys: sampling.srm_ipr(
          sampling.Denoiser(toy_denoiser(1), 1),
          sampling.Puzzles(keys, noise=jnp.zeros((1, 16, 16, 3))),
          sampling.SamplerConfig(10, 0.9, **_DETERMINISTIC),
          sampling.IPRConfig(budget=30, steps_per_patch=10, overlap=0.9),
      )
  )
  result = jax.device_get(fn(_keys([0])))
  assert int(result.nfe[0]) == 265 + 30 * 73 == 2455
  np.testing.assert_array_equal(result.nfe_per_budget[:, 0], 265 + 73 * np.arange(31))
  assert np.all(result.resampled.sum(-1) == 64)


def test_nfe_sudoku_hard_and_oracle_ipr():
  num_unknown = [55, 56, 61, 63, 70, 81]
  batch = len(num_unknown)
  mask = _random_mask(10, (9, 9), 1, num_unknown)
  x = _uniform(11, (batch, 9, 9, 1))
  patch_sigma = _uniform(12, (batch, 9, 9), 0.0, 1.0)
  fn = jax.jit(
      lambda keys, x, mask: sampling.srm_ipr(
          sampling.Denoiser(fixed_sigma_denoiser(x, patch_sigma, 1), 1),
          sampling.Puzzles(keys, image=x, mask=mask, noise=jnp.asarray(_normal(13, x.shape))),
          sampling.SamplerConfig(3, 0.0, **_DETERMINISTIC),
          sampling.IPRConfig(budget=30, steps_per_patch=10, overlap=0.8),
      )
  )
  result = jax.device_get(fn(_keys(range(batch)), x, mask))
  expected = [3 * n + 30 * (2 * (n // 4) + 8) for n in num_unknown]
  np.testing.assert_array_equal(result.nfe, expected)
  unknown = _unknown(mask, 1)
  for b, n in enumerate(num_unknown):
    assert np.all(result.initial_order[b, :n] >= 0)
    assert np.all(result.resampled[:, b].sum(-1) == n // 4)
    assert not np.any(result.resampled[:, b] & ~unknown[b])
  # The oracle regenerates the clean image; given cells stay as given.
  np.testing.assert_allclose(result.z, x, atol=2e-5)
  np.testing.assert_array_equal(result.z[mask == 0], x[mask == 0])


def test_nfe_sudoku_corrupted_and_oracle_correction():
  x = _uniform(12, (2, 9, 9, 1))
  patch_sigma = _uniform(13, (2, 9, 9), 0.0, 1.0)
  fn = jax.jit(
      lambda keys, x: sampling.srm_ipr(
          sampling.Denoiser(fixed_sigma_denoiser(x, patch_sigma, 1), 1),
          sampling.Puzzles(keys, image=x, noise=jnp.zeros_like(x)),
          sampling.SamplerConfig(3, 0.0, **_DETERMINISTIC),
          sampling.IPRConfig(
              budget=15, steps_per_patch=10, overlap=0.8, mode="correction", num_corruption_swaps=5
          ),
      )
  )
  result = jax.device_get(fn(_keys([0, 1]), x))
  np.testing.assert_array_equal(result.nfe, [15 * 48] * 2)
  assert np.all(result.resampled.sum(-1) == 20)
  assert np.all(result.initial_order == -1)
  # Budget 0 is the corrupted grid (cells swapped, nothing generated yet);
  # every cell re-noised at least once is back to the clean value.
  clean = x[0, ..., 0]
  corrupted = result.iterates[0, 0, ..., 0]
  assert 2 <= np.sum(corrupted != clean) <= 10
  np.testing.assert_array_equal(np.sort(corrupted.ravel()), np.sort(clean.ravel()))
  touched = result.resampled[:, 0].any(0).reshape(9, 9)
  final = result.z[0, ..., 0]
  np.testing.assert_allclose(final[touched], clean[touched], atol=2e-5)
  np.testing.assert_array_equal(final[~touched], corrupted[~touched])


# ---------------------------------------------------------------------------
# Batching, keys, jit / pmap, immediate stop, iterates.

_ACCEPTED_VALUE = 0.75  # given content of pixel (0, 0) of puzzle 0 only


def _standard_inputs():
  """Four 8x8x2 puzzles with 2x2 patches; only puzzle 0 passes `_verify`."""
  image = _uniform(13, (4, 8, 8, 2))
  mask = _random_mask(14, (4, 4), 2, [5, 8, 11, 14])
  mask[:, :2, :2] = 0.0  # patch 0 is given in every puzzle
  image[0, 0, 0, 0] = _ACCEPTED_VALUE
  return image, mask, _normal(15, image.shape)


def _verify(z):
  return z[:, 0, 0, 0] == _ACCEPTED_VALUE


_BATCH_CONFIGS = dict(
    sampler_config=sampling.SamplerConfig(3, 0.5, stochasticity=0.5),
    ipr_config=sampling.IPRConfig(budget=2, steps_per_patch=4, overlap=0.5, immediate_stop=True),
    verify_fn=_verify,
)


@jax.jit
@chex.assert_max_traces(n=2)  # batch 4 and batch 1, however often it is called
def _batch_run(scale, keys, image, mask, noise):
  return sampling.srm_ipr(
      sampling.Denoiser(toy_denoiser(2, scale), 2),
      sampling.Puzzles(keys, image=image, mask=mask, noise=noise),
      **_BATCH_CONFIGS,
  )


@pytest.fixture(scope="module")
def batch_run():
  image, mask, noise = _standard_inputs()
  keys = _keys([7, 3, 11, 5])
  return (keys, image, mask, noise), jax.device_get(_batch_run(1.0, keys, image, mask, noise))


def test_batch_equals_puzzles_alone(batch_run):
  (keys, image, mask, noise), together = batch_run
  for b in range(4):
    alone = jax.device_get(
        _batch_run(1.0, keys[b : b + 1], image[b : b + 1], mask[b : b + 1], noise[b : b + 1])
    )
    np.testing.assert_allclose(alone.z[0], together.z[b], atol=1e-6)
    np.testing.assert_array_equal(alone.initial_order[0], together.initial_order[b])
    np.testing.assert_array_equal(alone.resampled[:, 0], together.resampled[:, b])
    assert alone.nfe[0] == together.nfe[b]
    np.testing.assert_allclose(alone.iterates[:, 0], together.iterates[:, b], atol=1e-6)
  # Different puzzle keys give different refinements; given cells are kept.
  assert not np.array_equal(together.resampled[:, 2], together.resampled[:, 3])
  np.testing.assert_array_equal(together.z[mask[..., 0] == 0], image[mask[..., 0] == 0])
  # The jitted sampler does not retrace for new values (assert_max_traces).
  again = _batch_run(1.0, _keys([0, 1, 2, 3], seed=1), image, 1 - mask, noise)
  assert not np.allclose(again.z, together.z)


def test_pmap_matches_jit(batch_run):
  devices = jax.local_devices()
  assert len(devices) >= 2, "conftest sets two host devices"
  (keys, image, mask, noise), expected = batch_run

  def shard(x):
    return x.reshape((2, 2) + x.shape[1:])

  p_run = jax.pmap(
      lambda scale, keys, image, mask, noise: sampling.srm_ipr(
          sampling.Denoiser(toy_denoiser(2, scale), 2),
          sampling.Puzzles(keys, image=image, mask=mask, noise=noise),
          **_BATCH_CONFIGS,
      ),
      in_axes=(None, 0, 0, 0, 0),
      devices=devices[:2],
  )
  got = jax.device_get(p_run(1.0, shard(keys), shard(image), shard(mask), shard(noise)))
  np.testing.assert_allclose(got.z.reshape(expected.z.shape), expected.z, atol=1e-6)
  np.testing.assert_array_equal(got.nfe.reshape(-1), expected.nfe)


def test_immediate_stop_and_iterates(batch_run):
  (_, image, mask, _), result = batch_run
  np.testing.assert_array_equal(result.stop_budget, [0, -1, -1, -1])
  # The stopped puzzle keeps its SRM sample, a flat curve and its SRM passes.
  srm_nfe = [schedule.max_steps(n, 3, 0.5) for n in _unknown(mask, 2).sum(-1)]
  np.testing.assert_array_equal(result.nfe_per_budget[0], srm_nfe)
  np.testing.assert_array_equal(result.nfe_per_budget[:, 0], srm_nfe[0])
  np.testing.assert_array_equal(result.iterates[:, 0], np.repeat(result.iterates[:1, 0], 3, axis=0))
  np.testing.assert_array_equal(result.z[0], result.iterates[0, 0])
  assert not np.any(result.resampled[:, 0])
  # The others run on: k = max(1, n // 4) patches and 2k + 2 passes each time.
  for b, n in enumerate(_unknown(mask, 2).sum(-1)[1:], start=1):
    k = max(1, n // 4)
    assert np.all(result.resampled[:, b].sum(-1) == k)
    np.testing.assert_array_equal(
        np.diff(result.nfe_per_budget[:, b]), schedule.max_steps(k, 4, 0.5)
    )
  # The iterates are the sample after each budget: budget 0 the SRM sample, the last one z.
  assert result.iterates.shape == (3,) + image.shape
  np.testing.assert_array_equal(result.iterates[-1], result.z)
  assert not np.array_equal(result.iterates[0, 1:], result.iterates[-1, 1:])
  for iterate in result.iterates:  # given cells as given after every budget
    np.testing.assert_array_equal(iterate[mask[..., 0] == 0], image[mask[..., 0] == 0])


# ---------------------------------------------------------------------------
# IPR pieces.


@pytest.mark.parametrize("ratio", [0.25, 0.1])
def test_resample_mask_has_exactly_k_candidates(ratio):
  counts = [81, 55, 30, 3, 1]
  rng = np.random.default_rng(16)
  candidates = np.zeros((len(counts), 81), bool)
  for i, count in enumerate(counts):
    candidates[i, rng.permutation(81)[:count]] = True
  draw = jax.jit(
      jax.vmap(jax.vmap(sampling.resample_mask, in_axes=(0, None, None)), in_axes=(None, 0, None)),
      static_argnums=2,
  )
  keys = jax.random.split(jax.random.key(16), 400)
  masks = np.asarray(draw(keys, candidates, ratio))  # [5, 400, 81]
  for i, count in enumerate(counts):
    k = max(1, int(count * ratio))
    assert np.all(masks[i].sum(-1) == k), (count, ratio)
    assert not np.any(masks[i] & ~candidates[i])
    if k < count:  # roughly uniform over the candidates
      freq = masks[i][:, candidates[i]].mean(0)
      assert np.all(np.abs(freq - k / count) < 0.12), freq
  assert list(sampling.num_resampled_table(81, 1.0)[[0, 1, 81]]) == [1, 1, 81]


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.25])
def test_bad_ratio_raises(ratio):
  with pytest.raises(ValueError, match="resampling_ratio"):
    sampling.resample_mask(jax.random.key(0), jnp.ones(9, bool), ratio)
  with pytest.raises(ValueError, match="resampling_ratio"):
    sampling.IPRConfig(resampling_ratio=ratio)


def test_bad_config_values_raise():
  with pytest.raises(ValueError, match="top_k=2 needs schedule='adaptive'"):
    sampling.SamplerConfig(top_k=2, schedule="fixed")
  with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):
    sampling.IPRConfig(top_k=0)
  with pytest.raises(ValueError, match="schedule must be one of .*'ramp'"):
    sampling.SamplerConfig(schedule="ramp")
  with pytest.raises(ValueError, match="certainty_decay must lie in .*1.0"):
    sampling.IPRConfig(certainty_decay=1.0)
  with pytest.raises(ValueError, match="max_steps must be a non-negative integer, got -5"):
    sampling.SamplerConfig(max_steps=-5)
  with pytest.raises(ValueError, match="noise_type"):
    sampling.IPRConfig(noise_type="gaussian")
  with pytest.raises(ValueError, match="mode"):
    sampling.IPRConfig(mode="repair")
  with pytest.raises(ValueError, match="patch_size"):
    sampling.unknown_patches(np.ones((1, 9, 9, 1)), 2)
  with pytest.raises(ValueError, match="keys"):
    sampling.srm_sample(
        sampling.Denoiser(toy_denoiser(1), 1),
        sampling.Puzzles(jax.random.key(0), noise=np.zeros((2, 3, 3, 1))),
        sampling.SamplerConfig(),
        unknown=np.ones((2, 9), bool),
    )
  with pytest.raises(ValueError, match="patch vector"):
    sampling.srm_sample(
        sampling.Denoiser(toy_denoiser(1), 1),
        sampling.Puzzles(_keys([0, 1]), noise=np.zeros((2, 3, 3, 1))),
        sampling.SamplerConfig(),
        unknown=np.ones((2, 8), bool),
    )


def test_corruption_swaps_two_cells_in_different_rows_and_columns():
  digits = np.arange(81, dtype=np.float32).reshape(9, 9)
  image = np.concatenate([_pixels(digits[None], 2)[0]] * 2, -1)  # [18, 18, 2]
  corrupt = jax.jit(jax.vmap(lambda k: sampling.corrupt_by_swaps(k, image, 2, 1)))
  keys = jax.random.split(jax.random.key(17), 200)
  pairs = set()
  for out in np.asarray(corrupt(keys)):
    cells = out[::2, ::2, 0]
    changed = np.argwhere(cells != digits)
    assert len(changed) == 2
    (r0, c0), (r1, c1) = changed
    assert r0 != r1 and c0 != c1
    assert cells[r0, c0] == digits[r1, c1] and cells[r1, c1] == digits[r0, c0]
    np.testing.assert_array_equal(out, np.repeat(np.repeat(out[::2, ::2], 2, 0), 2, 1))
    pairs.add((r0, r1, c0, c1))
  assert len(pairs) > 150  # many different swaps


# ---------------------------------------------------------------------------
# Parity with the reference's deterministic greedy runs (tests/golden).


def _golden_denoiser(golden_dir, case):
  from ipr_jax.conversion.state_dict import unet_params_from_state_dict
  from ipr_jax.models.denoiser import srm_head
  from ipr_jax.models.unet import UNet

  files = [golden_dir / f"unet_{case}_tiny.npz"]
  if case == "ep":
    files.append(golden_dir / "unet_ep_tiny_sd_decoder.npz")
  state = {}
  for path in files:
    with np.load(path) as f:
      state.update({k[3:]: f[k] for k in f.files if k.startswith("sd/")})
  if case == "ms":
    model = UNet(
        hid_dims=[32] * 6,
        attention=[False] * 4 + [True] * 2,
        d_in=1,
        d_out=3,
        num_blocks=1,
        t_emb_dim=64,
        d_emb=256,
        num_head_channels=16,
        dropout=0.0,
    )
    patch = 28
  else:
    model = UNet(
        hid_dims=[32, 64, 64, 64],
        attention=[False, False, True, True],
        d_in=3,
        d_out=7,
        num_blocks=2,
        t_emb_dim=64,
        d_emb=256,
        num_head_channels=32,
        dropout=0.0,
    )
    patch = 4
  params = unet_params_from_state_dict(state, model)

  def denoise(z, t):
    return srm_head(model.apply({"params": params}, z, t), patch)

  return denoise, patch


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def _golden_setup(golden_dir, case):
  golden = dict(np.load(golden_dir / f"greedy_{case}_tiny.npz"))
  cfg = json.loads(str(golden["config_json"]))["sampler"]
  z_t = _nhwc(golden["z_T"])
  if case == "ms":  # The given content: masked (0 under the mask), re-pasted as (1 - mask) masked.
    mask, masked = _nhwc(golden["mask"]), _nhwc(golden["masked"])
  else:
    mask = masked = None
  config = sampling.SamplerConfig(
      cfg["steps_per_patch"],
      cfg["overlap"],
      stochasticity=cfg["stochasticity"],
      temperature=cfg["temperature"],
      clamp_noise=False,
  )
  return golden, (z_t, masked, mask), config


def _golden_puzzles(masked, mask, z_t):
  """The golden run's puzzle: its given content, mask and initial noise z_T (the SRM start
  masked + mask z_T)."""
  return sampling.Puzzles(_keys([0]), image=masked, mask=mask, noise=z_t)


def test_greedy_matches_reference_run(golden_dir):
  """The whole Even Pixels greedy run (255 calls): selections, times, sigmas and the sample."""
  case = "ep"
  denoise, patch = _golden_denoiser(golden_dir, case)
  golden, (z_t, masked, mask), config = _golden_setup(golden_dir, case)
  start = time.time()
  out = jax.device_get(
      jax.jit(
          lambda z_t: sampling.srm_sample(
              sampling.Denoiser(denoise, patch),
              _golden_puzzles(masked, mask, z_t),
              config,
              record=True,
          )
      )(z_t)
  )
  elapsed = time.time() - start
  calls = int(golden["num_denoiser_calls"])
  n = len(golden["selected_patches"])
  assert int(out.nfe[0]) == calls
  np.testing.assert_array_equal(out.order[0, :n], golden["selected_patches"])
  np.testing.assert_array_equal(out.order_step[0, :n], golden["selection_steps"])
  np.testing.assert_array_equal(out.t_rows[:calls, 0], golden["t_rows"])
  np.testing.assert_allclose(out.sigma_rows[:calls, 0], golden["sigma_rows"], rtol=1e-4, atol=1e-5)
  max_diff = float(np.abs(out.z - _nhwc(golden["sample"])).max())
  print(f"greedy {case}: {calls} calls in {elapsed:.1f}s, " f"max |z - ref| = {max_diff:.2e}")
  assert max_diff < 1e-4
  # The reference's real clamp noise moved it by ~1e-5.
  noisy = jax.device_get(
      sampling.srm_sample(
          sampling.Denoiser(denoise, patch),
          _golden_puzzles(masked, mask, z_t),
          dataclasses.replace(config, clamp_noise=True),
      )
  )
  np.testing.assert_array_equal(noisy.order[0], golden["selected_patches"])
  np.testing.assert_allclose(noisy.z, _nhwc(golden["sample_with_clamp_noise"]), atol=1e-4)


# The MNIST-Sudoku-shaped run has 183 calls of a 252x252 U-Net (over 2 CPU minutes); its first
# 40 steps (given cells, the first 14 selections) are checked here: every row of patch times and
# of sigmas the model returned, which depend on the sample at every step. The Even Pixels run
# above covers the loop to its end.
_MS_PREFIX_STEPS = 40


def test_greedy_ms_run_prefix_matches_reference(golden_dir):
  denoise, patch = _golden_denoiser(golden_dir, "ms")
  golden, (z_t, masked, mask), config = _golden_setup(golden_dir, "ms")
  steps = _MS_PREFIX_STEPS
  out = jax.device_get(
      jax.jit(
          lambda z_t: sampling.srm_sample(
              sampling.Denoiser(denoise, patch),
              _golden_puzzles(masked, mask, z_t),
              config,
              record=True,
              step_limit=steps,
          )
      )(z_t)
  )
  assert int(out.nfe[0]) == steps
  selected = int(np.sum(golden["selection_steps"] < steps))
  assert selected >= 10
  np.testing.assert_array_equal(out.order[0, :selected], golden["selected_patches"][:selected])
  np.testing.assert_array_equal(out.order_step[0, :selected], golden["selection_steps"][:selected])
  np.testing.assert_array_equal(out.t_rows[:steps, 0], golden["t_rows"][:steps])
  np.testing.assert_allclose(
      out.sigma_rows[:steps, 0], golden["sigma_rows"][:steps], rtol=1e-4, atol=1e-5
  )


def test_greedy_ms_first_step_matches_reference(golden_dir):
  """The cheap part of the ms run: the first update, with the given cells."""
  denoise, patch = _golden_denoiser(golden_dir, "ms")
  golden, (z_t, masked, mask), config = _golden_setup(golden_dir, "ms")
  out = jax.device_get(
      sampling.srm_sample(
          sampling.Denoiser(denoise, patch),
          _golden_puzzles(masked, mask, z_t),
          config,
          record=True,
          step_limit=1,
      )
  )
  assert golden["snapshot_steps"][0] == 1 and int(out.nfe[0]) == 1
  np.testing.assert_array_equal(out.order[0, :1], golden["selected_patches"][:1])
  np.testing.assert_array_equal(out.t_rows[0, 0], golden["t_rows"][0])
  np.testing.assert_allclose(out.sigma_rows[0, 0], golden["sigma_rows"][0], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.z, _nhwc(golden["z_snapshots"][:1]), atol=1e-4)
