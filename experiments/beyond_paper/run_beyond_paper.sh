#!/bin/bash
# Issue 32, verifier-free refinement beyond the paper: the shipped demo model (step 20,494), every
# setting an evaluation of the binary with config overrides. `pilot` chooses on 256 puzzles of
# eval seed 36 per split; `final` reports the chosen setting on 1,000 puzzles of eval seed 35
# (the test seed) once. Resumable: rerun to finish a cut run (a run whose code changed is refused
# and must be deleted first). Results under experiments/results/beyond_paper/.
#
#   bash experiments/beyond_paper/run_beyond_paper.sh pilot
#   bash experiments/beyond_paper/run_beyond_paper.sh final
#   bash experiments/beyond_paper/run_beyond_paper.sh baselines
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/results/beyond_paper}
source experiments/beyond_paper/eval_runs.sh  # PRESET, BATCH=128 and run()
CHAINS3="--config.ipr.chains=3 --config.ipr.budget=6"
CHAINS10="--config.ipr.chains=10 --config.ipr.budget=0"
ALL="--config.ipr.query_cells=all"
BALANCED="--config.ipr.query_cells=balanced"
case "${1:-}" in
  pilot)  # in the order they ran; the first two at commit 7968b4b, the others at a74d22f
    run 36 256 hard chains3_b6 $CHAINS3 $ALL
    run 36 256 hard paper_b40 --config.ipr.budget=40
    run 36 256 unique paper_b40 --config.ipr.budget=40
    run 36 256 unique chains3_b6_bal $CHAINS3 $BALANCED
    run 36 256 hard chains3_b6_bal $CHAINS3 $BALANCED
    run 36 256 unique chains10_b0_bal $CHAINS10 $BALANCED
    run 36 256 hard chains10_b0_bal $CHAINS10 $BALANCED
    ;;
  final)  # the setting chosen on seed 36 (experiments/README.md), at commit a74d22f
    BATCH=200
    for split in hard unique medium; do
      run 35 1000 $split chains3_b6_bal $CHAINS3 $BALANCED
    done
    ;;
  baselines)  # the paper's IPR on the final table's puzzles, same machine and code as `final`
    BATCH=200
    for split in unique medium hard; do
      run 35 1000 $split paper_b30 --config.ipr.budget=30
    done
    ;;
  *) echo "usage: $0 pilot|final|baselines"; exit 2 ;;
esac
echo "== done $(date -u +%H:%M:%S)"
