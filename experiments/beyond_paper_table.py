"""The tables and the plot of issue 32 (verifier-free refinement beyond the paper) in
experiments/README.md, from the runs of experiments/run_beyond_paper.sh.

    python experiments/beyond_paper_table.py pilot    # seed 36: every setting tried
    python experiments/beyond_paper_table.py final    # seed 35: the chosen setting, once

Per run the valid rate [95% interval] at equal mean denoiser passes per puzzle: at the largest
budget whose mean passes stay within each level of `PASS_LEVELS` (every pass counted: the SRM
pass, the regenerations and the queries of every chain). The paper's IPR on seed 35 is the
committed 1,000-puzzle table of each split (hard: the CPU rerun with committed code; medium and
unique: the H200 runs, see experiments/README.md), or the `paper` run of the same folder where
one exists. Prints markdown and the model, code and machine every run records; `final` also
writes valid_rate_vs_passes.png next to the runs.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sampler_family_table import _rate, _within  # noqa: E402  pylint: disable=wrong-import-position

PASS_LEVELS = (150, 300, 450, 600)
_HERE = pathlib.Path(__file__).resolve().parent
_RESULTS = _HERE / "results" / "beyond_paper"
SPLITS = ("hard", "medium", "unique")
# The committed tables of the paper's IPR on 1,000 puzzles of seed 35 (budgets 0..30).
COMMITTED_PAPER = {
    "hard": _HERE / "results/demo_20494_cpu/eval/ms_hard_test_paper/results.json",
    "medium": _HERE / "results/demo_20494/eval/ms_medium_test_paper/results.json",
    "unique": _HERE / "results/demo_20494/eval/ms_unique_test_paper/results.json",
}


def _cell(budgets, passes) -> str:
  row = _within(budgets, passes)
  if row is None:
    return "-"
  return f"{_rate(row)} (b={row['budget']}, {row['mean_nfe']:.0f})"


def _provenance(meta) -> dict:
  code = meta.get("code") or {}
  env = meta.get("environment") or {}
  return {
      "model": meta["params_sha256"][:12],
      "code": (code.get("sha256") or "null")[:12],
      "machine": (
          f"{env.get('cpu', '?')}, {env.get('backend', '?')} x{env.get('device_count', '?')}"
      ),
  }


def _setting(meta) -> str:
  ipr = meta["ipr"]
  parts = [f"budget {ipr['budget']}"]
  if ipr.get("chains", 1) > 1:
    parts.append(f"chains {ipr['chains']}, query_cells {ipr['query_cells']}")
  if ipr["selection"] != "random":
    parts.append(f"selection {ipr['selection']}")
  if ipr["return_iterate"] != "last":
    parts.append(f"return {ipr['return_iterate']}")
  return ", ".join(parts)


def runs(seed_dir: pathlib.Path) -> dict:
  """{(split, name): results.json content} of the runs under `seed_dir`/<name>/eval/<split>/."""
  found = {}
  for path in sorted(seed_dir.glob("*/eval/*/results.json")):
    found[(path.parent.name, path.parents[2].name)] = json.loads(path.read_text())
  return found


def table(seed_dir: pathlib.Path, with_committed: bool) -> str:
  found = runs(seed_dir)
  if with_committed:
    for split, path in COMMITTED_PAPER.items():
      if (split, "paper") not in found and path.is_file():
        found[(split, "paper (committed table)")] = json.loads(path.read_text())
  lines = [
      "| split | run | setting | "
      + " | ".join(f"within {p} passes" for p in PASS_LEVELS)
      + " | model | code | machine |",
      "|---" * (6 + len(PASS_LEVELS)) + "|",
  ]
  for split in SPLITS:
    for (s, name), saved in sorted(found.items()):
      if s != split:
        continue
      meta, budgets = saved["metadata"], saved["budgets"]
      prov = _provenance(meta)
      lines.append(
          f"| {split} | {name} | {_setting(meta)} | "
          + " | ".join(_cell(budgets, p) for p in PASS_LEVELS)
          + f" | {prov['model']} | {prov['code']} | {prov['machine']} |"
      )
  return "\n".join(lines)


def plot(seed_dir: pathlib.Path, path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  found = runs(seed_dir)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
  for ax, split in zip(axes, SPLITS):
    curves = {name: saved for (s, name), saved in found.items() if s == split}
    if "paper" not in curves and COMMITTED_PAPER[split].is_file():
      curves["paper's IPR (committed table)"] = json.loads(COMMITTED_PAPER[split].read_text())
    for name, saved in sorted(curves.items()):
      budgets = saved["budgets"]
      x = [row["mean_nfe"] for row in budgets]
      colour = "C1" if name.startswith("paper") else "C0"
      label = name if name.startswith("paper") else f"{name}: {_setting(saved['metadata'])}"
      ax.plot(x, [100 * row["valid_rate"] for row in budgets], ".-", color=colour, label=label)
      ax.fill_between(
          x,
          [100 * row["valid_ci_low"] for row in budgets],
          [100 * row["valid_ci_high"] for row in budgets],
          color=colour,
          alpha=0.15,
      )
    ax.set_title(f"{split}, 1,000 puzzles of eval seed 35")
    ax.set_xlabel("mean denoiser passes per puzzle")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("valid rate (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  which = argv[0] if argv else "final"
  if which not in ("pilot", "final"):
    raise SystemExit(f"usage: beyond_paper_table.py pilot|final, got {which!r}")
  seed_dir = _RESULTS / ("seed36" if which == "pilot" else "seed35")
  print(table(seed_dir, with_committed=which == "final"))
  if which == "final":
    plot(seed_dir, seed_dir / "valid_rate_vs_passes.png")
    print(f"wrote {seed_dir / 'valid_rate_vs_passes.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
