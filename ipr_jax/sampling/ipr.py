"""Iterative Partial Refinement (spec §4.5), batched: `srm_ipr` (the SRM pass, or the
correction-mode corruption, then IPR) and `ipr_refine` (IPR on given samples), one `lax.scan` over
budgets whose iterations share the greedy loop of `ipr_jax.sampling.greedy`.

IPR variants beyond the paper (`IPRConfig`; the defaults are the paper's IPR and leave its
program, keys and samples unchanged, checked against runs stored before the variants existed):

* selection='uncertainty': after each pass, `uncertainty_query` splits the candidate patches
  into G random groups and, in G denoiser passes (one call on a G x batch), scores each patch by
  the model's prediction of it from the others (the NLL of its current content, or log sigma);
  the next iteration draws its k patches by Gumbel top-k of the standardised scores at
  `selection_temperature`. Cost: G passes per iteration (and after the SRM pass).
* selection='verifier': patches that `cell_verify_fn` flags (Sudoku: cells in a broken row,
  column or box, as classified) first, uniformly among them, then uniformly among the rest. It
  uses the task's verifier: a reference, not a verifier-free method.
* renoise_time=t0 < 1: chosen patches go to z_t0 = (1 - t0) z + t0 eps (the forward process)
  and are regenerated from t0 with round(steps_per_patch t0) steps per patch, the prototype
  scaled by t0.
* ratio_schedule='linear': the ratio of iteration i moves linearly from resampling_ratio to
  final_resampling_ratio over ratio_decay_iterations and then stays; k per iteration follows.
* return_iterate='confident': the returned sample after each budget is the iterate (SRM sample
  included) with the lowest mean query score so far; the last iterates are returned too.
* query_cells='all' | 'balanced': the query also scores the given patches, from the completion
  (an iterate's score: `selection.iterate_score`).
* chains=K > 1: K independent SRM + IPR chains per puzzle in a batch of K x B (`chains.py`); each
  budget's result is the chain with the lowest mean query score; passes are summed over chains.

Verifier-free by construction: nothing here receives a task's scorer or a solution. The sampler
returns the iterate of every puzzle after every budget (`IPRResult.iterates`) and the caller
scores them afterwards (`ipr_jax.evaluation`). Only the two settings documented to read a
verifier are handed one, as an explicitly named argument: `verify_fn` for immediate_stop (the
reference's) and `cell_verify_fn` for selection='verifier'; a verifier handed to any other
setting is refused (`_check_refine`), so no setting can read one by accident.
"""

import dataclasses
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.noise import flow
from ipr_jax.noise import schedule as schedule_lib
from ipr_jax.sampling import chains as chains_lib
from ipr_jax.sampling.config import CellVerifyFn, DenoiseFn, IPRConfig
from ipr_jax.sampling.config import SamplerConfig, VerifyFn
from ipr_jax.sampling.greedy import (
    PLAN_STREAM,
    PuzzleSchedule,
    check_inputs,
    check_sampler_schedule,
    greedy_loop,
    lookup_schedule,
    planned_order,
    srm_table,
)
from ipr_jax.sampling.patches import (
    check_keys,
    corrupt_by_swaps,
    fold_keys,
    patch_grid,
    patch_pixel_mask,
    unknown_patches,
)
from ipr_jax.sampling.selection import SELECTORS, iterate_score, resample_counts
from ipr_jax.sampling.selection import uncertainty_query

# Tags for fold_in, so the streams of one puzzle key never collide.
_IPR_STREAM, _CORRUPT_STREAM, _NOISE_STREAM, _QUERY_STREAM = 1, 2, 3, 4


