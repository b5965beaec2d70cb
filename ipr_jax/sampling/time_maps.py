"""The SRM authors' framework's sampling schedules as pure time-map functions (spatialreasoners
1.0.5 `SamplingSchedule`s: raster, adaptive_inverse, adaptive_softmax, mask_git).

Each maps the current per-patch time map t `[B, V]`, the model's per-patch sigma_theta `[B, V]`,
the step index and the patches that take part `[B, V]` (`active`; given cells and the cells IPR
keeps are at t = 0 and never move) to (next_t `[B, V]`, should_denoise `[B, V]`), one row per
puzzle (unlike the framework's batch-global state, every rule here is per row):

  raster            noise levels linspace(1, 0, S + 1); step k sets the floor(k / S)-th active
                    patch (index order) to level (k mod S) + 1: V S steps.
  mask_git          a random patch order; G groups revealed one after another, group g up to
                    V - max(1, min(V - cur, floor(V cos(pi/2 (g + 1) / G)))) (the last: all),
                    each group through linspace(1, 0, S + 1): G S steps.
  adaptive_inverse  per patch the s in [0, t] (bisection) with D(sigma_theta, t, s) equal to a
                    threshold: the largest D of the step size (1 - 1/(M - k)) t (or a fixed
                    divergence threshold); next_t = 0 at the last step k = M - 1.
  adaptive_softmax  s0 = (1 - 1/(M - k)) t redistributed over the patches by
                    softmax(ln(s0 + eps) + scale D(sigma_theta, t, s0)) at the same total, then
                    clipped to t with the total kept (at most max_clip_iter rounds).

with the simplified divergence of the flow (`divergence`)

  D(sigma_theta, t, s) = ln(sqrt(((a(s) b(t) - a(t) gamma') sigma_theta / (a b' - a' b)(t))^2
                         + sigma^2) / sigma),
  sigma = max(sigma_small(t, s, alpha), 1e-4),  gamma' = sqrt(b(s)^2 - sigma^2).

Deviations from the framework (docs/deviations.md): per-row state and reductions (its
adaptive_softmax breaks for batch > 1, its mask_git needs an undefined `num_patches`); the
patches outside `active` take no part in a row's maximum, softmax or order; an adaptive row
whose next times are all within finished_threshold of 0 is finished to 0 in that step (the
framework stops it there, leaving those times); a NaN divergence in adaptive_softmax (b(s0) <
1e-4) counts as 0.
"""

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.noise import flows

TIME_MAP_SCHEDULES = ("raster", "adaptive_inverse", "adaptive_softmax", "mask_git")
ADAPTIVE = ("adaptive_inverse", "adaptive_softmax")
_SIGMA_FLOOR = 1.0e-4  # the framework's clamp of sigma_small inside D


RECTIFIED = flows.RECTIFIED


