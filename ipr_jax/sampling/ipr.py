"""Iterative Partial Refinement (spec §4.5), batched: the entry points `srm_ipr` (the SRM pass, or
the correction-mode corruption, then IPR) and `ipr_refine` (IPR on given samples), and
`check_schedules`. Both prepare the inputs of one `lax.scan` over budgets (`refinement.py`) whose
iterations share the greedy loop of `ipr_jax.sampling.greedy`.

The interface is records: the model (`Denoiser`: denoise function, patch size, dependency
matrix; static), the puzzles (`Puzzles`: keys, image, mask, noise; arrays) and the settings
(`SamplerConfig`, `IPRConfig`; static); a verifier only as an explicitly named argument.

IPR variants beyond the paper (`IPRConfig`; the defaults are the paper's IPR and leave its
program, keys and samples unchanged, checked against runs stored before the variants existed):

* selection='uncertainty': after each pass, `uncertainty_query` (`query.py`) splits the
  candidate patches into G random groups and, in G denoiser passes (one call on a G x batch),
  scores each patch by the model's prediction of it from the others (the NLL of its current
  content, or log sigma); the next iteration draws its k patches by Gumbel top-k of the
  standardised scores at `selection_temperature`. Cost: G passes per iteration (and after the
  SRM pass).
* selection='verifier': patches that `cell_verify_fn` flags (Sudoku: cells in a broken row,
  column or box, as classified) first, uniformly among them, then uniformly among the rest. It
  uses the task's verifier: a reference, not a verifier-free method.
* renoise_time=t0 < 1: re-noised patches go to z_t0 = (1 - t0) z + t0 eps (the forward process)
  and are regenerated from t0 with round(steps_per_patch t0) steps per patch, the prototype
  scaled by t0.
* ratio_schedule='linear': the ratio of iteration i moves linearly from resampling_ratio to
  final_resampling_ratio over ratio_decay_iterations and then stays; k per iteration follows.
* return_iterate='confident': the returned sample after each budget is the iterate (SRM sample
  included) with the lowest mean query score so far; the last iterates are returned too.
* query_cells='all' | 'balanced': the query also scores the given patches, from the completion
  (an iterate's score: `query.iterate_score`).
* chains=K > 1: K independent SRM + IPR chains per puzzle in a batch of K x B (`chains.py`); each
  budget's result is the chain with the lowest mean query score (`IPRResult.chosen_chain`);
  passes are summed over chains. choose_at='final_budget' queries only the chains' last
  iterates and chooses once, after the final budget (chain 0 before it).

Verifier-free by construction: nothing here receives a task's scorer or a solution. The sampler
returns the iterate of every puzzle after every budget (`IPRResult.iterates`) and the caller
scores them afterwards (`ipr_jax.evaluation`). Only the two settings documented to read a
verifier are handed one, as an explicitly named argument: `verify_fn` for immediate_stop (the
reference's) and `cell_verify_fn` for selection='verifier'; a verifier handed to any other
setting is refused (`refinement.check_refine`), so no setting can read one by accident.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from ipr_jax.noise import schedule as schedule_lib
from ipr_jax.sampling import chains as chains_lib
from ipr_jax.sampling import refinement
from ipr_jax.sampling.config import CellVerifyFn, IPRConfig, SamplerConfig, VerifyFn
from ipr_jax.sampling.greedy import check_inputs, check_sampler_schedule, srm_start
from ipr_jax.sampling.inputs import (
    CORRUPTION_STREAM,
    Denoiser,
    Given,
    Puzzles,
    generated_patches,
    given_content,
    initial_noise,
)
from ipr_jax.sampling.patches import check_keys, corrupt_by_swaps, fold_keys
from ipr_jax.sampling.refinement import IPRResult, RefinementInputs
from ipr_jax.sampling.selection import resample_counts


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


def ipr_refine(
    denoiser: Denoiser,
    puzzles: Puzzles,
    samples: jax.Array,
    sampler_config: SamplerConfig,
    ipr_config: IPRConfig,
    *,
    candidates: Optional[jax.Array] = None,
    verify_fn: Optional[VerifyFn] = None,
    cell_verify_fn: Optional[CellVerifyFn] = None,
) -> IPRResult:
  """IPR iterations on a batch of given samples (spec §4.5).

  Each iteration, per puzzle: draw k = max(1, floor(ratio * |candidates|))
  patches uniformly among the candidates, replace them by fresh noise (or the
  initial noise, noise_type='fixed'), re-paste the given cells, and regenerate
  the k patches (every other patch is t = 0 context) with the greedy loop and
  the IPR schedule (ipr steps_per_patch, overlap; alpha, tau, clean_schedule,
  clamp_noise from `sampler_config`). `srm_ipr` runs the SRM pass first.

  Args:
    denoiser: the denoise function, patch size P and dependency matrix (graph_sequential
      only); static.
    puzzles: keys `[B]`; image `[B, H, W, C]` and mask `[B, H, W, 1]` (1 = free, 0 = given,
      re-pasted from (1 - mask) image; None: everything free); noise `[B, H, W, C]`, the initial
      noise of noise_type='fixed' (None: drawn from the keys, as `srm_ipr` draws it).
    samples: `[B, H, W, C]` the samples to refine (budget 0).
    sampler_config: SamplerConfig (static).
    ipr_config: IPRConfig (static).
    candidates: `[B, N]` bool patches that may be re-noised; None: the patches of the mask
      (`unknown_patches`), every patch without a mask.
    verify_fn: z -> [B] bool, only for immediate_stop (refused otherwise): a
      puzzle whose sample is accepted (already at budget 0) keeps it and spends
      no more passes (static).
    cell_verify_fn: z -> [B, N] bool patches that break the rules, only for
      selection='verifier' (refused otherwise; static).

  Returns:
    IPRResult (initial_order all -1).
  """
  check_keys(puzzles.keys, samples.shape[0])
  given = given_content(puzzles)
  if candidates is None:
    candidates = generated_patches(puzzles, denoiser.patch_size)
  check_inputs(samples, given, candidates, puzzles.keys, denoiser.patch_size)
  inputs = RefinementInputs(
      z=samples,
      given=given,
      candidates=candidates,
      noise=initial_noise(puzzles, samples.shape),
      keys=puzzles.keys,
  )
  return refinement.refine(
      denoiser,
      inputs,
      sampler_config,
      ipr_config,
      verify_fn=verify_fn,
      cell_verify_fn=cell_verify_fn,
  )


def srm_ipr(
    denoiser: Denoiser,
    puzzles: Puzzles,
    sampler_config: SamplerConfig,
    ipr_config: IPRConfig,
    *,
    verify_fn: Optional[VerifyFn] = None,
    cell_verify_fn: Optional[CellVerifyFn] = None,
) -> IPRResult:
  """Initial SRM pass (or correction-mode corruption) followed by IPR.

  standard mode (§4.2): masked = (1 - mask) image, z = masked + mask noise,
  the patches whose top-left mask pixel is > 0.5 are generated by SRM; IPR's
  candidates are those same patches (all patches without a mask).
  correction mode: `puzzles.image` is a solved grid; K random cell swaps corrupt it,
  every cell becomes free (no re-pasting; the mask is ignored), there is no
  SRM pass, and every patch is a candidate.

  The SRM pass and the IPR iterations share one compiled greedy loop (one
  scan over budgets 0..B), so the greedy loop's denoiser call is traced once;
  with the uncertainty query (`IPRConfig.queries_uncertainty`) the program
  holds a second trace of the denoiser, its call on a G x B batch. Usable under jit
  and pmap: the denoiser, verify_fn, cell_verify_fn and the configs are static,
  the puzzles are arrays. No scorer is given: the caller scores `IPRResult.iterates`.

  Args:
    denoiser: the denoise function (z [B, H, W, C], t [B, H, W, 1]) -> DenoiserOutput, the
      patch size P and the task's dependency matrix `[N, N]` (graph_sequential only, in the SRM
      pass or the regeneration).
    puzzles: keys `[B]` typed per-puzzle keys (see `puzzle_keys`); image `[B, H, W, C]` the
      given content (standard mode with a mask) or the solved grid (correction mode), None in
      standard mode without mask; mask `[B, H, W, 1]` 1 = generate, 0 = given (None = generate
      everything; ignored in correction mode); noise `[B, H, W, C]` the initial noise z_T (None:
      drawn from the keys). The image or the noise gives the sample shape.
    sampler_config: SamplerConfig of the SRM pass (alpha, tau, clean_schedule
      and clamp_noise are also used by IPR).
    ipr_config: IPRConfig.
    verify_fn: z -> [B] bool, only for immediate_stop (checked after SRM too;
      refused otherwise).
    cell_verify_fn: z -> [B, N] bool rule-breaking patches, only for
      selection='verifier' (refused otherwise).

  Returns:
    IPRResult (nfe counts the SRM pass too).
  """
  shape = puzzles.shape
  check_keys(puzzles.keys, shape[0])
  noise = initial_noise(puzzles)
  verifiers = dict(verify_fn=verify_fn, cell_verify_fn=cell_verify_fn)
  if ipr_config.mode == "correction":
    gh, gw = denoiser.grid(shape)
    z = _corrupted(puzzles, denoiser.patch_size, ipr_config.num_corruption_swaps)
    inputs = RefinementInputs(
        z=z,
        given=Given(),
        candidates=jnp.ones((shape[0], gh * gw), bool),
        noise=noise,
        keys=puzzles.keys,
    )
    return refinement.refine(denoiser, inputs, sampler_config, ipr_config, **verifiers)
  chains = ipr_config.chains
  if chains > 1:
    keys = chains_lib.chain_keys(puzzles.keys, chains)
    noise = chains_lib.chain_noise(noise, keys, chains)
    puzzles = Puzzles(
        keys=keys,
        image=chains_lib.tile(puzzles.image, chains),
        mask=chains_lib.tile(puzzles.mask, chains),
        noise=noise,
    )
  z, given, unknown = srm_start(puzzles.replace(noise=noise), denoiser.patch_size)
  check_inputs(z, given, unknown, puzzles.keys, denoiser.patch_size)
  inputs = RefinementInputs(
      z=z, given=given, candidates=unknown, noise=noise, keys=puzzles.keys, srm_unknown=unknown
  )
  result = refinement.refine(denoiser, inputs, sampler_config, ipr_config, **verifiers)
  if chains > 1:
    return chains_lib.choose_chains(result, ipr_config)
  return result


def _corrupted(puzzles: Puzzles, patch_size: int, num_swaps: int) -> jax.Array:
  """Correction mode's start: the solved grids `puzzles.image` [B, H, W, C] corrupted by cell
  swaps (keys: fold_in(key, CORRUPTION_STREAM))."""
  if puzzles.image is None:
    raise ValueError("correction mode needs the solved image, got image=None.")
  return jax.vmap(corrupt_by_swaps, in_axes=(0, 0, None, None))(
      fold_keys(puzzles.keys, CORRUPTION_STREAM),
      puzzles.image.astype(jnp.float32),
      patch_size,
      num_swaps,
  )
