"""The SRM greedy loop (spec §4.4), batched: `block_srm_sample`, and `greedy_loop`, which IPR
reuses.

The greedy state of a puzzle is: z, which patches are still waiting, the step
at which each patch was selected, the block counter and the next block start.
A patch is selected at its block's start: the adaptive schedule starts one
block per step (the reference's sequential_adaptive sampler), choosing its
patches by sigma; the precomputed schedules (fixed, random_sequential,
graph_sequential) start every block whose start is s at step s, several at once
where starts repeat, as the reference's scheduling matrix has them (a patch the
sequential planning left unplanned starts at step 0). The patch-level time row
fed to the denoiser at step s is then

  waiting (unknown, not yet selected)    1
  selected at step s0, s - s0 < L        prototype[s - s0]
  everything else (given, finished)      0
  any patch, at s >= max_steps           0

which is the reference's scheduling matrix S with its min / truncation rules
(checked against the reference's recorded rows in tests/test_sampler.py,
tests/test_sampler_family.py and tests/test_block_starts.py).
"""

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.noise import flows
from ipr_jax.noise import schedule as schedule_lib
from ipr_jax.sampling import planning
from ipr_jax.sampling.config import SamplerConfig
from ipr_jax.sampling.inputs import (
    PLAN_STREAM,
    Denoiser,
    Given,
    Puzzles,
    generated_patches,
    given_content,
    initial_noise,
)
from ipr_jax.sampling.patches import (
    check_keys,
    fold_keys,
    patch_grid,
    patch_mean,
    patches_to_pixels,
)


@flax.struct.dataclass
class GreedyResult:
  """Output of one greedy pass over a batch.

  Attributes:
    z: `[B, H, W, d]` float32 final samples.
    order: `[B, N]` int32 patch ids (row-major) in selection order (those selected at one
      step in index order), -1 after the last selection. A patch whose block starts at the
      schedule's final (all-zero) step is never selected: it goes from t = 1 to 0 in the last
      pass (the sequential schedules' block length 1).
    order_step: `[B, N]` int32 step at which `order[b, i]` was selected, -1
      padding.
    nfe: `[B]` int32 denoiser passes spent on each puzzle.
    t_rows: `[S, B, N]` float32 patch times fed to the denoiser at each step
      (only with record=True, else None); rows past a puzzle's schedule are 0.
    sigma_rows: `[S, B, N]` float32 patch-pooled sigma returned at each step
      (only with record=True, else None); rows after the batch's last step are 0.
  """

  z: jax.Array
  order: jax.Array
  order_step: jax.Array
  nfe: jax.Array
  t_rows: Optional[jax.Array] = None
  sigma_rows: Optional[jax.Array] = None


@flax.struct.dataclass
class _GreedyState:
  z: jax.Array  # [B, H, W, d] float32
  waiting: jax.Array  # [B, N] bool: unknown, not selected yet
  selected_at: jax.Array  # [B, N] int32 step of selection, -1 if none
  order: jax.Array  # [B, N] int32
  order_step: jax.Array  # [B, N] int32
  num_selected: jax.Array  # [B] int32
  block_counter: jax.Array  # [B] int32
  next_start: jax.Array  # [B] int32 step of the next selection (-1: none)
  nfe: jax.Array  # [B] int32


@flax.struct.dataclass
class PuzzleSchedule:
  """Each puzzle's schedule (rows of a `schedule.ScheduleTable` for its patch count).

  Attributes:
    max_steps: `[B]` int32 denoiser passes.
    block_len: `[B]` int32 prototype length.
    starts: `[B, N + 1]` int32 block starts, then -1.
    prototype: `[B, L_max]` float32 time prototype, 0 padding.
    per_block: `[B]` int32 patches selected by sigma at each block start (adaptive top_k; all
      for the fixed schedule).
    planned: `[B]` bool: the block's patch is `planned_order[block]`, not chosen by sigma.
    planned_order: `[B, N]` int32 planned patch per block (`planning.sequential_order`), -1
      where nothing is planned.
    patch_start: `[B, N]` int32 step at which each patch's block starts under a planned
      schedule (`starts` of its block; 0 for a patch the planning left unplanned); 0 for the
      others (unused).
  """

  max_steps: jax.Array
  block_len: jax.Array
  starts: jax.Array
  prototype: jax.Array
  per_block: jax.Array
  planned: jax.Array
  planned_order: jax.Array
  patch_start: jax.Array