@flax.struct.dataclass
class IPRResult:
  """Output of IPR (and of `srm_ipr`).

  Attributes:
    z: `[B, H, W, d]` float32 returned iterate: the last (the reference's), or
      the most confident one with return_iterate='confident'.
    iterates: `[budget + 1, B, H, W, d]` float32 the returned iterate after each
      budget 0..budget (the last, or the most confident so far with
      return_iterate='confident'): what a caller scores; `iterates[-1]` is z.
    nfe: `[B]` int32 total denoiser passes (initial SRM + IPR).
    nfe_per_budget: `[budget + 1, B]` int32 cumulative passes after each budget.
    stop_budget: `[B]` int32 budget at which immediate_stop froze the puzzle,
      -1 if never.
    resampled: `[budget, B, N]` bool patches re-noised at each iteration.
    initial_order: `[B, N]` int32 selection order of the SRM pass (-1 padding;
      all -1 in correction mode).
    last_iterates: with return_iterate='confident', `[budget + 1, B, H, W, d]`
      the last iterate after each budget (`iterates` are then the returned, most
      confident ones); else None.
    uncertainty: `[budget + 1, B]` float32 mean uncertainty score of the last
      iterate after each budget when the configuration queries it, else None.
  """

  z: jax.Array
  iterates: jax.Array
  nfe: jax.Array
  nfe_per_budget: jax.Array
  stop_budget: jax.Array
  resampled: jax.Array
  initial_order: jax.Array
  last_iterates: Optional[jax.Array] = None
  uncertainty: Optional[jax.Array] = None


def check_schedules(
    sampler_config: SamplerConfig, ipr_config: IPRConfig, num_patches: int, unknown_counts
) -> None:
  """Refuses settings whose schedules are degenerate for the patch counts that can occur.

  Args:
    sampler_config, ipr_config: the settings of a run.
    num_patches: N, patches per image.
    unknown_counts: the numbers of patches the SRM pass may have to generate (standard mode);
      they are also IPR's candidate counts. Correction mode ignores them: every patch is a
      candidate and there is no SRM pass.

  Raises:
    ValueError: naming the fields that set the schedule and the first degenerate n
      (`schedule.check_block_starts`: the adaptive schedule with repeated block starts, any
      schedule without passes); the SRM pass's check is the same call as `srm_sample`'s
      (`greedy.check_sampler_schedule`).
  """
  clean = sampler_config.clean_schedule
  if ipr_config.mode == "correction":
    counts = [num_patches]
  else:
    counts = [int(c) for c in unknown_counts]
    check_sampler_schedule(sampler_config, counts)
  if ipr_config.budget > 0:
    table = resample_counts(ipr_config, num_patches)
    ks = {min(int(k), c) for row in table for k, c in zip(row[counts], counts)}
    name = "ipr"
    if ipr_config.renoise_steps_per_patch != ipr_config.steps_per_patch:
      name = (
          f"ipr (renoise_time={ipr_config.renoise_time} leaves "
          f"{ipr_config.renoise_steps_per_patch} of steps_per_patch="
          f"{ipr_config.steps_per_patch})"
      )
    schedule_lib.check_block_starts(
        ks,
        ipr_config.renoise_steps_per_patch,
        ipr_config.overlap,
        clean,
        name=name,
        kind=ipr_config.schedule,
        top_k=ipr_config.top_k,
    )


def _renoise(
    z, chosen, keys, noise, masked, mask, *, patch_size: int, noise_type: str, renoise_time: float
) -> jax.Array:
  """The start of an IPR iteration: z with the chosen patches re-noised (spec §4.5).

  Args:
    z: `[B, H, W, d]` float32 current iterate.
    chosen: `[B, N]` bool patches to re-noise.
    keys: `[B]` typed keys of the fresh noise.
    noise: `[B, H, W, d]` initial noise, the noise of noise_type='fixed'.
    masked, mask: `[B, H, W, d]` given content and `[B, H, W, 1]` mask, re-pasted (None: none).
    patch_size: P.
    noise_type: 'random' (fresh noise from `keys`) or 'fixed'.
    renoise_time: t0; below 1 the chosen patches go to z_t0 = (1 - t0) z + t0 eps.

  Returns:
    `[B, H, W, d]` float32.
  """
  if noise_type == "fixed":
    fresh = noise.astype(jnp.float32)
  else:
    fresh = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys)
  renoised = flow.z_t(z, fresh, renoise_time) if renoise_time < 1.0 else fresh
  pixels = patch_pixel_mask(chosen, patch_grid(z.shape, patch_size), patch_size)
  z_start = jnp.where(pixels, renoised, z)
  if mask is not None:
    z_start = masked + mask * z_start
  return z_start


