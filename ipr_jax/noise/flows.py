"""The flows of the SRM authors' framework (spatialreasoners 1.0.5): z_t = a(t) x + b(t) eps.

A `Flow` is a frozen, hashable record (a static value under jit); its methods are pure functions
of arrays. `make_flow(name)` builds one from its config name (`FLOW_NAMES`):

  rectified                  a = 1 - t, b = t; the model predicts u = eps - x ('ut').
  cosine                     a = cos(pi/2 tau), b = sin(pi/2 tau), tau = (t + skew) / (1 + skew)
                             (skew 0); predicts u = a' x + b' eps ('ut').
  diffusion_<beta schedule>  discrete diffusion, T = 1000 steps, a = sqrt(alpha_bar[i]),
                             b = sqrt(1 - alpha_bar[i]), i = max(floor(T t - 0.5), 0) (a = 1, b = 0
                             at t = 0); beta schedules 'cosine' (improved DDPM),
                             'cosine_simple_diffusion', 'linear'. Predicts eps; the `_v` names
                             predict v = a eps - b x.
  continuous_cosine_logsnr   a^2 = sigmoid(logsnr(t)), b^2 = 1 - a^2 with the shifted cosine
                             logsnr(t) = -2 ln tan(theta_min + t (theta_max - theta_min))
                             + 2 ln 0.125, logsnr in [-15, 15] before the shift; predicts eps.

The framework's `continuous_linear_beta` flow is left out: its class is abstract in 1.0.5 (no
`conditional_p_v`), so the framework cannot build it and there is nothing to match.

Every formula is the framework's, as tests/golden/spatialreasoners/README.md ("flows.npz")
states it; tests/test_flows.py checks them against the framework's outputs. The rectified flow
delegates to `ipr_jax.noise.flow`, bit for bit. Times are per pixel, `[B, H, W, 1]`, broadcast
over the channels of `[B, H, W, C]` images (any broadcastable shapes work); t = 1 is pure noise.
The reverse step goes from t to s <= t; the discrete diffusion's times are first snapped to its
grid by `adjust_time` (the framework's samplers and denoiser do the same; the identity
elsewhere). Where the framework divides by zero (t = 0, s = 1) the entries are selected with
`jnp.where` on safe denominators, so values and gradients stay finite.

Where this module differs from the framework:
- continuous_cosine_logsnr's a', b' are the derivatives of a, b. The framework's have the
  opposite sign (it writes d alpha_bar / dt = -alpha_bar (1 - alpha_bar) d logsnr / dt) and are
  set to 0 at t = 0 and t = 1; only the ut conversions read them, never this flow's training
  or sampling (it predicts eps).
- x from a discrete diffusion's eps, (z - b eps) / a, and eps from a rectified velocity,
  z + (1 - t) u, which the framework does not implement (NotImplementedError).
- cosine's x from its velocity is a z - b u / c (c = a b' - a' b); the framework's equal
  (z - b (b z + a u / c)) / a divides by a = cos(pi/2) ~ -4.4e-8 at t = 1, where its value is
  rounding noise (and is 1e-4 off at t = 0.999).
The framework's quirks that its outputs show are kept (e.g. the discrete diffusion's floored
sigma_small, also for alpha = 0).
"""

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.noise import flow as rectified
from ipr_jax.noise.gaussian import DiagonalGaussian

Variance = Literal["learned_range", "fixed_small", "fixed_large"]

KINDS = ("rectified", "cosine", "diffusion", "continuous_cosine_logsnr")
BETA_SCHEDULES = ("cosine", "cosine_simple_diffusion", "linear")
# The parameterisations each kind of flow takes (the framework's defaults first).
PARAMETERIZATIONS = {
    "rectified": ("ut",),
    "cosine": ("ut",),
    "diffusion": ("eps", "v"),
    "continuous_cosine_logsnr": ("eps",),
}
FLOW_NAMES = (
    "rectified",
    "cosine",
    "diffusion_cosine",
    "diffusion_cosine_simple_diffusion",
    "diffusion_linear",
    "diffusion_cosine_v",
    "diffusion_cosine_simple_diffusion_v",
    "diffusion_linear_v",
    "continuous_cosine_logsnr",
)

