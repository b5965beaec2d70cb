"""Tests for the IPR variants beyond the paper (sampling.IPRConfig: selection, uncertainty query,
partial re-noising, ratio schedule, returned iterate).

Expected values come from closed forms (the flow's forward process, the Gaussian NLL), from
denoisers whose per-patch uncertainty is fixed by construction, from schedule.max_steps (the
spec's pass counts) and, for the paper's default path, from runs stored by the code before the
variants existed (tests/regression/ipr_default_path.npz, written by tests/ipr_regression.py).
"""

import functools
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ipr_regression
from ipr_jax import sampling
from ipr_jax.models.denoiser import DenoiserOutput
from ipr_jax.noise import schedule

P = 2  # patch size
GRID = (4, 4)  # patch grid of the 8x8 test images
N = 16
SAMPLER = sampling.SamplerConfig(steps_per_patch=3, overlap=0.5, stochasticity=0.5)


def _keys(ids, seed=0):
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.asarray(ids))


def _pixels(patch_values):
  """[B, gh, gw] -> [B, H, W, 1]."""
  return np.repeat(np.repeat(np.asarray(patch_values), P, 1), P, 2)[..., None]


def oracle_denoiser(x, patch_sigma):
  """u = (z - x) / t, so x_hat = z - t u = x exactly for t > 0; sigma fixed per patch.

  x: [B, H, W, d] the image the denoiser believes in; patch_sigma: [B, gh, gw].
  """
  sigma = jnp.asarray(_pixels(patch_sigma), jnp.float32)

  def denoise(z, t):
    reps = z.shape[0] // x.shape[0]  # the uncertainty query stacks G copies of the batch
    target = jnp.tile(x, (reps, 1, 1, 1))
    u = jnp.where(t > 0, (z - target) / jnp.where(t > 0, t, 1.0), 0.0)
    s = jnp.tile(sigma, (reps, 1, 1, 1))
    return DenoiserOutput(u=u, v=jnp.full_like(z, 0.5), logvar=2 * jnp.log(s), sigma=s)

  return denoise


def _inputs(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (batch, 8, 8, 1)).astype(np.float32)
  sigma = rng.uniform(0.2, 3.0, (batch,) + GRID).astype(np.float32)
  noise = rng.standard_normal((batch, 8, 8, 1)).astype(np.float32)
  return x, sigma, noise


# ---------------------------------------------------------------------------
# The paper's default path.


@pytest.mark.parametrize("case", sorted(ipr_regression.CASES))
def test_default_path_matches_the_stored_runs(case):
  stored = np.load(pathlib.Path(__file__).parent / "regression" / "ipr_default_path.npz")
  got = ipr_regression.run(case)
  for name, value in got.items():
    expected = stored[f"{case}/{name}"]
    if np.issubdtype(expected.dtype, np.floating):
      # Written by the same jax on the same kind of CPU: equal bit for bit; a small tolerance
      # only for a CI machine whose jax build differs.
      np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(value, expected, err_msg=name)


# ---------------------------------------------------------------------------
# The uncertainty query.


def test_uncertainty_query_is_the_closed_form_nll_and_log_sigma():
  x, sigma, _ = _inputs()
  wrong = np.zeros((4, N), bool)
  wrong[:, [2, 7]] = True  # the current content of patches 2 and 7 differs from x
  z = np.where(_pixels(wrong.reshape(4, *GRID)), x + 0.7, x).astype(np.float32)
  candidates = np.ones((4, N), bool)
  candidates[:, 0] = False
  denoise = oracle_denoiser(x, sigma)
  query = jax.jit(
      functools.partial(sampling.uncertainty_query, sampling.Denoiser(denoise, P), groups=4),
      static_argnames="score",
  )
  nll = np.asarray(query(z, candidates, _keys(range(4)), score="nll"))
  log_sigma = np.asarray(query(z, candidates, _keys(range(4)), score="sigma"))
  flat_sigma = sigma.reshape(4, N)
  sq_err = ((z - x) ** 2).reshape(4, 4, P, 4, P).mean((2, 4)).reshape(4, N)
  expected_nll = np.log(flat_sigma) + 0.5 * sq_err / flat_sigma**2
  np.testing.assert_allclose(nll[candidates], expected_nll[candidates], rtol=1e-5)
  np.testing.assert_allclose(
      log_sigma[candidates], np.log(flat_sigma)[candidates], rtol=1e-5, atol=1e-6
  )
  assert np.all(nll[:, 0] == 0) and np.all(log_sigma[:, 0] == 0)