# ----------------------------------------------------------------------------
# IPR's scan over iterations.


@dataclasses.dataclass(frozen=True)
class _Refinement:
  """What every iteration of `_refine`'s scan reads: the inputs, functions and static settings.

  Arrays: masked `[B, H, W, d]`, mask `[B, H, W, 1]` (both None without a mask), candidates
  `[B, N]`, scored `[B, N]` (the patches the query scores, `IPRConfig.query_cells`), noise
  `[B, H, W, d]`, srm_unknown `[B, N]` (None: no SRM pass) and srm_sched, the SRM pass's
  schedule; iteration_keys and query_keys `[B]`; counts `[budget + 1, N + 1]`
  (`resample_counts`).
  """

  denoise_fn: DenoiseFn
  masked: Optional[jax.Array]
  mask: Optional[jax.Array]
  candidates: jax.Array
  scored: jax.Array
  noise: jax.Array
  srm_unknown: Optional[jax.Array]
  srm_sched: Optional[PuzzleSchedule]
  iteration_keys: jax.Array
  query_keys: jax.Array
  counts: jax.Array
  dependency: Optional[np.ndarray]
  ipr_table: schedule_lib.ScheduleTable
  proto_len: int
  patch_size: int
  sampler_config: SamplerConfig
  ipr_config: IPRConfig
  verify_fn: Optional[VerifyFn]
  cell_verify_fn: Optional[CellVerifyFn]

  @property
  def with_srm(self) -> bool:
    return self.srm_unknown is not None

  @property
  def num_iterations(self) -> int:
    return self.ipr_config.budget + int(self.with_srm)

  @property
  def confident(self) -> bool:
    return self.ipr_config.return_iterate == "confident"

  @property
  def scores_every_iterate(self) -> bool:
    """Whether the last iterate is queried too (its score ranks it among iterates or chains)."""
    return self.confident or self.ipr_config.chains > 1


@flax.struct.dataclass
class _RefineCarry:
  """The state `_refine`'s scan carries from one iteration to the next."""

  z: jax.Array  # [B, H, W, d] float32 the last iterate
  nfe: jax.Array  # [B] int32 denoiser passes so far
  stopped: jax.Array  # [B] bool: frozen by immediate_stop
  stop_budget: jax.Array  # [B] int32 budget at which immediate_stop froze it, -1 if not
  initial_order: jax.Array  # [B, N] int32 selection order of the SRM pass
  cells: jax.Array  # [B, N] float32 uncertainty of z's patches (the next selection's)
  z_best: jax.Array  # [B, H, W, d] float32 the most confident iterate so far
  best: jax.Array  # [B] float32 its mean uncertainty score


def _check_refine(z, noise, ipr_config: IPRConfig, verify_fn, cell_verify_fn) -> None:
  """Refuses a missing verifier where a setting reads one, and a verifier where none does."""
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
    denoise_fn,
    masked,
    mask,
    candidates,
    noise,
    keys,
    srm_unknown,
    *,
    patch_size,
    sampler_config,
    ipr_config,
    verify_fn,
    cell_verify_fn,
    dependency,
) -> _Refinement:
  """The schedules, keys and resampling counts of `_refine`, with its inputs."""
  num_patches = candidates.shape[1]
  clean = sampler_config.clean_schedule
  ipr_table = schedule_lib.schedule_table(
      num_patches,
      ipr_config.renoise_steps_per_patch,
      ipr_config.overlap,
      clean,
      ipr_config.renoise_time,
      kind=ipr_config.schedule,
      top_k=ipr_config.top_k,
  )
  proto_len = ipr_table.prototypes.shape[1]
  srm_sched = None
  if srm_unknown is not None:
    table = srm_table(num_patches, sampler_config)
    proto_len = max(proto_len, table.prototypes.shape[1])
    order = planned_order(
        table,
        sampler_config,
        srm_unknown,
        fold_keys(keys, PLAN_STREAM),
        dependency,
        sampler_config.overlap,
    )
    srm_sched = lookup_schedule(table, jnp.sum(srm_unknown, axis=1), proto_len, order)
  return _Refinement(
      denoise_fn=denoise_fn,
      masked=masked,
      mask=mask,
      candidates=candidates,
      scored=candidates if ipr_config.query_cells == "candidates" else jnp.ones_like(candidates),
      noise=noise,
      srm_unknown=srm_unknown,
      srm_sched=srm_sched,
      iteration_keys=fold_keys(keys, _IPR_STREAM),
      query_keys=fold_keys(keys, _QUERY_STREAM),
      counts=jnp.asarray(resample_counts(ipr_config, num_patches)),
      dependency=dependency,
      ipr_table=ipr_table,
      proto_len=proto_len,
      patch_size=patch_size,
      sampler_config=sampler_config,
      ipr_config=ipr_config,
      verify_fn=verify_fn,
      cell_verify_fn=cell_verify_fn,
  )


