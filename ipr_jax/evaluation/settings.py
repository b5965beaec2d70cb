"""What an evaluation computes, from its config: the task, the sampler's options, the test puzzles
and their batches, the parameters, the key streams, and the settings run.json records.

A run's per-puzzle results are a function of these settings, its parameters and its code
(`shards.code_record`); `runner` computes them, `store` keeps them per batch.
"""

import dataclasses
from typing import Any, Optional

import ml_collections
import numpy as np

from ipr_jax import sampling
from ipr_jax import tasks
from ipr_jax.build import config_base
from ipr_jax.build import pretrained
from ipr_jax.data import geometry
from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import config_diff
from ipr_jax.runtime import environment
from ipr_jax.runtime import errors
from ipr_jax.tasks import base as tasks_base

# Key streams of an evaluation with seed s. Test puzzle i's content comes from fold_in(key(s), i)
# with i an int32 index (`SudokuTask.test_batch`), so i < 2**31; its initial noise and its
# sampling randomness come from fold_in(fold_in(key(s), tag), i) with the tags below, which no
# puzzle index equals: the three streams never share a key.
MAX_PUZZLES = 2**31
NOISE_STREAM = 2**31
SAMPLING_STREAM = 2**31 + 1


def task_evaluation(config: ml_collections.ConfigDict) -> tasks_base.Evaluation:
  """What the evaluation needs of `config.task` under `config` (its module's `Evaluation`).

  Raises:
    ValueError: an unknown task, or `config.ipr.selection='verifier'` for a task without a
      per-cell verifier.
  """
  task = tasks.get(config.task).Evaluation(config)
  if config.ipr.get("selection") == "verifier" and task.cell_verify_fn is None:
    raise errors.ConfigError(
        f"config.ipr.selection='verifier' needs a per-cell verifier, which only "
        f"{' and '.join(tasks.with_cell_verifier())} has; got task "
        f"{config.task!r}"
    )
  graph_sections = [
      name for name in ("sampler", "ipr") if config[name].get("schedule") == "graph_sequential"
  ]
  if graph_sections and task.dependency_matrix is None:
    raise errors.ConfigError(
        f"config.{graph_sections[0]}.schedule='graph_sequential' needs the task's dependency "
        f"graph; task {config.task!r} has none (use 'random_sequential')"
    )
  return task


def sampler_configs(
    config: ml_collections.ConfigDict,
) -> tuple[sampling.SamplerConfig, sampling.IPRConfig]:
  """The sampler's options of `config`: its sampler and ipr sections as the sampler takes them,
  and its top-level flow (`SamplerConfig.flow`; errors.ConfigError for an unknown one)."""
  config_base.noise_flow(config)
  return (
      sampling.SamplerConfig(**config.sampler.to_dict(), flow=config.get("flow", "rectified")),
      sampling.IPRConfig(**config.ipr.to_dict()),
  )


def unknown_counts(config: ml_collections.ConfigDict) -> list[int]:
  """The numbers of patches the SRM pass can have to generate under `config.eval` (the task's
  `unknown_counts`: Sudoku, every cell count minus a given count of `config.eval.given_range`;
  Even Pixels and Counting Polygons, all patches)."""
  return tasks.get(config.task).unknown_counts(config)