def _refine(ipr_config, denoise, z, candidates, noise, keys, cell_verify_fn=None):
  return jax.jit(
      lambda z, candidates, noise, keys: sampling.ipr_refine(
          sampling.Denoiser(denoise, P),
          sampling.Puzzles(keys, noise=noise),
          z,
          SAMPLER,
          ipr_config,
          candidates=candidates,
          cell_verify_fn=cell_verify_fn,
      )
  )(z, candidates, noise, keys)


def test_uncertainty_selection_renoises_the_most_uncertain_patches():
  x, sigma, noise = _inputs(seed=1)
  candidates = np.ones((4, N), bool)
  candidates[:, :3] = False  # 13 candidates: k = max(1, int(13 * 0.25)) = 3
  denoise = oracle_denoiser(x, sigma)
  greedy = sampling.IPRConfig(
      budget=3,
      steps_per_patch=4,
      overlap=0.5,
      selection="uncertainty",
      uncertainty_score="sigma",
      selection_temperature=1e-3,
  )
  result = _refine(greedy, denoise, x, candidates, noise, _keys(range(4)))
  flat = np.where(candidates, sigma.reshape(4, N), -np.inf)
  top3 = np.argsort(-flat, axis=1)[:, :3]
  expected = np.zeros((4, N), bool)
  np.put_along_axis(expected, top3, True, axis=1)
  for it in range(3):  # sigma is fixed: the same three every iteration
    np.testing.assert_array_equal(np.asarray(result.resampled[it]), expected)
  # At a high temperature the draw is nearly uniform: the iterations differ.
  loose = sampling.IPRConfig(
      budget=3,
      steps_per_patch=4,
      overlap=0.5,
      selection="uncertainty",
      uncertainty_score="sigma",
      selection_temperature=1e3,
  )
  result = _refine(loose, denoise, x, candidates, noise, _keys(range(4)))
  resampled = np.asarray(result.resampled)
  assert np.all(resampled.sum(-1) == 3) and not np.any(resampled & ~candidates)
  assert any(not np.array_equal(resampled[0, b], resampled[1, b]) for b in range(4))


def test_nll_selection_finds_the_patches_that_disagree_with_the_model():
  x, _, noise = _inputs(seed=2)
  sigma = np.ones((4,) + GRID, np.float32)  # equal predicted uncertainty everywhere
  wrong = np.zeros((4, N), bool)
  wrong[0, [1, 5, 9]] = True
  wrong[1, [0, 15, 4]] = True
  wrong[2, [3, 6, 12]] = True
  wrong[3, [10, 11, 14]] = True
  z = np.where(_pixels(wrong.reshape(4, *GRID)), -x, x).astype(np.float32)
  config = sampling.IPRConfig(
      budget=1,
      steps_per_patch=4,
      overlap=0.5,
      selection="uncertainty",
      resampling_ratio=0.1875,
      selection_temperature=1e-3,
  )  # k = 3
  result = _refine(
      config, oracle_denoiser(x, sigma), z, np.ones((4, N), bool), noise, _keys(range(4))
  )
  np.testing.assert_array_equal(np.asarray(result.resampled[0]), wrong)
  # The oracle regenerates them: the sample is x again, and its NLL is the minimum.
  np.testing.assert_allclose(np.asarray(result.z), x, atol=1e-5)


