r"""Exports a demo training run as the package's shipped model, with its regression record.

    python experiments/demo/ship_demo_model.py --workdir=runs/demo --step=8000
    python experiments/demo/ship_demo_model.py --record_only  # re-record the shipped file's record

1. Writes the EMA weights of the run's checkpoint (and its config, training record and the
   current git commit) to `ipr_jax/assets/mnist_sudoku_demo.npz` (`ipr_jax.build.pretrained`).
2. Evaluates that file on a fixed regression set (the first `--regression_puzzles` hard test
   puzzles, budgets 0..`--regression_budget`) and stores in the file's metadata ("regression")
   every puzzle's valid flag and duplicate count at every budget ([puzzles, budget + 1] lists),
   with the per-budget valid rates, mean duplicate counts and mean denoiser passes.
   tests/test_evaluate.py reruns exactly this evaluation on CPU and compares puzzle by puzzle
   (at most MAX_DIFFERING_PUZZLES puzzles may differ: floating-point details can flip a
   borderline digit classification).

`--record_only` does step 2 alone on the shipped file `--name` (no `--workdir`): the weights,
config and training record stay as they are, bit for bit. Run it whenever the code changes what
the sampler draws (key streams, schedules), and after shipping new weights by other means.
"""

import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np

from ipr_jax.build import pretrained
from ipr_jax.evaluation import runner
from ipr_jax.evaluation import settings as eval_settings
from ipr_jax.runtime import environment
from ipr_jax.runtime import host_devices

_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))
from configs import mnist_sudoku  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", None, "The demo training run (not with --record_only).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_NAME = flags.DEFINE_string("name", "mnist_sudoku_demo", "Name of the shipped model.")
_PUZZLES = flags.DEFINE_integer("regression_puzzles", 32, "Puzzles of the regression set.")
_BUDGET = flags.DEFINE_integer("regression_budget", 4, "IPR budget of the regression set.")
_BATCH = flags.DEFINE_integer("regression_batch_size", 16, "Batch size of the regression run.")
_EXTRA = flags.DEFINE_string("extra_metadata", None, "JSON file of more metadata to record.")
_RECORD_ONLY = flags.DEFINE_bool(
    "record_only",
    False,
    "Only re-record the regression entry of the shipped model --name "
    "(weights, config and training record unchanged).",
)

# How many puzzles of the regression set may differ from the record (a valid flag, a duplicate
# count, a classified digit or a cell's mean beyond CELL_MEAN_ATOL at any budget) before
# tests/test_evaluate.py fails.
MAX_DIFFERING_PUZZLES = 2
# How far a cell's mean pixel value may move (another XLA build: about 2e-5 at most, measured
# with XLA's optimisations off; the sampler bugs the tests inject: 0.01 and more).
CELL_MEAN_ATOL = 1e-3


def regression_config(name: str, num_puzzles: int, budget: int, batch_size: int):
  """The demo preset shrunk to the regression set (hard puzzles 0..num_puzzles-1)."""
  config = mnist_sudoku.get_config("demo")
  config.eval.pretrained = name
  config.eval.num_puzzles = num_puzzles
  config.eval.batch_size = batch_size
  config.ipr.budget = budget
  config.eval.name = "regression"
  return config


def _git_commit() -> str:
  """HEAD of the checkout, with '+dirty' if it has uncommitted changes to tracked files."""
  run = lambda *args: subprocess.run(
      ["git", *args], cwd=_ROOT, capture_output=True, text=True, check=False
  ).stdout.strip()
  commit = run("rev-parse", "HEAD")
  return commit + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")


