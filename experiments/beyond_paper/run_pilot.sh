#!/bin/bash
# The pilot of experiments/README.md ("Choosing the settings on other puzzles") that chose the
# uncertainty-guided selection's settings: the shipped demo model, 200 hard puzzles of eval seed
# 36 (not the test puzzles of the comparison, seed 35), budget 6, four selections: random (the
# paper's IPR, last iterate), NLL at temperature 0.5 and 0.2, sigma only at 0.5 (the last three
# return the most confident iterate and record the last one too). Resumable: rerun to finish a
# cut run. Ends with the valid rate at budget 6, returned / last iterate, per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/results/pilot_seed36}
mkdir -p "$OUT"
common="--config=configs/mnist_sudoku.py:demo --config.eval.seed=36 --config.eval.num_puzzles=200 --config.eval.batch_size=50 --config.ipr.budget=6"
uncertainty="--config.ipr.selection=uncertainty --config.ipr.return_iterate=confident"
run() {
  name=$1; shift
  echo "== $name $(date -u +%H:%M:%S)"
  python -m ipr_jax.evaluate $common --workdir="$OUT/$name" "$@" 2>&1 | grep -v "^I1\|^W1\|Warning" > "$OUT/$name.log"
  tail -3 "$OUT/$name.log"
}
run random
run nll_t05 $uncertainty --config.ipr.uncertainty_score=nll --config.ipr.selection_temperature=0.5
run nll_t02 $uncertainty --config.ipr.uncertainty_score=nll --config.ipr.selection_temperature=0.2
run sigma_t05 $uncertainty --config.ipr.uncertainty_score=sigma --config.ipr.selection_temperature=0.5
python - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("run        valid at budget 6: returned / last iterate (200 puzzles, eval seed 36)")
for name in ("random", "nll_t05", "nll_t02", "sigma_t05"):
  row = json.loads((out / name / "eval/ms_hard_test/results.json").read_text())["budgets"][6]
  last = row.get("mean_last_valid", row["valid_rate"])
  print(f"{name:10s} {100 * row['valid_rate']:.1f}% / {100 * last:.1f}%  (mean passes {row['mean_nfe']:.1f})")
PY
echo "== all done $(date -u +%H:%M:%S)"
