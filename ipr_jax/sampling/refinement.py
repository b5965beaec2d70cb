"""IPR's refinement loop (spec §4.5): one `lax.scan` over iterations, optionally preceded by the
SRM pass as its iteration 0, each iteration selecting patches, re-noising them and regenerating
them with the greedy loop of `greedy.py`, then the uncertainty query (`query.py`), the
confident-iterate tracker and immediate_stop. `refine` runs it; `ipr.py`'s `srm_ipr` and
`ipr_refine` prepare its inputs.

Verifier-free by construction: nothing here receives a task's scorer or a solution. Only the
two settings documented to read a verifier are handed one, as an explicitly named argument:
`verify_fn` for immediate_stop (the reference's) and `cell_verify_fn` for selection='verifier';
a verifier handed to any other setting is refused (`check_refine`).
"""

import dataclasses
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from ipr_jax.noise import flows
from ipr_jax.noise import schedule as schedule_lib
from ipr_jax.sampling.config import CellVerifyFn, IPRConfig, SamplerConfig, VerifyFn
from ipr_jax.sampling.greedy import (
    PuzzleSchedule,
    greedy_loop,
    lookup_schedule,
    planned_order,
    srm_table,
)
from ipr_jax.sampling import time_map_sampler
from ipr_jax.sampling.inputs import ITERATION_STREAM, PLAN_STREAM, Denoiser, Given
from ipr_jax.sampling.patches import fold_keys, patch_grid, patch_pixel_mask
from ipr_jax.sampling.query import IterateQuery, iterate_query
from ipr_jax.sampling.selection import SELECTORS, resample_counts


@flax.struct.dataclass
class IPRResult:
  """Output of IPR (`srm_ipr`, `ipr_refine`).

  Attributes:
    z: `[B, H, W, C]` float32 returned iterate: the last (the reference's), or
      the most confident one with return_iterate='confident'.
    iterates: `[budget + 1, B, H, W, C]` float32 the returned iterate after each
      budget 0..budget (the last, or the most confident so far with
      return_iterate='confident'): what a caller scores; `iterates[-1]` is z.
    nfe: `[B]` int32 total denoiser passes (initial SRM + IPR).
    nfe_per_budget: `[budget + 1, B]` int32 cumulative passes after each budget.
    stop_budget: `[B]` int32 budget at which immediate_stop froze the puzzle,
      -1 if never.
    resampled: `[budget, B, N]` bool patches re-noised at each iteration.
    initial_order: `[B, N]` int32 selection order of the SRM pass (-1 padding;
      all -1 in correction mode).
    last_iterates: with return_iterate='confident', `[budget + 1, B, H, W, C]`
      the last iterate after each budget (`iterates` are then the returned, most
      confident ones); else None.
    mean_query_score: `[budget + 1, B]` float32 the mean uncertainty-query score
      (`query.iterate_score`) of the last iterate after each budget when the configuration
      queries it (`IPRConfig.queries_uncertainty`), else None; with chains > 1 that of the
      chosen chain.
    chosen_chain: with chains > 1, `[budget + 1, B]` int32 the chain returned after each budget
      (`chains.choose_chains`); else None.
  """

  z: jax.Array
  iterates: jax.Array
  nfe: jax.Array
  nfe_per_budget: jax.Array
  stop_budget: jax.Array
  resampled: jax.Array
  initial_order: jax.Array
  last_iterates: Optional[jax.Array] = None
  mean_query_score: Optional[jax.Array] = None
  chosen_chain: Optional[jax.Array] = None


