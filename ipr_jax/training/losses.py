"""SRM training loss: velocity MSE + VLB (v channel) + sigma NLL (spec §3.3).

Each term is a mean over every element `[B, H, W, C]` of a per-element loss
times the per-pixel weight map `[B, H, W, 1]`, broadcast over channels:

  L_mu    = mean(w (u_hat - u)^2)                 trains u_hat
  L_vlb   = mean(w vlb_bits)                      trains v only (u_hat stopped)
  L_sigma = mean(w N(stop(u_hat), sigma).nll(u))  trains the log-variance only
  total   = L_mu + vlb_weight L_vlb + sigma_nll_weight L_sigma

u_hat is the model output in the flow's parameterisation and u the flow's target
(`flows.Flow.target`): the velocity eps - x of the default rectified flow, else the
velocity, eps or v of `config.flow` (`ipr_jax.noise.flows`), whose z_t, reverse kernel
and posterior the VLB uses.

As in the reference, the two auxiliary terms are added only when
step > aux_after_step (default 0, so not on the very first step).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from ipr_jax.models.denoiser import DenoiserOutput, srm_head
from ipr_jax.noise import flows
from ipr_jax.noise.gaussian import DiagonalGaussian

VLB_TIME_STEP = 1e-3
TIME_EPS = 1e-5
VLB_WEIGHT = 1.0
SIGMA_NLL_WEIGHT = 0.01


def vlb_step_times(
    t: jax.Array, time_step: float = VLB_TIME_STEP, time_eps: float = TIME_EPS
) -> tuple[jax.Array, jax.Array]:
  """s = t - time_step, with s = 0 and the NLL branch where s < time_eps.

  Returns:
    (s, nll_branch), both shaped like t.
  """
  s = t - time_step
  nll_branch = s < time_eps
  return jnp.where(nll_branch, 0.0, s), nll_branch


def vlb_bits(
    u_hat: jax.Array,
    v: jax.Array,
    x: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    time_step: float = VLB_TIME_STEP,
    time_eps: float = TIME_EPS,
    noise_flow: flows.Flow = flows.RECTIFIED,
) -> jax.Array:
  """Per-element VLB term in bits: KL(q || p), or -log p(x) at the last step.

  p = reverse_kernel(stop_gradient(u_hat), z_t, t, s, alpha = 1, v) and
  q = posterior_q(x, eps, t, s) of `noise_flow`. Where s < time_eps (so s = 0) the
  discretized negative log-likelihood of x under p replaces the KL.

  Args:
    u_hat: `[B, H, W, C]` model output in the flow's parameterisation (gradient stopped
      here).
    v: `[B, H, W, C]` learned-range weight.
    x: `[B, H, W, C]` data in [-1, 1].
    eps: `[B, H, W, C]` the noise used for z_t.
    t: `[B, H, W, 1]` times (the flow's, `Flow.adjust_time`).
    time_step: the reference's 1e-3.
    time_eps: the reference's 1e-5.
    noise_flow: the flow (default: rectified).

  Returns:
    `[B, H, W, C]` bits.
  """
  s, nll_branch = vlb_step_times(t, time_step, time_eps)
  z = noise_flow.z_t(x, eps, t)
  p = noise_flow.reverse_kernel(jax.lax.stop_gradient(u_hat), z, t, s, v, 1.0)
  q = noise_flow.posterior_q(x, eps, t, s)
  nats = jnp.where(nll_branch, -p.discretized_log_likelihood(x), q.kl(p))
  return nats / math.log(2.0)


def sigma_nll(u_hat: jax.Array, sigma: jax.Array, target: jax.Array) -> jax.Array:
  """Per-element NLL of the target (in the flow's parameterisation) under
  N(stop_gradient(u_hat), sigma^2)."""
  gaussian = DiagonalGaussian.from_std(jax.lax.stop_gradient(u_hat), sigma)
  return gaussian.nll(target)


def srm_loss(
    output: DenoiserOutput | jax.Array,
    x: jax.Array,
    eps: jax.Array,
    t_pix: jax.Array,
    w_pix: jax.Array,
    *,
    patch_size: int | None = None,
    step: Any = None,
    aux_after_step: int = 0,
    vlb_weight: float = VLB_WEIGHT,
    sigma_nll_weight: float = SIGMA_NLL_WEIGHT,
    vlb_time_step: float = VLB_TIME_STEP,
    time_eps: float = TIME_EPS,
    noise_flow: flows.Flow = flows.RECTIFIED,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The SRM training objective.

  Args:
    output: DenoiserOutput, or the raw `[B, H, W, 2d+1]` network output (then
      `patch_size` is required and `srm_head` splits it).
    x: `[B, H, W, d]` clean data in [-1, 1].
    eps: `[B, H, W, d]` standard normal noise that made z_t = a(t) x + b(t) eps
      ((1 - t) x + t eps for the rectified flow).
    t_pix: `[B, H, W, 1]` per-pixel times (the flow's, `Flow.adjust_time`).
    w_pix: `[B, H, W, 1]` per-pixel loss weights.
    patch_size: only for a raw `output`.
    step: current optimizer step (int or scalar array). The VLB and sigma terms
      are added only when step > aux_after_step; None means always.
    aux_after_step: the reference's apply_after_step (0).
    vlb_weight: weight of L_vlb (the reference's implicit 1.0).
    sigma_nll_weight: weight of L_sigma (0.01).
    vlb_time_step: VLB step size t - s.
    time_eps: s below this takes the NLL branch.
    noise_flow: the flow of z_t, of the target and of the VLB's kernels (default: rectified).

  Returns:
    (total loss, metrics). Metrics 'mse', 'vlb', 'sigma_nll' are the weighted
    means L_mu, L_vlb, L_sigma (computed even when not added), 'loss' the total,
    and '*_unweighted' the plain means.
  """
  if not isinstance(output, DenoiserOutput):
    if patch_size is None:
      raise ValueError("a raw network output needs patch_size; got patch_size=None")
    output = srm_head(output, patch_size)
  if output.u.shape != x.shape or eps.shape != x.shape:
    raise ValueError(f"u_hat {output.u.shape}, x {x.shape} and eps {eps.shape} must have one shape")
  expected_map = x.shape[:-1] + (1,)
  if t_pix.shape != expected_map or w_pix.shape != expected_map:
    raise ValueError(f"t_pix {t_pix.shape} and w_pix {w_pix.shape} must have shape {expected_map}")

  target = noise_flow.target(x, eps, t_pix)
  weight = jnp.broadcast_to(w_pix, x.shape)

  mse_per_element = (output.u - target) ** 2
  vlb_per_element = vlb_bits(output.u, output.v, x, eps, t_pix, vlb_time_step, time_eps, noise_flow)
  sigma_per_element = jnp.broadcast_to(sigma_nll(output.u, output.sigma, target), x.shape)

  mse = jnp.mean(weight * mse_per_element)
  vlb = jnp.mean(weight * vlb_per_element)
  sigma_term = jnp.mean(weight * sigma_per_element)

  aux = vlb_weight * vlb + sigma_nll_weight * sigma_term
  if step is not None:
    aux = jnp.where(jnp.asarray(step) > aux_after_step, aux, 0.0)
  total = mse + aux
  metrics = {
      "loss": total,
      "mse": mse,
      "vlb": vlb,
      "sigma_nll": sigma_term,
      "mse_unweighted": jnp.mean(mse_per_element),
      "vlb_unweighted": jnp.mean(vlb_per_element),
      "sigma_nll_unweighted": jnp.mean(sigma_per_element),
  }
  return total, metrics
