"""Tests for ipr_jax.noise.flow: golden reference values, special cases and identities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.noise import flow

RTOL, ATOL = 1e-5, 1e-6


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


@pytest.fixture(scope="module")
def golden(golden_dir):
  with np.load(golden_dir / "flow.npz") as f:
    return {k: _nhwc(f[k]) for k in f.files if k != "config_json"}


def _full(a, like):
  return np.broadcast_to(np.asarray(a), like.shape)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("temperature", [1, 2])
def test_golden_reverse_kernel(golden, alpha, temperature):
  g = golden
  p = flow.reverse_kernel(g["u"], g["z"], g["t"], g["s"], g["v"], alpha, temperature)
  name = f"p_a{alpha}_T{temperature}"
  np.testing.assert_allclose(p.mean, g[f"{name}_mean"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(_full(p.std, g["z"]), g[f"{name}_std"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(_full(p.var, g["z"]), g[f"{name}_var"], rtol=RTOL, atol=ATOL)


def test_golden_reverse_kernel_with_v_outside_unit_interval(golden):
  g = golden
  p = flow.reverse_kernel(g["u"], g["z"], g["t"], g["s"], g["v_ext"], 0.5)
  np.testing.assert_allclose(p.mean, g["p_vext_a0.5_T1_mean"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(_full(p.std, g["z"]), g["p_vext_a0.5_T1_std"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_golden_sigma_and_gamma_helpers(golden, alpha):
  g = golden
  t, s = g["t"], g["s"]
  np.testing.assert_allclose(
      flow.sigma_small(t, s, alpha), g[f"sigma_small_a{alpha}"], rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(
      flow.sigma_large(t, s, alpha), g[f"sigma_large_a{alpha}"], rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(flow.gamma(t, s, alpha), g[f"gamma_a{alpha}"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      flow.sigma_learned(t, s, alpha, g["v"]), g[f"sigma_learned_a{alpha}"], rtol=RTOL, atol=ATOL
  )


def test_golden_x_from_u(golden):
  np.testing.assert_allclose(
      flow.x_from_u(golden["z"], golden["t"], golden["u"]),
      golden["x_from_u_z"],
      rtol=RTOL,
      atol=ATOL,
  )


def test_golden_vlb_pieces(golden):
  g = golden
  x, eps, t = g["vlb_x"], g["vlb_eps"], g["vlb_t"]
  s = t - np.float32(0.001)
  nll_mask = s < 1e-5
  s = np.where(nll_mask, np.float32(0), s)
  np.testing.assert_array_equal(s, g["vlb_s"])
  np.testing.assert_array_equal(nll_mask, g["vlb_nll_mask"])
  np.testing.assert_allclose(flow.z_t(x, eps, t), g["vlb_zt"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(flow.velocity_target(x, eps), g["vlb_ut_target"], rtol=RTOL, atol=ATOL)
  p = flow.reverse_kernel(g["vlb_mean_theta"], g["vlb_zt"], t, s, g["vlb_v"], 1.0)
  q = flow.posterior_q(x, eps, t, s)
  np.testing.assert_allclose(p.mean, g["vlb_p_mean"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(p.std, g["vlb_p_std"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(q.mean, g["vlb_q_mean"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(q.std, g["vlb_q_std"], rtol=RTOL, atol=ATOL)
  kl = q.kl(p)
  np.testing.assert_allclose(kl, g["vlb_kl_q_p"], rtol=RTOL, atol=ATOL)
  loglik = np.asarray(p.discretized_log_likelihood(x), np.float64)
  ref = g["vlb_disc_loglik_p"].astype(np.float64)
  # Tail log-likelihoods are differences of CDFs near 1: compare probabilities there.
  np.testing.assert_allclose(np.exp(loglik), np.exp(ref), rtol=0, atol=2.4e-7)
  conditioned = ref > math.log(1e-3)
  np.testing.assert_allclose(loglik[conditioned], ref[conditioned], rtol=RTOL, atol=ATOL)
  bits = np.where(nll_mask, -loglik, kl) / math.log(2.0)
  np.testing.assert_allclose(bits, g["vlb_bits"], rtol=RTOL, atol=ATOL)


def _kernel(t, s, alpha, v=0.5, variance="learned_range", temperature=1.0):
  rng = np.random.default_rng(3)
  u = jnp.float32(rng.normal(size=(len(t), 2)))
  z = jnp.float32(rng.normal(size=(len(t), 2)))
  t = jnp.float32(t)[:, None]
  s = jnp.float32(s)[:, None]
  v = jnp.full((len(t), 2), v, jnp.float32)
  return u, z, t, s, flow.reverse_kernel(u, z, t, s, v, alpha, temperature, variance)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_special_cases_of_reverse_step(alpha):
  zero_std = math.exp(-15)
  # t = s = 1 and t = s = 0: mean z, sigma 0 (std at the clamp).
  u, z, t, s, p = _kernel([1.0, 0.0], [1.0, 0.0], alpha)
  np.testing.assert_allclose(p.mean, z, rtol=1e-6)
  np.testing.assert_allclose(_full(p.std, z), zero_std, rtol=1e-6)
  # t in (0, 1) -> s = 0: deterministic jump to x_hat = z - t u.
  u, z, t, s, p = _kernel([0.3, 0.5, 0.999, 1e-3], [0.0] * 4, alpha)
  np.testing.assert_allclose(p.mean, z - t * u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_full(p.std, z), zero_std, rtol=1e-6)
  np.testing.assert_array_equal(flow.gamma(t, s, alpha), 0.0)
  # t = 1 -> s < 1: sigma_small = alpha s, sigma_large = alpha, gamma = s sqrt(1 - alpha^2).
  s_values = np.float32([0.0, 0.1, 0.5, 0.9, 0.999])
  t = jnp.ones(5)
  np.testing.assert_allclose(flow.sigma_small(t, s_values, alpha), alpha * s_values, rtol=1e-6)
  np.testing.assert_allclose(flow.sigma_large(t, s_values, alpha), np.full(5, alpha), rtol=1e-6)
  np.testing.assert_allclose(
      flow.gamma(t, s_values, alpha), s_values * math.sqrt(1 - alpha**2), rtol=1e-6, atol=1e-7
  )


def test_sigma_bounds_and_learned_range_endpoints():
  t = jnp.float32([0.9, 0.6, 0.3, 0.05])
  s = jnp.float32([0.5, 0.59, 0.1, 0.01])
  small = flow.sigma_small(t, s, 0.7)
  large = flow.sigma_large(t, s, 0.7)
  assert np.all(small <= large)
  np.testing.assert_allclose(flow.sigma_learned(t, s, 0.7, jnp.zeros(4)), small, rtol=1e-6)
  np.testing.assert_allclose(flow.sigma_learned(t, s, 0.7, jnp.ones(4)), large, rtol=1e-6)
  # gamma^2 + sigma_small^2 = s^2: z_s keeps the marginal noise level s.
  np.testing.assert_allclose(flow.gamma(t, s, 0.7) ** 2 + small**2, s**2, rtol=1e-5)
  # Zero bounds (t == 0 or s == 1) give exactly 0.
  zero_t = jnp.float32([0.0, 1.0])
  zero_s = jnp.float32([0.0, 1.0])
  np.testing.assert_array_equal(flow.sigma_learned(zero_t, zero_s, 0.7, jnp.full(2, 0.3)), 0.0)


def test_conversions_recover_x_and_eps():
  rng = np.random.default_rng(0)
  x = jnp.float32(rng.uniform(-1, 1, size=(2, 4, 4, 3)))
  eps = jnp.float32(rng.normal(size=(2, 4, 4, 3)))
  t = jnp.float32(rng.uniform(size=(2, 4, 4, 1)))
  z = flow.z_t(x, eps, t)
  u = flow.velocity_target(x, eps)
  np.testing.assert_allclose(flow.x_from_u(z, t, u), x, atol=2e-6)
  np.testing.assert_allclose(flow.eps_from_u(z, t, u), eps, atol=2e-6)
  np.testing.assert_allclose(flow.x_from_eps_and_u(eps, u), x, atol=1e-6)
  np.testing.assert_allclose(flow.eps_from_u_and_x(u, x), eps, atol=1e-6)


def test_true_velocity_with_sigma_small_equals_posterior():
  # p(z_s | z_t) with the exact velocity, alpha = 1 and v = 0 is q(z_s | x, eps).
  rng = np.random.default_rng(1)
  x = jnp.float32(rng.uniform(-1, 1, size=(64, 3)))
  eps = jnp.float32(rng.normal(size=(64, 3)))
  t = jnp.float32(rng.uniform(0.01, 1.0, size=(64, 1)))
  s = t * jnp.float32(rng.uniform(size=(64, 1)))
  p = flow.reverse_kernel(
      flow.velocity_target(x, eps), flow.z_t(x, eps, t), t, s, jnp.zeros_like(x), 1.0
  )
  q = flow.posterior_q(x, eps, t, s)
  np.testing.assert_allclose(p.mean, q.mean, atol=2e-6)
  np.testing.assert_allclose(_full(p.std, x), _full(q.std, x), rtol=1e-5, atol=1e-6)


def test_temperature_scales_variance():
  u, z, t, s, p1 = _kernel([0.9, 0.5, 0.2], [0.7, 0.3, 0.1], 0.8)
  *_, p2 = _kernel([0.9, 0.5, 0.2], [0.7, 0.3, 0.1], 0.8, temperature=1.7)
  np.testing.assert_allclose(p2.var, 1.7**2 * p1.var, rtol=1e-5)
  np.testing.assert_array_equal(p2.mean, p1.mean)


def test_fixed_variances_and_bad_arguments():
  u, z, t, s, small = _kernel([0.9, 0.5], [0.7, 0.3], 0.8, variance="fixed_small")
  *_, large = _kernel([0.9, 0.5], [0.7, 0.3], 0.8, variance="fixed_large")
  np.testing.assert_allclose(small.std, flow.sigma_small(t, s, 0.8), rtol=1e-6)
  np.testing.assert_allclose(large.std, flow.sigma_large(t, s, 0.8), rtol=1e-6)
  with pytest.raises(ValueError, match="bogus"):
    flow.reverse_kernel(u, z, t, s, None, 0.5, variance="bogus")
  with pytest.raises(ValueError, match="v=None"):
    flow.reverse_kernel(u, z, t, s, None, 0.5)


def test_gradients_finite_at_special_times():
  t = jnp.float32([0.0, 1.0, 0.5, 1e-3, 1.0, 1.0, 0.5, 0.5, 0.7])
  s = jnp.float32([0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.5, 0.499, 0.4])

  def total(u, z, t, s, v, alpha):
    p = flow.reverse_kernel(u, z, t, s, v, alpha, 1.3)
    q = flow.posterior_q(z, u, t, s)
    return (p.mean + p.std + p.logvar + q.kl(p)).sum()

  ones = jnp.ones_like(t)
  values = jax.jit(total)(ones, ones, t, s, 0.3 * ones, 0.7)
  assert np.isfinite(values)
  grads = jax.jit(jax.grad(total, argnums=(0, 1, 2, 3, 4, 5)))(ones, ones, t, s, 0.3 * ones, 0.7)
  for grad in grads:
    assert np.all(np.isfinite(grad))
