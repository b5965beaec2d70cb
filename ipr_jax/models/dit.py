"""A DiT denoiser with SRM's per-region noise levels: every token its own time (issue 41).

The forward pass of the SRM authors' framework's `DiT` (spatialreasoners 1.0.5,
`denoiser/dit`), in its two forms; tests/golden/spatialreasoners/README.md states each formula
and holds the framework's outputs:

- 'dit': LayerNorm (eps 1e-6, no affine), an exact-GELU MLP;
- 'lightning_dit': RMSNorm (eps 1e-6, with weight) also on q and k per head, a SwiGLU MLP and
  2D rotary position embedding (row, col) on q and k after their norm.

Both: a sinusoidal time embedding of max(1000 t - 1, 0) per token and an MLP, giving each token
its own conditioning vector c; fixed sinusoidal absolute position embedding of (col, row);
adaLN-Zero blocks (shift, scale, gate for attention and MLP, from Linear(SiLU(c))); the output
layer's adaLN (shift, scale) and a linear map to the token's outputs.

Token outputs: the model output in the flow's parameterisation (C q^2 features), then with
`predict_variance` the learned-range features (C q^2), then with `predict_uncertainty` one
log-variance per token: the framework's layout (its tokenizer reads mean = [:F], v = [F:2F],
logvar = [-1]). `DiT.__call__` puts them back on the image as [u | v | logvar] channels, so
`denoiser.srm_head` reads a DiT like the U-Net (the log-variance averaged over each region:
the framework's mean over a variable's tokens).

Parameter names follow the framework's state_dict keys (`blocks.0.attn.qkv.weight` ->
blocks_0/attn/qkv/kernel), which the converter uses.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.models import tokens as tokens_lib

Array = jax.Array
FORMS = ("dit", "lightning_dit")
# The DiT sizes (Peebles & Xie 2023), as the framework's configs use them: hidden, depth, heads.
DIT_SIZES = {
    "S": dict(hidden=384, depth=12, num_heads=6),
    "B": dict(hidden=768, depth=12, num_heads=12),
    "L": dict(hidden=1024, depth=24, num_heads=16),
    "XL": dict(hidden=1152, depth=28, num_heads=16),
}
# MLP width over hidden: DiT's 4; LightningDiT's SwiGLU int(2/3 * 4 d) (8/3).
FORM_MLP_RATIO = {"dit": 4.0, "lightning_dit": 8.0 / 3.0}
_NORM_EPS = 1e-6
_TIME_SCALE, _TIME_SHIFT = 1000.0, -1.0
_MAX_PERIOD = 10000.0


def mlp_width(hidden: int, mlp_ratio: float) -> int:
  """int(hidden * ratio), rounded first at 1e-9 so that 384 * 8/3 is 1024 (float error)."""
  return int(round(hidden * mlp_ratio, 9))


def time_sinusoid(t: Array, width: int) -> Array:
  """[...] times -> [..., width] features [cos(a f_k), sin(a f_k)], a = max(1000 t - 1, 0).

  f_k = exp(-ln(10000) k / half), k < half = width / 2; every t <= 0.001 embeds like t = 0.
  """
  half = width // 2
  freqs = jnp.exp(-math.log(_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.maximum(_TIME_SCALE * t.astype(jnp.float32) + _TIME_SHIFT, 0.0)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def position_embedding(coords: np.ndarray, width: int) -> np.ndarray:
  """[N, 2] (row, col) -> [N, width] float32 [sin(x w), cos(x w), sin(y w), cos(y w)].

  x = col, y = row (the framework's "xy" coordinates), w_k = 10000^(-k / D), D = width / 4.
  """
  d = width // 4
  omega = 1.0 / _MAX_PERIOD ** (np.arange(d, dtype=np.float32) / np.float32(d))
  x = coords[:, 1:2].astype(np.float32) * omega
  y = coords[:, 0:1].astype(np.float32) * omega
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=-1).astype(np.float32)


def rotary_angles(coords: np.ndarray, head_dim: int) -> np.ndarray:
  """[N, 2] (row, col) -> [N, head_dim] angles of the 2D rotary embedding ("ij" indexing).

  D = head_dim / 4, w_k = 10000^(-k / D); [row w, col w] with every angle repeated twice
  (interleaved pairs).
  """
  d = head_dim // 4
  omega = 1.0 / _MAX_PERIOD ** (np.arange(d, dtype=np.float32) / np.float32(d))
  angles = np.concatenate([coords[:, 0:1] * omega, coords[:, 1:2] * omega], axis=-1)
  return np.repeat(angles, 2, axis=-1).astype(np.float32)


def apply_rotary(x: Array, angles: Array) -> Array:
  """x [B, N, H, D] rotated by angles [N, D]: x cos + rotate_half(x) sin,
  rotate_half: (x_2m, x_2m+1) -> (-x_2m+1, x_2m)."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32."""

  eps: float = _NORM_EPS

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps)
    return normed * weight