@dataclasses.dataclass(frozen=True)
class TimeMapSettings:
  """One framework schedule's settings (static under jit); the defaults are the framework's.

  Attributes:
    kind: one of `TIME_MAP_SCHEDULES`.
    num_steps: S; raster: steps per patch (RasterCfg.num_steps); mask_git: steps per group
      (MaskGITCfg.num_steps_per_group).
    num_groups: mask_git: G, groups revealed one after another.
    max_steps: adaptive: M, the steps of a row (a per-row `max_steps` argument overrides it).
    alpha: adaptive: alpha of sigma_small in D (raised to min_alpha if below).
    div_threshold: adaptive_inverse: a fixed divergence threshold; None: the step-size rule.
    max_approx_error: adaptive_inverse: bisection steps ceil(-log2(error)) - 1 (+ the midpoint).
    num_search_steps: adaptive_inverse: the bisection steps, overriding max_approx_error.
    finished_threshold: adaptive: a patch with t above it is to be denoised; None: 1e-3
      (inverse), 1 / max_steps (softmax).
    min_alpha: adaptive_inverse: lower bound of alpha.
    min_step_size: adaptive_inverse: t and the step-size rule's s clamped below by it in the
      threshold (None: unclamped).
    scale: adaptive_softmax: weight of D in the softmax logits.
    max_clip_iter: adaptive_softmax: rounds of clipping to t.
    epsilon: adaptive_softmax: added to s0 inside the logarithm.
  """

  kind: str
  num_steps: int = 1
  num_groups: int = 1
  max_steps: int = 1
  alpha: float = 1.0
  div_threshold: Optional[float] = None
  max_approx_error: Optional[float] = 5.0e-4
  num_search_steps: Optional[int] = None
  finished_threshold: Optional[float] = None
  min_alpha: float = 1.0e-5
  min_step_size: Optional[float] = 1.0e-3
  scale: float = 0.1
  max_clip_iter: int = 8
  epsilon: float = 1.0e-6

  def __post_init__(self):
    if self.kind not in TIME_MAP_SCHEDULES:
      raise ValueError(f"kind must be one of {TIME_MAP_SCHEDULES}, got {self.kind!r}.")
    for name in ("num_steps", "num_groups", "max_steps", "max_clip_iter"):
      if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
    if self.max_approx_error is None and self.num_search_steps is None:
      raise ValueError("adaptive_inverse needs max_approx_error or num_search_steps.")
    if self.num_search_steps is not None and self.num_search_steps < 1:
      raise ValueError(f"num_search_steps must be positive, got {self.num_search_steps!r}.")
    if self.min_step_size is not None and not self.min_step_size > 0:
      raise ValueError(f"min_step_size must be positive, got {self.min_step_size!r}.")
    if not self.scale > 0:
      raise ValueError(f"scale must be positive, got {self.scale!r}.")

  @property
  def search_steps(self) -> int:
    """adaptive_inverse: the bisection's comparisons (the midpoint after them is returned)."""
    if self.num_search_steps is not None:
      return int(self.num_search_steps)
    assert self.max_approx_error is not None
    return math.ceil(-math.log2(self.max_approx_error)) - 1

  @property
  def divergence_alpha(self) -> float:
    return max(self.alpha, self.min_alpha) if self.kind == "adaptive_inverse" else self.alpha

  def finished(self, max_steps) -> Any:
    """The finished threshold (softmax default 1 / max_steps, per row if max_steps is)."""
    if self.finished_threshold is not None:
      return self.finished_threshold
    if self.kind == "adaptive_inverse":
      return 1.0e-3
    return 1.0 / max_steps