@flax.struct.dataclass
class RefinementInputs:
  """What `refine` refines: the batch's arrays.

  Attributes:
    z: `[B, H, W, C]` the start: the samples of budget 0 or, with the SRM pass, its start state
      (given cells pasted, unknown cells noise).
    given: the given content re-pasted after every step (`[B, H, W, C]` and `[B, H, W, 1]`, or
      none).
    candidates: `[B, N]` bool the patches IPR may re-noise.
    noise: `[B, H, W, C]` the initial noise, that of noise_type='fixed'.
    keys: `[B]` typed per-puzzle keys.
    srm_unknown: `[B, N]` bool the patches the SRM pass generates (iteration 0), or None: no SRM
      pass.
  """

  z: jax.Array
  given: Given
  candidates: jax.Array
  noise: jax.Array
  keys: jax.Array
  srm_unknown: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class Regeneration:
  """How an IPR iteration regenerates its re-noised patches, and how many it re-noises.

  Attributes:
    table: the regeneration's schedule table for every count of re-noised patches
      (`IPRConfig` schedule, renoise_steps_per_patch, overlap, renoise_time, top_k).
    proto_len: the prototypes' padded length, shared with the SRM pass's schedule (one loop runs
      both).
    counts: `[budget + 1, N + 1]` int32 k of iteration i for c candidates (`resample_counts`).
  """

  table: schedule_lib.ScheduleTable
  proto_len: int
  counts: jax.Array


@dataclasses.dataclass(frozen=True)
class Refinement:
  """What every iteration of `refine`'s scan reads: the model, the settings, the inputs and what
  is derived from them once per trace.

  Attributes:
    denoiser: the model (denoise function, patch size, dependency matrix).
    sampler_config: SamplerConfig: the SRM pass's schedule and every pass's reverse kernel.
    ipr_config: IPRConfig.
    inputs: the batch refined.
    srm_schedule: the SRM pass's schedule of each puzzle (None: no SRM pass).
    regeneration: the regeneration's schedule and counts.
    iteration_keys: `[B]` keys of the iterations (iteration j folds in j).
    query: the uncertainty query of the iterates (None where the settings do not query).
    verify_fn: z -> `[B]` bool, only with immediate_stop.
    cell_verify_fn: z -> `[B, N]` bool, only with selection='verifier'.
  """

  denoiser: Denoiser
  sampler_config: SamplerConfig
  ipr_config: IPRConfig
  inputs: RefinementInputs
  srm_schedule: Optional[PuzzleSchedule]
  regeneration: Regeneration
  iteration_keys: jax.Array
  query: Optional[IterateQuery]
  verify_fn: Optional[VerifyFn]
  cell_verify_fn: Optional[CellVerifyFn]

  @property
  def with_srm(self) -> bool:
    return self.inputs.srm_unknown is not None

  @property
  def num_iterations(self) -> int:
    return self.ipr_config.budget + int(self.with_srm)

  @property
  def confident(self) -> bool:
    return self.ipr_config.return_iterate == "confident"

  @property
  def scores_every_iterate(self) -> bool:
    """Whether every iterate is queried (its score ranks it among iterates or chains after each
    budget)."""
    return self.confident or self.ipr_config.chooses_every_budget

  def queries_after(self, j):
    """Whether the iterate of iteration j is queried: every one where scores rank them; with
    chains chosen at the final budget only the last; else (the uncertainty-guided selection)
    all but the last, which no selection follows."""
    last = j == self.num_iterations - 1
    if self.scores_every_iterate:
      return True
    if self.ipr_config.chains > 1:
      return last
    return ~last


@flax.struct.dataclass
class _RefineCarry:
  """The state `refine`'s scan carries from one iteration to the next."""

  z: jax.Array  # [B, H, W, C] float32 the last iterate
  nfe: jax.Array  # [B] int32 denoiser passes so far
  stopped: jax.Array  # [B] bool: frozen by immediate_stop
  stop_budget: jax.Array  # [B] int32 budget at which immediate_stop froze it, -1 if not
  initial_order: jax.Array  # [B, N] int32 selection order of the SRM pass
  cells: jax.Array  # [B, N] float32 query scores of z's patches (the next selection's)
  z_best: jax.Array  # [B, H, W, C] float32 the most confident iterate so far
  best: jax.Array  # [B] float32 its mean query score


