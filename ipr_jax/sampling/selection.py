"""Which patches an IPR iteration re-noises: the resampling counts, random and ranked subsets, and
the selection strategies (`SELECTORS`).

IPR variants beyond the paper (see `ipr_jax.sampling.ipr`): selection='uncertainty' draws by
Gumbel top-k of the standardised scores of the uncertainty query (`query.py`),
selection='verifier' draws the patches that the task's `cell_verify_fn` flags first.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.sampling.config import IPRConfig, SELECTIONS, check_ratio
from ipr_jax.sampling.query import mean_over


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


def standardized(scores: jax.Array, candidates: jax.Array) -> jax.Array:
  """Scores `[B, N]` shifted and scaled to mean 0, std 1 over each puzzle's candidates."""
  centred = scores - mean_over(scores, candidates)[:, None]
  std = jnp.sqrt(mean_over(centred**2, candidates))[:, None]
  return jnp.where(candidates, centred / (std + 1e-6), 0.0)


# ----------------------------------------------------------------------------
# IPR's selection strategies: which patches an iteration re-noises.
#
# One signature, (keys [B], candidates [B, N], k [B], *, z, cells, ipr_config, cell_verify_fn)
# -> [B, N] bool the patches to re-noise (min(k, |candidates|) of each puzzle's candidates),
# looked up in `SELECTORS` by `IPRConfig.selection`. z `[B, H, W, C]` is the current iterate,
# cells `[B, N]` its uncertainty query's patch scores (zeros before the first query).


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
