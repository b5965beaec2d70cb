"""experiments/ipr_colab.ipynb, executed top to bottom in its test mode (IPR_JAX_NOTEBOOK_TEST=1:
4 puzzles, IPR budget 2, 2 training steps) in a fresh kernel; a failing cell fails the test.

The kernel inherits this process's environment (2 host CPU devices, the compilation cache).
"""

import csv
import io
import pathlib

import nbclient
import nbformat
import numpy as np
from PIL import Image
import pytest

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
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
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
  return [Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
          for o in cell.outputs
          if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def printed_table(text):
  """The rows of an `eval_report.format_table` print-out in `text`, as {column: float}."""
  lines = text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["budget"])
  header = lines[start].split()
  rows = []
  for line in lines[start + 1:]:
    fields = line.split()
    if len(fields) != len(header) or not fields[0].isdigit():
      break
    rows.append(dict(zip(header, map(float, fields))))
  return rows


def read_csv(path):
  with open(path) as f:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_budget_rows(rows):
  assert [int(r["budget"]) for r in rows] == list(range(BUDGET + 1))
  assert all(r["num_puzzles"] == NUM_PUZZLES for r in rows)
  # The SRM pass needs at least one pass per unknown cell (11..16 of 16 here), and every IPR
  # iteration adds passes.
  nfe = [r["mean_nfe"] for r in rows]
  assert nfe[0] >= 11 and all(b > a for a, b in zip(nfe, nfe[1:]))


def test_shipped_model_section_shows_iterations_and_table(executed):
  notebook, workdir = executed
  (figure,) = images_of(tagged(notebook, "ipr-images"))
  # One row per puzzle, a column for the puzzle, the SRM sample and each budget 1..2.
  assert figure.width > figure.height * (BUDGET + 2) / NUM_PUZZLES * 0.8
  handful = printed_table(text_of(tagged(notebook, "handful-table")))
  assert_budget_rows(handful)
  assert all(r["mean_duplicate_count"] < 30 for r in handful)  # a trained model's grids

  # The binary's entry point on the same 4 puzzles: the same numbers, in its files.
  out_dir = workdir / "ipr_runs" / "shipped" / "eval" / "ms_hard_test"
  written = read_csv(out_dir / "results.csv")
  assert_budget_rows(written)
  for mine, theirs in zip(handful, written):
    for key in ("valid_rate", "mean_duplicate_count", "mean_nfe"):
      assert mine[key] == pytest.approx(theirs[key], abs=1e-4)
  assert (out_dir / "ipr_process.png").is_file()
  assert len(images_of(tagged(notebook, "shipped-eval"))) == 1


def test_training_section_trains_saves_and_evaluates(executed):
  notebook, workdir = executed
  train_cell = tagged(notebook, "train")
  steps = [int(line.split()[1]) for line in text_of(train_cell).splitlines()
           if line.startswith("step ")]
  assert steps == list(range(1, TRAIN_STEPS + 1))
  assert images_of(train_cell)  # the live loss plot
  run = workdir / "ipr_runs" / "my_srm"
  assert (run / "checkpoints" / str(TRAIN_STEPS)).is_dir()
  losses = [float(line.split()[3]) for line in text_of(train_cell).splitlines()
            if line.startswith("step ")]
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
