"""Tests for ipr_jax.models.unet against spec §1 and the reference's outputs."""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden_unet

from ipr_jax.conversion import state_dict as sd_lib
from ipr_jax.models import denoiser
from ipr_jax.models import unet as unet_lib

# Spec §1.9: unique parameter counts of the reference.
PRESET_CASES = [
    ("unet_32", 3, 7, 32, 19_718_791),
    ("unet_128", 3, 7, 128, 76_765_191),
    ("unet_256", 1, 3, 252, 118_994_691),
]

# Two levels with odd sizes (5 -> 3, so a 3 -> 5 nearest upsample), attention
# (2 heads) at the last level and in the bottleneck. Small, because Flax init
# (threefry per parameter) compiles slowly on CPU.
TINY = dict(
    hid_dims=(32, 32),
    attention=(False, True),
    d_in=3,
    d_out=7,
    num_blocks=1,
    t_emb_dim=32,
    num_head_channels=16,
    dropout=0.5,
)
TINY_HW = 5


def _inputs(hw, d_in, batch=2, seed=0):
  kz, kt = jax.random.split(jax.random.key(seed))
  z = jax.random.normal(kz, (batch, hw, hw, d_in))
  t = jax.random.uniform(kt, (batch, hw, hw, 1))
  return z, t


def _random_params(model, seed=0, scale=0.1):
  """Non-zero params (no zero-init layers) so outputs are informative."""
  shapes = sd_lib.param_shapes(model)
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in shapes.items():
    if path[-1] == "scale":
      flat[path] = 1 + scale * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[:-1])) if path[-1] == "kernel" else 1
      flat[path] = (
          rng.standard_normal(shape) / math.sqrt(fan_in) * (1.0 if path[-1] == "kernel" else scale)
      )
  flat = {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}
  return flax.traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------
# Sizes and parameter counts.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset,d_in,d_out,hw,count", PRESET_CASES)
def test_preset_parameter_counts_and_shapes(preset, d_in, d_out, hw, count):
  model = unet_lib.make_unet(preset, d_in, d_out)
  z = jax.ShapeDtypeStruct((2, hw, hw, d_in), jnp.float32)
  t = jax.ShapeDtypeStruct((2, hw, hw, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), z, t)
  leaves = jax.tree.leaves(variables["params"])
  assert sum(leaf.size for leaf in leaves) == count
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  out, inter = jax.eval_shape(
      functools.partial(model.apply, mutable=["intermediates"]),
      {"params": variables["params"]},
      z,
      t,
  )
  assert out.shape == (2, hw, hw, d_out) and out.dtype == jnp.float32
  bottom = unet_lib.level_sizes((hw, hw), len(model.hid_dims))[-1]
  (bottleneck,) = inter["intermediates"]["bottleneck_out"]
  assert bottleneck.shape == (2, *bottom, model.hid_dims[-1])


def test_level_sizes_follow_stride2_pad1_conv():
  # Spec §1.6: 252->126->63->32->16->8, 128->...->8, 32->16->8->4.
  assert unet_lib.level_sizes((252, 252), 6) == [
      (252, 252),
      (126, 126),
      (63, 63),
      (32, 32),
      (16, 16),
      (8, 8),
  ]
  assert [s[0] for s in unet_lib.level_sizes((128, 128), 5)] == [128, 64, 32, 16, 8]
  assert [s[0] for s in unet_lib.level_sizes((32, 32), 4)] == [32, 16, 8, 4]


# ---------------------------------------------------------------------------
# Resizing (spec §1.3, §1.6).
# ---------------------------------------------------------------------------


