"""The evaluation binary and its report, on models whose samples differ from their noise.

The Sudoku tests evaluate the shipped demo model (`ipr_jax.build.pretrained`) on the regression set
recorded when it was shipped; the Even Pixels tests use a tiny U-Net with random (non-zero)
weights in every layer, so that its samples differ from the initial noise too (a freshly
initialised SRM outputs exactly zero).
"""

import ast
import csv
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from ipr_jax import build
from ipr_jax import sampling
from ipr_jax import tasks
from ipr_jax.build import pretrained
from ipr_jax.evaluation import report as eval_report
from ipr_jax.evaluation import runner
from ipr_jax.evaluation import settings as eval_settings
from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.evaluation import store as store_lib
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import environment as environment_lib
from ipr_jax.sampling import refinement as sampling_refinement
from ipr_jax.tasks import mnist_sudoku as mnist_sudoku_task
import multiprocess

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

# How many puzzles of the regression set may differ from the shipped record (a classified digit, a
# cell's mean pixel value beyond the record's tolerance, a valid flag or a duplicate count at any
# budget): floating-point details (XLA version, CPU kind) can flip a digit whose classification is
# borderline, or an SRM choice between near-equal uncertainties, and IPR carries the change on.
MAX_DIFFERING_PUZZLES = 2


