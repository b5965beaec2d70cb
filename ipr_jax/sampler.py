"""SRM greedy sampler and Iterative Partial Refinement (IPR), batched (spec §4).

The reference samples one puzzle at a time in Python loops. Here a whole batch
of puzzles, each with its own unknown patches and schedule length, runs in one
jit-compilable program:

* `srm_sample`: the SRM greedy loop (§4.4) as one `lax.while_loop` over steps
  that runs until the longest schedule of the batch has ended. The denoiser is
  called once per step on the whole batch; the per-puzzle bookkeeping is
  written batched over puzzles. A puzzle whose schedule has ended keeps its
  state and stops counting denoiser passes.
* `srm_ipr`: the initial SRM pass (or the correction-mode corruption, §4.2)
  followed by IPR (§4.5), as one `lax.scan` over budgets. Each IPR iteration
  re-noises a random subset of patches and regenerates them with the same
  greedy loop; the SRM pass is iteration 0 of that scan, so the denoiser is
  compiled once. An optional `score_fn` is evaluated after every budget inside
  the scan, so one run yields the whole quality-vs-budget curve. Usable under
  `jax.jit` and `jax.pmap` with `denoise_fn`, `score_fn`, `verify_fn`, the
  patch size and the configs static. `ipr_refine` runs IPR alone on given
  samples.

The greedy state of a puzzle is: z, which patches are still waiting, the step
at which each patch was selected, the block counter and the next block start.
The patch-level time row fed to the denoiser at step s is then

  waiting (unknown, not yet selected)    1
  selected at step s0, s - s0 < L        prototype[s - s0]
  everything else (given, finished)      0
  any patch, at s >= max_steps           0

which is the reference's scheduling matrix S with its min / truncation rules
(checked against the reference's recorded rows in tests/test_sampler.py).

Randomness is per puzzle: every random draw of puzzle b derives from `keys[b]`
only (via `fold_in` of the step / iteration), so a puzzle gives the same result
in any batch. Use `puzzle_keys(key, puzzle_ids)` to make the keys.

Deviations from the reference (documented choices):
* The reference adds "clamp noise" (std e^-15 ~ 3.06e-7, the floor of its
  Gaussian) wherever t_next > 0, even where the kernel's sigma is 0. This is
  reproduced by default (`SamplerConfig.clamp_noise=True`); with
  `clamp_noise=False` noise is added only where the unclamped sigma is positive
  (0 < t_next < t and stochasticity > 0), which makes stochasticity 0 fully
  deterministic.
* n = 0 unknown patches gives an empty schedule (0 passes; see schedule.py).
* Random patch subsets, re-noising and corruption swaps use JAX PRNG keys, not
  the reference's Python / torch generators (which reseed to 42 + i anyway).
* Only top_k = 1 is implemented (the only value the reference configs use).
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax import flow
from ipr_jax import schedule as schedule_lib

# (z [B, H, W, d], t [B, H, W, 1]) -> DenoiserOutput (ipr_jax.models.denoiser),
# of which the sampler reads u [B, H, W, d], v [B, H, W, d], sigma [B, H, W, 1].
DenoiseFn = Callable[[jax.Array, jax.Array], Any]
# z [B, H, W, d] -> {name: [B]} per-sample scores.
ScoreFn = Callable[[jax.Array], Mapping[str, jax.Array]]
# z [B, H, W, d] -> [B] bool, True where the sample is accepted.
VerifyFn = Callable[[jax.Array], jax.Array]

NOISE_TYPES = ("random", "fixed")
MODES = ("standard", "correction")

# Tags for fold_in, so the streams of one puzzle key never collide.
_IPR_STREAM, _CORRUPT_STREAM, _NOISE_STREAM = 1, 2, 3


def _coerce(config, **types) -> None:
  """Casts config fields (e.g. ml_collections floats) so configs hash equal."""
  for name, kind in types.items():
    value = getattr(config, name)
    cast = kind(value)
    if kind is int and cast != value:
      raise ValueError(f"{name} must be an integer, got {value!r}.")
    object.__setattr__(config, name, cast)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Options of the SRM greedy sampler (defaults: the reference's MS-hard values).

  Attributes:
    steps_per_patch: steps each patch takes from t = 1 to t = 0.
    overlap: fraction of a patch's steps shared with the next patch, [0, 1).
    stochasticity: alpha of the reverse kernel, [0, 1].
    temperature: tau, scales the reverse kernel's standard deviation, > 0.
    top_k: patches selected per block; only 1 is implemented.
    clean_schedule: exact schedule arithmetic instead of the reference's
      float32 (see schedule.py); a deliberate deviation when True.
    clamp_noise: add the reference's ~3e-7 clamp noise wherever t_next > 0.
  """
  steps_per_patch: int = 3
  overlap: float = 0.0
  stochasticity: float = 0.5
  temperature: float = 1.0
  top_k: int = 1
  clean_schedule: bool = False
  clamp_noise: bool = True

  def __post_init__(self):
    _coerce(self, steps_per_patch=int, overlap=float, stochasticity=float,
            temperature=float, top_k=int)
    if self.top_k != 1:
      raise ValueError(
          f"top_k={self.top_k!r} is not implemented; only top_k=1 is supported.")
    if self.steps_per_patch < 1:
      raise ValueError(
          f"steps_per_patch must be a positive integer, got {self.steps_per_patch!r}.")
    if not 0.0 <= self.overlap < 1.0:
      raise ValueError(f"overlap must lie in [0, 1), got {self.overlap!r}.")
    if not 0.0 <= self.stochasticity <= 1.0:
      raise ValueError(
          f"stochasticity must lie in [0, 1], got {self.stochasticity!r}.")
    if not self.temperature > 0.0:
      raise ValueError(f"temperature must be positive, got {self.temperature!r}.")