def _layer_norm(x: Array) -> Array:
  """LayerNorm without affine (eps 1e-6), in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis=-1, keepdims=True)
  var = jnp.mean((x32 - mean) ** 2, axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + _NORM_EPS)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1.0 + scale) + shift


class _Settings(nn.Module):
  """Fields every DiT part shares."""

  form: str = "dit"
  dtype: Any = jnp.float32
  precision: Any = None

  def dense(self, features: int, name: str, zero: bool = False) -> nn.Dense:
    init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
    return nn.Dense(
        features,
        kernel_init=init,
        bias_init=nn.initializers.zeros,
        dtype=self.dtype,
        precision=self.precision,
        name=name,
    )

  def norm(self, x: Array, name: str) -> Array:
    if self.form == "lightning_dit":
      return RMSNorm(name=name)(x)
    return _layer_norm(x)


class Attention(_Settings):
  """Multi-head self-attention over the tokens (`jax.nn.dot_product_attention`).

  qkv = Linear(d, 3 d) split as (3, heads, head_dim); lightning_dit: RMSNorm on q and k per head,
  then the rotary embedding.
  """

  num_heads: int = 6

  @nn.compact
  def __call__(self, x: Array, angles: Array | None) -> Array:
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = self.dense(3 * d, "qkv")(x).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.form == "lightning_dit":
      assert angles is not None, "lightning_dit needs the rotary angles"
      q = RMSNorm(name="q_norm")(q)
      k = RMSNorm(name="k_norm")(k)
      q, k = apply_rotary(q, angles), apply_rotary(k, angles)
    q, k, v = (a.astype(self.dtype) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v)
    return self.dense(d, "proj")(out.reshape(b, n, d))


class FeedForward(_Settings):
  """dit: fc2(GELU_exact(fc1 x)); lightning_dit: w3(SiLU(x1) x2), (x1, x2) = halves of w12 x."""

  hidden: int = 1536

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    if self.form == "lightning_dit":
      x12 = self.dense(2 * self.hidden, "w12")(x)
      x1, x2 = jnp.split(x12, 2, axis=-1)
      return self.dense(d, "w3")(nn.silu(x1) * x2)
    return self.dense(d, "fc2")(nn.gelu(self.dense(self.hidden, "fc1")(x), approximate=False))


class Block(_Settings):
  """adaLN-Zero transformer block conditioned per token on c [B, N, d]."""

  num_heads: int = 6
  mlp_hidden: int = 1536

  @nn.compact
  def __call__(self, x: Array, c: Array, angles: Array | None) -> Array:
    d = x.shape[-1]
    mod = self.dense(6 * d, "adaLN_modulation_1", zero=True)(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod.astype(jnp.float32), 6, axis=-1)
    settings = dict(form=self.form, dtype=self.dtype, precision=self.precision)
    h = _modulate(self.norm(x, "norm1"), shift1, scale1)
    x = x + gate1 * Attention(num_heads=self.num_heads, name="attn", **settings)(h, angles)
    h = _modulate(self.norm(x, "norm2"), shift2, scale2)
    return x + gate2 * FeedForward(hidden=self.mlp_hidden, name="mlp", **settings)(h)


class DiT(_Settings):
  """The SRM DiT denoiser: [B, H, W, C] image and time map -> [B, H, W, channels out].

  Attributes:
    layout: how the image becomes tokens (`tokens.TokenLayout`; its channels are the image's).
    hidden, depth, num_heads: width, blocks and attention heads.
    mlp_ratio: MLP width over hidden (`mlp_width`).
    d_emb: width of the time sinusoid.
    predict_variance: emit the learned-range features (the SRM head's v).
    predict_uncertainty: emit one log-variance per token (the SRM head's sigma).
    remat: rematerialise every block in the backward pass (`nn.remat`; same values).
    form, dtype, precision: see `_Settings`; params are float32, norms run in float32 and the
      output is float32.
  """

  layout: tokens_lib.TokenLayout | None = None
  hidden: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  d_emb: int = 256
  predict_variance: bool = True
  predict_uncertainty: bool = True
  remat: bool = False

  def check_config(self) -> None:
    """Raises ValueError for a network the framework could not build."""
    if self.form not in FORMS:
      raise ValueError(f"DiT form {self.form!r} is unknown; known: {FORMS}")
    if self.layout is None:
      raise ValueError("DiT needs a token layout")
    if self.hidden % self.num_heads:
      raise ValueError(f"hidden={self.hidden} is not divisible by num_heads={self.num_heads}")
    if self.hidden % 4:
      raise ValueError(f"hidden={self.hidden} must be divisible by 4 (position embedding)")
    if self.form == "lightning_dit" and (self.hidden // self.num_heads) % 4:
      raise ValueError(
          f"head width {self.hidden // self.num_heads} must be divisible by 4 (2D rotary)"
      )
    if self.depth < 1 or self.d_emb < 2 or self.d_emb % 2:
      raise ValueError(f"depth={self.depth} must be >= 1 and d_emb={self.d_emb} even")

  @property
  def token_layout(self) -> tokens_lib.TokenLayout:
    """`layout`, which must be set."""
    if self.layout is None:
      raise ValueError("DiT needs a token layout")
    return self.layout

  @property
  def token_features_out(self) -> int:
    f = self.token_layout.features
    return f * (2 if self.predict_variance else 1) + (1 if self.predict_uncertainty else 0)

  @property
  def channels_out(self) -> int:
    c = self.token_layout.channels
    return c * (2 if self.predict_variance else 1) + (1 if self.predict_uncertainty else 0)

  def transformer(self, tokens: Array, t_tokens: Array) -> Array:
    """Token inputs [B, N, F] and times [B, N] -> token outputs [B, N, token_features_out]."""
    coords = tokens_lib.token_coordinates(self.token_layout)
    settings = dict(form=self.form, dtype=self.dtype, precision=self.precision)
    sinusoid = time_sinusoid(t_tokens, self.d_emb)
    self.sow("intermediates", "t_sinusoid", sinusoid)
    c = nn.Dense(self.hidden, kernel_init=nn.initializers.normal(0.02), name="t_emb_mlp_0")(
        sinusoid
    )
    c = nn.Dense(self.hidden, kernel_init=nn.initializers.normal(0.02), name="t_emb_mlp_2")(
        nn.silu(c)
    )
    self.sow("intermediates", "t_emb", c)
    x = self.dense(self.hidden, "patch_emb_proj")(tokens).astype(jnp.float32)
    x = x + jnp.asarray(position_embedding(coords, self.hidden))
    self.sow("intermediates", "after_patch_pos_embed", x)
    angles = None
    if self.form == "lightning_dit":
      angles = jnp.asarray(rotary_angles(coords, self.hidden // self.num_heads))
    mlp_hidden = mlp_width(self.hidden, self.mlp_ratio)
    block = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x = block(num_heads=self.num_heads, mlp_hidden=mlp_hidden, name=f"blocks_{i}", **settings)(
          x, c, angles
      ).astype(jnp.float32)
      self.sow("intermediates", f"block_out_{i}", x)
    mod = self.dense(2 * self.hidden, "out_layer_adaLN_modulation_1", zero=True)(nn.silu(c))
    shift, scale = jnp.split(mod.astype(jnp.float32), 2, axis=-1)
    h = _modulate(self.norm(x, "out_layer_norm_final"), shift, scale)
    out = self.dense(self.token_features_out, "out_layer_linear", zero=True)(h)
    return out.astype(jnp.float32)

  @nn.compact
  def __call__(self, z: Array, t: Array, train: bool = False) -> Array:
    """Raw denoiser output.

    Args:
      z: [B, H, W, C] noisy image.
      t: [B, H, W, 1] time map, constant on each region (`layout.region_size`).
      train: unused (no dropout); kept for the U-Net's call signature.

    Returns:
      [B, H, W, channels_out] float32: u (C), then v (C) with predict_variance, then the
      log-variance (1) with predict_uncertainty, constant on each token's pixels.
    """
    del train
    self.check_config()
    layout = self.token_layout
    expected = (layout.height, layout.width, layout.channels)
    if z.ndim != 4 or tuple(z.shape[1:]) != expected:
      raise ValueError(f"z has shape {z.shape}; expected [B, {', '.join(map(str, expected))}]")
    if t.shape != z.shape[:3] + (1,):
      raise ValueError(
          f"time map t has shape {t.shape}; expected {z.shape[:3] + (1,)} ([B, H, W, 1] matching z)"
      )
    out = self.transformer(
        tokens_lib.image_to_tokens(z.astype(jnp.float32), layout),
        tokens_lib.token_times(t.astype(jnp.float32), layout),
    )
    self.sow("intermediates", "token_out", out)
    f = layout.features
    parts = [tokens_lib.tokens_to_image(out[..., :f], layout)]
    if self.predict_variance:
      parts.append(tokens_lib.tokens_to_image(out[..., f : 2 * f], layout))
    if self.predict_uncertainty:
      parts.append(tokens_lib.token_values_to_image(out[..., -1], layout))
    return jnp.concatenate(parts, axis=-1)


def make_dit(
    layout: tokens_lib.TokenLayout,
    size: str | None = None,
    form: str = "dit",
    **overrides,
) -> DiT:
  """A DiT of `DIT_SIZES[size]` (S, B, L, XL) and the form's MLP ratio, with field overrides."""
  fields: dict[str, Any] = {}
  if size is not None:
    if size not in DIT_SIZES:
      raise ValueError(f"unknown DiT size {size!r}; known: {tuple(DIT_SIZES)}")
    fields.update(DIT_SIZES[size])
  if form in FORM_MLP_RATIO:
    fields["mlp_ratio"] = FORM_MLP_RATIO[form]
  fields.update({k: v for k, v in overrides.items() if v is not None})
  if isinstance(fields.get("dtype"), str):
    fields["dtype"] = jnp.dtype(fields["dtype"])
  model = DiT(layout=layout, form=form, **fields)
  model.check_config()
  return model