def lookup_schedule(
    table: schedule_lib.ScheduleTable,
    n: jax.Array,
    proto_len: Optional[int] = None,
    planned_order: Optional[jax.Array] = None,
) -> PuzzleSchedule:
  """Each puzzle's schedule row for its n `[B]` (prototypes padded to proto_len); a planned table
  needs the `planned_order` `[B, N]` of its puzzles."""
  protos = table.prototypes
  if proto_len is not None and proto_len > protos.shape[1]:
    protos = np.pad(protos, ((0, 0), (0, proto_len - protos.shape[1])))
  batch, num_patches = n.shape[0], table.num_patches
  if planned_order is None:
    if table.planned:
      raise ValueError("a planned schedule needs the planned order of its patches.")
    planned_order = jnp.full((batch, num_patches), -1, jnp.int32)
  planned_order = planned_order.astype(jnp.int32)
  starts = jnp.asarray(table.block_starts)[n]
  # Block k's patch planned_order[k] starts at starts[k]; unplanned patches (-1 slots) at 0.
  planned = planned_order >= 0
  patch_start = (
      jnp.zeros((batch, num_patches), jnp.int32)
      .at[jnp.arange(batch)[:, None], jnp.where(planned, planned_order, num_patches)]
      .set(jnp.where(planned, starts[:, :num_patches], 0), mode="drop")
  )
  return PuzzleSchedule(
      max_steps=jnp.asarray(table.max_steps)[n],
      block_len=jnp.asarray(table.block_len)[n],
      starts=starts,
      prototype=jnp.asarray(protos)[n],
      per_block=jnp.full([batch], table.patches_per_block, jnp.int32),
      planned=jnp.full([batch], table.planned),
      planned_order=planned_order,
      patch_start=patch_start,
  )


def _time_rows(
    step, state: _GreedyState, sched: PuzzleSchedule, start_time: Optional[jax.Array] = None
) -> jax.Array:
  """Patch times `[B, N]` at `step` (see the module docstring).

  Waiting patches are at `start_time` `[B]` (None: 1, pure noise).
  """
  age = step - state.selected_at
  in_block = (state.selected_at >= 0) & (age < sched.block_len[:, None])
  index = jnp.clip(age, 0, sched.prototype.shape[1] - 1)
  t_selected = jnp.take_along_axis(sched.prototype, index, axis=1)
  t_waiting = 1.0 if start_time is None else start_time[:, None]
  t = jnp.where(state.waiting, t_waiting, jnp.where(in_block, t_selected, 0.0))
  return jnp.where((step < sched.max_steps)[:, None], t, 0.0).astype(jnp.float32)


