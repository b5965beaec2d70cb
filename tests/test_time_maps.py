"""Tests for the SRM authors' framework's time-map schedules (`sampling.time_maps`) and their
sampling loop (`sampling.time_map_sampler`, as sampler.schedule and ipr.schedule).

Parity: tests/golden/spatialreasoners/samplers.npz holds the framework's (spatialreasoners 1.0.5)
per-step time maps, driven as its README says: t = ones, then next_t = schedule(t, sigma_theta)
with the stored sigma_theta of each step, until the schedule has finished.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax import sampling
from ipr_jax.models.denoiser import DenoiserOutput
from ipr_jax.noise import schedule
from ipr_jax.sampling import time_maps

GOLDEN = pathlib.Path(__file__).parent / "golden" / "spatialreasoners" / "samplers.npz"
P = 2  # patch size
N = 16  # patches of the 8x8 test images
CASES = (
    "raster",
    "adaptive_inverse",
    "adaptive_inverse_divthr",
    "adaptive_softmax_b1_row0",
    "adaptive_softmax_b1_row1",
    "mask_git",
)


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    arrays = {name: f[name] for name in f.files}
  arrays["cases"] = json.loads(str(arrays.pop("config_json")))["cases"]
  return arrays


def _settings(case_config) -> time_maps.TimeMapSettings:
  """The TimeMapSettings of a golden case's framework config."""
  cfg, kind = case_config["cfg"], case_config["cfg_class"]
  if kind == "RasterCfg":
    return time_maps.TimeMapSettings("raster", num_steps=cfg["num_steps"])
  if kind == "MaskGITCfg":
    return time_maps.TimeMapSettings(
        "mask_git", num_steps=cfg["num_steps_per_group"], num_groups=cfg["num_groups"]
    )
  if kind == "AdaptiveInverseCfg":
    return time_maps.TimeMapSettings(
        "adaptive_inverse",
        max_steps=cfg["max_steps"],
        alpha=cfg["alpha"],
        div_threshold=cfg["div_threshold"],
        max_approx_error=cfg["max_approx_error"],
        num_search_steps=cfg["num_search_steps"],
        finished_threshold=cfg["finished_threshold"],
        min_alpha=cfg["min_alpha"],
        min_step_size=cfg["min_step_size"],
    )
  assert kind == "AdaptiveSoftmaxCfg", kind
  return time_maps.TimeMapSettings(
      "adaptive_softmax",
      max_steps=cfg["max_steps"],
      alpha=cfg["alpha"],
      scale=cfg["scale"],
      max_clip_iter=cfg["max_clip_iter"],
      finished_threshold=cfg["finished_threshold"],
      epsilon=cfg["epsion"],
  )


@functools.partial(jax.jit, static_argnums=0)
def _next(settings, t, sigma_theta, step, active, order):
  return time_maps.next_time_map(settings, t, sigma_theta, step, active, order=order)


def _drive(settings, sigma_steps, active, order=None, t=None):
  """Runs the schedule from t (default ones) over the steps of `sigma_steps` `[S, B, V]`:
  (t_steps `[S + 1, B, V]`, should_denoise `[S, B, V]`)."""
  t = jnp.ones(sigma_steps.shape[1:], jnp.float32) if t is None else jnp.asarray(t)
  t_steps, denoise = [np.asarray(t)], []
  for step, sigma_theta in enumerate(sigma_steps):
    t, should_denoise = _next(settings, t, jnp.asarray(sigma_theta), step, active, order)
    t_steps.append(np.asarray(t))
    denoise.append(np.asarray(should_denoise))
  return np.stack(t_steps), np.stack(denoise)


@pytest.mark.parametrize("case", CASES)
def test_time_maps_match_the_framework(golden, case):
  """Every step's time map and should_denoise equal the framework's (float32 rounding: the
  adaptive_softmax sums and softmax; the 11-step bisection of adaptive_inverse exactly)."""
  settings = _settings(golden["cases"][case])
  t_steps, sigma_steps = golden[f"{case}/t_steps"], golden[f"{case}/sigma_theta"]
  order = jnp.asarray(golden["mask_git/patch_order"]) if case == "mask_git" else None
  active = jnp.ones(t_steps.shape[1:], bool)
  ours, denoise = _drive(settings, sigma_steps, active, order)
  tolerance = 1e-6 if settings.kind == "adaptive_softmax" else 0.0
  np.testing.assert_allclose(ours, t_steps, rtol=0, atol=tolerance)
  np.testing.assert_array_equal(denoise, golden[f"{case}/should_denoise"])
  if settings.kind == "adaptive_inverse":
    assert settings.search_steps == 10  # 10 comparisons, then the midpoint: 11 halvings


