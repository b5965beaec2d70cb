"""SRM greedy sampler and Iterative Partial Refinement (IPR), batched (spec §4).

The package's modules, each importing only those above it:

  config.py      SamplerConfig, IPRConfig (the one source of IPR's defaults), the function types;
  patches.py     patch geometry, per-puzzle keys, correction mode's cell swaps;
  inputs.py      the records of the interface: `Denoiser` (the model: denoise function, patch
                 size, dependency matrix), `Puzzles` (keys, image, mask, noise), `Given`; the
                 fold_in tags of a puzzle key's streams;
  planning.py    patch orders planned before sampling (random_sequential, graph_sequential);
  greedy.py      the SRM greedy loop of the block schedules (`block_srm_sample`);
  time_maps.py   the framework's time-map schedules (raster, adaptive_inverse, adaptive_softmax,
                 mask_git): the next time map from the current one and sigma;
  time_map_sampler.py  their sampling loop (`srm_time_map_sample`);
  srm.py         `srm_sample`, the SRM pass of any schedule;
  query.py       the uncertainty query and an iterate's mean query score;
  selection.py   resampling counts and the selection strategies (`SELECTORS`);
  chains.py      several chains per puzzle: their keys and noise, the choice among them;
  refinement.py  IPR's scan over iterations (`refine`) and its result (`IPRResult`);
  ipr.py         the entry points `srm_ipr`, `ipr_refine` and `check_schedules`.

Their public names are imported here (`from ipr_jax import sampling; sampling.srm_ipr(...)`).
The entry points take the model, the puzzles and the settings as records:

  denoiser = sampling.Denoiser(denoise_fn, patch_size=4, dependency=task.dependency_matrix)
  puzzles = sampling.Puzzles(keys, image=image, mask=mask, noise=noise)
  result = sampling.srm_ipr(denoiser, puzzles, sampler_config, ipr_config)
  greedy = sampling.srm_sample(denoiser, puzzles, sampler_config)
  refined = sampling.ipr_refine(denoiser, puzzles, samples, sampler_config, ipr_config)

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
  the scan). It returns the iterate of every puzzle after every budget
  (`IPRResult.iterates`), which the caller scores (one run, the whole
  quality-vs-budget curve); it is never given a scorer or a solution, and a
  verifier only where a setting reads one (immediate_stop, selection='verifier').
  Usable under `jax.jit` and `jax.pmap` with the `Denoiser`, `verify_fn` and
  the configs static and the `Puzzles` arrays. `ipr_refine` runs IPR alone on
  given samples. An iteration's pieces (`refinement.py`): a selection strategy
  (`SELECTORS`, one signature), the re-noising (`renoise`), the greedy loop,
  the uncertainty query (`query.IterateQuery`) with the confident-iterate
  tracker and immediate_stop.

IPR variants beyond the paper (`IPRConfig`; the defaults are the paper's IPR): see `ipr.py`.
The greedy state and the time rows fed to the denoiser: see `greedy.py`.

Randomness is per puzzle: every random draw of puzzle b derives from `keys[b]`
only (via `fold_in` of the step / iteration), so a puzzle gives the same result
in any batch. Use `puzzle_keys(key, puzzle_ids)` to make the keys (`Puzzles.keys`).

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
* The SRM sampler family (`SamplerConfig.schedule`; `IPRConfig.schedule` for the regeneration):
  'adaptive' (the default, the IPR reference's; top_k >= 1 patches per block), 'fixed',
  'random_sequential' and 'graph_sequential' run through the same loop, a planned schedule
  selecting at each block start the patch `planning.sequential_order` planned for it (blocks
  with the same start together, as the reference's scheduling matrix; planning stops after
  max_steps blocks and the rest start at step 0); the adaptive schedule starts one block per
  step, as the reference's, and refuses settings that repeat its starts. Steps:
  `SamplerConfig.max_steps` > 0 is the SRM reference's max_steps (1000 in its configs); 0
  derives them from steps_per_patch, every schedule taking the adaptive schedule's passes.
  Deviations: the graph planning per puzzle (see planning.py); top_k > 1 records the patches
  of a block in index order (the reference: by sigma), which changes no sample.
"""

