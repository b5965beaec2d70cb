"""How a transformer denoiser cuts an image into tokens and puts its output back (NHWC inside).

Two layouts:

- 'patch' (ipr-jax's own): token = one q x q patch of the image, tokens row-major over the
  token grid (token n = row * (W / q) + col), features channel-major within the token
  (f = c * q^2 + py * q + px). The time of a token is the time of its pixels.
- 'spatialreasoners': the SRM authors' framework's `ImageDiTTokenizer` (spatialreasoners 1.0.5),
  for its checkpoints. The image is cut into variables (SRM regions of P x P pixels, features
  (c, p1, p2)); the features of a variable are then split as (f, h, w) into n x n tokens
  (n = P / q), token order (variable, h, w). For n > 1 a token therefore does not hold a
  spatial sub-patch (for P = 4, n = 2 it holds the pixels of one column p2 = 2 h + w), while
  its coordinates say (row, col) = (vh * n + h, vw * n + w). Each token takes its variable's
  time. tests/golden/spatialreasoners/image_dit_tokenizer.npz is the framework's own packing.

Both give a token grid of (H / q) x (W / q) coordinates and C * q^2 features per token; with
n = 1 (one token per region) they are the same layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LAYOUTS = ("patch", "spatialreasoners")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Where each pixel of a [B, H, W, C] image goes among the tokens.

  Attributes:
    kind: 'patch' or 'spatialreasoners'.
    height, width, channels: the image.
    token_size: q, the side of a token's patch; divides H and W.
    region_size: P, the side of an SRM region (the framework's variable); a multiple of q.
  """

  kind: str
  height: int
  width: int
  channels: int
  token_size: int
  region_size: int

  def __post_init__(self):
    if self.kind not in LAYOUTS:
      raise ValueError(f"token layout {self.kind!r} is unknown; known: {LAYOUTS}")
    q, p = self.token_size, self.region_size
    if q < 1 or self.height % q or self.width % q:
      raise ValueError(
          f"token patch size {q} does not divide the image size {self.height}x{self.width}"
      )
    if p < 1 or p % q or self.height % p or self.width % p:
      raise ValueError(
          f"token patch size {q} does not divide the region (patch) size {p}, or {p} does not "
          f"divide the image size {self.height}x{self.width}: each token must lie in one region "
          "so that it has one noise level"
      )
    if self.kind == "spatialreasoners" and self.height != self.width:
      raise ValueError(
          f"the 'spatialreasoners' token layout is defined here for square images only, got "
          f"{self.height}x{self.width} (the framework's own grid order is ambiguous otherwise)"
      )

  @property
  def grid(self) -> tuple[int, int]:
    """Token grid (rows, cols)."""
    return self.height // self.token_size, self.width // self.token_size

  @property
  def num_tokens(self) -> int:
    rows, cols = self.grid
    return rows * cols

  @property
  def features(self) -> int:
    """Features per token, C * q^2."""
    return self.channels * self.token_size**2

  @property
  def tokens_per_side(self) -> int:
    """n = P / q, tokens along each side of a region."""
    return self.region_size // self.token_size


def image_to_tokens(x: Array, layout: TokenLayout) -> Array:
  """[B, H, W, C] -> [B, N, C q^2]."""
  b = x.shape[0]
  q, c = layout.token_size, layout.channels
  if layout.kind == "patch":
    rows, cols = layout.grid
    x = x.reshape(b, rows, q, cols, q, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, rows * cols, c * q * q)
  p, n = layout.region_size, layout.tokens_per_side
  gh, gw = layout.height // p, layout.width // p
  variables = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, gh * gw, -1)
  tokens = variables.reshape(b, gh * gw, layout.features, n, n).transpose(0, 1, 3, 4, 2)
  return tokens.reshape(b, gh * gw * n * n, layout.features)


def tokens_to_image(tokens: Array, layout: TokenLayout) -> Array:
  """[B, N, C q^2] -> [B, H, W, C]; the inverse of `image_to_tokens`."""
  b = tokens.shape[0]
  q, c = layout.token_size, layout.channels
  if layout.kind == "patch":
    rows, cols = layout.grid
    x = tokens.reshape(b, rows, cols, c, q, q).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, layout.height, layout.width, c)
  p, n = layout.region_size, layout.tokens_per_side
  gh, gw = layout.height // p, layout.width // p
  variables = tokens.reshape(b, gh * gw, n, n, layout.features).transpose(0, 1, 4, 2, 3)
  x = variables.reshape(b, gh, gw, c, p, p).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, layout.height, layout.width, c)


def token_values_to_image(values: Array, layout: TokenLayout) -> Array:
  """One value per token [B, N] -> [B, H, W, 1], each pixel the value of its token.

  In the 'spatialreasoners' layout the channels of one pixel can lie in different tokens; a
  pixel then gets the mean over its channels. The mean over a region is the mean over its
  tokens either way (every token holds C q^2 of its values).
  """
  if layout.kind == "patch":
    rows, cols = layout.grid
    q = layout.token_size
    grid = values.reshape(values.shape[0], rows, cols)
    return jnp.repeat(jnp.repeat(grid, q, axis=1), q, axis=2)[..., None]
  spread = jnp.broadcast_to(values[..., None], (*values.shape, layout.features))
  return tokens_to_image(spread, layout).mean(axis=-1, keepdims=True)


def token_times(t: Array, layout: TokenLayout) -> Array:
  """A time map [B, H, W, 1], constant on regions, -> one time per token [B, N].

  'patch': the time at each token's top-left pixel; 'spatialreasoners': its variable's
  (region's) time at the region's top-left pixel, repeated to its n^2 tokens (the framework's
  `repeat_interleave`).
  """
  if layout.kind == "patch":
    q = layout.token_size
    return t[:, ::q, ::q, 0].reshape(t.shape[0], -1)
  p, n = layout.region_size, layout.tokens_per_side
  per_region = t[:, ::p, ::p, 0].reshape(t.shape[0], -1)
  return jnp.repeat(per_region, n * n, axis=1)


def token_coordinates(layout: TokenLayout) -> np.ndarray:
  """[N, 2] float32 (row, col) of each token on the token grid, in token order."""
  rows, cols = layout.grid
  if layout.kind == "patch":
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=-1).astype(np.float32)
  n = layout.tokens_per_side
  gh, gw = rows // n, cols // n
  vh, vw, h, w = np.meshgrid(
      np.arange(gh), np.arange(gw), np.arange(n), np.arange(n), indexing="ij"
  )
  coords = np.stack([(vh * n + h).ravel(), (vw * n + w).ravel()], axis=-1)
  return coords.astype(np.float32)
