"""Patch orders planned before sampling: the SRM reference's graph_sequential time scheduler
(`src/sampler/time_scheduler/graph_sequential.py` of Chrixtar/SRM), whose max_order 0 is its
random_sequential sampler.

Per puzzle, block by block: every patch has a knowledge value (1 for a known patch, 0 for one
still to generate); certainty is knowledge propagated over the task's dependency graph (for
Sudoku: row, column and box) up to `max_order` hops, each hop weighted by `certainty_decay`; the
next block takes, among the patches not yet planned, one of those whose certainty is within
`TIE_EPS` of the highest (ties broken at random); then every planned or known patch gains
1 - overlap of knowledge (at most 1) and the new one starts at 1 - overlap. Without propagation
(max_order 0) every unknown patch ties at every block: a uniformly random order. As in the
reference, planning stops after `max_blocks` blocks (its max_steps); the patches left unplanned
start at step 0 (`greedy.lookup_schedule`).

Deliberate deviations from the reference, which plans a whole batch at once:
* certainty is divided by each puzzle's own maximum (the reference: the batch's maximum, which
  moves the tie threshold of one puzzle with the others of its batch);
* a puzzle whose patches are all planned stops; in the reference, while another puzzle of the
  batch still plans, it plans one of its patches again (a later start for a finished patch).
Both agree with the reference run on one puzzle at a time (tests/test_sampler_family.py).
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# The reference's GraphSequentialCfg.eps: certainties within it of the highest tie.
TIE_EPS = 1e-5


def weighted_adjacency(
    dependency: np.ndarray, max_order: int, certainty_decay: float
) -> Optional[np.ndarray]:
  """The propagation matrix W `[N, N]` float32 of the reference, or None for max_order 0.

  W = I + sum_{o=1..max_order} decay^o P_o, with P_0 = I and P_o = (P_{o-1} D) whose column j is
  divided by the sum of row j (the reference's `div_(sum(dim=1))`, a broadcast over columns).

  Args:
    dependency: `[N, N]` the task's dependency matrix D (Sudoku: 1 where two different cells
      share a row, column or box).
    max_order: hops of propagation (>= 0).
    certainty_decay: weight factor per hop, in (0, 1).
  """
  dependency = np.asarray(dependency, np.float32)
  if dependency.ndim != 2 or dependency.shape[0] != dependency.shape[1]:
    raise ValueError(f"dependency must be a square [N, N] matrix, got shape {dependency.shape}.")
  if max_order == 0:
    return None
  weights = np.eye(dependency.shape[0], dtype=np.float32)
  power = weights.copy()
  weight = 1.0
  for _ in range(max_order):
    power = (power @ dependency).astype(np.float32)
    power = (power / power.sum(axis=1)).astype(np.float32)
    weight *= certainty_decay
    weights = (weights + np.float32(weight) * power).astype(np.float32)
  return weights


def tie_priorities(keys: jax.Array, num_patches: int) -> jax.Array:
  """`[B, N, N]` uniform draws: at block k, the tied patch of highest priorities[b, k] is planned
  (a uniformly random one among the ties, as the reference's randperm)."""
  return jax.vmap(lambda k: jax.random.uniform(k, (num_patches, num_patches)))(keys)


def sequential_order(
    unknown: jax.Array,
    weights: Optional[np.ndarray],
    overlap: float,
    priorities: jax.Array,
    max_blocks: Optional[jax.Array] = None,
) -> jax.Array:
  """The planned patch of each block, per puzzle.

  Args:
    unknown: `[B, N]` bool patches to generate (everything else is known context).
    weights: `[N, N]` the propagation matrix (`weighted_adjacency`), or None (random order).
    overlap: the schedule's overlap in [0, 1) (knowledge 1 - overlap per block).
    priorities: `[B, N, N]` tie-break priorities per block and patch (`tie_priorities`).
    max_blocks: `[B]` int blocks to plan at most (the reference's max_steps; the schedule
      table's `num_blocks`), None: every unknown patch.

  Returns:
    `[B, N]` int32: the patch planned at block k, -1 from block min(n_b, max_blocks[b]) on
    (n_b = sum(unknown[b])).
  """
  batch, num_patches = unknown.shape
  gain = np.float32(1.0 - overlap)
  w = None if weights is None else jnp.asarray(weights, jnp.float32)
  patch_ids = jnp.arange(num_patches)

  def certainty_of(knowledge):
    if w is None:
      return knowledge
    spread = jnp.matmul(knowledge, w, precision=jax.lax.Precision.HIGHEST)
    top = jnp.max(spread, axis=1, keepdims=True)
    spread = spread / jnp.where(top > 0, top, 1.0)
    # The reference skips propagation when there is no knowledge at all.
    return jnp.where(jnp.sum(knowledge, axis=1, keepdims=True) < TIE_EPS, knowledge, spread)

  def plan_block(k, carry):
    knowledge, planned, order = carry
    active = jnp.any(knowledge < TIE_EPS, axis=1)
    if max_blocks is not None:
      active = active & (k < max_blocks)
    certainty = jnp.where(planned, -jnp.inf, certainty_of(knowledge))
    top = jnp.max(certainty, axis=1, keepdims=True)
    ties = (certainty >= top - TIE_EPS) & ~planned
    pick = jnp.argmax(jnp.where(ties, priorities[:, k], -jnp.inf), axis=1)
    picked = (patch_ids[None] == pick[:, None]) & ties & active[:, None]
    order = order.at[:, k].set(jnp.where(active, pick, -1).astype(jnp.int32))
    knowledge = jnp.where(planned, knowledge + gain, knowledge)
    knowledge = jnp.minimum(jnp.where(picked, gain, knowledge), 1.0)
    return knowledge, planned | picked, order

  known = ~unknown.astype(bool)
  init = (known.astype(jnp.float32), known, jnp.full((batch, num_patches), -1, jnp.int32))
  _, _, order = jax.lax.fori_loop(0, num_patches, plan_block, init)
  return order