def check_refine(inputs: RefinementInputs, ipr_config: IPRConfig, verify_fn, cell_verify_fn):
  """Refuses a missing verifier where a setting reads one, and a verifier where none does."""
  z, noise = inputs.z, inputs.noise
  if noise.shape != z.shape:
    raise ValueError(f"noise must have shape {z.shape}, got {noise.shape}.")
  if ipr_config.immediate_stop and verify_fn is None:
    raise ValueError("immediate_stop=True needs a verify_fn.")
  if not ipr_config.immediate_stop and verify_fn is not None:
    raise ValueError(
        "verify_fn is read only by immediate_stop=True; this setting is verifier-free, pass "
        "verify_fn=None."
    )
  if ipr_config.selection == "verifier" and cell_verify_fn is None:
    raise ValueError(
        "selection='verifier' needs a cell_verify_fn (the task's per-cell rule "
        "check); only MNIST Sudoku has one."
    )
  if ipr_config.selection != "verifier" and cell_verify_fn is not None:
    raise ValueError(
        f"cell_verify_fn is read only by selection='verifier'; selection="
        f"{ipr_config.selection!r} is verifier-free, pass cell_verify_fn=None."
    )


def _refinement(
    denoiser: Denoiser,
    inputs: RefinementInputs,
    sampler_config: SamplerConfig,
    ipr_config: IPRConfig,
    verify_fn: Optional[VerifyFn],
    cell_verify_fn: Optional[CellVerifyFn],
) -> Refinement:
  """The schedules, keys, resampling counts and query of `refine`, with its inputs."""
  num_patches = inputs.candidates.shape[1]
  clean = sampler_config.clean_schedule
  kind = ipr_config.schedule
  if kind in schedule_lib.TIME_MAP_SCHEDULES:  # No blocks: the adaptive passes set their M.
    kind = "adaptive"
  ipr_table = schedule_lib.schedule_table(
      num_patches,
      ipr_config.renoise_steps_per_patch,
      ipr_config.overlap,
      clean,
      ipr_config.renoise_time,
      kind=kind,
      top_k=ipr_config.top_k,
  )
  proto_len = ipr_table.prototypes.shape[1]
  srm_schedule = None
  if inputs.srm_unknown is not None:
    table = srm_table(num_patches, sampler_config)
    proto_len = max(proto_len, table.prototypes.shape[1])
    order = planned_order(
        table,
        sampler_config,
        inputs.srm_unknown,
        fold_keys(inputs.keys, PLAN_STREAM),
        denoiser.dependency,
        sampler_config.overlap,
    )
    srm_schedule = lookup_schedule(table, jnp.sum(inputs.srm_unknown, axis=1), proto_len, order)
  query = None
  if ipr_config.queries_uncertainty:
    query = iterate_query(
        denoiser, inputs.candidates, inputs.keys, ipr_config, sampler_config.noise_flow
    )
  return Refinement(
      denoiser=denoiser,
      sampler_config=sampler_config,
      ipr_config=ipr_config,
      inputs=inputs,
      srm_schedule=srm_schedule,
      regeneration=Regeneration(
          table=ipr_table,
          proto_len=proto_len,
          counts=jnp.asarray(resample_counts(ipr_config, num_patches)),
      ),
      iteration_keys=fold_keys(inputs.keys, ITERATION_STREAM),
      query=query,
      verify_fn=verify_fn,
      cell_verify_fn=cell_verify_fn,
  )


def renoise(
    z,
    renoised,
    keys,
    noise,
    given: Given,
    *,
    patch_size: int,
    noise_type: str,
    renoise_time: float,
    noise_flow: flows.Flow = flows.RECTIFIED,
) -> jax.Array:
  """The start of an IPR iteration: z with the `renoised` patches re-noised (spec §4.5).

  Args:
    z: `[B, H, W, C]` float32 current iterate.
    renoised: `[B, N]` bool patches to re-noise.
    keys: `[B]` typed keys of the fresh noise.
    noise: `[B, H, W, C]` initial noise, the noise of noise_type='fixed'.
    given: the given content, re-pasted.
    patch_size: P.
    noise_type: 'random' (fresh noise from `keys`) or 'fixed'.
    renoise_time: t0; below 1 the re-noised patches go to z_t0 = a(t0) z + b(t0) eps (the
      rectified flow: (1 - t0) z + t0 eps) at the flow's time of t0 (`Flow.adjust_time`).
    noise_flow: the flow of `SamplerConfig.flow`.

  Returns:
    `[B, H, W, C]` float32.
  """
  if noise_type == "fixed":
    fresh = noise.astype(jnp.float32)
  else:
    fresh = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys)
  noised = fresh
  if renoise_time < 1.0:  # t0 stays a Python float: flow.z_t's 1 - t0 is Python arithmetic.
    noised = noise_flow.z_t(z, fresh, noise_flow.adjust_time(renoise_time))
  pixels = patch_pixel_mask(renoised, patch_grid(z.shape, patch_size), patch_size)
  return given.paste(jnp.where(pixels, noised, z))


