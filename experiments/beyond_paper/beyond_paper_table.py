"""The tables and the plot of issue 32 (verifier-free refinement beyond the paper) in
experiments/README.md, from the runs of experiments/beyond_paper/run_beyond_paper.sh.

    python experiments/beyond_paper/beyond_paper_table.py pilot  # seed 36: every setting tried
    python experiments/beyond_paper/beyond_paper_table.py final  # seed 35: the chosen one, once

Per run the valid rate [95% interval] at equal mean denoiser passes per puzzle: at the largest
budget whose mean passes stay within each level of `PASS_LEVELS` (every pass counted: the SRM
pass, the regenerations and the queries of every chain). The paper's IPR is a run of the same
folder (`paper_b30` on seed 35: `run_beyond_paper.sh baselines`, the same machine and code as the
chains); `final` refuses to make a table without it, or whose runs were made by other code or
another environment. Prints markdown and the model, code and machine every run records; `final`
also writes valid_rate_vs_passes.png next to the runs.
"""

import hashlib
import json
import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sampler_family_table import _rate, _within  # noqa: E402  pylint: disable=wrong-import-position

PASS_LEVELS = (150, 300, 450, 600)
_HERE = pathlib.Path(__file__).resolve().parent
_RESULTS = _HERE.parent / "results" / "beyond_paper"
SPLITS = ("hard", "medium", "unique")
FINAL_RUNS = ("chains3_b6_bal", "paper_b30")  # the chosen setting and the paper's IPR, seed 35


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


def check_like_for_like(found: dict, required=FINAL_RUNS, splits=SPLITS) -> None:
  """Raises SystemExit unless every split of `splits` has every run of `required`, all made by
  one code record in one environment (machine, packages, devices) with one model."""
  missing = [
      f"{split}/{name}" for split in splits for name in required if (split, name) not in found
  ]
  if missing:
    raise SystemExit(f"missing runs: {', '.join(missing)} (their run script's final stages)")
  if not found:
    raise SystemExit("no runs found")
  records: dict = {}
  for key, saved in found.items():
    meta = saved["metadata"]
    env = meta.get("environment") or {}
    record = (
        (meta.get("code") or {}).get("sha256"),
        json.dumps(env, sort_keys=True),
        meta["params_sha256"],
    )
    records.setdefault(record, []).append("/".join(key))
  (code, _, _), *others = records
  if others or code is None:
    groups = "; ".join(
        f"{', '.join(runs_)}: code {str(k[0])[:12]}, cpu {json.loads(k[1]).get('cpu')!r}, "
        f"environment {hashlib.sha256(k[1].encode()).hexdigest()[:12]}, model {k[2][:12]}"
        for k, runs_ in records.items()
    )
    raise SystemExit(f"not one recorded code, environment and model: {groups}")


def table(seed_dir: pathlib.Path) -> str:
  found = runs(seed_dir)
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


def sign_test(wins: int, losses: int) -> float:
  """Two-sided exact sign test of `wins` against `losses` discordant pairs (ties dropped)."""
  n = wins + losses
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
  return min(1.0, 2 * tail)


def paired(seed_dir: pathlib.Path, runs=FINAL_RUNS) -> str:
  """Per split, the final budget of `runs[0]` against that of `runs[1]` on the same puzzles: how
  many puzzles only one of them solves, and the sign test's p."""
  lines = []
  for split in SPLITS:
    valid = []
    for name in runs:
      with np.load(seed_dir / name / "eval" / split / "puzzles.npz") as f:
        order = np.argsort(f["index"])
        valid.append(f["valid"][order, -1].astype(bool))
    wins, losses = int(np.sum(valid[0] & ~valid[1])), int(np.sum(~valid[0] & valid[1]))
    lines.append(
        f"{split}: {runs[0]} only {wins}, {runs[1]} only {losses}, "
        f"p = {sign_test(wins, losses):.2g}"
    )
  return "\n".join(lines)


def plot_splits(path: pathlib.Path, draw) -> None:
  """One panel per split of `SPLITS`, valid rate against mean passes, saved to `path`; `draw(ax,
  split)` draws a split's curves."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
  for ax, split in zip(axes, SPLITS):
    draw(ax, split)
    ax.set_title(f"{split}, 1,000 puzzles of eval seed 35")
    ax.set_xlabel("mean denoiser passes per puzzle")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("valid rate (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot(seed_dir: pathlib.Path, path: pathlib.Path) -> None:
  found = runs(seed_dir)

  def draw(ax, split):
    curves = {name: saved for (s, name), saved in found.items() if s == split}
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

  plot_splits(path, draw)


def main(argv):
  which = argv[0] if argv else "final"
  if which not in ("pilot", "final"):
    raise SystemExit(f"usage: beyond_paper_table.py pilot|final, got {which!r}")
  seed_dir = _RESULTS / ("seed36" if which == "pilot" else "seed35")
  if which == "final":
    check_like_for_like(runs(seed_dir))
  print(table(seed_dir))
  if which == "final":
    print(paired(seed_dir))
    plot(seed_dir, seed_dir / "valid_rate_vs_passes.png")
    print(f"wrote {seed_dir / 'valid_rate_vs_passes.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
