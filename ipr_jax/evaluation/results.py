"""The end of an evaluation run: its shards merged into the per-budget and per-puzzle files and
the figures, written by process 0 (`write`).

    results.json, results.csv    the per-budget rows (`report.budget_table`) and the run's metadata
    puzzles.npz, puzzles.csv     the per-puzzle arrays (`store.merge_shards`) and the task's columns
    ipr_process.png              puzzles across the budgets, computed again with their samples
    valid_rate_vs_budget.png     the valid rate (and the task's metrics) at every budget

All of it is made again from the shards at every merge: nothing here changes a puzzle's result.
"""

import os
from typing import Any, Optional, Protocol

import jax
import ml_collections
import numpy as np

from ipr_jax.evaluation import report as eval_report
from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.evaluation import store as store_lib
from ipr_jax.runtime import agreement


class Run(Protocol):
  """What the merge reads of a run (`runner.Run`, which see)."""

  config: ml_collections.ConfigDict
  out_dir: str
  prefix: str
  evaluator: Any  # runner.Evaluator: the plotted puzzles computed again, the task
  source: str
  which: str
  batches: list[np.ndarray]
  settings: dict[str, Any]
  store: store_lib.ShardStore


def _results_metadata(
    run: Run, shards: list[dict[str, np.ndarray]], seconds: float
) -> dict[str, Any]:
  """What results.json records besides the rows: settings, parameters, code, environment (with
  the environments the merged shards were computed in), devices, the throughput of the batches
  computed by this run, and the task's metadata."""
  config = run.config
  new = [b for b in range(len(run.batches)) if b not in run.store.reused]
  new_puzzles = sum(len(run.batches[b]) for b in new)
  new_passes = float(sum(shards[b]["nfe"][:, -1].sum() for b in new))
  return {
      "task": config.task,
      "eval": config.eval.to_dict(),
      "sampler": config.sampler.to_dict(),
      "ipr": config.ipr.to_dict(),
      "checkpoint": run.source,
      "params": run.which,
      "params_sha256": run.settings["params_sha256"],
      "code": run.settings["code"],
      "environment": run.settings[eval_shards.ENVIRONMENT],
      "environment_sha256": run.store.environment,
      # Batches per environment digest: more than one entry = shards of several environments
      # merged (--allow_environment_change).
      "shard_environments": run.store.environment_counts(shards),
      "devices": [str(d) for d in jax.devices()],
      "throughput": {
          "puzzles": new_puzzles,
          "seconds": seconds,
          "puzzles_per_sec": new_puzzles / seconds if new_puzzles else None,
          "denoiser_passes_per_sec": new_passes / seconds if new_puzzles else None,
          "batches_reused": len(run.store.reused),
          "device_kind": jax.devices()[0].device_kind,
          "device_count": jax.device_count(),
          "process_count": jax.process_count(),
      },
      **run.evaluator.task.metadata,
  }


def _plot_process(run: Run, per_puzzle: dict[str, np.ndarray], path: str) -> list[int]:
  """ipr_process.png: `config.eval.num_plot_puzzles` puzzles across the IPR budgets, those IPR
  fixed first and one it did not (`eval_report.choose_plot_puzzles`), computed again (a puzzle's
  result depends only on the seed and its index) with every budget's sample: the iterate the
  table scores. Returns the indices of the puzzles shown."""
  chosen = eval_report.choose_plot_puzzles(per_puzzle["valid"], run.config.eval.num_plot_puzzles)
  if not len(chosen):
    return []
  indices = per_puzzle["index"][chosen]
  again = run.evaluator(indices, samples_per_device=None)
  valid = per_puzzle["valid"][chosen]
  if not np.array_equal(again.scores["valid"].T, valid):
    print(
        f"{run.prefix}note: the plotted puzzles {indices.tolist()}, computed again with their "
        "samples, differ from their shards in a valid flag (floating point of another "
        "program); the figure shows the recomputed samples.",
        flush=True,
    )
  eval_report.batch_result_figure(run.evaluator, again).savefig(path, dpi=100)
  return indices.tolist()


def _merge_and_write(run: Run, seconds: float) -> list[dict[str, Any]]:
  """Merges every shard (checked against the run's digests); process 0 writes results.{json,
  csv}, puzzles.{npz,csv} and the plots. Returns the per-budget rows."""
  shards = run.store.read()
  per_puzzle = run.store.merge(shards, run.config.eval.num_puzzles)
  score_names = [k.split(".", 1)[1] for k in shards[0] if k.startswith("score.")]
  rows = eval_report.budget_table({k: per_puzzle[k].T for k in score_names}, per_puzzle["nfe"].T)
  if jax.process_index() != 0:
    return rows

  config, out_dir, task = run.config, run.out_dir, run.evaluator.task
  metadata = _results_metadata(run, shards, seconds)
  metadata["plotted_puzzles"] = _plot_process(
      run, per_puzzle, os.path.join(out_dir, "ipr_process.png")
  )
  eval_report.write_results(out_dir, rows, metadata)
  per_puzzle.update(task.puzzle_columns(per_puzzle))
  eval_report.write_puzzle_results(out_dir, per_puzzle, task.csv_scores)
  eval_report.plot_valid_rate(
      os.path.join(out_dir, "valid_rate_vs_budget.png"),
      rows,
      f"{config.task} / {config.eval.name}",
      metrics=task.plot_metrics,
  )
  print(eval_report.format_table(rows))
  throughput = metadata["throughput"]
  if throughput["puzzles"]:
    print(
        f"{throughput['puzzles']} puzzles in {seconds:.0f}s: "
        f"{throughput['puzzles_per_sec']:.2f} puzzles/s, "
        f"{throughput['denoiser_passes_per_sec']:.0f} denoiser passes/s on "
        f"{jax.device_count()} {jax.devices()[0].device_kind} device(s), "
        f"{jax.process_count()} process(es)"
    )
  if len(metadata["shard_environments"]) > 1:
    print(
        f"note: the shards were computed in {len(metadata['shard_environments'])} "
        "environments (accepted with --allow_environment_change; results.json lists them)"
    )
  print(f"wrote {out_dir}/results.json, results.csv, puzzles.npz, puzzles.csv and plots")
  return rows


def write(run: Run, seconds: float) -> list[dict[str, Any]]:
  """`_merge_and_write`, its errors on any process agreed by all (every process reads the
  shards; a process that cannot, or process 0 failing to write, ends every process with the same
  error)."""
  error: Optional[Exception] = None
  rows: list[dict[str, Any]] = []  # (with an error, agree raises)
  try:
    rows = _merge_and_write(run, seconds)
  except Exception as e:  # pylint: disable=broad-except  (raised on every process by agree)
    error = e
  agreement.agree(error)
  return rows
