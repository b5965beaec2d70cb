"""The evaluation as a library: SRM + IPR on test puzzles, the valid rate at every IPR budget.

`Evaluator(config, params)(indices)` runs SRM + IPR on any puzzle indices and returns their
per-puzzle scores, passes and (optionally) samples; `evaluate(config, workdir)` is the whole run
of the binary `python -m ipr_jax.evaluate` (see there for the files it writes): per-batch shards,
resumed and checked (`eval_shards`), merged by process 0 into the per-budget and per-puzzle
files and plots (`eval_report`). What a task contributes (test inputs, unknown-patch counts,
scores, verifier, final facts, plots' cells, metadata) comes from its module `ipr_jax/tasks/`.

Test puzzle i is a pure function of (config.eval.seed, i), and so is all of its sampling
randomness, so results do not depend on the batch size, the order of the batches, the number of
devices or the number of processes. Several processes (`host_devices.initialize_distributed`)
split the batches and end together (`agreement`).

Why over 800 lines: the run's steps (settings, set-up, batches, merge) share its private state
(`_Run`) and its multi-process agreement; the reusable parts already live in eval_shards,
eval_report, agreement and the task modules.
"""

import collections
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterable, Optional

from absl import logging
from flax import jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ipr_jax import build
from ipr_jax import sampling
from ipr_jax import tasks
from ipr_jax.build import cli
from ipr_jax.build import pretrained
from ipr_jax.data import geometry
from ipr_jax.evaluation import report as eval_report
from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.models import denoiser
from ipr_jax.runtime import agreement
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import environment
from ipr_jax.runtime import errors
from ipr_jax.runtime import preemption as preemption_lib
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


