"""The evaluation as a library: SRM + IPR on test puzzles, the valid rate at every IPR budget.

`Evaluator(config, params)(indices)` runs SRM + IPR on any puzzle indices and returns their
per-puzzle scores, passes and (optionally) samples; `evaluate(config, workdir)` is the whole run
of the binary `python -m ipr_jax.evaluate` (see there for the files it writes): per-batch shards,
resumed and checked (`store.ShardStore`), merged by process 0 into the per-budget and per-puzzle
files and plots (`results`). What the run computes, from its config (task, sampler options,
batches, parameters, key streams, recorded settings): `settings`. What a task contributes (test
inputs, unknown-patch counts, scores, verifier, final facts, plots' cells, metadata) comes from
its module `ipr_jax/tasks/`.

Test puzzle i is a pure function of (config.eval.seed, i), and so is all of its sampling
randomness, so results do not depend on the batch size, the order of the batches, the number of
devices or the number of processes. Several processes (`host_devices.initialize_distributed`)
split the batches and end together (`agreement`). The devices compute a process's next batch
while its host writes and syncs the shard of the batch just fetched (`_compute_batches`).
"""

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Optional

from absl import logging
from flax import jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ipr_jax import build
from ipr_jax import sampling
from ipr_jax.build import cli
from ipr_jax.evaluation import results
from ipr_jax.evaluation import settings as eval_settings
from ipr_jax.evaluation import store as store_lib
from ipr_jax.models import denoiser
from ipr_jax.runtime import agreement
from ipr_jax.runtime import errors
from ipr_jax.runtime import preemption as preemption_lib
from ipr_jax.tasks import base as tasks_base

