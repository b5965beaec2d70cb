#!/bin/bash
# Issue 41's comparisons at equal training compute on the 4x4 demo task (mnist_sudoku:demo, its
# recipe: batch 32, EMA 0.999, the paper's IPR), trained here from scratch on one machine:
#   unet_rectified  the demo's U-Net (357,571 parameters), 6,000 steps, the rectified flow;
#   dit_rectified   a DiT (hidden 192, 6 blocks, 6 heads, one token per 7x7 cell; 4,187,811
#                   parameters), 8,315 steps = the U-Net's 110.3 TFLOP (step_flops.py), learning
#                   rate 1e-3 (chosen before any run, not tuned);
#   unet_cosine     the demo's U-Net, 6,000 steps, config.flow=cosine.
# Then each EMA model on 1,000 hard puzzles of the demo's test seed, SRM and the paper's IPR at
# budgets 0..30, into experiments/results/equal_compute/<name>. Checkpoints go to runs/ (not
# committed; `record` copies each run's config, metrics and final digests to <name>/train/ and
# measures the steps' FLOPs into step_flops.jsonl, which equal_compute_table.py reads). Every stage
# resumes: rerun the same command to go on after a cut.
#   bash experiments/transformer/run_equal_compute.sh train
#   bash experiments/transformer/run_equal_compute.sh evaluate
#   bash experiments/transformer/run_equal_compute.sh record
#   python experiments/transformer/equal_compute_table.py
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/equal_compute}
OUT=${OUT:-experiments/results/equal_compute}
PYTHON=${PYTHON:-python}
DIT="--config.model.kind=dit --config.model.dit.hidden=192 --config.model.dit.depth=6 \
--config.model.dit.num_heads=6"
settings() {
  case $1 in
    unet_rectified) echo "--config.num_train_steps=6000" ;;
    dit_rectified) echo "$DIT --config.num_train_steps=8315 --config.optim.learning_rate=1e-3" ;;
    unet_cosine) echo "--config.num_train_steps=6000 --config.flow=cosine" ;;
  esac
}
NAMES=${NAMES:-unet_rectified dit_rectified unet_cosine}
# The step of a run's last checkpoint, and the step its training ends at.
last_step() { ls "$RUNS/$1/checkpoints" 2>/dev/null | grep -x '[0-9]*' | sort -n | tail -1; }
final_step() { $PYTHON -c "import json,sys; print(json.load(open(sys.argv[1]))['num_train_steps'])" \
    "$RUNS/$1/config.json"; }
mkdir -p "$RUNS" "$OUT"
case ${1:-} in
  train)
    for name in $NAMES; do
      echo "== train $name $(date -u +%H:%M:%S)"
      # shellcheck disable=SC2046
      $PYTHON -m ipr_jax.train --config=configs/mnist_sudoku.py:demo $(settings "$name") \
          --config.checkpoint_every_steps=250 --workdir="$RUNS/$name" 2>&1 \
          | { grep -v "^I1\|^W1\|Warning" || true; } >> "$RUNS/$name.log"
      tail -2 "$RUNS/$name.log"
    done ;;
  evaluate)
    for name in $NAMES; do
      if [ -f "$OUT/$name/eval/ms_hard_test/results.json" ]; then echo "== $name done"; continue; fi
      if [ "$(last_step "$name")" != "$(final_step "$name")" ]; then
        echo "$name: training has not finished (last checkpoint: $(last_step "$name"))" >&2; exit 1
      fi
      echo "== evaluate $name $(date -u +%H:%M:%S)"
      # shellcheck disable=SC2046
      $PYTHON -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:demo $(settings "$name") \
          --config.eval.num_puzzles=1000 --config.eval.batch_size=500 --config.ipr.budget=30 \
          --checkpoint="$RUNS/$name" --workdir="$OUT/$name" 2>&1 \
          | { grep -v "^I1\|^W1\|Warning" || true; } > "$OUT/$name.log"
      tail -3 "$OUT/$name.log"
    done ;;
  record)
    for name in $NAMES; do
      mkdir -p "$OUT/$name/train"
      cp "$RUNS/$name/config.json" "$RUNS/$name/metrics.jsonl" "$OUT/$name/train/"
      cp "$RUNS/$name/checkpoints/$(last_step "$name")/digest/metadata" \
          "$OUT/$name/train/final_digest.json"
    done
    $PYTHON experiments/transformer/step_flops.py --unet_steps=6000 2>/dev/null \
        | grep '^{' > "$OUT/step_flops.jsonl"
    cat "$OUT/step_flops.jsonl" ;;
  *) echo "usage: $0 train|evaluate|record" >&2; exit 2 ;;
esac
