# The evaluation helper that run_beyond_paper.sh and ../pass_budget/run_pass_budget.sh source:
# `run <seed> <num_puzzles> <split> <name> overrides...` evaluates the shipped demo model on one
# split (hard, medium, unique) into $OUT/seed<seed>/<name>/ in batches of $BATCH, unless its
# results.json is there already; the binary's log, less absl's info lines, in <split>.log.
export XLA_FLAGS=${XLA_FLAGS:---xla_force_host_platform_device_count=2}
declare -A PRESET=([hard]=demo [medium]=demo,ms_medium_test [unique]=demo,ms_unique_test)
BATCH=128
run() {
  local seed=$1 num=$2 split=$3 name=$4; shift 4
  local dir="$OUT/seed$seed/$name"
  if [[ -f "$dir/eval/$split/results.json" ]]; then echo "== $split $name: done"; return; fi
  mkdir -p "$dir"
  echo "== seed $seed $split $name $(date -u +%H:%M:%S)"
  python -m ipr_jax.evaluate --config="mnist_sudoku:${PRESET[$split]}" \
      --config.eval.seed="$seed" --config.eval.num_puzzles="$num" --config.eval.batch_size="$BATCH" \
      --config.eval.name="$split" --workdir="$dir" "$@" 2>&1 \
      | { grep -v "^I1\|^W1\|Warning" || true; } > "$dir/$split.log"
  tail -2 "$dir/$split.log"
}