# The framework's beta-schedule settings (LinearCfg, CosineCfg).
_LINEAR_BETA_START = 1e-4
_LINEAR_BETA_END = 2e-2
_COSINE_MAX_BETA = 0.999
_COSINE_BETA_SKEW = 0.008
# The framework's safe-division offset (x + 1e-9 where x == 0).
_TINY = 1e-9
_HALF_PI = math.pi / 2


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) whose gradient is 0, not inf, at x <= 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _nonzero(x: jax.Array) -> jax.Array:
  """x + 1e-9 where x == 0 (the framework's guard of a division)."""
  return x + _TINY * (x == 0)


def _beta_schedule(name: str, num_timesteps: int, logsnr_min, logsnr_max, shift) -> np.ndarray:
  """The framework's float64 betas `[T]` of beta schedule `name`."""
  if name == "linear":
    scale = 1000 / num_timesteps
    return np.linspace(
        scale * _LINEAR_BETA_START, scale * _LINEAR_BETA_END, num_timesteps, dtype=np.float64
    )
  if name == "cosine":

    def f(step):
      angle = (step / num_timesteps + _COSINE_BETA_SKEW) / (1 + _COSINE_BETA_SKEW) * np.pi / 2
      return np.cos(angle) ** 2

    return np.array(
        [min(1 - f(i + 1) / f(i), _COSINE_MAX_BETA) for i in range(num_timesteps)], np.float64
    )
  if name == "cosine_simple_diffusion":
    theta_min = np.arctan(np.exp(-0.5 * np.float64(logsnr_max)))
    theta_max = np.arctan(np.exp(-0.5 * np.float64(logsnr_min)))
    u = np.linspace(0, 1, num_timesteps, dtype=np.float64)
    logsnr = -2 * np.log(np.tan(theta_min + u * (theta_max - theta_min)))
    if shift != 1.0:
      logsnr = logsnr + 2 * np.log(np.float64(shift))
    alpha_bar = 1 / (1 + np.exp(-logsnr))
    return 1.0 - alpha_bar / np.concatenate([[1.0], alpha_bar[:-1]])
  raise ValueError(f"unknown beta schedule {name!r}; known: {BETA_SCHEDULES}")


@functools.lru_cache(maxsize=16)
def _diffusion_tables(
    name: str, num_timesteps: int, logsnr_min: float, logsnr_max: float, shift: float
) -> dict[str, np.ndarray]:
  """The discrete diffusion's float32 tables, computed as the framework's buffers are.

  grid_times[k] = (k + 1) / T; betas are cast to float32, alphas = 1 - betas in float32,
  alpha_bar their cumulative product accumulated in float64 (as torch's CPU cumprod does) and
  cast to float32.
  """
  betas = _beta_schedule(name, num_timesteps, logsnr_min, logsnr_max, shift).astype(np.float32)
  alphas = np.float32(1.0) - betas
  alpha_bar = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  min_posterior_std = np.sqrt(
      betas[1] * (np.float32(1.0) - alpha_bar[0]) / (np.float32(1.0) - alpha_bar[1])
  )
  return {
      "grid_times": np.arange(1, num_timesteps + 1, dtype=np.float32) / np.float32(num_timesteps),
      "betas": betas,
      "alpha_bar": alpha_bar,
      "sqrt_alpha_bar": np.sqrt(alpha_bar),
      "sqrt_one_minus_alpha_bar": np.sqrt(np.float32(1.0) - alpha_bar),
      "min_posterior_std": np.float32(min_posterior_std),
  }