def check_schedules(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if the sampler or IPR schedule of `config` is degenerate for any patch
  count the evaluation can produce (see `sampling.check_schedules`)."""
  sampler_config, ipr_config = sampler_configs(config)
  grid_h, grid_w = geometry.patch_grid(config)
  try:
    sampling.check_schedules(sampler_config, ipr_config, grid_h * grid_w, unknown_counts(config))
  except ValueError as e:  # the sampler's check of a schedule: a setting to change
    raise errors.ConfigError(str(e)) from e


def check_sizes(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError unless `config.eval.num_puzzles` and `config.eval.batch_size` are
  positive numbers (batch_size='auto' resolved) and the puzzles fit the key streams."""
  num_puzzles, batch_size = config.eval.num_puzzles, config.eval.batch_size
  if isinstance(batch_size, str):
    raise errors.ConfigError(
        f"config.eval.batch_size={batch_size!r}: the evaluation binary resolves 'auto' to a "
        "number; in Python, resolve it first with fit.resolve_eval_batch_size(config, workdir)"
    )
  if num_puzzles < 1 or batch_size < 1:
    raise errors.ConfigError(
        f"config.eval.num_puzzles={num_puzzles} and config.eval.batch_size="
        f"{batch_size} must be positive"
    )
  if num_puzzles > MAX_PUZZLES:
    raise errors.ConfigError(f"config.eval.num_puzzles={num_puzzles} exceeds {MAX_PUZZLES}")


def puzzle_batches(config: ml_collections.ConfigDict, unknown: np.ndarray) -> list[np.ndarray]:
  """The evaluation's batches: `config.eval.num_puzzles` puzzle indices in groups of
  `config.eval.batch_size` (the last one may be smaller), each sorted.

  With `config.eval.sort_by_unknowns` (the default) the puzzles are grouped by the number of
  patches the SRM pass generates, fewest first (ties by index), since a batch's sampling loop runs
  until its longest schedule ends; otherwise in index order. A puzzle's result depends only on
  (config.eval.seed, its index), not on its batch. `unknown` [num_puzzles]: the puzzles'
  `unknown_patches` (of `task_evaluation`).
  """
  num_puzzles, batch_size = config.eval.num_puzzles, config.eval.batch_size
  indices = np.arange(num_puzzles)
  if config.eval.sort_by_unknowns:
    indices = indices[np.argsort(unknown, kind="stable")]
  return [np.sort(indices[s : s + batch_size]) for s in range(0, num_puzzles, batch_size)]


def load_params(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint_path: Optional[str] = None,
    allow_config_mismatch: bool = False,
) -> tuple[Any, str, str]:
  """The U-Net parameters to evaluate: (params, where they came from, 'ema' | 'live').

  `checkpoint_path` if given, else the shipped model `config.eval.pretrained` if set (its EMA
  weights, checked against their recorded digest; `config` must agree with it on the task, data
  and model sections), else the newest checkpoint in `workdir` (its digests checked, and its
  stored config compared with `config` on the fields that define the weights:
  `checkpoint.check_stored_config`, refused unless `allow_config_mismatch`).
  """
  if checkpoint_path is None and config.eval.pretrained:
    shipped = pretrained.load(config.eval.pretrained)
    pretrained.check_compatible(config, shipped)
    source = f"shipped model {shipped.name!r} ({pretrained.path_of(shipped.name)})"
    return shipped.params, source, "ema"
  which = "ema" if config.eval.use_ema else "live"
  source = checkpoint_path or workdir
  step_dir = checkpoint.find_step_dir(source)
  checkpoint.check_stored_config(step_dir, config, allow_config_mismatch)
  params = checkpoint.restore_params(step_dir, which=which)
  return params, str(step_dir), which


params_digest = checkpoint.params_digest  # what run.json records as params_sha256


def resolved_settings(
    config: ml_collections.ConfigDict, batches: Optional[list[np.ndarray]] = None
) -> dict[str, Any]:
  """What an evaluation's results depend on besides its parameters and code, every field
  resolved: the task; the data and model sections; the sampler and IPR options as the sampler
  resolves them (`SamplerConfig`, `IPRConfig`: every field, defaults included); the flow, as
  "flow" where it is not the rectified flow (runs of the rectified flow, the only one before,
  record none); the eval section (eval.name aside; eval.unique_solution resolved); and the
  batching (`eval_shards.batches_record` of `batches`, default: `puzzle_batches` of `config`).
  """
  if batches is None:
    task = task_evaluation(config)
    batches = puzzle_batches(
        config, task.unknown_patches(config.eval.seed, np.arange(config.eval.num_puzzles))
    )
  sampler_config, ipr_config = sampler_configs(config)
  eval_settings = config.eval.to_dict()
  eval_settings.pop("name", None)
  eval_settings["unique_solution"] = bool(config.eval.get("unique_solution", False))
  sampler_settings = dataclasses.asdict(sampler_config)
  flow_name = sampler_settings.pop("flow")
  settings = {
      "task": config.task,
      "data": config.data.to_dict(),
      "model": config_diff.model_record(config.model),
      "sampler": sampler_settings,
      "ipr": dataclasses.asdict(ipr_config),
      "eval": eval_settings,
      "batches": eval_shards.batches_record(batches),
  }
  if flow_name != "rectified":
    settings["flow"] = flow_name
  return settings


def run_settings(
    config: ml_collections.ConfigDict,
    params: Any,
    which: str,
    batches: Optional[list[np.ndarray]] = None,
) -> dict[str, Any]:
  """`resolved_settings` and the parameters ('ema' | 'live' and their `params_digest`): what
  run.json records besides the code; shards computed under other settings are refused
  (`eval_shards.check_settings`)."""
  return {
      **resolved_settings(config, batches),
      "params": which,
      "params_sha256": params_digest(params),
  }


def recorded_settings(
    config: ml_collections.ConfigDict, params: Any, which: str, batches: list[np.ndarray]
) -> dict[str, Any]:
  """Everything run.json records of a run: `run_settings`, the code that computes results
  (`eval_shards.code_record`) and the environment it runs in (`environment.record`)."""
  return {
      **run_settings(config, params, which, batches),
      "code": eval_shards.code_record(),
      eval_shards.ENVIRONMENT: environment.record(),
  }
