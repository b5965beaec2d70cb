"""SRM training times: `mean_beta` per-patch times and loss weights (spec §3.1-3.2).

Per batch element a mean m ~ U[0, 1) is drawn and the total m N is split over the
N patches by a recursive Beta split, so every sample has exactly mean m; the N
values are then permuted per row. The loss weight of a time is the inverse of a
histogram density of such times, so that every time level contributes about
equally to the loss.

Typical use:

  density = loss_weight_density(key0, (gh, gw), beta_sharpness)   # once
  t, w = mean_beta_times(key, batch, (gh, gw), beta_sharpness, add_zeros, density)
  t_pix = patch_to_pixel(t, patch_size)                           # [B, H, W, 1]
  w_pix = patch_to_pixel(w, patch_size)
"""

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Loss-weight histogram settings of the reference.
NUM_BINS = 1000
BLUR_KERNEL_SIZE = 5
BLUR_SIGMA_BINS = 0.2
NUM_DENSITY_SAMPLES = 80_000
WEIGHT_EPS = 1e-6
MIN_DENSITY = 1e-3


def beta_concentration(n: int, beta_sharpness: float) -> float:
  """Beta(a, a) parameter a_n = (n - 1 - (n mod 2))^1.05 * beta_sharpness for a split of n."""
  return float((n - 1 - (n % 2)) ** 1.05 * beta_sharpness)


def _check_grid(grid_hw: Sequence[int]) -> tuple[int, int]:
  if len(grid_hw) != 2 or any(int(g) < 1 for g in grid_hw):
    raise ValueError(f"grid_hw must be two positive ints, got {grid_hw!r}")
  return int(grid_hw[0]), int(grid_hw[1])


