r"""Exports a demo training run as the package's shipped model, with its regression record.

    python experiments/ship_demo_model.py --workdir=runs/demo --step=8000

1. Writes the EMA weights of the run's checkpoint (and its config, training record and the
   current git commit) to `ipr_jax/assets/mnist_sudoku_demo.npz` (`ipr_jax.pretrained`).
2. Evaluates that file on a fixed regression set (the first `--regression_puzzles` hard test
   puzzles, budgets 0..`--regression_budget`) and stores the per-budget valid rates, duplicate
   counts and denoiser passes in the file's metadata. tests/test_evaluate.py reruns exactly this
   evaluation on CPU and compares.
"""

import json
import pathlib
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from ipr_jax import evaluate
from ipr_jax import host_devices
from ipr_jax import pretrained

_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))
from configs import mnist_sudoku  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", None, "The demo training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_NAME = flags.DEFINE_string("name", "mnist_sudoku_demo", "Name of the shipped model.")
_PUZZLES = flags.DEFINE_integer("regression_puzzles", 32, "Puzzles of the regression set.")
_BUDGET = flags.DEFINE_integer("regression_budget", 4, "IPR budget of the regression set.")
_BATCH = flags.DEFINE_integer("regression_batch_size", 16, "Batch size of the regression run.")
_EXTRA = flags.DEFINE_string("extra_metadata", None, "JSON file of more metadata to record.")


def regression_config(name: str, num_puzzles: int, budget: int, batch_size: int):
  """The demo preset shrunk to the regression set (hard puzzles 0..num_puzzles-1)."""
  config = mnist_sudoku.get_config("demo")
  config.eval.pretrained = name
  config.eval.num_puzzles = num_puzzles
  config.eval.batch_size = batch_size
  config.ipr.budget = budget
  config.eval.name = "regression"
  return config


def main(argv):
  del argv
  git_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True,
                              text=True, check=False).stdout.strip()
  extra = {}
  if _EXTRA.value:
    with open(_EXTRA.value) as f:
      extra = json.load(f)
  path = pretrained.export_run(_WORKDIR.value, _NAME.value, _STEP.value, git_commit, extra)
  config = regression_config(_NAME.value, _PUZZLES.value, _BUDGET.value, _BATCH.value)
  with tempfile.TemporaryDirectory() as workdir:
    rows = evaluate.evaluate(config, workdir)
  shipped = pretrained.load(_NAME.value)
  metadata = dict(shipped.metadata)
  metadata["regression"] = {
      "num_puzzles": _PUZZLES.value, "budget": _BUDGET.value, "batch_size": _BATCH.value,
      "given_range": list(config.eval.given_range), "seed": config.eval.seed,
      "valid_rate": [r["valid_rate"] for r in rows],
      "mean_duplicate_count": [r["mean_duplicate_count"] for r in rows],
      "mean_nfe": [r["mean_nfe"] for r in rows],
  }
  pretrained.save(path, shipped.params, shipped.config, metadata)
  print(json.dumps(metadata, indent=1))
  print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
  host_devices.use_cpu_cores()
  flags.mark_flag_as_required("workdir")
  app.run(main)
