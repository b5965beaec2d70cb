"""The SRM output head: raw U-Net channels -> (u, v, logvar, sigma), spec §1.1.

The raw output has C = 2 d + 1 channels:
- `u` = raw[..., :d], the model output in the flow's parameterisation (`config.flow`,
  `ipr_jax.noise.flows`): the velocity ("ut") of the default rectified flow and of the
  cosine flow, the noise ("eps") or v of the diffusion flows; the name is kept from the
  rectified flow;
- `v` = (raw[..., d:2d] + 1) / 2, the learned-range interpolation weight,
  deliberately not clamped to [0, 1] (as in the reference);
- `logvar` = the last channel average-pooled over each P x P patch and
  broadcast back, so it is constant within a patch;
- `sigma` = exp(logvar / 2), the per-patch uncertainty used for greedy patch
  selection and the NLL loss.
"""

from __future__ import annotations

import numbers
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class DenoiserOutput:
  u: Array  # [B, H, W, d] model output in the flow's parameterisation (rectified: eps - x)
  v: Array  # [B, H, W, d] learned-range weight, unclamped
  logvar: Array  # [B, H, W, 1] patch-constant log-variance
  sigma: Array  # [B, H, W, 1] exp(logvar / 2)


def _check_patch_size(shape: tuple[int, ...], patch_size: int) -> None:
  height, width = shape[1:3]
  if (
      not isinstance(patch_size, numbers.Integral)
      or patch_size < 1
      or height % patch_size
      or width % patch_size
  ):
    raise ValueError(
        f"patch_size={patch_size!r} does not divide the image " f"size {height}x{width}"
    )


def _patch_mean(x: Array, patch_size: int) -> Array:
  """[B, H, W, C] -> [B, H/P, W/P, C] means over P x P patches."""
  b, height, width, c = x.shape
  p = patch_size
  x = x.reshape(b, height // p, p, width // p, p, c)
  return x.mean(axis=(2, 4))


def srm_head(raw: Array, patch_size: int | None) -> DenoiserOutput:
  """Splits the raw denoiser output as the reference Wrapper does.

  Args:
    raw: [B, H, W, 2 d + 1] raw U-Net output.
    patch_size: P; must divide H and W. P = 1 leaves logvar per pixel;
      None averages it over the whole image (the reference's image-level
      baseline).

  Returns:
    DenoiserOutput in float32.
  """
  if raw.ndim != 4 or raw.shape[-1] < 3 or raw.shape[-1] % 2 != 1:
    raise ValueError(f"raw output has shape {raw.shape}; expected " "[B, H, W, 2 d + 1]")
  raw = raw.astype(jnp.float32)
  d = (raw.shape[-1] - 1) // 2
  u = raw[..., :d]
  v = (raw[..., d : 2 * d] + 1) / 2
  logvar = raw[..., -1:]
  if patch_size is None:
    logvar = jnp.broadcast_to(logvar.mean(axis=(1, 2), keepdims=True), logvar.shape)
  else:
    _check_patch_size(raw.shape, patch_size)
    if patch_size > 1:
      pooled = _patch_mean(logvar, patch_size)
      logvar = jnp.repeat(jnp.repeat(pooled, patch_size, axis=1), patch_size, axis=2)
  sigma = jnp.exp(0.5 * logvar)
  return DenoiserOutput(u=u, v=v, logvar=logvar, sigma=sigma)


def patch_sigma(sigma: Array, patch_size: int) -> Array:
  """Per-patch sigma as a row-major vector, like the sampler's avg-pool.

  Args:
    sigma: [B, H, W, 1] (patch-constant, as `srm_head` returns it).
    patch_size: P; must divide H and W.

  Returns:
    [B, N] with N = (H / P) * (W / P), patch (i, j) at index i * (W / P) + j.
  """
  if sigma.ndim != 4 or sigma.shape[-1] != 1:
    raise ValueError(f"sigma has shape {sigma.shape}; expected [B, H, W, 1]")
  _check_patch_size(sigma.shape, patch_size)
  pooled = _patch_mean(sigma, patch_size)
  return pooled.reshape(sigma.shape[0], -1)


def make_denoise_fn(
    model: nn.Module, patch_size: int | None
) -> Callable[[dict, Array, Array], DenoiserOutput]:
  """`denoise(params, z, t) -> DenoiserOutput`, the model in eval mode.

  Args:
    model: a `UNet` (or any module with the same call signature).
    patch_size: patch size for `srm_head`.

  Returns:
    A pure function of (params, z [B, H, W, d], t [B, H, W, 1]); `params` is
    the 'params' collection (not the full variables dict). Not jitted.
  """

  def denoise(params, z: Array, t: Array) -> DenoiserOutput:
    raw = model.apply({"params": params}, z, t, train=False)
    return srm_head(raw, patch_size)

  return denoise