def _random_weights_checkpoint(config, workdir):
  """A checkpoint whose every parameter is random, so that the model's output is not zero."""
  model = build.make_model(config)
  params = build.init_params(config, model, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
      treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  checkpoint.save_params_checkpoint(workdir, params, config, build.make_optimizer(config))


# ------------------------------------------------------------------------------------------------
# The shipped demo model.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
  return pretrained.load("mnist_sudoku_demo")


def _regression_config(shipped, **overrides):
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  record = shipped.metadata["regression"]
  config = load_task_config("mnist_sudoku", "demo")
  config.eval.num_puzzles = record["num_puzzles"]
  config.eval.batch_size = record["batch_size"]
  config.ipr.budget = record["budget"]
  config.eval.name = "regression"
  assert tuple(config.eval.given_range) == tuple(record["given_range"])
  assert config.eval.seed == record["seed"]
  for name, value in overrides.items():
    section, field = name.split("__")
    config[section][field] = value
  return config


@pytest.fixture(scope="module")
def demo_run(shipped, tmp_path_factory):
  config = _regression_config(shipped)
  workdir = tmp_path_factory.mktemp("demo_run")
  rows = runner.evaluate(config, str(workdir))  # no checkpoint: the shipped model
  return config, workdir, rows


def test_writes_results_with_documented_columns(demo_run):
  config, workdir, rows = demo_run
  out = workdir / "eval" / "regression"
  for name in ("results.json", "results.csv", "valid_rate_vs_budget.png", "ipr_process.png"):
    assert (out / name).is_file(), name
  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [int(r["budget"]) for r in table] == list(range(config.ipr.budget + 1))
  for column in (
      "valid_rate",
      "valid_ci_low",
      "valid_ci_high",
      "mean_duplicate_count",
      "mean_nfe",
      "num_puzzles",
  ):
    assert column in table[0], column
  saved = json.loads((out / "results.json").read_text())
  assert saved["metadata"]["task"] == "mnist_sudoku"
  assert "mnist_sudoku_demo" in saved["metadata"]["checkpoint"]
  # The last budget's valid rate is the share of final digit grids that obey the Sudoku rules
  # (checked here without ipr_jax.metrics), with its Wilson interval.
  grids = _load_puzzles(workdir)["digit_grid"]
  valid = sum(map(_obeys_sudoku_rules, grids))
  last = saved["budgets"][-1]
  assert last["valid_rate"] == pytest.approx(valid / len(grids))
  n, p, z = len(grids), valid / len(grids), 1.959963984540054
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  assert (last["valid_ci_low"], last["valid_ci_high"]) == pytest.approx(
      (centre - half, centre + half)
  )
  # The environment that computed it: this process's libraries and devices.
  environment = saved["metadata"]["environment"]
  assert environment["packages"]["jax"] == jax.__version__
  assert environment["packages"]["numpy"] == np.__version__
  assert environment["device_count"] == jax.device_count() == 2
  assert environment["backend"] == "cpu"
  assert environment["variables"]["XLA_FLAGS"] == os.environ["XLA_FLAGS"]
  assert list(saved["metadata"]["shard_environments"].values()) == [2]  # 2 batches, 1 environment


def test_nfe_is_the_spec_count_of_each_puzzle(demo_run):
  """SRM: 3 passes per unknown cell (overlap 0); IPR: 2k + 8 per iteration (p = 10, overlap
  0.8, spec §4.3) with k = max(1, floor(unknown / 4)) re-noised cells."""
  config, _, rows = demo_run
  task = tasks.get(config.task).make_data(config)
  batch = task.test_batch(
      config.eval.seed, np.arange(config.eval.num_puzzles), tuple(config.eval.given_range)
  )
  unknown = 16 - np.asarray(batch["num_given"])
  k = np.maximum(1, unknown // 4)
  for budget, row in enumerate(rows):
    assert row["mean_nfe"] == pytest.approx(np.mean(3 * unknown + budget * (2 * k + 8)))


def differing_puzzles(record, facts, valid=None, duplicate_count=None):
  """Indices of the puzzles whose classified digits or cell means (`facts`:
  `pretrained.regression_facts`, [P, budget + 1, ...] each), valid flag or duplicate count
  ([P, budget + 1] each, if given) differ from the regression record's at any budget (cell means
  by more than the record's `cell_mean_atol`)."""
  want_grid, want_mean = np.asarray(record["digit_grid"]), np.asarray(record["cell_mean"])
  assert facts["digit_grid"].shape == want_grid.shape
  assert facts["cell_mean"].shape == want_mean.shape
  differs = (facts["digit_grid"] != want_grid).any(axis=(1, 2, 3))
  differs |= (np.abs(facts["cell_mean"] - want_mean) > record["cell_mean_atol"]).any(axis=(1, 2, 3))
  if valid is not None:
    differs |= (np.asarray(valid, bool) != np.asarray(record["valid"], bool)).any(axis=1)
  if duplicate_count is not None:
    differs |= (np.asarray(duplicate_count) != np.asarray(record["duplicate_count"])).any(axis=1)
  return np.flatnonzero(differs)


def _regression_facts(config, params, record):
  """The regression set's facts as experiments/demo/ship_demo_model.py records them."""
  return pretrained.regression_facts(
      runner.Evaluator(config, params), record["num_puzzles"], record["batch_size"]
  )


def test_shipped_model_matches_its_record(shipped, demo_run):
  """A regression check of the model and the sampler together, puzzle by puzzle and digit by
  digit."""
  config, workdir, rows = demo_run
  record = shipped.metadata["regression"]
  shape = (record["num_puzzles"], record["budget"] + 1)
  assert np.shape(record["valid"]) == np.shape(record["duplicate_count"]) == shape
  assert np.shape(record["digit_grid"]) == np.shape(record["cell_mean"]) == (*shape, 4, 4)
  assert record["cell_mean_atol"] <= 1e-3
  assert record["max_differing_puzzles"] == MAX_DIFFERING_PUZZLES
  # The record itself shows a working model and a working IPR: some grid valid at some budget,
  # IPR lowering the duplicate count, and its flags those of its digits by the Sudoku rules.
  assert np.any(record["valid"])
  assert np.mean(record["duplicate_count"], 0)[-1] < np.mean(record["duplicate_count"], 0)[0]
  np.testing.assert_array_equal(
      np.asarray(record["valid"], bool),
      [[_obeys_sudoku_rules(grid) for grid in puzzle] for puzzle in record["digit_grid"]],
  )
  puzzles = _load_puzzles(workdir)
  np.testing.assert_array_equal(puzzles["index"], np.arange(shape[0]))
  facts = _regression_facts(config, shipped.params, record)
  differing = differing_puzzles(record, facts, puzzles["valid"], puzzles["duplicate_count"])
  assert len(differing) <= MAX_DIFFERING_PUZZLES, (
      f"puzzles {differing.tolist()} differ from the shipped record (valid now "
      f"{puzzles['valid'][differing].astype(int).tolist()}, recorded "
      f"{np.asarray(record['valid'])[differing].tolist()}; digits now "
      f"{facts['digit_grid'][differing].reshape(len(differing), -1).tolist()}, recorded "
      f"{np.asarray(record['digit_grid'])[differing].reshape(len(differing), -1).tolist()}; "
      "largest cell mean change "
      f"{np.abs(facts['cell_mean'] - np.asarray(record['cell_mean'])).max():.2e}); if the code "
      "changed what the sampler draws on purpose, re-record: python "
      "experiments/demo/ship_demo_model.py --record_only"
  )
  assert [r["mean_nfe"] for r in rows] == pytest.approx(record["mean_nfe"])


def _obeys_sudoku_rules(grid):
  """Whether a square digit grid holds 1..n once in every row, column and box (independent of
  ipr_jax.metrics)."""
  grid = np.asarray(grid)
  n = len(grid)
  box = int(round(np.sqrt(n)))
  groups = (
      [grid[i] for i in range(n)]
      + [grid[:, j] for j in range(n)]
      + [
          grid[r : r + box, c : c + box].reshape(-1)
          for r in range(0, n, box)
          for c in range(0, n, box)
      ]
  )
  return all(sorted(g.tolist()) == list(range(1, n + 1)) for g in groups)


def _given_cells_as_candidates(refine):
  """A sampler bug: IPR re-noises among every cell, the given ones included (they are pasted
  back, so only the number and choice of the regenerated cells change)."""

  def buggy(denoiser, inputs, *args, **kwargs):
    every_cell = inputs.replace(candidates=jax.numpy.ones_like(inputs.candidates))
    return refine(denoiser, every_cell, *args, **kwargs)

  return buggy


@pytest.mark.parametrize(
    "change", ["weights_5pct_noise", "given_cells_as_candidates", "renoise_to_t08"]
)
def test_the_record_check_fails_for_a_changed_model_or_sampler(
    shipped, demo_run, change, monkeypatch
):
  """The comparison above bites: weights with Gaussian noise of 5% of each tensor's RMS, and two
  sampler bugs that barely move the valid rate or a digit (counting the given cells as IPR
  candidates; re-noising to t = 0.8 instead of pure noise) each change the cells of more than
  twice the puzzles the tolerance allows (measured when written, of 32: 22 and 32; with digits
  alone only 3 and 2, within reach of the tolerance)."""
  config, _, _ = demo_run
  record = shipped.metadata["regression"]
  params = shipped.params
  if change == "weights_5pct_noise":
    leaves, treedef = jax.tree.flatten(shipped.params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(
        treedef,
        [
            x + 0.05 * np.sqrt(np.mean(np.square(x))) * rng.standard_normal(x.shape).astype(x.dtype)
            for x in leaves
        ],
    )
  elif change == "given_cells_as_candidates":
    buggy = _given_cells_as_candidates(sampling_refinement.refine)
    monkeypatch.setattr(sampling_refinement, "refine", buggy)
  else:
    config = _regression_config(shipped, ipr__renoise_time=0.8)
  differing = differing_puzzles(record, _regression_facts(config, params, record))
  assert len(differing) > 2 * MAX_DIFFERING_PUZZLES, differing


def test_budget_zero_is_the_plain_srm_run_at_any_batch_size(shipped, demo_run, tmp_path):
  _, _, rows = demo_run
  config = _regression_config(shipped, ipr__budget=0, eval__batch_size=32)
  srm_rows = runner.evaluate(config, str(tmp_path))
  assert len(srm_rows) == 1
  for key in ("valid_rate", "mean_duplicate_count", "mean_nfe"):
    assert srm_rows[0][key] == rows[0][key], key


def _load_puzzles(workdir, name="regression"):
  with np.load(workdir / "eval" / name / "puzzles.npz") as data:
    return {k: data[k] for k in data.files}


def _sigterm_after(batch_to_stop):
  def hook(batch):
    if batch == batch_to_stop:
      signal.raise_signal(signal.SIGTERM)

  return hook


def test_interrupted_run_at_another_batch_size_resumes_to_the_same_results(
    shipped, demo_run, tmp_path
):
  """SIGTERM after a batch keeps the shards written so far; the rerun computes only the rest
  and its files equal an uninterrupted run's, here one with another batch size (so other
  batches and paddings): a puzzle's result depends only on (seed, index)."""
  _, demo_workdir, rows = demo_run
  config = _regression_config(shipped, eval__batch_size=6)  # 6 batches, the last one padded
  with pytest.raises(runner.EvaluationStopped, match="after 3 of 6 batches"):
    runner.evaluate(config, str(tmp_path), after_batch=_sigterm_after(2))
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  shard_dir = tmp_path / "eval" / "regression" / "shards"
  assert eval_shards.done_batches(shard_dir) == {0, 1, 2}
  assert not (tmp_path / "eval" / "regression" / "results.csv").exists()

  computed = []
  resumed = runner.evaluate(config, str(tmp_path), after_batch=computed.append)
  assert computed == [3, 4, 5]
  mine, theirs = _load_puzzles(tmp_path), _load_puzzles(demo_workdir)
  assert mine.keys() == theirs.keys()
  for key in mine:
    np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)
  # Samples must differ from the noise for this to mean anything: the model fixes rules.
  assert mine["duplicate_count"][:, -1].mean() < mine["duplicate_count"][:, 0].mean()
  for a, b in zip(resumed, rows):
    for key in ("valid_rate", "mean_duplicate_count", "mean_nfe"):
      assert a[key] == b[key], (a["budget"], key)
  throughput = json.loads((tmp_path / "eval" / "regression" / "results.json").read_text())[
      "metadata"
  ]["throughput"]
  assert throughput["batches_reused"] == 3 and throughput["puzzles"] == 32 - 18
  assert throughput["puzzles_per_sec"] > 0 and throughput["device_count"] == 2


def test_shards_of_other_settings_are_refused(shipped, demo_run):
  _, workdir, _ = demo_run
  config = _regression_config(shipped, ipr__budget=3)
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"ipr.budget: 4 -> 3"):
    runner.evaluate(config, str(workdir))
  config = _regression_config(shipped, eval__seed=36)
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"eval.seed: 35 -> 36"):
    runner.evaluate(config, str(workdir))


def test_per_puzzle_file_agrees_with_the_table(demo_run):
  config, workdir, rows = demo_run
  puzzles = _load_puzzles(workdir)
  budgets = config.ipr.budget + 1
  assert list(puzzles["index"]) == list(range(config.eval.num_puzzles))
  assert puzzles["valid"].shape == puzzles["nfe"].shape == (config.eval.num_puzzles, budgets)
  for b, row in enumerate(rows):
    assert puzzles["valid"][:, b].mean() == pytest.approx(row["valid_rate"], abs=1e-12)
    assert puzzles["duplicate_count"][:, b].mean() == pytest.approx(row["mean_duplicate_count"])
    assert puzzles["nfe"][:, b].mean() == pytest.approx(row["mean_nfe"])
  assert np.all(puzzles["num_given"] + puzzles["unknown_patches"] == 16)
  data = tasks.get(config.task).make_data(config)
  batch = data.test_batch(config.eval.seed, puzzles["index"], tuple(config.eval.given_range))
  np.testing.assert_array_equal(puzzles["num_given"], batch["num_given"])
  # The final digit grids obey the rules exactly where the last budget is valid.
  broken = mnist_sudoku_task.invalid_cells(puzzles["digit_grid"]).any(axis=(-2, -1))
  np.testing.assert_array_equal(~broken, puzzles["valid"][:, -1])
  # The CSV holds the same records.
  with open(workdir / "eval" / "regression" / "puzzles.csv") as f:
    table = list(csv.DictReader(f))
  assert [int(r["index"]) for r in table] == list(puzzles["index"])
  for b in range(budgets):
    assert [int(r[f"valid_b{b}"]) for r in table] == list(puzzles["valid"][:, b].astype(int))
    assert [int(r[f"nfe_b{b}"]) for r in table] == list(puzzles["nfe"][:, b])
  assert table[0]["digit_grid"] == "".join(map(str, puzzles["digit_grid"][0].reshape(-1)))


