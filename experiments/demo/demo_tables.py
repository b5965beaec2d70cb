r"""Tables and plot of a demo model's evaluations: SRM, the paper's IPR and the uncertainty-guided
setting on hard, medium and uniquely solvable 4x4 puzzles, per budget and at equal passes.

    python experiments/demo/demo_tables.py --run=experiments/results/demo_20494

Reads <run>/eval/<difficulty>_<setting>/puzzles.npz (as experiments/demo/demo_recipes.py names the
evaluations) and writes <run>/tables.md, <run>/tables.json and <run>/valid_rate_vs_passes.png.
Budget 0 of the paper's run is plain SRM. Equal passes: every curve read at the largest budget
whose mean denoiser passes per puzzle stay within the level (SRM + IPR + uncertainty queries).
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

_RUN = flags.DEFINE_string("run", "experiments/results/demo_20494", "Directory of the run.")
_LEVELS = flags.DEFINE_list(
    "pass_levels",
    ["100", "200", "300", "450"],
    "Mean denoiser passes per puzzle of the equal-pass table.",
)
_BUDGETS = flags.DEFINE_list(
    "budgets",
    ["0", "1", "2", "3", "5", "10", "15", "20", "30"],
    "Budgets shown in the per-budget table.",
)

DIFFICULTIES = (
    ("ms_hard_test", "hard (0-5 given)"),
    ("ms_medium_test", "medium (6-10 given)"),
    ("ms_unique_test", "unique solution (4-6 given, minimal)"),
)
SETTINGS = (
    ("paper", "valid", "paper's IPR (random, last iterate)"),
    ("uncertainty", "valid", "uncertainty-guided, most confident iterate"),
)


def curve(path: str, key: str) -> dict:
  """Per budget: mean passes, valid rate, Wilson 95% interval; puzzle indices."""
  with np.load(path) as data:
    order = np.argsort(data["index"])
    valid = data[key][order].astype(bool)
    passes = data["nfe"][order].astype(np.float64).mean(0)
    index = data["index"][order]
  successes = valid.sum(0)
  intervals = np.array([eval_report.wilson_interval(int(s), len(valid)) for s in successes])
  return {
      "index": index,
      "passes": passes,
      "rate": successes / len(valid),
      "low": intervals[:, 0],
      "high": intervals[:, 1],
      "num_puzzles": len(valid),
  }


def _cell(c: dict, b: int) -> str:
  return f"{100 * c['rate'][b]:.1f}% [{100 * c['low'][b]:.1f}, {100 * c['high'][b]:.1f}]"


def main(argv):
  del argv
  run = _RUN.value
  curves = {}
  for difficulty, _ in DIFFICULTIES:
    for setting, key, _ in SETTINGS:
      path = os.path.join(run, "eval", f"{difficulty}_{setting}", "puzzles.npz")
      curves[difficulty, setting] = curve(path, key)
    paper, other = curves[difficulty, "paper"], curves[difficulty, "uncertainty"]
    if not np.array_equal(paper["index"], other["index"]):
      raise ValueError(f"{difficulty}: the two settings ran on different puzzles")

  budgets = [int(b) for b in _BUDGETS.value]
  levels = [float(level) for level in _LEVELS.value]
  lines = []
  for difficulty, title in DIFFICULTIES:
    paper, other = curves[difficulty, "paper"], curves[difficulty, "uncertainty"]
    lines += [
        f"**{title}**, {paper['num_puzzles']} puzzles: valid rate [95% interval] (mean "
        "denoiser passes); budget 0 = SRM",
        "",
        "| budget | paper's IPR | uncertainty-guided |",
        "|---|---|---|",
    ]
    for b in budgets:
      lines.append(
          f"| {b} | {_cell(paper, b)} ({paper['passes'][b]:.0f}) | "
          f"{_cell(other, b)} ({other['passes'][b]:.0f}) |"
      )
    lines += [
        "",
        "At equal mean passes (budget reached within the level):",
        "",
        "| passes | " + " | ".join(label for _, _, label in SETTINGS) + " |",
        "|---|---|---|",
    ]
    for level in levels:
      cells = []
      for setting, _, _ in SETTINGS:
        c = curves[difficulty, setting]
        within = np.nonzero(c["passes"] <= level)[0]
        cells.append(f"{_cell(c, within[-1])} (b={within[-1]})" if len(within) else "")
      lines.append(f"| <= {level:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
  table = "\n".join(lines)
  with open(os.path.join(run, "tables.md"), "w") as f:
    f.write(table)
  with open(os.path.join(run, "tables.json"), "w") as f:
    json.dump(
        {
            f"{d}_{s}": {k: np.asarray(v).tolist() for k, v in c.items() if k != "index"}
            for (d, s), c in curves.items()
        },
        f,
        indent=1,
    )

  fig, axes = plt.subplots(1, len(DIFFICULTIES), figsize=(16, 4.8), sharey=True)
  for ax, (difficulty, title) in zip(axes, DIFFICULTIES):
    for setting, _, label in SETTINGS:
      c = curves[difficulty, setting]
      (line,) = ax.plot(c["passes"], 100 * c["rate"], marker=".", markersize=3, label=label)
      ax.fill_between(
          c["passes"], 100 * c["low"], 100 * c["high"], color=line.get_color(), alpha=0.15
      )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("mean denoiser passes per puzzle")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("valid rate (%), 95% Wilson band")
  axes[0].legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(os.path.join(run, "valid_rate_vs_passes.png"), dpi=110)
  print(table)


if __name__ == "__main__":
  app.run(main)