@dataclasses.dataclass(frozen=True)
class IPRConfig:
  """Options of IPR (defaults: the reference's ms_hard_test values).

  The field names match `config.ipr` of the project configs.

  Attributes:
    budget: number of IPR iterations B (budgets 0..B are scored).
    steps_per_patch: steps per patch of the regeneration schedule.
    overlap: overlap of the regeneration schedule, [0, 1).
    resampling_ratio: fraction of candidate patches re-noised per iteration,
      (0, 1]; k = max(1, floor(ratio * number of candidates)).
    noise_type: 'random' (fresh noise) or 'fixed' (the initial noise).
    mode: 'standard' (SRM first) or 'correction' (corrupt a solved grid with
      random cell swaps; every cell becomes free; no SRM pass).
    num_corruption_swaps: K swaps in correction mode.
    immediate_stop: freeze a puzzle once `verify_fn` accepts it.
  """
  budget: int = 30
  steps_per_patch: int = 10
  overlap: float = 0.8
  resampling_ratio: float = 0.25
  noise_type: str = "random"
  mode: str = "standard"
  num_corruption_swaps: int = 5
  immediate_stop: bool = False

  def __post_init__(self):
    _coerce(self, budget=int, steps_per_patch=int, overlap=float,
            resampling_ratio=float, num_corruption_swaps=int)
    if self.budget < 0:
      raise ValueError(f"budget must be a non-negative integer, got {self.budget!r}.")
    if self.steps_per_patch < 1:
      raise ValueError(
          f"steps_per_patch must be a positive integer, got {self.steps_per_patch!r}.")
    if not 0.0 <= self.overlap < 1.0:
      raise ValueError(f"overlap must lie in [0, 1), got {self.overlap!r}.")
    _check_ratio(self.resampling_ratio)
    if self.noise_type not in NOISE_TYPES:
      raise ValueError(
          f"noise_type must be one of {NOISE_TYPES}, got {self.noise_type!r}.")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
    if self.num_corruption_swaps < 0:
      raise ValueError("num_corruption_swaps must be a non-negative integer, "
                       f"got {self.num_corruption_swaps!r}.")