def test_verifier_selection_takes_flagged_cells_first():
  x, sigma, noise = _inputs(seed=3)
  flagged = np.zeros((4, N), bool)
  flagged[0, [4]] = True  # fewer than k = 4: all of them, plus 3 others
  flagged[1, [1, 2, 3, 8, 9, 10]] = True  # more than k: 4 of them
  flagged[2, [0, 5, 10, 15]] = True  # exactly k
  cell_verify = lambda z: jnp.asarray(flagged)
  config = sampling.IPRConfig(budget=2, steps_per_patch=4, overlap=0.5, selection="verifier")
  result = _refine(
      config,
      oracle_denoiser(x, sigma),
      x,
      np.ones((4, N), bool),
      noise,
      _keys(range(4)),
      cell_verify_fn=cell_verify,
  )
  for it in range(2):
    chosen = np.asarray(result.resampled[it])
    assert np.all(chosen.sum(-1) == 4)
    assert chosen[0, 4]
    assert not np.any(chosen[1] & ~flagged[1])
    np.testing.assert_array_equal(chosen[2], flagged[2])
  # The verifier costs no denoiser passes: the IPR schedule's alone, k = 4 of 16 per iteration.
  per_iteration = schedule.max_steps(4, 4, 0.5)
  np.testing.assert_array_equal(
      np.asarray(result.nfe_per_budget)[:, 0], [0, per_iteration, 2 * per_iteration]
  )
  with pytest.raises(ValueError, match="cell_verify_fn"):
    _refine(config, oracle_denoiser(x, sigma), x, np.ones((4, N), bool), noise, _keys(range(4)))


# ---------------------------------------------------------------------------
# Partial re-noising.


def test_partial_renoising_is_the_forward_process_on_the_chosen_patches():
  x, sigma, noise = _inputs(seed=4)
  z = (0.5 * x).astype(np.float32)  # the samples being refined
  calls = []

  def record(z_in, t_in):
    calls.append((np.asarray(z_in), np.asarray(t_in)))

  base = oracle_denoiser(x, sigma)

  def denoise(z_in, t_in):
    jax.debug.callback(record, z_in, t_in, ordered=True)
    return base(z_in, t_in)

  t0 = 0.5
  config = sampling.IPRConfig(
      budget=1,
      steps_per_patch=8,
      overlap=0.5,
      renoise_time=t0,
      noise_type="fixed",
      resampling_ratio=0.25,
  )  # k = 4
  result = _refine(config, denoise, z, np.ones((4, N), bool), noise, _keys(range(4)))
  jax.effects_barrier()
  chosen = _pixels(np.asarray(result.resampled[0]).reshape(4, *GRID))
  z_first, t_first = calls[0]
  # z_t0 = (1 - t0) z + t0 eps on the chosen patches (eps = the fixed noise), the rest untouched.
  np.testing.assert_allclose(z_first, np.where(chosen, (1 - t0) * z + t0 * noise, z), atol=1e-6)
  np.testing.assert_array_equal(t_first, np.where(chosen, t0, 0.0))
  # The shortened schedule: round(8 * 0.5) = 4 steps per patch, prototype t0 (L - j) / L.
  steps = schedule.max_steps(4, 4, 0.5)
  assert len(calls) == steps
  np.testing.assert_array_equal(np.asarray(result.nfe), steps)
  proto = schedule.prototype(4, 4, 0.5)
  # The first patch chosen is the earliest in its block: the lowest time among the chosen.
  first = np.array([np.where(chosen[0], t[0], np.inf).min() for _, t in calls])
  np.testing.assert_allclose(first[: len(proto)], t0 * proto, rtol=1e-6)
  assert all(t.max() <= t0 for _, t in calls)
  # Nothing outside the chosen patches ever changes.
  np.testing.assert_array_equal(
      np.where(chosen, 0.0, np.asarray(result.z)), np.where(chosen, 0.0, z)
  )