def test_nearest_indices_32_to_63_and_doubling():
  expected = [k for k in range(31) for _ in range(2)] + [31]
  np.testing.assert_array_equal(unet_lib.nearest_indices(32, 63), expected)
  np.testing.assert_array_equal(unet_lib.nearest_indices(16, 32), np.arange(32) // 2)
  np.testing.assert_array_equal(unet_lib.nearest_indices(7, 7), np.arange(7))
  # Half-pixel-centre nearest (jax.image.resize) differs exactly at 31..61 odd.
  half_pixel = np.floor((np.arange(63) + 0.5) * 32 / 63).astype(int)
  differs = np.nonzero(half_pixel != unet_lib.nearest_indices(32, 63))[0]
  np.testing.assert_array_equal(differs, np.arange(31, 62, 2))


def test_nearest_resize_gathers_rows_and_columns():
  x = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)
  out = unet_lib.nearest_resize(x, (63, 63))
  idx = [k for k in range(31) for _ in range(2)] + [31]
  np.testing.assert_array_equal(out, np.asarray(x)[:, idx][:, :, idx])


def _bilinear_reference(x, out_size, src):
  """float64 separable bilinear resize of axis 1 and 2 with given sources."""
  x = np.asarray(x, np.float64)
  n = x.shape[1]
  i0 = np.floor(src).astype(int)
  i1 = np.minimum(i0 + 1, n - 1)
  w = src - i0
  x = x[:, i0] * (1 - w)[None, :, None, None] + x[:, i1] * w[None, :, None, None]
  x = x[:, :, i0] * (1 - w)[None, None, :, None] + x[:, :, i1] * w[None, None, :, None]
  assert x.shape[1:3] == (out_size, out_size)
  return x


# Spec §1.3: source coordinates for 252 -> 126/63/32/16/8.
@pytest.mark.parametrize(
    "out_size,slope,offset",
    [(126, 2.0, 0.5), (63, 4.0, 1.5), (32, 7.875, 3.4375), (16, 15.75, 7.375), (8, 31.5, 15.25)],
)
def test_bilinear_downsampling_uses_torch_source_coordinates(out_size, slope, offset):
  x = jax.random.uniform(jax.random.key(3), (2, 252, 252, 1))
  src = slope * np.arange(out_size) + offset
  expected = _bilinear_reference(x, out_size, src)
  out = unet_lib.bilinear_resize(x, (out_size, out_size))
  np.testing.assert_allclose(out, expected, atol=2e-6)


def test_bilinear_upsampling_clamps_at_the_borders():
  x = jax.random.normal(jax.random.key(4), (1, 6, 6, 2))
  src = np.clip((np.arange(15) + 0.5) * 6 / 15 - 0.5, 0, None)
  expected = _bilinear_reference(x, 15, src)
  out = unet_lib.bilinear_resize(x, (15, 15))
  np.testing.assert_allclose(out, expected, atol=2e-6)


def test_bilinear_matches_scale_and_translate_without_antialias():
  # An independent implementation of the same convention. It inverts the
  # float32 scale out/in (32/252 is inexact), so it agrees to ~2e-5, not to
  # the ulp; a different convention would be off by ~1e-1.
  x = jax.random.uniform(jax.random.key(5), (2, 252, 252, 1))
  for size in (63, 32):
    ref = jax.image.scale_and_translate(
        x,
        (2, size, size, 1),
        (1, 2),
        jnp.full((2,), size / 252),
        jnp.zeros((2,)),
        method="linear",
        antialias=False,
    )
    np.testing.assert_allclose(unet_lib.bilinear_resize(x, (size, size)), ref, atol=5e-5)


def test_bilinear_same_size_is_identity():
  x = jax.random.normal(jax.random.key(6), (2, 9, 9, 1))
  np.testing.assert_array_equal(unet_lib.bilinear_resize(x, (9, 9)), x)


# ---------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------


def test_downsample_samples_even_positions_with_symmetric_padding():
  # PyTorch Conv2d(3, stride 2, padding 1): output (i, j) is centred on input
  # (2i, 2j). padding="SAME" would centre on (2i+1, 2j+1) for even sizes.
  x = jax.random.normal(jax.random.key(7), (1, 8, 8, 2))
  kernel = np.zeros((3, 3, 2, 2), np.float32)
  kernel[1, 1] = np.eye(2)
  params = {"downsample": {"kernel": kernel, "bias": np.zeros(2, np.float32)}}
  out = unet_lib.Downsample().apply({"params": params}, x)
  np.testing.assert_allclose(out, np.asarray(x)[:, ::2, ::2], atol=1e-6)


