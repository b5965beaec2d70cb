"""Rectified flow: forward process, conversions and the reverse kernel (spec §2.1-2.2).

a(t) = 1 - t (data weight), b(t) = t (noise weight), so z_t = (1 - t) x + t eps and
the velocity is u = eps - x. Time maps are per pixel, `[B, H, W, 1]`, and broadcast
over the channels of `[B, H, W, C]` images; any broadcastable shapes work.

The reverse step goes from t to s <= t per pixel. Its formulas divide by
(1 - s) t, which is 0 at t = 0 or s = 1; the reference overwrites those entries.
Here the same entries are selected with `jnp.where` on safe denominators, so
neither the values nor the gradients ever carry NaN or inf.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from ipr_jax.noise.gaussian import DiagonalGaussian

Variance = Literal["learned_range", "fixed_small", "fixed_large"]


def z_t(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """Noisy sample (1 - t) x + t eps."""
  return (1.0 - t) * x + t * eps


def velocity_target(x: jax.Array, eps: jax.Array) -> jax.Array:
  """Training target u = eps - x (independent of t)."""
  return eps - x


def x_from_u(z: jax.Array, t: jax.Array, u: jax.Array) -> jax.Array:
  """Clean-data estimate x = z - t u from a velocity at (z, t)."""
  return z - t * u


def eps_from_u(z: jax.Array, t: jax.Array, u: jax.Array) -> jax.Array:
  """Noise estimate eps = z + (1 - t) u from a velocity at (z, t)."""
  return z + (1.0 - t) * u


def x_from_eps_and_u(eps: jax.Array, u: jax.Array) -> jax.Array:
  """x = eps - u."""
  return eps - u


def eps_from_u_and_x(u: jax.Array, x: jax.Array) -> jax.Array:
  """eps = u + x."""
  return u + x


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) whose gradient is 0, not inf, at x <= 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _undefined(t: jax.Array, s: jax.Array) -> jax.Array:
  """Where the ratio r below divides by zero: t == 0 or s == 1."""
  return (t == 0) | (s == 1)


def _one_minus_ratio_sq(t: jax.Array, s: jax.Array) -> jax.Array:
  """1 - r^2 with r = a(t) b(s) / (a(s) b(t)); 1 where r is undefined."""
  undefined = _undefined(t, s)
  denominator = jnp.where(undefined, 1.0, (1.0 - s) * t)
  ratio = jnp.where(undefined, 0.0, ((1.0 - t) * s) / denominator)
  return 1.0 - ratio**2


def sigma_small(t: jax.Array, s: jax.Array, stochasticity: float | jax.Array) -> jax.Array:
  """alpha s sqrt(1 - r^2), 0 where t == 0 or s == 1 (lower variance bound)."""
  sigma = stochasticity * s * _safe_sqrt(_one_minus_ratio_sq(t, s))
  return jnp.where(_undefined(t, s), 0.0, sigma)


def sigma_large(t: jax.Array, s: jax.Array, stochasticity: float | jax.Array) -> jax.Array:
  """alpha t sqrt(1 - r^2), 0 where t == 0 or s == 1 (upper variance bound)."""
  sigma = stochasticity * t * _safe_sqrt(_one_minus_ratio_sq(t, s))
  return jnp.where(_undefined(t, s), 0.0, sigma)


def gamma(t: jax.Array, s: jax.Array, stochasticity: float | jax.Array) -> jax.Array:
  """Noise coefficient s sqrt(1 - alpha^2 (1 - r^2)) = sqrt(s^2 - sigma_small^2).

  Overrides as in the reference: 0 where t == 0, then s (= 1) where s == 1.
  """
  g = s * _safe_sqrt(1.0 - stochasticity**2 * _one_minus_ratio_sq(t, s))
  g = jnp.where(t == 0, 0.0, g)
  return jnp.where(s == 1, s, g)


def sigma_learned(
    t: jax.Array, s: jax.Array, stochasticity: float | jax.Array, v: jax.Array
) -> jax.Array:
  """Learned-range sigma = exp(v ln sigma_large + (1 - v) ln sigma_small).

  It is 0 wherever either bound is 0. `v` is used as given (not clamped to
  [0, 1]; values outside extrapolate in log-sigma space, as in the reference).

  Returns:
    sigma, shaped like the broadcast of (t, s, v).
  """
  shape = jnp.broadcast_shapes(jnp.shape(t), jnp.shape(s), jnp.shape(v))
  large = jnp.broadcast_to(sigma_large(t, s, stochasticity), shape)
  small = jnp.broadcast_to(sigma_small(t, s, stochasticity), shape)
  nonzero = (large != 0) & (small != 0)
  log_large = jnp.log(jnp.where(nonzero, large, 1.0))
  log_small = jnp.log(jnp.where(nonzero, small, 1.0))
  return jnp.where(nonzero, jnp.exp(v * log_large + (1.0 - v) * log_small), 0.0)


def reverse_sigma(
    t: jax.Array,
    s: jax.Array,
    v: jax.Array | None,
    stochasticity: float | jax.Array,
    variance: Variance = "learned_range",
) -> jax.Array:
  """The reverse-step standard deviation for the chosen variance type."""
  if variance == "learned_range":
    if v is None:
      raise ValueError("variance='learned_range' needs v, got v=None")
    return sigma_learned(t, s, stochasticity, v)
  if variance == "fixed_small":
    return sigma_small(t, s, stochasticity)
  if variance == "fixed_large":
    return sigma_large(t, s, stochasticity)
  raise ValueError(f"unknown variance type {variance!r}")


def reverse_kernel(
    u: jax.Array,
    z: jax.Array,
    t: jax.Array,
    s: jax.Array,
    v: jax.Array | None,
    stochasticity: float | jax.Array,
    temperature: float | jax.Array = 1.0,
    variance: Variance = "learned_range",
) -> DiagonalGaussian:
  """p(z_s | z_t) for a velocity prediction u (the reference's `conditional_p_ut`).

  mean = (1 - s)(z - t u) + gamma (z + (1 - t) u), with gamma from sigma_small
  even under the learned variance (the reference's choice). var = temperature^2
  sigma^2, clamped by `DiagonalGaussian.from_var`. sigma_theta is not added.

  Special cases: t = s = 1 or t = s = 0 give mean z, sigma 0; s = 0 < t gives
  mean x_hat = z - t u, sigma 0; t = 1 > s gives sigma_small = alpha s and
  gamma = s sqrt(1 - alpha^2).

  Args:
    u: `[B, H, W, C]` predicted velocity.
    z: `[B, H, W, C]` current state z_t.
    t: `[B, H, W, 1]` current time.
    s: `[B, H, W, 1]` target time, s <= t.
    v: `[B, H, W, C]` learned-range interpolation (needed for 'learned_range').
    stochasticity: alpha in [0, 1].
    temperature: tau, scales the standard deviation.
    variance: 'learned_range', 'fixed_small' or 'fixed_large'.

  Returns:
    The Gaussian over z_s.
  """
  g = gamma(t, s, stochasticity)
  mean = (1.0 - s) * (z - t * u) + (z + (1.0 - t) * u) * g
  var = reverse_sigma(t, s, v, stochasticity, variance) ** 2
  var = temperature**2 * var
  return DiagonalGaussian.from_var(mean, var)


def posterior_q(x: jax.Array, eps: jax.Array, t: jax.Array, s: jax.Array) -> DiagonalGaussian:
  """q(z_s | x, eps) with alpha = 1: N((1 - s) x + gamma eps, sigma_small^2).

  The scale is given as a std (clamped to [e^-15, e^10]), as in the reference.
  """
  mean = (1.0 - s) * x + eps * gamma(t, s, 1.0)
  return DiagonalGaussian.from_std(mean, sigma_small(t, s, 1.0))
