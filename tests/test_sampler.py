"""Tests for ipr_jax.sampler: greedy SRM and IPR on batches of puzzles."""

import dataclasses
import functools
import json
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax import sampler
from ipr_jax import schedule
from ipr_jax.models.denoiser import DenoiserOutput

# ---------------------------------------------------------------------------
# Fake denoisers.


def _pixels(patch_values, patch_size):
  """[B, gh, gw] -> [B, H, W, 1] by repeating each patch value."""
  x = jnp.repeat(jnp.repeat(patch_values, patch_size, axis=1), patch_size, axis=2)
  return x[..., None]


def oracle_denoiser(x, patch_sigma, patch_size):
  """Exact velocity towards the clean image x: u = (z - x) / t for t > 0.

  From z = (1 - t) x + t eps and u = eps - x (spec §2.1), z - x = t (eps - x).
  sigma is the fixed per-patch table `patch_sigma` [B, gh, gw].
  """
  sigma = _pixels(patch_sigma, patch_size)

  def denoise(z, t):
    u = jnp.where(t > 0, (z - x) / jnp.where(t > 0, t, 1.0), 0.0)
    return DenoiserOutput(u=u, v=jnp.full_like(z, 0.5), logvar=2 * jnp.log(sigma),
                          sigma=sigma)
  return denoise


def toy_denoiser(patch_size, scale=1.0):
  """A cheap per-example denoiser whose sigma depends on the state."""
  def denoise(z, t):
    b, h, w, _ = z.shape
    u = scale * jnp.tanh(z) * (0.5 + t) + 0.1
    v = jax.nn.sigmoid(z)
    pooled = z.mean(-1).reshape(b, h // patch_size, patch_size, w // patch_size,
                                patch_size).mean((2, 4))
    sigma = _pixels(jnp.exp(jnp.sin(3.0 * pooled)), patch_size)
    return DenoiserOutput(u=u, v=v, logvar=2 * jnp.log(sigma), sigma=sigma)
  return denoise


def _keys(batch, seed=0):
  return sampler.puzzle_keys(jax.random.key(seed), jnp.arange(batch))


def _random_mask(key, batch, grid, patch_size, num_unknown):
  """Pixel mask [B, H, W, 1] with num_unknown[b] unknown patches each."""
  n = grid[0] * grid[1]
  rows = []
  for b, k in enumerate(num_unknown):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, b), n))
    row = np.zeros(n, np.float32)
    row[perm[:k]] = 1.0
    rows.append(row.reshape(grid))
  return _pixels(jnp.asarray(np.stack(rows)), patch_size)


def reference_rows(unknown, sigma, steps_per_patch, overlap):
  """The reference's scheduling-matrix algorithm (spec §4.4), in numpy.

  Args:
    unknown: [N] bool.
    sigma: [N] fixed patch sigmas.

  Returns:
    (t_rows [max_steps, N], order, order_steps) for one puzzle.
  """
  s = schedule.make_schedule(int(unknown.sum()), steps_per_patch, overlap)
  max_steps, starts, proto = s.max_steps, s.block_starts, s.prototype
  matrix = np.tile(unknown.astype(np.float32), (max_steps + 1, 1))
  waiting = unknown.copy()
  counter, target, rows, order, steps = 0, 0, [], [], []
  for step in range(max_steps):
    rows.append(matrix[step].copy())
    predict = target == step
    if predict:
      counter += 1
      target = starts[counter]
    if predict and waiting.any():
      q = int(np.argmin(sigma + (~waiting) * (sigma.max() + 1)))
      waiting[q] = False
      order.append(q)
      steps.append(step)
      length = min(len(proto), max_steps - step)
      matrix[step:step + length, q] = np.minimum(proto[:length],
                                                 matrix[step:step + length, q])
      if step + length < max_steps:
        matrix[step + length:, q] = 0
      matrix[max_steps] = 0
  return np.array(rows).reshape(max_steps, -1), order, steps