def _initial_carry(run: Refinement, z: jax.Array) -> _RefineCarry:
  """The carry before iteration 0; without the SRM pass, budget 0 is z itself: it may already be
  accepted (immediate_stop) and is queried first when the configuration queries."""
  batch, num_patches = run.inputs.candidates.shape
  stopped = jnp.zeros([batch], bool)
  if run.ipr_config.immediate_stop and not run.with_srm:
    stopped = _accepted(run, z)
  nfe = jnp.zeros([batch], jnp.int32)
  cells = jnp.zeros((batch, num_patches), jnp.float32)
  best = jnp.full([batch], jnp.inf, jnp.float32)
  if run.query is not None and not run.with_srm:
    cells, cost = run.query.patch_scores(z, 0, ~stopped)
    nfe = nfe + cost
    best = run.query.mean_score(cells)
  return _RefineCarry(
      z=z,
      nfe=nfe,
      stopped=stopped,
      stop_budget=jnp.where(stopped, 0, -1).astype(jnp.int32),
      initial_order=jnp.full((batch, num_patches), -1, jnp.int32),
      cells=cells,
      z_best=z,
      best=best,
  )


def _iteration_start(run: Refinement, carry: _RefineCarry, j, keys, active):
  """What iteration j regenerates, from where: (renoised `[B, N]` (the re-noised patches; none in
  the SRM pass), waiting `[B, N]` (the patches to generate), z_start `[B, H, W, C]`, the
  schedule, the waiting patches' start time `[B]` or None (t = 1))."""
  cfg, inputs, regeneration = run.ipr_config, run.inputs, run.regeneration
  batch = inputs.candidates.shape[0]
  ipr_iteration = j if run.with_srm else j + 1  # 1-based; 0 is the SRM pass
  num_candidates = jnp.sum(inputs.candidates, axis=1)
  k = jnp.minimum(regeneration.counts[ipr_iteration][num_candidates], num_candidates)
  renoised = SELECTORS[cfg.selection](
      keys[:, 0],
      inputs.candidates,
      k,
      z=carry.z,
      cells=carry.cells,
      ipr_config=cfg,
      cell_verify_fn=run.cell_verify_fn,
  )
  renoised = renoised & active[:, None]
  z_start = renoise(
      carry.z,
      renoised,
      keys[:, 1],
      inputs.noise,
      inputs.given,
      patch_size=run.denoiser.patch_size,
      noise_type=cfg.noise_type,
      renoise_time=cfg.renoise_time,
      noise_flow=run.sampler_config.noise_flow,
  )
  order = planned_order(
      regeneration.table,
      cfg,
      renoised,
      fold_keys(keys[:, 0], PLAN_STREAM),
      run.denoiser.dependency,
      cfg.overlap,
  )
  sched = lookup_schedule(
      regeneration.table, jnp.sum(renoised, axis=1), regeneration.proto_len, order
  )
  partial = cfg.renoise_time < 1.0
  start_time = jnp.full([batch], cfg.renoise_time, jnp.float32) if partial else None
  waiting = renoised
  if inputs.srm_unknown is not None:  # Iteration 0 is the SRM pass: its patches, from z, on its
    is_srm = j == 0  # schedule.
    waiting = jnp.where(is_srm, inputs.srm_unknown & active[:, None], renoised)
    renoised = renoised & ~is_srm
    z_start = jnp.where(is_srm, carry.z, z_start)
    sched = jax.tree.map(lambda a, b: jnp.where(is_srm, a, b), run.srm_schedule, sched)
    if start_time is not None:  # partial re-noising; the SRM pass starts at t = 1
      start_time = jnp.where(is_srm, 1.0, start_time)
  return renoised, waiting, z_start, sched, start_time


