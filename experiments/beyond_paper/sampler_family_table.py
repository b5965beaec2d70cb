"""The SRM sampler family table of experiments/README.md, from the runs of
experiments/beyond_paper/run_sampler_family.sh
(experiments/results/sampler_family/<name>/eval/<name>/).

    python experiments/beyond_paper/sampler_family_table.py [RESULTS_DIR]

Per run: the SRM valid rate (budget 0) with its 95% interval and mean denoiser passes, the
paper's IPR at budget 10, and the valid rate at equal passes: at the largest budget whose mean
passes per puzzle stay within each of `PASS_BUDGETS`. Prints a markdown table and the model,
code and machine the runs record (refusing runs that disagree on any of them).
"""

import json
import pathlib
import sys

PASS_BUDGETS = (60, 120, 180)
_RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results" / "sampler_family"

# name -> (SRM pass, IPR regeneration), in the table's order.
RUNS = {
    "seq_adaptive000": ("adaptive (the paper's)", "adaptive"),
    "adaptive_top2": ("adaptive, top_k 2", "adaptive"),
    "adaptive_top4": ("adaptive, top_k 4", "adaptive"),
    "fixed": ("fixed", "adaptive"),
    "random_seq000": ("random_sequential", "adaptive"),
    "graph_seq000": ("graph_sequential", "adaptive"),
    "seq_adaptive075": ("adaptive, overlap 0.75", "adaptive"),
    "random_seq075": ("random_sequential, overlap 0.75", "adaptive"),
    "graph_seq075": ("graph_sequential, overlap 0.75", "adaptive"),
    "ipr_fixed": ("adaptive", "fixed"),
    "ipr_random_seq": ("adaptive", "random_sequential"),
    "ipr_graph_seq": ("adaptive", "graph_sequential"),
    "ipr_top2": ("adaptive", "adaptive, top_k 2"),
}


def _rate(row) -> str:
  return (
      f"{100 * row['valid_rate']:.1f}% [{100 * row['valid_ci_low']:.1f}, "
      f"{100 * row['valid_ci_high']:.1f}]"
  )


def _within(budgets, passes):
  """The row of the largest budget whose mean passes are <= `passes` (None if none)."""
  rows = [row for row in budgets if row["mean_nfe"] <= passes + 1e-9]
  return rows[-1] if rows else None


def table(results_dir: pathlib.Path) -> str:
  lines = [
      "| SRM pass | IPR regeneration | SRM valid | SRM passes | IPR b=10 valid | passes "
      "b=10 | " + " | ".join(f"within {p} passes" for p in PASS_BUDGETS) + " |",
      "|---" * (6 + len(PASS_BUDGETS)) + "|",
  ]
  provenance = {}
  for name, (srm, regen) in RUNS.items():
    path = results_dir / name / "eval" / name / "results.json"
    if not path.is_file():
      lines.append(f"| {srm} | {regen} | (not run) |" + " |" * (3 + len(PASS_BUDGETS)))
      continue
    saved = json.loads(path.read_text())
    meta, budgets = saved["metadata"], saved["budgets"]
    record = {
        "model": meta["params_sha256"],
        "code": meta["code"]["sha256"],
        "machine": (
            meta["environment"]["cpu"],
            meta["environment"]["backend"],
            meta["environment"]["device_count"],
        ),
    }
    for key, value in record.items():
      if provenance.setdefault(key, value) != value:
        raise SystemExit(
            f"{name}: another {key} than the other runs: {value} vs " f"{provenance[key]}"
        )
    first, last = budgets[0], budgets[-1]
    equal = []
    for passes in PASS_BUDGETS:
      row = _within(budgets, passes)
      equal.append("-" if row is None else f"{_rate(row)} (b={row['budget']})")
    lines.append(
        f"| {srm} | {regen} | {_rate(first)} | {first['mean_nfe']:.1f} | "
        f"{_rate(last)} | {last['mean_nfe']:.1f} | " + " | ".join(equal) + " |"
    )
  lines.append("")
  lines.append(
      f"Model (params sha256) {provenance.get('model')}; code record sha256 "
      f"{provenance.get('code')}; machine {provenance.get('machine')}."
  )
  return "\n".join(lines)


def main(argv):
  print(table(pathlib.Path(argv[0]) if argv else _RESULTS))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
