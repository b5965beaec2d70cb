"""What the sampler is given, as records: the model (`Denoiser`: the denoise function and the
patch geometry), the puzzles (`Puzzles`: what each gives and the randomness it is sampled with),
the given content a pass re-pastes (`Given`), and the fold_in tags of a puzzle key's streams.

Static vs traced: a `Denoiser` is a Python value that a traced program closes over (its function,
patch size and dependency matrix are static, as the settings `SamplerConfig` and `IPRConfig`
are); `Puzzles` and `Given` hold arrays only (pytrees: arguments of `jax.jit` and `jax.pmap`).
"""

import dataclasses
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.sampling.config import DenoiseFn
from ipr_jax.sampling.patches import fold_keys, patch_grid, unknown_patches

# fold_in tags of the streams of one puzzle key, distinct so that they never collide: IPR's
# iterations, correction mode's cell swaps, the initial noise, the uncertainty query, the chains
# (`chains.py`), and the planning of the SRM pass (no step index of the greedy loop reaches it).
ITERATION_STREAM = 1
CORRUPTION_STREAM = 2
NOISE_STREAM = 3
QUERY_STREAM = 4
CHAIN_STREAM = 5
PLAN_STREAM = 2**31 - 1


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
  """The model as the sampler sees it: its denoise function and the patch geometry of its images.

  Static under jit: the sampler's programs close over it (it is never an argument of a jitted
  function). Compared and hashed by identity.

  Attributes:
    denoise_fn: (z `[B, H, W, C]`, t `[B, H, W, 1]`) -> DenoiserOutput
      (`ipr_jax.models.denoiser`), of which the sampler reads u, v `[B, H, W, C]` and sigma
      `[B, H, W, 1]`; called once per step on the whole batch (the uncertainty query: on a batch
      of G x B).
    patch_size: P: an image `[B, H, W, C]` is cut into N = (H / P) (W / P) patches of P x P
      pixels, numbered row-major over the patch grid.
    dependency: `[N, N]` the task's dependency matrix between patches (read by the
      graph_sequential schedule, of the SRM pass or of the regeneration), or None.
  """

  denoise_fn: DenoiseFn
  patch_size: int
  dependency: Optional[np.ndarray] = None

  def grid(self, image_shape) -> tuple[int, int]:
    """(gh, gw), the patch grid of images `[B, H, W, C]` (or `[H, W, C]`)."""
    return patch_grid(image_shape, self.patch_size)


@flax.struct.dataclass
class Puzzles:
  """A batch of B puzzles: what each gives and the randomness it is sampled with.

  Attributes:
    keys: `[B]` typed per-puzzle PRNG keys (`puzzle_keys`): every random draw of puzzle b derives
      from keys[b] only, so a puzzle gives the same result in any batch.
    image: `[B, H, W, C]` the given content (read where mask is 0) or, in IPR's correction mode,
      the solved grid; None where nothing is given (no mask, standard mode).
    mask: `[B, H, W, 1]` 1 = generate, 0 = given; None: generate everything.
    noise: `[B, H, W, C]` the initial noise z_T; None: drawn from the keys (`initial_noise`).
  """

  keys: jax.Array
  image: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None
  noise: Optional[jax.Array] = None

  @property
  def shape(self) -> tuple[int, ...]:
    """(B, H, W, C), from the image or the noise."""
    reference = self.image if self.image is not None else self.noise
    if reference is None:
      raise ValueError("the puzzles need an image or noise to know the sample shape.")
    return tuple(reference.shape)


@flax.struct.dataclass
class Given:
  """The given content of a batch, which a pass re-pastes after every step.

  Attributes:
    masked: `[B, H, W, C]` float32 the given content, 0 on the cells to generate (None: nothing
      given).
    mask: `[B, H, W, 1]` float32 1 = generate, 0 = given (None: everything generated).
  """

  masked: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None

  def paste(self, z: jax.Array) -> jax.Array:
    """z `[B, H, W, C]` with the given cells pasted: masked + mask z (z itself without a mask)."""
    if self.mask is None:
      return z
    masked = self.masked
    assert masked is not None, "a mask without its given content (`given_content` makes both)"
    return masked + self.mask * z


def given_content(puzzles: Puzzles) -> Given:
  """The given content of `puzzles`: masked = (1 - mask) image, in float32 (none without a mask)."""
  if puzzles.mask is None:
    return Given()
  if puzzles.image is None:
    raise ValueError("a mask needs the image that holds the given cells.")
  mask = puzzles.mask.astype(jnp.float32)
  return Given(masked=(1.0 - mask) * puzzles.image.astype(jnp.float32), mask=mask)


def initial_noise(puzzles: Puzzles, shape: Optional[tuple[int, ...]] = None) -> jax.Array:
  """`[B, H, W, C]` the puzzles' initial noise: `puzzles.noise`, or a standard normal draw from
  fold_in(key, NOISE_STREAM) of each puzzle (float32) of `shape` (default: `puzzles.shape`)."""
  if puzzles.noise is not None:
    return puzzles.noise
  if shape is None:
    shape = puzzles.shape
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(
      fold_keys(puzzles.keys, NOISE_STREAM)
  )


def generated_patches(puzzles: Puzzles, patch_size: int) -> jax.Array:
  """`[B, N]` bool the patches to generate: those whose top-left mask pixel is > 0.5
  (`unknown_patches`), every patch without a mask."""
  if puzzles.mask is not None:
    return unknown_patches(puzzles.mask, patch_size)
  batch = puzzles.shape[0]
  gh, gw = patch_grid(puzzles.shape, patch_size)
  return jnp.ones((batch, gh * gw), bool)
