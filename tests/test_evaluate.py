"""The evaluation binary and its report: files, columns, determinism, intervals, rule checks."""

import csv
import json

import jax
import numpy as np
import pytest

from ipr_jax import checkpoint
from ipr_jax import eval_report
from ipr_jax import evaluate
from ipr_jax import train


def _tiny_checkpoint(config, workdir):
  model = train.make_model(config)
  params = train.init_params(config, model, jax.random.key(0))
  checkpoint.save_params_checkpoint(workdir, params, config, train.make_optimizer(config))


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top
  config = load_task_config("even_pixels", "tiny")
  config.ipr.budget = 2
  config.eval.num_puzzles = 3
  config.eval.batch_size = 2
  workdir = tmp_path_factory.mktemp("ep_run")
  _tiny_checkpoint(config, workdir)
  rows = evaluate.evaluate(config, str(workdir))
  return config, workdir, rows


def test_writes_results_with_documented_columns(ep_run):
  config, workdir, rows = ep_run
  out = workdir / "eval" / config.eval.name
  for name in ("results.json", "results.csv", "valid_rate_vs_budget.png", "ipr_process.png"):
    assert (out / name).is_file(), name
  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [int(r["budget"]) for r in table] == [0, 1, 2]
  for column in ("valid_rate", "valid_ci_low", "valid_ci_high", "mean_color_imbalance",
                 "mean_saturation_std", "mean_value_std", "mean_nfe"):
    assert column in table[0], column
  assert all(int(r["num_puzzles"]) == 3 for r in table)
  saved = json.loads((out / "results.json").read_text())
  assert saved["metadata"]["task"] == "even_pixels"
  assert len(saved["budgets"]) == 3
  # Every IPR iteration re-noises the same number of patches: the same NFE each time.
  nfe = [r["mean_nfe"] for r in rows]
  assert nfe[0] > 0 and nfe[2] - nfe[1] == nfe[1] - nfe[0] > 0


def test_results_do_not_depend_on_batch_size(ep_run, tmp_path):
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