def _select(
    step, live, state: _GreedyState, sched: PuzzleSchedule, sigma: jax.Array
) -> _GreedyState:
  """Block bookkeeping and the patch choice at `step`: at the next block start (one block per
  step), the `per_block` waiting patches of lowest sigma (ties to the lowest index); under a
  planned schedule, every waiting patch whose block starts at `step` (`patch_start`)."""
  num_patches = state.waiting.shape[1]
  predict = live & (state.next_start == step)
  block_counter = state.block_counter + predict.astype(jnp.int32)
  start = jnp.take_along_axis(
      sched.starts, jnp.minimum(block_counter, num_patches)[:, None], axis=1
  )[:, 0]
  next_start = jnp.where(predict, start, state.next_start)
  select = predict & jnp.any(state.waiting, axis=1)
  patch_ids = jnp.arange(num_patches)
  # A stable double argsort ranks equal sigmas by index: rank 0 is argmin's first minimum.
  rank = jnp.argsort(
      jnp.argsort(jnp.where(state.waiting, sigma, jnp.inf), axis=1, stable=True),
      axis=1,
      stable=True,
  )
  by_sigma = state.waiting & (rank < sched.per_block[:, None]) & select[:, None]
  by_start = state.waiting & (sched.patch_start == step) & live[:, None]
  selected = jnp.where(sched.planned[:, None], by_start, by_sigma)
  # Record the selected patches in index order at the next free slots of `order`.
  slot_of = state.num_selected[:, None] + jnp.cumsum(selected, axis=1) - 1
  # [B, patch, slot]: patch i of puzzle b goes to slot s.
  hits = selected[:, :, None] & (slot_of[:, :, None] == patch_ids[None, None, :])
  filled = jnp.any(hits, axis=1)
  return state.replace(
      waiting=state.waiting & ~selected,
      selected_at=jnp.where(selected, step, state.selected_at),
      order=jnp.where(filled, jnp.argmax(hits, axis=1).astype(jnp.int32), state.order),
      order_step=jnp.where(filled, step, state.order_step),
      num_selected=state.num_selected + jnp.sum(selected, axis=1, dtype=jnp.int32),
      block_counter=block_counter,
      next_start=next_start,
  )


def _initial_greedy_state(z: jax.Array, waiting: jax.Array) -> _GreedyState:
  """The greedy state before step 0: z `[B, H, W, d]`, `waiting` `[B, N]`, nothing selected."""
  batch, num_patches = waiting.shape
  minus_one = jnp.full((batch, num_patches), -1, jnp.int32)
  zeros = jnp.zeros([batch], jnp.int32)
  return _GreedyState(
      z=z,
      waiting=waiting,
      selected_at=minus_one,
      order=minus_one,
      order_step=minus_one,
      num_selected=zeros,
      block_counter=zeros,
      next_start=zeros,
      nfe=zeros,
  )


def _reverse_step(
    out,
    z,
    t_now_pix,
    t_next_pix,
    keys,
    *,
    stochasticity: float,
    temperature: float,
    clamp_noise: bool,
    noise_flow: flows.Flow = flows.RECTIFIED,
) -> jax.Array:
  """One step of the reverse kernel p(z_next | z) from the denoiser's output `out`.

  Args:
    out: DenoiserOutput of z (u: the model output in the flow's parameterisation, v
      `[B, H, W, d]`).
    z: `[B, H, W, d]` float32 current state.
    t_now_pix, t_next_pix: `[B, H, W, 1]` pixel times of this step and the next, already the
      flow's (`Flow.adjust_time`).
    keys: `[B]` typed keys of this step's noise.
    stochasticity, temperature, clamp_noise: as in `SamplerConfig`.
    noise_flow: the flow of `SamplerConfig.flow`.

  Returns:
    `[B, H, W, d]` float32: the kernel's mean, sampled where noise is added (clamp_noise: wherever
    t_next > 0, as the reference; else only where the unclamped sigma is positive).
  """
  kernel = noise_flow.reverse_kernel(
      out.u.astype(jnp.float32),
      z,
      t_now_pix,
      t_next_pix,
      out.v.astype(jnp.float32),
      stochasticity,
      temperature,
  )
  z_next = kernel.mean
  if clamp_noise or stochasticity > 0.0:
    eps = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys)
    if clamp_noise:  # The reference: sample wherever t_next > 0.
      noisy = t_next_pix > 0
    else:  # Only where the unclamped sigma is positive.
      noisy = (t_next_pix > 0) & (t_next_pix < t_now_pix)
    z_next = jnp.where(noisy, kernel.reparameterize(eps), z_next)
  return z_next


