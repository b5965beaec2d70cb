"""Even Pixels metrics (spec §6.2), in JAX, matching srmbench's `EvenPixelsEvaluation`.

1. img = clip((x + 1) / 2, 0, 1), converted to HSV as matplotlib's `rgb_to_hsv` does.
2. Per image, a 256-bin hue histogram on [0, 1]; peak1 = argmax, peak2 = peak1 + 128 mod 256;
   with the peaks sorted into (a, b), the borders are (a + b) // 2 and (a + b + 256) // 2, the
   latter minus 256 if it exceeds 256; sorted into (lo, hi), c = sum(hist[lo:hi]) and
   imbalance = |c - H*W // 2|.
3. is_color_count_even = mean[imbalance == 0]; color_imbalance_count = mean imbalance;
   saturation_std / value_std = mean over images of the per-image std (ddof 0) of S / V.
"""

import jax
import jax.numpy as jnp

NUM_BINS = 256


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """matplotlib.colors.rgb_to_hsv in JAX.

  Hue ties follow matplotlib: where several channels equal the maximum, blue wins over green,
  green over red (matplotlib assigns them in that order).

  Args:
    rgb: float [..., 3] in [0, 1].

  Returns:
    float32 [..., 3] HSV in [0, 1].
  """
  rgb = jnp.asarray(rgb, jnp.float32)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maximum = rgb.max(axis=-1)
  delta = maximum - rgb.min(axis=-1)
  safe_max = jnp.where(maximum > 0, maximum, 1.0)
  saturation = jnp.where(maximum > 0, delta / safe_max, 0.0)
  chromatic = delta > 0
  safe_delta = jnp.where(chromatic, delta, 1.0)
  hue = jnp.zeros_like(maximum)
  hue = jnp.where((r == maximum) & chromatic, (g - b) / safe_delta, hue)
  hue = jnp.where((g == maximum) & chromatic, 2.0 + (b - r) / safe_delta, hue)
  hue = jnp.where((b == maximum) & chromatic, 4.0 + (r - g) / safe_delta, hue)
  hue = jnp.mod(hue / 6.0, 1.0)
  return jnp.stack([hue, saturation, maximum], axis=-1)


def _check_images(images: jax.Array) -> jax.Array:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Even Pixels images of shape {tuple(images.shape)}: expected [B, H, W, 3]")
  return images


def images_to_hsv(images: jax.Array) -> jax.Array:
  """[B, H, W, 3] images in [-1, 1] -> HSV [B, H, W, 3] of clip((x + 1) / 2, 0, 1)."""
  images = _check_images(jnp.asarray(images, jnp.float32))
  return rgb_to_hsv(jnp.clip((images + 1.0) / 2.0, 0.0, 1.0))


def hue_histogram(hue: jax.Array) -> jax.Array:
  """int32 [B, 256] counts of hue [B, H, W] in 256 equal bins on [0, 1] (1.0 in the last bin).

  Equals numpy.histogram(h, 256, range=(0, 1)) per image: h * 256 is exact in float32, so the bin
  is floor(256 h).
  """
  bins = jnp.clip(jnp.floor(hue * NUM_BINS), 0, NUM_BINS - 1).astype(jnp.int32)
  bins = bins.reshape(hue.shape[0], -1)
  return jax.vmap(lambda b: jnp.bincount(b, length=NUM_BINS))(bins).astype(jnp.int32)


def hue_imbalance_from_hsv(hsv: jax.Array) -> jax.Array:
  """int32 [B] colour imbalance of HSV images [B, H, W, 3] (the histogram and border rule)."""
  hist = hue_histogram(hsv[..., 0])
  half = NUM_BINS // 2
  peak1 = jnp.argmax(hist, axis=1)
  peak2 = (peak1 + half) % NUM_BINS
  a, b = jnp.minimum(peak1, peak2), jnp.maximum(peak1, peak2)
  border1 = (a + b) // 2
  border2 = (a + b + NUM_BINS) // 2
  border2 = jnp.where(border2 > NUM_BINS, border2 - NUM_BINS, border2)
  lo, hi = jnp.minimum(border1, border2), jnp.maximum(border1, border2)
  bins = jnp.arange(NUM_BINS)
  inside = (bins >= lo[:, None]) & (bins < hi[:, None])
  count = jnp.sum(jnp.where(inside, hist, 0), axis=1)
  half_pixels = (hsv.shape[1] * hsv.shape[2]) // 2
  return jnp.abs(count - half_pixels).astype(jnp.int32)


@jax.jit
def per_image_metrics(images: jax.Array) -> dict[str, jax.Array]:
  """Per-image values: 'color_imbalance' int32 [B], 'saturation_std' and 'value_std' float32 [B].

  Args:
    images: [B, H, W, 3] in [-1, 1] (NHWC).
  """
  hsv = images_to_hsv(images)
  return {
      "color_imbalance": hue_imbalance_from_hsv(hsv),
      "saturation_std": jnp.std(hsv[..., 1], axis=(1, 2)),
      "value_std": jnp.std(hsv[..., 2], axis=(1, 2)),
  }


def even_pixels_metrics(images: jax.Array) -> dict[str, jax.Array]:
  """srmbench's four Even Pixels metrics of a batch (scalars, float32).

  Args:
    images: [B, H, W, 3] in [-1, 1] (NHWC).

  Returns:
    {'is_color_count_even', 'color_imbalance_count', 'saturation_std', 'value_std'}.
  """
  per_image = per_image_metrics(_check_images(jnp.asarray(images)))
  imbalance = per_image["color_imbalance"]
  return {
      "is_color_count_even": jnp.mean((imbalance == 0).astype(jnp.float32)),
      "color_imbalance_count": jnp.mean(imbalance.astype(jnp.float32)),
      "saturation_std": jnp.mean(per_image["saturation_std"]),
      "value_std": jnp.mean(per_image["value_std"]),
  }
