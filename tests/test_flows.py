"""Tests for ipr_jax.noise.flows: the framework's outputs (tests/golden/spatialreasoners/flows.npz,
spatialreasoners 1.0.5), the rectified flow's delegation to noise/flow.py, closed-form identities
and finiteness at the edges of [0, 1].

The golden arrays are NCHW; every function here is elementwise in the image and broadcasts a
time `[13, 1, 1, 1]`, so they are used as stored.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.noise import flow
from ipr_jax.noise import flows

GOLDEN = pathlib.Path(__file__).parent / "golden" / "spatialreasoners" / "flows.npz"
RTOL, ATOL = 1e-5, 1e-6
GOLDEN_FLOWS = (
    "rectified",
    "cosine",
    "diffusion_cosine",
    "diffusion_cosine_simple_diffusion",
    "diffusion_linear",
    "diffusion_linear_v",
    "continuous_cosine_logsnr",
)
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    arrays = {k: f[k] for k in f.files}
  arrays["config"] = json.loads(str(arrays.pop("config_json")))
  return arrays


def _column(a):
  return jnp.asarray(a).reshape(-1, 1, 1, 1)


def _computed(name: str, g) -> dict[str, np.ndarray]:
  """Everything flows.npz stores of flow `name`, computed here from the same inputs."""
  fl = flows.make_flow(name)
  t_adj, s_adj = fl.adjust_time(jnp.asarray(g["t"])), fl.adjust_time(jnp.asarray(g["s"]))
  out = {"t_adj": t_adj, "s_adj": s_adj, "a": fl.a(t_adj), "b": fl.b(t_adj)}
  out["logsnr_t"] = fl.logsnr(t_adj)
  if fl.is_discrete:
    tables = fl.diffusion_tables()
    out["betas"], out["alphas_bar"] = tables["betas"], tables["alpha_bar"]
  else:
    out["a_prime"], out["b_prime"] = fl.a_prime(t_adj), fl.b_prime(t_adj)
    out["a_b_prime_minus_a_prime_b"] = fl.a_b_prime_minus_a_prime_b(t_adj)
  for alpha in (0.0, 1.0):
    out[f"sigma_small_a{alpha:g}"] = fl.sigma_small(t_adj, s_adj, alpha)
    out[f"sigma_large_a{alpha:g}"] = fl.sigma_large(t_adj, s_adj, alpha)
    out[f"gamma_a{alpha:g}"] = fl.gamma(t_adj, s_adj, alpha)
  t, s = _column(t_adj), _column(s_adj)
  x, eps, model_out = (jnp.asarray(g[k]) for k in ("x0", "eps", "model_out"))
  out["zt"] = fl.z_t(x, eps, t)
  if not fl.is_discrete:
    out["ut_from_eps_x"] = fl.velocity(x, eps, t)
  out["v_from_eps_x0"] = fl.v_target(x, eps, t)
  z = jnp.asarray(g[f"{name}/zt"])  # the framework's z_t, so that conversions compare alone
  out["x_from_out"] = fl.x_from_output(model_out, z, t)
  if fl.parameterization == "eps":
    out["v_from_out"] = fl.v_from_output(model_out, z, t)
    if not fl.is_discrete:
      out["ut_from_out"] = fl.velocity_from_output(model_out, z, t)
  else:
    out["eps_from_out"] = fl.eps_from_output(model_out, z, t)
  v_theta, noise = jnp.asarray(g["v_theta_in"]), jnp.asarray(g["noise"])
  for alpha in (0.0, 1.0):
    for variance in VARIANCES:
      v = v_theta if variance == "learned_range" else None
      p = fl.reverse_kernel(model_out, z, t, s, v, alpha, 1.0, variance)
      key = f"p_a{alpha:g}_{variance}"
      out[f"{key}/mean"], out[f"{key}/var"] = p.mean, p.var
      out[f"{key}/z_s"] = p.reparameterize(noise)
  p = fl.reverse_kernel(
      model_out, z, t, s, None, 1.0, 1.0, "fixed_small", sigma_theta=0.3 * jnp.ones_like(z)
  )
  out["p_a1_fixed_small_sigmatheta/mean"] = p.mean
  out["p_a1_fixed_small_sigmatheta/var"] = p.var
  return {k: np.asarray(v) for k, v in out.items()}


def _compare(name, key, got, want, rtol, atol):
  """|got - want| <= atol + rtol |want| elementwise; atol may be an array (per-row bounds)."""
  got = np.broadcast_to(np.asarray(got, np.float64), want.shape)
  error = np.abs(got - want)
  bad = error > atol + rtol * np.abs(want)
  assert not bad.any(), (
      f"{name}/{key}: {bad.sum()} of {bad.size} off, max abs error {error.max():.3g} at "
      f"{np.unravel_index(np.argmax(error), error.shape)}"
  )


@pytest.mark.parametrize("name", GOLDEN_FLOWS)
def test_every_golden_array_of_the_flow(golden, name):
  """Every stored array of the flow, within float32 rounding (the documented deviations aside:
  the next tests)."""
  fl = flows.make_flow(name)
  got = _computed(name, golden)
  keys = sorted(k[len(name) + 1 :] for k in golden if k.startswith(name + "/"))
  assert keys and set(keys) <= set(got)
  config = golden["config"]["flows"][name]
  assert config["parameterization"] == fl.parameterization
  a_t = np.abs(golden[f"{name}/a"]).reshape(-1, 1, 1, 1)
  for key in keys:
    want = golden[f"{name}/{key}"]
    if name == "continuous_cosine_logsnr" and key in (
        "a_prime",
        "b_prime",
        "a_b_prime_minus_a_prime_b",
        "ut_from_out",
    ):
      continue  # the framework's sign: test_continuous_cosine_logsnr_derivatives
    tolerance = dict(rtol=RTOL, atol=ATOL)
    if name == "cosine" and key == "x_from_out":
      # The framework divides by a(t) (~ -4.4e-8 at t = 1): its rounding grows as 1 / a.
      keep = golden["t"] < 1
      want, got_key = want[keep], got[key][keep]
      _compare(name, key, got_key, want, rtol=RTOL, atol=ATOL / a_t[keep])
      continue
    if key.startswith("p_") and fl.parameterization in ("eps", "v"):
      # mean = r z + (gamma - r b) eps with r = a(s) / a(t): one ulp of a table entry times r.
      ratio = np.maximum(1.0, np.asarray(fl.a(_column(got["s_adj"]))) / a_t)
      tolerance = dict(rtol=RTOL, atol=ATOL * ratio)
    if key in ("t_adj", "s_adj", "betas", "alphas_bar"):
      tolerance = dict(rtol=0, atol=0)
    _compare(name, key, got[key], want, **tolerance)


def test_adjust_time_is_the_float32_grid_time(golden):
  """t = 0.001 -> 0.002, 0.1 -> 0.101, 1 -> 1, 0 -> 0; the identity for continuous flows."""
  fl = flows.make_flow("diffusion_linear")
  got = np.asarray(fl.adjust_time(jnp.asarray([0.0, 1e-3, 0.1, 0.9995, 1.0], jnp.float32)))
  np.testing.assert_array_equal(got, np.float32([0.0, 0.002, 0.101, 1.0, 1.0]))
  t = jnp.asarray(golden["t"])
  for name in ("rectified", "cosine", "continuous_cosine_logsnr"):
    assert flows.make_flow(name).adjust_time(t) is t


def test_continuous_cosine_logsnr_derivatives(golden):
  """a', b' are the derivatives of a, b (finite differences here); the framework's have the
  opposite sign in (0, 1) and are 0 at t = 0 and t = 1, and so does its ut from eps."""
  name = "continuous_cosine_logsnr"
  got = _computed(name, golden)
  interior = (golden["t"] > 0) & (golden["t"] < 1)
  for key in ("a_prime", "b_prime", "a_b_prime_minus_a_prime_b", "ut_from_out"):
    want = golden[f"{name}/{key}"]
    _compare(name, key, -got[key][interior], want[interior], rtol=2e-5, atol=ATOL)
    np.testing.assert_array_equal(want[~interior], 0.0)


def test_discrete_diffusion_has_no_derivatives_as_in_the_framework(golden):
  errors = golden["config"]["errors"]
  assert "a_prime" in " ".join(k for k in errors if k.startswith("diffusion_linear/"))
  fl = flows.make_flow("diffusion_linear")
  t = jnp.asarray(golden["t"])
  for fn in (fl.a_prime, fl.b_prime, fl.a_b_prime_minus_a_prime_b):
    with pytest.raises(ValueError, match="not differentiable"):
      fn(t)
  with pytest.raises(ValueError, match="not differentiable"):
    fl.velocity(t, t, t)
  assert "continuous_linear_beta/build" in errors
  assert "continuous_linear_beta" not in flows.FLOW_NAMES


def test_make_flow_names_and_refuses_unknown_ones():
  assert flows.make_flow("diffusion_linear_v") == flows.Flow(
      kind="diffusion", parameterization="v", beta_schedule="linear"
  )
  assert flows.make_flow("rectified") == flows.RECTIFIED
  for name in flows.FLOW_NAMES:
    hash(flows.make_flow(name))
  with pytest.raises(ValueError, match=r"unknown flow 'ddpm'; known flows: rectified, cosine"):
    flows.make_flow("ddpm")
  with pytest.raises(ValueError, match="parameterization"):
    flows.Flow(kind="cosine", parameterization="eps")


def _random_inputs(seed=0, shape=(3, 4, 4, 2)):
  keys = jax.random.split(jax.random.key(seed), 6)
  x, eps, out, z = (jax.random.normal(k, shape) for k in keys[:4])
  t = jax.random.uniform(keys[4], shape[:3] + (1,))
  t = t.at[0, :2].set(0.0).at[1, :2].set(1.0)
  s = t * jax.random.uniform(keys[5], t.shape)
  s = s.at[1, 0].set(1.0).at[2, 0].set(0.0)
  v = jax.random.uniform(keys[3], shape)
  return x, eps, out, z, t, s, v


def test_rectified_is_noise_flow_bit_for_bit():
  fl = flows.make_flow("rectified")
  x, eps, out, z, t, s, v = _random_inputs()
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  same(fl.z_t(x, eps, t), flow.z_t(x, eps, t))
  same(fl.target(x, eps, t), flow.velocity_target(x, eps))
  same(fl.x_from_output(out, z, t), flow.x_from_u(z, t, out))
  same(fl.eps_from_output(out, z, t), flow.eps_from_u(z, t, out))
  for alpha in (0.0, 0.5, 1.0):
    same(fl.sigma_small(t, s, alpha), flow.sigma_small(t, s, alpha))
    same(fl.sigma_large(t, s, alpha), flow.sigma_large(t, s, alpha))
    same(fl.gamma(t, s, alpha), flow.gamma(t, s, alpha))
    for variance in VARIANCES:
      mine = fl.reverse_kernel(out, z, t, s, v, alpha, 1.5, variance)
      theirs = flow.reverse_kernel(out, z, t, s, v, alpha, 1.5, variance)
      for field in ("mean", "var", "std", "logvar"):
        same(getattr(mine, field), getattr(theirs, field))
  mine, theirs = fl.posterior_q(x, eps, t, s), flow.posterior_q(x, eps, t, s)
  same(mine.mean, theirs.mean)
  same(mine.std, theirs.std)


def test_rectified_sigma_theta_adds_the_framework_term():
  fl = flows.make_flow("rectified")
  _, _, out, z, t, s, _ = _random_inputs(1)
  sigma_theta = jnp.full(t.shape, 0.3)
  g = flow.gamma(t, s, 1.0)
  want = flow.sigma_small(t, s, 1.0) ** 2 + (((1 - s) * t - (1 - t) * g) * sigma_theta) ** 2
  p = fl.reverse_kernel(out, z, t, s, None, 1.0, 1.0, "fixed_small", sigma_theta)
  np.testing.assert_allclose(p.var, np.clip(want, flows.DiagonalGaussian.from_var(0, 0).var, None))
  rectified = flow.reverse_kernel(out, z, t, s, None, 1.0, 1.0, "fixed_small")
  np.testing.assert_array_equal(p.mean, rectified.mean)


UNIT_NORM_FLOWS = [n for n in flows.FLOW_NAMES if n != "rectified"]


@pytest.mark.parametrize("name", UNIT_NORM_FLOWS)
def test_variance_preserving_flows_have_unit_norm(name):
  fl = flows.make_flow(name)
  t = fl.adjust_time(jnp.linspace(0.0, 1.0, 1001))
  np.testing.assert_allclose(fl.a(t) ** 2 + fl.b(t) ** 2, 1.0, atol=2e-6)


@pytest.mark.parametrize("name", [n for n in flows.FLOW_NAMES if "logsnr" not in n])
def test_z_at_time_zero_is_the_data(name):
  fl = flows.make_flow(name)
  x, eps, *_ = _random_inputs(2)
  zero = jnp.zeros(x.shape[:3] + (1,))
  np.testing.assert_array_equal(fl.z_t(x, eps, zero), x)


@pytest.mark.parametrize("name", [n for n in flows.FLOW_NAMES if "logsnr" not in n])
def test_reverse_step_to_zero_returns_x_hat(name):
  """s = 0 (a = 1, b = 0): the kernel's mean is x_hat; its fixed_small and learned_range
  variance the clamp's e^-30 (the discrete diffusion's fixed_small: its floored sigma_small^2,
  as in the framework)."""
  fl = flows.make_flow(name)
  _, _, out, z, t, _, v = _random_inputs(3)
  t = fl.adjust_time(jnp.clip(t, 0.05, 0.95))
  s = jnp.zeros_like(t)
  x_hat = fl.x_from_output(out, z, t)
  for variance in VARIANCES:
    p = fl.reverse_kernel(out, z, t, s, v, 1.0, 1.0, variance)
    # eps and v kernels divide z by a(t): their rounding grows as 1 / a(t).
    _compare(name, variance, p.mean, np.asarray(x_hat), rtol=1e-5, atol=2e-6 / fl.a(t))
    var = np.broadcast_to(p.var, z.shape)
    if fl.is_discrete and variance == "fixed_small":
      np.testing.assert_allclose(var, fl.diffusion_tables()["min_posterior_std"] ** 2, rtol=1e-6)
    elif variance != "fixed_large" and not fl.is_discrete:
      np.testing.assert_allclose(var, np.exp(-30.0), rtol=1e-5)


@pytest.mark.parametrize("name", ["rectified", "cosine", "continuous_cosine_logsnr"])
def test_velocity_is_the_time_derivative_of_z(name):
  """ut = a' x + b' eps = d z_t / dt (central differences in float64 of the float32 flow)."""
  fl = flows.make_flow(name)
  x, eps, *_ = _random_inputs(4)
  t = jnp.linspace(0.05, 0.95, 16).reshape(1, 4, 4, 1)
  h = 1e-3
  z_plus = np.asarray(fl.z_t(x, eps, t + h), np.float64)
  z_minus = np.asarray(fl.z_t(x, eps, t - h), np.float64)
  np.testing.assert_allclose(
      fl.velocity(x, eps, t), (z_plus - z_minus) / (2 * h), rtol=2e-3, atol=2e-3
  )


@pytest.mark.parametrize("name", flows.FLOW_NAMES)
def test_conversions_invert_the_target(name):
  """x_hat and eps_hat of the exact target are x and eps (where a(t) is not tiny)."""
  fl = flows.make_flow(name)
  x, eps, *_ = _random_inputs(5)
  t = fl.adjust_time(jnp.linspace(0.0, 0.9, 16).reshape(1, 4, 4, 1))
  z = fl.z_t(x, eps, t)
  target = fl.target(x, eps, t)
  np.testing.assert_allclose(fl.x_from_output(target, z, t), x, rtol=1e-4, atol=2e-4)
  inside = np.asarray(t > 0)  # at t = 0 eps is not determined by (z, x)
  eps_hat = np.asarray(fl.eps_from_output(target, z, t))
  np.testing.assert_allclose(eps_hat * inside, np.asarray(eps) * inside, rtol=1e-4, atol=2e-4)
  v_hat = fl.v_from_output(target, z, t) if fl.parameterization != "ut" else None
  if v_hat is not None:
    np.testing.assert_allclose(v_hat, fl.v_target(x, eps, t), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("name", flows.FLOW_NAMES)
def test_kernel_of_the_exact_target_is_the_posterior(name):
  """With alpha = 1 and the exact target, p(z_s | z_t) is q(z_s | x, eps): same mean, and
  gamma^2 + sigma_small^2 = b(s)^2 (the variance of z_s's noise)."""
  fl = flows.make_flow(name)
  x, eps, *_ = _random_inputs(6)
  t = fl.adjust_time(jnp.linspace(0.1, 0.9, 16).reshape(1, 4, 4, 1))
  s = fl.adjust_time(0.5 * t)
  z = fl.z_t(x, eps, t)
  p = fl.reverse_kernel(fl.target(x, eps, t), z, t, s, None, 1.0, 1.0, "fixed_small")
  q = fl.posterior_q(x, eps, t, s)
  np.testing.assert_allclose(p.mean, q.mean, rtol=1e-4, atol=2e-4)
  if not fl.is_discrete:
    total = fl.gamma(t, s, 1.0) ** 2 + fl.sigma_small(t, s, 1.0) ** 2
    np.testing.assert_allclose(total, fl.b(s) ** 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", flows.FLOW_NAMES)
def test_values_and_gradients_are_finite_at_the_edges(name):
  """t = 0, t = 1, s = 0, s = 1, s = t: no NaN or inf in the kernel, the posterior, z_t and
  x_hat, nor in their gradients with respect to the model output, z and v."""
  fl = flows.make_flow(name)
  edges = jnp.asarray([0.0, 1.0, 1e-3, 0.5, 1.0, 1.0, 0.999, 0.0], jnp.float32)
  targets = jnp.asarray([0.0, 1.0, 0.0, 0.5, 0.0, 0.999, 0.999, 0.0], jnp.float32)
  t, s = fl.adjust_time(edges.reshape(-1, 1, 1, 1)), fl.adjust_time(targets.reshape(-1, 1, 1, 1))
  x, eps, out, z, _, _, v = _random_inputs(7, shape=(8, 2, 2, 1))

  def total(out, z, v):
    parts = [fl.z_t(x, eps, t), fl.x_from_output(out, z, t), fl.target(x, eps, t)]
    for variance in VARIANCES:
      p = fl.reverse_kernel(out, z, t, s, v, 0.5, 1.0, variance, sigma_theta=0.3 * v)
      q = fl.posterior_q(x, eps, t, s)
      parts += [p.mean, p.logvar, q.kl(p), p.discretized_log_likelihood(jnp.tanh(x))]
    return sum(jnp.sum(jnp.broadcast_to(part, z.shape)) for part in parts)

  value, grads = jax.value_and_grad(total, argnums=(0, 1, 2))(out, z, v)
  assert np.isfinite(value)
  for grad in grads:
    assert np.all(np.isfinite(grad))


@pytest.fixture
def fast_compilation():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def test_a_diffusion_flow_trains_and_samples(tmp_path, fast_compilation):
  """config.flow reaches training (z_t, eps target, VLB) and the sampler (kernel, x_hat, IPR's
  re-noising): two train steps and an SRM + IPR pass of a tiny model, all finite."""
  from ipr_jax import build  # pylint: disable=g-import-not-at-top
  from ipr_jax import sampling  # pylint: disable=g-import-not-at-top
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top
  from ipr_jax.evaluation import settings  # pylint: disable=g-import-not-at-top
  from ipr_jax.models import denoiser  # pylint: disable=g-import-not-at-top
  from ipr_jax.runtime import errors  # pylint: disable=g-import-not-at-top
  from ipr_jax.training import trainer  # pylint: disable=g-import-not-at-top

  config = config_base.load_config("even_pixels:tiny")
  config.data.image_size, config.batch_size, config.num_train_steps = 16, 2, 2
  config.model.hid_dims, config.model.attention = (16, 16), (False, False)
  config.model.num_groups, config.model.num_head_channels = 8, 16
  config.model.t_emb_dim, config.model.d_emb = 32, 16
  config.time_sampler.density_num_samples = 2000
  config.flow = "diffusion_cosine"
  result = trainer.train(config, tmp_path)
  assert int(result.state.step) == 2
  assert all(np.isfinite(record["loss"]) for record in result.history if "loss" in record)

  config.sampler.steps_per_patch, config.ipr.steps_per_patch, config.ipr.budget = 2, 2, 1
  config.ipr.renoise_time = 0.5
  sampler_config, ipr_config = settings.sampler_configs(config)
  assert sampler_config.noise_flow == flows.make_flow("diffusion_cosine")
  assert settings.resolved_settings(config, batches=[np.arange(2)])["flow"] == "diffusion_cosine"
  denoise = denoiser.make_denoise_fn(build.make_model(config), config.data.patch_size)
  model = sampling.Denoiser(lambda z, t: denoise(result.state.params, z, t), config.data.patch_size)
  keys = jax.random.split(jax.random.key(0), 2)
  shape = (2, 16, 16, config.data.channels)
  out = sampling.srm_ipr(
      model, sampling.Puzzles(keys, noise=jnp.zeros(shape)), sampler_config, ipr_config
  )
  assert out.iterates.shape == (2,) + shape and np.all(np.isfinite(out.iterates))

  config.flow = "ddpm"
  with pytest.raises(errors.ConfigError, match=r"flow='ddpm' is unknown; expected one of"):
    settings.sampler_configs(config)
