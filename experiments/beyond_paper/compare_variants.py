"""Compares IPR variants at equal mean denoiser passes, from the per-puzzle files of evaluations.

    python experiments/beyond_paper/compare_variants.py   # the runs of run_variants.sh (beside it)

Each evaluation's puzzles.npz holds, per puzzle and budget, the valid flag and the cumulative
denoiser passes. A curve is (mean passes, valid rate) over budgets 0..B. The table reads every
curve at the largest budget whose mean passes stay within each pass level (so no variant gets
more compute than the level), with Wilson 95% intervals. Runs with return_iterate='confident'
give two curves: the returned (most confident) iterate and the last iterate. Writes
comparison.md, comparison.json and valid_rate_vs_passes.png to --out.
"""

import json
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from ipr_jax.evaluation import report as eval_report

_RESULTS = os.path.join(os.path.dirname(__file__), os.pardir, "results")
_VARIANTS = os.path.join(_RESULTS, "variants_1000")

flags.DEFINE_string(
    "baseline",
    os.path.join(_RESULTS, "repro_1000_keys2"),
    "workdir of the paper's IPR (random selection) on the same puzzles",
)
flags.DEFINE_string("variants", _VARIANTS, "directory holding one workdir per variant")
flags.DEFINE_string("eval_name", "ms_hard_test", "config.eval.name of the evaluations")
flags.DEFINE_string("out", _VARIANTS, "where the table and the plot go")
flags.DEFINE_list(
    "pass_levels",
    ["150", "250", "350", "450", "550"],
    "mean denoiser passes per puzzle at which the curves are compared",
)

# (workdir name, score key in puzzles.npz, label); the baseline is added first.
CURVES = (
    ("uncertainty_nll", "last_valid", "uncertainty-guided (nll), last iterate"),
    ("uncertainty_nll", "valid", "uncertainty-guided (nll), most confident iterate"),
    ("random_confident", "valid", "random, most confident iterate"),
    ("partial_t05", "valid", "random, partial re-noising t0 = 0.5"),
    ("linear_ratio", "valid", "random, ratio 0.5 -> 0.125 over 10 iterations"),
    (
        "uncertainty_partial",
        "valid",
        "uncertainty-guided (nll) + partial t0 = 0.5, most confident iterate",
    ),
    ("uncertainty_sigma", "valid", "uncertainty-guided (sigma only), most confident iterate"),
    (
        "verifier",
        "valid",
        "ORACLE upper bound: verifier-guided + stop (the verifier is the metric)",
    ),
)
BASELINE_LABEL = "random, last iterate (the paper's IPR)"


def load_run(workdir: str, eval_name: str) -> dict[str, np.ndarray]:
  path = os.path.join(workdir, "eval", eval_name, "puzzles.npz")
  with np.load(path) as data:
    return {key: data[key] for key in data}


