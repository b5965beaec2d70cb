"""The model's own uncertainty about the patches of a sample (the uncertainty query), an iterate's
mean query score, and the query as IPR's iterations run it (`IterateQuery`).

IPR queries an iterate where a setting reads the scores (`IPRConfig.queries_uncertainty`):
selection='uncertainty' draws the next re-noised patches by them (`selection.py`),
return_iterate='confident' keeps the iterate of lowest mean score, and chains > 1 choose the
chain of lowest mean score (`chains.py`). The query is given no scorer, solution or verifier: it
reads the denoiser only.
"""

import dataclasses

import jax
import jax.numpy as jnp

from ipr_jax.noise import flows
from ipr_jax.sampling.config import UNCERTAINTY_SCORES, IPRConfig
from ipr_jax.sampling.inputs import QUERY_STREAM, Denoiser
from ipr_jax.sampling.patches import fold_keys, patch_grid, patch_mean, patch_pixel_mask


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


def uncertainty_query(
    denoiser: Denoiser,
    z: jax.Array,
    candidates: jax.Array,
    keys: jax.Array,
    *,
    groups: int,
    score: str = "nll",
    noise_flow: flows.Flow = flows.RECTIFIED,
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
             to score (spec §3.3, at t = 1 x - x_hat = u_hat - u). Under another flow x_hat is
             that flow's (`Flow.x_from_output`) while sigma stays the std of the model's output
             in its parameterisation, so the two terms no longer share units.
  The G passes run as one denoiser call on a batch of G * B.

  Args:
    denoiser: the denoise function and patch size P (static).
    z: `[B, H, W, C]` current samples (given cells pasted).
    candidates: `[B, N]` bool patches to score.
    keys: `[B]` typed per-puzzle keys of this query.
    groups: G >= 1.
    score: 'nll' or 'sigma'.
    noise_flow: the flow the denoiser was trained with (`SamplerConfig.flow`).

  Returns:
    `[B, N]` float32 scores, higher = more uncertain; 0 on non-candidates.
  """
  if score not in UNCERTAINTY_SCORES:
    raise ValueError(f"score must be one of {UNCERTAINTY_SCORES}, got {score!r}.")
  patch_size = denoiser.patch_size
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
  t_query = noise_flow.adjust_time(pixels.astype(jnp.float32))
  out = denoiser.denoise_fn(z_query, t_query)
  sigma = out.sigma.astype(jnp.float32)
  per_patch = patch_mean(jnp.log(sigma), patch_size)
  if score == "nll":
    x_hat = noise_flow.x_from_output(out.u.astype(jnp.float32), z_query, t_query)
    per_patch = per_patch + 0.5 * patch_mean(((z_all - x_hat) / sigma) ** 2, patch_size)
  per_patch = per_patch.reshape(groups, batch, num_patches)
  own = jnp.take_along_axis(per_patch, group[None], axis=0)[0]
  return jnp.where(candidates, own, 0.0)


@dataclasses.dataclass(frozen=True)
class IterateQuery:
  """The uncertainty query of IPR's iterates: what it scores, with which keys and settings.

  Built once per trace (`iterate_query`); IPR's scan closes over it.

  Attributes:
    denoiser: the model queried.
    candidates: `[B, N]` bool the patches IPR may re-noise (an iterate's mean score is over them,
      or balanced against the given ones).
    scored: `[B, N]` bool the patches the query scores: the candidates, or every patch
      (`IPRConfig.query_cells` 'all' and 'balanced').
    keys: `[B]` typed query keys of the puzzles; query i folds in i.
    groups: G, denoiser passes per query (`IPRConfig.uncertainty_groups`).
    score: 'nll' or 'sigma' (`IPRConfig.uncertainty_score`).
    query_cells: `IPRConfig.query_cells`, how the mean score weighs the patches.
    noise_flow: the flow the denoiser was trained with (`SamplerConfig.flow`).
  """

  denoiser: Denoiser
  candidates: jax.Array
  scored: jax.Array
  keys: jax.Array
  groups: int
  score: str
  query_cells: str
  noise_flow: flows.Flow = flows.RECTIFIED

  def patch_scores(self, z: jax.Array, index, active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Query `index` (keys: fold_in of it) of z `[B, H, W, C]`: (patch scores `[B, N]`, the
    passes it costs `[B]` int32, 0 for the inactive puzzles of `active` `[B]`)."""
    cells = uncertainty_query(
        self.denoiser,
        z,
        self.scored,
        fold_keys(self.keys, index),
        groups=self.groups,
        score=self.score,
        noise_flow=self.noise_flow,
    )
    return cells, jnp.where(active, self.groups, 0).astype(jnp.int32)

  def mean_score(self, cells: jax.Array) -> jax.Array:
    """`[B]` an iterate's mean query score from its patch scores `cells` `[B, N]`
    (`iterate_score`)."""
    return iterate_score(cells, self.candidates, self.query_cells)


def iterate_query(
    denoiser: Denoiser,
    candidates: jax.Array,
    keys: jax.Array,
    ipr_config: IPRConfig,
    noise_flow: flows.Flow = flows.RECTIFIED,
) -> IterateQuery:
  """The query of IPR's iterates of puzzles with `candidates` `[B, N]` and puzzle keys `[B]`
  under `ipr_config` (query keys: fold_in(key, QUERY_STREAM)), of a denoiser trained with
  `noise_flow`."""
  scored = candidates if ipr_config.query_cells == "candidates" else jnp.ones_like(candidates)
  return IterateQuery(
      denoiser=denoiser,
      candidates=candidates,
      scored=scored,
      keys=fold_keys(keys, QUERY_STREAM),
      groups=ipr_config.uncertainty_groups,
      score=ipr_config.uncertainty_score,
      query_cells=ipr_config.query_cells,
      noise_flow=noise_flow,
  )
