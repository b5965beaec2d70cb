"""Patch geometry of the sampler: patch grids, per-patch values <-> pixels, cell swaps, and the
per-puzzle keys (every random draw of puzzle b derives from keys[b] only)."""

import jax
import jax.numpy as jnp


def patch_grid(image_shape, patch_size: int) -> tuple[int, int]:
  """(gh, gw) of an image `[B, H, W, C]` (or `[H, W, C]`) cut in P x P patches."""
  h, w = image_shape[-3], image_shape[-2]
  if int(patch_size) != patch_size or patch_size < 1:
    raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
  if h % patch_size or w % patch_size:
    raise ValueError(f"patch_size={patch_size} does not divide the image size {h}x{w}.")
  return h // patch_size, w // patch_size


def patches_to_pixels(values: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
  """Repeats per-patch values over their pixels: `[B, N]` -> `[B, H, W, 1]`."""
  b = values.shape[0]
  gh, gw = grid
  x = values.reshape(b, gh, 1, gw, 1)
  x = jnp.broadcast_to(x, (b, gh, patch_size, gw, patch_size))
  return x.reshape(b, gh * patch_size, gw * patch_size, 1)


def patch_mean(x: jax.Array, patch_size: int) -> jax.Array:
  """Mean over each patch and channel (the reference's avg_pool).

  Args:
    x: `[B, H, W, C]`.
    patch_size: P.

  Returns:
    `[B, N]`, row-major over the patch grid.
  """
  b, h, w, c = x.shape
  gh, gw = h // patch_size, w // patch_size
  x = x.reshape(b, gh, patch_size, gw, patch_size, c)
  return x.mean(axis=(2, 4, 5)).reshape(b, gh * gw)


def unknown_patches(mask: jax.Array, patch_size: int) -> jax.Array:
  """Patches to generate: mask at each patch's top-left pixel > 0.5.

  Args:
    mask: `[B, H, W, 1]` pixel mask, 1 = generate, 0 = given.
    patch_size: P.

  Returns:
    `[B, N]` bool, row-major over the patch grid.
  """
  patch_grid(mask.shape, patch_size)
  top_left = mask[:, ::patch_size, ::patch_size, 0]
  return (top_left > 0.5).reshape(mask.shape[0], -1)


def patch_pixel_mask(patches: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
  """`[B, N]` bool patch selection -> `[B, H, W, 1]` bool pixel mask."""
  return patches_to_pixels(patches, grid, patch_size)


def puzzle_keys(key: jax.Array, puzzle_ids: jax.Array) -> jax.Array:
  """Per-puzzle keys `[B]`: fold_in(key, puzzle_id), independent of batch layout."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, puzzle_ids)


def check_keys(keys: jax.Array, batch: int) -> None:
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    raise ValueError(
        "keys must be a typed key array (jax.random.key), one per puzzle; got "
        f"dtype {keys.dtype}."
    )
  if keys.shape != (batch,):
    raise ValueError(f"keys must have shape ({batch},), got {keys.shape}.")


def fold_keys(keys: jax.Array, data) -> jax.Array:
  """fold_in of the same data into every per-puzzle key."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def corrupt_by_swaps(
    key: jax.Array, image: jax.Array, patch_size: int, num_swaps: int
) -> jax.Array:
  """Swaps the contents of two cells `num_swaps` times (correction mode, §4.2).

  Each swap picks two distinct rows and two distinct columns of the patch
  grid and exchanges cells (r0, c0) and (r1, c1), so the two cells differ in
  both row and column, as in the reference.

  Args:
    key: PRNG key of one puzzle.
    image: `[H, W, d]` image (a solved grid).
    patch_size: P.
    num_swaps: K (static).

  Returns:
    `[H, W, d]` corrupted image.
  """
  gh, gw = patch_grid(image.shape, patch_size)
  if gh < 2 or gw < 2:
    raise ValueError(f"cell swaps need a patch grid of at least 2x2, got {gh}x{gw}.")
  h, w, d = image.shape
  cells = image.reshape(gh, patch_size, gw, patch_size, d).transpose(0, 2, 1, 3, 4)
  cells = cells.reshape(gh * gw, patch_size, patch_size, d)

  def swap(i, cells):
    # r0 uniform, r1 = r0 + uniform{1..gh-1} (mod gh): a uniform distinct pair.
    r0, dr, c0, dc = jax.random.randint(
        jax.random.fold_in(key, i), (4,), 0, jnp.array([gh, gh - 1, gw, gw - 1])
    )
    r1, c1 = (r0 + 1 + dr) % gh, (c0 + 1 + dc) % gw
    a, b = r0 * gw + c0, r1 * gw + c1
    cell_a, cell_b = cells[a], cells[b]
    return cells.at[a].set(cell_b).at[b].set(cell_a)

  cells = jax.lax.fori_loop(0, num_swaps, swap, cells)
  cells = cells.reshape(gh, gw, patch_size, patch_size, d).transpose(0, 2, 1, 3, 4)
  return cells.reshape(h, w, d)
