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
  greedy loop; the SRM pass is iteration 0 of that scan, so the greedy loop's
  denoiser call is traced (and compiled) once. The uncertainty query of the
  variants below calls the denoiser on a batch of G x B: a second copy of the
  denoiser in the program (a third where `ipr_refine` queries its input before
  the scan). An optional `score_fn` is evaluated after every budget inside
  the scan, so one run yields the whole quality-vs-budget curve. Usable under
  `jax.jit` and `jax.pmap` with `denoise_fn`, `score_fn`, `verify_fn`, the
  patch size and the configs static. `ipr_refine` runs IPR alone on given
  samples. An iteration's pieces: a selection strategy (`SELECTORS`, one
  signature), the re-noising (`_renoise`), the greedy loop, the uncertainty
  query with the confident-iterate tracker (`_query_and_track`) and
  immediate_stop (`_immediate_stop`).

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
  included) with the lowest mean query score so far; the last iterate's scores are returned too.

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

# z [B, H, W, d] -> [B, N] bool, True for patches that break the task's rules (a verifier).
CellVerifyFn = Callable[[jax.Array], jax.Array]

NOISE_TYPES = ("random", "fixed")
MODES = ("standard", "correction")
SELECTIONS = ("random", "uncertainty", "verifier")
UNCERTAINTY_SCORES = ("nll", "sigma")
RATIO_SCHEDULES = ("constant", "linear")
RETURN_ITERATES = ("last", "confident")

# Tags for fold_in, so the streams of one puzzle key never collide.
_IPR_STREAM, _CORRUPT_STREAM, _NOISE_STREAM, _QUERY_STREAM = 1, 2, 3, 4


def _coerce(config, **types) -> None:
  """Casts config fields (e.g. ml_collections floats) so configs hash equal."""
  for name, kind in types.items():
    value = getattr(config, name)
    cast = kind(value)
    if kind is int and cast != value:
      raise ValueError(f"{name} must be an integer, got {value!r}.")
    object.__setattr__(config, name, cast)


def _field(default, doc: str):
  """A dataclass field with its documentation (`field_docs`; config_base's sampler and ipr
  sections)."""
  return dataclasses.field(default=default, metadata={"doc": doc})


class _DocumentedFields:
  """`defaults()` and `field_docs()` of a dataclass whose fields are made by `_field`."""

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """{field name: default}, in field order (what the config section starts from)."""
    return {field.name: field.default for field in dataclasses.fields(cls)}

  @classmethod
  def field_docs(cls) -> dict[str, str]:
    """{field name: documentation}, in field order."""
    return {field.name: field.metadata["doc"] for field in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True)