def test_two_processes_split_the_batches_and_match_one_process(demo_run, tmp_path):
  """The binary as 2 JAX processes of 1 device each, with unequal shares (3 batches: process 0
  computes batches 0 and 2, process 1 only batch 1 and waits for it in the last round): the same
  per-puzzle results as the single-process run on 2 devices, written once by process 0."""
  _, demo_workdir, _ = demo_run
  outputs = multiprocess.run_processes(
      "ipr_jax.evaluate",
      [
          f"--config={CONFIG_DIR / 'mnist_sudoku.py'}:demo",
          f"--workdir={tmp_path}",
          "--config.eval.num_puzzles=32",
          "--config.eval.batch_size=12",
          "--config.ipr.budget=4",
          "--config.eval.name=regression",
      ],
  )
  assert "[process 0] [20/20]" in outputs[0] and "[process 1] [12/12]" in outputs[1]
  assert "wrote" in outputs[0] and "wrote" not in outputs[1]
  shard_dir = tmp_path / "eval" / "regression" / "shards"
  processes = [int(np.load(eval_shards.shard_path(shard_dir, b))["process"]) for b in (0, 1, 2)]
  assert processes == [0, 1, 0]
  mine, theirs = _load_puzzles(tmp_path), _load_puzzles(demo_workdir)
  for key in theirs:
    np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)
  throughput = json.loads((tmp_path / "eval" / "regression" / "results.json").read_text())[
      "metadata"
  ]["throughput"]
  assert throughput["process_count"] == 2 and throughput["device_count"] == 2


def test_key_streams_never_share_a_key(shipped, demo_run):
  """Puzzle content (`test_batch`: fold_in(key(seed), i)), initial noise and sampling keys of
  the first 1000 puzzles, and the streams' own keys, are all distinct."""
  config, _, _ = demo_run
  evaluator = runner.Evaluator(config, shipped.params)
  indices = jax.numpy.arange(1000)
  root = jax.random.key(config.eval.seed)
  noise_root = jax.random.fold_in(root, eval_settings.NOISE_STREAM)
  sampling_key = evaluator._sampling_key  # pylint: disable=protected-access
  keys = [
      sampling.puzzle_keys(root, indices),
      sampling.puzzle_keys(noise_root, indices),
      sampling.puzzle_keys(sampling_key, indices),
      jax.numpy.stack([noise_root, sampling_key]),
  ]
  data = np.concatenate([np.asarray(jax.random.key_data(k)) for k in keys])
  assert len({tuple(row) for row in data}) == len(data) == 3002
  # The evaluator's initial noise of puzzle 5 is the noise stream's draw, not the content's.
  noise = evaluator._initial_noise(jax.numpy.array([5]))  # pylint: disable=protected-access
  expected = jax.random.normal(jax.random.fold_in(noise_root, 5), noise.shape[1:])
  np.testing.assert_array_equal(noise[0], expected)


def test_evaluator_per_puzzle_results_do_not_depend_on_the_batch(shipped, demo_run):
  """The library entry point behind the binary (and the notebook): per-puzzle scores, passes
  and samples of a puzzle are the same in any batch, and aggregate to the binary's table."""
  config, _, rows = demo_run
  evaluator = runner.Evaluator(config, shipped.params)
  budgets = config.ipr.budget + 1
  # The binary's batches of the regression run (16 puzzles = 2 devices x 8).
  full = evaluator(np.arange(16), samples_per_device=4)
  assert full.scores["valid"].shape == full.nfe.shape == (budgets, 16)
  assert list(full.sample_indices) == [0, 1, 2, 3, 8, 9, 10, 11]
  assert full.samples.shape == (8, budgets, 28, 28, 1)
  rest = evaluator(np.arange(16, config.eval.num_puzzles), samples_per_device=4)
  table = eval_report.budget_table(
      {k: np.concatenate([full.scores[k], rest.scores[k]], axis=1) for k in full.scores},
      np.concatenate([full.nfe, rest.nfe], axis=1),
  )
  for mine, theirs in zip(table, rows):
    for key in ("valid_rate", "mean_duplicate_count", "mean_nfe"):
      assert mine[key] == pytest.approx(theirs[key], abs=1e-9), key

  picked = np.array([13, 2, 9, 5, 0, 11])
  part = evaluator(picked, samples_per_device=None)  # every sample kept
  assert list(part.sample_indices) == list(picked)
  for name in ("valid", "duplicate_count"):
    np.testing.assert_array_equal(part.scores[name], full.scores[name][:, picked])
  np.testing.assert_array_equal(part.nfe, full.nfe[:, picked])
  for i in (0, 2, 9, 11):
    np.testing.assert_allclose(
        part.samples[list(picked).index(i)],
        full.samples[list(full.sample_indices).index(i)],
        atol=1e-4,
    )
  # The outlined cells (numpy, from the classified digits) agree with the metric (JAX).
  broken = evaluator.invalid_cells(part.samples).any(axis=(-2, -1))  # [P, budgets]
  np.testing.assert_array_equal(broken.T, part.scores["duplicate_count"] > 0)
  # The puzzle images hold the given cells and 0 where the sampler generates.
  puzzles = evaluator.puzzle_images(picked)
  inputs = evaluator.inputs(picked)
  np.testing.assert_array_equal(puzzles[np.asarray(inputs["mask"])[..., 0] > 0.5], 0.0)
  with pytest.raises(ValueError, match="at least one puzzle"):
    evaluator(np.array([], int))
  with pytest.raises(ValueError, match="samples_per_device=-1"):
    evaluator(picked, samples_per_device=-1)


