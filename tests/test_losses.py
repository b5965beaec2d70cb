"""Tests for ipr_jax.training.losses: golden VLB bits, term separation and finite gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.models.denoiser import DenoiserOutput, srm_head
from ipr_jax.noise import flow
from ipr_jax.training import losses

# One compiled program per static configuration keeps the test fast.
_srm_loss = jax.jit(losses.srm_loss, static_argnames=("patch_size",))


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def test_vlb_bits_match_golden(golden_dir):
  with np.load(golden_dir / "flow.npz") as f:
    g = {k: _nhwc(f[k]) for k in f.files if k != "config_json"}
  bits = losses.vlb_bits(g["vlb_mean_theta"], g["vlb_v"], g["vlb_x"], g["vlb_eps"], g["vlb_t"])
  np.testing.assert_allclose(bits, g["vlb_bits"], rtol=1e-5, atol=1e-6)
  s, nll_branch = losses.vlb_step_times(jnp.asarray(g["vlb_t"]))
  np.testing.assert_array_equal(s, g["vlb_s"])
  np.testing.assert_array_equal(nll_branch, g["vlb_nll_mask"])


def _batch(seed=0, b=2, h=8, w=8, c=3):
  """Data on the uint8 grid, with special times t = 0, 1, ~1e-3 and t < 1e-3 present."""
  keys = jax.random.split(jax.random.key(seed), 6)
  x = jnp.round(jax.random.uniform(keys[0], (b, h, w, c), minval=-1, maxval=1) * 127.5) / 127.5
  eps = jax.random.normal(keys[1], x.shape)
  t = jax.random.uniform(keys[2], (b, h, w, 1))
  t = t.at[0, 0].set(0.0).at[0, 1].set(1.0).at[0, 2].set(5e-4).at[0, 3].set(1e-3)
  t = t.at[0, 4].set(1.01e-3).at[0, 5].set(0.999)
  w_pix = jax.random.uniform(keys[3], t.shape).at[0, 0].set(0.0)
  u = flow.velocity_target(x, eps) + 0.1 * jax.random.normal(keys[4], x.shape)
  v = jax.random.uniform(keys[5], x.shape, minval=-0.2, maxval=1.2)
  logvar = jnp.linspace(-3.0, 1.0, b * h * w).reshape(b, h, w, 1)
  return x, eps, t, w_pix, u, v, logvar


def _output(u, v, logvar):
  return DenoiserOutput(u=u, v=v, logvar=logvar, sigma=jnp.exp(0.5 * logvar))


def test_perfect_prediction_has_zero_mse_and_terms_add_up():
  x, eps, t, w, u, v, logvar = _batch()
  target = flow.velocity_target(x, eps)
  total, metrics = _srm_loss(_output(target, v, logvar), x, eps, t, w, step=1)
  assert float(metrics["mse"]) == 0.0
  np.testing.assert_allclose(
      total, metrics["mse"] + metrics["vlb"] + 0.01 * metrics["sigma_nll"], rtol=1e-6
  )
  np.testing.assert_allclose(metrics["loss"], total, rtol=0)
  # Sigma NLL at zero residual: -log N(0; 0, sigma^2) = log(2 pi sigma^2) / 2.
  sigma = np.exp(0.5 * np.asarray(logvar))
  nll = 0.5 * np.log(2 * np.pi * sigma**2)
  np.testing.assert_allclose(
      metrics["sigma_nll"], np.mean(np.asarray(w) * nll), rtol=1e-5, atol=1e-6
  )


def test_aux_terms_only_after_step_zero():
  x, eps, t, w, u, v, logvar = _batch()
  out = _output(u, v, logvar)
  total0, metrics0 = _srm_loss(out, x, eps, t, w, step=0)
  total1, metrics1 = _srm_loss(out, x, eps, t, w, step=jnp.int32(1))
  np.testing.assert_allclose(total0, metrics0["mse"], rtol=0)
  np.testing.assert_allclose(
      total1, metrics1["mse"] + metrics1["vlb"] + 0.01 * metrics1["sigma_nll"], rtol=1e-6
  )
  weighted = np.mean(np.asarray(w) * (np.asarray(u) - np.asarray(eps - x)) ** 2)
  np.testing.assert_allclose(metrics0["mse"], weighted, rtol=1e-5)


def test_gradients_are_separated_by_term_and_finite():
  x, eps, t, w, u, v, logvar = _batch()

  def total(u, v, logvar):
    return losses.srm_loss(_output(u, v, logvar), x, eps, t, w, step=1)[0]

  grad_u, grad_v, grad_logvar = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(u, v, logvar)
  for grad in (grad_u, grad_v, grad_logvar):
    assert np.all(np.isfinite(grad))

  # u_hat: only the MSE, d/du mean(w (u - target)^2) = 2 w (u - target) / numel.
  target = flow.velocity_target(x, eps)
  expected_u = 2 * w * (u - target) / u.size
  np.testing.assert_allclose(grad_u, expected_u, rtol=1e-5, atol=1e-6 * np.abs(expected_u).max())
  # v: only the VLB term.
  vlb_grad = jax.grad(
      lambda v: jnp.mean(jnp.broadcast_to(w, x.shape) * losses.vlb_bits(u, v, x, eps, t))
  )(v)
  np.testing.assert_allclose(grad_v, vlb_grad, rtol=1e-5, atol=1e-6 * np.abs(vlb_grad).max())
  assert np.abs(np.asarray(grad_v)).max() > 0
  # logvar: only 0.01 * sigma NLL; per element d/dl 0.5 (l + r^2 e^-l) = 0.5 (1 - r^2 e^-l),
  # summed over channels.
  residual_sq = np.asarray((target - u) ** 2)
  expected = (
      0.01
      * np.sum(
          np.asarray(w) * 0.5 * (1 - residual_sq * np.exp(-np.asarray(logvar))),
          axis=-1,
          keepdims=True,
      )
      / u.size
  )
  np.testing.assert_allclose(grad_logvar, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_raw_output_is_split_by_srm_head():
  x, eps, t, w, *_ = _batch(seed=1)
  raw = jax.random.normal(jax.random.key(2), x.shape[:-1] + (7,))
  from_raw = _srm_loss(raw, x, eps, t, w, patch_size=4, step=1)
  from_head = _srm_loss(srm_head(raw, 4), x, eps, t, w, step=1)
  for key in from_raw[1]:
    np.testing.assert_allclose(from_raw[1][key], from_head[1][key], rtol=1e-6)
  with pytest.raises(ValueError, match="patch_size"):
    losses.srm_loss(raw, x, eps, t, w)


def test_zero_weights_give_zero_loss_and_bad_shapes_raise():
  x, eps, t, w, u, v, logvar = _batch(seed=3)
  total, _ = _srm_loss(_output(u, v, logvar), x, eps, t, jnp.zeros_like(w), step=1)
  assert float(total) == 0.0
  with pytest.raises(ValueError, match="t_pix"):
    losses.srm_loss(_output(u, v, logvar), x, eps, t[..., 0], w)


def test_vlb_at_last_step_is_discretized_nll_in_bits():
  # With t below 1e-3 + 1e-5 the step goes to s = 0, and the term is -log2 p(x).
  x, eps, _, _, u, v, _ = _batch(seed=4)
  t = jnp.full(x.shape[:-1] + (1,), 5e-4)
  bits = jax.jit(losses.vlb_bits)(u, v, x, eps, t)
  z = flow.z_t(x, eps, t)
  p = flow.reverse_kernel(u, z, t, jnp.zeros_like(t), v, 1.0)
  np.testing.assert_allclose(bits, -p.discretized_log_likelihood(x) / math.log(2.0), rtol=1e-6)
