"""The train step of an SRM denoiser (spec §3.1-3.2): the loss-weight table of the time sampler,
the initial train state, the per-device step with its gradient accumulation, and its pmap.

Every random draw of example i at step s comes from `fold_in(fold_in(state.key, s), i)` with i
the example's global index, so a step's result does not depend on how many devices share the
batch (`ipr_jax.training.trainer` runs the loop around it).
"""

import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ipr_jax import build
from ipr_jax import tasks
from ipr_jax.build import config_base
from ipr_jax.data import geometry
from ipr_jax.models import denoiser
from ipr_jax.noise import time_sampler
from ipr_jax.runtime import errors
from ipr_jax.runtime import train_state as train_state_lib
from ipr_jax.training import losses

TrainState = train_state_lib.TrainState


# ------------------------------------------------------------------------------------------------
# Loss weights, state.
# ------------------------------------------------------------------------------------------------


def make_loss_weight_table(config: ml_collections.ConfigDict, key: jax.Array) -> jax.Array:
  """The [num_bins] time density of spec §3.1 step 4 (its inverse is the loss weight)."""
  ts = config.time_sampler
  if ts.name != "mean_beta":
    raise errors.ConfigError(f"time_sampler.name={ts.name!r}: only 'mean_beta' is implemented")
  return time_sampler.loss_weight_density(
      key,
      geometry.patch_grid(config),
      ts.beta_sharpness,
      num_samples=ts.density_num_samples,
      num_bins=ts.density_num_bins,
      blur_kernel_size=ts.density_blur_kernel_size,
      blur_sigma=ts.density_blur_sigma,
  )


def create_train_state(config, model, tx, key: jax.Array) -> TrainState:
  """A step-0 TrainState; `key` is split into the init key and the training loop's root key."""
  init_key, loop_key = jax.random.split(key)
  return TrainState.create(build.init_params(config, model, init_key), tx, loop_key)


# ------------------------------------------------------------------------------------------------
# The train step.
# ------------------------------------------------------------------------------------------------


def _per_example(fn: Callable[..., Any], keys: jax.Array) -> Any:
  """Calls batch-of-1 `fn(key)` for each key and stacks the results ([B, ...] leaves)."""
  return jax.tree_util.tree_map(lambda x: x[:, 0], jax.vmap(fn)(keys))