def _query(run: _Refinement, z, index, active) -> tuple[jax.Array, jax.Array]:
  """The uncertainty query of z `[B, H, W, d]` (keys: fold_in of `index`): (cells `[B, N]`, the
  passes it costs `[B]`, 0 for inactive puzzles)."""
  cfg = run.ipr_config
  cells = uncertainty_query(
      run.denoise_fn,
      z,
      run.scored,
      fold_keys(run.query_keys, index),
      patch_size=run.patch_size,
      groups=cfg.uncertainty_groups,
      score=cfg.uncertainty_score,
  )
  return cells, jnp.where(active, cfg.uncertainty_groups, 0).astype(jnp.int32)


def _initial_carry(run: _Refinement, z: jax.Array) -> _RefineCarry:
  """The carry before iteration 0; without the SRM pass, budget 0 is z itself: it may already be
  accepted (immediate_stop) and is queried first when the configuration queries."""
  batch, num_patches = run.candidates.shape
  stopped = jnp.zeros([batch], bool)
  if run.ipr_config.immediate_stop and not run.with_srm:
    stopped = run.verify_fn(z).astype(bool)
  nfe = jnp.zeros([batch], jnp.int32)
  cells = jnp.zeros((batch, num_patches), jnp.float32)
  best = jnp.full([batch], jnp.inf, jnp.float32)
  if run.ipr_config.queries_uncertainty and not run.with_srm:
    cells, cost = _query(run, z, 0, ~stopped)
    nfe = nfe + cost
    best = iterate_score(cells, run.candidates, run.ipr_config.query_cells)
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


def _iteration_start(run: _Refinement, carry: _RefineCarry, j, keys, active):
  """What iteration j regenerates, from where: (chosen `[B, N]` (the re-noised patches; none in
  the SRM pass), waiting `[B, N]` (the patches to generate), z_start `[B, H, W, d]`, the
  schedule, the waiting patches' start time `[B]` or None (t = 1))."""
  cfg = run.ipr_config
  batch = run.candidates.shape[0]
  ipr_iteration = j if run.with_srm else j + 1  # 1-based; 0 is the SRM pass
  num_candidates = jnp.sum(run.candidates, axis=1)
  k = jnp.minimum(run.counts[ipr_iteration][num_candidates], num_candidates)
  chosen = SELECTORS[cfg.selection](
      keys[:, 0],
      run.candidates,
      k,
      z=carry.z,
      cells=carry.cells,
      ipr_config=cfg,
      cell_verify_fn=run.cell_verify_fn,
  )
  chosen = chosen & active[:, None]
  z_start = _renoise(
      carry.z,
      chosen,
      keys[:, 1],
      run.noise,
      run.masked,
      run.mask,
      patch_size=run.patch_size,
      noise_type=cfg.noise_type,
      renoise_time=cfg.renoise_time,
  )
  order = planned_order(
      run.ipr_table, cfg, chosen, fold_keys(keys[:, 0], PLAN_STREAM), run.dependency, cfg.overlap
  )
  sched = lookup_schedule(run.ipr_table, jnp.sum(chosen, axis=1), run.proto_len, order)
  partial = cfg.renoise_time < 1.0
  start_time = jnp.full([batch], cfg.renoise_time, jnp.float32) if partial else None
  waiting = chosen
  if run.with_srm:  # Iteration 0 is the SRM pass: its patches, from z, on its schedule.
    is_srm = j == 0
    waiting = jnp.where(is_srm, run.srm_unknown & active[:, None], chosen)
    chosen = chosen & ~is_srm
    z_start = jnp.where(is_srm, carry.z, z_start)
    sched = jax.tree.map(lambda a, b: jnp.where(is_srm, a, b), run.srm_sched, sched)
    if partial:
      start_time = jnp.where(is_srm, 1.0, start_time)
  return chosen, waiting, z_start, sched, start_time