@flax.struct.dataclass
class GreedyResult:
  """Output of one greedy pass over a batch.

  Attributes:
    z: `[B, H, W, d]` float32 final samples.
    order: `[B, N]` int32 patch ids (row-major) in selection order, -1 after
      the last selection.
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
class IPRResult:
  """Output of IPR (and of `srm_ipr`).

  Attributes:
    z: `[B, H, W, d]` float32 last iterate (no best-of selection, as the reference).
    scores: `{name: [budget + 1, B]}` score_fn of the sample after budgets
      0..budget (empty without score_fn).
    nfe: `[B]` int32 total denoiser passes (initial SRM + IPR).
    nfe_per_budget: `[budget + 1, B]` int32 cumulative passes after each budget.
    stop_budget: `[B]` int32 budget at which immediate_stop froze the puzzle,
      -1 if never.
    resampled: `[budget, B, N]` bool patches re-noised at each iteration.
    initial_order: `[B, N]` int32 selection order of the SRM pass (-1 padding;
      all -1 in correction mode).
    snapshots: `[budget + 1, num_snapshots, H, W, d]` float32 samples of the
      first puzzles after each budget, or None.
  """
  z: jax.Array
  scores: dict
  nfe: jax.Array
  nfe_per_budget: jax.Array
  stop_budget: jax.Array
  resampled: jax.Array
  initial_order: jax.Array
  snapshots: Optional[jax.Array] = None


# ----------------------------------------------------------------------------
# Patch geometry.


def patch_grid(image_shape, patch_size: int) -> tuple[int, int]:
  """(gh, gw) of an image `[B, H, W, C]` (or `[H, W, C]`) cut in P x P patches."""
  h, w = image_shape[-3], image_shape[-2]
  if int(patch_size) != patch_size or patch_size < 1:
    raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
  if h % patch_size or w % patch_size:
    raise ValueError(
        f"patch_size={patch_size} does not divide the image size {h}x{w}.")
  return h // patch_size, w // patch_size


def patches_to_pixels(values: jax.Array, grid: tuple[int, int],
                      patch_size: int) -> jax.Array:
  """Repeats per-patch values over their pixels: `[B, N]` -> `[B, H, W, 1]`."""
  b = values.shape[0]
  gh, gw = grid
  x = values.reshape(b, gh, 1, gw, 1)
  x = jnp.broadcast_to(x, (b, gh, patch_size, gw, patch_size))
  return x.reshape(b, gh * patch_size, gw * patch_size, 1)


def patch_mean(x: jax.Array, patch_size: int) -> jax.Array:
  """Mean over each patch and channel (the reference's avg_pool).

  Args:
    x: `[B, H, W, C]`.
    patch_size: P.

  Returns:
    `[B, N]`, row-major over the patch grid.
  """
  b, h, w, c = x.shape
  gh, gw = h // patch_size, w // patch_size
  x = x.reshape(b, gh, patch_size, gw, patch_size, c)
  return x.mean(axis=(2, 4, 5)).reshape(b, gh * gw)


def unknown_patches(mask: jax.Array, patch_size: int) -> jax.Array:
  """Patches to generate: mask at each patch's top-left pixel > 0.5.

  Args:
    mask: `[B, H, W, 1]` pixel mask, 1 = generate, 0 = given.
    patch_size: P.

  Returns:
    `[B, N]` bool, row-major over the patch grid.
  """
  patch_grid(mask.shape, patch_size)
  top_left = mask[:, ::patch_size, ::patch_size, 0]
  return (top_left > 0.5).reshape(mask.shape[0], -1)


def patch_pixel_mask(patches: jax.Array, grid: tuple[int, int],
                     patch_size: int) -> jax.Array:
  """`[B, N]` bool patch selection -> `[B, H, W, 1]` bool pixel mask."""
  return patches_to_pixels(patches, grid, patch_size)


def puzzle_keys(key: jax.Array, puzzle_ids: jax.Array) -> jax.Array:
  """Per-puzzle keys `[B]`: fold_in(key, puzzle_id), independent of batch layout."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, puzzle_ids)


def _check_keys(keys: jax.Array, batch: int) -> None:
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    raise ValueError(
        "keys must be a typed key array (jax.random.key), one per puzzle; got "
        f"dtype {keys.dtype}.")
  if keys.shape != (batch,):
    raise ValueError(f"keys must have shape ({batch},), got {keys.shape}.")


def _fold(keys: jax.Array, data) -> jax.Array:
  """fold_in of the same data into every per-puzzle key."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


# ----------------------------------------------------------------------------
# The greedy loop.


@flax.struct.dataclass
class _GreedyState:
  z: jax.Array             # [B, H, W, d] float32
  waiting: jax.Array       # [B, N] bool: unknown, not selected yet
  selected_at: jax.Array   # [B, N] int32 step of selection, -1 if none
  order: jax.Array         # [B, N] int32
  order_step: jax.Array    # [B, N] int32
  num_selected: jax.Array  # [B] int32
  block_counter: jax.Array  # [B] int32
  next_start: jax.Array    # [B] int32 step of the next selection (-1: none)
  nfe: jax.Array           # [B] int32


@flax.struct.dataclass
class _PuzzleSchedule:
  max_steps: jax.Array     # [B] int32
  block_len: jax.Array     # [B] int32
  starts: jax.Array        # [B, N + 1] int32
  prototype: jax.Array     # [B, L_max] float32


def _lookup_schedule(table: schedule_lib.ScheduleTable, n: jax.Array,
                     proto_len: Optional[int] = None) -> _PuzzleSchedule:
  """Each puzzle's schedule row for its n `[B]` (prototypes padded to proto_len)."""
  protos = table.prototypes
  if proto_len is not None and proto_len > protos.shape[1]:
    protos = np.pad(protos, ((0, 0), (0, proto_len - protos.shape[1])))
  return _PuzzleSchedule(
      max_steps=jnp.asarray(table.max_steps)[n],
      block_len=jnp.asarray(table.block_len)[n],
      starts=jnp.asarray(table.block_starts)[n],
      prototype=jnp.asarray(protos)[n])


def _time_rows(step, state: _GreedyState, sched: _PuzzleSchedule) -> jax.Array:
  """Patch times `[B, N]` at `step` (see the module docstring)."""
  age = step - state.selected_at
  in_block = (state.selected_at >= 0) & (age < sched.block_len[:, None])
  index = jnp.clip(age, 0, sched.prototype.shape[1] - 1)
  t_selected = jnp.take_along_axis(sched.prototype, index, axis=1)
  t = jnp.where(state.waiting, 1.0, jnp.where(in_block, t_selected, 0.0))
  return jnp.where((step < sched.max_steps)[:, None], t, 0.0).astype(jnp.float32)


def _select(step, live, state: _GreedyState, sched: _PuzzleSchedule,
            sigma: jax.Array) -> _GreedyState:
  """Block bookkeeping and greedy patch choice at `step` (lowest sigma first)."""
  num_patches = state.waiting.shape[1]
  predict = live & (state.next_start == step)
  block_counter = state.block_counter + predict.astype(jnp.int32)
  start = jnp.take_along_axis(
      sched.starts, jnp.minimum(block_counter, num_patches)[:, None], axis=1)[:, 0]
  next_start = jnp.where(predict, start, state.next_start)
  select = predict & jnp.any(state.waiting, axis=1)
  # Ties go to the lowest index (argmin returns the first minimum).
  choice = jnp.argmin(jnp.where(state.waiting, sigma, jnp.inf), axis=1)
  patch_ids = jnp.arange(num_patches)
  chosen = (patch_ids[None, :] == choice[:, None]) & select[:, None]
  slot = (patch_ids[None, :] == state.num_selected[:, None]) & select[:, None]
  return state.replace(
      waiting=state.waiting & ~chosen,
      selected_at=jnp.where(chosen, step, state.selected_at),
      order=jnp.where(slot, choice[:, None].astype(jnp.int32), state.order),
      order_step=jnp.where(slot, step, state.order_step),
      num_selected=state.num_selected + select.astype(jnp.int32),
      block_counter=block_counter,
      next_start=next_start)


def _greedy(denoise_fn: DenoiseFn, z, masked, mask, waiting, keys,
            sched: _PuzzleSchedule, *, patch_size: int, stochasticity: float,
            temperature: float, clamp_noise: bool, record_steps: int = 0,
            step_limit: Optional[int] = None) -> GreedyResult:
  """The greedy loop on a batch; `waiting` [B, N] are the patches to generate.

  A `lax.while_loop` over steps that runs until the longest schedule of the
  batch has ended; a puzzle past its own schedule keeps its state and spends
  no passes. With record_steps > 0 the time and sigma rows of the first
  record_steps steps are kept; with step_limit the loop stops after that many
  steps.
  """
  batch, num_patches = waiting.shape
  grid = patch_grid(z.shape, patch_size)
  z = z.astype(jnp.float32)
  draws_noise = clamp_noise or stochasticity > 0.0
  minus_one = jnp.full((batch, num_patches), -1, jnp.int32)
  state = _GreedyState(
      z=z, waiting=waiting, selected_at=minus_one, order=minus_one,
      order_step=minus_one, num_selected=jnp.zeros([batch], jnp.int32),
      block_counter=jnp.zeros([batch], jnp.int32),
      next_start=jnp.zeros([batch], jnp.int32),
      nfe=jnp.zeros([batch], jnp.int32))
  rows = jnp.zeros((2, record_steps, batch, num_patches), jnp.float32)
  num_steps = jnp.max(sched.max_steps)
  if step_limit is not None:
    num_steps = jnp.minimum(num_steps, step_limit)

  def step_fn(carry):
    step, state, rows = carry
    live = step < sched.max_steps
    t_now = _time_rows(step, state, sched)
    t_now_pix = patches_to_pixels(t_now, grid, patch_size)
    out = denoise_fn(state.z, t_now_pix)
    sigma = patch_mean(out.sigma.astype(jnp.float32), patch_size)
    new = _select(step, live, state, sched, sigma)
    t_next_pix = patches_to_pixels(_time_rows(step + 1, new, sched), grid,
                                   patch_size)
    kernel = flow.reverse_kernel(
        out.u.astype(jnp.float32), state.z, t_now_pix, t_next_pix,
        out.v.astype(jnp.float32), stochasticity, temperature)
    z_next = kernel.mean
    if draws_noise:
      eps = jax.vmap(lambda k: jax.random.normal(
          jax.random.fold_in(k, step), z.shape[1:], jnp.float32))(keys)
      if clamp_noise:  # The reference: sample wherever t_next > 0.
        noisy = t_next_pix > 0
      else:  # Only where the unclamped sigma is positive.
        noisy = (t_next_pix > 0) & (t_next_pix < t_now_pix)
      z_next = jnp.where(noisy, kernel.reparameterize(eps), z_next)
    if mask is not None:
      z_next = masked + mask * z_next
    new = new.replace(
        z=jnp.where(live[:, None, None, None], z_next, state.z),
        nfe=state.nfe + live.astype(jnp.int32))
    if record_steps:
      rows = rows.at[:, step].set(jnp.stack([t_now, sigma]), mode="drop")
    return step + 1, new, rows

  _, state, rows = jax.lax.while_loop(
      lambda carry: carry[0] < num_steps, step_fn, (jnp.int32(0), state, rows))
  return GreedyResult(
      z=state.z, order=state.order, order_step=state.order_step, nfe=state.nfe,
      t_rows=rows[0] if record_steps else None,
      sigma_rows=rows[1] if record_steps else None)


def srm_sample(denoise_fn: DenoiseFn, z: jax.Array, masked: Optional[jax.Array],
               mask: Optional[jax.Array], unknown: jax.Array, keys: jax.Array, *,
               patch_size: int, config: SamplerConfig, record: bool = False,
               step_limit: Optional[int] = None) -> GreedyResult:
  """SRM greedy sampling of a batch (spec §4.4), one compiled scan over steps.

  Per puzzle b with n_b = sum(unknown[b]) patches to generate, the schedule of
  schedule.py (steps_per_patch, overlap) runs for max_steps(n_b) steps; at each
  block start the waiting patch with the lowest patch-pooled sigma is selected
  (ties to the lowest index) and follows the time prototype. Given cells are
  re-pasted after every step (z = masked + mask z).

  Args:
    denoise_fn: (z [B, H, W, d], t [B, H, W, 1]) -> DenoiserOutput with u, v,
      sigma; called once per step on the whole batch. Static under jit.
    z: `[B, H, W, d]` initial state (given cells already pasted, unknown cells noise).
    masked: `[B, H, W, d]` given content, 0 on unknown cells (None: no mask).
    mask: `[B, H, W, 1]` 1 = generate, 0 = given (None: everything generated).
    unknown: `[B, N]` bool patches to generate (see `unknown_patches`).
    keys: `[B]` typed PRNG keys, one per puzzle.
    patch_size: P (static).
    config: SamplerConfig (static).
    record: also return the time and sigma rows of every step.
    step_limit: stop after this many steps (a partial run, e.g. to inspect an
      intermediate state); default: run every schedule to its end.

  Returns:
    GreedyResult.
  """
  _check_inputs(z, masked, mask, unknown, keys, patch_size)
  table = schedule_lib.schedule_table(unknown.shape[1], config.steps_per_patch,
                                      config.overlap, config.clean_schedule)
  sched = _lookup_schedule(table, jnp.sum(unknown, axis=1))
  return _greedy(denoise_fn, z, masked, mask, unknown, keys, sched,
                 patch_size=patch_size, stochasticity=config.stochasticity,
                 temperature=config.temperature, clamp_noise=config.clamp_noise,
                 record_steps=table.steps_bound() if record else 0,
                 step_limit=step_limit)


def _check_inputs(z, masked, mask, unknown, keys, patch_size) -> None:
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
    raise ValueError(f"the patch vector must have shape {(z.shape[0], gh * gw)} "
                     f"for a {gh}x{gw} patch grid, got {unknown.shape}.")
  _check_keys(keys, z.shape[0])


# ----------------------------------------------------------------------------
# IPR.


def _check_ratio(ratio: float) -> None:
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"resampling_ratio must lie in (0, 1], got {ratio!r}.")