def test_adaptive_softmax_is_per_row_in_a_batch(golden):
  """Both rows of a batch of 2 follow their own batch-1 framework runs (the framework's own
  batch-2 run crashes)."""
  rows = [golden[f"adaptive_softmax_b1_row{r}/sigma_theta"] for r in (0, 1)]
  settings = _settings(golden["cases"]["adaptive_softmax_b1_row0"])
  ours, _ = _drive(settings, np.concatenate(rows, axis=1), jnp.ones((2, 16), bool))
  for r in (0, 1):
    expected = golden[f"adaptive_softmax_b1_row{r}/t_steps"][:, 0]
    np.testing.assert_allclose(ours[:, r], expected, rtol=0, atol=1e-6)


def test_mask_git_draws_its_order_from_the_keys():
  """Without an order, mask_git's comes from the keys: a permutation per row, the same for the
  same key, independent of the other rows."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(3))
  order = np.asarray(time_maps.mask_git_order(keys, N))
  assert all(sorted(row) == list(range(N)) for row in order)
  np.testing.assert_array_equal(time_maps.mask_git_order(keys[1:2], N)[0], order[1])
  settings = time_maps.TimeMapSettings("mask_git", num_steps=2, num_groups=4)
  t, active = jnp.ones((3, N)), jnp.ones((3, N), bool)
  drawn = time_maps.mask_git(t, 0, active, settings, keys=keys)[0]
  given = time_maps.mask_git(t, 0, active, settings, order=jnp.asarray(order))[0]
  np.testing.assert_array_equal(drawn, given)


def _random_active(seed, batch=3):
  """`[B, N]` bool: rows with 5, 11 and 16 taking part (at t = 1; the others at t = 0)."""
  rng = np.random.default_rng(seed)
  active = np.zeros((batch, N), bool)
  for b, k in enumerate((5, 11, 16)[:batch]):
    active[b, rng.permutation(N)[:k]] = True
  return active


ALL_SETTINGS = (
    time_maps.TimeMapSettings("raster", num_steps=3),
    time_maps.TimeMapSettings("mask_git", num_steps=2, num_groups=3),
    time_maps.TimeMapSettings("adaptive_inverse", max_steps=7),
    time_maps.TimeMapSettings("adaptive_inverse", max_steps=7, div_threshold=0.3),
    time_maps.TimeMapSettings("adaptive_softmax", max_steps=7, scale=1.0),
)


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda s: s.kind)
def test_every_schedule_ends_at_zero_never_increases_and_keeps_the_others(settings):
  active = _random_active(1)
  t = np.where(active, 1.0, 0.0).astype(np.float32)
  rng = np.random.default_rng(2)
  counts = active.sum(1)
  if settings.kind == "raster":
    steps = N * settings.num_steps
  elif settings.kind == "mask_git":
    steps = settings.num_groups * settings.num_steps
  else:
    steps = settings.max_steps
  sigma_steps = np.exp(rng.standard_normal((steps, 3, N))).astype(np.float32)
  order = jnp.asarray(np.argsort(rng.uniform(size=(3, N)), axis=1))
  t_steps, denoise = _drive(settings, sigma_steps, jnp.asarray(active), order, t)
  assert np.all(t_steps[-1] == 0)
  assert np.all(np.diff(t_steps, axis=0) <= 0)
  assert np.all(t_steps[:, ~active] == 0) and not np.any(denoise[:, ~active])
  if settings.kind == "raster":  # one patch, one level at a time, in index order
    for b in range(3):
      moved = np.argwhere(np.diff(t_steps[:, b], axis=0) < 0)
      assert len(moved) == counts[b] * settings.num_steps
      np.testing.assert_array_equal(moved[:, 0], np.arange(len(moved)))
      ids = np.flatnonzero(active[b])
      np.testing.assert_array_equal(moved[:, 1], np.repeat(ids, settings.num_steps))
      assert np.all(t_steps[len(moved), b] == 0)


def test_raster_levels_are_torch_linspace():
  np.testing.assert_array_equal(time_maps.noise_levels(2), np.float32([1, 0.5, 0]))
  levels = time_maps.noise_levels(7)
  assert levels[0] == 1 and levels[-1] == 0 and np.all(np.diff(levels) < 0)
  np.testing.assert_allclose(levels, np.linspace(1, 0, 8), atol=1e-7)


def test_mask_git_bounds_are_the_frameworks_groups():
  """16 patches in 4 groups: floor(16 cos(pi/8 k)) masked after group k: 14, 11, 6 -> groups of
  2, 3, 5, 6; a single patch waits for the last group."""
  bounds = time_maps.mask_git_bounds(16, 4)
  np.testing.assert_array_equal(bounds[16], [0, 2, 5, 10, 16])
  np.testing.assert_array_equal(bounds[1], [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(bounds[0], [0, 0, 0, 0, 0])


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="kind must be one of"):
    time_maps.TimeMapSettings("greedy")
  with pytest.raises(ValueError, match="num_groups must be a positive integer"):
    time_maps.TimeMapSettings("mask_git", num_groups=0)
  for name, bad in (
      ("schedule", "rastr"),
      ("num_groups", 0),
      ("adaptive_alpha", 0.0),
      ("divergence_threshold", -1.0),
      ("softmax_scale", 0.0),
  ):
    for config in (sampling.SamplerConfig, sampling.IPRConfig):
      with pytest.raises(ValueError, match=f"{name} must"):
        config(**{name: bad})


# ---------------------------------------------------------------------------
# The sampling loop.


def _toy_denoiser():
  """A cheap denoiser whose samples differ from their noise; sigma depends on the state."""

  def denoise(z, t):
    b, h, w, _ = z.shape
    u = jnp.tanh(z) * (0.5 + t) + 0.1
    pooled = z.mean(-1).reshape(b, h // P, P, w // P, P).mean((2, 4))
    sigma = jnp.repeat(jnp.repeat(jnp.exp(jnp.sin(3.0 * pooled)), P, 1), P, 2)[..., None]
    return DenoiserOutput(u=u, v=jax.nn.sigmoid(z), logvar=2 * jnp.log(sigma), sigma=sigma)

  return sampling.Denoiser(denoise, P)


def _inputs():
  """Three 8x8x2 puzzles with 5, 8 and 11 unknown patches."""
  rng = np.random.default_rng(3)
  image = rng.uniform(-1, 1, (3, 8, 8, 2)).astype(np.float32)
  unknown = np.zeros((3, N), bool)
  for b, k in enumerate((5, 8, 11)):
    unknown[b, rng.permutation(N)[:k]] = True
  mask = np.repeat(np.repeat(unknown.reshape(3, 4, 4), P, 1), P, 2)[..., None].astype(np.float32)
  noise = rng.standard_normal(image.shape).astype(np.float32)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(3))
  return sampling.Puzzles(keys, image=image, mask=mask, noise=noise), unknown


SAMPLERS = {
    "raster": sampling.SamplerConfig(2, 0.5, schedule="raster"),
    "mask_git": sampling.SamplerConfig(2, 0.5, schedule="mask_git", num_groups=3),
    "adaptive_inverse": sampling.SamplerConfig(3, 0.5, schedule="adaptive_inverse"),
    "adaptive_softmax": sampling.SamplerConfig(
        3, 0.5, schedule="adaptive_softmax", max_steps=6, softmax_scale=1.0
    ),
}


@functools.partial(jax.jit, static_argnums=0)
def _srm(config, puzzles):
  return sampling.srm_sample(_toy_denoiser(), puzzles, config, record=True)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_srm_sample_on_a_time_map_finishes_with_the_expected_passes(name):
  config = SAMPLERS[name]
  puzzles, unknown = _inputs()
  result = jax.device_get(_srm(config, puzzles))
  z, counts = np.asarray(result.z), unknown.sum(1)
  given = np.asarray(puzzles.mask) == 0
  np.testing.assert_array_equal(np.where(given, z, 0), np.where(given, puzzles.image, 0))
  assert np.abs(z - puzzles.noise)[~np.broadcast_to(given, z.shape)].mean() > 0.1
  expected = {
      "raster": counts * 2,
      "mask_git": np.full(3, 3 * 2),
      "adaptive_inverse": [schedule.max_steps(int(n), 3, 0.5) for n in counts],
      "adaptive_softmax": np.full(3, 6),
  }[name]
  np.testing.assert_array_equal(result.nfe, expected)
  # Every unknown patch reached t = 0 (in the recorded order), the given ones never moved.
  for b in range(3):
    np.testing.assert_array_equal(np.sort(result.order[b, : counts[b]]), np.flatnonzero(unknown[b]))
  t_rows = np.asarray(result.t_rows)
  assert np.all(t_rows[:, ~unknown] == 0)
  assert np.all(t_rows[0][unknown] == 1)


@pytest.mark.parametrize("name", ["raster", "adaptive_inverse", "mask_git", "adaptive_softmax"])
def test_ipr_regeneration_on_a_time_map_keeps_the_other_patches(name):
  """IPR with ipr.schedule=<time map> (SRM pass adaptive): the patches not re-noised in an
  iteration are bit-identical to the previous iterate; passes = SRM + each iteration's."""
  ipr_config = sampling.IPRConfig(
      budget=2,
      steps_per_patch=2,
      overlap=0.5,
      resampling_ratio=0.5,
      schedule=name,
      num_groups=2,
  )
  puzzles, unknown = _inputs()
  sampler_config = sampling.SamplerConfig(3, 0.5)
  result = jax.device_get(
      jax.jit(lambda p: sampling.srm_ipr(_toy_denoiser(), p, sampler_config, ipr_config))(puzzles)
  )
  iterates = np.asarray(result.iterates)
  for i in range(2):
    renoised = np.asarray(result.resampled[i])
    pixels = np.repeat(np.repeat(renoised.reshape(3, 4, 4), P, 1), P, 2)[..., None]
    kept = np.broadcast_to(~pixels, iterates[i].shape)
    np.testing.assert_array_equal(iterates[i + 1][kept], iterates[i][kept])
    assert np.mean(np.abs(iterates[i + 1] - iterates[i])[~kept]) > 0.1
    k = renoised.sum(1)
    spent = np.diff(np.asarray(result.nfe_per_budget), axis=0)[i]
    expected = {
        "raster": k * 2,
        "mask_git": np.where(k > 0, 2 * 2, 0),
        "adaptive_inverse": [schedule.max_steps(int(n), 2, 0.5) for n in k],
        "adaptive_softmax": [schedule.max_steps(int(n), 2, 0.5) for n in k],
    }[name]
    np.testing.assert_array_equal(spent, expected)
  srm_passes = [schedule.max_steps(int(n), 3, 0.5) for n in unknown.sum(1)]
  np.testing.assert_array_equal(result.nfe_per_budget[0], srm_passes)