def _query_and_track(run: _Refinement, carry: _RefineCarry, j, active):
  """After iteration j: the new iterate's uncertainty query and, with return_iterate=
  'confident', the confident-iterate tracker. Returns (carry, mean score `[B]` or None)."""
  if not run.ipr_config.queries_uncertainty:
    return carry, None
  # With return_iterate='last' and one chain the last iterate is never ranked: skip its query.
  needed = True if run.scores_every_iterate else j < run.num_iterations - 1
  batch = run.candidates.shape[0]
  cells, cost = jax.lax.cond(
      needed,
      lambda: _query(run, carry.z, j + 1, active),
      lambda: (jnp.full_like(carry.cells, jnp.nan), jnp.zeros([batch], jnp.int32)),
  )
  uncertainty = iterate_score(cells, run.candidates, run.ipr_config.query_cells)
  carry = carry.replace(cells=cells, nfe=carry.nfe + cost)
  if run.confident:  # Keep the iterate with the lowest mean score so far.
    better = active & (uncertainty < carry.best)
    carry = carry.replace(
        z_best=jnp.where(better[:, None, None, None], carry.z, carry.z_best),
        best=jnp.where(better, uncertainty, carry.best),
    )
  return carry, uncertainty


def _immediate_stop(run: _Refinement, carry: _RefineCarry, j, active) -> _RefineCarry:
  """Freezes the active puzzles that `verify_fn` accepts after iteration j (at budget j, or
  j + 1 without the SRM pass); their accepted iterate is the one returned."""
  accepted = active & run.verify_fn(carry.z).astype(bool)
  carry = carry.replace(
      stop_budget=jnp.where(accepted, j if run.with_srm else j + 1, carry.stop_budget),
      stopped=carry.stopped | accepted,
  )
  if run.confident:  # The verifier's choice overrides the model's.
    carry = carry.replace(z_best=jnp.where(accepted[:, None, None, None], carry.z, carry.z_best))
  return carry


def _iteration(run: _Refinement, carry: _RefineCarry, j):
  """Iteration j of the scan (the SRM pass when j = 0 with it): select, re-noise, regenerate
  with the greedy loop, query, stop. Outputs: (the returned iterate, nfe, chosen, the last
  iterate (confident) or None, mean uncertainty or None)."""
  # [B, 3]: resampling, re-noising and greedy-step keys of this iteration.
  keys = jax.vmap(lambda k: jax.random.split(k, 3))(fold_keys(run.iteration_keys, j))
  active = ~carry.stopped
  chosen, waiting, z_start, sched, start_time = _iteration_start(run, carry, j, keys, active)
  config = run.sampler_config
  out = greedy_loop(
      run.denoise_fn,
      z_start,
      run.masked,
      run.mask,
      waiting,
      keys[:, 2],
      sched,
      patch_size=run.patch_size,
      stochasticity=config.stochasticity,
      temperature=config.temperature,
      clamp_noise=config.clamp_noise,
      start_time=start_time,
  )
  carry = carry.replace(
      z=jnp.where(active[:, None, None, None], out.z, carry.z), nfe=carry.nfe + out.nfe
  )
  if run.with_srm:
    carry = carry.replace(initial_order=jnp.where(j == 0, out.order, carry.initial_order))
  carry, uncertainty = _query_and_track(run, carry, j, active)
  if run.ipr_config.immediate_stop:
    carry = _immediate_stop(run, carry, j, active)
  returned = carry.z_best if run.confident else carry.z
  return carry, (
      returned,
      carry.nfe,
      chosen,
      carry.z if run.confident else None,
      uncertainty,
  )


