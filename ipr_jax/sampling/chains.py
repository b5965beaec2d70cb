"""Several independent SRM + IPR chains per puzzle, and the choice among them by the model's own
score (`IPRConfig.chains`).

The K chains of a puzzle run side by side in the batch, puzzle-major: row b * K + c of the tiled
batch is chain c of puzzle b. Chain 0 keeps the puzzle's key and initial noise, so it is the
single-chain run; chain c > 0 draws its key from fold_in(fold_in(key, CHAIN_STREAM), c) and its
noise from fold_in(chain key, NOISE_STREAM) (CHAIN_STREAM = 5, NOISE_STREAM = 3: `inputs.py`).
After each budget the result of a puzzle is its chain with the lowest mean query score
(`query.py`; ties to the lowest chain): `IPRResult.chosen_chain`. With choose_at='final_budget'
only the last iterates are queried and chosen among; before the final budget the result is
chain 0, which is the single-chain run. Nothing here can read a task's
scores: the sampler never receives a scorer, and the choice reads only the query's scores.
"""

import jax
import jax.numpy as jnp

from ipr_jax.sampling.inputs import CHAIN_STREAM, NOISE_STREAM
from ipr_jax.sampling.patches import fold_keys


def chain_keys(keys: jax.Array, chains: int) -> jax.Array:
  """`[B * K]` typed keys, puzzle-major: chain 0 is `keys` [B] itself, chain c > 0
  fold_in(fold_in(key, CHAIN_STREAM), c)."""
  base = fold_keys(keys, CHAIN_STREAM)
  per_chain = [keys] + [fold_keys(base, c) for c in range(1, chains)]
  return jnp.stack(per_chain, axis=1).reshape(-1)


def tile(x, chains: int):
  """`[B, ...]` -> `[B * K, ...]`, each puzzle repeated K times in a row (None stays None)."""
  if x is None:
    return None
  return jnp.repeat(x, chains, axis=0)


def chain_noise(noise: jax.Array, tiled_keys: jax.Array, chains: int) -> jax.Array:
  """`[B * K, H, W, d]` initial noise: chain 0 the puzzle's `noise` [B, H, W, d], every other chain
  a standard normal draw from its own key (`tiled_keys` [B * K], of `chain_keys`)."""
  fresh = jax.vmap(lambda k: jax.random.normal(k, noise.shape[1:], jnp.float32))(
      fold_keys(tiled_keys, NOISE_STREAM)
  )
  first = (jnp.arange(tiled_keys.shape[0]) % chains == 0)[:, None, None, None]
  return jnp.where(first, tile(noise.astype(jnp.float32), chains), fresh)


def chain_scores(mean_query_score: jax.Array, confident: bool) -> jax.Array:
  """`[T, B * K]` the mean query score of each chain's returned iterate after each budget, from
  the mean score of its last iterate `mean_query_score` [T, B * K]: the running minimum when the
  chain returns its most confident iterate, else the last iterate's own."""
  return jax.lax.cummin(mean_query_score, axis=0) if confident else mean_query_score


def lowest_score_chain(scores: jax.Array, chains: int) -> jax.Array:
  """`[T, B]` int32: per budget and puzzle, the chain with the lowest score of `scores`
  [T, B * K] (NaN never wins; ties to the lowest chain)."""
  per_chain = scores.reshape(scores.shape[0], -1, chains)
  return jnp.argmin(jnp.where(jnp.isnan(per_chain), jnp.inf, per_chain), axis=-1).astype(jnp.int32)


def pick(x: jax.Array, chosen_chain: jax.Array, chains: int) -> jax.Array:
  """The chosen chains' entries of x `[T, B * K, ...]` by chosen_chain `[T, B]`: `[T, B, ...]`."""
  per_chain = x.reshape(x.shape[0], -1, chains, *x.shape[2:])
  index = chosen_chain.reshape(*chosen_chain.shape, 1, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(per_chain, index, axis=2)[:, :, 0]


def pick_final(x: jax.Array, chosen_chain: jax.Array, chains: int) -> jax.Array:
  """The chosen chains' entries of x `[B * K, ...]` by chosen_chain `[B]`: `[B, ...]`."""
  return pick(x[None], chosen_chain[None], chains)[0]


def total(x: jax.Array, chains: int) -> jax.Array:
  """`[..., B]` the sum over each puzzle's chains of x `[..., B * K]` (passes)."""
  return x.reshape(*x.shape[:-1], -1, chains).sum(axis=-1)


def choose_chains(result, ipr_config):
  """The `IPRResult` of B puzzles from `result`, that of their K = ipr_config.chains chains each:
  after each budget the chain with the lowest mean query score (its iterate, last iterate and
  query score; which chain: `chosen_chain` `[budget + 1, B]`; with choose_at='final_budget' after
  the final budget only, chain 0 before); the passes summed over the chains;
  the final sample and its records (stop budget, re-noised patches, SRM order) of the chain
  chosen after the last budget."""
  k = ipr_config.chains
  score = chain_scores(result.mean_query_score, ipr_config.return_iterate == "confident")
  chosen_chain = lowest_score_chain(score, k)  # [budget + 1, B]
  if not ipr_config.chooses_every_budget:  # No choice before the final budget: chain 0.
    chosen_chain = chosen_chain.at[:-1].set(0)
  per_budget = lambda x: pick(x, chosen_chain, k)
  final = lambda x: pick_final(x, chosen_chain[-1], k)
  last_iterates = None
  if result.last_iterates is not None:
    last_iterates = per_budget(result.last_iterates)
  return result.replace(
      z=final(result.z),
      iterates=per_budget(result.iterates),
      nfe=total(result.nfe, k),
      nfe_per_budget=total(result.nfe_per_budget, k),
      stop_budget=final(result.stop_budget),
      resampled=jax.vmap(final)(result.resampled),
      initial_order=final(result.initial_order),
      last_iterates=last_iterates,
      mean_query_score=per_budget(result.mean_query_score),
      chosen_chain=chosen_chain,
  )