def _query_and_track(run: Refinement, carry: _RefineCarry, j, active):
  """After iteration j: the new iterate's uncertainty query and, with return_iterate=
  'confident', the confident-iterate tracker. Returns (carry, mean score `[B]` or None)."""
  query = run.query
  if query is None:
    return carry, None
  batch = run.inputs.candidates.shape[0]
  cells, cost = jax.lax.cond(
      run.queries_after(j),
      lambda: query.patch_scores(carry.z, j + 1, active),
      lambda: (jnp.full_like(carry.cells, jnp.nan), jnp.zeros([batch], jnp.int32)),
  )
  mean_score = query.mean_score(cells)
  carry = dataclasses.replace(carry, cells=cells, nfe=carry.nfe + cost)
  if run.confident:  # Keep the iterate with the lowest mean score so far.
    better = active & (mean_score < carry.best)
    carry = dataclasses.replace(
        carry,
        z_best=jnp.where(better[:, None, None, None], carry.z, carry.z_best),
        best=jnp.where(better, mean_score, carry.best),
    )
  return carry, mean_score


def _accepted(run: Refinement, z: jax.Array) -> jax.Array:
  """`[B]` bool: the samples z `[B, H, W, C]` that `verify_fn` accepts (immediate_stop only)."""
  verify_fn = run.verify_fn
  assert verify_fn is not None, "immediate_stop without a verify_fn (check_refine refuses it)"
  return verify_fn(z).astype(bool)


def _immediate_stop(run: Refinement, carry: _RefineCarry, j, active) -> _RefineCarry:
  """Freezes the active puzzles that `verify_fn` accepts after iteration j (at budget j, or
  j + 1 without the SRM pass); their accepted iterate is the one returned."""
  accepted = active & _accepted(run, carry.z)
  carry = dataclasses.replace(
      carry,
      stop_budget=jnp.where(accepted, j if run.with_srm else j + 1, carry.stop_budget),
      stopped=carry.stopped | accepted,
  )
  if run.confident:  # The verifier's choice overrides the model's.
    carry = dataclasses.replace(
        carry, z_best=jnp.where(accepted[:, None, None, None], carry.z, carry.z_best)
    )
  return carry


def _regenerate(run: Refinement, j, z_start, waiting, sched, start_time, keys):
  """Iteration j's generation of its `waiting` patches: the greedy loop, or the time-map loop
  (`time_map_sampler`) for a time-map schedule of the SRM pass (j = 0) or of the regeneration.
  Without a time map one greedy loop serves both kinds of iteration (`sched` holds either's
  rows); with one, `lax.cond` picks the SRM pass's loop or the regeneration's."""
  ipr_config = run.ipr_config

  def generate(config, steps_per_patch, order_keys):
    if config.schedule not in schedule_lib.TIME_MAP_SCHEDULES:
      return greedy_loop(
          run.denoiser,
          z_start,
          run.inputs.given,
          waiting,
          keys[:, 2],
          sched,
          run.sampler_config,
          start_time=start_time,
      )
    max_steps = None if getattr(config, "max_steps", 0) > 0 else sched.max_steps
    return time_map_sampler.time_map_loop(
        run.denoiser,
        z_start,
        run.inputs.given,
        waiting,
        keys[:, 2],
        time_map_sampler.time_map_settings(config, steps_per_patch),
        run.sampler_config,
        order_keys=order_keys,
        max_steps=max_steps,
        start_time=start_time,
    )

  def regeneration():
    return generate(
        ipr_config, ipr_config.renoise_steps_per_patch, fold_keys(keys[:, 0], PLAN_STREAM)
    )

  def srm_pass():
    return generate(run.sampler_config, None, fold_keys(run.inputs.keys, PLAN_STREAM))

  if not run.with_srm:
    return regeneration()
  time_maps_used = {run.sampler_config.schedule, ipr_config.schedule} & set(
      schedule_lib.TIME_MAP_SCHEDULES
  )
  if not time_maps_used:
    return srm_pass()
  return jax.lax.cond(j == 0, srm_pass, regeneration)