def greedy_loop(
    denoiser: Denoiser,
    z: jax.Array,
    given: Given,
    waiting: jax.Array,
    keys: jax.Array,
    sched: PuzzleSchedule,
    kernel: SamplerConfig,
    *,
    record_steps: int = 0,
    step_limit: Optional[int] = None,
    start_time: Optional[jax.Array] = None,
) -> GreedyResult:
  """The greedy loop on a batch: generates the `waiting` `[B, N]` patches of z `[B, H, W, C]`
  (given cells re-pasted after every step, `given`), puzzle b on its schedule row of `sched`, with
  the keys `[B]` of its steps' noise and the reverse kernel of `kernel` (its stochasticity,
  temperature, clamp_noise and flow; SRM's and IPR's regeneration alike). The denoiser and the
  kernel see the flow's times (`Flow.adjust_time` of the schedule's; the same times but for the
  discrete diffusion's grid).

  A `lax.while_loop` over steps that runs until the longest schedule of the
  batch has ended; a puzzle past its own schedule keeps its state and spends
  no passes. With record_steps > 0 the time and sigma rows of the first
  record_steps steps are kept; with step_limit the loop stops after that many
  steps. Waiting patches start at `start_time` `[B]` (None: t = 1); the
  schedule's prototypes must then start there too.
  """
  patch_size = denoiser.patch_size
  stochasticity, temperature = kernel.stochasticity, kernel.temperature
  clamp_noise, noise_flow = kernel.clamp_noise, kernel.noise_flow
  batch, num_patches = waiting.shape
  grid = patch_grid(z.shape, patch_size)
  state = _initial_greedy_state(z.astype(jnp.float32), waiting)
  rows = jnp.zeros((2, record_steps, batch, num_patches), jnp.float32)
  num_steps = jnp.max(sched.max_steps)
  if step_limit is not None:
    num_steps = jnp.minimum(num_steps, step_limit)

  def step_fn(carry):
    step, state, rows = carry
    live = step < sched.max_steps
    t_now = _time_rows(step, state, sched, start_time)
    t_now_pix = noise_flow.adjust_time(patches_to_pixels(t_now, grid, patch_size))
    out = denoiser.denoise_fn(state.z, t_now_pix)
    sigma = patch_mean(out.sigma.astype(jnp.float32), patch_size)
    new = _select(step, live, state, sched, sigma)
    t_next = _time_rows(step + 1, new, sched, start_time)
    t_next_pix = noise_flow.adjust_time(patches_to_pixels(t_next, grid, patch_size))
    z_next = _reverse_step(
        out,
        state.z,
        t_now_pix,
        t_next_pix,
        fold_keys(keys, step),
        stochasticity=stochasticity,
        temperature=temperature,
        clamp_noise=clamp_noise,
        noise_flow=noise_flow,
    )
    z_next = given.paste(z_next)
    new = new.replace(
        z=jnp.where(live[:, None, None, None], z_next, state.z),
        nfe=state.nfe + live.astype(jnp.int32),
    )
    if record_steps:
      rows = rows.at[:, step].set(jnp.stack([t_now, sigma]), mode="drop")
    return step + 1, new, rows

  _, state, rows = jax.lax.while_loop(
      lambda carry: carry[0] < num_steps, step_fn, (jnp.int32(0), state, rows)
  )
  return GreedyResult(
      z=state.z,
      order=state.order,
      order_step=state.order_step,
      nfe=state.nfe,
      t_rows=rows[0] if record_steps else None,
      sigma_rows=rows[1] if record_steps else None,
  )


