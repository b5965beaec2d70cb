"""Checkerboard: a task defined outside ipr_jax, registered with `ipr_jax.tasks.register_task`.

The worked example of README.md's "Adding a task": nothing in the package names it. 8x8 grayscale
images cut into 2x2 patches (a 4x4 grid); every patch is white (+1) or black (-1), and an image is
valid when it is a checkerboard of patches (each patch differs from its right and lower
neighbours). A test puzzle gives some patches of a checkerboard (`config.eval.given_range` of
them, the mask marks the others); the SRM pass generates the rest. Training images are whole
checkerboards of either phase.

Its config file (`checkerboard_config.py`) imports this module, so that every binary that loads
the config knows the task:

  python -m ipr_jax.train --config=experiments/external_task/checkerboard_config.py \
      --workdir=/tmp/checkerboard
  python -m ipr_jax.evaluate --config=experiments/external_task/checkerboard_config.py \
      --workdir=/tmp/checkerboard
"""

import functools
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ipr_jax import tasks
from ipr_jax.data import geometry
from ipr_jax.tasks import base

NAME = "checkerboard"
HOST_RENDERED = False
CELL_VERIFIER = False


def checkerboards(phase: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
  """float32 [B, H, W, 1] checkerboards of patches; patch (r, c) is white where r + c + phase is
  odd. phase: int [B] in {0, 1}."""
  rows, cols = np.indices(grid)
  white = (rows + cols + phase[:, None, None]) % 2 == 1
  cells = jnp.where(white, 1.0, -1.0).astype(jnp.float32)
  pixels = jnp.repeat(jnp.repeat(cells, patch_size, axis=1), patch_size, axis=2)
  return pixels[..., None]


@flax.struct.dataclass
class CheckerboardData:
  """Training images and test puzzles (a pytree, as the training step takes it)."""

  grid: tuple[int, int] = flax.struct.field(pytree_node=False)
  patch_size: int = flax.struct.field(pytree_node=False)

  @functools.partial(jax.jit, static_argnames="batch_size")
  def train_batch(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    """{'image': float32 [B, H, W, 1]} checkerboards of random phase."""
    phase = jax.random.bernoulli(key, 0.5, (batch_size,)).astype(jnp.int32)
    return {"image": checkerboards(phase, self.grid, self.patch_size)}

  def test_batch(
      self, seed: int, indices: np.ndarray, given_range: tuple[int, int]
  ) -> dict[str, jax.Array]:
    """Puzzles `indices`, each a pure function of (seed, index): {'image' [B, H, W, 1] (the
    solution), 'mask' [B, H, W, 1] (1 = generate), 'num_given' int32 [B]}."""
    num_patches = self.grid[0] * self.grid[1]
    root = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices, jnp.int32))
    phase_keys, count_keys, order_keys = jnp.moveaxis(
        jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0
    )
    phase = jax.vmap(lambda k: jax.random.bernoulli(k).astype(jnp.int32))(phase_keys)
    lo, hi = given_range
    num_given = jax.vmap(lambda k: jax.random.randint(k, (), lo, hi + 1))(count_keys)
    ranks = jax.vmap(lambda k: jnp.argsort(jax.random.uniform(k, (num_patches,))))(order_keys)
    given = jnp.argsort(ranks, axis=1) < num_given[:, None]  # [B, N]
    free = (~given).reshape(-1, *self.grid).astype(jnp.float32)
    mask = jnp.repeat(jnp.repeat(free, self.patch_size, axis=1), self.patch_size, axis=2)
    return {
        "image": checkerboards(phase, self.grid, self.patch_size),
        "mask": mask[..., None],
        "num_given": num_given.astype(jnp.int32),
    }


def make_data(config: ml_collections.ConfigDict) -> CheckerboardData:
  """The on-device generator of `config.data` (1 channel)."""
  if config.data.channels != 1:
    raise ValueError(f"checkerboard images are grayscale; data.channels={config.data.channels}")
  return CheckerboardData(grid=geometry.patch_grid(config), patch_size=config.data.patch_size)


def unknown_counts(config: ml_collections.ConfigDict) -> list[int]:
  """Every patch count minus a given count of `config.eval.given_range`."""
  num_patches = base.all_patches(config)[0]
  lo, hi = config.eval.given_range
  return [num_patches - given for given in range(lo, hi + 1)]


def score_fn(patch_size: int):
  """z [B, H, W, 1] -> {'valid', 'broken_pairs'} per image: the neighbouring patch pairs of equal
  colour (by the sign of the patch mean), 0 for a checkerboard."""

  def score(z):
    b, h, w, _ = z.shape
    means = z.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size).mean((2, 4))
    white = means > 0
    broken = jnp.sum(white[:, :, 1:] == white[:, :, :-1], axis=(1, 2)) + jnp.sum(
        white[:, 1:, :] == white[:, :-1, :], axis=(1, 2)
    )
    return {"valid": broken == 0, "broken_pairs": broken.astype(jnp.int32)}

  return score


class Evaluation(base.Evaluation):
  """Checkerboard under one config: the test puzzles' given patches, scored by the colour rule."""

  csv_scores = ("valid", "broken_pairs")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.data = make_data(config)
    self.given_range = tuple(config.eval.given_range)
    self.score_fn = score_fn(self.patch_size)

  def inputs(self, seed: int, indices: np.ndarray) -> dict[str, jax.Array]:
    batch = self.data.test_batch(seed, indices, self.given_range)
    return {"image": batch["image"], "mask": batch["mask"]}

  def unknown_patches(self, seed: int, indices: np.ndarray) -> np.ndarray:
    given = self.data.test_batch(seed, indices, self.given_range)["num_given"]
    return self.num_patches - np.asarray(given)


tasks.register_task(sys.modules[__name__])
