r"""The ranking of the bundled MNIST digits by the shipped classifier's confidence, shipped as data.

    python -m ipr_jax.scorers.digit_ranking

writes ipr_jax/data/assets/mnist_digits_10k_ranking.npz.

The Sudoku task keeps the top-N digits of each class by classifier confidence (`config.data.top_n`,
like the reference's ms1000). For the bundled digits that choice is shipped as a file, so that the
data (`ipr_jax.data.digits`) needs no model and the test puzzles do not depend on the metric's
code: per part ('train', 'test'), int32 [N] the rank of each digit within its class (0: the one
the classifier is most confident about; ties keep file order), in the part's order, and the sha256
of the classifier weights that ranked them. Regenerate it after retraining the classifier
(`python -m ipr_jax.scorers.train_classifier`); tests/test_digits.py checks that the file equals
this ranking of the shipped weights.

Other digits (the 'tfds' source, another bundled-format file) are ranked when a task is built, by
`ipr_jax.metrics.sudoku.classifier_confidence` (`ipr_jax.tasks.mnist_sudoku` passes it to the
data).
"""

import hashlib
import pathlib

from absl import app
from absl import flags
import numpy as np

from ipr_jax.data import digits as digits_lib
from ipr_jax.metrics import sudoku as sudoku_metrics
from ipr_jax.models import classifier

PARTS = ("train", "test")

_OUTPUT = flags.DEFINE_string(
    "ranking_path", str(digits_lib.BUNDLED_RANKING), "Where to write the file."
)


def rank_within_class(labels: np.ndarray, confidence: np.ndarray) -> np.ndarray:
  """int32 [N]: each digit's rank among those of its class by decreasing confidence (ties: file
  order), the order in which `digits.select_top_n` keeps them."""
  ranks = np.zeros(len(labels), np.int32)
  for digit in np.unique(labels):
    positions = np.flatnonzero(labels == digit)
    order = np.argsort(-np.asarray(confidence)[positions], kind="stable")
    ranks[positions[order]] = np.arange(len(positions), dtype=np.int32)
  return ranks


def bundled_ranking() -> dict[str, np.ndarray]:
  """The ranking file's arrays, computed now with the shipped classifier: {part: int32 [N]} and
  'classifier_sha256'."""
  ranking = {}
  for part in PARTS:
    images, labels = digits_lib.load_digits(part, "bundled")
    ranking[part] = rank_within_class(labels, sudoku_metrics.classifier_confidence(images, labels))
  weights = pathlib.Path(classifier.DEFAULT_WEIGHTS).read_bytes()
  ranking["classifier_sha256"] = np.asarray(hashlib.sha256(weights).hexdigest())
  return ranking


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  np.savez(_OUTPUT.value, **bundled_ranking())
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