def _legacy_attention_reference(x_nhwc, p, heads, groups):
  """Spec §1.5 in float64, in the reference's [B, C, T] formulation."""
  x = np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)
  b, c, h, w = x.shape
  xs = x.reshape(b, c, h * w)
  g = xs.reshape(b, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
  xn = g.reshape(b, c, -1) * p["norm_w"][:, None] + p["norm_b"][:, None]
  qkv = np.einsum("oc,bct->bot", p["qkv_w"], xn) + p["qkv_b"][:, None]
  qkv = qkv.reshape(b * heads, -1, h * w)  # heads first, then q/k/v
  ch = qkv.shape[1] // 3
  q, k, v = qkv[:, :ch], qkv[:, ch : 2 * ch], qkv[:, 2 * ch :]
  scale = ch**-0.25
  logits = np.einsum("bct,bcs->bts", q * scale, k * scale)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  a = np.einsum("bts,bcs->bct", weights, v).reshape(b, c, h * w)
  out = np.einsum("oc,bct->bot", p["proj_w"], a) + p["proj_b"][:, None]
  return (out + xs).reshape(b, c, h, w).transpose(0, 2, 3, 1)


def test_attention_uses_the_legacy_head_major_qkv_layout():
  c, heads, groups = 64, 4, 8
  rng = np.random.default_rng(0)
  p = dict(
      norm_w=1 + 0.1 * rng.standard_normal(c),
      norm_b=0.1 * rng.standard_normal(c),
      qkv_w=rng.standard_normal((3 * c, c)) / 8,
      qkv_b=0.1 * rng.standard_normal(3 * c),
      proj_w=rng.standard_normal((c, c)) / 8,
      proj_b=0.1 * rng.standard_normal(c),
  )
  x = rng.standard_normal((2, 5, 3, c)).astype(np.float32)
  f32 = lambda a: np.asarray(a, np.float32)
  params = {
      "norm": {"scale": f32(p["norm_w"]), "bias": f32(p["norm_b"])},
      "qkv": {"kernel": f32(p["qkv_w"].T), "bias": f32(p["qkv_b"])},
      "proj": {"kernel": f32(p["proj_w"].T), "bias": f32(p["proj_b"])},
  }
  attention = unet_lib.SelfAttention(num_head_channels=c // heads, num_groups=groups)
  out = attention.apply({"params": params}, x)
  expected = _legacy_attention_reference(x, p, heads, groups)
  np.testing.assert_allclose(out, expected, atol=2e-5)


# ---------------------------------------------------------------------------
# Initialisation.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_fresh():
  model = unet_lib.UNet(**TINY)
  z, t = _inputs(TINY_HW, TINY["d_in"])
  params = jax.jit(model.init)(jax.random.key(0), z, t)["params"]
  return model, params, z, t


def test_fresh_model_outputs_exactly_zero(tiny_fresh):
  model, params, z, t = tiny_fresh
  out = jax.jit(model.apply)({"params": params}, z, t)
  assert out.shape == (2, TINY_HW, TINY_HW, TINY["d_out"])
  np.testing.assert_array_equal(out, 0.0)


def test_zero_init_exactly_the_reference_layers(tiny_fresh):
  _, params, _, _ = tiny_fresh
  flat = flax.traverse_util.flatten_dict(params)
  zero_layers = ("conv_2_2", "proj", "out_2")
  modules = {path[:-1] for path in flat}
  num_zero = 0
  for module in modules:
    kernel = flat.get(module + ("kernel",))
    if kernel is None:  # GroupNorm: scale 1, bias 0
      np.testing.assert_array_equal(flat[module + ("scale",)], 1.0)
      np.testing.assert_array_equal(flat[module + ("bias",)], 0.0)
    elif module[-1] in zero_layers:
      num_zero += 1
      np.testing.assert_array_equal(kernel, 0.0)
      np.testing.assert_array_equal(flat[module + ("bias",)], 0.0)
    else:
      # PyTorch default: U(+-1/sqrt(fan_in)) for weight and bias.
      bound = 1 / math.sqrt(np.prod(kernel.shape[:-1]))
      assert np.abs(kernel).max() <= bound
      assert np.abs(kernel).max() > 0.5 * bound
      assert np.abs(flat[module + ("bias",)]).max() <= bound
      assert np.abs(flat[module + ("bias",)]).max() > 0
  # ResBlocks (encoder 2, bottleneck 2, decoder 4), attentions (encoder 1,
  # bottleneck 1, decoder 2) and the output conv.
  assert num_zero == 8 + 4 + 1


def test_bf16_compute_is_close_to_float32():
  model32 = unet_lib.UNet(**TINY)
  model16 = unet_lib.UNet(**{**TINY, "dtype": jnp.bfloat16})
  params = _random_params(model32)
  z, t = _inputs(TINY_HW, TINY["d_in"], seed=1)
  out32 = jax.jit(model32.apply)({"params": params}, z, t)
  out16 = jax.jit(model16.apply)({"params": params}, z, t)
  assert out16.dtype == jnp.float32
  assert float(jnp.abs(out32).max()) > 0.1
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0 < rel < 3e-2
  shapes = jax.eval_shape(model16.init, jax.random.key(0), z, t)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))


