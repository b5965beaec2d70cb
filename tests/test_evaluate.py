"""The evaluation binary and its report, on models whose samples differ from their noise.

The Sudoku tests evaluate the shipped demo model (`ipr_jax.pretrained`) on the regression set
recorded when it was shipped; the Even Pixels tests use a tiny U-Net with random (non-zero)
weights in every layer, so that its samples differ from the initial noise too (a freshly
initialised SRM outputs exactly zero).
"""

import csv
import json
import pathlib
import signal

import jax
import numpy as np
import pytest

from ipr_jax import build
from ipr_jax import checkpoint
from ipr_jax import eval_report
from ipr_jax import eval_shards
from ipr_jax import evaluate
from ipr_jax import pretrained
from ipr_jax import sampler
import multiprocess

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

# How far the valid rate of the regression set may move from the shipped record: floating-point
# details (XLA version, CPU kind) can flip a sample whose cell classification is borderline.
# 4 of 32 puzzles.
REGRESSION_MARGIN = 0.125


def _random_weights_checkpoint(config, workdir):
  """A checkpoint whose every parameter is random, so that the model's output is not zero."""
  model = build.make_model(config)
  params = build.init_params(config, model, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [
      x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
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
  rows = evaluate.evaluate(config, str(workdir))  # no checkpoint: the shipped model
  return config, workdir, rows


def test_writes_results_with_documented_columns(demo_run):
  config, workdir, rows = demo_run
  out = workdir / "eval" / "regression"
  for name in ("results.json", "results.csv", "valid_rate_vs_budget.png", "ipr_process.png"):
    assert (out / name).is_file(), name
  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [int(r["budget"]) for r in table] == list(range(config.ipr.budget + 1))
  for column in ("valid_rate", "valid_ci_low", "valid_ci_high", "mean_duplicate_count",
                 "mean_nfe", "num_puzzles"):
    assert column in table[0], column
  saved = json.loads((out / "results.json").read_text())
  assert saved["metadata"]["task"] == "mnist_sudoku"
  assert "mnist_sudoku_demo" in saved["metadata"]["checkpoint"]
  assert [r["valid_rate"] for r in saved["budgets"]] == [r["valid_rate"] for r in rows]


def test_nfe_is_the_spec_count_of_each_puzzle(demo_run):
  """SRM: 3 passes per unknown cell (overlap 0); IPR: 2k + 8 per iteration (p = 10, overlap
  0.8, spec §4.3) with k = max(1, floor(unknown / 4)) re-noised cells."""
  config, _, rows = demo_run
  task = build.make_task(config)
  batch = task.test_batch(config.eval.seed, np.arange(config.eval.num_puzzles),
                          tuple(config.eval.given_range))
  unknown = 16 - np.asarray(batch["num_given"])
  k = np.maximum(1, unknown // 4)
  for budget, row in enumerate(rows):
    assert row["mean_nfe"] == pytest.approx(np.mean(3 * unknown + budget * (2 * k + 8)))


def test_shipped_model_matches_its_record(shipped, demo_run):
  """A regression check of the model and the sampler together."""
  _, _, rows = demo_run
  record = shipped.metadata["regression"]
  valid = [r["valid_rate"] for r in rows]
  # The record itself shows a working model and a working IPR: some valid, not all.
  assert 0 < record["valid_rate"][0] < 1
  for budget in (0, record["budget"]):
    assert abs(valid[budget] - record["valid_rate"][budget]) <= REGRESSION_MARGIN, (
        budget, valid, record["valid_rate"])
  assert [r["mean_nfe"] for r in rows] == pytest.approx(record["mean_nfe"])


def test_budget_zero_is_the_plain_srm_run_at_any_batch_size(shipped, demo_run, tmp_path):
  _, _, rows = demo_run
  config = _regression_config(shipped, ipr__budget=0, eval__batch_size=32)
  srm_rows = evaluate.evaluate(config, str(tmp_path))
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
    shipped, demo_run, tmp_path):
  """SIGTERM after a batch keeps the shards written so far; the rerun computes only the rest
  and its files equal an uninterrupted run's, here one with another batch size (so other
  batches and paddings): a puzzle's result depends only on (seed, index)."""
  _, demo_workdir, rows = demo_run
  config = _regression_config(shipped, eval__batch_size=6)  # 6 batches, the last one padded
  with pytest.raises(evaluate.EvaluationStopped, match="after 3 of 6 batches"):
    evaluate.evaluate(config, str(tmp_path), after_batch=_sigterm_after(2))
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  shard_dir = tmp_path / "eval" / "regression" / "shards"
  assert eval_shards.done_batches(shard_dir) == {0, 1, 2}
  assert not (tmp_path / "eval" / "regression" / "results.csv").exists()

  computed = []
  resumed = evaluate.evaluate(config, str(tmp_path), after_batch=computed.append)
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
      "metadata"]["throughput"]
  assert throughput["batches_reused"] == 3 and throughput["puzzles"] == 32 - 18
  assert throughput["puzzles_per_sec"] > 0 and throughput["device_count"] == 2


def test_shards_of_other_settings_are_refused(shipped, demo_run):
  _, workdir, _ = demo_run
  config = _regression_config(shipped, ipr__budget=3)
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"ipr.budget: 4 -> 3"):
    evaluate.evaluate(config, str(workdir))
  config = _regression_config(shipped, eval__seed=36)
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"eval.seed: 35 -> 36"):
    evaluate.evaluate(config, str(workdir))


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
  batch = build.make_task(config).test_batch(config.eval.seed, puzzles["index"],
                                             tuple(config.eval.given_range))
  np.testing.assert_array_equal(puzzles["num_given"], batch["num_given"])
  # The final digit grids obey the rules exactly where the last budget is valid.
  broken = evaluate.invalid_sudoku_cells(puzzles["digit_grid"]).any(axis=(-2, -1))
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
  """The binary as 2 JAX processes of 1 device each: the same per-puzzle results as the
  single-process run on 2 devices, written once by process 0."""
  _, demo_workdir, _ = demo_run
  outputs = multiprocess.run_processes("ipr_jax.evaluate", [
      f"--config={CONFIG_DIR / 'mnist_sudoku.py'}:demo", f"--workdir={tmp_path}",
      "--config.eval.num_puzzles=32", "--config.eval.batch_size=16", "--config.ipr.budget=4",
      "--config.eval.name=regression"])
  assert "[process 0] [16/16]" in outputs[0] and "[process 1] [16/16]" in outputs[1]
  assert "wrote" in outputs[0] and "wrote" not in outputs[1]
  shard_dir = tmp_path / "eval" / "regression" / "shards"
  processes = [int(np.load(eval_shards.shard_path(shard_dir, b))["process"]) for b in (0, 1)]
  assert processes == [0, 1]
  mine, theirs = _load_puzzles(tmp_path), _load_puzzles(demo_workdir)
  for key in theirs:
    np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)
  throughput = json.loads((tmp_path / "eval" / "regression" / "results.json").read_text())[
      "metadata"]["throughput"]
  assert throughput["process_count"] == 2 and throughput["device_count"] == 2