def num_resampled_table(num_patches: int, ratio: float) -> np.ndarray:
  """k = max(1, int(c * ratio)) for c = 0..N candidates (Python float arithmetic)."""
  _check_ratio(ratio)
  return np.array([max(1, int(c * ratio)) for c in range(num_patches + 1)],
                  np.int32)


def check_schedules(sampler_config: SamplerConfig, ipr_config: IPRConfig, num_patches: int,
                    unknown_counts) -> None:
  """Refuses settings whose schedules are degenerate for the patch counts that can occur.

  Args:
    sampler_config, ipr_config: the settings of a run.
    num_patches: N, patches per image.
    unknown_counts: the numbers of patches the SRM pass may have to generate (standard mode);
      they are also IPR's candidate counts. Correction mode ignores them: every patch is a
      candidate and there is no SRM pass.

  Raises:
    ValueError: naming steps_per_patch, overlap and the first n with repeated block starts.
  """
  clean = sampler_config.clean_schedule
  if ipr_config.mode == "correction":
    counts = [num_patches]
  else:
    counts = [int(c) for c in unknown_counts]
    schedule_lib.check_block_starts(counts, sampler_config.steps_per_patch,
                                    sampler_config.overlap, clean, name="sampler")
  if ipr_config.budget > 0:
    table = num_resampled_table(num_patches, ipr_config.resampling_ratio)
    ks = [min(int(table[c]), c) for c in counts]
    schedule_lib.check_block_starts(ks, ipr_config.steps_per_patch, ipr_config.overlap, clean,
                                    name="ipr")