def srm_table(num_patches: int, config: SamplerConfig) -> schedule_lib.ScheduleTable:
  """The SRM pass's schedule table under `config` (schedule, top_k, max_steps); for a time-map
  schedule, which has no blocks, the adaptive schedule's (its passes set the adaptive time maps'
  steps, `time_map_sampler.derived_max_steps`)."""
  time_map = config.schedule in schedule_lib.TIME_MAP_SCHEDULES
  return schedule_lib.schedule_table(
      num_patches,
      config.steps_per_patch,
      config.overlap,
      config.clean_schedule,
      kind="adaptive" if time_map else config.schedule,
      top_k=config.top_k,
      total_steps=config.max_steps,
  )


def check_sampler_schedule(config: SamplerConfig, counts, name: str = "sampler") -> None:
  """Refuses a SamplerConfig whose schedule is degenerate for a patch count in `counts`
  (`schedule.check_block_starts`: the adaptive schedule with repeated block starts, a schedule
  without passes), with a ValueError naming the fields that set it: `srm_sample`'s check, the
  same call as the SRM pass's check of the evaluation (`check_schedules`)."""
  schedule_lib.check_block_starts(
      counts,
      config.steps_per_patch,
      config.overlap,
      config.clean_schedule,
      name=name,
      kind=config.schedule,
      top_k=config.top_k,
      total_steps=config.max_steps,
  )


def _patch_counts(unknown) -> list[int]:
  """The patch counts of `unknown` `[B, N]`: its rows' sums, or every count 0..N under a trace."""
  if isinstance(unknown, jax.core.Tracer):
    return list(range(unknown.shape[1] + 1))
  return [int(c) for c in np.unique(np.sum(np.asarray(unknown), axis=1))]


def planned_order(
    table: schedule_lib.ScheduleTable,
    config,
    unknown: jax.Array,
    keys: jax.Array,
    dependency: Optional[np.ndarray],
    overlap: float,
) -> Optional[jax.Array]:
  """The planned patch order `[B, N]` of `unknown` `[B, N]` for a planned `table` (else None).

  config: the SamplerConfig or IPRConfig whose schedule, max_order and certainty_decay apply;
  keys: `[B]` keys of the random tie breaks; dependency: the task's `[N, N]` dependency matrix
  (needed by graph_sequential).
  """
  if not table.planned:
    return None
  weights = None
  if config.schedule == "graph_sequential":
    if dependency is None:
      raise ValueError(
          "schedule='graph_sequential' needs the task's dependency graph "
          "(`dependency`); this task has none: use random_sequential."
      )
    weights = planning.weighted_adjacency(dependency, config.max_order, config.certainty_decay)
  # The reference plans at most its max_steps blocks (the table's blocks of each n).
  max_blocks = jnp.asarray(table.num_blocks)[jnp.sum(unknown, axis=1)]
  return planning.sequential_order(
      unknown, weights, overlap, planning.tie_priorities(keys, unknown.shape[1]), max_blocks
  )


