#!/bin/bash
# The SRM sampler family comparison of experiments/README.md: the shipped demo model, 1,000 hard
# test puzzles of eval seed 35, the paper's IPR to budget 10 on top of each SRM schedule (the
# reference's ms_hard sampler tests in their 4x4 demo forms, adaptive top_k 2 and 4), then the
# paper's SRM pass with IPR regenerating under each schedule. Resumable: rerun to finish a cut
# run (the evaluation binary reuses the finished batches of the same settings and code).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-experiments/results/sampler_family}
PYTHON=${PYTHON:-python}
common="--config.eval.num_puzzles=1000 --config.eval.batch_size=500 --config.ipr.budget=10"
mkdir -p "$OUT"
run() {
  name=$1; preset=$2; shift 2
  if [ -f "$OUT/$name/eval/$name/results.json" ]; then echo "== $name done"; return; fi
  echo "== $name $(date -u +%H:%M:%S)"
  $PYTHON -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:$preset $common \
      --config.eval.name=$name --workdir="$OUT/$name" "$@" 2>&1 \
      | grep -v "^I1\|^W1\|Warning" > "$OUT/$name.log"
  tail -3 "$OUT/$name.log"
}
# SRM schedules (the paper's IPR on top).
run seq_adaptive000 demo,ms_hard_seq_adaptive000
run fixed demo,ms_hard_fixed
run random_seq000 demo,ms_hard_random_seq000
run graph_seq000 demo,ms_hard_graph_seq000
run adaptive_top2 demo --config.sampler.top_k=2
run adaptive_top4 demo --config.sampler.top_k=4
run seq_adaptive075 demo,ms_hard_seq_adaptive075
run random_seq075 demo,ms_hard_random_seq075
run graph_seq075 demo,ms_hard_graph_seq075
# IPR's regeneration schedule (the paper's SRM pass).
run ipr_graph_seq demo --config.ipr.schedule=graph_sequential
run ipr_fixed demo --config.ipr.schedule=fixed
run ipr_top2 demo --config.ipr.top_k=2
run ipr_random_seq demo --config.ipr.schedule=random_sequential
echo "== all done $(date -u +%H:%M:%S)"