def _result(run: _Refinement, first: _RefineCarry, last: _RefineCarry, outputs) -> IPRResult:
  """The IPRResult of the scan's final carry and stacked outputs (`first`: the initial carry)."""
  iterates, nfes, resampled, last_iterates, uncertainty = outputs
  if run.with_srm:
    resampled = resampled[1:]
  else:  # Budget 0 is the input itself.

    def with_budget0(budget0, rest):
      return jnp.concatenate([budget0[None], rest], axis=0)

    iterates = with_budget0(first.z, iterates)
    nfes = with_budget0(first.nfe, nfes)
    if run.confident:
      last_iterates = with_budget0(first.z, last_iterates)
    if run.ipr_config.queries_uncertainty:  # The input's query, made before the scan.
      uncertainty = with_budget0(first.best, uncertainty)
  return IPRResult(
      z=last.z_best if run.confident else last.z,
      iterates=iterates,
      nfe=last.nfe,
      nfe_per_budget=nfes,
      stop_budget=last.stop_budget,
      resampled=resampled,
      initial_order=last.initial_order,
      last_iterates=last_iterates,
      uncertainty=uncertainty,
  )


def _refine(
    denoise_fn: DenoiseFn,
    z,
    masked,
    mask,
    candidates,
    noise,
    keys,
    *,
    srm_unknown: Optional[jax.Array],
    patch_size: int,
    sampler_config: SamplerConfig,
    ipr_config: IPRConfig,
    verify_fn: Optional[VerifyFn],
    cell_verify_fn: Optional[CellVerifyFn],
    dependency: Optional[np.ndarray] = None,
) -> IPRResult:
  """IPR, optionally preceded by the SRM pass, as one scan over iterations.

  With `srm_unknown` given, iteration 0 is the SRM pass that generates those
  patches of z (budget 0) and iterations 1..budget are IPR iterations; the
  two kinds share one compiled greedy loop (so the greedy loop's denoiser call
  is traced once), iteration 0 merely using the SRM schedule and patch set. The
  uncertainty query (`IPRConfig.queries_uncertainty`) traces the denoiser again,
  on its G x B batch (and once more for the input's query without the SRM pass).

  Each iteration (`_iteration`): a selection strategy (`SELECTORS`) picks the patches,
  `_renoise` re-noises them, the greedy loop regenerates them, then the query and the
  confident-iterate tracker (`_query_and_track`) and immediate_stop (`_immediate_stop`) run.
  Shapes: z, noise `[B, H, W, d]`, masked `[B, H, W, d]` and mask `[B, H, W, 1]` (or None),
  candidates and srm_unknown `[B, N]` bool, keys `[B]`.
  """
  _check_refine(z, noise, ipr_config, verify_fn, cell_verify_fn)
  run = _refinement(
      denoise_fn,
      masked,
      mask,
      candidates,
      noise,
      keys,
      srm_unknown,
      patch_size=patch_size,
      sampler_config=sampler_config,
      ipr_config=ipr_config,
      verify_fn=verify_fn,
      cell_verify_fn=cell_verify_fn,
      dependency=dependency,
  )
  first = _initial_carry(run, z.astype(jnp.float32))
  last, outputs = jax.lax.scan(
      lambda carry, j: _iteration(run, carry, j),
      first,
      jnp.arange(run.num_iterations, dtype=jnp.int32),
  )
  return _result(run, first, last, outputs)


