"""The SRM U-Net denoiser (spec §1.2-1.9), in flax.linen, NHWC.

The network maps a noisy image `z` [B, H, W, d_in] and a per-pixel time map
`t` [B, H, W, 1] to the raw denoiser output [B, H, W, d_out]; `denoiser.py`
splits that into (u, v, logvar). It follows the PyTorch reference
(ahn-ml/IPR, `src/model/denoiser/unet`) operation by operation:

- every ResBlock conditions on the time map resized (bilinear, PyTorch
  semantics) to its own resolution and embedded per pixel;
- down- and upsampling reproduce PyTorch's stride-2 conv with symmetric
  padding and its legacy nearest interpolation, including the 32 -> 63 step of
  unet_256;
- the attention uses the reference's head-major qkv channel layout, so a
  PyTorch state_dict maps 1:1 (see `state_dict.py`);
- layers the reference zero-initialises are zero-initialised here, so a fresh
  model outputs exactly zero.

Submodule names mirror the PyTorch state_dict: `encoder/blocks_7_1/qkv` is
`model.encoder.blocks.7.1.qkv`, `.../conv_1_2` is `...conv_1.2`, and so on.

Differences from the reference, all deliberate:
- the reference recomputes the time embedding in every ResBlock; here it is
  computed once per distinct resolution and forward pass and shared
  (mathematically identical);
- with `time_patch_size` = P (the caller's promise that the time map is
  constant on every P x P patch, as it is in SRM training and sampling), the
  levels whose resized time map is exactly constant per patch
  (`level_time_patches`) embed the time once per patch, and each block's time
  projection runs once per patch and is broadcast over its pixels: the same
  values as per pixel, at a fraction of the FLOPs; the other levels keep the
  per-pixel path;
- the sinusoid frequencies are float32 constants rounded from a float64 exp
  instead of a float32 exp (they agree with PyTorch's to its 1-ulp error);
- only the configuration the released experiments use is built:
  use_scale_shift_norm=False, no class embedding, conv up/downsampling, one
  `num_blocks` for all levels, the bottleneck always present;
- a `precision` field (not in the reference) selects matmul/conv precision;
  the bottleneck output is sown into 'intermediates' for debugging.

Why over 600 lines: the network mirrors the reference module by module (the state-dict names and
the conversion depend on it), and its pieces (time embedding, ResBlock, attention, resampling,
encoder, decoder) are only meaningful together.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Size = tuple[int, int]

# Group-norm epsilon of torch.nn.GroupNorm.
GROUP_NORM_EPS = 1e-5

UNET_PRESETS: dict[str, dict[str, Any]] = {
    "unet_32": dict(
        hid_dims=(64, 128, 128, 256),
        attention=(False, False, True, True),
    ),
    "unet_128": dict(
        hid_dims=(128, 128, 256, 256, 512),
        attention=(False, False, False, True, True),
    ),
    "unet_256": dict(
        hid_dims=(128, 128, 256, 256, 512, 512),
        attention=(False, False, False, False, True, True),
    ),
}


# ---------------------------------------------------------------------------
# Resizing with PyTorch semantics.
# ---------------------------------------------------------------------------


def _linear_taps(in_size: int, out_size: int):
  """Taps of `F.interpolate(mode="bilinear", align_corners=False)` on one axis.

  Computed in float32 exactly as PyTorch does:
  src = max((i + 0.5) * (in / out) - 0.5, 0), i0 = floor(src),
  i1 = min(i0 + 1, in - 1), lambda = src - i0.

  Returns:
    (i0, i1, w0, w1): int arrays and float32 weights, each [out_size].
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size).astype(f32)
  src = np.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  w1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
  w0 = (f32(1) - w1).astype(f32)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, w0, w1


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's legacy `mode="nearest"` on one axis.

  src = min(floor(i * float32(in / out)), in - 1); an exact 2x factor is
  `i >> 1`. For 32 -> 63 this gives [0, 0, 1, 1, ..., 30, 30, 31].
  """
  if out_size == in_size:
    return np.arange(out_size)
  if out_size == 2 * in_size:
    return np.arange(out_size) >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size).astype(np.float32) * scale)
  return np.minimum(src.astype(np.int64), in_size - 1)


def bilinear_resize(x: Array, size: Size) -> Array:
  """PyTorch `F.interpolate(x, size, mode="bilinear")`, no antialiasing.

  Width is interpolated first, then height, as the PyTorch CPU kernel does.
  (`jax.image.resize` antialiases when downsampling and does not match.)

  Args:
    x: [B, H, W, C].
    size: (h, w), the output spatial size.

  Returns:
    [B, h, w, C], same dtype as x.
  """
  out_h, out_w = size
  _, in_h, in_w, _ = x.shape
  if in_w != out_w:
    i0, i1, w0, w1 = _linear_taps(in_w, out_w)
    w0 = jnp.asarray(w0, x.dtype)[:, None]
    w1 = jnp.asarray(w1, x.dtype)[:, None]
    x = x[:, :, i0] * w0 + x[:, :, i1] * w1
  if in_h != out_h:
    i0, i1, w0, w1 = _linear_taps(in_h, out_h)
    w0 = jnp.asarray(w0, x.dtype)[:, None, None]
    w1 = jnp.asarray(w1, x.dtype)[:, None, None]
    x = x[:, i0] * w0 + x[:, i1] * w1
  return x


def nearest_resize(x: Array, size: Size) -> Array:
  """PyTorch legacy `F.interpolate(x, size, mode="nearest")` of [B, H, W, C]."""
  out_h, out_w = size
  _, in_h, in_w, _ = x.shape
  if in_h != out_h:
    x = x[:, nearest_indices(in_h, out_h)]
  if in_w != out_w:
    x = x[:, :, nearest_indices(in_w, out_w)]
  return x


def _axis_time_patch(in_size: int, out_size: int, patch: int) -> int | None:
  """Patch side at `out_size` if resizing keeps every patch-constant row exact.

  For any row constant on runs of `patch` samples, `bilinear_resize` to
  `out_size` gives, exactly (bit for bit), a row constant on runs of q samples
  holding the same values, if: `patch` divides `in_size`, the number of
  patches g = in_size / patch divides `out_size` (q = out_size / g), and every
  output sample j draws its nonzero-weight taps from patch j // q only, with
  weights (1, 0), (0, 1) or (0.5, 0.5) (a * 1 + b * 0 = a and
  0.5 a + 0.5 a = a exactly in floating point; other weight pairs can round).
  Returns q, or None where this does not hold.
  """
  if patch < 1 or in_size % patch:
    return None
  groups = in_size // patch
  if out_size % groups:
    return None
  q = out_size // groups
  if out_size == in_size:
    return q
  i0, i1, w0, w1 = _linear_taps(in_size, out_size)
  block = np.arange(out_size) // q
  for taps, weights in ((i0, w0), (i1, w1)):
    if np.any((weights != 0) & (taps // patch != block)):
      return None
  half = np.float32(0.5)
  pairs_ok = ((w0 == 1) & (w1 == 0)) | ((w0 == 0) & (w1 == 1)) | ((w0 == half) & (w1 == half))
  return q if bool(np.all(pairs_ok)) else None


def level_time_patch(in_size: Size, out_size: Size, time_patch_size: int | None) -> Size | None:
  """(qh, qw): patch size at `out_size` on which the resized time map is constant.

  Args:
    in_size: (H, W) of the time map fed to the U-Net.
    out_size: (h, w) of a U-Net level.
    time_patch_size: P, the side of the patches on which the time map is
      constant (None: no such promise).

  Returns:
    (qh, qw) such that `bilinear_resize(t, out_size)` is, bit for bit, patch
    (i, j) of t's P x P grid repeated over a qh x qw block, for every t that is
    constant on P x P patches; None where that is not exact at this level
    (then the level embeds its time map per pixel). Example, 252 x 252 with
    P = 28: 252 -> (28, 28), 126 -> (14, 14), 63 -> (7, 7), and 32, 16, 8 ->
    None (63 / 32 is not a 2x step and 9 patches do not tile 16 or 8 pixels).
  """
  if time_patch_size is None:
    return None
  sides = [_axis_time_patch(n, m, time_patch_size) for n, m in zip(in_size, out_size)]
  if any(q is None for q in sides):
    return None
  return tuple(sides)


def downsampled_size(size: Size) -> Size:
  """Output size of a 3x3 stride-2 conv with padding 1: ceil(n / 2)."""
  return tuple((n - 1) // 2 + 1 for n in size)


def level_sizes(size: Size, num_levels: int) -> list[Size]:
  """Spatial size at each encoder level, e.g. 252 -> 252, 126, 63, 32, 16, 8."""
  sizes = [tuple(size)]
  for _ in range(num_levels - 1):
    sizes.append(downsampled_size(sizes[-1]))
  return sizes


# ---------------------------------------------------------------------------
# Time embedding.
# ---------------------------------------------------------------------------


def sinusoidal_embedding(
    t: Array,
    d_emb: int = 256,
    scale: float = 1000.0,
    shift: float = -1.0,
    max_period: float = 10000.0,
) -> Array:
  """Sinusoidal features of the reference (cos first), in float32.

  arg_k = max(scale * t + shift, 0) * exp(-ln(max_period) * k / half).

  Args:
    t: [...] times.
    d_emb: feature width; odd widths get a zero column appended.

  Returns:
    [..., d_emb] float32.
  """
  half = d_emb // 2
  # The exponent is formed in float32 as the reference does; exp is taken in
  # float64 and rounded, so the constants do not depend on the backend's
  # float32 exp (they equal PyTorch's to within its 1-ulp exp error).
  exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(
      half
  )
  freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
  args = jnp.maximum(scale * t.astype(jnp.float32)[..., None] + shift, 0.0)
  args = args * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if d_emb % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


# ---------------------------------------------------------------------------
# Layers with PyTorch default or zero initialisation.
# ---------------------------------------------------------------------------

# kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
_torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(
    features: int,
    fan_in: int,
    *,
    name: str,
    dtype,
    precision,
    kernel_size: int = 3,
    strides: int = 1,
    zero_init: bool = False,
) -> nn.Conv:
  pad = (kernel_size - 1) // 2
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=jnp.float32,
      precision=precision,
      kernel_init=(nn.initializers.zeros if zero_init else _torch_kernel_init),
      bias_init=(nn.initializers.zeros if zero_init else _torch_bias_init(fan_in * kernel_size**2)),
      name=name,
  )


def _dense(
    features: int, fan_in: int, *, name: str, dtype, precision, zero_init: bool = False
) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      precision=precision,
      kernel_init=(nn.initializers.zeros if zero_init else _torch_kernel_init),
      bias_init=(nn.initializers.zeros if zero_init else _torch_bias_init(fan_in)),
      name=name,
  )


def _group_norm(num_groups: int, name: str):
  """GroupNorm applied in float32 (as under autocast); returns float32."""
  norm = nn.GroupNorm(
      num_groups=num_groups,
      epsilon=GROUP_NORM_EPS,
      use_fast_variance=False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      name=name,
  )
  return lambda x: norm(x.astype(jnp.float32))


# ---------------------------------------------------------------------------
# Blocks.
# ---------------------------------------------------------------------------


class TimeEmbedding(nn.Module):
  """Sinusoid -> Linear -> SiLU -> Linear (reference `time_embedding`)."""

  features: int = 512
  d_emb: int = 256
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, t: Array) -> Array:
    """[...] times -> [..., features]."""
    kw = dict(dtype=self.dtype, precision=self.precision)
    x = sinusoidal_embedding(t, self.d_emb)
    x = _dense(self.features, self.d_emb, name="mlp_0", **kw)(x)
    x = nn.silu(x)
    return _dense(self.features, self.features, name="mlp_2", **kw)(x)


class NormWithEmbedding(nn.Module):
  """GroupNorm(x + Linear(SiLU(E))): the embedding is added before the norm.

  The caller passes `emb_act` = SiLU(E) at x's resolution (shared per level),
  or per patch ([B, gh, gw, E] with gh | h, gw | w): the projection then runs
  once per patch and its output is broadcast over each patch's pixels.
  """

  num_groups: int = 32
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, emb_act: Array) -> Array:
    c = x.shape[-1]
    emb = _dense(
        c, emb_act.shape[-1], name="embedding_layer_1", dtype=self.dtype, precision=self.precision
    )(emb_act)
    if emb.shape[1:3] != x.shape[1:3]:
      b, h, w, _ = x.shape
      gh, gw = emb.shape[1:3]
      x = x.reshape(b, gh, h // gh, gw, w // gw, c)
      x = x + emb[:, :, None, :, None, :]
      return _group_norm(self.num_groups, "norm")(x.reshape(b, h, w, c))
    return _group_norm(self.num_groups, "norm")(x + emb)


class ResBlock(nn.Module):
  """GN-SiLU-Conv, NormWithEmbedding, SiLU-Dropout-Conv(zero), + skip."""

  features: int
  num_groups: int = 32
  dropout: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, emb_act: Array, train: bool) -> Array:
    """x [B, h, w, Ci], emb_act [B, h, w, t_emb] -> [B, h, w, features]."""
    kw = dict(dtype=self.dtype, precision=self.precision)
    c_in = x.shape[-1]
    h = _group_norm(self.num_groups, "conv_1_0")(x)
    h = _conv(self.features, c_in, name="conv_1_2", **kw)(nn.silu(h))
    h = NormWithEmbedding(self.num_groups, name="norm_with_embedding", **kw)(h, emb_act)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = _conv(self.features, self.features, name="conv_2_2", zero_init=True, **kw)(h)
    if c_in == self.features:
      skip = x
    else:
      skip = _conv(self.features, c_in, kernel_size=1, name="shortcut", **kw)(x)
    return h + skip


class SelfAttention(nn.Module):
  """Multi-head spatial self-attention with the reference's legacy layout.

  The 3C qkv channels are head-major: head h owns channels
  [h*3*ch, (h+1)*3*ch), split as q, k, v of `ch` channels each. q and k are
  each scaled by ch^(-1/4); the softmax runs in float32; the residual is added
  to the un-normalised input.
  """

  num_head_channels: int = 64
  num_groups: int = 32
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, h, w, C] -> [B, h, w, C]."""
    kw = dict(dtype=self.dtype, precision=self.precision)
    b, height, width, c = x.shape
    ch = self.num_head_channels
    heads = c // ch
    xs = x.reshape(b, height * width, c)
    h = _group_norm(self.num_groups, "norm")(xs)
    qkv = _dense(3 * c, c, name="qkv", **kw)(h)  # [B, T, 3C]
    qkv = qkv.reshape(b, height * width, heads, 3, ch)
    scale = 1 / ch**0.25
    q = qkv[..., 0, :] * scale
    k = qkv[..., 1, :] * scale
    v = qkv[..., 2, :]
    logits = jnp.einsum("bthc,bshc->bhts", q, k, precision=self.precision)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights = weights.astype(logits.dtype)
    out = jnp.einsum("bhts,bshc->bthc", weights, v, precision=self.precision)
    out = out.reshape(b, height * width, c)  # channel = head * ch + c
    out = _dense(c, c, name="proj", zero_init=True, **kw)(out)
    return (out + xs).reshape(b, height, width, c)