def _split_tree(n: int) -> list[list[int]]:
  """Node sizes per tree level; leaves (size 1) are carried down unchanged."""
  levels = [[n]]
  while any(size > 1 for size in levels[-1]):
    children = []
    for size in levels[-1]:
      children += [1] if size == 1 else [size // 2, size - size // 2]
    levels.append(children)
  return levels


def split_total(key: jax.Array, total: jax.Array, n: int, beta_sharpness: float) -> jax.Array:
  """Splits per-row totals into n values in [0, 1] with that sum (recursive Beta split).

  A node of size n > 1 gives its first child h = n // 2 slots (the smaller half
  for odd n) and the amount L1 = lo + (hi - lo) rho, rho ~ Beta(a_n, a_n), where
  hi = min(L, h) and lo = max(L - min(L, n - h), 0); the second child gets
  L - L1. Every node draws its own rho per row (all n - 1 draws in one call).
  The tree is walked level by level, which leaves the leaves in the
  reference's depth-first order.

  Args:
    key: PRNG key.
    total: `[B]` totals in [0, n].
    n: number of values per row.
    beta_sharpness: scales every a_n.

  Returns:
    `[B, n]` values, unpermuted.
  """
  if n < 1:
    raise ValueError(f"n must be positive, got {n}")
  levels = _split_tree(n)
  split_sizes = [size for level in levels for size in level if size > 1]
  amounts = total[:, None]
  if not split_sizes:
    return amounts
  concentration = jnp.asarray(
      [beta_concentration(size, beta_sharpness) for size in split_sizes], jnp.float32
  )
  rho = jax.random.beta(
      key,
      concentration,
      concentration,
      shape=(amounts.shape[0], len(split_sizes)),
      dtype=amounts.dtype,
  )
  split_index = 0
  for sizes in levels[:-1]:
    columns = []
    for node, size in enumerate(sizes):
      amount = amounts[:, node]
      if size == 1:
        columns.append(amount)
        continue
      half = size // 2
      hi_first = jnp.minimum(amount, half)
      hi_second = jnp.minimum(amount, size - half)
      lo_first = jnp.maximum(amount - hi_second, 0.0)
      first = lo_first + (hi_first - lo_first) * rho[:, split_index]
      columns += [first, amount - first]
      split_index += 1
    amounts = jnp.stack(columns, axis=1)
  return amounts


def _permute_rows(key: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Applies one random permutation per row (argsort of uniforms) to every array."""
  order = jnp.argsort(jax.random.uniform(key, arrays[0].shape), axis=-1)
  return tuple(jnp.take_along_axis(a, order, axis=-1) for a in arrays)


def mean_beta_times_with_mean(
    key: jax.Array, mean: jax.Array, grid_hw: Sequence[int], beta_sharpness: float
) -> jax.Array:
  """Per-patch times whose per-sample mean is `mean` (the reference's get_time_with_mean).

  Args:
    key: PRNG key.
    mean: `[B]` means in [0, 1].
    grid_hw: patch grid (gh, gw).
    beta_sharpness: Beta concentration scale (EP 0.75, CP 0.5, MS 1.0).

  Returns:
    `[B, gh, gw]` times in [0, 1].
  """
  gh, gw = _check_grid(grid_hw)
  num_patches = gh * gw
  split_key, permute_key = jax.random.split(key)
  t = split_total(split_key, mean * num_patches, num_patches, beta_sharpness)
  (t,) = _permute_rows(permute_key, t)
  return t.reshape(mean.shape[0], gh, gw)


def loss_weights(t: jax.Array, density: jax.Array, eps: float = WEIGHT_EPS) -> jax.Array:
  """weight(t) = (1 + eps) / (density[clip(floor(num_bins t), 0, num_bins - 1)] + eps).

  Args:
    t: times of any shape.
    density: `[num_bins]` table from `loss_weight_density`.
    eps: the reference's 1e-6.

  Returns:
    weights shaped like t.
  """
  num_bins = density.shape[0]
  bins = jnp.clip(jnp.floor(t * num_bins).astype(jnp.int32), 0, num_bins - 1)
  return (1.0 + eps) / (density[bins] + eps)


def mean_beta_times(
    key: jax.Array,
    batch: int,
    grid_hw: Sequence[int],
    beta_sharpness: float,
    add_zeros: bool,
    weight_table: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Samples training times and loss weights per patch (spec §3.1).

  Args:
    key: PRNG key.
    batch: batch size B.
    grid_hw: patch grid (gh, gw).
    beta_sharpness: Beta concentration scale.
    add_zeros: if True, zero a U[0, 1) fraction of each row's patches (t = 0 and
      weight 0: clean context with no loss), then permute t and weight together.
    weight_table: `[num_bins]` density from `loss_weight_density`; None gives
      weights of 1 (before add_zeros).

  Returns:
    t `[B, gh, gw]` in [0, 1] and weights `[B, gh, gw]`.
  """
  if batch < 1:
    raise ValueError(f"batch must be positive, got {batch}")
  gh, gw = _check_grid(grid_hw)
  num_patches = gh * gw
  mean_key, times_key, ratio_key, permute_key = jax.random.split(key, 4)
  mean = jax.random.uniform(mean_key, (batch,))
  t = mean_beta_times_with_mean(times_key, mean, (gh, gw), beta_sharpness)
  if weight_table is None:
    weight = jnp.ones_like(t)
  else:
    weight = loss_weights(t, weight_table)
  if add_zeros:
    t = t.reshape(batch, num_patches)
    weight = weight.reshape(batch, num_patches)
    zero_ratio = jax.random.uniform(ratio_key, (batch, 1))
    position = jnp.arange(1, num_patches + 1, dtype=t.dtype) / num_patches
    zero = position[None, :] < zero_ratio
    t = jnp.where(zero, 0.0, t)
    weight = jnp.where(zero, 0.0, weight)
    t, weight = _permute_rows(permute_key, t, weight)
    t = t.reshape(batch, gh, gw)
    weight = weight.reshape(batch, gh, gw)
  return t, weight


def _blur_kernel(size: int, sigma: float) -> jax.Array:
  center = size // 2
  offsets = jnp.arange(-center, center + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  return kernel / kernel.sum()


@functools.partial(
    jax.jit,
    static_argnames=(
        "grid_hw",
        "beta_sharpness",
        "num_samples",
        "num_bins",
        "blur_kernel_size",
        "blur_sigma",
        "chunk_size",
    ),
)
def _density(
    key, grid_hw, beta_sharpness, num_samples, num_bins, blur_kernel_size, blur_sigma, chunk_size
):
  num_chunks = math.ceil(num_samples / chunk_size)

  def count_chunk(counts, chunk):
    chunk_key, index = chunk
    mean = jax.random.uniform(jax.random.fold_in(chunk_key, 0), (chunk_size,))
    t = mean_beta_times_with_mean(jax.random.fold_in(chunk_key, 1), mean, grid_hw, beta_sharpness)
    valid = (index * chunk_size + jnp.arange(chunk_size)) < num_samples
    bins = jnp.clip(jnp.floor(t * num_bins).astype(jnp.int32), 0, num_bins - 1)
    weights = jnp.broadcast_to(valid[:, None, None], bins.shape).astype(jnp.float32)
    counts = counts + jnp.zeros(num_bins, jnp.float32).at[bins.ravel()].add(weights.ravel())
    return counts, None

  keys = jax.random.split(key, num_chunks)
  counts, _ = jax.lax.scan(
      count_chunk, jnp.zeros(num_bins, jnp.float32), (keys, jnp.arange(num_chunks))
  )
  pad = blur_kernel_size // 2
  padded = jnp.pad(counts, pad, mode="reflect")
  smoothed = jnp.convolve(padded, _blur_kernel(blur_kernel_size, blur_sigma), mode="valid")
  return smoothed / smoothed.mean()


def loss_weight_density(
    key: jax.Array,
    grid_hw: Sequence[int],
    beta_sharpness: float,
    num_samples: int = NUM_DENSITY_SAMPLES,
    num_bins: int = NUM_BINS,
    blur_kernel_size: int = BLUR_KERNEL_SIZE,
    blur_sigma: float = BLUR_SIGMA_BINS,
    chunk_size: int = 4096,
) -> jax.Array:
  """Histogram density of per-patch times, normalised to mean 1 (spec §3.1 step 4).

  Draws `num_samples` rows of mean_beta times WITHOUT add_zeros (num_samples * N
  values), bins them into `num_bins` equal bins on [0, 1] (1.0 goes to the last
  bin), reflect-pads by kernel_size // 2 and convolves with a normalised Gaussian
  of `blur_sigma` bins, then divides by the mean.

  blur_sigma = 0.2 bins is the reference's value and is kept for fidelity; its
  side taps are ~3.7e-6, so there is effectively no smoothing. [BUG?] in the
  reference: a sigma of a few bins was probably intended.

  The reference asserts that the minimum density exceeds 1e-3; here a ValueError
  is raised when the result is concrete (not under a jax trace).

  Args:
    key: PRNG key.
    grid_hw: patch grid (gh, gw).
    beta_sharpness: as for `mean_beta_times`.
    num_samples: rows to draw (the reference's 80,000).
    num_bins: histogram bins.
    blur_kernel_size: odd smoothing kernel size.
    blur_sigma: smoothing kernel sigma in bins.
    chunk_size: rows drawn per scan step (memory only; changes the random stream).

  Returns:
    `[num_bins]` float32 density table.
  """
  if blur_kernel_size % 2 != 1:
    raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")
  if num_samples < 1 or num_bins < 1 or chunk_size < 1:
    raise ValueError(
        f"num_samples, num_bins and chunk_size must be positive, got "
        f"{num_samples}, {num_bins}, {chunk_size}"
    )
  grid_hw = _check_grid(grid_hw)
  density = _density(
      key,
      grid_hw,
      float(beta_sharpness),
      int(num_samples),
      int(num_bins),
      int(blur_kernel_size),
      float(blur_sigma),
      int(min(chunk_size, num_samples)),
  )
  if not isinstance(density, jax.core.Tracer):
    minimum = float(np.min(np.asarray(density)))
    if minimum <= MIN_DENSITY:
      raise ValueError(
          f"loss-weight histogram too inaccurate: minimum density {minimum:.3g} <= "
          f"{MIN_DENSITY}; draw more samples or use another time sampler"
      )
  return density


def patch_to_pixel(values: jax.Array, patch_size: int) -> jax.Array:
  """Kronecker upsampling of a patch map `[B, gh, gw]` to a pixel map `[B, gh*P, gw*P, 1]`."""
  if patch_size < 1:
    raise ValueError(f"patch_size must be positive, got {patch_size}")
  if values.ndim != 3:
    raise ValueError(f"expected a [B, gh, gw] patch map, got shape {values.shape}")
  pixels = jnp.repeat(jnp.repeat(values, patch_size, axis=1), patch_size, axis=2)
  return pixels[..., None]


def apply_condition_mask(
    t_pix: jax.Array, w_pix: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """MS conditioning: given pixels (mask 0) get t = 0 (clean) and loss weight 0.

  Args:
    t_pix: `[B, H, W, 1]` times.
    w_pix: `[B, H, W, 1]` loss weights.
    mask: `[B, H, W, 1]`, 1 = to generate, 0 = given.

  Returns:
    (t_pix * mask, w_pix * mask).
  """
  if mask.shape != t_pix.shape or w_pix.shape != t_pix.shape:
    raise ValueError(
        f"mask, t_pix and w_pix shapes must agree, got {mask.shape}, {t_pix.shape}, "
        f"{w_pix.shape}"
    )
  mask = mask.astype(t_pix.dtype)
  return t_pix * mask, w_pix * mask