# ---------------------------------------------------------------------------
# Greedy SRM.


@functools.lru_cache(maxsize=None)
def _oracle_srm(steps_per_patch, overlap, stochasticity, clamp_noise):
  """A jitted oracle SRM run with recorded rows (one compile per setting)."""
  config = sampler.SamplerConfig(steps_per_patch, overlap, stochasticity=stochasticity,
                                 clamp_noise=clamp_noise)

  @jax.jit
  def run(x, patch_sigma, mask, noise, keys):
    masked = (1 - mask) * x
    return sampler.srm_sample(
        oracle_denoiser(x, patch_sigma, 1), masked + mask * noise, masked, mask,
        sampler.unknown_patches(mask, 1), keys, patch_size=1, config=config,
        record=True)
  return run


@pytest.fixture(scope="module")
def ms_oracle_run():
  """Three 9x9 one-pixel-cell puzzles (n = 61, 56, 81) with tied sigmas."""
  batch, num_unknown = 3, [61, 56, 81]
  x = jax.random.uniform(jax.random.key(1), (batch, 9, 9, 1), minval=-1, maxval=1)
  mask = _random_mask(jax.random.key(5), batch, (9, 9), 1, num_unknown)
  # Few distinct values: many ties.
  patch_sigma = jax.random.randint(jax.random.key(6), (batch, 9, 9), 0, 6) * .25 + .5
  noise = jax.random.normal(jax.random.key(7), x.shape)
  out = _oracle_srm(3, 0.0, 0.5, True)(x, patch_sigma, mask, noise, _keys(batch))
  return x, mask, patch_sigma, out


def test_oracle_srm_reproduces_the_image_and_keeps_given_cells(ms_oracle_run):
  x, mask, _, out = ms_oracle_run
  np.testing.assert_allclose(out.z, x, atol=2e-5)
  given = mask == 0
  np.testing.assert_array_equal(jnp.where(given, out.z, 0), jnp.where(given, x, 0))
  # Given patches are never noised: their time is 0 at every step.
  unknown = np.asarray(sampler.unknown_patches(mask, 1))
  assert np.all(np.asarray(out.t_rows)[:, ~unknown] == 0)
  np.testing.assert_array_equal(out.nfe, [3 * 61, 3 * 56, 3 * 81])


def test_generation_order_is_ascending_sigma_with_ties_to_lowest_index(ms_oracle_run):
  _, mask, patch_sigma, out = ms_oracle_run
  sig = np.asarray(patch_sigma).reshape(3, -1)
  unk = np.asarray(sampler.unknown_patches(mask, 1))
  for b in range(3):
    ids = np.flatnonzero(unk[b])
    expected = ids[np.argsort(sig[b, ids], kind="stable")]
    np.testing.assert_array_equal(out.order[b, :len(ids)], expected)
    assert np.all(np.asarray(out.order[b, len(ids):]) == -1)
    # The reference's S-matrix algorithm gives the same order, steps and rows
    # (n = 61: starts 0, 2, 5, ...; n = 56: L = 4 with a truncated last block).
    rows, order, steps = reference_rows(unk[b], sig[b], 3, 0.0)
    np.testing.assert_array_equal(out.order[b, :len(ids)], order)
    np.testing.assert_array_equal(out.order_step[b, :len(ids)], steps)
    np.testing.assert_array_equal(np.asarray(out.t_rows)[:len(rows), b], rows)
    assert np.all(np.asarray(out.t_rows)[len(rows):, b] == 0)


