#!/bin/bash
# Issue 32, verifier-free refinement beyond the paper: the shipped demo model (step 20,494), every
# setting an evaluation of the binary with config overrides. `pilot` chooses on 256 puzzles of
# eval seed 36 per split; `final` reports the chosen setting on 1,000 puzzles of eval seed 35
# (the test seed) once. Resumable: rerun to finish a cut run (a run whose code changed is refused
# and must be deleted first). Results under experiments/results/beyond_paper/.
#
#   bash experiments/run_beyond_paper.sh pilot
#   bash experiments/run_beyond_paper.sh final
set -e
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results/beyond_paper}
export XLA_FLAGS=${XLA_FLAGS:---xla_force_host_platform_device_count=2}
declare -A PRESET=([hard]=demo [medium]=demo,ms_medium_test [unique]=demo,ms_unique_test)
run() {  # run <seed> <num_puzzles> <split> <name> overrides...
  seed=$1 num=$2 split=$3 name=$4; shift 4
  dir="$OUT/seed$seed/$name"
  mkdir -p "$dir"
  echo "== seed $seed $split $name $(date -u +%H:%M:%S)"
  python -m ipr_jax.evaluate --config="mnist_sudoku:${PRESET[$split]}" \
      --config.eval.seed="$seed" --config.eval.num_puzzles="$num" --config.eval.batch_size=128 \
      --config.eval.name="$split" --workdir="$dir" "$@" 2>&1 \
      | grep -v "^I1\|^W1\|Warning" > "$dir/$split.log"
  tail -2 "$dir/$split.log"
}
CHAINS3="--config.ipr.chains=3 --config.ipr.query_cells=all --config.ipr.budget=6"
CHAINS6="--config.ipr.chains=6 --config.ipr.query_cells=all --config.ipr.budget=2"
GUIDED="--config.ipr.selection=uncertainty --config.ipr.return_iterate=confident"
case "${1:-}" in
  pilot)
    for split in hard unique; do
      run 36 256 $split chains3_b6 $CHAINS3
      run 36 256 $split paper_b40 --config.ipr.budget=40
      run 36 256 $split chains6_b2 $CHAINS6
      run 36 256 $split chains3_b6_guided $CHAINS3 $GUIDED
    done
    ;;
  final)
    echo "the final runs are added once the pilot has chosen"; exit 1
    ;;
  *) echo "usage: $0 pilot|final"; exit 2 ;;
esac
echo "== done $(date -u +%H:%M:%S)"