def curve(run: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
  """Mean passes, valid rate and its interval after each budget, in puzzle-index order."""
  order = np.argsort(run["index"])
  valid = run[key][order].astype(bool)  # [P, B + 1]
  passes = run["nfe"][order].astype(np.float64)
  total = valid.shape[0]
  successes = valid.sum(0)
  intervals = np.array([eval_report.wilson_interval(int(s), total) for s in successes])
  return {
      "index": run["index"][order],
      "valid": valid,
      "passes": passes.mean(0),
      "rate": successes / total,
      "low": intervals[:, 0],
      "high": intervals[:, 1],
  }


def at_level(c: dict[str, np.ndarray], level: float):
  """(budget, mean passes, rate, low, high) at the largest budget within `level` passes."""
  within = np.nonzero(c["passes"] <= level)[0]
  if not len(within):
    return None
  b = int(within[-1])
  return b, float(c["passes"][b]), float(c["rate"][b]), float(c["low"][b]), float(c["high"][b])


def main(argv):
  del argv
  baseline = load_run(flags.FLAGS.baseline, flags.FLAGS.eval_name)
  curves = [(BASELINE_LABEL, "repro_1000_keys2", curve(baseline, "valid"))]
  runs = {}
  for name, key, label in CURVES:
    workdir = os.path.join(flags.FLAGS.variants, name)
    try:
      runs.setdefault(name, load_run(workdir, flags.FLAGS.eval_name))
    except FileNotFoundError:
      print(f"skipping {name}: no finished evaluation in {workdir}")
      continue
    curves.append((label, name, curve(runs[name], key)))
  reference = curves[0][2]
  for _, name, c in curves[1:]:
    if not np.array_equal(c["index"], reference["index"]):
      raise ValueError(f"{name} was run on other puzzles than the baseline")

  checks = {}
  if "random_confident" in runs:
    # Same keys: its last iterates must be the paper's IPR, puzzle by puzzle.
    run = runs["random_confident"]
    order, base_order = np.argsort(run["index"]), np.argsort(baseline["index"])
    for name in ("valid", "duplicate_count"):
      last = run[f"last_{name}"][order]
      checks[f"random_confident_last_{name}_equals_paper"] = bool(
          np.array_equal(last, baseline[name][base_order][:, : last.shape[1]])
      )

  levels = [float(level) for level in flags.FLAGS.pass_levels]
  rows = []
  for label, name, c in curves:
    row = {
        "variant": label,
        "run": name,
        "budgets": len(c["rate"]) - 1,
        "final_passes": float(c["passes"][-1]),
        "final_rate": float(c["rate"][-1]),
        "levels": {},
    }
    for level in levels:
      point = at_level(c, level)
      if point is not None and c["passes"][-1] >= 0.9 * level:  # the curve gets that far
        row["levels"][str(int(level))] = dict(
            zip(("budget", "passes", "rate", "low", "high"), point)
        )
    rows.append(row)

  lines = [
      "| variant | " + " | ".join(f"<= {int(level)} passes" for level in levels) + " |",
      "|---|" + "---|" * len(levels),
  ]
  for row in rows:
    cells = []
    for level in levels:
      point = row["levels"].get(str(int(level)))
      if point is None:
        cells.append("")
      else:
        cells.append(
            f"{100 * point['rate']:.1f}% [{100 * point['low']:.1f}, "
            f"{100 * point['high']:.1f}] (b={point['budget']}, "
            f"{point['passes']:.0f})"
        )
    lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  os.makedirs(flags.FLAGS.out, exist_ok=True)
  with open(os.path.join(flags.FLAGS.out, "comparison.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(flags.FLAGS.out, "comparison.json"), "w") as f:
    json.dump(
        {
            "rows": rows,
            "checks": checks,
            "curves": {
                label: {
                    "passes": c["passes"].tolist(),
                    "rate": c["rate"].tolist(),
                    "low": c["low"].tolist(),
                    "high": c["high"].tolist(),
                }
                for label, _, c in curves
            },
        },
        f,
        indent=1,
        allow_nan=False,
    )

  fig, axes = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [2, 1]})
  for panel, ax in enumerate(axes):
    for label, _, c in curves:
      uses_verifier = "ORACLE" in label
      if uses_verifier and panel == 0:
        continue
      (line,) = ax.plot(
          c["passes"],
          100 * c["rate"],
          "--" if uses_verifier else "-",
          marker=".",
          markersize=3,
          label=label,
      )
      ax.fill_between(
          c["passes"], 100 * c["low"], 100 * c["high"], color=line.get_color(), alpha=0.12
      )
    ax.set_xlabel("mean denoiser passes per puzzle (SRM + IPR + uncertainty queries)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("valid rate (%), 95% Wilson band")
  axes[0].set_title(
      f"verifier-free IPR variants, {len(reference['index'])} hard 4x4 MNIST "
      "Sudoku puzzles, demo model",
      fontsize=10,
  )
  axes[1].set_title("with the verifier-guided ORACLE upper bound (full scale)", fontsize=10)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(flags.FLAGS.out, "valid_rate_vs_passes.png"), dpi=120)
  print(table)
  print(json.dumps(checks))


if __name__ == "__main__":
  app.run(main)