def resample_mask(key: jax.Array, candidates: jax.Array, ratio: float) -> jax.Array:
  """A uniformly random set of k = max(1, floor(ratio * |candidates|)) patches.

  Args:
    key: PRNG key of one puzzle.
    candidates: `[N]` bool patches that may be chosen.
    ratio: resampling ratio in (0, 1] (static).

  Returns:
    `[N]` bool with exactly min(k, |candidates|) True entries, all candidates.
    (With no candidates the set is empty; the reference would fail there.)
  """
  _check_ratio(ratio)
  num_patches = candidates.shape[-1]
  count = jnp.sum(candidates)
  k = jnp.minimum(jnp.asarray(num_resampled_table(num_patches, ratio))[count],
                  count)
  scores = jnp.where(candidates, jax.random.uniform(key, [num_patches]), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores))
  return (ranks < k) & candidates


def corrupt_by_swaps(key: jax.Array, image: jax.Array, patch_size: int,
                     num_swaps: int) -> jax.Array:
  """Swaps the contents of two cells `num_swaps` times (correction mode, §4.2).

  Each swap picks two distinct rows and two distinct columns of the patch
  grid and exchanges cells (r0, c0) and (r1, c1), so the two cells differ in
  both row and column, as in the reference.

  Args:
    key: PRNG key of one puzzle.
    image: `[H, W, d]` image (a solved grid).
    patch_size: P.
    num_swaps: K (static).

  Returns:
    `[H, W, d]` corrupted image.
  """
  gh, gw = patch_grid(image.shape, patch_size)
  if gh < 2 or gw < 2:
    raise ValueError(f"cell swaps need a patch grid of at least 2x2, got {gh}x{gw}.")
  h, w, d = image.shape
  cells = image.reshape(gh, patch_size, gw, patch_size, d).transpose(0, 2, 1, 3, 4)
  cells = cells.reshape(gh * gw, patch_size, patch_size, d)

  def swap(i, cells):
    # r0 uniform, r1 = r0 + uniform{1..gh-1} (mod gh): a uniform distinct pair.
    r0, dr, c0, dc = jax.random.randint(
        jax.random.fold_in(key, i), (4,), 0, jnp.array([gh, gh - 1, gw, gw - 1]))
    r1, c1 = (r0 + 1 + dr) % gh, (c0 + 1 + dc) % gw
    a, b = r0 * gw + c0, r1 * gw + c1
    cell_a, cell_b = cells[a], cells[b]
    return cells.at[a].set(cell_b).at[b].set(cell_a)

  cells = jax.lax.fori_loop(0, num_swaps, swap, cells)
  cells = cells.reshape(gh, gw, patch_size, patch_size, d).transpose(0, 2, 1, 3, 4)
  return cells.reshape(h, w, d)