class Downsample(nn.Module):
  """3x3 conv, stride 2, padding 1 on every side (not "SAME")."""

  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    return _conv(c, c, strides=2, name="downsample", dtype=self.dtype, precision=self.precision)(x)


class Upsample(nn.Module):
  """Legacy-nearest resize to `size`, then a 3x3 conv."""

  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, size: Size) -> Array:
    c = x.shape[-1]
    x = nearest_resize(x, size)
    return _conv(c, c, name="conv", dtype=self.dtype, precision=self.precision)(x)


def _maybe_remat(block: type[nn.Module], remat: bool) -> type[nn.Module]:
  """`block`, or `nn.remat(block)` (same parameters; activations recomputed in
  the backward pass). ResBlock's `train` (argument 3, self being 0) is static."""
  if not remat:
    return block
  static = (3,) if block is ResBlock else ()
  return nn.remat(block, static_argnums=static)


class Encoder(nn.Module):
  """conv_in, then per level `num_blocks` x (ResBlock [+ Attn]) and a Downsample.

  Returns every block output (the skip stack), conv_in and downsamples
  included.
  """

  hid_dims: Sequence[int]
  attention: Sequence[bool]
  num_blocks: int = 2
  num_head_channels: int = 64
  num_groups: int = 32
  dropout: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, embs: Mapping[Size, Array], train: bool) -> list[Array]:
    kw = dict(dtype=self.dtype, precision=self.precision)
    rb = dict(num_groups=self.num_groups, dropout=self.dropout, **kw)
    res_block = _maybe_remat(ResBlock, self.remat)
    attention = _maybe_remat(SelfAttention, self.remat)
    h = _conv(self.hid_dims[0], x.shape[-1], name="blocks_0_0", **kw)(x)
    hs = [h]
    i = 1
    num_levels = len(self.hid_dims)
    for level, width in enumerate(self.hid_dims):
      for _ in range(self.num_blocks):
        h = res_block(width, name=f"blocks_{i}_0", **rb)(h, embs[h.shape[1:3]], train)
        if self.attention[level]:
          h = attention(self.num_head_channels, self.num_groups, name=f"blocks_{i}_1", **kw)(h)
        hs.append(h)
        i += 1
      if level != num_levels - 1:
        h = Downsample(name=f"blocks_{i}_0", **kw)(h)
        hs.append(h)
        i += 1
    return hs