def _iteration(run: Refinement, carry: _RefineCarry, j):
  """Iteration j of the scan (the SRM pass when j = 0 with it): select, re-noise, regenerate
  with the greedy loop, query, stop. Outputs: (the returned iterate, nfe, the re-noised patches,
  the last iterate (confident) or None, its mean query score or None)."""
  # [B, 3]: resampling, re-noising and greedy-step keys of this iteration.
  keys = jax.vmap(lambda k: jax.random.split(k, 3))(fold_keys(run.iteration_keys, j))
  active = ~carry.stopped
  renoised, waiting, z_start, sched, start_time = _iteration_start(run, carry, j, keys, active)
  out = _regenerate(run, j, z_start, waiting, sched, start_time, keys)
  carry = dataclasses.replace(
      carry, z=jnp.where(active[:, None, None, None], out.z, carry.z), nfe=carry.nfe + out.nfe
  )
  if run.with_srm:
    carry = dataclasses.replace(
        carry, initial_order=jnp.where(j == 0, out.order, carry.initial_order)
    )
  carry, mean_score = _query_and_track(run, carry, j, active)
  if run.ipr_config.immediate_stop:
    carry = _immediate_stop(run, carry, j, active)
  returned = carry.z_best if run.confident else carry.z
  return carry, (
      returned,
      carry.nfe,
      renoised,
      carry.z if run.confident else None,
      mean_score,
  )


def _result(run: Refinement, first: _RefineCarry, last: _RefineCarry, outputs) -> IPRResult:
  """The IPRResult of the scan's final carry and stacked outputs (`first`: the initial carry)."""
  iterates, nfes, resampled, last_iterates, mean_query_score = outputs
  if run.with_srm:
    resampled = resampled[1:]
  else:  # Budget 0 is the input itself.

    def with_budget0(budget0, rest):
      return jnp.concatenate([budget0[None], rest], axis=0)

    iterates = with_budget0(first.z, iterates)
    nfes = with_budget0(first.nfe, nfes)
    if run.confident:
      last_iterates = with_budget0(first.z, last_iterates)
    if run.query is not None:  # The input's query, made before the scan.
      mean_query_score = with_budget0(first.best, mean_query_score)
  return IPRResult(
      z=last.z_best if run.confident else last.z,
      iterates=iterates,
      nfe=last.nfe,
      nfe_per_budget=nfes,
      stop_budget=last.stop_budget,
      resampled=resampled,
      initial_order=last.initial_order,
      last_iterates=last_iterates,
      mean_query_score=mean_query_score,
  )


def refine(
    denoiser: Denoiser,
    inputs: RefinementInputs,
    sampler_config: SamplerConfig,
    ipr_config: IPRConfig,
    *,
    verify_fn: Optional[VerifyFn] = None,
    cell_verify_fn: Optional[CellVerifyFn] = None,
) -> IPRResult:
  """IPR, optionally preceded by the SRM pass, as one scan over iterations.

  With `inputs.srm_unknown` given, iteration 0 is the SRM pass that generates those patches of
  z (budget 0) and iterations 1..budget are IPR iterations; the two kinds share one compiled
  greedy loop (so the greedy loop's denoiser call is traced once), iteration 0 merely using the
  SRM schedule and patch set. The uncertainty query (`IPRConfig.queries_uncertainty`) traces the
  denoiser again, on its G x B batch (and once more for the input's query without the SRM pass).

  Each iteration (`_iteration`): a selection strategy (`SELECTORS`) picks the patches,
  `renoise` re-noises them, the greedy loop regenerates them, then the query and the
  confident-iterate tracker (`_query_and_track`) and immediate_stop (`_immediate_stop`) run.
  """
  check_refine(inputs, ipr_config, verify_fn, cell_verify_fn)
  run = _refinement(denoiser, inputs, sampler_config, ipr_config, verify_fn, cell_verify_fn)
  first = _initial_carry(run, inputs.z.astype(jnp.float32))
  last, outputs = jax.lax.scan(
      lambda carry, j: _iteration(run, carry, j),
      first,
      jnp.arange(run.num_iterations, dtype=jnp.int32),
  )
  return _result(run, first, last, outputs)