def _scores(score_fn: Optional[ScoreFn], z) -> dict:
  if score_fn is None:
    return {}
  return {name: jnp.asarray(value) for name, value in score_fn(z).items()}


def _refine(denoise_fn: DenoiseFn, z, masked, mask, candidates, noise, keys, *,
            srm_unknown: Optional[jax.Array], patch_size: int,
            sampler_config: SamplerConfig, ipr_config: IPRConfig,
            score_fn: Optional[ScoreFn], verify_fn: Optional[VerifyFn],
            num_snapshots: int) -> IPRResult:
  """IPR, optionally preceded by the SRM pass, as one scan over iterations.

  With `srm_unknown` given, iteration 0 is the SRM pass that generates those
  patches of z (budget 0) and iterations 1..budget are IPR iterations; the
  two kinds share one compiled greedy loop (so the denoiser is compiled once),
  iteration 0 merely using the SRM schedule and patch set.
  """
  if noise.shape != z.shape:
    raise ValueError(f"noise must have shape {z.shape}, got {noise.shape}.")
  if ipr_config.immediate_stop and verify_fn is None:
    raise ValueError("immediate_stop=True needs a verify_fn.")
  batch, num_patches = candidates.shape
  grid = patch_grid(z.shape, patch_size)
  ratio = ipr_config.resampling_ratio
  clean = sampler_config.clean_schedule
  with_srm = srm_unknown is not None
  ipr_table = schedule_lib.schedule_table(
      num_patches, ipr_config.steps_per_patch, ipr_config.overlap, clean)
  proto_len = ipr_table.prototypes.shape[1]
  if with_srm:
    srm_table = schedule_lib.schedule_table(
        num_patches, sampler_config.steps_per_patch, sampler_config.overlap, clean)
    proto_len = max(proto_len, srm_table.prototypes.shape[1])
    srm_sched = _lookup_schedule(srm_table, jnp.sum(srm_unknown, axis=1), proto_len)
  num_snapshots = min(int(num_snapshots), batch)
  z = z.astype(jnp.float32)
  iteration_keys = _fold(keys, _IPR_STREAM)

  stopped = jnp.zeros([batch], bool)
  if ipr_config.immediate_stop and not with_srm:
    stopped = verify_fn(z).astype(bool)
  stop_budget = jnp.where(stopped, 0, -1).astype(jnp.int32)
  initial_order = jnp.full((batch, num_patches), -1, jnp.int32)
  nfe = jnp.zeros([batch], jnp.int32)

  def iteration(carry, j):
    z, nfe, stopped, stop_budget, initial_order = carry
    # [B, 3]: resampling, re-noising and greedy-step keys of this iteration.
    it_keys = jax.vmap(lambda k: jax.random.split(k, 3))(_fold(iteration_keys, j))
    active = ~stopped
    chosen = jax.vmap(resample_mask, in_axes=(0, 0, None))(
        it_keys[:, 0], candidates, ratio) & active[:, None]
    if ipr_config.noise_type == "fixed":
      fresh = noise.astype(jnp.float32)
    else:
      fresh = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(
          it_keys[:, 1])
    z_start = jnp.where(patch_pixel_mask(chosen, grid, patch_size), fresh, z)
    if mask is not None:
      z_start = masked + mask * z_start
    sched = _lookup_schedule(ipr_table, jnp.sum(chosen, axis=1), proto_len)
    waiting = chosen
    if with_srm:
      is_srm = j == 0
      waiting = jnp.where(is_srm, srm_unknown & active[:, None], chosen)
      chosen = chosen & ~is_srm
      z_start = jnp.where(is_srm, z, z_start)
      sched = jax.tree.map(lambda a, b: jnp.where(is_srm, a, b), srm_sched, sched)
    out = _greedy(denoise_fn, z_start, masked, mask, waiting, it_keys[:, 2], sched,
                  patch_size=patch_size, stochasticity=sampler_config.stochasticity,
                  temperature=sampler_config.temperature,
                  clamp_noise=sampler_config.clamp_noise)
    z = jnp.where(active[:, None, None, None], out.z, z)
    nfe = nfe + out.nfe
    if with_srm:
      initial_order = jnp.where(is_srm, out.order, initial_order)
    if ipr_config.immediate_stop:
      accepted = active & verify_fn(z).astype(bool)
      stop_budget = jnp.where(accepted, j if with_srm else j + 1, stop_budget)
      stopped = stopped | accepted
    outputs = (_scores(score_fn, z), nfe, chosen, z[:num_snapshots])
    return (z, nfe, stopped, stop_budget, initial_order), outputs

  num_iterations = ipr_config.budget + int(with_srm)
  carry, (scores, nfes, resampled, snapshots) = jax.lax.scan(
      iteration, (z, nfe, stopped, stop_budget, initial_order),
      jnp.arange(num_iterations, dtype=jnp.int32))
  z_final, nfe_final, _, stop_budget, initial_order = carry

  if with_srm:
    resampled = resampled[1:]
  else:  # Budget 0 is the input itself.
    def with_budget0(first, rest):
      return jnp.concatenate([first[None], rest], axis=0)
    scores = jax.tree.map(with_budget0, _scores(score_fn, z), scores)
    nfes = with_budget0(nfe, nfes)
    snapshots = with_budget0(z[:num_snapshots], snapshots)
  return IPRResult(z=z_final, scores=scores, nfe=nfe_final, nfe_per_budget=nfes,
                   stop_budget=stop_budget, resampled=resampled,
                   initial_order=initial_order,
                   snapshots=snapshots if num_snapshots else None)