# ---------------------------------------------------------------------------
# Pass counts of each variant (spec: the greedy loop spends max_steps(k, p, overlap) passes).


def _standard_setup(seed=5):
  x, sigma, noise = _inputs(seed=seed)
  mask = np.ones((4, 8, 8, 1), np.float32)
  given = [[0, 1, 2, 3], [5], [0, 15], []]  # 12, 15, 14 and 16 unknown patches
  for b, patches in enumerate(given):
    for p in patches:
      r, c = divmod(p, 4)
      mask[b, r * P : (r + 1) * P, c * P : (c + 1) * P] = 0.0
  unknown = np.array([N - len(g) for g in given])
  return x, sigma, noise, mask, unknown


def _srm_ipr(ipr_config, x, sigma, noise, mask):
  return jax.jit(
      lambda keys: sampling.srm_ipr(
          sampling.Denoiser(_noisy_oracle(x, sigma), P),
          sampling.Puzzles(keys, image=x, mask=mask, noise=noise),
          SAMPLER,
          ipr_config,
      )
  )(_keys(range(4), seed=9))


def _noisy_oracle(x, sigma):
  """An oracle that is wrong by a state-dependent amount: samples differ from x and vary."""
  base = oracle_denoiser(x, sigma)

  def denoise(z, t):
    out = base(z, t)
    return out.replace(u=out.u + 0.3 * jnp.sin(3.0 * z))

  return denoise


@pytest.mark.parametrize(
    "variant", ["uncertainty_last", "uncertainty_confident", "partial", "linear"]
)
def test_pass_counts_follow_the_schedules(variant):
  x, sigma, noise, mask, unknown = _standard_setup()
  budget, p, overlap, groups = 3, 4, 0.5, 3
  common = dict(budget=budget, steps_per_patch=p, overlap=overlap, uncertainty_groups=groups)
  settings = {
      "uncertainty_last": dict(selection="uncertainty"),
      "uncertainty_confident": dict(selection="uncertainty", return_iterate="confident"),
      "partial": dict(renoise_time=0.5),
      "linear": dict(
          ratio_schedule="linear",
          resampling_ratio=0.5,
          final_resampling_ratio=0.1,
          ratio_decay_iterations=3,
      ),
  }[variant]
  result = _srm_ipr(sampling.IPRConfig(**common, **settings), x, sigma, noise, mask)
  nfe = np.asarray(result.nfe_per_budget)
  for b, n in enumerate(unknown):
    srm = schedule.max_steps(n, 3, 0.5)
    queries = variant.startswith("uncertainty")
    # The query runs after every iteration, except after the last one when nothing ranks it.
    query_after = [groups if queries else 0] * (budget + 1)
    if variant == "uncertainty_last":
      query_after[-1] = 0
    expected = [srm + query_after[0]]
    for i in range(1, budget + 1):
      if variant == "linear":
        ratio = 0.5 + (0.1 - 0.5) * (i - 1) / 2
        k = max(1, int(n * ratio))
        steps = schedule.max_steps(k, p, overlap)
      elif variant == "partial":
        k = max(1, int(n * 0.25))
        steps = schedule.max_steps(k, 2, overlap)  # round(4 * 0.5) = 2 steps per patch
      else:
        k = max(1, int(n * 0.25))
        steps = schedule.max_steps(k, p, overlap)
      assert np.asarray(result.resampled[i - 1, b]).sum() == k
      expected.append(expected[-1] + steps + query_after[i])
    np.testing.assert_array_equal(nfe[:, b], expected, err_msg=f"puzzle {b}")


