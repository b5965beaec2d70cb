"""Does the model's own uncertainty tell a valid grid from a broken one? From committed runs.

    python experiments/confidence_separation.py [RUN_DIR ...]

Reads the puzzles.npz of runs made with the uncertainty query (`model_uncertainty`: the mean
uncertainty score of the last iterate at each budget, and `last_valid`: whether that iterate is
valid), default: the shipped model's three uncertainty-guided tables
(experiments/results/demo_20494/eval/*_uncertainty). Prints, per run:

* across puzzles, at budgets 0, 5, 10 and 30: the AUC of the score for valid against invalid
  iterates (the probability that a valid iterate scores lower than an invalid one; 0.5 = no
  separation);
* within puzzles: over the puzzles with both valid and invalid iterates among budgets 0..B, the
  probability that a valid iterate scores lower than an invalid iterate of the same puzzle.

Nothing here reads anything the sampler did not record; it is an analysis of finished runs.
"""

import pathlib
import sys

import numpy as np

_RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "demo_20494" / "eval"
_DEFAULT_RUNS = [
    _RESULTS / f"{split}_uncertainty"
    for split in ("ms_hard_test", "ms_medium_test", "ms_unique_test")
]


def lower_score_probability(valid_scores: np.ndarray, invalid_scores: np.ndarray) -> float:
  """P(a valid score < an invalid score), ties counted half (the AUC of -score)."""
  a, b = np.asarray(valid_scores)[:, None], np.asarray(invalid_scores)[None, :]
  if not a.size or not b.size:
    return float("nan")
  return float(((a < b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size))


def separation(scores: np.ndarray, valid: np.ndarray) -> dict:
  """{'across': {budget: (AUC, valid share)}, 'within': (probability, puzzles)} of `scores`,
  `valid` [P, B + 1]."""
  valid = valid.astype(bool)
  across = {}
  for budget in (0, 5, 10, 30):
    if budget < scores.shape[1]:
      ok = valid[:, budget]
      across[budget] = (
          lower_score_probability(scores[ok, budget], scores[~ok, budget]),
          float(ok.mean()),
      )
  wins = pairs = puzzles = 0.0
  for row, ok in zip(scores, valid):
    if ok.any() and (~ok).any():
      a, b = row[ok][:, None], row[~ok][None, :]
      wins += (a < b).sum() + 0.5 * (a == b).sum()
      pairs += a.size * b.size
      puzzles += 1
  return {"across": across, "within": (wins / pairs if pairs else float("nan"), int(puzzles))}


def main(argv):
  for run in map(pathlib.Path, argv or _DEFAULT_RUNS):
    with np.load(run / "puzzles.npz") as f:
      result = separation(f["model_uncertainty"], f["last_valid"])
    across = "; ".join(
        f"b={b}: AUC {auc:.3f} (valid {share:.3f})" for b, (auc, share) in result["across"].items()
    )
    within, puzzles = result["within"]
    print(f"{run.name}: {across}; within puzzles {within:.3f} ({puzzles} puzzles)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