def block_srm_sample(
    denoiser: Denoiser,
    puzzles: Puzzles,
    config: SamplerConfig,
    *,
    unknown: Optional[jax.Array] = None,
    record: bool = False,
    step_limit: Optional[int] = None,
) -> GreedyResult:
  """SRM sampling of a batch (spec §4.4 and the SRM reference's sampler family), one compiled
  loop over steps.

  The start is `srm_ipr`'s (spec §4.2): z = masked + mask noise with masked = (1 - mask) image
  (z = noise without a mask). Per puzzle b with n_b = sum(unknown[b]) patches to generate, the
  schedule of schedule.py (config.schedule, steps_per_patch, overlap, top_k, max_steps) runs for
  its steps; at each block start the adaptive schedule selects the top_k waiting patches with the
  lowest patch-pooled sigma (ties to the lowest index), the fixed one every unknown patch at
  once, the sequential ones the patch `planning.sequential_order` planned for the block (blocks
  with the same start together); a selected patch follows the time prototype. Given cells are
  re-pasted after every step (z = masked + mask z).

  The settings are checked first as the evaluation checks them (`check_sampler_schedule`), for
  the patch counts of `unknown` (under a trace, where they are unknown: every count 0..N).

  Args:
    denoiser: the denoise function (called once per step on the whole batch), the patch size P
      and, for graph_sequential, the dependency matrix (static under jit).
    puzzles: keys `[B]`, image `[B, H, W, C]` and mask `[B, H, W, 1]` (1 = generate; None:
      everything), noise `[B, H, W, C]` (None: drawn from the keys, as `srm_ipr` draws it).
    config: SamplerConfig (static).
    unknown: `[B, N]` bool patches to generate; None: those of the mask (`unknown_patches`),
      every patch without a mask.
    record: also return the time and sigma rows of every step.
    step_limit: stop after this many steps (a partial run, e.g. to inspect an
      intermediate state); default: run every schedule to its end.

  Returns:
    GreedyResult.

  The block schedules only (`srm.srm_sample` runs a time-map schedule by
  `time_map_sampler.srm_time_map_sample`, from the same start).

  Raises:
    ValueError: bad shapes, a degenerate schedule (naming its fields), or a time-map schedule.
  """
  if config.schedule in schedule_lib.TIME_MAP_SCHEDULES:
    raise ValueError(
        f"schedule={config.schedule!r} is a time-map schedule: use sampling.srm_sample"
    )
  patch_size = denoiser.patch_size
  check_keys(puzzles.keys, puzzles.shape[0])
  z, given, generated = srm_start(puzzles, patch_size)
  if unknown is None:
    unknown = generated
  check_inputs(z, given, unknown, puzzles.keys, patch_size)
  check_sampler_schedule(config, _patch_counts(unknown))
  table = srm_table(unknown.shape[1], config)
  order = planned_order(
      table,
      config,
      unknown,
      fold_keys(puzzles.keys, PLAN_STREAM),
      denoiser.dependency,
      config.overlap,
  )
  sched = lookup_schedule(table, jnp.sum(unknown, axis=1), planned_order=order)
  return greedy_loop(
      denoiser,
      z,
      given,
      unknown,
      puzzles.keys,
      sched,
      config,
      record_steps=table.steps_bound() if record else 0,
      step_limit=step_limit,
  )


def srm_start(puzzles: Puzzles, patch_size: int) -> tuple[jax.Array, Given, jax.Array]:
  """The SRM pass's start (spec §4.2), of `srm_sample` and `srm_ipr` alike: (z `[B, H, W, C]`
  float32 = masked + mask noise with masked = (1 - mask) image (the noise without a mask), the
  given content, the patches to generate `[B, N]` bool (`generated_patches`))."""
  given = given_content(puzzles)
  z = given.paste(initial_noise(puzzles).astype(jnp.float32))
  return z, given, generated_patches(puzzles, patch_size)


def check_inputs(z, given: Given, unknown, keys, patch_size: int) -> None:
  """Refuses inputs whose shapes disagree: z `[B, H, W, C]`, the given content (masked
  `[B, H, W, C]`, mask `[B, H, W, 1]`, or neither), the patch vector `[B, N]`, keys `[B]`."""
  masked, mask = given.masked, given.mask
  if z.ndim != 4:
    raise ValueError(f"z must be [B, H, W, d], got shape {z.shape}.")
  gh, gw = patch_grid(z.shape, patch_size)
  if (mask is None) != (masked is None):
    raise ValueError("mask and masked must be given together.")
  if mask is not None and mask.shape != z.shape[:3] + (1,):
    raise ValueError(f"mask must have shape {z.shape[:3] + (1,)}, got {mask.shape}.")
  if masked is not None and masked.shape != z.shape:
    raise ValueError(f"masked must have shape {z.shape}, got {masked.shape}.")
  if unknown.shape != (z.shape[0], gh * gw):
    raise ValueError(
        f"the patch vector must have shape {(z.shape[0], gh * gw)} "
        f"for a {gh}x{gw} patch grid, got {unknown.shape}."
    )
  check_keys(keys, z.shape[0])