def _sampler_configs(config: ml_collections.ConfigDict):
  return (
      sampling.SamplerConfig(**config.sampler.to_dict()),
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
  sampler_config, ipr_config = _sampler_configs(config)
  grid_h, grid_w = geometry.patch_grid(config)
  try:
    sampling.check_schedules(sampler_config, ipr_config, grid_h * grid_w, unknown_counts(config))
  except ValueError as e:  # the sampler's check of a schedule: a setting to change
    raise errors.ConfigError(str(e)) from e


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


@dataclasses.dataclass
class BatchResult:
  """SRM + IPR results of a batch of test puzzles.

  Attributes:
    indices: `[P]` the puzzle indices, in the order of the other arrays.
    scores: `{name: [budget + 1, P]}` per-puzzle scores after budgets 0..budget (0 = SRM).
    nfe: `[budget + 1, P]` cumulative denoiser passes after each budget.
    final: `{name: [P, ...]}` facts of the final samples (Sudoku: 'digit_grid' [P, n, n]).
    samples: `[S, budget + 1, H, W, d]` samples in [-1, 1] after every budget of the puzzles
      `sample_indices`, or None.
    sample_indices: `[S]` puzzle indices of `samples`.
    final_samples: `[P, H, W, d]` the final samples in [-1, 1] (with `keep_final`), or None.
  """

  indices: np.ndarray
  scores: dict[str, np.ndarray]
  nfe: np.ndarray
  final: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  samples: Optional[np.ndarray] = None
  sample_indices: Optional[np.ndarray] = None
  final_samples: Optional[np.ndarray] = None


def score_iterates(score_fn: Callable[[jax.Array], dict], iterates: jax.Array) -> dict:
  """`{name: [T, B]}` the task's scores of every budget's iterates `[T, B, H, W, d]`, one budget
  at a time (`lax.map`: the memory of scoring one budget)."""
  return jax.lax.map(lambda z: {k: jnp.asarray(v) for k, v in score_fn(z).items()}, iterates)


def verifiers(ipr_config: sampling.IPRConfig, task: tasks_base.Evaluation) -> dict[str, Any]:
  """The verifiers the sampler is handed under `ipr_config`: `verify_fn` (the task's 'valid'
  score) only for immediate_stop, `cell_verify_fn` only for selection='verifier'; none for a
  verifier-free setting."""
  handed: dict[str, Any] = {}
  if ipr_config.immediate_stop:
    handed["verify_fn"] = lambda z: task.score_fn(z)["valid"]
  if ipr_config.selection == "verifier":
    handed["cell_verify_fn"] = task.cell_verify_fn
  return handed


def make_run_fn(config: ml_collections.ConfigDict, task: tasks_base.Evaluation) -> Callable:
  """The per-device evaluation program `run(params, keys, noise, image, mask, num_snapshots,
  keep_final) -> dict` (SRM + IPR on one device's puzzles; `Evaluator` pmaps it,
  `ipr_jax.evaluation.fit` analyses its compiled memory); the last two arguments are static.

  The sampler is given no scorer and no solution (only what `verifiers` hands the two settings
  that read a verifier): it returns every budget's iterates, which the task's scorer then scores.
  """
  sampler_config, ipr_config = _sampler_configs(config)
  denoise = denoiser.make_denoise_fn(build.make_model(config), task.patch_size)

  def run(params, keys, noise, image, mask, num_snapshots, keep_final):
    result = sampling.srm_ipr(
        functools.partial(denoise, params),
        keys,
        image=image,
        mask=mask,
        noise=noise,
        patch_size=task.patch_size,
        sampler_config=sampler_config,
        ipr_config=ipr_config,
        dependency=task.dependency_matrix,
        **verifiers(ipr_config, task),
    )
    scores = score_iterates(task.score_fn, result.iterates)
    if result.last_iterates is not None:  # return_iterate='confident': the last iterate's too
      last = score_iterates(task.score_fn, result.last_iterates)
      scores.update({f"last_{name}": value for name, value in last.items()})
    if result.uncertainty is not None:
      scores["model_uncertainty"] = result.uncertainty
    # Only what the host needs leaves the devices: the final images only when asked for.
    return {
        "scores": scores,
        "nfe": result.nfe_per_budget,
        "snapshots": result.iterates[:, :num_snapshots] if num_snapshots else None,
        "final": task.final_fn(result.z),
        "z": result.z if keep_final else None,
    }

  return run


class Evaluator:
  """SRM + IPR on test puzzles of one config with one set of U-Net parameters.

  Compiled once per batch shape and split over this process's devices with pmap (the parameters
  are copied to them once). Test puzzle i (its content, initial noise and sampling randomness) is
  a function of (config.eval.seed, i) only, so a puzzle's result does not depend on the batch it
  is in, on the number of devices or on the number of processes.

    evaluator = Evaluator(config, params)
    result = evaluator(np.arange(8), samples_per_device=None)  # keep every sample
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any):
    self.sampler_config, self.ipr_config = _sampler_configs(config)
    check_schedules(config)
    self.config = config
    self.task = task_evaluation(config)
    self.params = params
    self.devices = jax.local_devices()
    self.num_devices = len(self.devices)
    self._replicated_params = jax_utils.replicate(params, self.devices)
    run = make_run_fn(config, self.task)
    self._p_run = jax.pmap(run, static_broadcasted_argnums=(5, 6), devices=self.devices)
    root = jax.random.key(config.eval.seed)
    self._sampling_key = jax.random.fold_in(root, SAMPLING_STREAM)
    noise_key = jax.random.fold_in(root, NOISE_STREAM)
    self._initial_noise = jax.jit(
        jax.vmap(
            lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), self.task.image_shape)
        )
    )

  def inputs(self, indices: np.ndarray) -> dict[str, Optional[jax.Array]]:
    """Test puzzles `indices`: image [P, H, W, d] and mask [P, H, W, 1] (None for tasks
    without given content)."""
    return self.task.inputs(self.config.eval.seed, np.asarray(indices))

  def invalid_cells(self, samples: np.ndarray) -> Optional[np.ndarray]:
    """[..., gh, gw] bool rule violations of samples [..., H, W, d] (Sudoku; else None)."""
    return self.task.invalid_cells(samples)

  def samples_per_budget(self, indices, batch_size: Optional[int] = None) -> np.ndarray:
    """[P, budget + 1, H, W, d] the sample of every puzzle of `indices` ([P] ints) after every
    budget (the iterate the scores score), computed in batches of `batch_size` (default: all at
    once)."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    batch_size = batch_size or len(indices)
    return np.concatenate(
        [
            self(indices[s : s + batch_size], samples_per_device=None).samples
            for s in range(0, len(indices), batch_size)
        ]
    )

  def final_facts(self, samples: np.ndarray) -> dict[str, np.ndarray]:
    """The task's facts (`final_fn`; Sudoku: 'digit_grid' [..., n, n], the classified digits) of
    samples [..., H, W, d], e.g. of `samples_per_budget`."""
    samples = np.asarray(samples)
    lead = samples.shape[:-3]
    facts = self.task.final_fn(jnp.asarray(samples.reshape(-1, *samples.shape[-3:])))
    return {k: np.asarray(v).reshape(*lead, *np.shape(v)[1:]) for k, v in facts.items()}

  def puzzle_images(self, indices: np.ndarray) -> Optional[np.ndarray]:
    """[P, H, W, d] what the sampler is given, for display: the given cells, the cells to
    generate at 0 (mid-grey); None for tasks without given content."""
    inputs = self.inputs(indices)
    if inputs["mask"] is None:
      return None
    mask = np.asarray(inputs["mask"], np.float32)
    return (1.0 - mask) * np.asarray(inputs["image"], np.float32)

  def __call__(
      self,
      indices,
      samples_per_device: Optional[int] = 0,
      keep_final: bool = False,
      pad_to: Optional[int] = None,
  ) -> BatchResult:
    """Runs SRM + IPR on puzzles `indices` ([P] ints).

    Args:
      indices: the test puzzle indices.
      samples_per_device: keep the samples after every budget of the first this many puzzles of
        each device's share (None: of every puzzle).
      keep_final: also return the final samples of every puzzle.
      pad_to: pad the batch to at least this many puzzles (rounded up to a multiple of the
        devices), so that batches of different sizes share one compilation.

    Returns:
      BatchResult of the P puzzles.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    real = len(indices)
    if real == 0:
      raise ValueError("Evaluator needs at least one puzzle index, got none.")
    if indices.min() < 0 or indices.max() >= MAX_PUZZLES:
      raise ValueError(
          f"puzzle indices must be in [0, {MAX_PUZZLES}), got {indices.min()}.." f"{indices.max()}"
      )
    if samples_per_device is not None and samples_per_device < 0:
      raise ValueError(f"samples_per_device={samples_per_device} must be >= 0 or None")
    num_devices = self.num_devices
    per_device = -(-max(real, pad_to or 0) // num_devices)
    padded = np.concatenate([indices, np.full(per_device * num_devices - real, indices[-1])])
    num_snapshots = (
        per_device if samples_per_device is None else min(samples_per_device, per_device)
    )
    inputs = self.inputs(padded)
    keys = sampling.puzzle_keys(self._sampling_key, jnp.asarray(padded))
    noise = self._initial_noise(jnp.asarray(padded))
    shard = lambda x: None if x is None else x.reshape(num_devices, -1, *x.shape[1:])
    result = self._p_run(
        self._replicated_params,
        shard(keys),
        shard(noise),
        shard(inputs["image"]),
        shard(inputs["mask"]),
        num_snapshots,
        bool(keep_final),
    )
    result = jax.device_get(result)
    # [devices, budgets, per_device] -> [budgets, P]; [devices, per_device, ...] -> [P, ...].
    by_budget = lambda x: np.asarray(x).swapaxes(0, 1).reshape(x.shape[1], -1)[:, :real]
    by_puzzle = lambda x: np.asarray(x).reshape(-1, *x.shape[2:])[:real]
    out = BatchResult(
        indices,
        {k: by_budget(v) for k, v in result["scores"].items()},
        by_budget(result["nfe"]),
        final={k: by_puzzle(v) for k, v in result["final"].items()},
    )
    if result["z"] is not None:
      out.final_samples = by_puzzle(result["z"])
    if result["snapshots"] is not None:
      # [devices, budgets, S, H, W, d] -> [devices * S, budgets, ...], real puzzles only.
      snapshots = np.asarray(result["snapshots"]).swapaxes(1, 2)
      positions = (
          np.arange(num_devices)[:, None] * per_device + np.arange(num_snapshots)[None, :]
      ).reshape(-1)
      keep = positions < real
      out.samples = snapshots.reshape(-1, *snapshots.shape[2:])[keep]
      out.sample_indices = padded[positions[keep]]
    return out


params_digest = checkpoint.params_digest  # what run.json records as params_sha256


def resolved_settings(
    config: ml_collections.ConfigDict, batches: Optional[list[np.ndarray]] = None
) -> dict[str, Any]:
  """What an evaluation's results depend on besides its parameters and code, every field
  resolved: the task; the data and model sections; the sampler and IPR options as the sampler
  resolves them (`SamplerConfig`, `IPRConfig`: every field, defaults included); the eval section
  (eval.name aside; eval.unique_solution resolved); and the batching
  (`eval_shards.batches_record` of `batches`, default: `puzzle_batches` of `config`).
  """
  if batches is None:
    task = task_evaluation(config)
    batches = puzzle_batches(
        config, task.unknown_patches(config.eval.seed, np.arange(config.eval.num_puzzles))
    )
  sampler_config, ipr_config = _sampler_configs(config)
  eval_settings = config.eval.to_dict()
  eval_settings.pop("name", None)
  eval_settings["unique_solution"] = bool(config.eval.get("unique_solution", False))
  return {
      "task": config.task,
      "data": config.data.to_dict(),
      "model": config.model.to_dict(),
      "sampler": dataclasses.asdict(sampler_config),
      "ipr": dataclasses.asdict(ipr_config),
      "eval": eval_settings,
      "batches": eval_shards.batches_record(batches),
  }


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


class EvaluationStopped(Exception):
  """SIGTERM (or a deadline) stopped the evaluation between batches; its shards are kept."""


def _as_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] as uint8 in [0, 255] (a quarter of float32's size)."""
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _shard_arrays(
    batch: BatchResult, unknown: np.ndarray, seconds: float, digests: eval_shards.ShardDigests
) -> dict[str, np.ndarray]:
  """A batch's per-puzzle arrays, puzzle-major ([P, budget + 1] for the per-budget ones), with
  the run's settings and environment digests."""
  arrays = {
      "index": batch.indices,
      "unknown_patches": unknown,
      "nfe": batch.nfe.T,
      "seconds": np.float64(seconds),
      "process": np.int64(jax.process_index()),
      **digests.arrays(),
  }
  arrays.update({f"score.{k}": v.T for k, v in batch.scores.items()})
  arrays.update({f"final.{k}": v for k, v in batch.final.items()})
  if batch.final_samples is not None:
    arrays["samples"] = _as_uint8(batch.final_samples)
  return arrays


def merge_shards(
    shards: list[dict[str, np.ndarray]], batches: list[np.ndarray], num_puzzles: int
) -> dict[str, np.ndarray]:
  """The per-puzzle arrays of all shards, in puzzle index order (what puzzles.npz holds):
  index [P], unknown_patches [P], nfe [P, budget + 1], one [P, budget + 1] array per score,
  the final facts (Sudoku: digit_grid [P, n, n]) and, if saved, samples uint8 [P, H, W, d].

  Raises:
    eval_shards.SettingsMismatchError: shard b does not hold the puzzles of `batches[b]`, or the
      shards together are not exactly the puzzles 0..num_puzzles-1.
  """
  if len(shards) != len(batches):
    raise eval_shards.SettingsMismatchError(
        f"{len(shards)} shards for the run's {len(batches)} batches"
    )
  for b, (shard, batch) in enumerate(zip(shards, batches)):
    if not np.array_equal(np.asarray(shard["index"]).reshape(-1), np.asarray(batch)):
      raise eval_shards.SettingsMismatchError(
          f"shard {b} holds puzzles {shard['index']}, but batch {b} is {batch}"
      )
  index = np.concatenate([s["index"] for s in shards])
  order = np.argsort(index, kind="stable")
  if not np.array_equal(index[order], np.arange(num_puzzles)):
    raise eval_shards.SettingsMismatchError(
        f"the shards hold {len(index)} puzzle indices ({len(np.unique(index))} distinct, "
        f"{index.min()}..{index.max()}), not exactly the run's puzzles 0..{num_puzzles - 1}"
    )
  skip = {"seconds", "process", eval_shards.SETTINGS_DIGEST, eval_shards.ENVIRONMENT_DIGEST}
  merged = {}
  for key in shards[0]:
    if key not in skip:
      name = key.split(".", 1)[-1]
      merged[name] = np.concatenate([s[key] for s in shards])[order]
  return merged


def _progress_line(
    done: int, total: int, passes: float, elapsed: float, valid: np.ndarray, prefix: str
) -> str:
  rate = done / max(elapsed, 1e-9)
  eta = (total - done) / rate if rate > 0 else float("inf")
  return (
      f"{prefix}[{done}/{total}] {elapsed:.0f}s, {rate:.2f} puzzles/s, "
      f"{passes / max(elapsed, 1e-9):.0f} denoiser passes/s, ETA {eta:.0f}s; valid rate at "
      f"budget 0 {valid[0]:.3f}, at budget {len(valid) - 1} {valid[-1]:.3f}"
  )


def _prepare_shard_dir(
    shard_dir: str,
    settings: dict[str, Any],
    batches: list[np.ndarray],
    allow_environment_change: bool,
) -> dict[str, Any]:
  """Process 0, before any process computes: checks (or writes) run.json, removes the temporary
  files of killed writes, reads every existing shard (deleting the damaged ones, refusing those
  of other settings). Returns the batches done ("done"), the temporary files removed
  ("removed"), the damaged shards deleted ("damaged") and the environment digests whose shards
  may be merged ("environments", None: any)."""
  environments = eval_shards.check_settings(
      shard_dir, settings, write=True, allow_environment_change=allow_environment_change
  )
  if allow_environment_change:
    environments = None
  removed = eval_shards.remove_temporaries(shard_dir)
  done, damaged = eval_shards.verify_shards(
      shard_dir, batches, _shard_digests(settings, environments)
  )
  return {
      "done": sorted(done),
      "removed": removed,
      "damaged": damaged,
      "environments": None if environments is None else sorted(environments),
  }


def _shard_digests(
    settings: dict[str, Any], environments: Optional[Iterable[str]]
) -> eval_shards.ShardDigests:
  mine = environment.digest(settings[eval_shards.ENVIRONMENT])
  return eval_shards.ShardDigests(
      eval_shards.settings_digest(settings),
      mine,
      None if environments is None else frozenset(environments) | {mine},
  )


@dataclasses.dataclass
class _Run:
  """An evaluation set up and agreed on by every process, before any batch is computed.

  Attributes:
    config: the task config; out_dir, shard_dir: where the results and the shards go.
    prefix: the progress lines' prefix ("[process p] " with several processes).
    evaluator: SRM + IPR with the parameters to evaluate; source, which: where they came from
      and 'ema' | 'live'.
    unknown: [num_puzzles] the puzzles' unknown patches; batches: the puzzle indices per batch.
    settings: what run.json records (`run_settings`, the code and environment records).
    done_before: the batches whose shards existed already.
    digests: what each shard of this run holds and each merged shard must hold.
  """

  config: ml_collections.ConfigDict
  out_dir: str
  shard_dir: str
  prefix: str
  evaluator: Evaluator
  source: str
  which: str
  unknown: np.ndarray
  batches: list[np.ndarray]
  settings: dict[str, Any]
  done_before: set[int]
  digests: eval_shards.ShardDigests


def _check_sizes(config: ml_collections.ConfigDict) -> None:
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


def _set_up(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint_path: Optional[str],
    preemption: preemption_lib.Preemption,
    allow_environment_change: bool,
    allow_config_mismatch: bool = False,
) -> _Run:
  """Loads the parameters, builds the Evaluator and the batches, agrees on them with every
  process, and (process 0) checks the shard directory.

  Two agreements before any process computes (no process waits in a collective for one that has
  failed): every process's error and settings (settings, batching, code, environment, weights:
  all processes must compute the same thing, so the same number of rounds), then process 0's look
  at the shard directory.
  """
  out_dir = os.path.join(workdir, "eval", config.eval.name)
  shard_dir = os.path.join(out_dir, "shards")
  prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
  error, settings = None, None
  try:
    check_schedules(config)
    params, source, which = load_params(config, workdir, checkpoint_path, allow_config_mismatch)
    errors.check_writable_dir(workdir)  # every process writes its shards there
    logging.info("Evaluating the %s params of %s.", which, source)
    evaluator = Evaluator(config, params)  # checks the task's inputs (classifier, scorer) first
    # Computed once: they order the batches and go into each batch's shard.
    unknown = evaluator.task.unknown_patches(config.eval.seed, np.arange(config.eval.num_puzzles))
    batches = puzzle_batches(config, unknown)
    settings = {
        **run_settings(config, params, which, batches),
        "code": eval_shards.code_record(),
        eval_shards.ENVIRONMENT: environment.record(),
    }
  except Exception as e:  # pylint: disable=broad-except  (raised on every process by agree)
    error = e
  outcome = agreement.agree(
      error,
      stop=preemption.this_process(),
      payload=None if settings is None else eval_shards.canonical(settings),
  )
  eval_shards.check_processes_agree(outcome.payloads)  # the same verdict on every process

  error, prepared = None, None
  if jax.process_index() == 0:
    try:
      prepared = _prepare_shard_dir(shard_dir, settings, batches, allow_environment_change)
    except Exception as e:  # pylint: disable=broad-except  (raised on every process by agree)
      error = e
  outcome = agreement.agree(error, stop=outcome.stop or preemption.this_process(), payload=prepared)
  prepared = outcome.payloads[0]
  for name in prepared["damaged"]:
    print(f"{prefix}{name} in {shard_dir} was damaged: deleted, computed again.", flush=True)
  if outcome.stop:
    raise EvaluationStopped(
        f"stopped before any batch; rerun the same command to compute " f"them ({shard_dir})."
    )
  return _Run(
      config,
      out_dir,
      shard_dir,
      prefix,
      evaluator,
      source,
      which,
      unknown,
      batches,
      settings,
      set(prepared["done"]),
      _shard_digests(settings, prepared["environments"]),
  )


def _compute_batch(run: _Run, b: int, pad_to: int) -> BatchResult:
  """Batch b: SRM + IPR, then its shard written."""
  batch_start = time.time()
  # Every batch runs one program (padded to the largest batch), without samples: the figure's
  # puzzles are computed again with theirs once the results are known (`_plot_process`).
  result = run.evaluator(run.batches[b], keep_final=run.config.eval.save_samples, pad_to=pad_to)
  eval_shards.write_shard(
      run.shard_dir,
      b,
      _shard_arrays(result, run.unknown[result.indices], time.time() - batch_start, run.digests),
  )
  return result


def _compute_batches(
    run: _Run, preemption: preemption_lib.Preemption, after_batch: Optional[Callable[[int], None]]
) -> float:
  """Process p computes batches p, p + N, ... not done yet, one per round; after every round all
  processes agree on errors and stop requests (a collective: the same number of rounds on every
  process, also for those with fewer batches). Returns the time the batches started."""
  process, num_processes = jax.process_index(), jax.process_count()
  batches, done_before = run.batches, run.done_before
  shares = [
      [b for b in range(len(batches)) if b % num_processes == p and b not in done_before]
      for p in range(num_processes)
  ]
  mine = shares[process]
  rounds = max(len(share) for share in shares)
  if done_before:
    print(
        f"{run.prefix}{len(done_before)} of {len(batches)} batches already done in "
        f"{run.shard_dir}; {len(mine)} to compute here.",
        flush=True,
    )
  my_total = sum(len(batches[b]) for b in mine)
  pad_to = max(len(b) for b in batches)

  start_time = time.time()
  done, passes, valid_sum, completed = 0, 0.0, 0.0, len(done_before)
  for r in range(rounds):
    error = None
    if r < len(mine):
      try:
        result = _compute_batch(run, mine[r], pad_to)
        done += len(result.indices)
        passes += float(result.nfe[-1].sum())
        valid_sum = valid_sum + result.scores["valid"].sum(axis=1)
        print(
            _progress_line(
                done, my_total, passes, time.time() - start_time, valid_sum / done, run.prefix
            ),
            flush=True,
        )
        if after_batch is not None:
          after_batch(mine[r])
      except Exception as e:  # pylint: disable=broad-except  (raised on every process by agree)
        error = e
    stop = agreement.agree(error, stop=preemption.this_process()).stop
    completed += sum(r < len(share) for share in shares)
    if stop and r < rounds - 1:
      raise EvaluationStopped(
          f"stopped after {completed} of {len(batches)} batches; rerun the same command to "
          f"compute the rest ({run.shard_dir})."
      )
  return start_time


def _results_metadata(
    run: _Run, shards: list[dict[str, np.ndarray]], seconds: float
) -> dict[str, Any]:
  """What results.json records besides the rows: settings, parameters, code, environment (with
  the environments the merged shards were computed in), devices, the throughput of the batches
  computed by this run, and the task's metadata."""
  config = run.config
  new = [b for b in range(len(run.batches)) if b not in run.done_before]
  new_puzzles = sum(len(run.batches[b]) for b in new)
  new_passes = float(sum(shards[b]["nfe"][:, -1].sum() for b in new))
  shard_environments = collections.Counter(
      str(shard[eval_shards.ENVIRONMENT_DIGEST]) for shard in shards
  )
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
      "environment_sha256": run.digests.environment,
      # Batches per environment digest: more than one entry = shards of several environments
      # merged (--allow_environment_change).
      "shard_environments": dict(sorted(shard_environments.items())),
      "devices": [str(d) for d in jax.devices()],
      "throughput": {
          "puzzles": new_puzzles,
          "seconds": seconds,
          "puzzles_per_sec": new_puzzles / seconds if new_puzzles else None,
          "denoiser_passes_per_sec": new_passes / seconds if new_puzzles else None,
          "batches_reused": len(run.done_before),
          "device_kind": jax.devices()[0].device_kind,
          "device_count": jax.device_count(),
          "process_count": jax.process_count(),
      },
      **run.evaluator.task.metadata,
  }