def test_time_map_srm_pass_inside_ipr_equals_srm_sample():
  """sampler.schedule=raster: IPR's budget 0 is srm_sample's result (a deterministic reverse
  step: the two draw their step noise from different keys)."""
  puzzles, _ = _inputs()
  config = sampling.SamplerConfig(2, 0.5, stochasticity=0.0, clamp_noise=False, schedule="raster")
  ipr_config = sampling.IPRConfig(budget=1, steps_per_patch=2, overlap=0.5)
  result = jax.device_get(
      jax.jit(lambda p: sampling.srm_ipr(_toy_denoiser(), p, config, ipr_config))(puzzles)
  )
  alone = jax.device_get(_srm(config, puzzles))
  np.testing.assert_array_equal(result.iterates[0], alone.z)
  np.testing.assert_array_equal(result.nfe_per_budget[0], alone.nfe)


def test_partial_renoising_scales_the_raster_levels():
  """ipr.renoise_time = 0.5 with a raster regeneration: the re-noised patches start at 0.5 and
  take round(4 x 0.5) = 2 levels each; the kept patches stay bit-identical."""
  ipr_config = sampling.IPRConfig(
      budget=1, steps_per_patch=4, overlap=0.5, renoise_time=0.5, schedule="raster"
  )
  puzzles, _ = _inputs()
  result = jax.device_get(
      jax.jit(
          lambda p: sampling.srm_ipr(_toy_denoiser(), p, sampling.SamplerConfig(3, 0.5), ipr_config)
      )(puzzles)
  )
  renoised = np.asarray(result.resampled[0])
  pixels = np.repeat(np.repeat(renoised.reshape(3, 4, 4), P, 1), P, 2)[..., None]
  kept = np.broadcast_to(~pixels, result.iterates[0].shape)
  np.testing.assert_array_equal(result.iterates[1][kept], result.iterates[0][kept])
  spent = np.diff(np.asarray(result.nfe_per_budget), axis=0)[0]
  np.testing.assert_array_equal(spent, renoised.sum(1) * 2)
  t, active = jnp.ones((1, 4)), jnp.ones((1, 4), bool)
  settings = time_maps.TimeMapSettings("raster", num_steps=2)
  np.testing.assert_array_equal(time_maps.raster(0.5 * t, 0, active, settings, 0.5)[0][0, 0], 0.25)
