"""The sampler's settings (SamplerConfig of SRM, IPRConfig of IPR) and the function types it
takes."""

import dataclasses
from typing import Any, Callable, Mapping

import jax

from ipr_jax.noise import flows

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
QUERY_CELLS = ("candidates", "all", "balanced")
CHAIN_CHOICES = ("every_budget", "final_budget")
# The SRM sampler family (`ipr_jax.noise.schedule.SCHEDULES`): the block schedules, then the
# SRM authors' framework's time-map schedules (`ipr_jax.sampling.time_maps`).
BLOCK_SCHEDULES = ("adaptive", "fixed", "random_sequential", "graph_sequential")
TIME_MAP_SCHEDULES = ("raster", "adaptive_inverse", "adaptive_softmax", "mask_git")
SCHEDULES = BLOCK_SCHEDULES + TIME_MAP_SCHEDULES


def _coerce(config, **types) -> None:
  """Casts config fields (e.g. ml_collections floats) so configs hash equal."""
  for name, kind in types.items():
    value = getattr(config, name)
    cast = kind(value)
    if kind is int and cast != value:
      raise ValueError(f"{name} must be an integer, got {value!r}.")
    object.__setattr__(config, name, cast)


def _field(default, doc: str, section: bool = True):
  """A dataclass field with its documentation (`field_docs`; config_base's sampler and ipr
  sections). section=False: a field set from elsewhere in the run config, not one of the
  section's (left out of `defaults` and `field_docs`)."""
  return dataclasses.field(default=default, metadata={"doc": doc, "section": section})


class _DocumentedFields:
  """`defaults()` and `field_docs()` of a dataclass whose fields are made by `_field`."""

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """{field name: default} of the section's fields, in field order (what the config section
    starts from)."""
    return {field.name: field.default for field in _section_fields(cls)}

  @classmethod
  def field_docs(cls) -> dict[str, str]:
    """{field name: documentation} of the section's fields, in field order."""
    return {field.name: field.metadata["doc"] for field in _section_fields(cls)}


def _section_fields(cls) -> list[dataclasses.Field]:
  return [field for field in dataclasses.fields(cls) if field.metadata["section"]]