def test_key_streams_never_share_a_key(shipped, demo_run):
  """Puzzle content (`test_batch`: fold_in(key(seed), i)), initial noise and sampling keys of
  the first 1000 puzzles, and the streams' own keys, are all distinct."""
  config, _, _ = demo_run
  evaluator = evaluate.Evaluator(config, shipped.params)
  indices = jax.numpy.arange(1000)
  root = jax.random.key(config.eval.seed)
  noise_root = jax.random.fold_in(root, evaluate.NOISE_STREAM)
  keys = [sampler.puzzle_keys(root, indices), sampler.puzzle_keys(noise_root, indices),
          sampler.puzzle_keys(evaluator._sampling_key, indices),  # pylint: disable=protected-access
          jax.numpy.stack([noise_root, evaluator._sampling_key])]  # pylint: disable=protected-access
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
  evaluator = evaluate.Evaluator(config, shipped.params)
  budgets = config.ipr.budget + 1
  # The binary's batches of the regression run (16 puzzles = 2 devices x 8).
  full = evaluator(np.arange(16), samples_per_device=4)
  assert full.scores["valid"].shape == full.nfe.shape == (budgets, 16)
  assert list(full.sample_indices) == [0, 1, 2, 3, 8, 9, 10, 11]
  assert full.samples.shape == (8, budgets, 28, 28, 1)
  rest = evaluator(np.arange(16, config.eval.num_puzzles), samples_per_device=4)
  table = eval_report.budget_table(
      {k: np.concatenate([full.scores[k], rest.scores[k]], axis=1) for k in full.scores},
      np.concatenate([full.nfe, rest.nfe], axis=1))
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
    np.testing.assert_allclose(part.samples[list(picked).index(i)],
                               full.samples[list(full.sample_indices).index(i)], atol=1e-4)
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
    evaluate.evaluate(config, str(tmp_path))
  config = _regression_config(shipped, eval__pretrained="no_such_model")
  with pytest.raises(FileNotFoundError, match="no_such_model.*mnist_sudoku_demo"):
    evaluate.evaluate(config, str(tmp_path))


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
  rows = evaluate.evaluate(config, str(workdir))
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
  rows4 = evaluate.evaluate(config, str(workdir))
  for a, b in zip(rows, rows4):
    for key in ("valid_rate", "mean_color_imbalance", "mean_saturation_std", "mean_nfe"):
      assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top
  config = load_task_config("even_pixels", "tiny")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
    evaluate.evaluate(config, str(tmp_path / "nothing"))


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
  scores = {"valid": np.array([[1, 0, 0, 0], [1, 1, 0, 1]], bool),
            "duplicate_count": np.array([[0, 2, 4, 6], [0, 0, 2, 0]])}
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
  assert [ax.get_title() for ax in fig.axes[:5]] == ["puzzle", "SRM", "b = 1", "b = 2", "b = 3"]
  invalid = np.zeros((3, 4, 2, 2), bool)
  invalid[1, 2, 0, 1] = True  # puzzle 1, budget 2, cell (0, 1)
  fig = eval_report.ipr_process_figure(snapshots, invalid, 4)
  outlined = [len(ax.patches) for ax in fig.axes]
  assert outlined == [0] * 6 + [1] + [0] * 5
  with pytest.raises(ValueError, match=r"\(3, 8, 8, 1\).*\(2, 8, 8, 1\)"):
    eval_report.ipr_process_figure(snapshots, None, 4, puzzles=np.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="shape"):
    eval_report.ipr_process_figure(snapshots[0], None, 4)