def noise_levels(num_steps: int) -> np.ndarray:
  """`[S + 1]` float32 torch.linspace(1, 0, S + 1), as torch computes it (from both ends)."""
  steps = num_steps + 1
  step = (np.float32(0.0) - np.float32(1.0)) / np.float32(steps - 1)
  i = np.arange(steps)
  ahead = np.float32(1.0) + step * i.astype(np.float32)
  behind = np.float32(0.0) - step * (steps - 1 - i).astype(np.float32)
  return np.where(i < steps // 2, ahead, behind).astype(np.float32)


def divergence(
    sigma_theta: jax.Array,
    t: jax.Array,
    s: jax.Array,
    alpha: float,
    flow: flows.Flow = RECTIFIED,
) -> jax.Array:
  """The framework's simplified divergence D of a step t -> s (`divergence_simple_ut`, or
  `divergence_simple_eps` for an eps-parameterized flow: (a(s) b(t) / a(t) - gamma') sigma_theta
  in place of the ut form's (a(s) b(t) - a(t) gamma') sigma_theta / (a b' - a' b)(t)).

  NaN where b(s) < 1e-4 (gamma' is the root of a negative number), as in the framework.

  Args:
    sigma_theta: `[B, V]` the model's per-patch sigma (of the flow's prediction).
    t, s: `[B, V]` current and next time, s <= t.
    alpha: alpha of sigma_small.
    flow: the flow (its a, b, a', b', sigma_small; default: the rectified flow).

  Returns:
    `[B, V]` float32.

  Raises:
    ValueError: a v-parameterized flow (the framework defines no D for it).
  """
  sigma = jnp.maximum(flow.sigma_small(t, s, alpha), _SIGMA_FLOOR)
  b_s = flow.b(s)
  # b(s)^2 - sigma^2 factored: exactly 0 where sigma = b(s) (alpha = 1) even where the compiler
  # fuses the squares into a multiply-add, which would leave a rounding residue (and a NaN).
  gamma = jnp.sqrt((b_s - sigma) * (b_s + sigma))
  if flow.parameterization == "ut":
    determinant = flow.a(t) * flow.b_prime(t) - flow.a_prime(t) * flow.b(t)
    mean_error = (flow.a(s) * flow.b(t) - flow.a(t) * gamma) * sigma_theta / determinant
  elif flow.parameterization == "eps":
    mean_error = (flow.a(s) * flow.b(t) / flow.a(t) - gamma) * sigma_theta
  else:
    raise ValueError(
        f"the adaptive schedules' divergence needs a 'ut' or 'eps' flow, got "
        f"{flow.parameterization!r} (the framework defines none for 'v')."
    )
  return jnp.log(jnp.sqrt(mean_error**2 + sigma**2) / sigma)


def _active_rank(active: jax.Array) -> jax.Array:
  """`[B, V]` int32 rank of each active patch among its row's active patches (index order)."""
  return jnp.cumsum(active.astype(jnp.int32), axis=1) - 1


def raster(
    t: jax.Array,
    step,
    active: jax.Array,
    settings: TimeMapSettings,
    start_time: Any = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """The raster schedule: the active patches one after another, S levels each.

  Args:
    t: `[B, V]` float32 current times.
    step: the step index k (scalar int).
    active: `[B, V]` bool patches that take part.
    settings: `kind='raster'`, num_steps S.
    start_time: t0 scalar or `[B]`: the levels are t0 linspace(1, 0, S + 1) (IPR's partial
      re-noising; 1: the framework's).

  Returns:
    (next_t `[B, V]`, should_denoise `[B, V]` = next_t not close to 0).
  """
  levels = jnp.asarray(noise_levels(settings.num_steps))
  patch = step // settings.num_steps
  level = levels[step % settings.num_steps + 1] * jnp.reshape(jnp.asarray(start_time), (-1, 1))
  moved = active & (_active_rank(active) == patch)
  next_t = jnp.where(moved, level, t).astype(jnp.float32)
  return next_t, next_t > 1.0e-8


def mask_git_bounds(num_patches: int, num_groups: int) -> np.ndarray:
  """`[N + 1, G + 1]` int32: row n holds the reveal-rank bounds of the G groups of n patches
  (group g reveals ranks [row[g], row[g + 1])), in the framework's Python float arithmetic."""
  bounds = np.zeros([num_patches + 1, num_groups + 1], np.int32)
  for n in range(1, num_patches + 1):
    cur = 0
    for g in range(num_groups):
      if g < num_groups - 1:
        mask_ratio = math.cos(math.pi / 2.0 * (g + 1) / num_groups)
        mask_len = max(1, min(n - cur, math.floor(n * mask_ratio)))
        nxt = n - mask_len
      else:
        nxt = n
      bounds[n, g + 1] = nxt
      cur = nxt
  return bounds


def mask_git_order(keys: jax.Array, num_patches: int) -> jax.Array:
  """`[B, V]` int32 random patch orders (argsort of uniforms), one per puzzle key `[B]`."""
  draw = jax.vmap(lambda k: jnp.argsort(jax.random.uniform(k, [num_patches])))
  return draw(keys).astype(jnp.int32)


def mask_git(
    t: jax.Array,
    step,
    active: jax.Array,
    settings: TimeMapSettings,
    *,
    order: Optional[jax.Array] = None,
    keys: Optional[jax.Array] = None,
    start_time: Any = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """The MaskGIT schedule: groups of patches in a random order, S levels per group.

  Args:
    t: `[B, V]` float32 current times.
    step: the step index k (scalar int).
    active: `[B, V]` bool patches that take part (revealed in `order`, the others skipped).
    settings: `kind='mask_git'`, num_steps S (per group), num_groups G.
    order: `[B, V]` int patch ids in reveal order (a permutation per row); None: drawn from
      `keys` (`mask_git_order`).
    keys: `[B]` typed keys of the order (only without `order`).
    start_time: t0 scalar or `[B]`: levels t0 linspace(1, 0, S + 1).

  Returns:
    (next_t `[B, V]`, should_denoise `[B, V]`: the active patches, as the framework's mask,
    which marks every patch).
  """
  batch, num_patches = t.shape
  if order is None:
    if keys is None:
      raise ValueError("mask_git needs an order or the keys to draw one.")
    order = mask_git_order(keys, num_patches)
  order, active = jnp.asarray(order, jnp.int32), jnp.asarray(active)
  rows = jnp.arange(batch)[:, None]
  # Reveal rank of a patch: the active patches before it in the order.
  rank_in_order = _active_rank(active[rows, order])
  rank = jnp.zeros((batch, num_patches), jnp.int32).at[rows, order].set(rank_in_order)
  bounds = jnp.asarray(mask_git_bounds(num_patches, settings.num_groups))
  row_bounds = bounds[jnp.sum(active, axis=1)]  # [B, G + 1]
  group = jnp.minimum(step // settings.num_steps, settings.num_groups - 1)
  in_group = step < settings.num_steps * settings.num_groups
  lower, upper = row_bounds[:, group][:, None], row_bounds[:, group + 1][:, None]
  moved = active & (rank >= lower) & (rank < upper) & in_group
  levels = jnp.asarray(noise_levels(settings.num_steps))
  level = levels[step % settings.num_steps + 1] * jnp.reshape(jnp.asarray(start_time), (-1, 1))
  next_t = jnp.where(moved, level, t).astype(jnp.float32)
  return next_t, active


def _row_steps(settings: TimeMapSettings, max_steps) -> jax.Array:
  """`[B, 1]` or `[1, 1]` the adaptive step count M (per row if `max_steps` `[B]` is given)."""
  steps = settings.max_steps if max_steps is None else max_steps
  return jnp.reshape(jnp.asarray(steps, jnp.int32), (-1, 1))


def _finish_adaptive(
    t, next_t, step, active, settings: TimeMapSettings, max_steps
) -> tuple[jax.Array, jax.Array]:
  """next_t = 0 at a row's last step or once all its next times are within the finished
  threshold; the patches outside `active` keep t; should_denoise = t > finished threshold."""
  steps = _row_steps(settings, max_steps)
  threshold = settings.finished(steps.astype(jnp.float32))
  done = jnp.all(~active | (next_t <= threshold), axis=1, keepdims=True)
  next_t = jnp.where((step >= steps - 1) | done, 0.0, next_t)
  next_t = jnp.where(active, next_t, t).astype(jnp.float32)
  return next_t, active & (t > threshold)


def adaptive_inverse(
    t: jax.Array,
    sigma_theta: jax.Array,
    step,
    active: jax.Array,
    settings: TimeMapSettings,
    *,
    max_steps: Optional[jax.Array] = None,
    flow: flows.Flow = RECTIFIED,
) -> tuple[jax.Array, jax.Array]:
  """The adaptive_inverse schedule: every patch steps to the same divergence D.

  Args:
    t: `[B, V]` float32 current times.
    sigma_theta: `[B, V]` the model's per-patch sigma at t.
    step: the step index k (scalar int).
    active: `[B, V]` bool patches that take part (the threshold is their largest D).
    settings: `kind='adaptive_inverse'`.
    max_steps: `[B]` int per-row M, overriding settings.max_steps.
    flow: the flow of D (`noise.flows.Flow`).

  Returns:
    (next_t `[B, V]`, should_denoise `[B, V]` = active and t > finished_threshold).
  """
  alpha = settings.divergence_alpha
  steps = _row_steps(settings, max_steps)
  if settings.div_threshold is None:
    # The threshold: the largest D of the step (1 - 1/(M - k)) t.
    remaining = jnp.maximum(steps - step, 1).astype(jnp.float32)
    t_max_step = (1.0 - 1.0 / remaining) * t
    floor = settings.min_step_size
    t_clamped = t if floor is None else jnp.maximum(t, floor)
    s_clamped = t_max_step if floor is None else jnp.maximum(t_max_step, floor)
    step_divergence = divergence(sigma_theta, t_clamped, s_clamped, alpha, flow)
    threshold = jnp.max(jnp.where(active, step_divergence, -jnp.inf), axis=1, keepdims=True)
  else:
    threshold = jnp.full((t.shape[0], 1), settings.div_threshold, jnp.float32)
  lower, upper = jnp.zeros_like(t), t
  for _ in range(settings.search_steps):
    middle = (lower + upper) / 2
    above = divergence(sigma_theta, t, middle, alpha, flow) >= threshold
    lower = jnp.where(above, middle, lower)
    upper = jnp.where(above, upper, middle)
  return _finish_adaptive(t, (lower + upper) / 2, step, active, settings, max_steps)


def adaptive_softmax(
    t: jax.Array,
    sigma_theta: jax.Array,
    step,
    active: jax.Array,
    settings: TimeMapSettings,
    *,
    max_steps: Optional[jax.Array] = None,
    flow: flows.Flow = RECTIFIED,
) -> tuple[jax.Array, jax.Array]:
  """The adaptive_softmax schedule: the step's total time redistributed by D, per row.

  Args:
    t: `[B, V]` float32 current times.
    sigma_theta: `[B, V]` the model's per-patch sigma at t.
    step: the step index k (scalar int).
    active: `[B, V]` bool patches that take part (the softmax runs over those with t > 0).
    settings: `kind='adaptive_softmax'`.
    max_steps: `[B]` int per-row M, overriding settings.max_steps.
    flow: the flow of D (`noise.flows.Flow`).

  Returns:
    (next_t `[B, V]`, should_denoise `[B, V]` = active and t > finished_threshold).
  """
  steps = _row_steps(settings, max_steps)
  remaining = jnp.maximum(steps - step, 1).astype(jnp.float32)
  s0 = (1.0 - 1.0 / remaining) * t
  moving = active & (t > 0)
  step_divergence = divergence(sigma_theta, t, s0, settings.alpha, flow)
  step_divergence = jnp.where(jnp.isnan(step_divergence), 0.0, step_divergence)
  logits = jnp.log(s0 + settings.epsilon) + settings.scale * step_divergence
  logits = jnp.where(moving, logits, -jnp.inf)
  total = jnp.sum(jnp.where(moving, s0, 0.0), axis=1, keepdims=True)
  any_moving = jnp.any(moving, axis=1, keepdims=True)
  weights = jax.nn.softmax(jnp.where(any_moving, logits, 0.0), axis=1)
  next_t = jnp.where(moving, weights * total, 0.0)
  clipping = jnp.ones_like(total, bool)
  for _ in range(settings.max_clip_iter):
    next_t = jnp.where(clipping, jnp.minimum(next_t, t), next_t)
    at_t = moving & (next_t == t)
    clipped_total = jnp.sum(jnp.where(at_t, next_t, 0.0), axis=1, keepdims=True)
    free_total = jnp.sum(jnp.where(moving & ~at_t, next_t, 0.0), axis=1, keepdims=True)
    clipping = clipping & ~(clipped_total < 1.0e-5)
    factor = (total - clipped_total) / jnp.where(free_total > 0, free_total, 1.0)
    next_t = jnp.where(clipping & (free_total > 0), next_t * factor, next_t)
  next_t = jnp.minimum(next_t, t)
  return _finish_adaptive(t, next_t, step, active, settings, max_steps)


def next_time_map(
    settings: TimeMapSettings,
    t: jax.Array,
    sigma_theta: jax.Array,
    step,
    active: jax.Array,
    *,
    order: Optional[jax.Array] = None,
    max_steps: Optional[jax.Array] = None,
    start_time: Any = 1.0,
    flow: flows.Flow = RECTIFIED,
) -> tuple[jax.Array, jax.Array]:
  """(next_t, should_denoise) `[B, V]` of the schedule `settings.kind` (the arguments of the
  four functions above; `order` `[B, V]` is mask_git's, `max_steps` `[B]` the adaptive ones',
  `start_time` raster's and mask_git's)."""
  if settings.kind == "raster":
    return raster(t, step, active, settings, start_time)
  if settings.kind == "mask_git":
    return mask_git(t, step, active, settings, order=order, start_time=start_time)
  if settings.kind == "adaptive_inverse":
    return adaptive_inverse(t, sigma_theta, step, active, settings, max_steps=max_steps, flow=flow)
  return adaptive_softmax(t, sigma_theta, step, active, settings, max_steps=max_steps, flow=flow)