@dataclasses.dataclass(frozen=True)
class Flow:
  """A forward process z_t = a(t) x + b(t) eps and the model's parameterisation of it.

  Attributes:
    kind: one of `KINDS`.
    parameterization: what the model predicts: 'ut' (the velocity d z_t / dt), 'eps' (the
      noise) or 'v' (a eps - b x); one of `PARAMETERIZATIONS[kind]`.
    beta_schedule: the discrete diffusion's (`BETA_SCHEDULES`); None for the other kinds.
    num_timesteps: T of the discrete diffusion.
    skew: the cosine flow's time skew.
    logsnr_min, logsnr_max: logsnr range of continuous_cosine_logsnr and of the
      cosine_simple_diffusion beta schedule (before the shift).
    shift: their logsnr shift factor s (logsnr + 2 ln s).
  """

  kind: str = "rectified"
  parameterization: str = "ut"
  beta_schedule: str | None = None
  num_timesteps: int = 1000
  skew: float = 0.0
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  shift: float = 0.125

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown flow kind {self.kind!r}; known: {KINDS}")
    if self.parameterization not in PARAMETERIZATIONS[self.kind]:
      raise ValueError(
          f"flow {self.kind!r} takes parameterization {PARAMETERIZATIONS[self.kind]}, "
          f"got {self.parameterization!r}"
      )
    if (self.kind == "diffusion") != (self.beta_schedule is not None):
      raise ValueError(
          f"beta_schedule={self.beta_schedule!r} is for kind 'diffusion' only (got {self.kind!r})"
      )
    if self.beta_schedule is not None and self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"unknown beta schedule {self.beta_schedule!r}; known: {BETA_SCHEDULES}")
    if self.num_timesteps < 2:
      raise ValueError(f"num_timesteps must be at least 2, got {self.num_timesteps!r}")

  @property
  def is_rectified(self) -> bool:
    return self.kind == "rectified"

  @property
  def is_discrete(self) -> bool:
    """Whether a and b are tables over T steps (no derivatives, times snapped to the grid)."""
    return self.kind == "diffusion"

  # ----------------------------------------------------------------------------------------------
  # Schedules.
  # ----------------------------------------------------------------------------------------------

  def _tables(self) -> dict[str, np.ndarray]:
    assert self.beta_schedule is not None
    return _diffusion_tables(
        self.beta_schedule,
        self.num_timesteps,
        float(self.logsnr_min),
        float(self.logsnr_max),
        float(self.shift),
    )

  def diffusion_tables(self) -> dict[str, np.ndarray]:
    """The discrete diffusion's float32 `betas`, `alpha_bar` `[T]` (and derived tables)."""
    if not self.is_discrete:
      raise ValueError(f"flow {self.kind!r} has no beta schedule")
    return self._tables()

  def adjust_time(self, t):
    """The time the flow computes with: the discrete diffusion's grid time, in float32,

      0 at t = 0, else (clip(floor(T t), 0, T - 1) + 1) / T

    (every t in [k/T, (k+1)/T) moves up to (k+1)/T); t itself (the same object) otherwise.
    """
    if not self.is_discrete:
      return t
    t = jnp.asarray(t, jnp.float32)
    steps = self.num_timesteps
    # (k + 1) / T from a table: XLA would multiply by a rounded 1 / T instead of dividing.
    grid = jnp.asarray(self._tables()["grid_times"])
    snapped = grid[jnp.clip(jnp.floor(steps * t), 0, steps - 1).astype(jnp.int32)]
    return jnp.where(t == 0, 0.0, snapped)

  def _index(self, t: jax.Array) -> jax.Array:
    """The discrete diffusion's table index max(floor(T t - 0.5), 0) (at most T - 1)."""
    steps = self.num_timesteps
    return jnp.clip(jnp.floor(steps * t - 0.5), 0, steps - 1).astype(jnp.int32)

  def _angles(self) -> tuple[jax.Array, jax.Array]:
    """continuous_cosine_logsnr's float32 theta_min, theta_max = atan(exp(-logsnr_max/min / 2))."""
    theta_min = jnp.arctan(jnp.exp(-0.5 * jnp.float32(self.logsnr_max)))
    theta_max = jnp.arctan(jnp.exp(-0.5 * jnp.float32(self.logsnr_min)))
    return theta_min, theta_max

  def _angle(self, t: jax.Array) -> jax.Array:
    theta_min, theta_max = self._angles()
    return theta_min + jnp.clip(t, 0.0, 1.0) * (theta_max - theta_min)

  def _alpha_bar(self, t: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(self.logsnr(t))

  def _cosine_radians(self, t: jax.Array) -> jax.Array:
    return _HALF_PI * ((t + self.skew) / (1 + self.skew))

  @property
  def _cosine_scale(self) -> float:
    """c = a b' - a' b = (pi / 2) / (1 + skew) of the cosine flow."""
    return _HALF_PI / (1 + self.skew)

  def a(self, t: jax.Array) -> jax.Array:
    """Data weight a(t)."""
    if self.kind == "rectified":
      return 1.0 - t
    if self.kind == "cosine":
      return jnp.cos(self._cosine_radians(t))
    if self.kind == "diffusion":
      table = jnp.asarray(self._tables()["sqrt_alpha_bar"])
      return jnp.where(t == 0, 1.0, table[self._index(t)])
    return jnp.sqrt(jnp.maximum(self._alpha_bar(t), 0.0))

  def b(self, t: jax.Array) -> jax.Array:
    """Noise weight b(t)."""
    if self.kind == "rectified":
      return t
    if self.kind == "cosine":
      return jnp.sin(self._cosine_radians(t))
    if self.kind == "diffusion":
      table = jnp.asarray(self._tables()["sqrt_one_minus_alpha_bar"])
      return jnp.where(t == 0, 0.0, table[self._index(t)])
    return jnp.sqrt(jnp.maximum(1.0 - self._alpha_bar(t), 0.0))

  def _check_differentiable(self) -> None:
    if self.is_discrete:
      raise ValueError("a and b of discrete time diffusion are not differentiable in t")

  def _alpha_bar_prime(self, t: jax.Array) -> jax.Array:
    """d alpha_bar / dt = alpha_bar (1 - alpha_bar) d logsnr / dt (continuous_cosine_logsnr)."""
    theta_min, theta_max = self._angles()
    angle = self._angle(t)
    logsnr_prime = -2.0 * (theta_max - theta_min) / (jnp.sin(angle) * jnp.cos(angle))
    alpha_bar = self._alpha_bar(t)
    return alpha_bar * (1.0 - alpha_bar) * logsnr_prime

  def a_prime(self, t: jax.Array) -> jax.Array:
    """d a / dt (ValueError for the discrete diffusion)."""
    self._check_differentiable()
    if self.kind == "rectified":
      return jnp.full_like(t, -1.0)
    if self.kind == "cosine":
      return -self._cosine_scale * jnp.sin(self._cosine_radians(t))
    a = self.a(t)
    return 0.5 * self._alpha_bar_prime(t) / jnp.where(a > 0, a, 1.0)

  def b_prime(self, t: jax.Array) -> jax.Array:
    """d b / dt (ValueError for the discrete diffusion)."""
    self._check_differentiable()
    if self.kind == "rectified":
      return jnp.ones_like(t)
    if self.kind == "cosine":
      return self._cosine_scale * jnp.cos(self._cosine_radians(t))
    b = self.b(t)
    return -0.5 * self._alpha_bar_prime(t) / jnp.where(b > 0, b, 1.0)

  def a_b_prime_minus_a_prime_b(self, t: jax.Array) -> jax.Array:
    """a b' - a' b, the denominator of x and eps from (z, u)."""
    self._check_differentiable()
    if self.kind == "rectified":
      return jnp.ones_like(t)
    if self.kind == "cosine":
      return jnp.full_like(t, self._cosine_scale)
    return self.a(t) * self.b_prime(t) - self.a_prime(t) * self.b(t)

  def logsnr(self, t: jax.Array) -> jax.Array:
    """log(a^2 / b^2): continuous_cosine_logsnr's own formula; else 2 (ln|a| - ln|b|) with |a|,
    |b| floored at float32's eps (the framework's `logsnr_t`)."""
    if self.kind == "continuous_cosine_logsnr":
      tan = jnp.tan(self._angle(t))
      return -2.0 * jnp.log(_nonzero(tan)) + 2.0 * jnp.float32(math.log(self.shift))
    floor = jnp.finfo(jnp.float32).eps
    log_a = jnp.log(jnp.maximum(jnp.abs(self.a(t)), floor))
    log_b = jnp.log(jnp.maximum(jnp.abs(self.b(t)), floor))
    return 2.0 * (log_a - log_b)

  # ----------------------------------------------------------------------------------------------
  # Noising, targets and conversions.
  # ----------------------------------------------------------------------------------------------

  def z_t(self, x: jax.Array, eps: jax.Array, t) -> jax.Array:
    """The noisy sample a(t) x + b(t) eps (t already adjusted)."""
    if self.is_rectified:
      return rectified.z_t(x, eps, t)
    return self.a(t) * x + self.b(t) * eps

  def velocity(self, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """u = d z_t / dt = a'(t) x + b'(t) eps (ValueError for the discrete diffusion)."""
    if self.is_rectified:
      return rectified.velocity_target(x, eps)
    if self.kind == "cosine":
      radians = self._cosine_radians(t)
      return self._cosine_scale * (jnp.cos(radians) * eps - jnp.sin(radians) * x)
    self._check_differentiable()
    return self.a_prime(t) * x + self.b_prime(t) * eps

  def v_target(self, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """v = a(t) eps - b(t) x."""
    return self.a(t) * eps - self.b(t) * x

  def target(self, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """The regression target in the flow's parameterisation: u, eps or v at (x, eps, t)."""
    if self.parameterization == "ut":
      return self.velocity(x, eps, t)
    if self.parameterization == "eps":
      return eps
    return self.v_target(x, eps, t)

  def x_from_output(self, out: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """The clean-data estimate x_hat from the model output `out` at (z, t).

    ut: rectified z - t u, cosine a z - b u / c; eps: (z - b eps) / a (a = 0 replaced by 1e-9);
    v: (a z - b v) / (a^2 + b^2 + 1e-9).
    """
    if self.is_rectified:
      return rectified.x_from_u(z, t, out)
    a, b = self.a(t), self.b(t)
    if self.kind == "cosine":
      return a * z - b * out / self._cosine_scale
    if self.parameterization == "eps":
      return (z - b * out) / _nonzero(a)
    return (a * z - b * out) / (a**2 + b**2 + _TINY)

  def eps_from_output(self, out: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """The noise estimate eps_hat from the model output at (z, t).

    ut: rectified z + (1 - t) u, cosine (a u - a' z) / c; eps: itself;
    v: (b z + a v) / (a^2 + b^2 + 1e-9).
    """
    if self.is_rectified:
      return rectified.eps_from_u(z, t, out)
    if self.parameterization == "eps":
      return out
    a = self.a(t)
    if self.kind == "cosine":
      return (a * out - self.a_prime(t) * z) / self._cosine_scale
    b = self.b(t)
    return (b * z + a * out) / (a**2 + b**2 + _TINY)

  def velocity_from_output(self, out: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """u_hat from the model output at (z, t): ut itself; eps: (a'/a) z - ((a'/a) b - b') eps
    (ValueError for the discrete diffusion, as in the framework)."""
    if self.parameterization == "ut":
      return out
    self._check_differentiable()
    if self.parameterization == "v":
      out = self.eps_from_output(out, z, t)
    a_ratio = self.a_prime(t) / self.a(t)
    return a_ratio * z - (a_ratio * self.b(t) - self.b_prime(t)) * out

  def v_from_output(self, out: jax.Array, z: jax.Array, t: jax.Array) -> jax.Array:
    """v_hat from the model output at (z, t): v itself; eps:
    ((a^2 + b^2) / a) eps - (b / a) z, z where a = 0 (a = 0 replaced by 1e-9)."""
    if self.parameterization == "v":
      return out
    eps = self.eps_from_output(out, z, t)
    a, b = self.a(t), self.b(t)
    safe_a = _nonzero(a)
    v = (a**2 + b**2) / safe_a * eps - b / safe_a * z
    return jnp.where(a == 0, z, v)

  # ----------------------------------------------------------------------------------------------
  # The reverse step.
  # ----------------------------------------------------------------------------------------------

  def _one_minus_ratio_sq(self, t: jax.Array, s: jax.Array) -> jax.Array:
    """1 - r^2 with r = a(t) b(s) / (a(s) b(t)); 1 where t == 0, s == 1 or a(s) b(t) == 0."""
    denominator = self.a(s) * self.b(t)
    undefined = (t == 0) | (s == 1) | (denominator == 0)
    ratio = self.a(t) * self.b(s) / jnp.where(undefined, 1.0, denominator)
    return 1.0 - jnp.where(undefined, 0.0, ratio) ** 2

  def sigma_small(self, t: jax.Array, s: jax.Array, stochasticity) -> jax.Array:
    """alpha b(s) sqrt(1 - r^2), 0 where t == 0 or s == 1; the discrete diffusion's is floored
    at its minimal posterior std sqrt(beta_1 (1 - alpha_bar_0) / (1 - alpha_bar_1)), as in the
    framework (even for alpha = 0)."""
    if self.is_rectified:
      return rectified.sigma_small(t, s, stochasticity)
    sigma = stochasticity * self.b(s) * _safe_sqrt(self._one_minus_ratio_sq(t, s))
    sigma = jnp.where((t == 0) | (s == 1), 0.0, sigma)
    if self.is_discrete:
      sigma = jnp.maximum(sigma, self._tables()["min_posterior_std"])
    return sigma

  def sigma_large(self, t: jax.Array, s: jax.Array, stochasticity) -> jax.Array:
    """alpha b(t) sqrt(1 - r^2), 0 where t == 0 or s == 1."""
    if self.is_rectified:
      return rectified.sigma_large(t, s, stochasticity)
    sigma = stochasticity * self.b(t) * _safe_sqrt(self._one_minus_ratio_sq(t, s))
    return jnp.where((t == 0) | (s == 1), 0.0, sigma)

  def gamma(self, t: jax.Array, s: jax.Array, stochasticity) -> jax.Array:
    """Noise coefficient b(s) sqrt(1 - alpha^2 (1 - r^2)); 0 where t == 0, then b(s) where
    s == 1."""
    if self.is_rectified:
      return rectified.gamma(t, s, stochasticity)
    b_s = self.b(s)
    g = b_s * _safe_sqrt(1.0 - stochasticity**2 * self._one_minus_ratio_sq(t, s))
    g = jnp.where(t == 0, 0.0, g)
    return jnp.where(s == 1, b_s, g)

  def reverse_sigma(
      self,
      t: jax.Array,
      s: jax.Array,
      v: jax.Array | None,
      stochasticity,
      variance: Variance = "learned_range",
  ) -> jax.Array:
    """The reverse step's standard deviation for the variance type; learned_range is
    exp(v ln sigma_large + (1 - v) ln sigma_small) where both are nonzero, else 0."""
    if self.is_rectified:
      return rectified.reverse_sigma(t, s, v, stochasticity, variance)
    if variance == "fixed_small":
      return self.sigma_small(t, s, stochasticity)
    if variance == "fixed_large":
      return self.sigma_large(t, s, stochasticity)
    if variance != "learned_range":
      raise ValueError(f"unknown variance type {variance!r}")
    if v is None:
      raise ValueError("variance='learned_range' needs v, got v=None")
    shape = jnp.broadcast_shapes(jnp.shape(t), jnp.shape(s), jnp.shape(v))
    large = jnp.broadcast_to(self.sigma_large(t, s, stochasticity), shape)
    small = jnp.broadcast_to(self.sigma_small(t, s, stochasticity), shape)
    nonzero = (large != 0) & (small != 0)
    log_large = jnp.log(jnp.where(nonzero, large, 1.0))
    log_small = jnp.log(jnp.where(nonzero, small, 1.0))
    return jnp.where(nonzero, jnp.exp(v * log_large + (1.0 - v) * log_small), 0.0)

  def reverse_kernel(
      self,
      out: jax.Array,
      z: jax.Array,
      t: jax.Array,
      s: jax.Array,
      v: jax.Array | None,
      stochasticity,
      temperature=1.0,
      variance: Variance = "learned_range",
      sigma_theta: jax.Array | None = None,
  ) -> DiagonalGaussian:
    """p(z_s | z_t) for the model output `out` (the framework's `conditional_p`).

    ut, rectified: mean = a(s)(z - t u) + gamma (z + a(t) u), extra std (a(s) t - a(t) gamma)
      sigma_theta; cosine: mean = a(s) x_hat + gamma eps_hat with x_hat = a z - b u / c,
      eps_hat = a u / c + b z, extra std (a(s) b(t) - a(t) gamma) / c sigma_theta.
    eps: with r = a(s) / a(t) (a(t) = 0 replaced by 1e-9), mean = r z + (gamma - r b(t)) eps,
      extra std (gamma - r b(t)) sigma_theta.
    v: the eps kernel of eps_hat = (b z + a v) / (a^2 + b^2 + 1e-9), sigma_theta scaled by a(t).
    var = temperature^2 (sigma^2 + extra^2), clamped by `DiagonalGaussian.from_var`; gamma is
    sigma_small's (alpha) even under the other variance types, as in the framework.

    Args:
      out: `[B, H, W, C]` model output in the flow's parameterisation.
      z: `[B, H, W, C]` current state z_t.
      t: `[B, H, W, 1]` current (adjusted) time.
      s: `[B, H, W, 1]` target (adjusted) time, s <= t.
      v: `[B, H, W, C]` learned-range interpolation (needed for 'learned_range').
      stochasticity: alpha in [0, 1].
      temperature: tau, scales the standard deviation.
      variance: 'learned_range', 'fixed_small' or 'fixed_large'.
      sigma_theta: `[B, H, W, 1]` or `[B, H, W, C]` predicted std of `out`, or None.

    Returns:
      The Gaussian over z_s.
    """
    if self.is_rectified and sigma_theta is None:
      return rectified.reverse_kernel(out, z, t, s, v, stochasticity, temperature, variance)
    g = self.gamma(t, s, stochasticity)
    if self.parameterization == "ut":
      a_t, a_s = self.a(t), self.a(s)
      if self.is_rectified:
        mean = a_s * (z - t * out) + (z + a_t * out) * g
        spread = a_s * t - a_t * g
      else:
        b_t, scale = self.b(t), self._cosine_scale
        mean = a_s * (a_t * z - b_t * out / scale) + (a_t * out / scale + b_t * z) * g
        spread = (a_s * b_t - a_t * g) / scale
    else:
      if self.parameterization == "v":
        eps_hat = self.eps_from_output(out, z, t)
        if sigma_theta is not None:
          sigma_theta = self.a(t) * sigma_theta
      else:
        eps_hat = out
      a_ratio = self.a(s) / _nonzero(self.a(t))
      spread = g - a_ratio * self.b(t)
      mean = a_ratio * z + spread * eps_hat
    var = self.reverse_sigma(t, s, v, stochasticity, variance) ** 2
    if sigma_theta is not None:
      var = var + (spread * sigma_theta) ** 2
    return DiagonalGaussian.from_var(mean, temperature**2 * var)

  def posterior_q(
      self, x: jax.Array, eps: jax.Array, t: jax.Array, s: jax.Array
  ) -> DiagonalGaussian:
    """q(z_s | x, eps) with alpha = 1: N(a(s) x + gamma eps, sigma_small^2), the scale given as
    a std (clamped to [e^-15, e^10])."""
    if self.is_rectified:
      return rectified.posterior_q(x, eps, t, s)
    mean = self.a(s) * x + eps * self.gamma(t, s, 1.0)
    return DiagonalGaussian.from_std(mean, self.sigma_small(t, s, 1.0))


RECTIFIED = Flow()


def make_flow(name: str) -> Flow:
  """The flow of config name `name` (one of `FLOW_NAMES`).

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in FLOW_NAMES:
    raise ValueError(f"unknown flow {name!r}; known flows: {', '.join(FLOW_NAMES)}")
  if name in ("rectified", "cosine", "continuous_cosine_logsnr"):
    return Flow(kind=name, parameterization=PARAMETERIZATIONS[name][0])
  schedule = name.removeprefix("diffusion_")
  parameterization = "eps"
  if schedule.endswith("_v"):
    schedule, parameterization = schedule.removesuffix("_v"), "v"
  return Flow(kind="diffusion", parameterization=parameterization, beta_schedule=schedule)