def grad_accum_steps(config: ml_collections.ConfigDict) -> int:
  """config.grad_accum_steps (1 if absent): micro-batches per device and step.

  Raises:
    ValueError: not a positive integer.
  """
  value = config.get("grad_accum_steps", 1)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"grad_accum_steps={value!r} must be a positive integer")
  return value


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    axis_name: str | None = "batch",
) -> Callable[..., Any]:
  """The pure per-device train step `(state, task, weight_table, example_index) -> (state, m)`.

  Args:
    config: the run config.
    model: the U-Net.
    tx: the optimizer.
    axis_name: pmap axis over which gradients and metrics are averaged (None: no averaging).

  Returns:
    train_step(state, task, weight_table, example_index, images=None) where example_index is
    int32 [b], the global indices of this device's examples, and images uint8 [b, H, W, d] are
    host-rendered training images (then `task` is unused and may be None); returns the new state
    and a dict of scalar metrics (averaged over devices) for the step just taken.
  """
  grid = geometry.patch_grid(config)
  task_module = tasks.get(config.task)  # host-rendered tasks: decodes their uint8 images
  patch_size = config.data.patch_size
  ts, loss_cfg = config.time_sampler, config.loss
  ema_decay = float(config.optim.ema_decay)
  schedule = build.learning_rate_schedule(config)
  noise_flow = config_base.noise_flow(config)

  accum = grad_accum_steps(config)

  def grads_and_metrics(state: TrainState, task, weight_table, example_index, images):
    """Gradients and metrics of the examples `example_index` ([b]; means over them)."""
    step_key = jax.random.fold_in(state.key, state.step)
    example_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(example_index)
    k_data, k_time, k_noise, k_dropout = jnp.moveaxis(
        jax.vmap(lambda k: jax.random.split(k, 4))(example_keys), 1, 0
    )

    if images is None:
      batch = _per_example(lambda k: task.train_batch(k, 1), k_data)
    else:
      batch = {"image": task_module.images_on_device(images)}
    x = batch["image"]  # [b, H, W, d]
    t_patch, w_patch = _per_example(
        lambda k: time_sampler.mean_beta_times(
            k, 1, grid, ts.beta_sharpness, ts.add_zeros, weight_table
        ),
        k_time,
    )
    t_pix = time_sampler.patch_to_pixel(t_patch, patch_size)  # [b, H, W, 1]
    w_pix = time_sampler.patch_to_pixel(w_patch, patch_size)
    if "mask" in batch:  # given cells: t = 0 (clean context) and no loss (spec §3.2)
      t_pix, w_pix = time_sampler.apply_condition_mask(t_pix, w_pix, batch["mask"])
    eps = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(k_noise)
    t_pix = noise_flow.adjust_time(t_pix)  # the model sees the flow's time, as when sampling
    z = noise_flow.z_t(x, eps, t_pix)

    def loss_fn(params):
      def apply_one(z1, t1, key):
        return model.apply(
            {"params": params}, z1[None], t1[None], train=True, rngs={"dropout": key}
        )[0]

      raw = jax.vmap(apply_one)(z, t_pix, k_dropout)  # per-example dropout masks
      output = denoiser.srm_head(raw, patch_size)
      return losses.srm_loss(
          output,
          x,
          eps,
          t_pix,
          w_pix,
          step=state.step,
          aux_after_step=loss_cfg.aux_after_step,
          vlb_weight=loss_cfg.vlb_weight,
          sigma_nll_weight=loss_cfg.sigma_nll_weight,
          vlb_time_step=loss_cfg.vlb_time_step,
          time_eps=loss_cfg.time_eps,
          noise_flow=noise_flow,
      )

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, dict(metrics)

  def accumulated(state: TrainState, task, weight_table, example_index, images):
    """The mean of `accum` micro-batches' gradients and metrics (every loss term is a mean over
    equally many elements per micro-batch, so this is the whole batch's, to float rounding)."""
    if example_index.shape[0] % accum:
      raise ValueError(
          f"grad_accum_steps={accum} does not divide the per-device batch "
          f"{example_index.shape[0]}"
      )
    split = lambda x: None if x is None else x.reshape(accum, -1, *x.shape[1:])

    def body(total, xs):
      index, micro_images = xs
      out = grads_and_metrics(state, task, weight_table, index, micro_images)
      return jax.tree_util.tree_map(jnp.add, total, out), None

    zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype),
        jax.eval_shape(
            grads_and_metrics,
            state,
            task,
            weight_table,
            split(example_index)[0],
            None if images is None else split(images)[0],
        ),
    )
    total, _ = jax.lax.scan(body, zeros, (split(example_index), split(images)))
    return jax.tree_util.tree_map(lambda x: x / accum, total)

  def train_step(state: TrainState, task, weight_table, example_index, images=None):
    if accum == 1:
      grads, metrics = grads_and_metrics(state, task, weight_table, example_index, images)
    else:
      grads, metrics = accumulated(state, task, weight_table, example_index, images)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(state.step)
    new_state = state.apply_gradients(grads, tx, ema_decay)
    return new_state, metrics

  return train_step


# Sections of the config that the compiled train step depends on.
_STEP_SECTIONS = ("task", "data", "model", "time_sampler", "loss", "optim")
_STEP_FIELDS = ("remat", "grad_accum_steps", "flow")
_P_TRAIN_STEPS: dict[str, Callable[..., Any]] = {}


def pmapped_train_step(config, model, tx) -> Callable[..., Any]:
  """`jax.pmap` of `make_train_step`, reused by later `train` calls with the same step config.

  Re-tracing the step costs seconds; resuming in the same process (tests, notebooks) reuses it.
  """
  key = json.dumps(
      {**{k: config[k] for k in _STEP_SECTIONS}, **{k: config.get(k) for k in _STEP_FIELDS}},
      sort_keys=True,
      default=str,
  )
  key += str(jax.local_devices())
  if key not in _P_TRAIN_STEPS:
    if len(_P_TRAIN_STEPS) >= 4:
      _P_TRAIN_STEPS.clear()
    _P_TRAIN_STEPS[key] = jax.pmap(
        make_train_step(config, model, tx), axis_name="batch", donate_argnums=(0,)
    )
  return _P_TRAIN_STEPS[key]