# pylint: disable=g-importing-member,unused-import
from ipr_jax.sampling.config import CellVerifyFn
from ipr_jax.sampling.config import DenoiseFn
from ipr_jax.sampling.config import IPRConfig
from ipr_jax.sampling.config import MODES
from ipr_jax.sampling.config import NOISE_TYPES
from ipr_jax.sampling.config import QUERY_CELLS
from ipr_jax.sampling.config import RATIO_SCHEDULES
from ipr_jax.sampling.config import RETURN_ITERATES
from ipr_jax.sampling.config import SamplerConfig
from ipr_jax.sampling.config import SCHEDULES
from ipr_jax.sampling.config import ScoreFn
from ipr_jax.sampling.config import SELECTIONS
from ipr_jax.sampling.config import UNCERTAINTY_SCORES
from ipr_jax.sampling.config import VerifyFn
from ipr_jax.sampling.greedy import GreedyResult
from ipr_jax.sampling.srm import srm_sample
from ipr_jax.sampling.inputs import Denoiser
from ipr_jax.sampling.inputs import Given
from ipr_jax.sampling.inputs import Puzzles
from ipr_jax.sampling.ipr import check_schedules
from ipr_jax.sampling.ipr import ipr_refine
from ipr_jax.sampling.ipr import srm_ipr
from ipr_jax.sampling.query import iterate_score
from ipr_jax.sampling.query import uncertainty_query
from ipr_jax.sampling.refinement import IPRResult
from ipr_jax.sampling.patches import corrupt_by_swaps
from ipr_jax.sampling.patches import patch_grid
from ipr_jax.sampling.patches import patch_mean
from ipr_jax.sampling.patches import patch_pixel_mask
from ipr_jax.sampling.patches import patches_to_pixels
from ipr_jax.sampling.patches import puzzle_keys
from ipr_jax.sampling.patches import unknown_patches
from ipr_jax.sampling.planning import sequential_order
from ipr_jax.sampling.planning import weighted_adjacency
from ipr_jax.sampling.selection import num_resampled_table
from ipr_jax.sampling.selection import random_subset
from ipr_jax.sampling.selection import ranked_subset
from ipr_jax.sampling.selection import resample_counts
from ipr_jax.sampling.selection import resample_mask
from ipr_jax.sampling.selection import select_random
from ipr_jax.sampling.selection import select_uncertainty
from ipr_jax.sampling.selection import select_verifier
from ipr_jax.sampling.selection import SELECTORS
from ipr_jax.sampling.selection import standardized

__all__ = (
    "CellVerifyFn",
    "DenoiseFn",
    "IPRConfig",
    "MODES",
    "NOISE_TYPES",
    "RATIO_SCHEDULES",
    "QUERY_CELLS",
    "RETURN_ITERATES",
    "SamplerConfig",
    "SCHEDULES",
    "ScoreFn",
    "SELECTIONS",
    "UNCERTAINTY_SCORES",
    "VerifyFn",
    "GreedyResult",
    "srm_sample",
    "Denoiser",
    "Given",
    "Puzzles",
    "sequential_order",
    "weighted_adjacency",
    "check_schedules",
    "ipr_refine",
    "IPRResult",
    "srm_ipr",
    "corrupt_by_swaps",
    "patch_grid",
    "patch_mean",
    "patch_pixel_mask",
    "patches_to_pixels",
    "puzzle_keys",
    "unknown_patches",
    "num_resampled_table",
    "random_subset",
    "ranked_subset",
    "resample_counts",
    "resample_mask",
    "select_random",
    "select_uncertainty",
    "select_verifier",
    "SELECTORS",
    "standardized",
    "iterate_score",
    "uncertainty_query",
)
