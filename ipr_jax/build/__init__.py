"""Builds the model and the optimizer of a run from its config: the denoiser (U-Net or DiT), its
parameters, the learning-rate schedule and AdamW.

The training, evaluation and conversion binaries all build their model here, so that a config
means the same model in each of them (a task's data: `ipr_jax.tasks.get(config.task).make_data`;
the image geometry: `ipr_jax.data.geometry`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ipr_jax.data import geometry
from ipr_jax.models import dit
from ipr_jax.models import tokens
from ipr_jax.models import unet
from ipr_jax.runtime import errors

MODEL_KINDS = ("unet", "dit")


def make_model(config: ml_collections.ConfigDict, training: bool = False) -> nn.Module:
  """The denoiser of `config.model` for `config.data` (d_in = d, d_out = 2 d + 1, spec §1.1).

  `model.kind`: 'unet' (the reference's U-Net) or 'dit' (`dit.DiT` of `model.dit`). Both take
  (z [B, H, W, d], t [B, H, W, 1], train) and return [B, H, W, 2 d + 1] for `denoiser.srm_head`.

  The U-Net's time maps are one value per `config.data.patch_size` patch (training and sampling
  build them so), which lets it embed the time per patch (`unet.level_time_patch`; the same
  values). With `training`, `config.remat` rematerialises its blocks (the U-Net's ResBlocks and
  attention, the DiT's transformer blocks) in the backward pass (same params).

  Raises:
    errors.ConfigError: an unknown kind, or a network that cannot be built, naming the field.
  """
  m = config.model
  kind = m.get("kind", "unet")
  if kind == "dit":
    return _make_dit(config, training)
  if kind != "unet":
    raise errors.ConfigError(f"model.kind={kind!r} is unknown; expected one of {MODEL_KINDS}")
  d = config.data.channels
  model = unet.UNet(
      hid_dims=tuple(m.hid_dims),
      attention=tuple(bool(a) for a in m.attention),
      d_in=d,
      d_out=2 * d + 1,
      num_blocks=m.num_blocks,
      t_emb_dim=m.t_emb_dim,
      d_emb=m.d_emb,
      num_head_channels=m.num_head_channels,
      dropout=m.dropout,
      num_groups=m.num_groups,
      dtype=jnp.dtype(m.dtype),
      time_patch_size=int(config.data.patch_size),
      remat=bool(training and config.get("remat", False)),
  )
  model.check_config()
  return model


def _make_dit(config: ml_collections.ConfigDict, training: bool) -> dit.DiT:
  s = config.model.dit
  h, w, d = geometry.image_shape(config)
  region = int(config.data.patch_size)
  token_size = region if s.patch_size is None else int(s.patch_size)
  try:
    layout = tokens.TokenLayout(s.token_layout, h, w, d, token_size, region)
    return dit.make_dit(
        layout,
        s.size,
        s.form,
        hidden=s.hidden,
        depth=s.depth,
        num_heads=s.num_heads,
        mlp_ratio=s.mlp_ratio,
        d_emb=s.d_emb,
        dtype=config.model.dtype,
        remat=bool(training and config.get("remat", False)),
    )
  except ValueError as e:
    raise errors.ConfigError(
        f"model.dit (form={s.form!r}, size={s.size!r}, patch_size={token_size}, "
        f"token_layout={s.token_layout!r}; data.patch_size={region}): {e}"
    ) from e


def init_params(config: ml_collections.ConfigDict, model: nn.Module, key: jax.Array):
  """Freshly initialised denoiser parameters (the inner 'params' dict)."""
  h, w, _ = geometry.image_shape(config)
  z = jnp.zeros((1, *geometry.image_shape(config)), jnp.float32)
  t = jnp.zeros((1, h, w, 1), jnp.float32)
  return jax.jit(lambda k: model.init(k, z, t)["params"])(key)


def adam_eps(config: ml_collections.ConfigDict) -> float:
  """config.optim.eps, or the reference's choice: 1e-8 in full precision, else 1e-7."""
  if config.optim.eps is not None:
    return float(config.optim.eps)
  return 1e-8 if jnp.dtype(config.model.dtype) == jnp.float32 else 1e-7


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """torch LinearLR as the reference uses it: lr * (f0 + (1 - f0) * min(k, K) / K), k = 0, 1, ...

  With `optim.decay_steps = D` (not the reference's), the rate then follows a cosine from lr at
  step K to `decay_end_factor` * lr at step D: lr * (e + (1 - e) * (1 + cos(pi p)) / 2),
  p = clip((k - K) / (D - K), 0, 1).
  """
  o = config.optim
  lr, start, warmup = float(o.learning_rate), float(o.warmup_start_factor), int(o.warmup_steps)
  decay_steps, end = o.get("decay_steps"), float(o.get("decay_end_factor", 0.0))
  if decay_steps is not None and decay_steps <= max(warmup, 0):
    raise errors.ConfigError(
        f"optim.decay_steps={decay_steps} must exceed optim.warmup_steps={warmup}"
    )
  if not 0.0 <= end <= 1.0:
    raise errors.ConfigError(f"optim.decay_end_factor={end} must lie in [0, 1]")

  def schedule(count):
    # Written as a factor of lr: optax.linear_schedule's init + (end - init) form loses ~3e-4 of
    # the first step's tiny rate to float32 cancellation.
    if warmup <= 0:
      factor = jnp.ones((), jnp.float32)
    else:
      progress = jnp.minimum(count, warmup).astype(jnp.float32) / warmup
      factor = start + (1.0 - start) * progress
    if decay_steps is not None:
      done = jnp.clip((count - max(warmup, 0)) / (decay_steps - max(warmup, 0)), 0.0, 1.0)
      factor = factor * (end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * done)))
    return lr * factor

  return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the warm-up schedule; every parameter is decayed."""
  o = config.optim
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip_norm),
      optax.adamw(
          learning_rate_schedule(config),
          b1=o.b1,
          b2=o.b2,
          eps=adam_eps(config),
          weight_decay=o.weight_decay,
      ),
  )