class Bottleneck(nn.Module):
  """ResBlock, Attn, ResBlock at the lowest resolution (always present)."""

  num_head_channels: int = 64
  num_groups: int = 32
  dropout: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = None
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, emb_act: Array, train: bool) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    rb = dict(num_groups=self.num_groups, dropout=self.dropout, **kw)
    res_block = _maybe_remat(ResBlock, self.remat)
    attention = _maybe_remat(SelfAttention, self.remat)
    c = x.shape[-1]
    h = res_block(c, name="blocks_0", **rb)(x, emb_act, train)
    h = attention(self.num_head_channels, self.num_groups, name="blocks_1", **kw)(h)
    return res_block(c, name="blocks_2", **rb)(h, emb_act, train)


class Decoder(nn.Module):
  """Per level (reversed) `num_blocks + 1` x (concat skip, ResBlock [+ Attn]),
  an Upsample to the next skip's size after the last block of a level, then
  GN -> SiLU -> Conv(zero) to d_out."""

  hid_dims: Sequence[int]
  attention: Sequence[bool]
  d_out: int
  num_blocks: int = 2
  num_head_channels: int = 64
  num_groups: int = 32
  dropout: float = 0.0
  dtype: Any = jnp.float32
  precision: Any = None
  remat: bool = False

  @nn.compact
  def __call__(
      self, h: Array, skips: Sequence[Array], embs: Mapping[Size, Array], train: bool
  ) -> Array:
    kw = dict(dtype=self.dtype, precision=self.precision)
    rb = dict(num_groups=self.num_groups, dropout=self.dropout, **kw)
    res_block = _maybe_remat(ResBlock, self.remat)
    attention = _maybe_remat(SelfAttention, self.remat)
    skips = list(skips)
    num_levels = len(self.hid_dims)
    i = 0
    for rev_level in range(num_levels):
      level = num_levels - 1 - rev_level
      width = self.hid_dims[level]
      for idx in range(self.num_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)  # h first, skip second
        h = res_block(width, name=f"blocks_{i}_0", **rb)(h, embs[h.shape[1:3]], train)
        j = 1
        if self.attention[level]:
          h = attention(self.num_head_channels, self.num_groups, name=f"blocks_{i}_{j}", **kw)(h)
          j += 1
        if rev_level != num_levels - 1 and idx == self.num_blocks:
          h = Upsample(name=f"blocks_{i}_{j}", **kw)(h, skips[-1].shape[1:3])
        i += 1
    h = nn.silu(_group_norm(self.num_groups, "out_0")(h))
    return _conv(self.d_out, h.shape[-1], name="out_2", zero_init=True, **kw)(h)


