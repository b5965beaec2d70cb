"""Tests for ipr_jax.models.denoiser (spec §1.1)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.conversion import state_dict as sd_lib
from ipr_jax.models import denoiser
from ipr_jax.models import unet as unet_lib


def _raw(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2, jnp.float32)


def test_srm_head_splits_channels_and_pools_logvar():
  b, h, w, d, p = 2, 8, 12, 3, 4
  raw = _raw((b, h, w, 2 * d + 1))
  out = denoiser.srm_head(raw, p)
  raw_np = np.asarray(raw, np.float64)
  np.testing.assert_array_equal(out.u, raw[..., :d])
  # v is (raw + 1) / 2 and not clamped: |raw| ~ 2 gives v outside [0, 1].
  np.testing.assert_allclose(out.v, (raw_np[..., d : 2 * d] + 1) / 2, rtol=1e-6)
  assert float(out.v.min()) < 0 and float(out.v.max()) > 1
  expected = np.empty((b, h, w, 1))
  for i in range(h // p):
    for j in range(w // p):
      patch = raw_np[:, i * p : (i + 1) * p, j * p : (j + 1) * p, -1]
      expected[:, i * p : (i + 1) * p, j * p : (j + 1) * p, 0] = patch.mean(axis=(1, 2))[
          :, None, None
      ]
  np.testing.assert_allclose(out.logvar, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.sigma, np.exp(expected / 2), rtol=1e-5)
  for x in (out.u, out.v, out.logvar, out.sigma):
    assert x.dtype == jnp.float32


def test_srm_head_patch_one_and_whole_image():
  raw = _raw((2, 6, 6, 3), seed=1)
  per_pixel = denoiser.srm_head(raw, 1)
  np.testing.assert_array_equal(per_pixel.logvar, raw[..., 2:])
  whole = denoiser.srm_head(raw, None)
  np.testing.assert_allclose(
      whole.logvar,
      np.broadcast_to(np.asarray(raw)[..., 2:].mean(axis=(1, 2), keepdims=True), (2, 6, 6, 1)),
      rtol=1e-5,
      atol=1e-6,
  )


def test_srm_head_casts_bf16_to_float32():
  out = denoiser.srm_head(_raw((1, 4, 4, 3)).astype(jnp.bfloat16), 2)
  assert out.u.dtype == out.sigma.dtype == jnp.float32


def test_patch_sigma_is_row_major():
  gh, gw, p = 3, 4, 2
  values = np.arange(1, gh * gw + 1, dtype=np.float32).reshape(gh, gw)
  sigma = np.kron(values, np.ones((p, p), np.float32))[None, :, :, None]
  sigma = np.concatenate([sigma, 2 * sigma])
  out = denoiser.patch_sigma(jnp.asarray(sigma), p)
  assert out.shape == (2, gh * gw)
  np.testing.assert_array_equal(out[0], np.arange(1, gh * gw + 1))
  np.testing.assert_array_equal(out[1], 2 * np.arange(1, gh * gw + 1))


@pytest.mark.parametrize("patch_size", [5, 0, 3.0])
def test_patch_size_not_dividing_raises(patch_size):
  with pytest.raises(ValueError, match=f"patch_size={patch_size!r}"):
    denoiser.srm_head(_raw((1, 8, 12, 3)), patch_size)
  with pytest.raises(ValueError, match=f"patch_size={patch_size!r}"):
    denoiser.patch_sigma(jnp.ones((1, 8, 12, 1)), patch_size)


def test_bad_raw_channels_raise():
  with pytest.raises(ValueError, match=r"\(1, 8, 8, 4\)"):
    denoiser.srm_head(_raw((1, 8, 8, 4)), 2)
  with pytest.raises(ValueError, match=r"\(1, 8, 8, 2\)"):
    denoiser.patch_sigma(jnp.ones((1, 8, 8, 2)), 2)


def test_make_denoise_fn_with_zero_output_conv():
  # With the output conv at zero (as at init), raw = 0, so u = 0, v = 1/2,
  # logvar = 0 and sigma = 1 (spec §1.8) whatever the other weights are.
  model = unet_lib.UNet(
      hid_dims=(32, 32),
      attention=(False, True),
      d_in=3,
      d_out=7,
      num_blocks=1,
      t_emb_dim=16,
      num_head_channels=16,
  )
  rng = np.random.default_rng(0)
  flat = {
      path: 0.1 * rng.standard_normal(shape) for path, shape in sd_lib.param_shapes(model).items()
  }
  flat = {path: np.zeros_like(v) if path[1] == "out_2" else v for path, v in flat.items()}
  params = flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}
  )
  denoise = jax.jit(denoiser.make_denoise_fn(model, patch_size=4))
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  t = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  out = denoise(params, z, t)
  assert isinstance(out, denoiser.DenoiserOutput)
  assert out.u.shape == out.v.shape == (2, 8, 8, 3)
  assert out.logvar.shape == out.sigma.shape == (2, 8, 8, 1)
  np.testing.assert_array_equal(out.u, 0.0)
  np.testing.assert_array_equal(out.v, 0.5)
  np.testing.assert_array_equal(out.logvar, 0.0)
  np.testing.assert_array_equal(out.sigma, 1.0)
  np.testing.assert_array_equal(denoiser.patch_sigma(out.sigma, 4), 1.0)
