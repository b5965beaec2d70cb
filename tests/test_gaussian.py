"""Tests for ipr_jax.noise.gaussian: clamping, closed forms and the reference's golden values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ipr_jax.noise.gaussian import DiagonalGaussian, approx_standard_normal_cdf


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


@pytest.fixture(scope="module")
def flow_golden(golden_dir):
  with np.load(golden_dir / "flow.npz") as f:
    return {k: _nhwc(f[k]) for k in f.files if k != "config_json"}


def test_from_std_clamps_and_derives_like_reference():
  std = jnp.array([0.0, 1e-9, 0.5, 1e5], jnp.float32)
  g = DiagonalGaussian.from_std(jnp.zeros(4), std)
  expected_std = np.float32([math.exp(-15), math.exp(-15), 0.5, math.exp(10)])
  np.testing.assert_array_equal(g.std, expected_std)
  np.testing.assert_array_equal(g.var, expected_std**2)
  np.testing.assert_array_equal(g.logvar, 2 * np.log(expected_std))


def test_from_var_clamps_and_derives_like_reference():
  var = jnp.array([0.0, 1e-20, 0.25, 1e12], jnp.float32)
  g = DiagonalGaussian.from_var(jnp.zeros(4), var)
  expected_var = np.float32([math.exp(-30), math.exp(-30), 0.25, math.exp(20)])
  np.testing.assert_array_equal(g.var, expected_var)
  np.testing.assert_array_equal(g.std, np.sqrt(expected_var))
  np.testing.assert_array_equal(g.logvar, np.log(expected_var))


def test_from_logvar_clamps_and_derives_like_reference():
  logvar = jnp.array([-100.0, -30.5, 0.0, 3.0, 25.0], jnp.float32)
  g = DiagonalGaussian.from_logvar(jnp.zeros(5), logvar)
  expected = np.float32([-30, -30, 0, 3, 20])
  np.testing.assert_array_equal(g.logvar, expected)
  np.testing.assert_allclose(g.var, np.exp(expected), rtol=1e-6)
  np.testing.assert_allclose(g.std, np.exp(0.5 * expected), rtol=1e-6)


def test_nll_matches_scipy_logpdf():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 5)).astype(np.float32)
  std = rng.uniform(0.1, 3.0, size=(3, 1)).astype(np.float32)
  y = rng.normal(size=(3, 5)).astype(np.float32)
  g = DiagonalGaussian.from_std(mean, std)
  np.testing.assert_allclose(g.nll(y), -stats.norm.logpdf(y, mean, std), rtol=1e-5, atol=1e-6)


def test_kl_matches_closed_form_of_two_normals():
  rng = np.random.default_rng(1)
  m1, m2 = rng.normal(size=(2, 100))
  s1, s2 = rng.uniform(0.05, 3.0, size=(2, 100))
  p = DiagonalGaussian.from_std(jnp.float32(m1), jnp.float32(s1))
  q = DiagonalGaussian.from_std(jnp.float32(m2), jnp.float32(s2))
  expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
  np.testing.assert_allclose(p.kl(q), expected, rtol=1e-4, atol=1e-5)
  to_standard = np.log(1 / s1) + (s1**2 + m1**2) / 2 - 0.5
  np.testing.assert_allclose(p.kl(), to_standard, rtol=1e-4, atol=1e-5)


def test_sample_moments_and_broadcast_shape():
  mean = jnp.full((4000, 1, 2), 3.0)
  std = jnp.full((4000, 1, 1), 0.5)
  g = DiagonalGaussian.from_std(mean, std)
  draws = g.sample(jax.random.key(0))
  assert draws.shape == (4000, 1, 2)
  assert abs(float(draws.mean()) - 3.0) < 0.03
  assert abs(float(draws.std()) - 0.5) < 0.02
  np.testing.assert_array_equal(g.reparameterize(jnp.zeros((4000, 1, 2))), mean)


def test_approx_cdf_matches_float64_formula_including_tails():
  # Within ~1 ulp of 1 everywhere; in particular no early saturation in the tails
  # (the value at u = -4.86 is ~1.2e-7 and must not come out as 0).
  u = np.linspace(-8.0, 8.0, 20001).astype(np.float32)
  u64 = u.astype(np.float64)
  exact = 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (u64 + 0.044715 * u64**3)))
  ours = np.asarray(approx_standard_normal_cdf(jnp.asarray(u)), np.float64)
  np.testing.assert_allclose(ours, exact, rtol=0, atol=9e-8)
  tail = np.float32(-4.86)
  assert float(approx_standard_normal_cdf(jnp.asarray(tail))) > 5e-8
  # It approximates the normal CDF to about 2e-4.
  np.testing.assert_allclose(ours, stats.norm.cdf(u64), atol=3e-4)


def test_discretized_log_likelihood_edges_and_floor():
  mean = jnp.zeros(5)
  std = jnp.full(5, 0.5)
  g = DiagonalGaussian.from_std(mean, std)
  x = jnp.array([-1.0, -0.9995, 0.0, 0.9995, 1.0])
  ll = np.asarray(g.discretized_log_likelihood(x), np.float64)
  cdf = lambda v: stats.norm.cdf(v / 0.5)
  # Below -0.999 the whole lower tail, above 0.999 the whole upper tail.
  np.testing.assert_allclose(ll[0], np.log(cdf(-1 + 1 / 255)), rtol=2e-3)
  np.testing.assert_allclose(ll[1], np.log(cdf(-0.9995 + 1 / 255)), rtol=2e-3)
  np.testing.assert_allclose(ll[2], np.log(cdf(1 / 255) - cdf(-1 / 255)), rtol=2e-3)
  np.testing.assert_allclose(ll[3], np.log(1 - cdf(0.9995 - 1 / 255)), rtol=2e-3)
  np.testing.assert_allclose(ll[4], ll[0], rtol=1e-6)
  far = DiagonalGaussian.from_std(jnp.zeros(1), jnp.full(1, 1e-3))
  np.testing.assert_allclose(
      far.discretized_log_likelihood(jnp.array([0.5])), math.log(1e-12), rtol=1e-6
  )


def test_golden_nll(flow_golden):
  g = flow_golden
  gauss = DiagonalGaussian.from_std(g["nll_mean"], g["nll_std_in"])
  np.testing.assert_allclose(gauss.std, g["nll_std_clamped"], rtol=1e-6, atol=0)
  np.testing.assert_allclose(gauss.logvar, g["nll_logvar"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gauss.nll(g["nll_target"]), g["nll_values"], rtol=1e-5, atol=1e-6)


def test_golden_discretized_log_likelihood(flow_golden):
  g = flow_golden
  gauss = DiagonalGaussian.from_var(g["dll_mean"], g["dll_var_in"])
  np.testing.assert_allclose(gauss.std, g["dll_std"], rtol=1e-6, atol=0)
  np.testing.assert_allclose(
      gauss.discretized_log_likelihood(g["dll_x"]), g["dll_values"], rtol=1e-5, atol=1e-6
  )


def test_golden_vlb_discretized_log_likelihood_from_golden_p(flow_golden):
  # p's mean/std as stored by the reference; the log-likelihood is a difference of
  # two CDF values near 1 in the tails, so compare probabilities there (a few ulp
  # of 1) and log-probabilities where they are well conditioned.
  g = flow_golden
  p = DiagonalGaussian.from_std(g["vlb_p_mean"], g["vlb_p_std"])
  ours = np.asarray(p.discretized_log_likelihood(g["vlb_x"]), np.float64)
  ref = g["vlb_disc_loglik_p"].astype(np.float64)
  np.testing.assert_allclose(np.exp(ours), np.exp(ref), rtol=0, atol=2.4e-7)
  conditioned = ref > math.log(1e-3)
  np.testing.assert_allclose(ours[conditioned], ref[conditioned], rtol=1e-5, atol=1e-6)


def test_gradients_are_finite_at_clamps():
  def loss(mean, std, y):
    gauss = DiagonalGaussian.from_std(mean, std)
    other = DiagonalGaussian.from_var(mean * 0.5, std**2 * 3.0)
    return (gauss.nll(y) + gauss.kl(other) + gauss.discretized_log_likelihood(y)).sum()

  std = jnp.array([0.0, 1e-9, 1e-3, 1.0, 1e6])
  grads = jax.grad(loss, argnums=(0, 1, 2))(
      jnp.linspace(-1, 1, 5), std, jnp.array([-1.0, -0.5, 0.0, 0.9995, 1.0])
  )
  for grad in grads:
    assert np.all(np.isfinite(grad))