def ipr_refine(
    denoise_fn: DenoiseFn,
    z: jax.Array,
    masked: Optional[jax.Array],
    mask: Optional[jax.Array],
    candidates: jax.Array,
    noise: jax.Array,
    keys: jax.Array,
    *,
    patch_size: int,
    sampler_config: SamplerConfig,
    ipr_config: IPRConfig,
    verify_fn: Optional[VerifyFn] = None,
    cell_verify_fn: Optional[CellVerifyFn] = None,
    dependency: Optional[np.ndarray] = None,
) -> IPRResult:
  """IPR iterations on a batch of given samples (spec §4.5).

  Each iteration, per puzzle: draw k = max(1, floor(ratio * |candidates|))
  patches uniformly among the candidates, replace them by fresh noise (or the
  initial noise, noise_type='fixed'), re-paste the given cells, and regenerate
  the k patches (every other patch is t = 0 context) with the greedy loop and
  the IPR schedule (ipr steps_per_patch, overlap; alpha, tau, clean_schedule,
  clamp_noise from `sampler_config`). `srm_ipr` runs the SRM pass first.

  Args:
    denoise_fn: as in `srm_sample` (static).
    z: `[B, H, W, d]` samples to refine (budget 0).
    masked: `[B, H, W, d]` given content (None: no mask).
    mask: `[B, H, W, 1]` 1 = free, 0 = given (None: everything free).
    candidates: `[B, N]` bool patches that may be re-noised.
    noise: `[B, H, W, d]` initial noise, used by noise_type='fixed'.
    keys: `[B]` typed per-puzzle keys.
    patch_size: P (static).
    sampler_config: SamplerConfig (static).
    ipr_config: IPRConfig (static).
    verify_fn: z -> [B] bool, only for immediate_stop (refused otherwise): a
      puzzle whose sample is accepted (already at budget 0) keeps it and spends
      no more passes (static).
    cell_verify_fn: z -> [B, N] bool patches that break the rules, only for
      selection='verifier' (refused otherwise; static).
    dependency: `[N, N]` the task's dependency matrix (graph_sequential only).

  Returns:
    IPRResult (initial_order all -1).
  """
  check_inputs(z, masked, mask, candidates, keys, patch_size)
  return _refine(
      denoise_fn,
      z,
      masked,
      mask,
      candidates,
      noise,
      keys,
      srm_unknown=None,
      patch_size=patch_size,
      sampler_config=sampler_config,
      ipr_config=ipr_config,
      verify_fn=verify_fn,
      cell_verify_fn=cell_verify_fn,
      dependency=dependency,
  )


