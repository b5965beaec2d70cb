"""experiments/ipr_colab.ipynb, executed top to bottom in its test mode (IPR_JAX_NOTEBOOK_TEST=1:
4 puzzles, IPR budget 2, 2 training steps) in a fresh kernel; a failing cell fails the test.

The kernel inherits this process's environment (2 host CPU devices, the compilation cache).
"""

import csv
import functools
import io
import pathlib

import nbclient
import nbformat
import numpy as np
from PIL import Image
import pytest

from conftest import load_task_config
from ipr_jax import tasks
from ipr_jax.build import pretrained

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "experiments" / "ipr_colab.ipynb"
NUM_PUZZLES, BUDGET, TRAIN_STEPS = 4, 2, 2  # the notebook's test mode


def test_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(the executed notebook, the folder it ran in)."""
  workdir = tmp_path_factory.mktemp("notebook")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("IPR_JAX_NOTEBOOK_TEST", "1")
    patch.setenv("IPR_JAX_ROOT", str(ROOT))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
  return notebook, workdir


def tagged(notebook, tag):
  cells = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def text_of(cell):
  return "".join(o.text for o in cell.outputs if o.output_type == "stream")


def images_of(cell):
  """The PNGs a cell displayed, decoded."""
  import base64  # pylint: disable=g-import-not-at-top

  return [
      Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
      for o in cell.outputs
      if o.output_type in ("display_data", "execute_result") and "image/png" in o.data
  ]


def printed_table(text):
  """The rows of an `eval_report.format_table` print-out in `text`, as {column: float}."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["budget"])
  header = lines[start].split()
  rows = []
  for line in lines[start + 1 :]:
    fields = line.split()
    if len(fields) != len(header) or not fields[0].isdigit():
      break
    rows.append(dict(zip(header, map(float, fields))))
  return rows


def read_csv(path):
  with open(path) as f:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@functools.cache
def spec_mean_nfe():
  """Mean denoiser passes of the notebook's puzzles (hard test puzzles 0..3) after budgets 0..2,
  by the spec: SRM 3 per unknown cell (overlap 0), then 2k + 8 per IPR iteration (10 steps per
  cell at overlap 0.8) for k = max(1, unknown // 4) re-noised cells."""
  config = load_task_config("mnist_sudoku", "demo")
  data = tasks.get(config.task).make_data(config)
  batch = data.test_batch(config.eval.seed, np.arange(NUM_PUZZLES), tuple(config.eval.given_range))
  unknown = 16 - np.asarray(batch["num_given"])
  k = np.maximum(1, unknown // 4)
  return [float(np.mean(3 * unknown + b * (2 * k + 8))) for b in range(BUDGET + 1)]


def assert_budget_rows(rows):
  assert [int(r["budget"]) for r in rows] == list(range(BUDGET + 1))
  assert all(r["num_puzzles"] == NUM_PUZZLES for r in rows)
  # Means over 4 puzzles of integers: multiples of 0.25, exact in the 4-decimal print-out too.
  assert [r["mean_nfe"] for r in rows] == spec_mean_nfe()


def test_shipped_model_section_shows_iterations_and_table(executed):
  notebook, workdir = executed
  (figure,) = images_of(tagged(notebook, "ipr-images"))
  # One row per puzzle, a column for the puzzle, the SRM sample and each budget 1..2.
  assert figure.width > figure.height * (BUDGET + 2) / NUM_PUZZLES * 0.8
  handful = printed_table(text_of(tagged(notebook, "handful-table")))
  assert_budget_rows(handful)

  # The binary's entry point on the same 4 puzzles: the same numbers, in its files.
  out_dir = workdir / "ipr_runs" / "shipped" / "eval" / "ms_hard_test"
  written = read_csv(out_dir / "results.csv")
  assert_budget_rows(written)
  for mine, theirs in zip(handful, written):
    for key in ("valid_rate", "mean_duplicate_count", "mean_nfe"):
      assert mine[key] == pytest.approx(theirs[key], abs=1e-4)
  assert (out_dir / "ipr_process.png").is_file()
  assert len(images_of(tagged(notebook, "shipped-eval"))) == 1
  # Puzzle by puzzle and digit by digit, the binary's run is the shipped model's regression record
  # (the library's evaluation of hard test puzzles 0..31, budgets 0..4, made when it was shipped)
  # on the same puzzles and budgets: every budget's valid flag and duplicate count, and the
  # classified digits of the final grid (budget 2). One puzzle may differ (floating point: the
  # test mode compiles without XLA's optimisations), as tests/test_evaluate.py allows 2 of 32.
  with np.load(out_dir / "puzzles.npz") as f:
    index, valid, duplicates, grids = (
        f["index"],
        f["valid"],
        f["duplicate_count"],
        f["digit_grid"],
    )
  np.testing.assert_array_equal(index, np.arange(NUM_PUZZLES))
  record = pretrained.load("mnist_sudoku_demo").metadata["regression"]
  assert record["num_puzzles"] >= NUM_PUZZLES and record["budget"] >= BUDGET
  want_valid = np.asarray(record["valid"], bool)[:NUM_PUZZLES, : BUDGET + 1]
  want_duplicates = np.asarray(record["duplicate_count"])[:NUM_PUZZLES, : BUDGET + 1]
  want_grids = np.asarray(record["digit_grid"])[:NUM_PUZZLES, BUDGET]
  differing = ((valid != want_valid) | (duplicates != want_duplicates)).any(axis=1)
  differing |= (grids != want_grids).any(axis=(1, 2))
  assert differing.sum() <= 1, (valid, want_valid, grids, want_grids)
  # The notebook's table counts those same grids.
  for budget, row in enumerate(handful):
    assert round(row["valid_rate"] * NUM_PUZZLES) == valid[:, budget].sum()
    assert row["mean_duplicate_count"] == pytest.approx(duplicates[:, budget].mean(), abs=1e-4)


def test_training_section_trains_saves_and_evaluates(executed):
  notebook, workdir = executed
  train_cell = tagged(notebook, "train")
  steps = [
      int(line.split()[1]) for line in text_of(train_cell).splitlines() if line.startswith("step ")
  ]
  assert steps == list(range(1, TRAIN_STEPS + 1))
  assert images_of(train_cell)  # the live loss plot
  run = workdir / "ipr_runs" / "my_srm"
  assert (run / "checkpoints" / str(TRAIN_STEPS)).is_dir()
  losses = [
      float(line.split()[3])
      for line in text_of(train_cell).splitlines()
      if line.startswith("step ")
  ]
  assert np.all(np.isfinite(losses))

  trained_cell = tagged(notebook, "trained-eval")
  assert len(images_of(trained_cell)) == 1
  trained = printed_table(text_of(trained_cell))
  assert_budget_rows(trained)
  # "Evaluate your own checkpoint" on the same run: the same numbers through the binary's files.
  own = read_csv(workdir / "ipr_runs" / "my_eval" / "eval" / "ms_hard_test" / "results.csv")
  assert_budget_rows(own)
  for mine, theirs in zip(trained, own):
    assert mine["mean_duplicate_count"] == pytest.approx(theirs["mean_duplicate_count"], abs=1e-4)