@dataclasses.dataclass(frozen=True)
class SamplerConfig(_DocumentedFields):
  """Options of the SRM greedy sampler: the one definition of its fields, defaults (the
  reference's ms_hard_test values, spec §4.4) and documentation (`field_docs()`).

  `config.sampler` of the project configs is made from these fields
  (`config_base.sampler_section`); configs/<task>.py override what is task-specific (Even
  Pixels and Counting Polygons: 30 and 10 steps per patch at overlap 0.9).
  """

  steps_per_patch: int = _field(3, "Denoising steps each patch takes from t = 1 to t = 0.")
  overlap: float = _field(
      0.0, "Fraction of a patch's steps shared with the next patch's, in " "[0, 1)."
  )
  stochasticity: float = _field(0.5, "alpha of the reverse kernel, in [0, 1].")
  temperature: float = _field(1.0, "tau: scales the reverse kernel's standard deviation, > 0.")
  top_k: int = _field(
      1,
      "Patches the adaptive schedule selects at once (lowest sigma first), "
      ">= 1; ceil(n / top_k) blocks.",
  )
  clean_schedule: bool = _field(
      False,
      "False: the reference's float32 schedule arithmetic (spec "
      "§4.3); True: exact arithmetic (a deliberate deviation).",
  )
  clamp_noise: bool = _field(
      True,
      "Add the reference's ~3e-7 clamp noise wherever t_next > 0 "
      "(spec §2.3, §4.4); False: none.",
  )
  schedule: str = _field(
      "adaptive",
      "SRM schedule (`SCHEDULES`): 'adaptive' (next patches = lowest predicted "
      "uncertainty, top_k at a time), 'fixed' (every unknown patch on one shared ramp), "
      "'random_sequential' (one patch at a time in random order), 'graph_sequential' (next "
      "patch = most certain by its known neighbours in the task's dependency graph); the SRM "
      "authors' framework's time maps: 'raster' (patches in index order, steps_per_patch "
      "levels each), 'adaptive_inverse' / 'adaptive_softmax' (every patch's step set by the "
      "model's sigma, max_steps steps), 'mask_git' (num_groups random groups, steps_per_patch "
      "levels per group).",
  )
  max_steps: int = _field(
      0,
      "Total steps of the SRM pass (the SRM reference samplers' max_steps, e.g. 1000); 0: "
      "derived from steps_per_patch and overlap, every schedule then taking the adaptive "
      "schedule's passes (adaptive_inverse / adaptive_softmax: per puzzle, for its patch "
      "count).",
  )
  max_order: int = _field(
      1,
      "graph_sequential: hops over which known patches' certainty "
      "spreads (>= 0; 0 is random_sequential).",
  )
  certainty_decay: float = _field(0.5, "graph_sequential: certainty weight per hop, in (0, 1).")
  num_groups: int = _field(
      4, "mask_git: groups of patches revealed one after another (cosine group sizes), >= 1."
  )
  adaptive_alpha: float = _field(
      1.0,
      "adaptive_inverse / adaptive_softmax: alpha of sigma_small in their divergence D (the "
      "framework's AdaptiveCfg.alpha), in (0, 1].",
  )
  divergence_threshold: float = _field(
      0.0,
      "adaptive_inverse: every patch steps to this divergence D, >= 0; 0: the framework's "
      "default, the largest D of the step (1 - 1/(steps left)) t.",
  )
  softmax_scale: float = _field(
      0.1, "adaptive_softmax: weight of D in the softmax over the patches' next times, > 0."
  )
  flow: str = _field(
      "rectified",
      "The flow the denoiser was trained with (`ipr_jax.noise.flows.FLOW_NAMES`), which every "
      "pass's reverse kernel, IPR's re-noising and the query's x_hat follow: the run's "
      "top-level config.flow (`evaluation.settings.sampler_configs`), not a config.sampler field.",
      section=False,
  )

  def __post_init__(self):
    flows.make_flow(self.flow)  # ValueError naming an unknown flow
    _coerce(
        self,
        steps_per_patch=int,
        overlap=float,
        stochasticity=float,
        temperature=float,
        top_k=int,
        max_steps=int,
        max_order=int,
        certainty_decay=float,
        num_groups=int,
        adaptive_alpha=float,
        divergence_threshold=float,
        softmax_scale=float,
    )
    check_schedule_fields(self)
    if self.max_steps < 0:
      raise ValueError(f"max_steps must be a non-negative integer, got {self.max_steps!r}.")
    if self.steps_per_patch < 1:
      raise ValueError(f"steps_per_patch must be a positive integer, got {self.steps_per_patch!r}.")
    if not 0.0 <= self.overlap < 1.0:
      raise ValueError(f"overlap must lie in [0, 1), got {self.overlap!r}.")
    if not 0.0 <= self.stochasticity <= 1.0:
      raise ValueError(f"stochasticity must lie in [0, 1], got {self.stochasticity!r}.")
    if not self.temperature > 0.0:
      raise ValueError(f"temperature must be positive, got {self.temperature!r}.")

  @property
  def noise_flow(self) -> flows.Flow:
    """The `flows.Flow` of `flow`."""
    return flows.make_flow(self.flow)


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
  steps_per_patch: int = _field(
      10, "Denoising steps per re-noised patch (the regeneration " "schedule)."
  )
  overlap: float = _field(
      0.8,
      "Block overlap of the re-noised patches' schedule, in [0, 1) "
      "(reference ms_hard_test: 0.8; ep_test and cp_test: 0.9, set by their "
      "configs).",
  )
  resampling_ratio: float = _field(
      0.25,
      "Fraction of candidate patches re-noised per iteration, in (0, 1]; "
      "k = max(1, floor(ratio * number of candidates)).",
  )
  noise_type: str = _field(
      "random", "'random': fresh noise; 'fixed': the initial noise of the " "patch (ablation)."
  )
  mode: str = _field(
      "standard",
      "'standard' (SRM pass, then refine) or 'correction' (refine a "
      "solved grid corrupted by random cell swaps; every cell becomes free; no SRM "
      "pass).",
  )
  num_corruption_swaps: int = _field(
      5, "Cell swaps K that corrupt a solution in 'correction' " "mode."
  )
  immediate_stop: bool = _field(
      False,
      "Stop refining a puzzle once the task check (`verify_fn`) " "accepts it (reference: False).",
  )
  # Variants beyond the paper (module docstring; experiments/README.md compares them). Their
  # defaults are the paper's.
  selection: str = _field(
      "random",
      "Patches to re-noise (`SELECTIONS`): 'random' (the paper's), 'uncertainty' (the "
      "model's own uncertainty query, Gumbel top-k; costs uncertainty_groups passes per "
      "iteration) or 'verifier' (cells that `cell_verify_fn` flags first: on MNIST Sudoku those "
      "in a broken row, column or box as classified; uses the task's verifier: a reference).",
  )
  uncertainty_score: str = _field(
      "nll",
      "What the uncertainty query scores per patch: 'nll' (negative log-likelihood of its "
      "current content under the model's prediction from the other patches) or 'sigma' (the "
      "predicted log sigma alone).",
  )
  uncertainty_groups: int = _field(
      4,
      "G, denoiser passes per uncertainty query: the candidates are split into G random "
      "groups, each re-noised to t = 1 in one pass.",
  )
  selection_temperature: float = _field(
      0.5,
      "Gumbel temperature of the uncertainty-guided draw over the standardised scores, > 0 "
      "(smaller: greedier).",
  )
  renoise_time: float = _field(
      1.0,
      "t0 in (0, 1]: re-noised patches go to z_t0 = (1 - t0) x + t0 eps (another flow's "
      "a(t0) x + b(t0) eps) and are regenerated from t0 with round(steps_per_patch * t0) steps "
      "per patch (1: the paper's full re-noising).",
  )
  ratio_schedule: str = _field(
      "constant",
      "'constant' (the paper's) or 'linear': the ratio of IPR iteration i goes "
      "linearly from resampling_ratio (i = 1) to final_resampling_ratio (i >= "
      "ratio_decay_iterations).",
  )
  final_resampling_ratio: float = _field(
      0.125,
      "The ratio the 'linear' schedule reaches at iteration ratio_decay_iterations and "
      "keeps, in (0, 1].",
  )
  ratio_decay_iterations: int = _field(
      10, "Iterations over which the 'linear' ratio schedule " "moves."
  )
  return_iterate: str = _field(
      "last",
      "'last' (the paper's) or 'confident': the iterate (SRM sample included) with the "
      "lowest mean uncertainty score so far.",
  )
  schedule: str = _field(
      "adaptive",
      "Schedule of the regeneration of the re-noised patches (as sampler.schedule; "
      "every other patch is known context): 'adaptive' (the paper's), 'fixed', "
      "'random_sequential', 'graph_sequential', or a time map: 'raster', 'mask_git' "
      "(steps_per_patch levels per patch / group), 'adaptive_inverse', 'adaptive_softmax' "
      "(the adaptive schedule's passes for the re-noised patch count).",
  )
  top_k: int = _field(1, "Re-noised patches the adaptive regeneration selects at once, >= 1.")
  max_order: int = _field(1, "graph_sequential regeneration: hops of certainty propagation.")
  certainty_decay: float = _field(
      0.5, "graph_sequential regeneration: certainty weight per hop, " "in (0, 1)."
  )
  num_groups: int = _field(
      4, "mask_git regeneration: groups of re-noised patches revealed one after another, >= 1."
  )
  adaptive_alpha: float = _field(
      1.0,
      "adaptive_inverse / adaptive_softmax regeneration: alpha of sigma_small in their "
      "divergence D (the framework's AdaptiveCfg.alpha), in (0, 1].",
  )
  divergence_threshold: float = _field(
      0.0,
      "adaptive_inverse: every patch steps to this divergence D, >= 0; 0: the framework's "
      "default, the largest D of the step (1 - 1/(steps left)) t.",
  )
  softmax_scale: float = _field(
      0.1, "adaptive_softmax: weight of D in the softmax over the patches' next times, > 0."
  )
  query_cells: str = _field(
      "candidates",
      "Patches the uncertainty query scores and an iterate's score averages: 'candidates' "
      "(those IPR may re-noise), 'all' (the given patches too: how well the completion "
      "explains what was given) or 'balanced' (all scored; the mean over the given patches "
      "and the mean over the candidates weigh equally). Selection draws among the candidates "
      "either way.",
  )
  chains: int = _field(
      1,
      "Independent SRM + IPR chains per puzzle, run side by side in the batch (chain 0 is the "
      "single-chain run; the others draw their own noise and keys). With chains > 1 every "
      "iterate is queried (uncertainty_groups passes each) and the result after each budget is "
      "the chain whose returned iterate has the lowest mean query score; the passes of every "
      "chain are counted. Standard mode only; not with immediate_stop.",
  )
  choose_at: str = _field(
      "every_budget",
      "When chains > 1 choose: 'every_budget' (every iterate of every chain queried, the "
      "choice made after each budget) or 'final_budget' (only each chain's last iterate "
      "queried, once, after the final budget: uncertainty_groups passes per chain instead of "
      "uncertainty_groups (budget + 1); the rows of the earlier budgets report chain 0, with "
      "every chain's passes counted). 'final_budget' needs chains > 1, selection='random' and "
      "return_iterate='last' (the settings that read no earlier query).",
  )

  def __post_init__(self):
    _coerce(
        self,
        budget=int,
        steps_per_patch=int,
        overlap=float,
        resampling_ratio=float,
        num_corruption_swaps=int,
        uncertainty_groups=int,
        selection_temperature=float,
        renoise_time=float,
        final_resampling_ratio=float,
        ratio_decay_iterations=int,
        top_k=int,
        max_order=int,
        certainty_decay=float,
        num_groups=int,
        adaptive_alpha=float,
        divergence_threshold=float,
        softmax_scale=float,
        chains=int,
    )
    check_schedule_fields(self)
    if self.budget < 0:
      raise ValueError(f"budget must be a non-negative integer, got {self.budget!r}.")
    if self.steps_per_patch < 1:
      raise ValueError(f"steps_per_patch must be a positive integer, got {self.steps_per_patch!r}.")
    if not 0.0 <= self.overlap < 1.0:
      raise ValueError(f"overlap must lie in [0, 1), got {self.overlap!r}.")
    check_ratio(self.resampling_ratio)
    if self.noise_type not in NOISE_TYPES:
      raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {self.noise_type!r}.")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
    if self.num_corruption_swaps < 0:
      raise ValueError(
          "num_corruption_swaps must be a non-negative integer, "
          f"got {self.num_corruption_swaps!r}."
      )
    for name, allowed in (
        ("selection", SELECTIONS),
        ("uncertainty_score", UNCERTAINTY_SCORES),
        ("ratio_schedule", RATIO_SCHEDULES),
        ("return_iterate", RETURN_ITERATES),
        ("query_cells", QUERY_CELLS),
        ("choose_at", CHAIN_CHOICES),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
    if self.chains < 1:
      raise ValueError(f"chains must be a positive integer, got {self.chains!r}.")
    if self.chains > 1 and self.mode != "standard":
      raise ValueError(
          f"chains={self.chains} needs mode='standard' (chains start from their own SRM "
          f"samples), got mode={self.mode!r}."
      )
    if self.chains > 1 and self.immediate_stop:
      raise ValueError(
          f"chains={self.chains} cannot be combined with immediate_stop=True: the chain is "
          "chosen by the model's own score, not by the task's check."
      )
    if self.choose_at == "final_budget" and (
        self.chains < 2 or self.selection != "random" or self.return_iterate != "last"
    ):
      raise ValueError(
          "choose_at='final_budget' needs chains > 1, selection='random' and "
          f"return_iterate='last' (nothing else may read an earlier query), got chains="
          f"{self.chains}, selection={self.selection!r}, return_iterate={self.return_iterate!r}."
      )
    if self.uncertainty_groups < 1:
      raise ValueError(
          "uncertainty_groups must be a positive integer, " f"got {self.uncertainty_groups!r}."
      )
    if not self.selection_temperature > 0.0:
      raise ValueError(
          "selection_temperature must be positive, " f"got {self.selection_temperature!r}."
      )
    if not 0.0 < self.renoise_time <= 1.0:
      raise ValueError(f"renoise_time must lie in (0, 1], got {self.renoise_time!r}.")
    if not 0.0 < self.final_resampling_ratio <= 1.0:
      raise ValueError(
          "final_resampling_ratio must lie in (0, 1], " f"got {self.final_resampling_ratio!r}."
      )
    if self.ratio_decay_iterations < 1:
      raise ValueError(
          "ratio_decay_iterations must be a positive integer, "
          f"got {self.ratio_decay_iterations!r}."
      )

  @property
  def queries_uncertainty(self) -> bool:
    """Whether iterations run the uncertainty query (it costs denoiser passes)."""
    return self.selection == "uncertainty" or self.return_iterate == "confident" or self.chains > 1

  @property
  def chooses_every_budget(self) -> bool:
    """Whether chains > 1 choose after every budget (and so query every iterate)."""
    return self.chains > 1 and self.choose_at == "every_budget"

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


def check_schedule_fields(config) -> None:
  """Checks the schedule, top_k, max_order, certainty_decay fields and the time-map schedules'
  fields (num_groups, adaptive_alpha, divergence_threshold, softmax_scale) of a SamplerConfig or
  an IPRConfig."""
  if config.schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {config.schedule!r}.")
  if config.top_k < 1:
    raise ValueError(f"top_k must be a positive integer, got {config.top_k!r}.")
  if config.top_k != 1 and config.schedule != "adaptive":
    raise ValueError(
        f"top_k={config.top_k!r} needs schedule='adaptive'; schedule "
        f"{config.schedule!r} takes one patch per block (fixed: all at once)."
    )
  if config.max_order < 0:
    raise ValueError(f"max_order must be a non-negative integer, got {config.max_order!r}.")
  if not 0.0 < config.certainty_decay < 1.0:
    raise ValueError(f"certainty_decay must lie in (0, 1), got {config.certainty_decay!r}.")
  if config.num_groups < 1:
    raise ValueError(f"num_groups must be a positive integer, got {config.num_groups!r}.")
  if not 0.0 < config.adaptive_alpha <= 1.0:
    raise ValueError(f"adaptive_alpha must lie in (0, 1], got {config.adaptive_alpha!r}.")
  if not config.divergence_threshold >= 0.0:
    raise ValueError(
        f"divergence_threshold must be non-negative, got {config.divergence_threshold!r}."
    )
  if not config.softmax_scale > 0.0:
    raise ValueError(f"softmax_scale must be positive, got {config.softmax_scale!r}.")


def check_ratio(ratio: float) -> None:
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"resampling_ratio must lie in (0, 1], got {ratio!r}.")
