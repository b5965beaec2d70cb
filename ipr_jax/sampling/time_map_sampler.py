"""Sampling with the framework's time-map schedules (`time_maps.py`: raster, adaptive_inverse,
adaptive_softmax, mask_git), as `sampler.schedule` and `ipr.schedule`.

One `lax.while_loop` over steps: at each step the denoiser runs once on the whole batch with the
per-patch time map t `[B, N]` broadcast to pixels, the schedule maps (t, the model's per-patch
sigma, with sigma = 0 where t = 0 as the framework feeds it) to next_t, and every patch moves
from t to next_t with the greedy sampler's reverse step (`greedy._reverse_step`); given cells are
re-pasted after every step. The flow is the sampler's (`SamplerConfig.noise_flow`): the reverse
step's, the denoiser's (adjusted) times and the adaptive schedules' divergence D.
A puzzle whose patches are all at t = 0 spends no more passes: raster takes n S passes for n
patches to generate, mask_git G S, the adaptive ones at most M.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from ipr_jax.sampling import greedy
from ipr_jax.sampling import time_maps
from ipr_jax.sampling.config import SamplerConfig
from ipr_jax.sampling.inputs import PLAN_STREAM, Denoiser, Given, Puzzles
from ipr_jax.sampling.patches import check_keys, fold_keys, patch_grid, patch_mean
from ipr_jax.sampling.patches import patches_to_pixels


def time_map_settings(config, steps_per_patch: Optional[int] = None) -> time_maps.TimeMapSettings:
  """The time-map settings of a SamplerConfig or IPRConfig whose schedule is a time map.

  raster's and mask_git's steps per patch (group) are `steps_per_patch` (default: the config's);
  the adaptive schedules' M is the config's max_steps when it has one > 0 (else per puzzle, see
  `time_map_loop`).
  """
  return time_maps.TimeMapSettings(
      kind=config.schedule,
      num_steps=config.steps_per_patch if steps_per_patch is None else steps_per_patch,
      num_groups=config.num_groups,
      max_steps=max(1, getattr(config, "max_steps", 0)),
      alpha=config.adaptive_alpha,
      div_threshold=config.divergence_threshold or None,
      scale=config.softmax_scale,
  )


def _generation_order(finished_at: jax.Array, waiting: jax.Array):
  """(order, order_step) `[B, N]` int32: the waiting patches in the order they reached t = 0
  (ties by index) and that step, -1 padding."""
  num_patches = waiting.shape[1]
  reached = waiting & (finished_at >= 0)
  sort_key = jnp.where(reached, finished_at * num_patches + jnp.arange(num_patches), -1)
  big = jnp.iinfo(jnp.int32).max
  order = jnp.argsort(jnp.where(reached, sort_key, big), axis=1).astype(jnp.int32)
  valid = jnp.take_along_axis(reached, order, axis=1)
  order_step = jnp.take_along_axis(finished_at, order, axis=1)
  return jnp.where(valid, order, -1), jnp.where(valid, order_step, -1)


def time_map_loop(
    denoiser: Denoiser,
    z: jax.Array,
    given: Given,
    waiting: jax.Array,
    keys: jax.Array,
    settings: time_maps.TimeMapSettings,
    kernel: SamplerConfig,
    *,
    order_keys: jax.Array,
    max_steps: Optional[jax.Array] = None,
    start_time: Optional[jax.Array] = None,
    record_steps: int = 0,
    step_limit: Optional[int] = None,
) -> greedy.GreedyResult:
  """Generates the `waiting` `[B, N]` patches of z `[B, H, W, C]` on a time-map schedule.

  Args:
    denoiser: the model (called once per step on the whole batch).
    z: `[B, H, W, C]` the start (waiting patches noise, at `start_time`).
    given: the given content, re-pasted after every step.
    waiting: `[B, N]` bool the patches to generate (the schedule's active patches).
    keys: `[B]` typed keys of the steps' noise (step k folds in k, as the greedy loop).
    settings: the schedule (static).
    kernel: SamplerConfig whose stochasticity, temperature and clamp_noise set the reverse step.
    order_keys: `[B]` keys of mask_git's patch order.
    max_steps: `[B]` int32 the adaptive schedules' M per puzzle (None: settings.max_steps).
    start_time: `[B]` the waiting patches' start time (None: 1); raster's and mask_git's levels
      are scaled by it.
    record_steps: keep the time and sigma rows of the first record_steps steps.
    step_limit: stop after that many steps.

  Returns:
    GreedyResult; its order lists the patches in the order they reached t = 0.
  """
  patch_size = denoiser.patch_size
  noise_flow = kernel.noise_flow
  batch, num_patches = waiting.shape
  grid = patch_grid(z.shape, patch_size)
  start = jnp.ones([batch], jnp.float32) if start_time is None else start_time
  t_start = jnp.where(waiting, start[:, None], 0.0).astype(jnp.float32)
  order = None
  if settings.kind == "mask_git":
    order = time_maps.mask_git_order(order_keys, num_patches)
  num_steps: int | jax.Array = settings.max_steps
  if settings.kind == "raster":
    num_steps = num_patches * settings.num_steps
  elif settings.kind == "mask_git":
    num_steps = settings.num_groups * settings.num_steps
  elif max_steps is not None:
    num_steps = jnp.max(max_steps)
  if step_limit is not None:
    num_steps = jnp.minimum(num_steps, step_limit)
  rows = jnp.zeros((2, record_steps, batch, num_patches), jnp.float32)
  minus_one = jnp.full((batch, num_patches), -1, jnp.int32)

  def unfinished(t):
    return jnp.any(waiting & (t > 0), axis=1)

  def step_fn(carry):
    step, z, t, finished_at, nfe, rows = carry
    live = unfinished(t)
    t_pix = noise_flow.adjust_time(patches_to_pixels(t, grid, patch_size))
    out = denoiser.denoise_fn(z, t_pix)
    sigma = patch_mean(out.sigma.astype(jnp.float32), patch_size)
    sigma = jnp.where(t == 0, 0.0, sigma)
    t_next, _ = time_maps.next_time_map(
        settings,
        t,
        sigma,
        step,
        waiting,
        order=order,
        max_steps=max_steps,
        start_time=start,
        flow=noise_flow,
    )
    t_next = jnp.where(live[:, None], t_next, t)
    z_next = greedy._reverse_step(  # pylint: disable=protected-access
        out,
        z,
        t_pix,
        noise_flow.adjust_time(patches_to_pixels(t_next, grid, patch_size)),
        fold_keys(keys, step),
        stochasticity=kernel.stochasticity,
        temperature=kernel.temperature,
        clamp_noise=kernel.clamp_noise,
        noise_flow=noise_flow,
    )
    z_next = given.paste(z_next)
    finished_at = jnp.where((finished_at < 0) & (t > 0) & (t_next == 0), step, finished_at)
    if record_steps:
      rows = rows.at[:, step].set(jnp.stack([t, sigma]), mode="drop")
    return (
        step + 1,
        jnp.where(live[:, None, None, None], z_next, z),
        t_next,
        finished_at,
        nfe + live.astype(jnp.int32),
        rows,
    )

  def cond_fn(carry):
    step, _, t, *_ = carry
    return (step < num_steps) & jnp.any(unfinished(t))

  init = (jnp.int32(0), z.astype(jnp.float32), t_start, minus_one, jnp.zeros([batch], jnp.int32))
  _, z, _, finished_at, nfe, rows = jax.lax.while_loop(cond_fn, step_fn, init + (rows,))
  order_ids, order_step = _generation_order(finished_at, waiting)
  return greedy.GreedyResult(
      z=z,
      order=order_ids,
      order_step=order_step,
      nfe=nfe,
      t_rows=rows[0] if record_steps else None,
      sigma_rows=rows[1] if record_steps else None,
  )


def derived_max_steps(table, config, counts: jax.Array) -> Optional[jax.Array]:
  """`[B]` the adaptive schedules' M per puzzle: None where the config fixes it (max_steps > 0),
  else the greedy adaptive schedule's passes for each puzzle's patch count `counts` `[B]`
  (`table`: its `schedule.ScheduleTable`)."""
  if getattr(config, "max_steps", 0) > 0:
    return None
  return jnp.asarray(table.max_steps)[counts]


def srm_time_map_sample(
    denoiser: Denoiser,
    puzzles: Puzzles,
    config,
    *,
    unknown: Optional[jax.Array] = None,
    record: bool = False,
    step_limit: Optional[int] = None,
) -> greedy.GreedyResult:
  """`greedy.block_srm_sample` for a time-map `config.schedule` (same start, inputs and result)."""
  patch_size = denoiser.patch_size
  check_keys(puzzles.keys, puzzles.shape[0])
  z, given, generated = greedy.srm_start(puzzles, patch_size)
  if unknown is None:
    unknown = generated
  greedy.check_inputs(z, given, unknown, puzzles.keys, patch_size)
  settings = time_map_settings(config)
  table = greedy.srm_table(unknown.shape[1], config)
  max_steps = derived_max_steps(table, config, jnp.sum(unknown, axis=1))
  if settings.kind == "raster":
    record_steps = unknown.shape[1] * settings.num_steps
  elif settings.kind == "mask_git":
    record_steps = settings.num_groups * settings.num_steps
  else:
    record_steps = settings.max_steps if max_steps is None else table.steps_bound()
  return time_map_loop(
      denoiser,
      z,
      given,
      unknown,
      puzzles.keys,
      settings,
      config,
      order_keys=fold_keys(puzzles.keys, PLAN_STREAM),
      max_steps=max_steps,
      record_steps=record_steps if record else 0,
      step_limit=step_limit,
  )