class UNet(nn.Module):
  """The SRM U-Net denoiser.

  Attributes:
    hid_dims: width of each level.
    attention: per level, whether its blocks carry self-attention.
    d_in: input channels.
    d_out: output channels (2 d + 1 for the SRM head).
    num_blocks: ResBlocks per encoder level (the decoder has one more).
    t_emb_dim: width of the time-embedding MLP.
    d_emb: width of the sinusoidal features.
    num_head_channels: channels per attention head.
    dropout: dropout rate inside ResBlocks (train only).
    num_groups: GroupNorm groups.
    dtype: compute dtype; params are always float32, GroupNorm and softmax
      run in float32 and the output is float32.
    precision: matmul/conv precision passed to every layer (None = backend
      default; jax.lax.Precision.HIGHEST avoids TF32 on GPUs).
    time_patch_size: P if every time map passed in is constant on P x P
      patches (SRM training and sampling: one time per patch); the levels
      where that stays exact after resizing (`level_time_patch`) then embed
      the time per patch instead of per pixel. None: per pixel everywhere (a
      time map of any shape). Not a parameter: the same weights either way.
    remat: rematerialise every ResBlock and attention block in the backward
      pass (`nn.remat`): activations are recomputed instead of stored, for
      memory; same parameters, same values.
  """

  hid_dims: Sequence[int]
  attention: Sequence[bool]
  d_in: int
  d_out: int
  num_blocks: int = 2
  t_emb_dim: int = 512
  d_emb: int = 256
  num_head_channels: int = 64
  dropout: float = 0.1
  num_groups: int = 32
  dtype: Any = jnp.float32
  precision: Any = None
  time_patch_size: int | None = None
  remat: bool = False

  def __post_init__(self):
    # Tuples keep the module hashable (usable as a static jit argument) when
    # the widths come from a config as lists.
    object.__setattr__(self, "hid_dims", tuple(self.hid_dims))
    object.__setattr__(self, "attention", tuple(self.attention))
    super().__post_init__()

  def check_config(self) -> None:
    """Raises ValueError for widths the reference could not build."""
    if len(self.attention) != len(self.hid_dims):
      raise ValueError(
          f"len(attention)={len(self.attention)} (attention="
          f"{tuple(self.attention)}) != len(hid_dims)={len(self.hid_dims)}"
      )
    if not self.hid_dims:
      raise ValueError(f"hid_dims={tuple(self.hid_dims)} is empty")
    if self.num_blocks < 1:
      raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")
    for width in group_norm_widths(self):
      if width % self.num_groups:
        raise ValueError(
            f"GroupNorm width {width} is not divisible by num_groups="
            f"{self.num_groups} (hid_dims={tuple(self.hid_dims)})"
        )
    attn_widths = [w for w, a in zip(self.hid_dims, self.attention) if a]
    for width in attn_widths + [self.hid_dims[-1]]:
      if width % self.num_head_channels:
        raise ValueError(
            f"attention width {width} is not divisible by num_head_channels="
            f"{self.num_head_channels}"
        )

  def _time_embeddings(self, t: Array, kw: dict[str, Any]) -> dict[Size, Array]:
    """SiLU(e(t_l)) for every level size, shared by the level's blocks.

    The reference recomputes it per block. Levels where `level_time_patch`
    holds get [B, gh, gw, t_emb] (one row per patch of the time map, the
    same rows for all such levels: the MLP runs once on the patch grid);
    the others [B, h, w, t_emb] from the bilinearly resized map.

    Args:
      t: [B, H, W, 1] float32 time map.
      kw: dtype and precision of the layers.
    """
    time_embedding = TimeEmbedding(self.t_emb_dim, self.d_emb, name="time_embedding", **kw)
    full = t.shape[1:3]
    embs, per_patch = {}, None
    for size in level_sizes(full, len(self.hid_dims)):
      if size in embs:
        continue
      if level_time_patch(full, size, self.time_patch_size) is not None:
        if per_patch is None:
          p = self.time_patch_size
          per_patch = nn.silu(time_embedding(t[:, ::p, ::p, 0]))
        embs[size] = per_patch
      else:
        t_level = bilinear_resize(t, size)[..., 0]
        embs[size] = nn.silu(time_embedding(t_level))
    return embs

  @nn.compact
  def __call__(self, z: Array, t: Array, train: bool = False) -> Array:
    """Raw denoiser output.

    Args:
      z: [B, H, W, d_in] noisy image.
      t: [B, H, W, 1] per-pixel time map.
      train: enables dropout (needs rngs={'dropout': key}).

    Returns:
      [B, H, W, d_out] float32.
    """
    self.check_config()
    if z.ndim != 4 or z.shape[-1] != self.d_in:
      raise ValueError(f"z has shape {z.shape}; expected [B, H, W, " f"d_in={self.d_in}]")
    if t.shape != z.shape[:3] + (1,):
      raise ValueError(
          f"time map t has shape {t.shape}; expected "
          f"{z.shape[:3] + (1,)} ([B, H, W, 1] matching z)"
      )
    kw = dict(dtype=self.dtype, precision=self.precision)
    blocks = dict(
        num_head_channels=self.num_head_channels,
        num_groups=self.num_groups,
        dropout=self.dropout,
        remat=self.remat,
        **kw,
    )

    embs = self._time_embeddings(t.astype(jnp.float32), kw)

    hs = Encoder(self.hid_dims, self.attention, self.num_blocks, name="encoder", **blocks)(
        z, embs, train
    )
    h = hs[-1]
    h = Bottleneck(name="bottleneck", **blocks)(h, embs[h.shape[1:3]], train)
    self.sow("intermediates", "bottleneck_out", h)
    out = Decoder(
        self.hid_dims, self.attention, self.d_out, self.num_blocks, name="decoder", **blocks
    )(h, hs, embs, train)
    return out.astype(jnp.float32)