def srm_ipr(
    denoise_fn: DenoiseFn,
    keys: jax.Array,
    *,
    image: Optional[jax.Array],
    mask: Optional[jax.Array] = None,
    noise: Optional[jax.Array] = None,
    patch_size: int,
    sampler_config: SamplerConfig,
    ipr_config: IPRConfig,
    verify_fn: Optional[VerifyFn] = None,
    cell_verify_fn: Optional[CellVerifyFn] = None,
    dependency: Optional[np.ndarray] = None,
) -> IPRResult:
  """Initial SRM pass (or correction-mode corruption) followed by IPR.

  standard mode (§4.2): masked = (1 - mask) image, z = masked + mask noise,
  the patches whose top-left mask pixel is > 0.5 are generated by SRM; IPR's
  candidates are those same patches (all patches without a mask).
  correction mode: `image` is a solved grid; K random cell swaps corrupt it,
  every cell becomes free (mask ones, masked zeros: no re-pasting), there is no
  SRM pass, and every patch is a candidate.

  The SRM pass and the IPR iterations share one compiled greedy loop (one
  scan over budgets 0..B), so the greedy loop's denoiser call is traced once;
  with the uncertainty query (`IPRConfig.queries_uncertainty`) the program
  holds a second trace of the denoiser, its call on a G x B batch. Usable under jit
  and pmap: denoise_fn, verify_fn, cell_verify_fn, patch_size and the configs are
  static, everything else is arrays. No scorer is given: the caller scores
  `IPRResult.iterates`.

  Args:
    denoise_fn: (z [B, H, W, d], t [B, H, W, 1]) -> DenoiserOutput.
    keys: `[B]` typed per-puzzle keys (see `puzzle_keys`).
    image: `[B, H, W, d]` given content (standard mode with a mask) or the
      solved grid (correction mode); may be None in standard mode without mask.
    mask: `[B, H, W, 1]` 1 = generate, 0 = given; None = generate everything.
      Ignored in correction mode.
    noise: `[B, H, W, d]` initial noise z_T; None draws it from the keys. Needs
      `image` or `noise` to know the shape.
    patch_size: P.
    sampler_config: SamplerConfig of the SRM pass (alpha, tau, clean_schedule
      and clamp_noise are also used by IPR).
    ipr_config: IPRConfig.
    verify_fn: z -> [B] bool, only for immediate_stop (checked after SRM too;
      refused otherwise).
    cell_verify_fn: z -> [B, N] bool rule-breaking patches, only for
      selection='verifier' (refused otherwise).
    dependency: `[N, N]` the task's dependency matrix (graph_sequential only, in the SRM pass or
      the regeneration).

  Returns:
    IPRResult (nfe counts the SRM pass too).
  """
  reference = image if image is not None else noise
  if reference is None:
    raise ValueError("srm_ipr needs image or noise to know the sample shape.")
  check_keys(keys, reference.shape[0])
  grid = patch_grid(reference.shape, patch_size)
  patches_shape = (reference.shape[0], grid[0] * grid[1])  # [B, N]
  if noise is None:
    noise = jax.vmap(lambda k: jax.random.normal(k, reference.shape[1:], jnp.float32))(
        fold_keys(keys, _NOISE_STREAM)
    )
  common = dict(
      patch_size=patch_size,
      sampler_config=sampler_config,
      ipr_config=ipr_config,
      verify_fn=verify_fn,
      cell_verify_fn=cell_verify_fn,
      dependency=dependency,
  )
  if ipr_config.mode == "correction":
    z = _corrupted(keys, image, patch_size, ipr_config.num_corruption_swaps)
    return _refine(
        denoise_fn,
        z,
        None,
        None,
        jnp.ones(patches_shape, bool),
        noise,
        keys,
        srm_unknown=None,
        **common,
    )
  chains = ipr_config.chains
  if chains > 1:
    keys = chains_lib.chain_keys(keys, chains)
    noise = chains_lib.chain_noise(noise, keys, chains)
    image, mask = chains_lib.tile(image, chains), chains_lib.tile(mask, chains)
    patches_shape = (patches_shape[0] * chains, patches_shape[1])
  z, masked, mask, unknown = _srm_start(image, mask, noise, patch_size, patches_shape)
  check_inputs(z, masked, mask, unknown, keys, patch_size)
  result = _refine(denoise_fn, z, masked, mask, unknown, noise, keys, srm_unknown=unknown, **common)
  if chains > 1:
    return chains_lib.chosen(result, ipr_config)
  return result


def _corrupted(keys, image, patch_size: int, num_swaps: int) -> jax.Array:
  """Correction mode's start: the solved grids `image` [B, H, W, d] corrupted by cell swaps."""
  if image is None:
    raise ValueError("correction mode needs the solved image, got image=None.")
  return jax.vmap(corrupt_by_swaps, in_axes=(0, 0, None, None))(
      fold_keys(keys, _CORRUPT_STREAM), image.astype(jnp.float32), patch_size, num_swaps
  )


def _srm_start(image, mask, noise, patch_size: int, patches_shape: tuple[int, int]):
  """Standard mode's start: (z [B, H, W, d] = masked + mask noise, masked, mask, unknown [B, N]);
  masked and mask are None without a mask (then all `patches_shape` [B, N] patches are unknown)."""
  if mask is None:
    return noise.astype(jnp.float32), None, None, jnp.ones(patches_shape, bool)
  if image is None:
    raise ValueError("a mask needs the image that holds the given cells.")
  mask = mask.astype(jnp.float32)
  masked = (1.0 - mask) * image.astype(jnp.float32)
  z = masked + mask * noise.astype(jnp.float32)
  return z, masked, mask, unknown_patches(mask, patch_size)
