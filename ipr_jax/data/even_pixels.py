"""Even Pixels images (spec §5.2), generated on device under jit.

Each image has exactly half of its pixels (512 of 32x32) in one hue and half in the hue half a turn
away, at saturation 1 and value 0.7, with a random hue offset h0 ~ U[0, 0.5) and a random
arrangement. As in the reference, the HSV image is quantised with uint8 truncation (H = trunc(255 *
(h0 + 0.5 * m)), S = 255, V = 178) and converted with PIL's integer HSV->RGB, reproduced here by
`pil_hsv_to_rgb` (checked against PIL on all 2^24 inputs in the tests), so PIL is not needed.

Batches are dicts {'image': float32 [B, H, W, 3] in [-1, 1]} (ToTensor + Normalize(0.5, 0.5)).

Deviation, on purpose: randomness is JAX's PRNG rather than numpy's, and the hue is computed in
float32 rather than float64 before truncation; test image i is a pure function of (seed, i), but
not the reference's image i.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.data import digits as digits_lib


def pil_hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """PIL's `Image.convert('RGB')` of an 'HSV' image, in numpy.

  PIL computes i = floor(6h/255) and f = 6h/255 - i in double precision stored as float, the
  saturation fraction as float, and rounds v(1 - s), v(1 - s f), v(1 - s(1 - f)) half away from
  zero; s f is a float product. This function follows the same steps.

  Args:
    hsv: uint8 [..., 3].

  Returns:
    uint8 [..., 3] RGB.
  """
  hsv = np.asarray(hsv, np.uint8)
  h, s, v = (hsv[..., k].astype(np.float64) for k in range(3))
  sector = np.floor(h * 6.0 / 255.0)
  f = (h * 6.0 / 255.0 - sector).astype(np.float32)
  fs = (s / 255.0).astype(np.float32)

  def round_clip(x):
    return np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), 0, 255)

  p = round_clip(v * (1.0 - fs.astype(np.float64)))
  q = round_clip(v * (1.0 - (fs * f).astype(np.float64)))
  t = round_clip(v * (1.0 - fs.astype(np.float64) * (1.0 - f.astype(np.float64))))
  sector = sector.astype(np.int64) % 6
  table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
  rgb = np.zeros(hsv.shape, np.float64)
  for k, channels in table.items():
    rgb = np.where((sector == k)[..., None], np.stack(channels, axis=-1), rgb)
  rgb = np.where((s == 0)[..., None], np.stack([v, v, v], axis=-1), rgb)
  return rgb.astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _hue_to_rgb_table(saturation_u8: int, value_u8: int) -> np.ndarray:
  """uint8 [256, 3]: PIL's RGB of (h, saturation_u8, value_u8) for every hue byte h."""
  hsv = np.stack([np.arange(256), np.full(256, saturation_u8), np.full(256, value_u8)], axis=-1)
  return pil_hsv_to_rgb(hsv)


def _check_image_size(image_size: int) -> int:
  if image_size < 1 or (image_size * image_size) % 2:
    raise ValueError(f"image_size={image_size}: the pixel count must be even and positive")
  return image_size * image_size


def even_pixels_from_uniforms(
    uniforms: jax.Array, image_size: int = 32, saturation: float = 1.0, value: float = 0.7
) -> jax.Array:
  """Even Pixels images from uniforms in [0, 1) (all randomness drawn at once: small programs).

  Args:
    uniforms: [B, 1 + H*W]; column 0 gives the hue offset h0 = 0.5 u, the other columns rank the
      pixels, and the H*W/2 pixels of lowest rank get the second hue.
    image_size: side H = W; H*W must be even.
    saturation, value: HSV saturation and value in [0, 1] (the reference: 1.0 and 0.7).

  Returns:
    float32 [B, H, W, 3] in [-1, 1].
  """
  num_pixels = _check_image_size(image_size)
  table = jnp.asarray(_hue_to_rgb_table(int(saturation * 255), int(value * 255)))
  offset = 0.5 * uniforms[:, :1]
  rank = jnp.argsort(jnp.argsort(uniforms[:, 1:], axis=1), axis=1)
  second_hue = (rank < num_pixels // 2).astype(jnp.float32)
  hue = jnp.floor((second_hue * 0.5 + offset) * 255.0).astype(jnp.int32)
  rgb = table[hue].reshape(-1, image_size, image_size, 3)
  return digits_lib.to_unit_range(rgb)


def even_pixels_images(
    key: jax.Array,
    batch_size: int,
    image_size: int = 32,
    saturation: float = 1.0,
    value: float = 0.7,
) -> jax.Array:
  """Random Even Pixels images: float32 [B, H, W, 3] in [-1, 1] (see even_pixels_from_uniforms)."""
  num_pixels = _check_image_size(image_size)
  uniforms = jax.random.uniform(key, (batch_size, 1 + num_pixels))
  return even_pixels_from_uniforms(uniforms, image_size, saturation, value)


@flax.struct.dataclass
class EvenPixelsTask:
  """Even Pixels batches with the same interface as `SudokuTask` (no mask: unconditional)."""

  image_size: int = flax.struct.field(pytree_node=False, default=32)
  saturation: float = flax.struct.field(pytree_node=False, default=1.0)
  value: float = flax.struct.field(pytree_node=False, default=0.7)

  @functools.partial(jax.jit, static_argnames="batch_size")
  def train_batch(self, key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    """{'image': float32 [B, H, W, 3]} random training images."""
    return {
        "image": even_pixels_images(key, batch_size, self.image_size, self.saturation, self.value)
    }

  @jax.jit
  def test_batch(self, seed, indices) -> dict[str, jax.Array]:
    """{'image': float32 [B, H, W, 3]}: image i is a pure function of (seed, i)."""
    root = jax.random.key(jnp.asarray(seed, jnp.uint32))
    size = 1 + _check_image_size(self.image_size)
    uniforms = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(root, i), (size,)))(
        jnp.asarray(indices, jnp.int32)
    )
    return {
        "image": even_pixels_from_uniforms(uniforms, self.image_size, self.saturation, self.value)
    }
