"""Which patches an IPR iteration re-noises: the resampling counts, random and ranked subsets, the
model's uncertainty query, and the selection strategies (`SELECTORS`).

IPR variants beyond the paper (see `ipr_jax.sampling.ipr`): selection='uncertainty' draws by
Gumbel top-k of the standardised `uncertainty_query` scores, selection='verifier' draws the
patches that the task's `cell_verify_fn` flags first.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.noise import flow
from ipr_jax.sampling.config import (
    DenoiseFn,
    IPRConfig,
    SELECTIONS,
    UNCERTAINTY_SCORES,
    check_ratio,
)
from ipr_jax.sampling.patches import patch_grid, patch_mean, patch_pixel_mask


def num_resampled_table(num_patches: int, ratio: float) -> np.ndarray:
  """k = max(1, int(c * ratio)) for c = 0..N candidates (Python float arithmetic)."""
  check_ratio(ratio)
  return np.array([max(1, int(c * ratio)) for c in range(num_patches + 1)], np.int32)


def resample_counts(ipr_config: IPRConfig, num_patches: int) -> np.ndarray:
  """`[budget + 1, N + 1]` int32: row i holds k for c = 0..N candidates at IPR iteration i.

  Row i uses `ipr_config.ratio_at(i)`; row 0 (the SRM pass, which re-noises nothing) repeats
  row 1. k is not yet capped at c (the sampler takes min(k, c)).
  """
  iterations = range(1, max(ipr_config.budget, 1) + 1)
  rows = [num_resampled_table(num_patches, ipr_config.ratio_at(i)) for i in iterations]
  return np.stack(rows[:1] + rows[: ipr_config.budget])


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
  check_ratio(ratio)
  num_patches = candidates.shape[-1]
  count = jnp.sum(candidates)
  k = jnp.minimum(jnp.asarray(num_resampled_table(num_patches, ratio))[count], count)
  return random_subset(key, candidates, k)


def random_subset(key: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
  """`[N]` bool: min(k, |candidates|) candidates drawn uniformly without replacement."""
  scores = jnp.where(candidates, jax.random.uniform(key, candidates.shape[-1:]), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores))
  return (ranks < k) & candidates


def ranked_subset(
    key: jax.Array, candidates: jax.Array, priority: jax.Array, k: jax.Array
) -> jax.Array:
  """`[N]` bool: min(k, |candidates|) candidates by Gumbel top-k of the logits `priority` [N].

  A draw without replacement in which a patch is picked with probability proportional to
  exp(priority) among those left; equal priorities give a uniform subset.
  """
  noisy = priority + jax.random.gumbel(key, priority.shape, jnp.float32)
  ranks = jnp.argsort(jnp.argsort(jnp.where(candidates, -noisy, jnp.inf)))
  return (ranks < k) & candidates


def mean_over(values: jax.Array, candidates: jax.Array) -> jax.Array:
  """`[B]` mean of `values` [B, N] over each puzzle's candidates (0 without candidates)."""
  count = jnp.maximum(jnp.sum(candidates, axis=1), 1)
  return jnp.sum(jnp.where(candidates, values, 0.0), axis=1) / count


def iterate_score(cells: jax.Array, candidates: jax.Array, query_cells: str) -> jax.Array:
  """`[B]` an iterate's mean query score from its patch scores `cells` [B, N] (`IPRConfig.
  query_cells`): the mean over the candidates ('candidates'), over every patch ('all'), or
  the mean of the two means over the given patches and over the candidates ('balanced', so
  that the few given cells weigh as much as the generated ones; the candidates' mean alone
  where nothing is given)."""
  if query_cells == "candidates":
    return mean_over(cells, candidates)
  if query_cells == "all":
    return jnp.mean(cells, axis=1)
  given = ~candidates
  balanced = 0.5 * (mean_over(cells, given) + mean_over(cells, candidates))
  return jnp.where(jnp.any(given, axis=1), balanced, mean_over(cells, candidates))


def standardized(scores: jax.Array, candidates: jax.Array) -> jax.Array:
  """Scores `[B, N]` shifted and scaled to mean 0, std 1 over each puzzle's candidates."""
  centred = scores - mean_over(scores, candidates)[:, None]
  std = jnp.sqrt(mean_over(centred**2, candidates))[:, None]
  return jnp.where(candidates, centred / (std + 1e-6), 0.0)


def uncertainty_query(
    denoise_fn: DenoiseFn,
    z: jax.Array,
    candidates: jax.Array,
    keys: jax.Array,
    *,
    patch_size: int,
    groups: int,
    score: str = "nll",
) -> jax.Array:
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
      (groups * batch,) + x.shape[1:]
  )
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


def select_uncertainty(keys, candidates, k, *, z, cells, ipr_config, cell_verify_fn) -> jax.Array:
  """'uncertainty': Gumbel top-k of the standardised query scores at selection_temperature."""
  del z, cell_verify_fn
  priority = standardized(cells, candidates) / ipr_config.selection_temperature
  return jax.vmap(ranked_subset)(keys, candidates, priority, k)


def select_verifier(keys, candidates, k, *, z, cells, ipr_config, cell_verify_fn) -> jax.Array:
  """'verifier': the cells `cell_verify_fn` flags first, uniformly among them; then the rest."""
  del cells, ipr_config
  priority = jnp.where(cell_verify_fn(z).astype(bool), 1e4, 0.0)
  return jax.vmap(ranked_subset)(keys, candidates, priority, k)


SELECTORS = {
    "random": select_random,
    "uncertainty": select_uncertainty,
    "verifier": select_verifier,
}
assert tuple(SELECTORS) == SELECTIONS
