"""Per-budget evaluation results: aggregation, confidence intervals, files and plots.

The sampler returns, for every puzzle and every IPR budget b = 0..B, a dict of per-puzzle scores
(b = 0 is the plain SRM sample). This module turns those arrays into the table a researcher reads:
one row per budget with the valid rate, its 95% Wilson interval and the mean of every other score,
written as `results.json` and `results.csv`, plus the two plots of the evaluation binary.
"""

import csv
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

# Two-sided 95% normal quantile.
_Z95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = _Z95) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion.

  Args:
    successes: number of successes.
    total: number of trials; 0 gives the uninformative interval (0, 1).
    z: normal quantile (1.96 for 95%).

  Returns:
    (low, high), both in [0, 1].
  """
  if total < 0 or successes < 0 or successes > total:
    raise ValueError(f"need 0 <= successes <= total, got successes={successes}, total={total}")
  if total == 0:
    return 0.0, 1.0
  p = successes / total
  denom = 1.0 + z * z / total
  centre = (p + z * z / (2 * total)) / denom
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


def budget_table(
    scores: Mapping[str, np.ndarray], nfe: Optional[np.ndarray] = None
) -> list[dict[str, Any]]:
  """Aggregates per-puzzle scores into one row per budget.

  Args:
    scores: name -> array [num_budgets, num_puzzles]. Must contain 'valid' (bool or 0/1); every
      other entry is averaged over puzzles as `mean_<name>`.
    nfe: optional [num_budgets, num_puzzles] cumulative denoiser passes spent up to each budget.

  Returns:
    A list of rows (dicts) with keys budget, num_puzzles, valid_rate, valid_ci_low,
    valid_ci_high, mean_<name>..., and mean_nfe when `nfe` is given.
  """
  if "valid" not in scores:
    raise ValueError(f"scores need a 'valid' entry, got keys {sorted(scores)}")
  valid = np.asarray(scores["valid"])
  if valid.ndim != 2:
    raise ValueError(f"scores['valid'] must be [num_budgets, num_puzzles], got shape {valid.shape}")
  num_budgets, num_puzzles = valid.shape
  for name, value in scores.items():
    if np.shape(value) != valid.shape:
      raise ValueError(f"scores[{name!r}] has shape {np.shape(value)}, expected {valid.shape}")
  rows = []
  for b in range(num_budgets):
    count = int(np.sum(valid[b].astype(bool)))
    low, high = wilson_interval(count, num_puzzles)
    row = {
        "budget": b,
        "num_puzzles": num_puzzles,
        "valid_rate": count / num_puzzles if num_puzzles else float("nan"),
        "valid_ci_low": low,
        "valid_ci_high": high,
    }
    for name in sorted(scores):
      if name != "valid":
        row[f"mean_{name}"] = float(np.mean(np.asarray(scores[name][b], np.float64)))
    if nfe is not None:
      row["mean_nfe"] = float(np.mean(np.asarray(nfe[b], np.float64)))
    rows.append(row)
  return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Renders budget rows as a fixed-width text table for the terminal."""
  if not rows:
    return "(no rows)"
  columns = list(rows[0].keys())
  cells = [[_format_cell(row[c]) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
  return "\n".join(lines)


def _format_cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def json_safe(value: Any) -> Any:
  """`value` as strict JSON can hold it: NaN and infinities become None (null), numpy scalars
  and arrays plain numbers and lists, tuples lists. (A NaN arises where a score is undefined,
  e.g. the model's uncertainty about the last iterate with return_iterate='last', which is never
  measured.)"""
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return json_safe(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_results(
    out_dir: str, rows: Sequence[Mapping[str, Any]], metadata: Mapping[str, Any]
) -> None:
  """Writes `results.json` (metadata + rows; strict JSON: an undefined value, NaN, is null) and
  `results.csv` (rows) into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(
        json_safe({"metadata": dict(metadata), "budgets": list(rows)}), f, indent=2, allow_nan=False
    )
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)


PUZZLES_NPZ, PUZZLES_CSV = "puzzles.npz", "puzzles.csv"


def write_puzzle_results(
    out_dir: str, per_puzzle: Mapping[str, np.ndarray], csv_scores: Sequence[str]
) -> None:
  """Writes the per-puzzle records: every array of `per_puzzle` to puzzles.npz, and a CSV with
  one row per puzzle: index, unknown_patches, num_given (if present), `<score>_b<b>` for every
  score of `csv_scores` and budget b, `nfe_b<b>`, and for Sudoku `digit_grid` (the final
  classified digits, row-major, as one string).

  Args:
    out_dir: directory to write into.
    per_puzzle: name -> array with the puzzle axis first; per-budget arrays are [P, budget + 1].
    csv_scores: the per-budget scores that get CSV columns (the rest stay in the npz).
  """
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, PUZZLES_NPZ + ".tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **per_puzzle)  # type: ignore[arg-type]  # numpy's stub
  os.replace(tmp, os.path.join(out_dir, PUZZLES_NPZ))

  columns: dict[str, list[str]] = {}
  for name in ("index", "unknown_patches", "num_given"):
    if name in per_puzzle:
      columns[name] = [str(int(v)) for v in per_puzzle[name]]
  for name in (*csv_scores, "nfe"):
    values = np.asarray(per_puzzle[name])
    for b in range(values.shape[1]):
      column = values[:, b]
      columns[f"{name}_b{b}"] = (
          [str(int(v)) for v in column]
          if column.dtype.kind in "biu"
          else [repr(float(v)) for v in column]
      )
  if "digit_grid" in per_puzzle:
    columns["digit_grid"] = ["".join(map(str, g.reshape(-1))) for g in per_puzzle["digit_grid"]]
  with open(os.path.join(out_dir, PUZZLES_CSV), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    writer.writerows(zip(*columns.values()))


def valid_rate_figure(rows: Sequence[Mapping[str, Any]], title: str, metrics: Sequence[str] = ()):
  """Valid rate against IPR budget with its 95% band; b = 0 (plain SRM) is marked.

  `metrics` names further per-image scores whose means (`mean_<name>` in the rows) are drawn as
  dashed curves on the same axes. Returns a matplotlib Figure (no pyplot, no backend change:
  save it with `fig.savefig`, or let a notebook display it).
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  budgets = [r["budget"] for r in rows]
  rate = [r["valid_rate"] for r in rows]
  fig = Figure(figsize=(5.5, 3.8))
  ax = fig.add_subplot()
  ax.fill_between(
      budgets,
      [r["valid_ci_low"] for r in rows],
      [r["valid_ci_high"] for r in rows],
      alpha=0.25,
      label="95% interval",
  )
  ax.plot(budgets, rate, marker="o", ms=3, label="SRM + IPR")
  for name in metrics:
    if f"mean_{name}" not in rows[0]:
      raise ValueError(f"metric {name!r} is not in the rows (keys {sorted(rows[0])})")
    ax.plot(
        budgets, [r[f"mean_{name}"] for r in rows], linestyle="--", marker=".", ms=3, label=name
    )
  ax.scatter([budgets[0]], [rate[0]], color="k", zorder=3, label="SRM (b = 0)")
  ax.set_xlabel("IPR budget (iterations)")
  ax.set_ylabel("valid rate" if not metrics else "rate")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  return fig


def plot_valid_rate(
    path: str, rows: Sequence[Mapping[str, Any]], title: str, metrics: Sequence[str] = ()
) -> None:
  """Writes `valid_rate_figure(rows, title, metrics)` as a PNG to `path`."""
  valid_rate_figure(rows, title, metrics).savefig(path, dpi=120)


def _show_image(ax, image: np.ndarray) -> None:
  """Draws an [H, W, C] image in [-1, 1] without ticks."""
  image = np.clip((np.asarray(image) + 1) / 2, 0, 1)
  ax.imshow(
      image[..., 0] if image.shape[-1] == 1 else image,
      cmap="gray",
      vmin=0,
      vmax=1,
      interpolation="nearest",
  )
  ax.set_xticks([])
  ax.set_yticks([])


def choose_plot_puzzles(valid: np.ndarray, count: int) -> np.ndarray:
  """Which puzzles show what IPR does: up to `count` row numbers of `valid` ([P, budgets] bool),
  first the puzzles IPR fixed (invalid after SRM, valid after the last budget), keeping the last
  place (of at least two) for one that stays invalid, then the others (valid throughout, then
  made invalid by IPR); each group in index order."""
  valid = np.asarray(valid, bool)
  if valid.ndim != 2:
    raise ValueError(f"valid must be [P, budgets], got shape {valid.shape}")
  if count < 1:
    return np.zeros([0], np.int64)
  first, last = valid[:, 0], valid[:, -1]
  fixed = np.flatnonzero(~first & last)
  broken = np.flatnonzero(~first & ~last)
  shows_broken = len(broken) > 0 and count > 1
  chosen = list(fixed[: count - shows_broken]) + list(broken[: int(shows_broken)])
  rest = [
      i
      for group in (np.flatnonzero(first & last), np.flatnonzero(first & ~last), fixed, broken)
      for i in group
      if i not in chosen
  ]
  return np.asarray(sorted(chosen + rest[: count - len(chosen)]), np.int64)


def outcome_label(valid: Sequence[bool]) -> str:
  """What IPR did to a puzzle, from its valid flags after budgets 0..B ([B + 1] bool): 'fixed by
  IPR' (invalid after SRM, valid at the end), 'stays invalid', 'stays valid' or 'broken by IPR'
  (valid after SRM, invalid at the end)."""
  flags = np.asarray(valid, bool).reshape(-1)
  return {
      (False, True): "fixed by IPR",
      (False, False): "stays invalid",
      (True, True): "stays valid",
      (True, False): "broken by IPR",
  }[(bool(flags[0]), bool(flags[-1]))]


def _iterations(budgets: Sequence[int]) -> str:
  """'3' or '1-3' for consecutive iterations (an en dash)."""
  return str(budgets[0]) if len(budgets) == 1 else f"{budgets[0]}\u2013{budgets[-1]}"


def _column_title(budget: int, previous: int) -> str:
  """A column's title: which iteration it shows, and the iterations before it not shown."""
  title = "SRM sample\n(before IPR)" if budget == 0 else f"IPR iteration {budget}"
  skipped = list(range(previous + 1, budget))
  if skipped:
    title += f"\n(iteration{'s' if len(skipped) > 1 else ''} {_iterations(skipped)} not shown)"
  return title


def _columns_note(budgets_to_show: Sequence[int], num_budgets: int) -> str:
  """The figure's first line: which iterations the columns are, and that the others are skipped."""
  last = num_budgets - 1
  ipr = [b for b in budgets_to_show if b > 0]
  parts = ["the SRM sample"] if 0 in budgets_to_show else []
  if len(ipr) == last and last > 0:
    parts.append(f"every IPR iteration {_iterations(list(range(1, num_budgets)))}")
  elif ipr:
    parts.append(
        f"IPR iteration{'s' if len(ipr) > 1 else ''} {', '.join(map(str, ipr))} of "
        f"{_iterations(list(range(1, num_budgets)))} (the other {last - len(ipr)} not shown)"
    )
  elif last > 0:
    parts.append(f"no IPR iteration (of {_iterations(list(range(1, num_budgets)))})")
  return "Columns: " + " and ".join(parts)


# Colours of the IPR process figure.
_BROKEN, _BOX, _CELL_LINE, _UNKNOWN = "red", "#2f8fe8", "0.32", "0.5"
_VALID_TEXT, _INVALID_TEXT = "#17803a", "#c81e1e"


def _draw_grid(ax, shape: Sequence[int], cell_size: int, box_size: int) -> None:
  """Thin cell lines and thick box lines (every `box_size` cells) over an image of `shape`."""
  for lines, draw in ((shape[1] // cell_size, ax.axvline), (shape[0] // cell_size, ax.axhline)):
    for k in range(1, lines):
      on_box = k % box_size == 0
      draw(
          k * cell_size - 0.5,
          color=_BOX if on_box else _CELL_LINE,
          linewidth=1.6 if on_box else 0.5,
          zorder=2 if on_box else 1,
      )


def _given_cells(puzzle: np.ndarray, cell_size: int) -> np.ndarray:
  """[gh, gw] bool: the cells of a puzzle image (cells to generate exactly 0) that are given."""
  gh, gw = puzzle.shape[0] // cell_size, puzzle.shape[1] // cell_size
  cells = np.asarray(puzzle)[: gh * cell_size, : gw * cell_size].reshape(
      gh, cell_size, gw, cell_size, -1
  )
  return np.any(cells != 0, axis=(1, 3, 4))


def ipr_process_figure(
    snapshots: np.ndarray,
    invalid_cells: Optional[np.ndarray],
    cell_size: int,
    budgets_to_show: Optional[Sequence[int]] = None,
    puzzles: Optional[np.ndarray] = None,
    labels: Optional[Sequence[str]] = None,
    *,
    indices: Optional[Sequence[int] | np.ndarray] = None,
    valid: Optional[np.ndarray] = None,
    box_size: Optional[int] = None,
):
  """A few puzzles (rows) across IPR iterations (columns), cells that break a rule outlined in
  red, with a legend, column titles naming each column's iteration (and the iterations not
  shown), and row labels (puzzle index and what IPR did to it).

  `batch_result_figure` draws it from an `Evaluator` and its result with all of these filled in.

  Args:
    snapshots: [P, num_budgets, H, W, C] samples in [-1, 1] after budgets 0..num_budgets - 1.
    invalid_cells: optional [P, num_budgets, gh, gw] bool, True where a cell breaks a rule.
    cell_size: pixel size of one cell (or patch) for the outlines.
    budgets_to_show: which budgets to draw (default: up to 8 evenly spaced, first and last kept);
      the column titles and the first line of the figure say which iterations are not shown.
    puzzles: optional [P, H, W, C] inputs in [-1, 1] (given cells, the cells to generate exactly
      0, mid-grey: `Evaluator.puzzle_images`), drawn as a first column with the number of given
      cells ("no given cell" written on a puzzle without one).
    labels: optional P row labels (default: from `indices` and `valid`).
    indices: optional P puzzle indices, for the row labels ("puzzle 14").
    valid: optional [P, num_budgets] bool: whether each sample is valid; every panel then says
      "valid" or "invalid", and the row labels what IPR did ("fixed by IPR", `outcome_label`).
    box_size: optional Sudoku box side in cells (2 for 4x4, 3 for 9x9): draws the cell and box
      lines.

  Returns:
    A matplotlib Figure (no pyplot, no backend change).
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Rectangle  # pylint: disable=g-import-not-at-top

  snapshots = np.asarray(snapshots)
  if snapshots.ndim != 5:
    raise ValueError(f"snapshots must be [P, budgets, H, W, C], got shape {snapshots.shape}")
  num_puzzles, num_budgets = snapshots.shape[:2]
  if puzzles is not None and np.shape(puzzles) != (num_puzzles, *snapshots.shape[2:]):
    raise ValueError(
        f"puzzles must be [P, H, W, C] = {(num_puzzles, *snapshots.shape[2:])}, "
        f"got shape {np.shape(puzzles)}"
    )
  if valid is not None:
    valid = np.asarray(valid, bool)
    if valid.shape != (num_puzzles, num_budgets):
      raise ValueError(
          f"valid must be [P, budgets] = {(num_puzzles, num_budgets)} like the snapshots, got "
          f"shape {valid.shape} (a BatchResult's scores['valid'] is [budgets, P]: transpose it)"
      )
  if indices is not None and len(indices) != num_puzzles:
    raise ValueError(f"indices must name the {num_puzzles} puzzles, got {len(indices)}")
  if budgets_to_show is None:
    budgets_to_show = sorted(set(np.linspace(0, num_budgets - 1, min(8, num_budgets)).astype(int)))
  budgets_to_show = [int(b) for b in budgets_to_show]
  if any(not 0 <= b < num_budgets for b in budgets_to_show):
    raise ValueError(f"budgets_to_show {budgets_to_show} must be in 0..{num_budgets - 1}")
  if labels is None and (indices is not None or valid is not None):
    labels = [
        "\n".join(
            ([f"puzzle {int(indices[p])}"] if indices is not None else [])
            + ([outcome_label(valid[p])] if valid is not None else [])
        )
        for p in range(num_puzzles)
    ]
  if labels is not None and len(labels) != num_puzzles:
    raise ValueError(f"labels must name the {num_puzzles} puzzles, got {len(labels)}")
  first = 0 if puzzles is None else 1
  num_columns = first + len(budgets_to_show)
  fig = Figure(
      figsize=(max(1.7 * num_columns + 0.4, 6.0), 1.75 * num_puzzles + 1.3), layout="constrained"
  )
  axes = fig.subplots(num_puzzles, num_columns, squeeze=False)
  grid = (lambda ax: _draw_grid(ax, snapshots.shape[2:], cell_size, box_size)) if box_size else None
  for p in range(num_puzzles):
    if labels is not None:
      axes[p, 0].set_ylabel(labels[p], fontsize=8)
    if puzzles is not None:
      ax = axes[p, 0]
      _show_image(ax, puzzles[p])
      given = _given_cells(puzzles[p], cell_size)
      ax.set_xlabel(f"{int(given.sum())} of {given.size} cells given", fontsize=7)
      if not given.any():
        ax.text(
            0.5, 0.5, "no given cell", transform=ax.transAxes, ha="center", va="center",
            fontsize=8, color="white", zorder=4,
            bbox={"facecolor": "0.2", "edgecolor": "none", "boxstyle": "round,pad=0.3"},
        )  # fmt: skip
      if grid:
        grid(ax)
      if p == 0:
        ax.set_title("puzzle\n(its given cells)", fontsize=8)
    previous = -1
    for j, b in enumerate(budgets_to_show):
      ax = axes[p, first + j]
      _show_image(ax, snapshots[p, b])
      if grid:
        grid(ax)
      if invalid_cells is not None:
        # Inset by half a pixel: the outline stays inside its cell (not clipped at the image's
        # edge, and two broken neighbours keep two outlines).
        for r, c in zip(*np.nonzero(invalid_cells[p, b])):
          ax.add_patch(
              Rectangle(
                  (c * cell_size, r * cell_size),
                  cell_size - 1,
                  cell_size - 1,
                  fill=False,
                  edgecolor=_BROKEN,
                  linewidth=1.3,
                  zorder=3,
              )
          )
      if valid is not None:
        ok = bool(valid[p, b])
        ax.set_xlabel(
            "valid" if ok else "invalid", fontsize=7, color=_VALID_TEXT if ok else _INVALID_TEXT
        )
      if p == 0:
        ax.set_title(_column_title(b, previous), fontsize=8)
      previous = b
  fig.suptitle(_columns_note(budgets_to_show, num_budgets), fontsize=9)
  handles: list[Any] = []
  if puzzles is not None:
    handles.append(
        Patch(
            facecolor=_UNKNOWN,
            edgecolor="0.2",
            label="grey (puzzle column): a cell the puzzle does not give; the model generates it",
        )
    )
  if invalid_cells is not None:
    handles.append(
        Patch(
            fill=False,
            edgecolor=_BROKEN,
            linewidth=1.3,
            label="red outline: a cell that breaks a rule (Sudoku: its digit repeats in its row, "
            "column or box)",
        )
    )
  if box_size:
    handles.append(
        Line2D(
            [], [], color=_BOX, linewidth=1.6,
            label=f"blue line: Sudoku box ({box_size} x {box_size} cells)",
        )  # fmt: skip
    )
  if handles:
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False)
  return fig


def batch_result_figure(
    evaluator, result, rows=None, budgets_to_show: Optional[Sequence[int]] = None
):
  """`ipr_process_figure` of an `Evaluator`'s result, everything filled in: the puzzles whose
  samples `result` holds (the evaluator called with samples_per_device=None, or > 0), or the rows
  `rows` of them (a slice or row numbers), with their given cells, broken cells, Sudoku boxes,
  puzzle indices and what IPR did to each.

  E.g. `batch_result_figure(evaluator, evaluator(np.arange(8), samples_per_device=None))`.
  """
  if result.samples is None:
    raise ValueError(
        "the result holds no samples: call the evaluator with samples_per_device=None (every "
        "puzzle's) or > 0"
    )
  samples, indices = np.asarray(result.samples), np.asarray(result.sample_indices)
  if rows is not None:
    samples, indices = samples[rows], indices[rows]
  row_of = {int(i): p for p, i in enumerate(result.indices)}
  valid = np.asarray(result.scores["valid"]).T[[row_of[int(i)] for i in indices]]
  task = evaluator.task
  return ipr_process_figure(
      samples,
      evaluator.invalid_cells(samples),
      task.cell_size,
      budgets_to_show,
      puzzles=evaluator.puzzle_images(indices),
      indices=indices,
      valid=valid,
      box_size=getattr(task, "box_size", None),
  )


def plot_ipr_process(path: str, *args, **kwargs) -> None:
  """Writes `ipr_process_figure(*args, **kwargs)` as a PNG to `path`."""
  ipr_process_figure(*args, **kwargs).savefig(path, dpi=100)