def test_dropout_only_in_training():
  model = unet_lib.UNet(**TINY)
  params = _random_params(model, seed=2)
  z, t = _inputs(TINY_HW, TINY["d_in"], seed=2)

  @jax.jit
  def run(key_a, key_b):
    apply = functools.partial(model.apply, {"params": params}, z, t)
    return (
        apply(train=False),
        apply(train=True, rngs={"dropout": key_a}),
        apply(train=True, rngs={"dropout": key_b}),
    )

  eval_plain, train_a, train_b = run(jax.random.key(0), jax.random.key(1))
  assert float(jnp.abs(train_a - train_b).max()) > 1e-3
  assert float(jnp.abs(train_a - eval_plain).max()) > 1e-3
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda: model.apply({"params": params}, z, t, train=True))


# ---------------------------------------------------------------------------
# Input validation.
# ---------------------------------------------------------------------------


def _trace(model, z_shape, t_shape):
  z = jax.ShapeDtypeStruct(z_shape, jnp.float32)
  t = jax.ShapeDtypeStruct(t_shape, jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), z, t)


@pytest.mark.parametrize("t_shape", [(2, 8, 8), (2, 8, 6, 1), (1, 8, 8, 1), (2, 8, 8, 3)])
def test_wrong_time_map_shape_raises(t_shape):
  model = unet_lib.UNet(**TINY)
  with pytest.raises(ValueError, match=r"time map t has shape"):
    _trace(model, (2, 8, 8, 3), t_shape)


def test_wrong_input_channels_raise():
  with pytest.raises(ValueError, match=r"d_in=3"):
    _trace(unet_lib.UNet(**TINY), (2, 8, 8, 1), (2, 8, 8, 1))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(hid_dims=(64, 128, 128, 250)), "250"),
        (dict(hid_dims=(64, 128, 128, 256), num_groups=48), "num_groups=48"),
        (dict(attention=(False, True, True)), "len\\(attention\\)=3"),
        (dict(num_head_channels=48), "num_head_channels=48"),
    ],
)
def test_bad_configs_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    unet_lib.make_unet("unet_32", 3, 7, **overrides)
  model = unet_lib.UNet(**{**unet_lib.UNET_PRESETS["unet_32"], "d_in": 3, "d_out": 7, **overrides})
  with pytest.raises(ValueError, match=match):
    _trace(model, (1, 32, 32, 3), (1, 32, 32, 1))


def test_group_norm_widths_cover_decoder_concatenations():
  model = unet_lib.make_unet("unet_32", 3, 7)
  # Decoder ResBlock inputs from spec §1.9 (unet_32).
  widths = set(unet_lib.group_norm_widths(model))
  assert {512, 384, 256, 192, 128, 64} <= widths


def test_unknown_preset_raises():
  with pytest.raises(ValueError, match="unet_64"):
    unet_lib.make_unet("unet_64", 3, 7)


# ---------------------------------------------------------------------------
# Golden parity with the PyTorch reference (tests/golden/README.md).
# ---------------------------------------------------------------------------