@pytest.mark.parametrize("steps_per_patch,overlap,num_unknown", [
    (10, 0.8, [17, 13, 19, 1]),  # L = 11 truncated; starts 0, 1, 3; n = 1
    (30, 0.9, [9, 12, 16, 2]),  # L = 31 in float32
])
def test_time_rows_match_the_reference_matrix_algorithm(steps_per_patch, overlap,
                                                       num_unknown):
  batch = len(num_unknown)
  mask = _random_mask(jax.random.key(8), batch, (5, 5), 1, num_unknown)
  patch_sigma = jax.random.uniform(jax.random.key(9), (batch, 5, 5))
  x = jnp.zeros((batch, 5, 5, 1))
  noise = jax.random.normal(jax.random.key(10), x.shape)
  out = _oracle_srm(steps_per_patch, overlap, 0.0, False)(
      x, patch_sigma, mask, noise, _keys(batch))
  unknown = sampler.unknown_patches(mask, 1)
  for b in range(batch):
    rows, order, _ = reference_rows(np.asarray(unknown[b]),
                                    np.asarray(patch_sigma[b]).ravel(),
                                    steps_per_patch, overlap)
    np.testing.assert_array_equal(np.asarray(out.t_rows)[:len(rows), b], rows)
    np.testing.assert_array_equal(out.order[b, :len(order)], order)
    assert out.nfe[b] == len(rows)


# ---------------------------------------------------------------------------
# NFE (spec §4.6), with oracle IPR checks.

_DETERMINISTIC = dict(stochasticity=0.0, clamp_noise=False)


def test_nfe_even_pixels():
  fn = jax.jit(lambda keys: sampler.srm_ipr(
      toy_denoiser(1), keys, image=None, noise=jnp.zeros((1, 8, 8, 3)), patch_size=1,
      sampler_config=sampler.SamplerConfig(30, 0.9, **_DETERMINISTIC),
      ipr_config=sampler.IPRConfig(budget=30, steps_per_patch=30, overlap=0.9)))
  result = fn(_keys(1))
  assert int(result.nfe[0]) == 219 + 30 * 75 == 2469
  assert np.all(np.asarray(result.initial_order) >= 0)  # all 64 generated
  np.testing.assert_array_equal(result.nfe_per_budget[:, 0], 219 + 75 * np.arange(31))
  assert np.all(np.asarray(result.resampled).sum(-1) == 16)


