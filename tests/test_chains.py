"""Tests for several chains per puzzle (`IPRConfig.chains`), their choice after the final budget
only (`IPRConfig.choose_at='final_budget'`) and the query of the given cells
(`IPRConfig.query_cells='all'`).

Expected values come from single-chain runs of the public `srm_ipr` on the keys and noise the
documentation gives each chain, composed by hand (the chain with the lowest score, passes
summed), from the schedules' pass counts (`schedule.max_steps`) and, through the evaluation
binary, from the formulas SRM 3n and IPR 2k + 8 of the shipped model's settings.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax import sampling
from ipr_jax.noise import schedule
from test_ipr_variants import P, SAMPLER, _keys, _standard_setup, batchwise_denoiser

CHAIN_STREAM, NOISE_STREAM = 5, 3  # as documented in ipr_jax/sampling/chains.py and inputs.py


def _run(ipr_config, keys, x, noise, mask, denoise=None, **kwargs):
  fn = lambda keys, x, noise: sampling.srm_ipr(
      sampling.Denoiser(denoise or batchwise_denoiser, P),
      sampling.Puzzles(keys, image=x, mask=mask, noise=noise),
      SAMPLER,
      ipr_config,
      **kwargs,
  )
  return jax.device_get(jax.jit(fn)(keys, x, noise))


def _chain_inputs(keys, noise, c):
  """Chain c's keys and noise by the documented rule (chain 0: the puzzle's own)."""
  if c == 0:
    return keys, noise
  fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
  chain = fold(fold(keys, CHAIN_STREAM), c)
  fresh = jax.vmap(lambda k: jax.random.normal(k, noise.shape[1:], jnp.float32))(
      fold(chain, NOISE_STREAM)
  )
  return chain, fresh


@pytest.mark.parametrize("returned", ["last", "confident"])
def test_chains_are_single_chain_runs_and_the_lowest_score_wins(returned):
  x, _, noise, mask, _ = _standard_setup(seed=11)
  keys = _keys(range(4), seed=3)
  k, budget = 3, 3
  common = dict(budget=budget, steps_per_patch=4, overlap=0.5, query_cells="all")
  chained = _run(
      sampling.IPRConfig(**common, chains=k, return_iterate=returned),
      keys,
      x,
      noise,
      mask,
  )
  # Each chain alone, queried after every iterate (return_iterate='confident' queries them all;
  # its last_iterates are the last iterates).
  single, plain = [], []
  for c in range(k):
    chain_keys, chain_noise = _chain_inputs(keys, noise, c)
    for runs, settings in ((single, dict(return_iterate="confident")), (plain, {})):
      # plain: the paper's IPR, no query, the last iterate.
      config = sampling.IPRConfig(**common, **settings)
      runs.append(_run(config, chain_keys, x, chain_noise, mask))
  last = np.stack([np.asarray(s.mean_query_score) for s in single])  # [K, T, B]
  score = np.minimum.accumulate(last, axis=1) if returned == "confident" else last
  choice = np.argmin(score, axis=0)  # [T, B]
  assert len(np.unique(choice)) > 1, "one chain won everywhere: the test shows nothing"
  np.testing.assert_array_equal(chained.chosen_chain, choice)
  for t in range(budget + 1):
    for b in range(4):
      c = choice[t, b]
      own = single[c].iterates if returned == "confident" else single[c].last_iterates
      np.testing.assert_allclose(chained.iterates[t, b], own[t, b], atol=1e-5)
      np.testing.assert_allclose(chained.mean_query_score[t, b], last[c, t, b], atol=1e-5)
  np.testing.assert_array_equal(
      chained.nfe_per_budget, sum(np.asarray(s.nfe_per_budget) for s in single)
  )
  final = [single[choice[-1, b]] for b in range(4)]
  for b in range(4):
    z_single = final[b].z[b] if returned == "confident" else plain[choice[-1, b]].z[b]
    np.testing.assert_allclose(chained.z[b], z_single, atol=1e-5)
    np.testing.assert_array_equal(chained.resampled[:, b], final[b].resampled[:, b])
    np.testing.assert_array_equal(chained.initial_order[b], final[b].initial_order[b])
  assert chained.iterates.shape == (budget + 1,) + x.shape
  np.testing.assert_array_equal(chained.iterates[-1], chained.z)


def test_chain_passes_follow_the_schedules():
  """K (SRM + G + sum over iterations of (regeneration + G)) per puzzle, from max_steps."""
  x, _, noise, mask, unknown = _standard_setup(seed=12)
  k, budget, groups, p, overlap = 3, 2, 2, 4, 0.5
  result = _run(
      sampling.IPRConfig(
          budget=budget,
          steps_per_patch=p,
          overlap=overlap,
          uncertainty_groups=groups,
          chains=k,
          query_cells="all",
      ),
      _keys(range(4), seed=4),
      x,
      noise,
      mask,
  )
  for b, n in enumerate(unknown):
    per_chain = [schedule.max_steps(n, 3, 0.5) + groups]
    for _ in range(budget):
      per_chain.append(per_chain[-1] + schedule.max_steps(max(1, int(n * 0.25)), p, overlap))
      per_chain[-1] += groups
    np.testing.assert_array_equal(result.nfe_per_budget[:, b], k * np.array(per_chain))
    assert result.nfe[b] == k * per_chain[-1]


def test_chains_chosen_at_the_final_budget_query_only_the_last_iterates():
  """choose_at='final_budget': after the final budget the chain of lowest score among the chains'
  last iterates (each chain's single-chain run, queried with the query of that budget), before
  it chain 0, the single-chain run; the passes K (SRM + iterations) and G per chain once, at the
  final budget (from max_steps)."""
  x, _, noise, mask, unknown = _standard_setup(seed=11)
  keys = _keys(range(4), seed=3)
  k, budget, groups, p, overlap = 3, 3, 2, 4, 0.5
  common = dict(
      budget=budget,
      steps_per_patch=p,
      overlap=overlap,
      query_cells="all",
      uncertainty_groups=groups,
  )
  config = sampling.IPRConfig(**common, chains=k, choose_at="final_budget")
  chosen = _run(config, keys, x, noise, mask)
  # return_iterate='confident' queries every iterate of a chain; its last_iterates are the last.
  single = []
  for c in range(k):
    chain_keys, chain_noise = _chain_inputs(keys, noise, c)
    config = sampling.IPRConfig(**common, return_iterate="confident")
    single.append(_run(config, chain_keys, x, chain_noise, mask))
  last_score = np.stack([np.asarray(s.mean_query_score[-1]) for s in single])  # [K, B]
  choice = np.argmin(last_score, axis=0)
  assert len(np.unique(choice)) > 1, "one chain won everywhere: the test shows nothing"
  np.testing.assert_array_equal(chosen.chosen_chain[-1], choice)
  np.testing.assert_array_equal(chosen.chosen_chain[:-1], 0)
  for b in range(4):
    np.testing.assert_allclose(chosen.z[b], single[choice[b]].last_iterates[-1, b], atol=1e-5)
    np.testing.assert_allclose(chosen.mean_query_score[-1, b], last_score[choice[b], b], atol=1e-5)
    np.testing.assert_allclose(chosen.iterates[:-1, b], single[0].last_iterates[:-1, b], atol=1e-5)
  assert np.isnan(chosen.mean_query_score[:-1]).all()
  for b, n in enumerate(unknown):
    per_chain = [schedule.max_steps(n, 3, 0.5)]
    for _ in range(budget):
      per_chain.append(per_chain[-1] + schedule.max_steps(max(1, int(n * 0.25)), p, overlap))
    per_chain[-1] += groups
    np.testing.assert_array_equal(chosen.nfe_per_budget[:, b], k * np.array(per_chain))
    assert chosen.nfe[b] == k * per_chain[-1]


def test_chains_read_neither_the_solution_nor_a_verifier():
  """The chosen samples do not change when the content under the mask (the solution the
  generated cells hide) changes; a verifier handed to the chains is refused."""
  x, _, noise, mask, _ = _standard_setup(seed=13)
  keys = _keys(range(4), seed=5)
  config = sampling.IPRConfig(budget=2, steps_per_patch=4, overlap=0.5, chains=2, query_cells="all")

  def refuse(z):
    raise AssertionError("a verifier was called")

  for handed in ("verify_fn", "cell_verify_fn"):
    with pytest.raises(ValueError, match=f"{handed} is read only by"):
      _run(config, keys, x, noise, mask, **{handed: refuse})
  base = _run(config, keys, x, noise, mask)
  other_solution = np.where(mask > 0, -x[::-1], x)
  other = _run(config, keys, other_solution, noise, mask)
  np.testing.assert_array_equal(base.z, other.z)
  np.testing.assert_array_equal(base.nfe_per_budget, other.nfe_per_budget)
  np.testing.assert_array_equal(base.mean_query_score, other.mean_query_score)
  # ... while the given cells do matter (the test can fail).
  other_given = np.where(mask > 0, x, -x)
  assert not np.allclose(_run(config, keys, other_given, noise, mask).z, base.z)


def test_query_cells_all_scores_the_given_cells():
  """With query_cells='all' a given cell's score enters the iterate's mean; with 'candidates'
  the mean is over the generated cells only; 'balanced' averages the two means (the generated
  cells' alone where nothing is given). The denoiser's sigma here is fixed per patch, so
  the 'sigma' score of each patch is log sigma exactly (independent of the query groups)."""
  x, _, noise, mask, _ = _standard_setup(seed=14)
  sigma = np.exp(np.linspace(-1.0, 1.0, 16)).reshape(4, 4).astype(np.float32)

  def denoise(z, t):
    out = batchwise_denoiser(z, t)
    s = jnp.broadcast_to(
        jnp.repeat(jnp.repeat(jnp.asarray(sigma), P, 0), P, 1)[None, ..., None], out.sigma.shape
    )
    return out.replace(sigma=s, logvar=2 * jnp.log(s))

  given = np.asarray(sampling.patches.unknown_patches(jnp.asarray(mask), P)) == 0  # [B, N]
  means = {}
  for cells in ("candidates", "all", "balanced"):
    config = sampling.IPRConfig(
        budget=1,
        steps_per_patch=4,
        overlap=0.5,
        return_iterate="confident",
        uncertainty_score="sigma",
        query_cells=cells,
    )
    result = _run(config, _keys(range(4), seed=6), x, noise, mask, denoise=denoise)
    means[cells] = result.mean_query_score
  log_sigma = np.log(sigma).reshape(-1)
  for b in range(4):
    generated = log_sigma[~given[b]].mean()
    np.testing.assert_allclose(means["all"][:, b], log_sigma.mean(), atol=1e-5)
    np.testing.assert_allclose(means["candidates"][:, b], generated, atol=1e-5)
    balanced = 0.5 * (log_sigma[given[b]].mean() + generated) if given[b].any() else generated
    np.testing.assert_allclose(means["balanced"][:, b], balanced, atol=1e-5)
  assert given[:3].any(axis=1).all() and not given[3].any()


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(chains=0), "chains"),
        (dict(chains=2, mode="correction"), "mode"),
        (dict(chains=2, immediate_stop=True), "immediate_stop"),
        (dict(query_cells="given"), "query_cells"),
        (dict(chains=2, choose_at="first_budget"), "choose_at"),
        (dict(choose_at="final_budget"), "choose_at='final_budget' needs chains > 1"),
        (dict(chains=2, choose_at="final_budget", selection="uncertainty"), "selection='uncert"),
        (dict(chains=2, choose_at="final_budget", return_iterate="confident"), "return_iterate"),
    ],
)
def test_bad_chain_settings_raise_naming_the_field(settings, named):
  with pytest.raises(ValueError, match=named):
    sampling.IPRConfig(**settings)


@pytest.mark.parametrize("choose_at", ["every_budget", "final_budget"])
def test_the_evaluation_binary_runs_chains(tmp_path, choose_at):
  """`--config.ipr.chains=2 --config.ipr.query_cells=all` on the shipped model through the
  binary: each puzzle's passes from the formulas, 2 (3n + G + b (2k + 8 + G)), with
  choose_at=final_budget 2 (3n + b (2k + 8)) and 2G more at the final budget; the setting in
  results.json."""
  done = subprocess.run(
      [
          sys.executable,
          "-m",
          "ipr_jax.evaluate",
          "--config=mnist_sudoku:demo",
          "--config.eval.num_puzzles=6",
          "--config.eval.batch_size=6",
          "--config.ipr.budget=1",
          "--config.ipr.chains=2",
          "--config.ipr.query_cells=all",
          f"--config.ipr.choose_at={choose_at}",
          f"--workdir={tmp_path}",
      ],
      capture_output=True,
      text=True,
      cwd=pathlib.Path(__file__).resolve().parents[1],
      timeout=600,
      check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  run = tmp_path / "eval" / "ms_hard_test"
  with np.load(run / "puzzles.npz") as f:
    unknown, nfe, valid = f["unknown_patches"], f["nfe"], f["valid"]
  k, groups = np.maximum(1, unknown // 4), 4
  if choose_at == "every_budget":
    expected = np.stack(
        [2 * (3 * unknown + groups + b * (2 * k + 8 + groups)) for b in range(2)], 1
    )
  else:
    expected = np.stack([2 * (3 * unknown), 2 * (3 * unknown + 2 * k + 8 + groups)], 1)
  np.testing.assert_array_equal(nfe, expected)
  assert valid.dtype == bool and valid.shape == (6, 2)
  metadata = json.loads((run / "results.json").read_text())["metadata"]
  assert (metadata["ipr"]["chains"], metadata["ipr"]["query_cells"]) == (2, "all")
  assert metadata["ipr"]["choose_at"] == choose_at