def ipr_refine(denoise_fn: DenoiseFn, z: jax.Array, masked: Optional[jax.Array],
               mask: Optional[jax.Array], candidates: jax.Array,
               noise: jax.Array, keys: jax.Array, *, patch_size: int,
               sampler_config: SamplerConfig, ipr_config: IPRConfig,
               score_fn: Optional[ScoreFn] = None,
               verify_fn: Optional[VerifyFn] = None,
               num_snapshots: int = 0) -> IPRResult:
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
    score_fn: z [B, H, W, d] -> {name: [B]}, scored after every budget (static).
    verify_fn: z -> [B] bool; with immediate_stop a puzzle whose sample is
      accepted (already at budget 0) keeps it and spends no more passes (static).
    num_snapshots: keep the samples of the first this many puzzles at every budget.

  Returns:
    IPRResult (initial_order all -1).
  """
  _check_inputs(z, masked, mask, candidates, keys, patch_size)
  return _refine(denoise_fn, z, masked, mask, candidates, noise, keys,
                 srm_unknown=None, patch_size=patch_size,
                 sampler_config=sampler_config, ipr_config=ipr_config,
                 score_fn=score_fn, verify_fn=verify_fn,
                 num_snapshots=num_snapshots)


def srm_ipr(denoise_fn: DenoiseFn, keys: jax.Array, *, image: Optional[jax.Array],
            mask: Optional[jax.Array] = None, noise: Optional[jax.Array] = None,
            patch_size: int, sampler_config: SamplerConfig,
            ipr_config: IPRConfig, score_fn: Optional[ScoreFn] = None,
            verify_fn: Optional[VerifyFn] = None,
            num_snapshots: int = 0) -> IPRResult:
  """Initial SRM pass (or correction-mode corruption) followed by IPR.

  standard mode (§4.2): masked = (1 - mask) image, z = masked + mask noise,
  the patches whose top-left mask pixel is > 0.5 are generated by SRM; IPR's
  candidates are those same patches (all patches without a mask).
  correction mode: `image` is a solved grid; K random cell swaps corrupt it,
  every cell becomes free (mask ones, masked zeros: no re-pasting), there is no
  SRM pass, and every patch is a candidate.

  The SRM pass and the IPR iterations share one compiled greedy loop (one
  scan over budgets 0..B), so the denoiser is compiled once. Usable under jit
  and pmap: denoise_fn, score_fn, verify_fn, patch_size, num_snapshots and the
  configs are static, everything else is arrays.

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
    score_fn: z -> {name: [B]}, scored after every budget.
    verify_fn: z -> [B] bool, for immediate_stop (checked after SRM too).
    num_snapshots: samples of the first puzzles kept at every budget.

  Returns:
    IPRResult (nfe counts the SRM pass too).
  """
  reference = image if image is not None else noise
  if reference is None:
    raise ValueError("srm_ipr needs image or noise to know the sample shape.")
  _check_keys(keys, reference.shape[0])
  grid = patch_grid(reference.shape, patch_size)
  batch = reference.shape[0]
  num_patches = grid[0] * grid[1]
  if noise is None:
    noise = jax.vmap(lambda k: jax.random.normal(k, reference.shape[1:], jnp.float32))(
        _fold(keys, _NOISE_STREAM))
  common = dict(patch_size=patch_size, sampler_config=sampler_config,
                ipr_config=ipr_config, score_fn=score_fn, verify_fn=verify_fn,
                num_snapshots=num_snapshots)

  if ipr_config.mode == "correction":
    if image is None:
      raise ValueError("correction mode needs the solved image, got image=None.")
    z = jax.vmap(corrupt_by_swaps, in_axes=(0, 0, None, None))(
        _fold(keys, _CORRUPT_STREAM), image.astype(jnp.float32), patch_size,
        ipr_config.num_corruption_swaps)
    return _refine(denoise_fn, z, None, None, jnp.ones((batch, num_patches), bool),
                   noise, keys, srm_unknown=None, **common)

  if mask is None:
    masked = None
    unknown = jnp.ones((batch, num_patches), bool)
    z = noise.astype(jnp.float32)
  else:
    if image is None:
      raise ValueError("a mask needs the image that holds the given cells.")
    mask = mask.astype(jnp.float32)
    masked = (1.0 - mask) * image.astype(jnp.float32)
    unknown = unknown_patches(mask, patch_size)
    z = masked + mask * noise.astype(jnp.float32)
  _check_inputs(z, masked, mask, unknown, keys, patch_size)
  return _refine(denoise_fn, z, masked, mask, unknown, noise, keys,
                 srm_unknown=unknown, **common)