def test_a_config_that_changes_the_shipped_model_is_refused(shipped, tmp_path):
  config = _regression_config(shipped, model__hid_dims=(16, 32, 32))
  with pytest.raises(ValueError, match=r"model.hid_dims.*shipped"):
    runner.evaluate(config, str(tmp_path))
  config = _regression_config(shipped, eval__pretrained="no_such_model")
  with pytest.raises(FileNotFoundError, match="no_such_model.*mnist_sudoku_demo"):
    runner.evaluate(config, str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Even Pixels, random weights.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  config = load_task_config("even_pixels", "tiny")
  config.ipr.budget = 2
  config.eval.num_puzzles = 3
  config.eval.batch_size = 2
  workdir = tmp_path_factory.mktemp("ep_run")
  _random_weights_checkpoint(config, workdir)
  rows = runner.evaluate(config, str(workdir))
  return config, workdir, rows


def test_even_pixels_columns_and_iterations(ep_run):
  config, workdir, rows = ep_run
  with open(workdir / "eval" / config.eval.name / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [int(r["budget"]) for r in table] == [0, 1, 2]
  for column in ("valid_rate", "mean_color_imbalance", "mean_saturation_std", "mean_value_std"):
    assert column in table[0], column
  # 64 patches at 5 steps, overlap 0.5: 5 + 63 * 2.5 -> 163 passes; IPR re-noises
  # floor(64 / 4) = 16 patches: 5 + 15 * 2.5 -> 43 passes per iteration.
  assert [r["mean_nfe"] for r in rows] == [163, 206, 249]
  # The samples changed between budgets (a zero-output model would leave them as they are).
  assert len({round(r["mean_color_imbalance"], 6) for r in rows}) > 1


def test_even_pixels_results_do_not_depend_on_batch_size(ep_run):
  config, workdir, rows = ep_run
  config = config.copy_and_resolve_references()
  config.eval.batch_size = 4  # One call instead of two, a different padding.
  config.eval.name = "ep_test_batch4"
  rows4 = runner.evaluate(config, str(workdir))
  for a, b in zip(rows, rows4):
    for key in ("valid_rate", "mean_color_imbalance", "mean_saturation_std", "mean_nfe"):
      assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  config = load_task_config("even_pixels", "tiny")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
    runner.evaluate(config, str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------------


def test_wilson_interval_closed_forms():
  z = 1.959963984540054
  # All failures: (0, z^2 / (n + z^2)); all successes: (n / (n + z^2), 1).
  assert eval_report.wilson_interval(0, 5) == pytest.approx((0.0, z * z / (5 + z * z)))
  assert eval_report.wilson_interval(7, 7) == pytest.approx((7 / (7 + z * z), 1.0))
  low, high = eval_report.wilson_interval(50, 100)
  assert low == pytest.approx(1 - high) and low < 0.5 < high
  with pytest.raises(ValueError, match="successes=3"):
    eval_report.wilson_interval(3, 2)


def test_budget_table_means_and_shape_errors():
  scores = {
      "valid": np.array([[1, 0, 0, 0], [1, 1, 0, 1]], bool),
      "duplicate_count": np.array([[0, 2, 4, 6], [0, 0, 2, 0]]),
  }
  rows = eval_report.budget_table(scores, nfe=np.array([[3, 3, 3, 3], [5, 5, 5, 5]]))
  assert [r["valid_rate"] for r in rows] == [0.25, 0.75]
  assert [r["mean_duplicate_count"] for r in rows] == [3.0, 0.5]
  assert [r["mean_nfe"] for r in rows] == [3.0, 5.0]
  with pytest.raises(ValueError, match="valid"):
    eval_report.budget_table({"duplicate_count": scores["duplicate_count"]})
  with pytest.raises(ValueError, match="shape"):
    eval_report.budget_table({"valid": scores["valid"], "x": np.zeros(3)})


def test_ipr_process_figure_layout_and_shape_errors():
  snapshots = np.zeros((3, 4, 8, 8, 1))  # 3 puzzles, budgets 0..3
  fig = eval_report.ipr_process_figure(snapshots, None, 4, puzzles=np.zeros((3, 8, 8, 1)))
  assert len(fig.axes) == 3 * (1 + 4)
  assert [ax.get_title() for ax in fig.axes[:5]] == [
      "puzzle\n(its given cells)",
      "SRM sample\n(before IPR)",
      "IPR iteration 1",
      "IPR iteration 2",
      "IPR iteration 3",
  ]
  invalid = np.zeros((3, 4, 2, 2), bool)
  invalid[1, 2, 0, 1] = True  # puzzle 1, budget 2, cell (0, 1)
  fig = eval_report.ipr_process_figure(snapshots, invalid, 4)
  outlined = [len(ax.patches) for ax in fig.axes]
  assert outlined == [0] * 6 + [1] + [0] * 5
  with pytest.raises(ValueError, match=r"\(3, 8, 8, 1\).*\(2, 8, 8, 1\)"):
    eval_report.ipr_process_figure(snapshots, None, 4, puzzles=np.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="shape"):
    eval_report.ipr_process_figure(snapshots[0], None, 4)


def _legend_texts(fig):
  return [t.get_text().split(":")[0] for legend in fig.legends for t in legend.get_texts()]


def test_ipr_process_figure_reads_by_itself():
  """Legend (grey = not given, red = broken, blue = box), column titles naming each column's
  iteration and the ones skipped, row labels (puzzle index, what IPR did), valid or not under
  every panel, "no given cell" on a puzzle without one, outlines inside their cell."""
  snapshots = np.zeros((2, 11, 8, 8, 1))  # 2 puzzles, budgets 0..10, 2x2 cells of 4 pixels
  puzzles = np.zeros((2, 8, 8, 1))
  puzzles[0, :4, :4] = -1.0  # puzzle 0 gives its top-left cell; puzzle 1 gives none
  invalid = np.zeros((2, 11, 2, 2), bool)
  invalid[1, 0, 1, 1] = True  # puzzle 1 after SRM: the bottom-right cell is broken
  valid = np.ones((2, 11), bool)
  valid[1, :3] = False  # puzzle 1: fixed by IPR at iteration 3
  fig = eval_report.ipr_process_figure(
      snapshots, invalid, 4, [0, 1, 5, 10], puzzles, indices=[7, 12], valid=valid, box_size=1
  )
  assert _legend_texts(fig) == ["grey (puzzle column)", "red outline", "blue line"]
  assert fig.get_suptitle() == (
      "Columns: the SRM sample and IPR iterations 1, 5, 10 of 1\u201310 (the other 7 not shown)"
  )
  axes = np.array(fig.axes).reshape(2, 5)
  assert [ax.get_title() for ax in axes[0]] == [
      "puzzle\n(its given cells)",
      "SRM sample\n(before IPR)",
      "IPR iteration 1",
      "IPR iteration 5\n(iterations 2\u20134 not shown)",
      "IPR iteration 10\n(iterations 6\u20139 not shown)",
  ]
  assert [ax.get_ylabel() for ax in axes[:, 0]] == [
      "puzzle 7\nstays valid",
      "puzzle 12\nfixed by IPR",
  ]
  assert [ax.get_xlabel() for ax in axes[1]] == [
      "0 of 4 cells given",
      "invalid",
      "invalid",
      "valid",
      "valid",
  ]
  assert axes[0, 0].get_xlabel() == "1 of 4 cells given"
  assert [t.get_text() for t in axes[1, 0].texts] == ["no given cell"]
  assert not axes[0, 0].texts
  (outline,) = axes[1, 1].patches
  assert outline.get_bbox().bounds == (4.0, 4.0, 3.0, 3.0)  # pixel centres 4..7: inside [-0.5, 7.5]
  assert len(axes[1, 1].lines) == 2  # box_size 1: a box line between the two cells, each way

  # Without puzzles, broken cells or boxes: no legend; every iteration shown says so.
  fig = eval_report.ipr_process_figure(snapshots[:, :3], None, 4)
  assert not fig.legends
  assert fig.get_suptitle() == "Columns: the SRM sample and every IPR iteration 1\u20132"
  assert not fig.axes[0].get_ylabel()
  with pytest.raises(ValueError, match="transpose"):
    eval_report.ipr_process_figure(snapshots, None, 4, valid=valid.T)
  with pytest.raises(ValueError, match="budgets_to_show"):
    eval_report.ipr_process_figure(snapshots, None, 4, [0, 11])


def test_outcome_label_names_what_ipr_did():
  assert [
      eval_report.outcome_label(v) for v in ([0, 1, 1], [0, 0, 1, 0], [1, 0, 1], [1, 1, 0], [1])
  ] == ["fixed by IPR", "stays invalid", "stays valid", "broken by IPR", "stays valid"]


def _solved_grid():
  base = np.array([[(3 * (r % 3) + r // 3 + c) % 9 + 1 for c in range(9)] for r in range(9)])
  return base


def test_invalid_sudoku_cells_marks_exactly_the_repeated_digits():
  grid = _solved_grid()
  assert not mnist_sudoku_task.invalid_cells(grid).any()
  broken = grid.copy()
  broken[0, 0] = broken[0, 1]  # Row 0 now repeats one digit, and so does box 0.
  flags = mnist_sudoku_task.invalid_cells(broken)
  # The duplicated digit's cells in row 0, box 0 and column 0 of the changed cell.
  digit = broken[0, 0]
  expected = np.zeros((9, 9), bool)
  expected[0, 0] = expected[0, 1] = True
  col_dups = np.nonzero(broken[:, 0] == digit)[0]
  if len(col_dups) > 1:
    expected[col_dups, 0] = True
  assert flags[0, 0] and flags[0, 1]
  np.testing.assert_array_equal(flags, expected)


def test_the_plotted_puzzles_are_those_ipr_fixed_and_one_it_did_not():
  valid = np.array([[1, 1], [0, 1], [0, 0], [0, 1], [1, 0], [0, 1], [0, 0]], bool)
  # Fixed: 1, 3, 5; still broken: 2, 6; valid throughout: 0; broken by IPR: 4.
  assert eval_report.choose_plot_puzzles(valid, 4).tolist() == [1, 2, 3, 5]
  assert eval_report.choose_plot_puzzles(valid, 2).tolist() == [1, 2]
  assert eval_report.choose_plot_puzzles(valid, 1).tolist() == [1]
  assert eval_report.choose_plot_puzzles(valid, 7).tolist() == list(range(7))
  nothing_fixed = np.array([[1, 1], [1, 0], [1, 1]], bool)
  assert eval_report.choose_plot_puzzles(nothing_fixed, 2).tolist() == [0, 2]
  with pytest.raises(ValueError, match=r"\[P, budgets\]"):
    eval_report.choose_plot_puzzles(valid[:, 0], 2)


def test_uncertainty_variant_writes_both_iterates_and_counts_its_query(shipped, tmp_path):
  """selection='uncertainty' with return_iterate='confident': the query's G passes after the SRM
  pass and after every iteration on top of the spec counts; the last iterate's scores too."""
  groups = 4
  config = _regression_config(
      shipped,
      ipr__budget=2,
      eval__num_puzzles=8,
      eval__batch_size=8,
      ipr__selection="uncertainty",
      ipr__return_iterate="confident",
      ipr__uncertainty_groups=groups,
  )
  rows = runner.evaluate(config, str(tmp_path))
  puzzles = _load_puzzles(tmp_path)
  unknown = puzzles["unknown_patches"]
  k = np.maximum(1, unknown // 4)
  for budget in range(3):
    np.testing.assert_array_equal(
        puzzles["nfe"][:, budget], 3 * unknown + groups + budget * (2 * k + 8 + groups)
    )
  for name in ("last_valid", "last_duplicate_count", "model_uncertainty"):
    assert puzzles[name].shape == (8, 3), name
  # The returned iterate after budget b is the iterate j <= b of lowest mean uncertainty.
  best = [np.argmin(puzzles["model_uncertainty"][:, : b + 1], axis=1) for b in range(3)]
  for b in range(3):
    np.testing.assert_array_equal(
        puzzles["valid"][:, b], puzzles["last_valid"][np.arange(8), best[b]]
    )
    np.testing.assert_array_equal(
        puzzles["duplicate_count"][:, b], puzzles["last_duplicate_count"][np.arange(8), best[b]]
    )
  assert rows[-1]["mean_last_valid"] == pytest.approx(puzzles["last_valid"][:, -1].mean())
  settings = json.loads((tmp_path / "eval" / "regression" / "shards" / "run.json").read_text())
  assert settings["ipr"]["selection"] == "uncertainty"
  assert settings["ipr"]["uncertainty_groups"] == groups
  assert settings["ipr"]["renoise_time"] == 1.0  # every field, at the paper's value too


def test_verifier_selection_needs_a_sudoku_verifier():
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  config = load_task_config("even_pixels", "tiny,ep_test")
  config.ipr.selection = "verifier"
  with pytest.raises(ValueError, match="only mnist_sudoku has; got task 'even_pixels'"):
    runner.Evaluator(config, params=None)


# ------------------------------------------------------------------------------------------------
# run.json: the settings, batching and code that shards are checked against.
# ------------------------------------------------------------------------------------------------

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_RESULTS = _ROOT / "experiments" / "results"


def _apply_overrides(config, args):
  """`--config.section.field=value` arguments as config_flags applies them (typed by the
  field's current value)."""
  for arg in args:
    name, value = arg[len("--config.") :].split("=", 1)
    section, field = name.split(".")
    current = config[section][field]
    if isinstance(current, bool):
      value = {"True": True, "False": False}[value]
    elif isinstance(current, (int, float)):
      value = type(current)(value)
    config[section][field] = value
  return config


def _committed_run_commands():
  """{run folder under experiments/results: its --config.* overrides of the demo config}: the
  reproduction's command (experiments/README.md) and every run of
  experiments/beyond_paper/run_variants.sh."""
  runs = {
      "repro_1000_keys2": [
          "--config.eval.num_puzzles=1000",
          "--config.eval.batch_size=50",
          "--config.ipr.budget=30",
      ]
  }
  script = (_ROOT / "experiments" / "beyond_paper" / "run_variants.sh").read_text()
  common = re.search(r'^common="([^"]*)"', script, re.M).group(1).split()
  assert common[0] == "--config=configs/mnist_sudoku.py:demo", common
  for line in script.splitlines():
    if line.startswith("run "):
      _, name, *args = line.split()
      runs[f"variants_1000/{name}"] = common[1:] + args
  assert len(runs) == 8, sorted(runs)
  return runs


_COMMITTED_RUNS = _committed_run_commands()


def _committed_runs_model():
  """The params digest that the committed runs record: one model for all eight (the 3,250-step
  demo model shipped until 2026-12-04, in the git history only, so its digest cannot be computed
  here), and not the model shipped now."""
  digests = {
      json.loads((_RESULTS / run / "eval" / "ms_hard_test" / "shards" / "run.json").read_text())[
          "params_sha256"
      ]
      for run in _COMMITTED_RUNS
  }
  assert len(digests) == 1, digests
  (digest,) = digests
  assert digest != eval_settings.params_digest(pretrained.load("mnist_sudoku_demo").params)
  return digest


def _committed_run_settings(config, params):
  """`eval_settings.run_settings` of `config`, but for the params digest: the earlier model's
  that the committed runs record (`_committed_runs_model`); every other setting is checked."""
  return {
      **eval_settings.run_settings(config, params, "ema"),
      "params_sha256": _committed_runs_model(),
  }


@pytest.mark.parametrize("run", sorted(_COMMITTED_RUNS))
def test_the_committed_run_json_records_the_settings_of_its_command(shipped, run):
  """The committed run.json files (format 1, converted by experiments/migrate_run_json.py, in
  git history at commit a976fd0) hold the settings of the commands that produced them. They are
  records: their code is unknown (format 1 did not record it), so their shards would not be
  reused; reusing shards needs the same code (tests/test_eval_shards.py)."""
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  config = _apply_overrides(load_task_config("mnist_sudoku", "demo"), _COMMITTED_RUNS[run])
  shard_dir = _RESULTS / run / "eval" / "ms_hard_test" / "shards"
  stored = json.loads((shard_dir / "run.json").read_text())
  assert stored["format"] == 2 and stored["code"]["sha256"] is None
  settings = _committed_run_settings(config, shipped.params)
  eval_shards.check_settings(shard_dir, settings, check_code=False)
  assert stored["batches"]["count"] == 20 and stored["batches"]["puzzles"] == 1000
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"other code: code.files"):
    eval_shards.check_settings(shard_dir, {**settings, "code": eval_shards.code_record()})


# The step-20,494 model's evaluations (experiments/results/demo_20494, made by
# experiments/demo/demo_recipes.py on a GPU): eval name -> (preset, overrides), as
# experiments/README.md gives the commands.
_TABLE_ARGS = [
    "--config.eval.num_puzzles=1000",
    "--config.eval.batch_size=500",
    "--config.ipr.budget=30",
]
_UNCERTAINTY_ARGS = ["--config.ipr.selection=uncertainty", "--config.ipr.return_iterate=confident"]
_DEMO_20494_RUNS = {
    "select_hard": (
        "demo",
        [
            "--config.eval.seed=36",
            "--config.eval.num_puzzles=500",
            "--config.eval.batch_size=500",
            "--config.ipr.budget=30",
        ],
    ),
    **{
        f"{ev}_paper": (f"demo,{ev}", _TABLE_ARGS)
        for ev in ("ms_hard_test", "ms_medium_test", "ms_unique_test")
    },
    **{
        f"{ev}_uncertainty": (f"demo,{ev}", _TABLE_ARGS + _UNCERTAINTY_ARGS)
        for ev in ("ms_hard_test", "ms_medium_test", "ms_unique_test")
    },
}


@pytest.mark.parametrize("name", sorted(_DEMO_20494_RUNS))
def test_the_shipped_models_committed_tables_record_their_commands(shipped, name):
  """The tables of experiments/README.md were computed with the model shipped now (its digest)
  and the documented settings (the uniquely solvable puzzles included)."""
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  preset, args = _DEMO_20494_RUNS[name]
  config = _apply_overrides(load_task_config("mnist_sudoku", preset), args)
  shard_dir = _RESULTS / "demo_20494" / "eval" / name / "shards"
  eval_shards.check_settings(
      shard_dir, eval_settings.run_settings(config, shipped.params, "ema"), check_code=False
  )
  stored = json.loads((shard_dir / "run.json").read_text())
  assert stored["eval"].get("unique_solution", False) == name.startswith("ms_unique_test")


def test_the_cpu_rerun_records_its_command_code_and_environment(shipped):
  """experiments/results/demo_20494_cpu: the hard table rerun with committed code records the
  settings of its documented command, the code that made it and the environment."""
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  _, args = _DEMO_20494_RUNS["ms_hard_test_paper"]
  config = _apply_overrides(load_task_config("mnist_sudoku", "demo"), args)
  run_dir = _RESULTS / "demo_20494_cpu" / "eval" / "ms_hard_test_paper"
  eval_shards.check_settings(
      run_dir / "shards",
      eval_settings.run_settings(config, shipped.params, "ema"),
      check_code=False,
  )
  stored = json.loads((run_dir / "shards" / "run.json").read_text())
  assert stored["code"]["sha256"] and "sampling/ipr.py" in stored["code"]["files"]
  assert stored["environment"]["backend"] == "cpu" and stored["environment"]["device_count"] == 2
  metadata = json.loads((run_dir / "results.json").read_text())["metadata"]
  assert metadata["code"] == stored["code"] and metadata["environment"] == stored["environment"]
  assert metadata["shard_environments"] == {environment_lib.digest(stored["environment"]): 2}


def test_a_changed_default_or_batching_does_not_match_the_committed_run(shipped):
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  args = _COMMITTED_RUNS["repro_1000_keys2"]
  shard_dir = _RESULTS / "repro_1000_keys2" / "eval" / "ms_hard_test" / "shards"
  for field, value, message in (
      ("renoise_time", "0.5", r"ipr.renoise_time: 1.0 -> 0.5"),
      # Unused by the paper's random selection, but a setting all the same.
      ("uncertainty_groups", "8", r"ipr.uncertainty_groups: 4 -> 8"),
  ):
    config = _apply_overrides(
        load_task_config("mnist_sudoku", "demo"), args + [f"--config.ipr.{field}={value}"]
    )
    with pytest.raises(eval_shards.SettingsMismatchError, match=message):
      eval_shards.check_settings(
          shard_dir, _committed_run_settings(config, shipped.params), check_code=False
      )
  config = _apply_overrides(load_task_config("mnist_sudoku", "demo"), args)
  config.eval.sort_by_unknowns = False  # the same batch size, other puzzles in each batch
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"batches.sha256: .*eval.sort_by_unknowns: True -> False",
  ):
    eval_shards.check_settings(
        shard_dir, _committed_run_settings(config, shipped.params), check_code=False
    )


def _package_imports(path):
  """The ipr_jax modules (paths relative to the package, no suffix) that a source file imports,
  at top level or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ipr_jax":
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}".split(".", 1)[1].replace(".", "/")
        if (_ROOT / "ipr_jax" / f"{candidate}.py").is_file():
          found.add(candidate)  # from ipr_jax.data import sudoku
        elif (_ROOT / "ipr_jax" / candidate / "__init__.py").is_file():
          found.add(f"{candidate}/__init__")  # from ipr_jax import tasks (a package)
        elif "." in node.module:
          found.add(node.module.split(".", 1)[1].replace(".", "/"))  # from ipr_jax.x import Y
    elif isinstance(node, ast.Import):
      found.update(
          a.name.split(".", 1)[1].replace(".", "/")
          for a in node.names
          if a.name.startswith("ipr_jax.")
      )
  return found


def test_the_code_record_covers_what_the_evaluation_imports():
  """Every package module that evaluate.py imports, directly or through a module of the code
  record, is in the record or named as left out; and every shipped metric and data asset (what
  the metrics and the test puzzles read) is in it."""
  listed = {name[:-3] for name in eval_shards.CODE_FILES if name.endswith(".py")}
  reached, left_out, todo = set(), set(), ["evaluate"]
  while todo:
    module = todo.pop()
    if module not in reached:
      reached.add(module)
      for imported in _package_imports(_ROOT / "ipr_jax" / f"{module}.py"):
        (todo if imported in listed else [left_out.add(imported)]).append(imported)
  assert listed == reached, listed ^ reached
  assert left_out == set(eval_shards.NOT_IN_CODE_RECORD)
  assets = {
      str(p.relative_to(_ROOT / "ipr_jax"))
      for folder in ("metrics", "data")
      for p in (_ROOT / "ipr_jax" / folder / "assets").glob("*.npz")
  }
  assert assets and assets <= set(eval_shards.CODE_FILES), assets - set(eval_shards.CODE_FILES)


def _copy_run(workdir, tmp_path):
  shutil.copytree(workdir / "eval", tmp_path / "eval")
  return tmp_path / "eval" / "regression" / "shards"


def test_a_damaged_shard_and_stale_temporaries_are_cleaned_at_resume(shipped, demo_run, tmp_path):
  """A shard cut short (a crash of the machine despite the fsyncs, a flaky network disk) is
  found when the run resumes, deleted and computed again; the files equal the undamaged run's."""
  config, demo_workdir, _ = demo_run
  shard_dir = _copy_run(demo_workdir, tmp_path)
  whole = eval_shards.shard_path(shard_dir, 1).read_bytes()
  eval_shards.shard_path(shard_dir, 1).write_bytes(whole[: len(whole) // 3])
  (shard_dir / "batch_000000.npz.tmp999").write_bytes(b"a write killed midway")
  (tmp_path / "eval" / "regression" / "puzzles.npz").unlink()
  computed = []
  runner.evaluate(config, str(tmp_path), after_batch=computed.append)
  assert computed == [1]
  assert sorted(os.listdir(shard_dir)) == ["batch_000000.npz", "batch_000001.npz", "run.json"]
  mine, theirs = _load_puzzles(tmp_path), _load_puzzles(demo_workdir)
  for key in theirs:
    np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)


def test_shards_of_other_code_or_other_puzzles_are_refused(demo_run, tmp_path):
  config, demo_workdir, _ = demo_run
  shard_dir = _copy_run(demo_workdir, tmp_path)
  run_json = shard_dir / "run.json"
  stored = json.loads(run_json.read_text())
  assert stored["code"] == eval_shards.code_record()  # what wrote them: this code
  stored["code"]["files"]["sampling/ipr.py"] = "0" * 64
  run_json.write_text(json.dumps(stored))
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"other code: code.files.sampling/ipr.py: '0{64}' -> '[0-9a-f]{64}'.*"
      r"requires computing the shards again",
  ):
    runner.evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / "eval")
  shard_dir = _copy_run(demo_workdir, tmp_path)
  first, second = (eval_shards.shard_path(shard_dir, b) for b in (0, 1))
  first.rename(shard_dir / "swap")
  second.rename(first)
  (shard_dir / "swap").rename(second)
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"batch_000000.npz holds puzzles \[.*\] \(16\), but batch 0 of this "
      r"run is \[.*\] \(16\): the shards are of another batching",
  ):
    runner.evaluate(config, str(tmp_path))


def test_merge_checks_each_batch_and_the_union_of_the_puzzles():
  shard = lambda index: {"index": np.asarray(index), "nfe": np.asarray(index)[:, None] * 10}
  batches = [np.array([0, 2]), np.array([1, 3])]
  merged = store_lib.merge_shards([shard([0, 2]), shard([1, 3])], batches, 4)
  np.testing.assert_array_equal(merged["index"], [0, 1, 2, 3])
  np.testing.assert_array_equal(merged["nfe"][:, 0], [0, 10, 20, 30])
  with pytest.raises(eval_shards.SettingsMismatchError, match="shard 1 holds puzzles"):
    store_lib.merge_shards([shard([0, 2]), shard([1, 4])], batches, 4)
  with pytest.raises(eval_shards.SettingsMismatchError, match="1 shards for the run's 2 batches"):
    store_lib.merge_shards([shard([0, 2])], batches, 4)
  with pytest.raises(
      eval_shards.SettingsMismatchError, match=r"not exactly the run's puzzles " r"0\.\.4"
  ):
    store_lib.merge_shards([shard([0, 2]), shard([1, 3])], batches, 5)
  twice = [np.array([0, 1]), np.array([1, 2])]
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"\(3 distinct"):
    store_lib.merge_shards([shard([0, 1]), shard([1, 2])], twice, 4)


# ------------------------------------------------------------------------------------------------
# results.json is strict JSON for every variant.
# ------------------------------------------------------------------------------------------------


def _strict_json(text):
  def refuse(name):
    raise AssertionError(f"results.json holds {name}, not JSON")

  return json.loads(text, strict=True, parse_constant=refuse)


def test_results_json_writes_undefined_values_as_null(tmp_path):
  rows = [
      {"budget": 0, "valid_rate": 0.5, "mean_model_uncertainty": np.float32(-1.5)},
      {"budget": 1, "valid_rate": float("nan"), "mean_model_uncertainty": float("nan")},
  ]
  metadata = {"x": float("inf"), "y": (np.int64(3), -float("inf")), "z": np.array([1.0, np.nan])}
  eval_report.write_results(str(tmp_path), rows, metadata)
  saved = _strict_json((tmp_path / "results.json").read_text())
  assert saved["budgets"] == [
      {"budget": 0, "valid_rate": 0.5, "mean_model_uncertainty": -1.5},
      {"budget": 1, "valid_rate": None, "mean_model_uncertainty": None},
  ]
  assert saved["metadata"] == {"x": None, "y": [3, None], "z": [1.0, None]}


@pytest.mark.parametrize(
    "variant",
    [
        {},  # the paper's random selection
        {"ipr__selection": "uncertainty"},  # the last iterate: its uncertainty is never measured
        {"ipr__selection": "uncertainty", "ipr__return_iterate": "confident"},
        {"ipr__selection": "verifier"},
    ],
    ids=["random", "uncertainty_last", "uncertainty_confident", "verifier"],
)
def test_results_json_is_strict_json_for_every_variant(shipped, tmp_path, variant):
  config = _regression_config(
      shipped,
      ipr__budget=1,
      eval__num_puzzles=2,
      eval__batch_size=2,
      ipr__uncertainty_groups=2,
      **variant,
  )
  rows = runner.evaluate(config, str(tmp_path))
  saved = _strict_json((tmp_path / "eval" / "regression" / "results.json").read_text())
  assert [r["budget"] for r in saved["budgets"]] == [0, 1]
  assert saved["budgets"][1]["valid_rate"] == rows[1]["valid_rate"]
  if variant.get("ipr__selection") == "uncertainty":
    uncertainty = [r["mean_model_uncertainty"] for r in saved["budgets"]]
    assert isinstance(uncertainty[0], float)  # measured after the SRM pass
    if variant.get("ipr__return_iterate") == "confident":
      assert isinstance(uncertainty[1], float)
    else:
      assert uncertainty[1] is None and np.isnan(rows[1]["mean_model_uncertainty"])
  assert json.loads((tmp_path / "eval" / "regression" / "shards" / "run.json").read_text())["ipr"][
      "selection"
  ] == variant.get("ipr__selection", "random")


# ------------------------------------------------------------------------------------------------
# Two processes end together.
# ------------------------------------------------------------------------------------------------


def _demo_args(workdir, *extra):
  return [
      f"--config={CONFIG_DIR / 'mnist_sudoku.py'}:demo",
      f"--workdir={workdir}",
      "--config.eval.name=regression",
      *extra,
  ]


def _lines_with(text, pattern):
  return [line for line in text.splitlines() if re.search(pattern, line)]


def test_a_settings_mismatch_ends_both_processes_with_the_same_message(shipped, tmp_path):
  """Process 0 finds run.json of other settings; process 1, which never reads it, ends too,
  with the same message, instead of waiting for process 0 at a barrier."""
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  extra = ["--config.eval.num_puzzles=4", "--config.eval.batch_size=2", "--config.ipr.budget=1"]
  config = _apply_overrides(load_task_config("mnist_sudoku", "demo"), extra)
  config.ipr.budget = 3  # what the shards there were computed with
  config.eval.name = "regression"
  eval_shards.check_settings(
      tmp_path / "eval" / "regression" / "shards",
      {
          **eval_settings.run_settings(config, shipped.params, "ema"),
          "code": eval_shards.code_record(),
      },
      write=True,
  )
  start = time.time()
  results = multiprocess.wait_processes(
      multiprocess.start_processes("ipr_jax.evaluate", _demo_args(tmp_path, *extra)), timeout=180
  )
  assert time.time() - start < 180
  messages = []
  for process, (returncode, output) in enumerate(results):
    assert returncode != 0, (process, output[-3000:])
    lines = _lines_with(output, r"other settings: ipr\.budget: 3 -> 1\.")
    assert lines, (process, output[-3000:])
    messages.append(lines[-1])
  assert messages[0] == messages[1]
  assert not eval_shards.done_batches(tmp_path / "eval" / "regression" / "shards")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_one_process_stops_both_and_the_rerun_finishes(demo_run, tmp_path, signum):
  """SIGTERM (as a preemptible machine gets it) or SIGINT (Ctrl-C) to process 1 only: both
  processes stop after the round of batches in flight with the same message; the rerun computes
  the rest, and the files equal the single-process run's (checked once, after SIGTERM)."""
  _, demo_workdir, _ = demo_run
  args = _demo_args(
      tmp_path, "--config.eval.num_puzzles=8", "--config.eval.batch_size=1", "--config.ipr.budget=4"
  )
  shard_dir = tmp_path / "eval" / "regression" / "shards"
  procs = multiprocess.start_processes("ipr_jax.evaluate", args)
  deadline = time.time() + 300
  while not eval_shards.shard_path(shard_dir, 1).exists():  # process 1's first batch
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no batch 1"
    time.sleep(0.02)
  os.kill(procs[1].pid, signum)
  results = multiprocess.wait_processes(procs, timeout=180)
  messages = []
  for process, (returncode, output) in enumerate(results):
    assert returncode != 0, (process, output[-3000:])
    lines = _lines_with(output, r"stopped after \d of 8 batches; rerun the same command")
    assert lines, (process, output[-3000:])
    messages.append(lines[-1])
  assert messages[0] == messages[1]
  stopped_after = int(re.search(r"after (\d) of", messages[0]).group(1))
  assert stopped_after in (2, 4, 6)  # whole rounds: one batch per process
  assert eval_shards.done_batches(shard_dir) == set(range(stopped_after))
  assert not (tmp_path / "eval" / "regression" / "results.csv").exists()
  if signum == signal.SIGINT:
    assert "Interrupted: stopping after the current batch." in results[1][1]
    return

  outputs = multiprocess.run_processes("ipr_jax.evaluate", args, timeout=600)
  assert f"{stopped_after} of 8 batches already done" in outputs[0]
  assert eval_shards.done_batches(shard_dir) == set(range(8))
  mine, theirs = _load_puzzles(tmp_path), _load_puzzles(demo_workdir)
  assert list(mine["index"]) == list(range(8))
  for key in theirs:
    np.testing.assert_array_equal(mine[key], theirs[key][:8], err_msg=key)


def _one_line_each(results, pattern):
  """The last line matching `pattern` of each process's output, all equal; every process failed."""
  messages = []
  for process, (returncode, output) in enumerate(results):
    assert returncode != 0, (process, output[-3000:])
    lines = _lines_with(output, pattern)
    assert lines, (process, pattern, output[-3000:])
    messages.append(lines[-1])
  assert len(set(messages)) == 1, messages
  return messages[0]


def test_processes_that_would_compute_different_things_end_together(tmp_path):
  """Process 1 given another override, or a checkpoint that does not exist: both processes end
  at set-up (nothing computed) with the same one-line error naming the field and the processes,
  or the missing path."""
  extra = ["--config.eval.num_puzzles=4", "--config.eval.batch_size=2", "--config.ipr.budget=1"]
  results = multiprocess.wait_processes(
      multiprocess.start_processes(
          "ipr_jax.evaluate",
          _demo_args(tmp_path, *extra),
          process_args={1: ["--config.ipr.budget=2"]},
      ),
      timeout=180,
  )
  _one_line_each(
      results,
      r"^error: the 2 processes of this run would compute different things: "
      r".*ipr\.budget: 1 \(process 0\) vs 2 \(process 1\)",
  )
  assert not (tmp_path / "eval").exists()

  results = multiprocess.wait_processes(
      multiprocess.start_processes(
          "ipr_jax.evaluate",
          _demo_args(tmp_path, *extra),
          process_args={1: [f"--checkpoint={tmp_path / 'no_such_run'}"]},
      ),
      timeout=180,
  )
  _one_line_each(results, r"^error: .*no_such_run")
  assert not (tmp_path / "eval").exists()


def test_a_batch_that_fails_on_one_process_ends_both_and_the_rerun_finishes(tmp_path):
  """Batch 1 (process 1's, round 0) raises: both processes end with the same error after that
  round, process 0's batch 0 kept; the rerun computes batches 1 and 2 only."""
  args = _demo_args(
      tmp_path, "--config.eval.num_puzzles=3", "--config.eval.batch_size=1", "--config.ipr.budget=1"
  )
  tests_dir = str(pathlib.Path(__file__).resolve().parent)
  env = {
      "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
      "IPR_JAX_TEST_FAILING_BATCH": "1",
  }
  results = multiprocess.wait_processes(
      multiprocess.start_processes("evaluate_with_faults", args, extra_env=env), timeout=300
  )
  _one_line_each(results, r"batch 1 failed on purpose")
  shard_dir = tmp_path / "eval" / "regression" / "shards"
  assert eval_shards.done_batches(shard_dir) == {0}
  outputs = multiprocess.run_processes("ipr_jax.evaluate", args, timeout=300)
  assert "1 of 3 batches already done" in outputs[0]
  assert (tmp_path / "eval" / "regression" / "results.json").is_file()


def _rewrite_environment(shard_dir, change):
  """Makes the shards in `shard_dir` look computed in another environment: `change(record)`
  edits run.json's environment record; each shard's environment digest follows it."""
  run_json = shard_dir / "run.json"
  stored = json.loads(run_json.read_text())
  change(stored["environment"])
  run_json.write_text(json.dumps(stored))
  digest = environment_lib.digest(stored["environment"])
  for batch in eval_shards.done_batches(shard_dir):
    path = eval_shards.shard_path(shard_dir, batch)
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
    arrays[eval_shards.ENVIRONMENT_DIGEST] = np.asarray(digest)
    eval_shards.write_shard(shard_dir, batch, arrays)
  return digest


def test_shards_of_another_environment_are_reused_only_when_allowed(demo_run, tmp_path):
  config, demo_workdir, _ = demo_run
  shard_dir = _copy_run(demo_workdir, tmp_path)
  old = _rewrite_environment(shard_dir, lambda env: env["packages"].update(jaxlib="0.0.1"))
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"another environment: environment\.packages\.jaxlib: '0\.0\.1' -> "
      r"'[0-9.]+'.*--allow_environment_change",
  ):
    runner.evaluate(config, str(tmp_path))
  computed = []
  runner.evaluate(config, str(tmp_path), after_batch=computed.append, allow_environment_change=True)
  assert not computed  # both shards reused
  stored = json.loads((shard_dir / "run.json").read_text())
  assert stored["environment"]["packages"]["jaxlib"] == "0.0.1"
  jaxlib = importlib.metadata.version("jaxlib")
  assert [e["packages"]["jaxlib"] for e in stored["environment_changes"]] == [jaxlib]
  metadata = json.loads((tmp_path / "eval" / "regression" / "results.json").read_text())["metadata"]
  assert metadata["shard_environments"] == {old: 2}
  assert metadata["environment"]["packages"]["jaxlib"] == jaxlib
  # Accepted once, recorded: the same command runs again without the flag.
  runner.evaluate(config, str(tmp_path), after_batch=computed.append)
  assert not computed


def test_shards_are_refused_without_run_json_when_their_settings_differ(
    shipped, demo_run, tmp_path
):
  """run.json deleted (or shards copied into another run's folder): each shard's own settings
  digest still keeps shards of other settings or code out, and lets the same run's in."""
  config, demo_workdir, _ = demo_run
  shard_dir = _copy_run(demo_workdir, tmp_path)
  (shard_dir / "run.json").unlink()
  other = _regression_config(shipped, ipr__renoise_time=0.9)  # same batches, other sampling
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"batch_00000[01]\.npz was computed under other settings or code",
  ):
    runner.evaluate(other, str(tmp_path))
  shutil.rmtree(tmp_path / "eval")
  shard_dir = _copy_run(demo_workdir, tmp_path)
  (shard_dir / "run.json").unlink()
  computed = []
  runner.evaluate(config, str(tmp_path), after_batch=computed.append)
  assert not computed


def test_the_figure_shows_puzzles_ipr_fixed(demo_run):
  """ipr_process.png shows the puzzles whose outcome IPR changed (invalid after SRM, valid at
  the end) and one that stays broken, not the first puzzles of the first batch."""
  config, workdir, _ = demo_run
  puzzles = _load_puzzles(workdir)
  metadata = json.loads((workdir / "eval" / "regression" / "results.json").read_text())["metadata"]
  shown = metadata["plotted_puzzles"]
  valid = puzzles["valid"]
  fixed = np.flatnonzero(~valid[:, 0] & valid[:, -1])
  broken = np.flatnonzero(~valid[:, 0] & ~valid[:, -1])
  assert len(fixed) >= 3 and len(broken) >= 1  # the record: 18 -> 21 of 32 valid
  assert shown == sorted(fixed[: config.eval.num_plot_puzzles - 1].tolist() + [broken[0]])