def test_nfe_sudoku_hard_and_oracle_ipr():
  num_unknown = [55, 56, 61, 63, 70, 81]
  batch = len(num_unknown)
  mask = _random_mask(jax.random.key(10), batch, (9, 9), 1, num_unknown)
  x = jax.random.uniform(jax.random.key(11), (batch, 9, 9, 1), minval=-1)
  patch_sigma = jax.random.uniform(jax.random.key(12), (batch, 9, 9))
  fn = jax.jit(lambda keys, x, mask: sampler.srm_ipr(
      oracle_denoiser(x, patch_sigma, 1), keys, image=x, mask=mask, patch_size=1,
      sampler_config=sampler.SamplerConfig(3, 0.0, **_DETERMINISTIC),
      ipr_config=sampler.IPRConfig(budget=30, steps_per_patch=10, overlap=0.8)))
  result = fn(_keys(batch), x, mask)
  expected = [3 * n + 30 * (2 * (n // 4) + 8) for n in num_unknown]
  np.testing.assert_array_equal(result.nfe, expected)
  unknown = np.asarray(sampler.unknown_patches(mask, 1))
  resampled = np.asarray(result.resampled)
  for b, n in enumerate(num_unknown):
    assert np.all(np.asarray(result.initial_order[b, :n]) >= 0)
    assert np.all(resampled[:, b].sum(-1) == n // 4)
    assert not np.any(resampled[:, b] & ~unknown[b])
  # The oracle regenerates the clean image; given cells stay as given.
  np.testing.assert_allclose(result.z, x, atol=2e-5)
  np.testing.assert_array_equal(jnp.where(mask == 0, result.z, 0),
                                jnp.where(mask == 0, x, 0))


def test_nfe_sudoku_corrupted_and_oracle_correction():
  x = jax.random.uniform(jax.random.key(12), (2, 9, 9, 1), minval=-1)
  patch_sigma = jax.random.uniform(jax.random.key(13), (2, 9, 9))
  fn = jax.jit(lambda keys, x: sampler.srm_ipr(
      oracle_denoiser(x, patch_sigma, 1), keys, image=x, patch_size=1,
      num_snapshots=1,
      sampler_config=sampler.SamplerConfig(3, 0.0, **_DETERMINISTIC),
      ipr_config=sampler.IPRConfig(budget=15, steps_per_patch=10, overlap=0.8,
                                   mode="correction", num_corruption_swaps=5)))
  result = fn(_keys(2), x)
  np.testing.assert_array_equal(result.nfe, [15 * 48] * 2)
  assert np.all(np.asarray(result.resampled).sum(-1) == 20)
  assert np.all(np.asarray(result.initial_order) == -1)
  # Budget 0 is the corrupted grid (cells swapped, nothing generated yet);
  # every cell re-noised at least once is back to the clean value.
  corrupted = np.asarray(result.snapshots[0, 0, ..., 0])
  assert 2 <= np.sum(corrupted != np.asarray(x[0, ..., 0])) <= 10
  touched = np.asarray(result.resampled[:, 0]).any(0).reshape(9, 9)
  final = np.asarray(result.z[0, ..., 0])
  np.testing.assert_allclose(final[touched], np.asarray(x[0, ..., 0])[touched], atol=2e-5)
  np.testing.assert_array_equal(final[~touched], corrupted[~touched])


# ---------------------------------------------------------------------------
# Batching, keys, jit / pmap, immediate stop.


def _standard_inputs(batch, size=8, patch=2, d=2):
  grid = (size // patch, size // patch)
  image = jax.random.uniform(jax.random.key(13), (batch, size, size, d), minval=-1)
  mask = _random_mask(jax.random.key(14), batch, grid, patch,
                      [5 + 3 * (b % 4) for b in range(batch)])
  noise = jax.random.normal(jax.random.key(15), image.shape)
  return image, mask, noise


_BATCH_CONFIGS = dict(
    patch_size=2, sampler_config=sampler.SamplerConfig(3, 0.5, stochasticity=0.5),
    ipr_config=sampler.IPRConfig(budget=2, steps_per_patch=4, overlap=0.5))


def _score_fn(z):
  return {"mean": z.mean((1, 2, 3)), "first": z[:, 0, 0, 0]}


@jax.jit
@chex.assert_max_traces(n=2)  # batch 4 and batch 1, however often it is called
def _batch_run(scale, keys, image, mask, noise):
  return sampler.srm_ipr(toy_denoiser(2, scale), keys, image=image, mask=mask,
                         noise=noise, score_fn=_score_fn, num_snapshots=2,
                         **_BATCH_CONFIGS)


@pytest.fixture(scope="module")
def batch_run():
  image, mask, noise = _standard_inputs(4)
  keys = sampler.puzzle_keys(jax.random.key(0), jnp.array([7, 3, 11, 5]))
  return (keys, image, mask, noise), _batch_run(1.0, keys, image, mask, noise)


def test_batch_equals_puzzles_alone(batch_run):
  (keys, image, mask, noise), together = batch_run
  for b in range(4):
    alone = _batch_run(1.0, keys[b:b + 1], image[b:b + 1], mask[b:b + 1],
                       noise[b:b + 1])
    np.testing.assert_allclose(alone.z[0], together.z[b], atol=1e-6)
    np.testing.assert_array_equal(alone.initial_order[0], together.initial_order[b])
    np.testing.assert_array_equal(alone.resampled[:, 0], together.resampled[:, b])
    assert alone.nfe[0] == together.nfe[b]
    np.testing.assert_allclose(alone.scores["mean"][:, 0],
                               together.scores["mean"][:, b], atol=1e-6)
  # Different puzzle keys give different refinements; given cells are kept.
  assert not np.array_equal(together.resampled[:, 0], together.resampled[:, 1])
  np.testing.assert_array_equal(jnp.where(mask == 0, together.z, 0),
                                jnp.where(mask == 0, image, 0))
  # The jitted sampler does not retrace for new values (assert_max_traces).
  again = _batch_run(1.0, _keys(4, seed=1), image, 1 - mask, noise)
  assert not np.allclose(again.z, together.z)


def test_pmap_matches_jit(batch_run):
  devices = jax.local_devices()
  assert len(devices) >= 2, "conftest sets two host devices"
  (keys, image, mask, noise), expected = batch_run

  def shard(x):
    return x.reshape((2, 2) + x.shape[1:])

  p_run = jax.pmap(
      lambda scale, keys, image, mask, noise: sampler.srm_ipr(
          toy_denoiser(2, scale), keys, image=image, mask=mask, noise=noise,
          **_BATCH_CONFIGS),
      in_axes=(None, 0, 0, 0, 0), devices=devices[:2])
  got = p_run(1.0, shard(keys), shard(image), shard(mask), shard(noise))
  np.testing.assert_allclose(got.z.reshape(expected.z.shape), expected.z, atol=1e-6)
  np.testing.assert_array_equal(got.nfe.reshape(-1), expected.nfe)


def test_immediate_stop_scores_and_snapshots(batch_run):
  (keys, image, mask, noise), free = batch_run
  config = dict(_BATCH_CONFIGS, ipr_config=dataclasses.replace(
      _BATCH_CONFIGS["ipr_config"], immediate_stop=True))

  def verify(z):  # puzzle 0 is accepted at once (after SRM), the others never
    return jnp.arange(z.shape[0]) == 0

  result = jax.jit(lambda keys: sampler.srm_ipr(
      toy_denoiser(2), keys, image=image, mask=mask, noise=noise,
      score_fn=_score_fn, verify_fn=verify, num_snapshots=2, **config))(keys)
  np.testing.assert_array_equal(result.stop_budget, [0, -1, -1, -1])
  srm_nfe = free.nfe_per_budget[0]
  # The stopped puzzle keeps its SRM sample, a flat curve and its SRM passes.
  np.testing.assert_array_equal(result.nfe_per_budget[:, 0], srm_nfe[0])
  np.testing.assert_array_equal(result.snapshots[:, 0],
                                jnp.repeat(free.snapshots[:1, 0], 3, axis=0))
  np.testing.assert_array_equal(result.z[0], free.snapshots[0, 0])
  assert not np.any(np.asarray(result.resampled[:, 0]))
  # The other puzzles run as without stopping.
  np.testing.assert_allclose(result.z[1:], free.z[1:], atol=1e-6)
  np.testing.assert_array_equal(result.nfe[1:], free.nfe[1:])
  # Scores are score_fn of the sample after each budget.
  assert result.scores["mean"].shape == (3, 4)
  for b in range(3):
    np.testing.assert_array_equal(free.scores["first"][b, :2],
                                  free.snapshots[b, :, 0, 0, 0])
  np.testing.assert_allclose(free.scores["mean"][-1], free.z.mean((1, 2, 3)),
                             rtol=1e-6)


def test_clamp_noise_and_determinism_at_zero_stochasticity():
  batch = 2
  image, mask, noise = _standard_inputs(batch)
  masked = (1 - mask) * image
  z0 = masked + mask * noise
  unknown = sampler.unknown_patches(mask, 2)

  def make(clamp_noise):
    config = sampler.SamplerConfig(3, 0.0, stochasticity=0.0, clamp_noise=clamp_noise)
    return jax.jit(lambda keys: sampler.srm_sample(
        toy_denoiser(2), z0, masked, mask, unknown, keys, patch_size=2,
        config=config).z)

  runs = {False: make(False), True: make(True)}

  def run(keys, clamp_noise):
    return runs[clamp_noise](keys)

  exact_a, exact_b = run(_keys(batch, 0), False), run(_keys(batch, 1), False)
  np.testing.assert_array_equal(exact_a, exact_b)
  noisy = run(_keys(batch, 0), True)
  diff = float(jnp.abs(noisy - exact_a).max())
  assert 0 < diff < 1e-4, diff


# ---------------------------------------------------------------------------
# IPR pieces.


def test_resample_mask_has_exactly_k_candidates():
  keys = jax.random.split(jax.random.key(16), 400)
  counts = [81, 55, 30, 3, 1]
  candidates = np.zeros((len(counts), 81), bool)
  for i, count in enumerate(counts):
    perm = np.asarray(jax.random.permutation(jax.random.key(count), 81))
    candidates[i, perm[:count]] = True
  for ratio in (0.25, 1.0, 0.1):
    draw = jax.jit(jax.vmap(jax.vmap(sampler.resample_mask, in_axes=(0, None, None)),
                            in_axes=(None, 0, None)), static_argnums=2)
    masks = np.asarray(draw(keys, jnp.asarray(candidates), ratio))  # [5, 400, 81]
    for i, count in enumerate(counts):
      k = max(1, int(count * ratio))
      assert np.all(masks[i].sum(-1) == k), (count, ratio)
      assert not np.any(masks[i] & ~candidates[i])
      if k < count:  # roughly uniform over the candidates
        freq = masks[i][:, candidates[i]].mean(0)
        assert np.all(np.abs(freq - k / count) < 0.12), freq


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.25])
def test_bad_ratio_raises(ratio):
  with pytest.raises(ValueError, match="resampling_ratio"):
    sampler.resample_mask(jax.random.key(0), jnp.ones(9, bool), ratio)
  with pytest.raises(ValueError, match="resampling_ratio"):
    sampler.IPRConfig(resampling_ratio=ratio)


def test_bad_config_values_raise():
  with pytest.raises(ValueError, match="top_k"):
    sampler.SamplerConfig(top_k=2)
  with pytest.raises(ValueError, match="noise_type"):
    sampler.IPRConfig(noise_type="gaussian")
  with pytest.raises(ValueError, match="mode"):
    sampler.IPRConfig(mode="repair")
  with pytest.raises(ValueError, match="patch_size"):
    sampler.unknown_patches(jnp.ones((1, 9, 9, 1)), 2)
  with pytest.raises(ValueError, match="keys"):
    sampler.srm_sample(toy_denoiser(1), jnp.zeros((2, 3, 3, 1)), None, None,
                       jnp.ones((2, 9), bool), jax.random.key(0), patch_size=1,
                       config=sampler.SamplerConfig())


def test_corruption_swaps_two_cells_in_different_rows_and_columns():
  digits = jnp.arange(81, dtype=jnp.float32).reshape(9, 9)
  image = jnp.stack([_pixels(digits[None], 2)[0, ..., 0]] * 2, -1)  # [18, 18, 2]
  keys = jax.random.split(jax.random.key(17), 50)
  corrupt = jax.jit(jax.vmap(lambda k: sampler.corrupt_by_swaps(k, image, 2, 1)))
  for out in np.asarray(corrupt(keys)):
    cells = out[::2, ::2, 0]
    changed = np.argwhere(cells != np.asarray(digits))
    assert len(changed) == 2
    (r0, c0), (r1, c1) = changed
    assert r0 != r1 and c0 != c1
    assert cells[r0, c0] == digits[r1, c1] and cells[r1, c1] == digits[r0, c0]
    np.testing.assert_array_equal(out, np.repeat(np.repeat(out[::2, ::2], 2, 0), 2, 1))


# ---------------------------------------------------------------------------
# Parity with the reference's deterministic greedy runs.


def _golden_denoiser(golden_dir, case):
  from ipr_jax.models.denoiser import srm_head
  from ipr_jax.models.state_dict import unet_params_from_state_dict
  from ipr_jax.models.unet import UNet

  files = [golden_dir / f"unet_{case}_tiny.npz"]
  if case == "ep":
    files.append(golden_dir / "unet_ep_tiny_sd_decoder.npz")
  state = {}
  for path in files:
    with np.load(path) as f:
      state.update({k[3:]: f[k] for k in f.files if k.startswith("sd/")})
  if case == "ms":
    model = UNet(hid_dims=[32] * 6, attention=[False] * 4 + [True] * 2, d_in=1,
                 d_out=3, num_blocks=1, t_emb_dim=64, d_emb=256,
                 num_head_channels=16, dropout=0.0)
    patch = 28
  else:
    model = UNet(hid_dims=[32, 64, 64, 64], attention=[False, False, True, True],
                 d_in=3, d_out=7, num_blocks=2, t_emb_dim=64, d_emb=256,
                 num_head_channels=32, dropout=0.0)
    patch = 4
  params = unet_params_from_state_dict(state, model)

  def denoise(z, t):
    return srm_head(model.apply({"params": params}, z, t), patch)
  return denoise, patch


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.mark.parametrize("case", ["ep", "ms"])
def test_greedy_matches_reference_run(golden_dir, case):
  denoise, patch = _golden_denoiser(golden_dir, case)
  golden = dict(np.load(golden_dir / f"greedy_{case}_tiny.npz"))
  cfg = json.loads(str(golden["config_json"]))["sampler"]
  z_t = _nhwc(golden["z_T"])
  if case == "ms":
    mask, masked = _nhwc(golden["mask"]), _nhwc(golden["masked"])
    z0 = masked + mask * z_t
    unknown = sampler.unknown_patches(mask, patch)
  else:
    mask = masked = None
    z0 = z_t
    unknown = jnp.ones((1, golden["t_rows"].shape[1]), bool)
  config = sampler.SamplerConfig(cfg["steps_per_patch"], cfg["overlap"],
                                 stochasticity=cfg["stochasticity"],
                                 temperature=cfg["temperature"], clamp_noise=False)
  start = time.time()
  out = jax.jit(lambda z: sampler.srm_sample(
      denoise, z, masked, mask, unknown, _keys(1), patch_size=patch,
      config=config, record=True))(z0)
  jax.block_until_ready(out)
  elapsed = time.time() - start
  calls = int(golden["num_denoiser_calls"])
  n = len(golden["selected_patches"])
  assert int(out.nfe[0]) == calls
  np.testing.assert_array_equal(out.order[0, :n], golden["selected_patches"])
  np.testing.assert_array_equal(out.order_step[0, :n], golden["selection_steps"])
  np.testing.assert_array_equal(np.asarray(out.t_rows)[:calls, 0], golden["t_rows"])
  np.testing.assert_allclose(np.asarray(out.sigma_rows)[:calls, 0],
                             golden["sigma_rows"], rtol=1e-4, atol=1e-5)
  sample = _nhwc(golden["sample"])
  max_diff = float(jnp.abs(out.z - sample).max())
  print(f"greedy {case}: {calls} calls in {elapsed:.1f}s, max |z - ref| = {max_diff:.2e}")
  assert max_diff < 1e-4
  if case == "ep":  # the reference's real clamp noise moves the sample by ~1e-5
    noisy = sampler.srm_sample(
        denoise, z0, masked, mask, unknown, _keys(1), patch_size=patch,
        config=sampler.SamplerConfig(4, 0.5, stochasticity=0.0, clamp_noise=True))
    np.testing.assert_array_equal(noisy.order[0], golden["selected_patches"])
    np.testing.assert_allclose(noisy.z, _nhwc(golden["sample_with_clamp_noise"]),
                               atol=1e-4)