class SamplerConfig(_DocumentedFields):
  """Options of the SRM greedy sampler: the one definition of its fields, defaults (the
  reference's ms_hard_test values, spec §4.4) and documentation (`field_docs()`).

  `config.sampler` of the project configs is made from these fields
  (`config_base.sampler_section`); configs/<task>.py override what is task-specific (Even
  Pixels and Counting Polygons: 30 and 10 steps per patch at overlap 0.9).
  """
  steps_per_patch: int = _field(3, "Denoising steps each patch takes from t = 1 to t = 0.")
  overlap: float = _field(0.0, "Fraction of a patch's steps shared with the next patch's, in "
                          "[0, 1).")
  stochasticity: float = _field(0.5, "alpha of the reverse kernel, in [0, 1].")
  temperature: float = _field(1.0, "tau: scales the reverse kernel's standard deviation, > 0.")
  top_k: int = _field(1, "Patches selected per selection step; only 1 is implemented.")
  clean_schedule: bool = _field(False, "False: the reference's float32 schedule arithmetic (spec "
                                "§4.3); True: exact arithmetic (a deliberate deviation).")
  clamp_noise: bool = _field(True, "Add the reference's ~3e-7 clamp noise wherever t_next > 0 "
                             "(spec §2.3, §4.4); False: none.")

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
class IPRConfig(_DocumentedFields):
  """Options of IPR: the one definition of the fields, defaults and documentation of IPR.

  The defaults are the reference's ms_hard_test values (spec §4.5; the paper's IPR, no
  variant); `config.ipr` of the project configs is made from these fields
  (`config_base.ipr_section`), and configs/<task>.py override what is task-specific (e.g. Even
  Pixels' ep_test: 30 steps per patch at overlap 0.9). Each field's documentation is its `doc`
  metadata (`IPRConfig.field_docs()`).
  """
  budget: int = _field(30, "Refinement iterations B (budgets 0..B are scored).")
  steps_per_patch: int = _field(10, "Denoising steps per re-noised patch (the regeneration "
                                "schedule).")
  overlap: float = _field(0.8, "Block overlap of the re-noised patches' schedule, in [0, 1) "
                         "(reference ms_hard_test: 0.8; ep_test and cp_test: 0.9, set by their "
                         "configs).")
  resampling_ratio: float = _field(
      0.25, "Fraction of candidate patches re-noised per iteration, in (0, 1]; "
      "k = max(1, floor(ratio * number of candidates)).")
  noise_type: str = _field("random", "'random': fresh noise; 'fixed': the initial noise of the "
                           "patch (ablation).")
  mode: str = _field("standard", "'standard' (SRM pass, then refine) or 'correction' (refine a "
                     "solved grid corrupted by random cell swaps; every cell becomes free; no SRM "
                     "pass).")
  num_corruption_swaps: int = _field(5, "Cell swaps K that corrupt a solution in 'correction' "
                                     "mode.")
  immediate_stop: bool = _field(False, "Stop refining a puzzle once the task check (`verify_fn`) "
                                "accepts it (reference: False).")
  # Variants beyond the paper (module docstring; experiments/README.md compares them). Their
  # defaults are the paper's.
  selection: str = _field(
      "random", "Patches to re-noise (`SELECTIONS`): 'random' (the paper's), 'uncertainty' (the "
      "model's own uncertainty query, Gumbel top-k; costs uncertainty_groups passes per "
      "iteration) or 'verifier' (cells that `cell_verify_fn` flags first: on MNIST Sudoku those "
      "in a broken row, column or box as classified; uses the task's verifier: a reference).")
  uncertainty_score: str = _field(
      "nll", "What the uncertainty query scores per patch: 'nll' (negative log-likelihood of its "
      "current content under the model's prediction from the other patches) or 'sigma' (the "
      "predicted log sigma alone).")
  uncertainty_groups: int = _field(
      4, "G, denoiser passes per uncertainty query: the candidates are split into G random "
      "groups, each re-noised to t = 1 in one pass.")
  selection_temperature: float = _field(
      0.5, "Gumbel temperature of the uncertainty-guided draw over the standardised scores, > 0 "
      "(smaller: greedier).")
  renoise_time: float = _field(
      1.0, "t0 in (0, 1]: re-noised patches go to z_t0 = (1 - t0) x + t0 eps and are "
      "regenerated from t0 with round(steps_per_patch * t0) steps per patch (1: the paper's "
      "full re-noising).")
  ratio_schedule: str = _field(
      "constant", "'constant' (the paper's) or 'linear': the ratio of IPR iteration i goes "
      "linearly from resampling_ratio (i = 1) to final_resampling_ratio (i >= "
      "ratio_decay_iterations).")
  final_resampling_ratio: float = _field(
      0.125, "The ratio the 'linear' schedule reaches at iteration ratio_decay_iterations and "
      "keeps, in (0, 1].")
  ratio_decay_iterations: int = _field(10, "Iterations over which the 'linear' ratio schedule "
                                       "moves.")
  return_iterate: str = _field(
      "last", "'last' (the paper's) or 'confident': the iterate (SRM sample included) with the "
      "lowest mean uncertainty score so far.")

  def __post_init__(self):
    _coerce(self, budget=int, steps_per_patch=int, overlap=float,
            resampling_ratio=float, num_corruption_swaps=int,
            uncertainty_groups=int, selection_temperature=float,
            renoise_time=float, final_resampling_ratio=float,
            ratio_decay_iterations=int)
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
    for name, allowed in (("selection", SELECTIONS),
                          ("uncertainty_score", UNCERTAINTY_SCORES),
                          ("ratio_schedule", RATIO_SCHEDULES),
                          ("return_iterate", RETURN_ITERATES)):
      if getattr(self, name) not in allowed:
        raise ValueError(
            f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
    if self.uncertainty_groups < 1:
      raise ValueError("uncertainty_groups must be a positive integer, "
                       f"got {self.uncertainty_groups!r}.")
    if not self.selection_temperature > 0.0:
      raise ValueError("selection_temperature must be positive, "
                       f"got {self.selection_temperature!r}.")
    if not 0.0 < self.renoise_time <= 1.0:
      raise ValueError(f"renoise_time must lie in (0, 1], got {self.renoise_time!r}.")
    if not 0.0 < self.final_resampling_ratio <= 1.0:
      raise ValueError("final_resampling_ratio must lie in (0, 1], "
                       f"got {self.final_resampling_ratio!r}.")
    if self.ratio_decay_iterations < 1:
      raise ValueError("ratio_decay_iterations must be a positive integer, "
                       f"got {self.ratio_decay_iterations!r}.")

  @property
  def queries_uncertainty(self) -> bool:
    """Whether iterations run the uncertainty query (it costs denoiser passes)."""
    return self.selection == "uncertainty" or self.return_iterate == "confident"

  @property
  def renoise_steps_per_patch(self) -> int:
    """Steps per patch of the regeneration: round(steps_per_patch * renoise_time), >= 1."""
    if self.renoise_time == 1.0:
      return self.steps_per_patch
    return max(1, int(round(self.steps_per_patch * self.renoise_time)))

  def ratio_at(self, iteration: int) -> float:
    """The resampling ratio of IPR iteration `iteration` (1-based).

    'constant': resampling_ratio. 'linear' with D = ratio_decay_iterations: resampling_ratio at
    iteration 1, final_resampling_ratio from iteration D on, linear in between (D = 1:
    final_resampling_ratio from iteration 1 on).
    """
    if self.ratio_schedule == "constant":
      return self.resampling_ratio
    span = self.ratio_decay_iterations - 1
    if span == 0:
      return self.final_resampling_ratio
    frac = min(max(iteration - 1, 0), span) / span
    return self.resampling_ratio + frac * (self.final_resampling_ratio - self.resampling_ratio)


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
    z: `[B, H, W, d]` float32 returned iterate: the last (the reference's), or
      the most confident one with return_iterate='confident'.
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
      first puzzles after each budget, the iterates that `scores` scores (the
      last, or the most confident with return_iterate='confident'), or None.
    last_scores: with return_iterate='confident', `{name: [budget + 1, B]}`
      score_fn of the last iterate (`scores` are then those of the returned,
      most confident iterate); else None.
    uncertainty: `[budget + 1, B]` float32 mean uncertainty score of the last
      iterate after each budget when the configuration queries it, else None.
  """
  z: jax.Array
  scores: dict
  nfe: jax.Array
  nfe_per_budget: jax.Array
  stop_budget: jax.Array
  resampled: jax.Array
  initial_order: jax.Array
  snapshots: Optional[jax.Array] = None
  last_scores: Optional[dict] = None
  uncertainty: Optional[jax.Array] = None


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


def _time_rows(step, state: _GreedyState, sched: _PuzzleSchedule,
               start_time: Optional[jax.Array] = None) -> jax.Array:
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


def _initial_greedy_state(z: jax.Array, waiting: jax.Array) -> _GreedyState:
  """The greedy state before step 0: z `[B, H, W, d]`, `waiting` `[B, N]`, nothing selected."""
  batch, num_patches = waiting.shape
  minus_one = jnp.full((batch, num_patches), -1, jnp.int32)
  zeros = jnp.zeros([batch], jnp.int32)
  return _GreedyState(z=z, waiting=waiting, selected_at=minus_one, order=minus_one,
                      order_step=minus_one, num_selected=zeros, block_counter=zeros,
                      next_start=zeros, nfe=zeros)


def _reverse_step(out, z, t_now_pix, t_next_pix, keys, *, stochasticity: float,
                  temperature: float, clamp_noise: bool) -> jax.Array:
  """One step of the reverse kernel p(z_next | z) from the denoiser's output `out`.

  Args:
    out: DenoiserOutput of z (u, v `[B, H, W, d]`).
    z: `[B, H, W, d]` float32 current state.
    t_now_pix, t_next_pix: `[B, H, W, 1]` pixel times of this step and the next.
    keys: `[B]` typed keys of this step's noise.
    stochasticity, temperature, clamp_noise: as in `SamplerConfig`.

  Returns:
    `[B, H, W, d]` float32: the kernel's mean, sampled where noise is added (clamp_noise: wherever
    t_next > 0, as the reference; else only where the unclamped sigma is positive).
  """
  kernel = flow.reverse_kernel(
      out.u.astype(jnp.float32), z, t_now_pix, t_next_pix,
      out.v.astype(jnp.float32), stochasticity, temperature)
  z_next = kernel.mean
  if clamp_noise or stochasticity > 0.0:
    eps = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys)
    if clamp_noise:  # The reference: sample wherever t_next > 0.
      noisy = t_next_pix > 0
    else:  # Only where the unclamped sigma is positive.
      noisy = (t_next_pix > 0) & (t_next_pix < t_now_pix)
    z_next = jnp.where(noisy, kernel.reparameterize(eps), z_next)
  return z_next


def _greedy(denoise_fn: DenoiseFn, z, masked, mask, waiting, keys,
            sched: _PuzzleSchedule, *, patch_size: int, stochasticity: float,
            temperature: float, clamp_noise: bool, record_steps: int = 0,
            step_limit: Optional[int] = None,
            start_time: Optional[jax.Array] = None) -> GreedyResult:
  """The greedy loop on a batch; `waiting` [B, N] are the patches to generate.

  A `lax.while_loop` over steps that runs until the longest schedule of the
  batch has ended; a puzzle past its own schedule keeps its state and spends
  no passes. With record_steps > 0 the time and sigma rows of the first
  record_steps steps are kept; with step_limit the loop stops after that many
  steps. Waiting patches start at `start_time` `[B]` (None: t = 1); the
  schedule's prototypes must then start there too.
  """
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
    t_now_pix = patches_to_pixels(t_now, grid, patch_size)
    out = denoise_fn(state.z, t_now_pix)
    sigma = patch_mean(out.sigma.astype(jnp.float32), patch_size)
    new = _select(step, live, state, sched, sigma)
    t_next_pix = patches_to_pixels(_time_rows(step + 1, new, sched, start_time),
                                   grid, patch_size)
    z_next = _reverse_step(out, state.z, t_now_pix, t_next_pix, _fold(keys, step),
                           stochasticity=stochasticity, temperature=temperature,
                           clamp_noise=clamp_noise)
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


def resample_counts(ipr_config: IPRConfig, num_patches: int) -> np.ndarray:
  """`[budget + 1, N + 1]` int32: row i holds k for c = 0..N candidates at IPR iteration i.

  Row i uses `ipr_config.ratio_at(i)`; row 0 (the SRM pass, which re-noises nothing) repeats
  row 1. k is not yet capped at c (the sampler takes min(k, c)).
  """
  iterations = range(1, max(ipr_config.budget, 1) + 1)
  rows = [num_resampled_table(num_patches, ipr_config.ratio_at(i)) for i in iterations]
  return np.stack(rows[:1] + rows[:ipr_config.budget])


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
    table = resample_counts(ipr_config, num_patches)
    ks = {min(int(k), c) for row in table for k, c in zip(row[counts], counts)}
    name = "ipr"
    if ipr_config.renoise_steps_per_patch != ipr_config.steps_per_patch:
      name = (f"ipr (renoise_time={ipr_config.renoise_time} leaves "
              f"{ipr_config.renoise_steps_per_patch} of steps_per_patch="
              f"{ipr_config.steps_per_patch})")
    schedule_lib.check_block_starts(ks, ipr_config.renoise_steps_per_patch, ipr_config.overlap,
                                    clean, name=name)


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
  return random_subset(key, candidates, k)


def random_subset(key: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
  """`[N]` bool: min(k, |candidates|) candidates drawn uniformly without replacement."""
  scores = jnp.where(candidates, jax.random.uniform(key, candidates.shape[-1:]), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores))
  return (ranks < k) & candidates


def ranked_subset(key: jax.Array, candidates: jax.Array, priority: jax.Array,
                  k: jax.Array) -> jax.Array:
  """`[N]` bool: min(k, |candidates|) candidates by Gumbel top-k of the logits `priority` [N].

  A draw without replacement in which a patch is picked with probability proportional to
  exp(priority) among those left; equal priorities give a uniform subset.
  """
  noisy = priority + jax.random.gumbel(key, priority.shape, jnp.float32)
  ranks = jnp.argsort(jnp.argsort(jnp.where(candidates, -noisy, jnp.inf)))
  return (ranks < k) & candidates


def _mean_over(values: jax.Array, candidates: jax.Array) -> jax.Array:
  """`[B]` mean of `values` [B, N] over each puzzle's candidates (0 without candidates)."""
  count = jnp.maximum(jnp.sum(candidates, axis=1), 1)
  return jnp.sum(jnp.where(candidates, values, 0.0), axis=1) / count


def standardized(scores: jax.Array, candidates: jax.Array) -> jax.Array:
  """Scores `[B, N]` shifted and scaled to mean 0, std 1 over each puzzle's candidates."""
  centred = scores - _mean_over(scores, candidates)[:, None]
  std = jnp.sqrt(_mean_over(centred ** 2, candidates))[:, None]
  return jnp.where(candidates, centred / (std + 1e-6), 0.0)


def uncertainty_query(denoise_fn: DenoiseFn, z: jax.Array, candidates: jax.Array,
                      keys: jax.Array, *, patch_size: int, groups: int,
                      score: str = "nll") -> jax.Array:
  """The model's own uncertainty about each candidate patch of the samples z, in G passes.

  The candidates of each puzzle are split into G random groups of equal size (+-1). For each
  group one denoiser pass sees the group's patches as pure noise (t = 1, fresh noise) and every
  other patch as it is in z at t = 0, the situation of an IPR iteration that re-noises that
  group. A patch's score comes from the pass in which it was noised:
    'sigma': log sigma, the predicted uncertainty of the patch given the rest;
    'nll':   log sigma + mean((z - x_hat)^2) / (2 sigma^2), the Gaussian negative
             log-likelihood (per pixel, constant dropped) of the patch's current content under
             the prediction x_hat = z_1 - u from the rest; it is what the sigma head is trained
             to score (spec §3.3, at t = 1 x - x_hat = u_hat - u).
  The G passes run as one denoiser call on a batch of G * B.

  Args:
    denoise_fn: as in `srm_sample`.
    z: `[B, H, W, d]` current samples (given cells pasted).
    candidates: `[B, N]` bool patches to score.
    keys: `[B]` typed per-puzzle keys of this query.
    patch_size: P.
    groups: G >= 1.
    score: 'nll' or 'sigma'.

  Returns:
    `[B, N]` float32 scores, higher = more uncertain; 0 on non-candidates.
  """
  if score not in UNCERTAINTY_SCORES:
    raise ValueError(f"score must be one of {UNCERTAINTY_SCORES}, got {score!r}.")
  batch, num_patches = candidates.shape
  grid = patch_grid(z.shape, patch_size)
  split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
  draws = jax.vmap(lambda k: jax.random.uniform(k, [num_patches]))(split[:, 0])
  ranks = jnp.argsort(jnp.argsort(jnp.where(candidates, draws, 2.0), axis=1), axis=1)
  group = ranks % groups  # [B, N]
  eps = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(split[:, 1])
  noised = candidates[None] & (group[None] == jnp.arange(groups)[:, None, None])  # [G, B, N]
  pixels = patch_pixel_mask(noised.reshape(groups * batch, num_patches), grid, patch_size)
  tile = lambda x: jnp.broadcast_to(x[None], (groups,) + x.shape).reshape(
      (groups * batch,) + x.shape[1:])
  z_all = tile(z.astype(jnp.float32))
  z_query = jnp.where(pixels, tile(eps), z_all)
  t_query = pixels.astype(jnp.float32)
  out = denoise_fn(z_query, t_query)
  sigma = out.sigma.astype(jnp.float32)
  per_patch = patch_mean(jnp.log(sigma), patch_size)
  if score == "nll":
    x_hat = flow.x_from_u(z_query, t_query, out.u.astype(jnp.float32))
    per_patch = per_patch + 0.5 * patch_mean(((z_all - x_hat) / sigma) ** 2, patch_size)
  per_patch = per_patch.reshape(groups, batch, num_patches)
  own = jnp.take_along_axis(per_patch, group[None], axis=0)[0]
  return jnp.where(candidates, own, 0.0)


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


# ----------------------------------------------------------------------------
# IPR's selection strategies: which patches an iteration re-noises.
#
# One signature, (keys [B], candidates [B, N], k [B], *, z, cells, ipr_config, cell_verify_fn)
# -> [B, N] bool chosen patches (min(k, |candidates|) of each puzzle's candidates), looked up in
# `SELECTORS` by `IPRConfig.selection`. z `[B, H, W, d]` is the current iterate, cells `[B, N]`
# its uncertainty query's scores (zeros before the first query).


def select_random(keys, candidates, k, *, z, cells, ipr_config, cell_verify_fn) -> jax.Array:
  """'random' (the paper's): k patches per puzzle uniformly among its candidates."""
  del z, cells, ipr_config, cell_verify_fn  # One signature for every strategy.
  return jax.vmap(random_subset)(keys, candidates, k)


def select_uncertainty(keys, candidates, k, *, z, cells, ipr_config,
                       cell_verify_fn) -> jax.Array:
  """'uncertainty': Gumbel top-k of the standardised query scores at selection_temperature."""
  del z, cell_verify_fn
  priority = standardized(cells, candidates) / ipr_config.selection_temperature
  return jax.vmap(ranked_subset)(keys, candidates, priority, k)


def select_verifier(keys, candidates, k, *, z, cells, ipr_config, cell_verify_fn) -> jax.Array:
  """'verifier': the cells `cell_verify_fn` flags first, uniformly among them; then the rest."""
  del cells, ipr_config
  priority = jnp.where(cell_verify_fn(z).astype(bool), 1e4, 0.0)
  return jax.vmap(ranked_subset)(keys, candidates, priority, k)


SELECTORS = {"random": select_random, "uncertainty": select_uncertainty,
             "verifier": select_verifier}
assert tuple(SELECTORS) == SELECTIONS


def _renoise(z, chosen, keys, noise, masked, mask, *, patch_size: int,
             noise_type: str, renoise_time: float) -> jax.Array:
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
  `[B, N]`, noise `[B, H, W, d]`, srm_unknown `[B, N]` (None: no SRM pass) and srm_sched, the
  SRM pass's schedule; iteration_keys and query_keys `[B]`; counts `[budget + 1, N + 1]`
  (`resample_counts`).
  """
  denoise_fn: DenoiseFn
  masked: Optional[jax.Array]
  mask: Optional[jax.Array]
  candidates: jax.Array
  noise: jax.Array
  srm_unknown: Optional[jax.Array]
  srm_sched: Optional[_PuzzleSchedule]
  iteration_keys: jax.Array
  query_keys: jax.Array
  counts: jax.Array
  ipr_table: schedule_lib.ScheduleTable
  proto_len: int
  patch_size: int
  sampler_config: SamplerConfig
  ipr_config: IPRConfig
  score_fn: Optional[ScoreFn]
  verify_fn: Optional[VerifyFn]
  cell_verify_fn: Optional[CellVerifyFn]
  num_snapshots: int

  @property
  def with_srm(self) -> bool:
    return self.srm_unknown is not None

  @property
  def num_iterations(self) -> int:
    return self.ipr_config.budget + int(self.with_srm)

  @property
  def confident(self) -> bool:
    return self.ipr_config.return_iterate == "confident"


@flax.struct.dataclass
class _RefineCarry:
  """The state `_refine`'s scan carries from one iteration to the next."""
  z: jax.Array              # [B, H, W, d] float32 the last iterate
  nfe: jax.Array            # [B] int32 denoiser passes so far
  stopped: jax.Array        # [B] bool: frozen by immediate_stop
  stop_budget: jax.Array    # [B] int32 budget at which immediate_stop froze it, -1 if not
  initial_order: jax.Array  # [B, N] int32 selection order of the SRM pass
  cells: jax.Array          # [B, N] float32 uncertainty of z's patches (the next selection's)
  z_best: jax.Array         # [B, H, W, d] float32 the most confident iterate so far
  best: jax.Array           # [B] float32 its mean uncertainty score


def _check_refine(z, noise, ipr_config: IPRConfig, verify_fn, cell_verify_fn) -> None:
  if noise.shape != z.shape:
    raise ValueError(f"noise must have shape {z.shape}, got {noise.shape}.")
  if ipr_config.immediate_stop and verify_fn is None:
    raise ValueError("immediate_stop=True needs a verify_fn.")
  if ipr_config.selection == "verifier" and cell_verify_fn is None:
    raise ValueError("selection='verifier' needs a cell_verify_fn (the task's per-cell rule "
                     "check); only MNIST Sudoku has one.")


def _refinement(denoise_fn, masked, mask, candidates, noise, keys, srm_unknown, *,
                patch_size, sampler_config, ipr_config, score_fn, verify_fn, cell_verify_fn,
                num_snapshots) -> _Refinement:
  """The schedules, keys and resampling counts of `_refine`, with its inputs."""
  batch, num_patches = candidates.shape
  clean = sampler_config.clean_schedule
  ipr_table = schedule_lib.schedule_table(num_patches, ipr_config.renoise_steps_per_patch,
                                          ipr_config.overlap, clean, ipr_config.renoise_time)
  proto_len = ipr_table.prototypes.shape[1]
  srm_sched = None
  if srm_unknown is not None:
    srm_table = schedule_lib.schedule_table(
        num_patches, sampler_config.steps_per_patch, sampler_config.overlap, clean)
    proto_len = max(proto_len, srm_table.prototypes.shape[1])
    srm_sched = _lookup_schedule(srm_table, jnp.sum(srm_unknown, axis=1), proto_len)
  return _Refinement(
      denoise_fn=denoise_fn, masked=masked, mask=mask, candidates=candidates, noise=noise,
      srm_unknown=srm_unknown, srm_sched=srm_sched,
      iteration_keys=_fold(keys, _IPR_STREAM), query_keys=_fold(keys, _QUERY_STREAM),
      counts=jnp.asarray(resample_counts(ipr_config, num_patches)), ipr_table=ipr_table,
      proto_len=proto_len, patch_size=patch_size, sampler_config=sampler_config,
      ipr_config=ipr_config, score_fn=score_fn, verify_fn=verify_fn,
      cell_verify_fn=cell_verify_fn, num_snapshots=min(int(num_snapshots), batch))


def _query(run: _Refinement, z, index, active) -> tuple[jax.Array, jax.Array]:
  """The uncertainty query of z `[B, H, W, d]` (keys: fold_in of `index`): (cells `[B, N]`, the
  passes it costs `[B]`, 0 for inactive puzzles)."""
  cfg = run.ipr_config
  cells = uncertainty_query(
      run.denoise_fn, z, run.candidates, _fold(run.query_keys, index),
      patch_size=run.patch_size, groups=cfg.uncertainty_groups, score=cfg.uncertainty_score)
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
    best = _mean_over(cells, run.candidates)
  return _RefineCarry(
      z=z, nfe=nfe, stopped=stopped, stop_budget=jnp.where(stopped, 0, -1).astype(jnp.int32),
      initial_order=jnp.full((batch, num_patches), -1, jnp.int32), cells=cells, z_best=z,
      best=best)


def _iteration_start(run: _Refinement, carry: _RefineCarry, j, keys, active):
  """What iteration j regenerates, from where: (chosen `[B, N]` (the re-noised patches; none in
  the SRM pass), waiting `[B, N]` (the patches to generate), z_start `[B, H, W, d]`, the
  schedule, the waiting patches' start time `[B]` or None (t = 1))."""
  cfg = run.ipr_config
  batch = run.candidates.shape[0]
  ipr_iteration = j if run.with_srm else j + 1  # 1-based; 0 is the SRM pass
  num_candidates = jnp.sum(run.candidates, axis=1)
  k = jnp.minimum(run.counts[ipr_iteration][num_candidates], num_candidates)
  chosen = SELECTORS[cfg.selection](keys[:, 0], run.candidates, k, z=carry.z, cells=carry.cells,
                                    ipr_config=cfg, cell_verify_fn=run.cell_verify_fn)
  chosen = chosen & active[:, None]
  z_start = _renoise(carry.z, chosen, keys[:, 1], run.noise, run.masked, run.mask,
                     patch_size=run.patch_size, noise_type=cfg.noise_type,
                     renoise_time=cfg.renoise_time)
  sched = _lookup_schedule(run.ipr_table, jnp.sum(chosen, axis=1), run.proto_len)
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
  # With return_iterate='last' the last iterate is never ranked: skip its query.
  needed = True if run.confident else j < run.num_iterations - 1
  batch = run.candidates.shape[0]
  cells, cost = jax.lax.cond(
      needed, lambda: _query(run, carry.z, j + 1, active),
      lambda: (jnp.full_like(carry.cells, jnp.nan), jnp.zeros([batch], jnp.int32)))
  uncertainty = _mean_over(cells, run.candidates)
  carry = carry.replace(cells=cells, nfe=carry.nfe + cost)
  if run.confident:  # Keep the iterate with the lowest mean score so far.
    better = active & (uncertainty < carry.best)
    carry = carry.replace(z_best=jnp.where(better[:, None, None, None], carry.z, carry.z_best),
                          best=jnp.where(better, uncertainty, carry.best))
  return carry, uncertainty


def _immediate_stop(run: _Refinement, carry: _RefineCarry, j, active) -> _RefineCarry:
  """Freezes the active puzzles that `verify_fn` accepts after iteration j (at budget j, or
  j + 1 without the SRM pass); their accepted iterate is the one returned."""
  accepted = active & run.verify_fn(carry.z).astype(bool)
  carry = carry.replace(
      stop_budget=jnp.where(accepted, j if run.with_srm else j + 1, carry.stop_budget),
      stopped=carry.stopped | accepted)
  if run.confident:  # The verifier's choice overrides the model's.
    carry = carry.replace(z_best=jnp.where(accepted[:, None, None, None], carry.z, carry.z_best))
  return carry


def _iteration(run: _Refinement, carry: _RefineCarry, j):
  """Iteration j of the scan (the SRM pass when j = 0 with it): select, re-noise, regenerate
  with the greedy loop, query, stop. Outputs: (scores, nfe, chosen, snapshots, scores of the
  last iterate (confident) or None, mean uncertainty or None)."""
  # [B, 3]: resampling, re-noising and greedy-step keys of this iteration.
  keys = jax.vmap(lambda k: jax.random.split(k, 3))(_fold(run.iteration_keys, j))
  active = ~carry.stopped
  chosen, waiting, z_start, sched, start_time = _iteration_start(run, carry, j, keys, active)
  config = run.sampler_config
  out = _greedy(run.denoise_fn, z_start, run.masked, run.mask, waiting, keys[:, 2], sched,
                patch_size=run.patch_size, stochasticity=config.stochasticity,
                temperature=config.temperature, clamp_noise=config.clamp_noise,
                start_time=start_time)
  carry = carry.replace(z=jnp.where(active[:, None, None, None], out.z, carry.z),
                        nfe=carry.nfe + out.nfe)
  if run.with_srm:
    carry = carry.replace(initial_order=jnp.where(j == 0, out.order, carry.initial_order))
  carry, uncertainty = _query_and_track(run, carry, j, active)
  if run.ipr_config.immediate_stop:
    carry = _immediate_stop(run, carry, j, active)
  returned = carry.z_best if run.confident else carry.z
  return carry, (_scores(run.score_fn, returned), carry.nfe, chosen,
                 returned[:run.num_snapshots],
                 _scores(run.score_fn, carry.z) if run.confident else None, uncertainty)


def _result(run: _Refinement, first: _RefineCarry, last: _RefineCarry, outputs) -> IPRResult:
  """The IPRResult of the scan's final carry and stacked outputs (`first`: the initial carry)."""
  scores, nfes, resampled, snapshots, last_scores, uncertainty = outputs
  if run.with_srm:
    resampled = resampled[1:]
  else:  # Budget 0 is the input itself.
    def with_budget0(budget0, rest):
      return jnp.concatenate([budget0[None], rest], axis=0)
    scores = jax.tree.map(with_budget0, _scores(run.score_fn, first.z), scores)
    nfes = with_budget0(first.nfe, nfes)
    snapshots = with_budget0(first.z[:run.num_snapshots], snapshots)
    if run.confident:
      last_scores = jax.tree.map(with_budget0, _scores(run.score_fn, first.z), last_scores)
    if run.ipr_config.queries_uncertainty:  # The input's query, made before the scan.
      uncertainty = with_budget0(first.best, uncertainty)
  return IPRResult(z=last.z_best if run.confident else last.z, scores=scores, nfe=last.nfe,
                   nfe_per_budget=nfes, stop_budget=last.stop_budget, resampled=resampled,
                   initial_order=last.initial_order,
                   snapshots=snapshots if run.num_snapshots else None,
                   last_scores=last_scores, uncertainty=uncertainty)


def _refine(denoise_fn: DenoiseFn, z, masked, mask, candidates, noise, keys, *,
            srm_unknown: Optional[jax.Array], patch_size: int,
            sampler_config: SamplerConfig, ipr_config: IPRConfig,
            score_fn: Optional[ScoreFn], verify_fn: Optional[VerifyFn],
            cell_verify_fn: Optional[CellVerifyFn], num_snapshots: int) -> IPRResult:
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
  run = _refinement(denoise_fn, masked, mask, candidates, noise, keys, srm_unknown,
                    patch_size=patch_size, sampler_config=sampler_config,
                    ipr_config=ipr_config, score_fn=score_fn, verify_fn=verify_fn,
                    cell_verify_fn=cell_verify_fn, num_snapshots=num_snapshots)
  first = _initial_carry(run, z.astype(jnp.float32))
  last, outputs = jax.lax.scan(lambda carry, j: _iteration(run, carry, j), first,
                               jnp.arange(run.num_iterations, dtype=jnp.int32))
  return _result(run, first, last, outputs)


def ipr_refine(denoise_fn: DenoiseFn, z: jax.Array, masked: Optional[jax.Array],
               mask: Optional[jax.Array], candidates: jax.Array,
               noise: jax.Array, keys: jax.Array, *, patch_size: int,
               sampler_config: SamplerConfig, ipr_config: IPRConfig,
               score_fn: Optional[ScoreFn] = None,
               verify_fn: Optional[VerifyFn] = None,
               cell_verify_fn: Optional[CellVerifyFn] = None,
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
    cell_verify_fn: z -> [B, N] bool patches that break the rules, for
      selection='verifier' (static).
    num_snapshots: keep the samples of the first this many puzzles at every budget.

  Returns:
    IPRResult (initial_order all -1).
  """
  _check_inputs(z, masked, mask, candidates, keys, patch_size)
  return _refine(denoise_fn, z, masked, mask, candidates, noise, keys,
                 srm_unknown=None, patch_size=patch_size,
                 sampler_config=sampler_config, ipr_config=ipr_config,
                 score_fn=score_fn, verify_fn=verify_fn,
                 cell_verify_fn=cell_verify_fn, num_snapshots=num_snapshots)


def srm_ipr(denoise_fn: DenoiseFn, keys: jax.Array, *, image: Optional[jax.Array],
            mask: Optional[jax.Array] = None, noise: Optional[jax.Array] = None,
            patch_size: int, sampler_config: SamplerConfig,
            ipr_config: IPRConfig, score_fn: Optional[ScoreFn] = None,
            verify_fn: Optional[VerifyFn] = None,
            cell_verify_fn: Optional[CellVerifyFn] = None,
            num_snapshots: int = 0) -> IPRResult:
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
    cell_verify_fn: z -> [B, N] bool rule-breaking patches, for
      selection='verifier'.
    num_snapshots: samples of the first puzzles kept at every budget.

  Returns:
    IPRResult (nfe counts the SRM pass too).
  """
  reference = image if image is not None else noise
  if reference is None:
    raise ValueError("srm_ipr needs image or noise to know the sample shape.")
  _check_keys(keys, reference.shape[0])
  grid = patch_grid(reference.shape, patch_size)
  patches_shape = (reference.shape[0], grid[0] * grid[1])  # [B, N]
  if noise is None:
    noise = jax.vmap(lambda k: jax.random.normal(k, reference.shape[1:], jnp.float32))(
        _fold(keys, _NOISE_STREAM))
  common = dict(patch_size=patch_size, sampler_config=sampler_config,
                ipr_config=ipr_config, score_fn=score_fn, verify_fn=verify_fn,
                cell_verify_fn=cell_verify_fn, num_snapshots=num_snapshots)
  if ipr_config.mode == "correction":
    z = _corrupted(keys, image, patch_size, ipr_config.num_corruption_swaps)
    return _refine(denoise_fn, z, None, None, jnp.ones(patches_shape, bool), noise, keys,
                   srm_unknown=None, **common)
  z, masked, mask, unknown = _srm_start(image, mask, noise, patch_size, patches_shape)
  _check_inputs(z, masked, mask, unknown, keys, patch_size)
  return _refine(denoise_fn, z, masked, mask, unknown, noise, keys,
                 srm_unknown=unknown, **common)


def _corrupted(keys, image, patch_size: int, num_swaps: int) -> jax.Array:
  """Correction mode's start: the solved grids `image` [B, H, W, d] corrupted by cell swaps."""
  if image is None:
    raise ValueError("correction mode needs the solved image, got image=None.")
  return jax.vmap(corrupt_by_swaps, in_axes=(0, 0, None, None))(
      _fold(keys, _CORRUPT_STREAM), image.astype(jnp.float32), patch_size, num_swaps)


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