def test_confident_return_keeps_the_random_trajectory_and_picks_the_lowest_uncertainty():
  x, sigma, noise, mask, _ = _standard_setup(seed=6)
  common = dict(budget=4, steps_per_patch=4, overlap=0.5)
  paper = _srm_ipr(sampling.IPRConfig(**common), x, sigma, noise, mask)
  confident = _srm_ipr(
      sampling.IPRConfig(**common, return_iterate="confident"), x, sigma, noise, mask
  )
  # The query has keys of its own: the re-noised sets and the iterates are the paper's.
  np.testing.assert_array_equal(np.asarray(confident.resampled), np.asarray(paper.resampled))
  np.testing.assert_array_equal(np.asarray(confident.last_iterates), np.asarray(paper.iterates))
  assert paper.last_iterates is None and paper.mean_query_score is None
  uncertainty = np.asarray(confident.mean_query_score)  # [budget + 1, B]
  iterates = np.asarray(paper.iterates)
  for b in range(4):
    for budget in range(5):
      best = int(np.argmin(uncertainty[: budget + 1, b]))
      # The iterate it returns after each budget: the paper's best so far.
      np.testing.assert_array_equal(np.asarray(confident.iterates)[budget, b], iterates[best, b])
    np.testing.assert_array_equal(np.asarray(confident.z[b]), iterates[best, b])
  assert np.any(np.argmin(uncertainty, 0) != 4), "every puzzle returned its last iterate"


def test_variants_batch_and_pmap_like_single_puzzles():
  x, sigma, noise, mask, _ = _standard_setup(seed=7)
  config = sampling.IPRConfig(
      budget=2,
      steps_per_patch=4,
      overlap=0.5,
      selection="uncertainty",
      return_iterate="confident",
      renoise_time=0.5,
      ratio_schedule="linear",
      resampling_ratio=0.5,
      ratio_decay_iterations=2,
  )
  keys = _keys(range(4), seed=9)

  def run(keys, x, noise, mask):
    return sampling.srm_ipr(
        sampling.Denoiser(batchwise_denoiser, P),
        sampling.Puzzles(keys, image=x, mask=mask, noise=noise),
        SAMPLER,
        config,
    )

  together = jax.device_get(jax.jit(run)(keys, x, noise, mask))
  alone = jax.device_get(jax.jit(run)(keys[1:2], x[1:2], noise[1:2], mask[1:2]))
  np.testing.assert_allclose(alone.z[0], together.z[1], atol=1e-6)
  np.testing.assert_array_equal(alone.nfe_per_budget[:, 0], together.nfe_per_budget[:, 1])
  shard = lambda a: a.reshape((2, 2) + a.shape[1:])
  pmapped = jax.device_get(
      jax.pmap(run, devices=jax.local_devices()[:2])(
          shard(keys), shard(x), shard(noise), shard(mask)
      )
  )
  np.testing.assert_allclose(pmapped.z.reshape(together.z.shape), together.z, atol=1e-6)
  np.testing.assert_array_equal(pmapped.nfe.reshape(-1), together.nfe)


def batchwise_denoiser(z, t):
  """A per-example denoiser (no fixed target), so that a puzzle's result cannot depend on its
  batch; its sigma depends on the state."""
  target = jnp.tanh(z + 1.0) * 0.5
  u = jnp.where(t > 0, (z - target) / jnp.where(t > 0, t, 1.0), 0.0) + 0.3 * jnp.sin(3.0 * z)
  pooled = z.mean(-1).reshape(z.shape[0], GRID[0], P, GRID[1], P).mean((2, 4))
  s = jnp.repeat(jnp.repeat(jnp.exp(jnp.cos(2.0 * pooled)), P, 1), P, 2)[..., None]
  return DenoiserOutput(u=u, v=jnp.full_like(z, 0.5), logvar=2 * jnp.log(s), sigma=s)


# ---------------------------------------------------------------------------
# Settings.


@pytest.mark.parametrize(
    "field, value",
    [
        ("selection", "greedy"),
        ("uncertainty_score", "entropy"),
        ("ratio_schedule", "cosine"),
        ("return_iterate", "best"),
        ("renoise_time", 0.0),
        ("renoise_time", 1.5),
        ("final_resampling_ratio", 0.0),
        ("uncertainty_groups", 0),
        ("selection_temperature", 0.0),
        ("ratio_decay_iterations", 0),
    ],
)
def test_bad_variant_settings_raise_naming_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    sampling.IPRConfig(**{field: value})