def _load_golden(golden_dir, case):
  del golden_dir  # conftest.load_golden_unet reads tests/golden itself.
  return load_golden_unet(case)


def _nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


@pytest.mark.parametrize("case", ["ms", "ep"])
def test_time_embedding_matches_reference_probes(golden_dir, case):
  arrays, config, state_dict, model = _load_golden(golden_dir, case)
  probe_t = arrays["temb_probe_t"]
  sinusoid = unet_lib.sinusoidal_embedding(jnp.asarray(probe_t), config["sinusoid_d_emb"])
  # |arg| reaches 999 rad, whose float32 ulp is 6e-5: 1e-4 is rounding only.
  np.testing.assert_allclose(sinusoid, arrays["temb_probe_sinusoid"], atol=1e-4, rtol=0)
  params = sd_lib.unet_params_from_state_dict(state_dict, model)
  embed = unet_lib.TimeEmbedding(model.t_emb_dim, model.d_emb).apply(
      {"params": params["time_embedding"]}, jnp.asarray(probe_t)
  )
  np.testing.assert_allclose(embed, arrays["temb_probe_out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["ms", "ep"])
def test_forward_matches_reference(golden_dir, case):
  arrays, config, state_dict, model = _load_golden(golden_dir, case)
  params = sd_lib.unet_params_from_state_dict(state_dict, model)
  forward = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  prefixes = [""] + (["pixt_"] if case == "ep" else [])
  for prefix in prefixes:
    t_key = "pixt_t" if prefix else "t"
    raw, inter = forward({"params": params}, _nhwc(arrays["z"]), _nhwc(arrays[t_key]))
    out = denoiser.srm_head(raw, config["patch_size"])
    (bottleneck,) = inter["intermediates"]["bottleneck_out"]
    for name, ours in [("mean_theta", out.u), ("v_theta", out.v), ("sigma_theta", out.sigma)]:
      np.testing.assert_allclose(
          ours, _nhwc(arrays[prefix + name]), atol=1e-4, rtol=0, err_msg=prefix + name
      )
    # raw carries the x10 log-variance row (|raw| up to ~11).
    np.testing.assert_allclose(
        raw, _nhwc(arrays[prefix + "raw"]), atol=1e-4, rtol=1e-5, err_msg=prefix + "raw"
    )
    np.testing.assert_allclose(
        bottleneck,
        _nhwc(arrays[prefix + "bottleneck_out"]),
        atol=1e-4,
        rtol=0,
        err_msg=prefix + "bottleneck_out",
    )


# ---------------------------------------------------------------------------
# The time embedded per patch where that is exact (UNet.time_patch_size).
# ---------------------------------------------------------------------------


def test_level_time_patch_of_the_paper_sudoku():
  sizes = unet_lib.level_sizes((252, 252), 6)
  patches = [unet_lib.level_time_patch((252, 252), s, 28) for s in sizes]
  # 252 -> 126 -> 63 are exact 2x steps inside 28-pixel patches; 63 -> 32 mixes patches, and
  # 9 patches do not tile 16 or 8 pixels.
  assert patches == [(28, 28), (14, 14), (7, 7), None, None, None]
  assert unet_lib.level_time_patch((252, 252), (126, 126), None) is None


@pytest.mark.parametrize(
    "in_size,patch,out_size,expected",
    [
        (16, 4, 8, 2),  # 2x: taps 2j, 2j+1 of one patch, weights 0.5 / 0.5
        (8, 2, 4, 1),  # down to one pixel per patch
        (12, 4, 6, 2),  # 3 patches of 4 -> 3 of 2
        (12, 4, 9, None),  # scale 4/3: weights like 0.83 / 0.17 round differently
        (8, 1, 4, None),  # 8 one-pixel patches cannot tile 4 pixels
        (10, 4, 5, None),  # the patch size does not divide the image
        (8, 2, 8, 2),  # same size: the identity
    ],
)
def test_level_time_patch_boundary(in_size, patch, out_size, expected):
  got = unet_lib.level_time_patch((in_size, in_size), (out_size, out_size), patch)
  assert got == (None if expected is None else (expected, expected))
  # Where exact, bilinear resizing of any patch-constant map is bit for bit the patch values
  # repeated; where not, a random patch-constant map shows a block that is not constant.
  grid = in_size // patch if in_size % patch == 0 else None
  if grid is None:
    return
  rng = np.random.default_rng(0)
  values = rng.uniform(size=(3, grid, grid, 1)).astype(np.float32)
  t = np.repeat(np.repeat(values, patch, axis=1), patch, axis=2)
  resized = np.asarray(unet_lib.bilinear_resize(jnp.asarray(t), (out_size, out_size)))
  if expected is not None:
    np.testing.assert_array_equal(
        resized, np.repeat(np.repeat(values, expected, axis=1), expected, axis=2)
    )
  elif out_size % grid == 0:
    q = out_size // grid
    blocks = resized.reshape(3, grid, q, grid, q)
    assert not np.array_equal(blocks, np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape))


def _patch_constant_time(batch, size, patch, seed=0):
  values = jax.random.uniform(jax.random.key(seed), (batch, size // patch, size // patch, 1))
  values = values.at[:, 0, 0].set(0.0).at[:, 0, 1].set(1.0)
  return jnp.repeat(jnp.repeat(values, patch, axis=1), patch, axis=2)


def test_per_patch_time_embedding_equals_the_per_pixel_one():
  # 24x24 in 4-pixel patches over 4 levels: 24 (4), 12 (2), 6 (1) per patch, 3 per pixel (6
  # patches do not tile 3 pixels): both paths in one model.
  fields = dict(
      hid_dims=(32, 32, 32, 32),
      attention=(False, False, True, True),
      d_in=1,
      d_out=3,
      num_blocks=1,
      t_emb_dim=32,
      d_emb=16,
      num_head_channels=16,
      dropout=0.0,
  )
  per_pixel = unet_lib.UNet(**fields)
  per_patch = unet_lib.UNet(**fields, time_patch_size=4)
  sizes = unet_lib.level_sizes((24, 24), 4)
  assert [unet_lib.level_time_patch((24, 24), s, 4) for s in sizes] == [
      (4, 4),
      (2, 2),
      (1, 1),
      None,
  ]
  params = _random_params(per_pixel)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      _random_params(per_patch)
  )
  z = jax.random.normal(jax.random.key(1), (2, 24, 24, 1))
  t = _patch_constant_time(2, 24, 4)
  want = jax.jit(per_pixel.apply)({"params": params}, z, t)
  got = jax.jit(per_patch.apply)({"params": params}, z, t)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
  # And it is the cheaper program.
  flops = lambda m: jax.jit(m.apply).lower({"params": params}, z, t).cost_analysis()["flops"]
  assert flops(per_patch) < flops(per_pixel)


@pytest.mark.parametrize("case", ["ms", "ep"])
def test_forward_matches_reference_with_the_time_per_patch(golden_dir, case):
  """The goldens' time maps are constant per patch (kron(t_patch, ones)): the per-patch path
  meets the same tolerance as the per-pixel one."""
  arrays, config, state_dict, model = _load_golden(golden_dir, case)
  model = model.clone(time_patch_size=config["patch_size"])
  params = sd_lib.unet_params_from_state_dict(state_dict, model)
  raw = jax.jit(model.apply)({"params": params}, _nhwc(arrays["z"]), _nhwc(arrays["t"]))
  np.testing.assert_allclose(raw, _nhwc(arrays["raw"]), atol=1e-4, rtol=1e-5)


def test_remat_keeps_the_parameters_and_the_gradients():
  fields = dict(TINY, dropout=0.0)
  plain, remat = unet_lib.UNet(**fields), unet_lib.UNet(**fields, remat=True)
  z, t = _inputs(TINY_HW, 3)
  init = lambda m: jax.eval_shape(m.init, jax.random.key(0), z, t)
  assert init(plain) == init(remat)
  params = _random_params(plain)

  def loss(model, p):
    return jnp.mean(model.apply({"params": p}, z, t, train=True) ** 2)

  want = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(params)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(params)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got[1], want[1]
  )
