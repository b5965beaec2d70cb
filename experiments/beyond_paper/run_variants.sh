#!/bin/bash
# The IPR-variant comparison of experiments/README.md: the shipped demo model, the 1,000 hard
# test puzzles of the reproduction (eval seed 35), one evaluation per variant. Resumable: rerun
# to finish a cut run. The paper's IPR (random selection) is the run in
# experiments/results/repro_1000_keys2 (same puzzles, same keys, budget 30).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/results/variants_1000}
common="--config=configs/mnist_sudoku.py:demo --config.eval.num_puzzles=1000 --config.eval.batch_size=50"
run() {
  name=$1; shift
  echo "== $name $(date -u +%H:%M:%S)"
  python -m ipr_jax.evaluate $common --workdir="$OUT/$name" "$@" 2>&1 | grep -v "^I1\|^W1\|Warning" > "$OUT/$name.log"
  tail -3 "$OUT/$name.log"
}
run uncertainty_nll --config.ipr.budget=30 --config.ipr.selection=uncertainty --config.ipr.return_iterate=confident
run verifier --config.ipr.budget=30 --config.ipr.selection=verifier --config.ipr.immediate_stop=True
run partial_t05 --config.ipr.budget=60 --config.ipr.renoise_time=0.5
run linear_ratio --config.ipr.budget=30 --config.ipr.ratio_schedule=linear --config.ipr.resampling_ratio=0.5 --config.ipr.final_resampling_ratio=0.125 --config.ipr.ratio_decay_iterations=10
run random_confident --config.ipr.budget=30 --config.ipr.return_iterate=confident
run uncertainty_partial --config.ipr.budget=40 --config.ipr.selection=uncertainty --config.ipr.return_iterate=confident --config.ipr.renoise_time=0.5
run uncertainty_sigma --config.ipr.budget=30 --config.ipr.selection=uncertainty --config.ipr.uncertainty_score=sigma --config.ipr.return_iterate=confident
echo "== all done $(date -u +%H:%M:%S)"