@pytest.mark.parametrize(
    "decay, expected",
    [
        # D iterations: the first at resampling_ratio, the D-th and later at the final ratio.
        (1, [0.125, 0.125, 0.125, 0.125]),  # reached at iteration 1: never the starting ratio
        (2, [0.5, 0.125, 0.125, 0.125]),
        (3, [0.5, 0.3125, 0.125, 0.125]),  # (0.5 + 0.125) / 2 at the midpoint
    ],
)
def test_linear_ratio_reaches_the_final_ratio_at_iteration_ratio_decay_iterations(decay, expected):
  config = sampling.IPRConfig(
      budget=4,
      ratio_schedule="linear",
      resampling_ratio=0.5,
      final_resampling_ratio=0.125,
      ratio_decay_iterations=decay,
  )
  assert [config.ratio_at(i) for i in (1, 2, 3, 4)] == expected
  # k = max(1, floor(c * ratio)) re-noised cells of c = 16 candidates, per iteration 0..4 (0, the
  # SRM pass, repeats iteration 1): 16 * 0.5 = 8, 16 * 0.3125 = 5, 16 * 0.125 = 2.
  k = {0.5: 8, 0.3125: 5, 0.125: 2}
  counts = sampling.resample_counts(config, 16)[:, 16]
  assert list(counts) == [k[expected[0]]] + [k[r] for r in expected]


def test_ratio_schedule_and_shortened_schedule_check():
  config = sampling.IPRConfig(
      budget=12,
      ratio_schedule="linear",
      resampling_ratio=0.5,
      final_resampling_ratio=0.1,
      ratio_decay_iterations=5,
  )
  assert [round(config.ratio_at(i), 6) for i in (1, 2, 3, 5, 6, 12)] == [
      0.5,
      0.4,
      0.3,
      0.1,
      0.1,
      0.1,
  ]
  table = sampling.resample_counts(config, 16)
  assert table.shape == (13, 17)
  assert table[1, 12] == 6 and table[5, 12] == 1 and table[12, 16] == 1
  # p = 10, overlap 0.9 regenerates fine (10 * 0.1 = 1 step apart), but t0 = 0.5 leaves 5 steps
  # per patch: 0.5 step apart, repeated block starts.
  sampling.check_schedules(SAMPLER, sampling.IPRConfig(steps_per_patch=10, overlap=0.9), 16, [12])
  with pytest.raises(ValueError, match=r"renoise_time=0.5 leaves 5 of steps_per_patch=10"):
    sampling.check_schedules(
        SAMPLER, sampling.IPRConfig(steps_per_patch=10, overlap=0.9, renoise_time=0.5), 16, [12]
    )


def test_selection_strategies_share_one_signature_and_draw_k_candidates():
  assert tuple(sampling.SELECTORS) == sampling.SELECTIONS
  assert len({str(inspect.signature(f)) for f in sampling.SELECTORS.values()}) == 1
  rng = np.random.default_rng(3)
  candidates = jnp.asarray(rng.uniform(size=(3, N)) < 0.6)
  z = jnp.asarray(rng.standard_normal((3, 8, 8, 1)), jnp.float32)
  cells = jnp.asarray(rng.standard_normal((3, N)), jnp.float32)
  k = jnp.array([2, 5, 40], jnp.int32)
  for name, select in sampling.SELECTORS.items():
    chosen = np.asarray(
        select(
            _keys(range(3)),
            candidates,
            k,
            z=z,
            cells=cells,
            ipr_config=sampling.IPRConfig(),
            cell_verify_fn=lambda z: sampling.patch_mean(z, P) > 0.0,
        )
    )
    assert not (chosen & ~np.asarray(candidates)).any(), name
    np.testing.assert_array_equal(
        chosen.sum(1), np.minimum(k, np.asarray(candidates).sum(1)), err_msg=name
    )