def group_norm_widths(model: UNet) -> list[int]:
  """Channel counts of every GroupNorm in the model, in build order."""
  widths = []
  cur = model.hid_dims[0]
  skips = [cur]
  for level, width in enumerate(model.hid_dims):
    for _ in range(model.num_blocks):
      widths += [cur, width] + ([width] if model.attention[level] else [])
      cur = width
      skips.append(cur)
    if level != len(model.hid_dims) - 1:
      skips.append(cur)
  widths += [cur, cur, cur, cur, cur]  # bottleneck: RB (2), Attn, RB (2)
  for level in reversed(range(len(model.hid_dims))):
    width = model.hid_dims[level]
    for _ in range(model.num_blocks + 1):
      c_in = cur + skips.pop()
      widths += [c_in, width] + ([width] if model.attention[level] else [])
      cur = width
  widths.append(cur)  # out_0
  return widths


def make_unet(preset: str, d_in: int, d_out: int, **overrides) -> UNet:
  """A UNet from `UNET_PRESETS[preset]`, with field overrides.

  Sequence fields become tuples (so the module stays hashable) and a dtype
  given by name ("bfloat16") becomes a numpy dtype.

  Raises:
    ValueError: for an unknown preset or a configuration the reference could
      not build (see `UNet.check_config`).
  """
  if preset not in UNET_PRESETS:
    raise ValueError(f"unknown U-Net preset {preset!r}; known: " f"{sorted(UNET_PRESETS)}")
  fields = dict(UNET_PRESETS[preset])
  fields.update(overrides)
  fields["hid_dims"] = tuple(int(w) for w in fields["hid_dims"])
  fields["attention"] = tuple(bool(a) for a in fields["attention"])
  if isinstance(fields.get("dtype"), str):
    fields["dtype"] = jnp.dtype(fields["dtype"])
  model = UNet(d_in=d_in, d_out=d_out, **fields)
  model.check_config()
  return model


def nonzero_init(model: UNet, shape: Sequence[int], key: jax.Array, scale: float = 0.02):
  """Parameters of `model` for images of `shape` ([H, W, d]) with no all-zero leaf.

  `model.init`, then every kernel or bias that is all zeros (the zero-initialised output layers
  of the residual blocks, the attention projections and the output head) redrawn from
  N(0, scale^2). For benchmarks and checks: a fresh SRM outputs exactly zero, which makes its
  samples equal their noise and its patch selection degenerate.
  """
  z = jnp.zeros((1, *shape), jnp.float32)
  t = jnp.zeros((1, *shape[:2], 1), jnp.float32)
  params = jax.jit(model.init)(key, z, t)["params"]
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  leaves = [
      jnp.where(jnp.all(x == 0), scale * jax.random.normal(k, x.shape, x.dtype), x)
      for x, k in zip(leaves, keys)
  ]
  return jax.tree_util.tree_unflatten(treedef, leaves)