def record_regression(
    name: str, num_puzzles: int = 32, budget: int = 4, batch_size: int = 16
) -> dict:
  """Evaluates the shipped model `name` on the regression set; the record to store.

  Returns:
    The set's settings, per-puzzle `valid` (0/1) and `duplicate_count` lists of shape
    [num_puzzles, budget + 1], the classified `digit_grid` ([num_puzzles, budget + 1, n, n]) and
    the `cell_mean` pixel values ([num_puzzles, budget + 1, n, n], compared to `cell_mean_atol`)
    of every puzzle after every budget (`pretrained.regression_facts`: a changed sampler moves
    these long before it changes a valid flag), the per-budget `valid_rate`,
    `mean_duplicate_count` and `mean_nfe`, the tolerances, and the code and environment that
    recorded it.
  """
  config = regression_config(name, num_puzzles, budget, batch_size)
  with tempfile.TemporaryDirectory() as workdir:
    rows = runner.evaluate(config, workdir)
    with np.load(os.path.join(workdir, "eval", config.eval.name, "puzzles.npz")) as f:
      index, valid, duplicates = f["index"], f["valid"], f["duplicate_count"]
  assert list(index) == list(range(num_puzzles)), index
  # Every budget's digits and cell means, as tests/test_evaluate.py computes them.
  facts = pretrained.regression_facts(
      runner.Evaluator(config, pretrained.load(name).params), num_puzzles, batch_size
  )
  return {
      "num_puzzles": num_puzzles,
      "budget": budget,
      "batch_size": batch_size,
      "given_range": list(config.eval.given_range),
      "seed": config.eval.seed,
      "valid": np.asarray(valid, int).tolist(),
      "duplicate_count": np.asarray(duplicates, int).tolist(),
      "digit_grid": np.asarray(facts["digit_grid"], int).tolist(),
      "cell_mean": np.round(facts["cell_mean"], 6).tolist(),
      "cell_mean_atol": CELL_MEAN_ATOL,
      "max_differing_puzzles": MAX_DIFFERING_PUZZLES,
      "valid_rate": [r["valid_rate"] for r in rows],
      "mean_duplicate_count": [r["mean_duplicate_count"] for r in rows],
      "mean_nfe": [r["mean_nfe"] for r in rows],
      "recorded_with_commit": _git_commit(),
      "recorded_on": datetime.date.today().isoformat(),
      "recorded_in": environment.record(),
  }


def rerecord(
    name: str = "mnist_sudoku_demo", num_puzzles: int = 32, budget: int = 4, batch_size: int = 16
) -> pathlib.Path:
  """Replaces the "regression" entry of shipped model `name`'s file, nothing else.

  The parameters, config and the rest of the metadata are written back unchanged (checked: the
  rewritten file's parameters equal the old ones bit for bit).
  """
  shipped = pretrained.load(name)
  record = record_regression(name, num_puzzles, budget, batch_size)
  metadata = dict(shipped.metadata)
  metadata["regression"] = record
  path = pretrained.path_of(name)
  pretrained.save(path, shipped.params, shipped.config, metadata)
  rewritten = pretrained.load(name)
  if eval_settings.params_digest(rewritten.params) != eval_settings.params_digest(shipped.params):
    raise RuntimeError(f"rewriting {path} changed its parameters")
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _RECORD_ONLY.value:
    if _WORKDIR.value:
      raise app.UsageError("--record_only re-records the shipped file; it takes no --workdir")
  else:
    if not _WORKDIR.value:
      raise app.UsageError("--workdir is required (or --record_only)")
    extra = {}
    if _EXTRA.value:
      with open(_EXTRA.value) as f:
        extra = json.load(f)
    head = _git_commit().removesuffix("+dirty")  # the commit of the code that trained it
    pretrained.export_run(_WORKDIR.value, _NAME.value, _STEP.value, head, extra)
  path = rerecord(_NAME.value, _PUZZLES.value, _BUDGET.value, _BATCH.value)
  record = pretrained.load(_NAME.value).metadata["regression"]
  print(
      json.dumps(
          {
              k: v
              for k, v in record.items()
              if k not in ("valid", "duplicate_count", "digit_grid", "cell_mean")
          },
          indent=1,
      )
  )
  print(
      f"valid puzzles per budget: {np.sum(record['valid'], axis=0).tolist()} of "
      f"{record['num_puzzles']}"
  )
  print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
  host_devices.use_cpu_cores()
  app.run(main)
