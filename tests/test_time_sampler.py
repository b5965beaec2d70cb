"""Tests for ipr_jax.noise.time_sampler: mean_beta times, add_zeros, loss-weight density."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.noise import time_sampler as ts

_BATCH = 2000
_sample = jax.jit(ts.mean_beta_times, static_argnums=(1, 2, 3, 4))


@pytest.fixture(scope="module")
def ep_draw():
  """EP-like draws (8 x 8 grid, sharpness 0.75) with histogram weights."""
  density = ts.loss_weight_density(
      jax.random.key(2), (8, 8), 0.75, num_samples=4000, chunk_size=_BATCH
  )
  t, w = _sample(jax.random.key(0), _BATCH, (8, 8), 0.75, False, density)
  return density, t, w


# Spec §3.1 a_n tables: (beta_sharpness, {n: a_n}, decimals shown in the spec).
A_N_TABLES = {
    "EP": (0.75, {64: 58.13, 32: 27.61, 16: 12.88, 8: 5.79, 4: 2.38, 2: 0.75}, 2),
    "CP": (
        0.5,
        {256: 168.2, 128: 80.9, 64: 38.75, 32: 18.40, 16: 8.59, 8: 3.86, 4: 1.58, 2: 0.5},
        None,
    ),
    "MS": (
        1.0,
        {
            81: 98.29,
            41: 46.84,
            40: 46.84,
            21: 22.01,
            20: 22.01,
            11: 10.05,
            10: 10.05,
            6: 5.42,
            5: 3.17,
            3: 1.0,
            2: 1.0,
        },
        2,
    ),
}


@pytest.mark.parametrize("task", sorted(A_N_TABLES))
def test_beta_concentration_matches_spec_table(task):
  sharpness, table, _ = A_N_TABLES[task]
  for n, expected in table.items():
    # The spec rounds to the shown digits.
    decimals = len(str(expected).split(".")[1])
    assert round(ts.beta_concentration(n, sharpness), decimals) == pytest.approx(expected), n


@pytest.mark.parametrize("n", [81, 1])
def test_split_total_keeps_sum_and_unit_range(n):
  total = jnp.float32(np.linspace(0.0, n * 0.999, 64))
  values = ts.split_total(jax.random.key(n), total, n, 1.0)
  assert values.shape == (64, n)
  assert np.all(values >= 0) and np.all(values <= 1)
  np.testing.assert_allclose(values.sum(axis=1), total, rtol=1e-5, atol=1e-4)


def test_times_with_mean_sum_to_mean_times_n():
  mean = jax.random.uniform(jax.random.key(0), (64,))
  t = ts.mean_beta_times_with_mean(jax.random.key(1), mean, (9, 9), 1.0)
  assert t.shape == (64, 9, 9)
  np.testing.assert_allclose(t.sum(axis=(1, 2)), mean * 81, rtol=1e-5, atol=1e-4)


def test_mean_beta_times_without_table_has_unit_weights():
  # Same batch and grid as the split test above, so the eager Beta draw is reused.
  t, w = ts.mean_beta_times(jax.random.key(0), 64, (9, 9), 1.0, False)
  assert t.shape == w.shape == (64, 9, 9)
  np.testing.assert_array_equal(w, 1.0)


def test_mean_beta_times_shapes_range_and_permutation(ep_draw):
  density, t, w = ep_draw
  assert t.shape == w.shape == (_BATCH, 8, 8)
  assert np.all((t >= 0) & (t <= 1))
  np.testing.assert_array_equal(w, ts.loss_weights(t, density))
  row_means = np.asarray(t.mean(axis=(1, 2)))
  # m ~ U[0, 1): mean 1/2, variance 1/12.
  assert abs(row_means.mean() - 0.5) < 0.05
  assert abs(row_means.var() - 1 / 12) < 0.015
  # Rows are permuted independently: the largest patch lands in many positions.
  argmax = np.asarray(t.reshape(_BATCH, 64).argmax(axis=1))
  assert len(np.unique(argmax)) > 40


def test_add_zeros_fraction_and_zero_weights():
  density = jnp.full((1000,), 1.0).at[:500].set(2.0)
  batch, n = _BATCH, 64
  t, w = _sample(jax.random.key(3), batch, (8, 8), 0.75, True, density)
  t = np.asarray(t).reshape(batch, n)
  w = np.asarray(w).reshape(batch, n)
  zeros = t == 0
  # Zeroed patches have weight 0; the others carry the histogram weights.
  np.testing.assert_array_equal(w[zeros], 0.0)
  expected_w = np.where(t < 0.5, (1 + 1e-6) / (2 + 1e-6), 1.0)
  np.testing.assert_allclose(w[~zeros], expected_w[~zeros], rtol=1e-6)
  # Count of zeros = #{i : (i + 1) / N < r}, r ~ U[0, 1): uniform on {0, ..., N - 1}.
  counts = zeros.sum(axis=1)
  assert counts.min() >= 0 and counts.max() <= n - 1
  assert abs(counts.mean() - (n - 1) / 2) < 2.0
  assert abs(np.mean(counts == 0) - 1 / n) < 0.015
  # After the final permutation zeros appear at every position, not only first.
  assert zeros[:, -1].mean() > 0.3


def test_loss_weights_formula():
  density = jnp.linspace(0.5, 1.5, 1000)
  t = jnp.array([0.0, 0.0005, 0.001, 0.5, 0.9999, 1.0])
  bins = np.array([0, 0, 1, 500, 999, 999])
  expected = (1 + 1e-6) / (np.asarray(density)[bins] + 1e-6)
  np.testing.assert_allclose(ts.loss_weights(t, density), expected, rtol=1e-6)


def test_density_of_uniform_times_is_flat():
  # With one patch, t = m ~ U[0, 1): the density is 1 everywhere.
  density = np.asarray(ts.loss_weight_density(jax.random.key(0), (1, 1), 1.0, num_samples=200_000))
  assert density.shape == (1000,)
  np.testing.assert_allclose(density.mean(), 1.0, rtol=1e-5)
  assert np.mean(np.abs(density - 1.0)) < 0.08


def test_density_of_two_patches_matches_closed_form():
  # N = 2, a_2 = 1 (sharpness 1): given L = 2m, t is uniform on
  # [max(L - 1, 0), min(L, 1)], so its density is -(ln t + ln(1 - t)) / 2.
  density = np.asarray(ts.loss_weight_density(jax.random.key(1), (1, 2), 1.0, num_samples=150_000))
  edges = np.linspace(0.0, 1.0, 51)

  def cdf(x):
    with np.errstate(divide="ignore", invalid="ignore"):
      a = np.where(x > 0, x * np.log(x), 0.0)
      b = np.where(x < 1, (1 - x) * np.log(1 - x), 0.0)
    return (2 * x - a + b) / 2  # antiderivative of the density, 0 at 0

  expected = np.diff(cdf(edges)) * 50  # mean density per group of 20 bins
  grouped = density.reshape(50, 20).mean(axis=1)
  np.testing.assert_allclose(grouped, expected, rtol=0.05)


def test_histogram_weights_average_one_over_sampled_times(ep_draw):
  density, _, _ = ep_draw
  # Fresh draws from the distribution the histogram was built from.
  _, w = _sample(jax.random.key(3), _BATCH, (8, 8), 0.75, False, density)
  assert abs(float(w.mean()) - 1.0) < 0.05
  # Rare times get larger weights than common ones.
  density = np.asarray(density)
  assert float(ts.loss_weights(jnp.float32(np.argmin(density) / 1000), density)) > 1.0
  assert float(ts.loss_weights(jnp.float32(np.argmax(density) / 1000), density)) < 1.0


def test_density_rejects_too_few_samples_and_bad_kernel():
  with pytest.raises(ValueError, match="minimum density"):
    ts.loss_weight_density(jax.random.key(0), (1, 1), 1.0, num_samples=100)
  with pytest.raises(ValueError, match="odd"):
    ts.loss_weight_density(jax.random.key(0), (1, 1), 1.0, blur_kernel_size=4)


def test_patch_to_pixel_is_kron_and_mask_helper():
  t = jnp.float32(np.random.default_rng(0).uniform(size=(2, 3, 4)))
  pixels = ts.patch_to_pixel(t, 5)
  assert pixels.shape == (2, 15, 20, 1)
  for b in range(2):
    np.testing.assert_array_equal(pixels[b, ..., 0], np.kron(np.asarray(t[b]), np.ones((5, 5))))
  mask = jnp.zeros_like(pixels).at[:, :5].set(1.0)
  t_masked, w_masked = ts.apply_condition_mask(pixels, 2 * pixels, mask)
  np.testing.assert_array_equal(t_masked[:, 5:], 0.0)
  np.testing.assert_array_equal(w_masked[:, :5], 2 * pixels[:, :5])
  with pytest.raises(ValueError):
    ts.patch_to_pixel(t, 0)
  with pytest.raises(ValueError):
    ts.apply_condition_mask(pixels, pixels, mask[:, :5])
  with pytest.raises(ValueError):
    ts.mean_beta_times(jax.random.key(0), 2, (0, 3), 1.0, False)