def _solved_grid():
  base = np.array([[(3 * (r % 3) + r // 3 + c) % 9 + 1 for c in range(9)] for r in range(9)])
  return base


def test_invalid_sudoku_cells_marks_exactly_the_repeated_digits():
  grid = _solved_grid()
  assert not evaluate.invalid_sudoku_cells(grid).any()
  broken = grid.copy()
  broken[0, 0] = broken[0, 1]  # Row 0 now repeats one digit, and so does box 0.
  flags = evaluate.invalid_sudoku_cells(broken)
  # The duplicated digit's cells in row 0, box 0 and column 0 of the changed cell.
  digit = broken[0, 0]
  expected = np.zeros((9, 9), bool)
  expected[0, 0] = expected[0, 1] = True
  col_dups = np.nonzero(broken[:, 0] == digit)[0]
  if len(col_dups) > 1:
    expected[col_dups, 0] = True
  assert flags[0, 0] and flags[0, 1]
  np.testing.assert_array_equal(flags, expected)


def test_uncertainty_variant_writes_both_iterates_and_counts_its_query(shipped, tmp_path):
  """selection='uncertainty' with return_iterate='confident': the query's G passes after the SRM
  pass and after every iteration on top of the spec counts; the last iterate's scores too."""
  groups = 4
  config = _regression_config(shipped, ipr__budget=2, eval__num_puzzles=8, eval__batch_size=8,
                              ipr__selection="uncertainty", ipr__return_iterate="confident",
                              ipr__uncertainty_groups=groups)
  rows = evaluate.evaluate(config, str(tmp_path))
  puzzles = _load_puzzles(tmp_path)
  unknown = puzzles["unknown_patches"]
  k = np.maximum(1, unknown // 4)
  for budget in range(3):
    np.testing.assert_array_equal(
        puzzles["nfe"][:, budget], 3 * unknown + groups + budget * (2 * k + 8 + groups))
  for name in ("last_valid", "last_duplicate_count", "model_uncertainty"):
    assert puzzles[name].shape == (8, 3), name
  # Budget 0 is the SRM sample either way; the returned iterate is one of the iterates.
  np.testing.assert_array_equal(puzzles["valid"][:, 0], puzzles["last_valid"][:, 0])
  assert rows[-1]["mean_last_valid"] == pytest.approx(puzzles["last_valid"][:, -1].mean())
  settings = evaluate.run_settings(config, shipped.params, "ema")
  assert settings["ipr"]["selection"] == "uncertainty"
  assert "renoise_time" not in settings["ipr"]  # at the paper's value: not recorded


def test_verifier_selection_needs_a_sudoku_verifier():
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top
  config = load_task_config("even_pixels", "tiny,ep_test")
  config.ipr.selection = "verifier"
  with pytest.raises(ValueError, match="only mnist_sudoku has; got task 'even_pixels'"):
    evaluate.Evaluator(config, params=None)


def test_the_committed_reproduction_shards_still_match_the_paper_settings(shipped):
  """Shards written before the IPR variants existed resume under today's settings: the variant
  fields at the paper's values are not part of a run's settings."""
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top
  config = load_task_config("mnist_sudoku", "demo")
  config.eval.num_puzzles, config.eval.batch_size, config.ipr.budget = 1000, 50, 30
  shard_dir = (pathlib.Path(__file__).parent.parent / "experiments" / "results" /
               "repro_1000_keys2" / "eval" / "ms_hard_test" / "shards")
  eval_shards.check_settings(shard_dir, evaluate.run_settings(config, shipped.params, "ema"))
  config.ipr.renoise_time = 0.5
  with pytest.raises(eval_shards.SettingsMismatchError, match="renoise_time"):
    eval_shards.check_settings(shard_dir, evaluate.run_settings(config, shipped.params, "ema"))