def _plot_process(run: _Run, per_puzzle: dict[str, np.ndarray], path: str) -> list[int]:
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
  outcome = lambda v: {
      (0, 1): "fixed by IPR",
      (0, 0): "stays invalid",
      (1, 1): "valid",
      (1, 0): "broken by IPR",
  }[(int(v[0]), int(v[-1]))]
  labels = [f"puzzle {i}: {outcome(v)}" for i, v in zip(indices, again.scores["valid"].T)]
  eval_report.plot_ipr_process(
      path,
      again.samples,
      run.evaluator.invalid_cells(again.samples),
      run.evaluator.task.cell_size,
      puzzles=run.evaluator.puzzle_images(again.sample_indices),
      labels=labels,
  )
  return indices.tolist()


def _merge_and_write(run: _Run, seconds: float) -> list[dict[str, Any]]:
  """Merges every shard (checked against the run's digests); process 0 writes results.{json,
  csv}, puzzles.{npz,csv} and the plots. Returns the per-budget rows."""
  shards = eval_shards.read_shards(run.shard_dir, run.batches, run.digests)
  per_puzzle = merge_shards(shards, run.batches, run.config.eval.num_puzzles)
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


def _write_results(run: _Run, seconds: float) -> list[dict[str, Any]]:
  """`_merge_and_write`, its errors on any process agreed by all (every process reads the
  shards; a process that cannot, or process 0 failing to write, ends every process with the same
  error)."""
  error, rows = None, None
  try:
    rows = _merge_and_write(run, seconds)
  except Exception as e:  # pylint: disable=broad-except  (raised on every process by agree)
    error = e
  agreement.agree(error)
  return rows


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint_path: Optional[str] = None,
    after_batch: Optional[Callable[[int], None]] = None,
    allow_environment_change: bool = False,
    allow_config_mismatch: bool = False,
) -> list[dict[str, Any]]:
  """Runs SRM + IPR on `config.eval.num_puzzles` test puzzles and writes the results.

  Every batch's per-puzzle results are written as a shard under
  `workdir/eval/<config.eval.name>/shards/` as soon as it is done; a rerun skips the batches
  whose shards exist (and refuses shards of other settings or code, `eval_shards`). With several
  JAX processes, process p computes batches p, p + N, ...; process 0 then merges every shard into
  results.json, results.csv, puzzles.npz, puzzles.csv and the plots.

  Several processes end together (`agreement.agree`): they first agree that they compute the
  same thing (settings, batching, code, environment and weights of every process equal process
  0's, else every process raises the same SettingsMismatchError naming the field and the
  processes); an error on any process before, during or after the batches (a settings mismatch
  found by process 0, a failed batch, a failed merge) is raised by every process with the same
  message, and SIGTERM or SIGINT to any process stops every process after the current round of
  batches (one batch per process) with the same EvaluationStopped message.

  Args:
    config: the task config (sections model, data, sampler, ipr, eval).
    workdir: run directory; results go to `workdir/eval/<config.eval.name>/`.
    checkpoint_path: what to restore (default: `workdir`).
    after_batch: called on the host with the batch number after each batch's shard is written.
    allow_environment_change: reuse shards computed in another environment (other package
      versions, CPU, devices or XLA flags); run.json and results.json record it.
    allow_config_mismatch: evaluate a checkpoint whose stored config differs from `config` in a
      field that defines what its weights mean (`checkpoint.WEIGHT_FIELDS`).

  Returns:
    The per-budget rows written to results.csv.

  Raises:
    EvaluationStopped: SIGTERM or SIGINT arrived; the batches done so far are kept for the rerun.
    eval_shards.SettingsMismatchError: the processes disagree, or the shards there were computed
      with other settings, other code or (not allowed) in another environment, or hold other
      puzzles than this run's batches.
    checkpoint.CheckpointError: the checkpoint's digests differ (damaged files), or
      (ConfigMismatchError) it was trained with another geometry or architecture.
    errors.StorageError: `workdir` cannot be written (a file, read-only, a full disk).
  """
  _check_sizes(config)
  cli.check_geometry(config)
  with preemption_lib.Preemption("stopping after the current batch.") as preemption:
    run = _set_up(
        config,
        workdir,
        checkpoint_path,
        preemption,
        allow_environment_change,
        allow_config_mismatch,
    )
    start_time = _compute_batches(run, preemption, after_batch)
  seconds = time.time() - start_time
  return _write_results(run, seconds)