_sampler_configs = eval_settings.sampler_configs  # as make_run_fn calls it


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
        sampling.Denoiser(
            functools.partial(denoise, params), task.patch_size, task.dependency_matrix
        ),
        sampling.Puzzles(keys, image=image, mask=mask, noise=noise),
        sampler_config,
        ipr_config,
        **verifiers(ipr_config, task),
    )
    scores = score_iterates(task.score_fn, result.iterates)
    if result.last_iterates is not None:  # return_iterate='confident': the last iterate's too
      last = score_iterates(task.score_fn, result.last_iterates)
      scores.update({f"last_{name}": value for name, value in last.items()})
    if result.mean_query_score is not None:
      scores["model_uncertainty"] = result.mean_query_score
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
    self.sampler_config, self.ipr_config = eval_settings.sampler_configs(config)
    eval_settings.check_schedules(config)
    self.config = config
    self.task = eval_settings.task_evaluation(config)
    self.params = params
    self.devices = jax.local_devices()
    self.num_devices = len(self.devices)
    self._replicated_params = jax_utils.replicate(params, self.devices)
    run = make_run_fn(config, self.task)
    self._p_run = jax.pmap(run, static_broadcasted_argnums=(5, 6), devices=self.devices)
    root = jax.random.key(config.eval.seed)
    self._sampling_key = jax.random.fold_in(root, eval_settings.SAMPLING_STREAM)
    noise_key = jax.random.fold_in(root, eval_settings.NOISE_STREAM)
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
    """Runs SRM + IPR on puzzles `indices` ([P] ints): `collect(dispatch(...))`.

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
    return self.collect(self.dispatch(indices, samples_per_device, keep_final, pad_to))

  def dispatch(
      self,
      indices,
      samples_per_device: Optional[int] = 0,
      keep_final: bool = False,
      pad_to: Optional[int] = None,
  ) -> "Dispatched":
    """SRM + IPR on puzzles `indices` handed to the devices (arguments as `__call__`'s); returns
    as soon as JAX has queued the program (asynchronous dispatch), before it has run, so that the
    host can do other work meanwhile. `collect` waits for it and fetches its results; errors of
    the computation itself surface there."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    real = len(indices)
    if real == 0:
      raise ValueError("Evaluator needs at least one puzzle index, got none.")
    if indices.min() < 0 or indices.max() >= eval_settings.MAX_PUZZLES:
      raise ValueError(
          f"puzzle indices must be in [0, {eval_settings.MAX_PUZZLES}), got {indices.min()}.."
          f"{indices.max()}"
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
    outputs = self._p_run(
        self._replicated_params,
        shard(keys),
        shard(noise),
        shard(inputs["image"]),
        shard(inputs["mask"]),
        num_snapshots,
        bool(keep_final),
    )
    return Dispatched(indices, padded, per_device, num_snapshots, outputs)

  def collect(self, dispatched: "Dispatched") -> BatchResult:
    """Waits for a `dispatch`ed program and fetches its results to the host."""
    indices, padded, per_device = dispatched.indices, dispatched.padded, dispatched.per_device
    real, num_devices, num_snapshots = len(indices), self.num_devices, dispatched.num_snapshots
    result = jax.device_get(dispatched.outputs)
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


@dataclasses.dataclass
class Dispatched:
  """A batch `Evaluator.dispatch` handed to the devices: its indices, padded indices, puzzles per
  device and snapshots kept, and the program's (not yet computed) outputs."""

  indices: np.ndarray
  padded: np.ndarray
  per_device: int
  num_snapshots: int
  outputs: Any


class EvaluationStopped(Exception):
  """SIGTERM (or a deadline) stopped the evaluation between batches; its shards are kept."""


def _as_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] as uint8 in [0, 255] (a quarter of float32's size)."""
  return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _shard_arrays(batch: BatchResult, unknown: np.ndarray, seconds: float) -> dict[str, np.ndarray]:
  """A batch's per-puzzle arrays, puzzle-major ([P, budget + 1] for the per-budget ones), as its
  shard holds them (`ShardStore.write` adds the run's digests)."""
  arrays = {
      "index": batch.indices,
      "unknown_patches": unknown,
      "nfe": batch.nfe.T,
      "seconds": np.float64(seconds),
      "process": np.int64(jax.process_index()),
  }
  arrays.update({f"score.{k}": v.T for k, v in batch.scores.items()})
  arrays.update({f"final.{k}": v for k, v in batch.final.items()})
  if batch.final_samples is not None:
    arrays["samples"] = _as_uint8(batch.final_samples)
  return arrays


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


@dataclasses.dataclass
class Run:
  """An evaluation set up and agreed on by every process, before any batch is computed.

  Attributes:
    config: the task config; out_dir: where the results go.
    prefix: the progress lines' prefix ("[process p] " with several processes).
    evaluator: SRM + IPR with the parameters to evaluate; source, which: where they came from
      and 'ema' | 'live'.
    unknown: [num_puzzles] the puzzles' unknown patches; batches: the puzzle indices per batch.
    settings: what run.json records (`settings.recorded_settings`).
    store: the run's shards (`store.reused`: the batches whose shards existed already).
  """

  config: ml_collections.ConfigDict
  out_dir: str
  prefix: str
  evaluator: Evaluator
  source: str
  which: str
  unknown: np.ndarray
  batches: list[np.ndarray]
  settings: dict[str, Any]
  store: store_lib.ShardStore


def _set_up(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint_path: Optional[str],
    preemption: preemption_lib.Preemption,
    allow_environment_change: bool,
    allow_config_mismatch: bool = False,
) -> Run:
  """Loads the parameters, builds the Evaluator and the batches, and opens the shard store with
  every process.

  Two agreements before any process computes (no process waits in a collective for one that has
  failed; `ShardStore.open`): every process's error and settings (settings, batching, code,
  environment, weights: all processes must compute the same thing, so the same number of rounds),
  then process 0's look at the shard directory.
  """
  out_dir = os.path.join(workdir, "eval", config.eval.name)
  shard_dir = os.path.join(out_dir, "shards")
  prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
  error, settings, batches = None, None, None
  try:
    eval_settings.check_schedules(config)
    params, source, which = eval_settings.load_params(
        config, workdir, checkpoint_path, allow_config_mismatch
    )
    errors.check_writable_dir(workdir)  # every process writes its shards there
    logging.info("Evaluating the %s params of %s.", which, source)
    evaluator = Evaluator(config, params)  # checks the task's inputs (classifier, scorer) first
    # Computed once: they order the batches and go into each batch's shard.
    unknown = evaluator.task.unknown_patches(config.eval.seed, np.arange(config.eval.num_puzzles))
    batches = eval_settings.puzzle_batches(config, unknown)
    settings = eval_settings.recorded_settings(config, params, which, batches)
  except Exception as e:  # pylint: disable=broad-except  (raised on every process by agree)
    error = e
  store = store_lib.ShardStore.open(
      shard_dir,
      settings,
      batches,
      set_up_error=error,
      stop=preemption.this_process,
      allow_environment_change=allow_environment_change,
  )
  for name in store.damaged:
    print(f"{prefix}{name} in {shard_dir} was damaged: deleted, computed again.", flush=True)
  if store.stop_requested:
    raise EvaluationStopped(
        f"stopped before any batch; rerun the same command to compute " f"them ({shard_dir})."
    )
  assert settings is not None and batches is not None  # else ShardStore.open raised
  return Run(config, out_dir, prefix, evaluator, source, which, unknown, batches, settings, store)


@dataclasses.dataclass
class _InFlight:
  """Batch `batch` handed to the devices at `start`, or the error its dispatch raised."""

  batch: int
  start: float
  dispatched: Optional[Dispatched] = None
  error: Optional[Exception] = None


def _dispatch_batch(run: Run, b: int, pad_to: int) -> Dispatched:
  """Batch b's SRM + IPR handed to the devices (asynchronous). Every batch runs one program
  (padded to the largest batch), without samples: the figure's puzzles are computed again with
  theirs once the results are known (`results`)."""
  return run.evaluator.dispatch(
      run.batches[b], keep_final=run.config.eval.save_samples, pad_to=pad_to
  )


def _in_flight(run: Run, b: int, pad_to: int) -> _InFlight:
  start = time.time()
  try:
    return _InFlight(b, start, dispatched=_dispatch_batch(run, b, pad_to))
  except Exception as e:  # pylint: disable=broad-except  (raised in batch b's own round)
    return _InFlight(b, start, error=e)


def _compute_batches(
    run: Run, preemption: preemption_lib.Preemption, after_batch: Optional[Callable[[int], None]]
) -> float:
  """Process p computes batches p, p + N, ... not done yet, one per round; after every round all
  processes agree on errors and stop requests (a collective: the same number of rounds on every
  process, also for those with fewer batches). Returns the time the batches started.

  The devices are kept busy: as soon as a batch's results are fetched, a process hands its
  next batch to the devices, which compute it while the host writes and syncs the fetched
  batch's shard, prints the progress and agrees. A shard still holds only its own batch's
  results, written once they are all fetched; an error of a batch (at its dispatch or at its
  fetch) is raised in that batch's round, and a batch dispatched ahead of a round that stops or
  fails is dropped, its shard never written. A process asked to stop (when its batch's results
  have come) dispatches nothing more, so that it exits without waiting for another batch.
  """
  process, num_processes = jax.process_index(), jax.process_count()
  batches, done_before = run.batches, run.store.reused
  shares = [
      [b for b in range(len(batches)) if b % num_processes == p and b not in done_before]
      for p in range(num_processes)
  ]
  mine = shares[process]
  rounds = max(len(share) for share in shares)
  if done_before:
    print(
        f"{run.prefix}{len(done_before)} of {len(batches)} batches already done in "
        f"{run.store.directory}; {len(mine)} to compute here.",
        flush=True,
    )
  my_total = sum(len(batches[b]) for b in mine)
  pad_to = max(len(b) for b in batches)

  start_time = time.time()
  done, passes, valid_sum, completed = 0, 0.0, 0.0, len(done_before)
  ahead = _in_flight(run, mine[0], pad_to) if mine else None
  for r in range(rounds):
    error = None
    if r < len(mine):
      try:
        current, ahead = ahead, None
        assert current is not None and current.batch == mine[r]
        if current.error is not None:
          raise current.error
        assert current.dispatched is not None
        result = run.evaluator.collect(current.dispatched)  # its computation's errors: here
        seconds = time.time() - current.start
        if r + 1 < len(mine) and not preemption.this_process():
          ahead = _in_flight(run, mine[r + 1], pad_to)  # computed while the shard is written
        run.store.write(current.batch, _shard_arrays(result, run.unknown[result.indices], seconds))
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
          after_batch(current.batch)
      except Exception as e:  # pylint: disable=broad-except  (raised on every process by agree)
        error = e
    stop = agreement.agree(error, stop=preemption.this_process()).stop
    completed += sum(r < len(share) for share in shares)
    if stop and r < rounds - 1:
      raise EvaluationStopped(
          f"stopped after {completed} of {len(batches)} batches; rerun the same command to "
          f"compute the rest ({run.store.directory})."
      )
  return start_time


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
  whose shards exist (and refuses shards of other settings or code, `store.ShardStore`). With
  several JAX processes, process p computes batches p, p + N, ...; process 0 then merges every
  shard into results.json, results.csv, puzzles.npz, puzzles.csv and the plots.

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
    shards.SettingsMismatchError: the processes disagree, or the shards there were computed
      with other settings, other code or (not allowed) in another environment, or hold other
      puzzles than this run's batches.
    checkpoint.CheckpointError: the checkpoint's digests differ (damaged files), or
      (ConfigMismatchError) it was trained with another geometry or architecture.
    errors.StorageError: `workdir` cannot be written (a file, read-only, a full disk).
  """
  eval_settings.check_sizes(config)
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
  return results.write(run, seconds)
