r"""Trains an SRM denoiser the way the reference does (spec §3), data parallel over all devices.

  python -m ipr_jax.train --config=configs/even_pixels.py:tiny --workdir=runs/ep_tiny

One binary for one CPU, one GPU or every core of a TPU pod:

* Data parallel with `jax.pmap` over the local devices: each device gets batch_size / device_count
  examples, gradients and metrics are averaged with `lax.pmean`. On several hosts
  (`--config.distributed=True`, see `host_devices.initialize_distributed`) the global batch is
  split over every device of every process, each process draws only its own examples, and
  process 0 writes metrics.jsonl and config.json; every process resumes the same checkpoint.
* Even Pixels images and MNIST Sudoku puzzles are generated on device from the PRNG, so those
  tasks have no input pipeline. Counting Polygons images are drawn with Pillow on the host:
  `data.render_workers` background workers render the batches of the next
  `data.prefetch_batches` steps while the accelerator trains, and the progress line reports the
  fraction of time the loop waited for them (`input_wait`).
* Every random draw of example i at step s (its image, patch times, noise and dropout masks)
  comes from `fold_in(fold_in(root, s), i)` with i the global example index (host-rendered images:
  from a numpy generator seeded with (seed, s, i), see `counting_polygons.render_train_images`),
  so a run's result does not depend on how many devices share the batch, and a resumed run sees
  the same examples.
* bfloat16 compute with float32 master weights when `config.model.dtype = 'bfloat16'`.
* Orbax checkpoints in `workdir/checkpoints` every `checkpoint_every_steps` (and every
  `checkpoint_every_s` seconds of wall time if given: `--checkpoint_every_s`), at the end and on
  SIGTERM or Ctrl-C (SIGINT; a second Ctrl-C interrupts at once; the binary then exits with
  status 75, `cli.EXIT_PREEMPTED`); restarting with the same workdir resumes exactly (step,
  params, optimizer state, EMA, PRNG), after checking the checkpoint's parameter digests and that
  its config agrees with the run's on the fields that define the weights
  (`checkpoint.check_stored_config`; `--allow_config_mismatch` to resume anyway). A NaN or inf
  loss stops the run without saving the bad state.
* A progress line every `log_every_steps` (loss terms, steps/s, ETA), the same values appended to
  `workdir/metrics.jsonl` (cut back to the resumed step at a resume, so that the steps after the
  last checkpoint of a killed run appear once), the resolved config in `workdir/config.json`.
* A workdir that cannot be written (a file, read-only, a full disk) is an `errors.StorageError`
  before training starts; an asynchronous save that fails stops the run at the next step, its
  half-written directory removed (the binary: one line, exit status 74).

Deliberate differences from the reference (same recipe, different bookkeeping):
* randomness is drawn per example from (step, global index) rather than from one global stream,
  so results do not depend on the device count; the distributions are the reference's;
* the loss-weight density (spec §3.1 step 4) is built once at start from `config.seed` rather
  than lazily from the global RNG on the first call;
* the warm-up is computed as torch LinearLR's closed-form factor of the learning rate;
* metrics.jsonl holds the mean of each metric over its logging window.

The step itself (loss weights, gradient accumulation, pmap) is `ipr_jax.training.train_step`.
"""

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
from flax import jax_utils
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from ipr_jax import build
from ipr_jax import tasks
from ipr_jax.data import geometry
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import errors
from ipr_jax.runtime import preemption as preemption_lib
from ipr_jax.runtime import train_state as train_state_lib
from ipr_jax.training import train_step

TrainState = train_state_lib.TrainState
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient norm became NaN or inf."""


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    state: the final TrainState on the host (numpy leaves, single copy).
    history: the logged metric records, as appended to metrics.jsonl.
    preempted: True if SIGTERM or the time limit stopped the run before num_train_steps.
  """

  state: TrainState
  history: list[dict[str, float]]
  preempted: bool = False


def unreplicate(tree: Any) -> Any:
  """The first device's copy of every leaf of a pmap output (single-device arrays)."""
  return jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data[0], tree)


_PROGRESS_TERMS = ("loss", "mse", "vlb", "sigma_nll", "grad_norm", "learning_rate")


def _shard_local(x: np.ndarray) -> jax.Array:
  """Puts row i of `x` ([local_devices, ...]) on local device i, as pmap expects its inputs."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  os.replace(tmp, path)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    hooks: Sequence[Callable[[int], None]] = (),
    log_fn: Optional[Callable[[dict[str, Any]], None]] = None,
    time_limit_s: Optional[float] = None,
    allow_config_mismatch: bool = False,
    checkpoint_every_s: Optional[float] = None,
) -> TrainResult:
  """Trains (or resumes training) until `config.num_train_steps`.

  Args:
    config: a config from `configs/<task>.py`.
    workdir: run directory for checkpoints, metrics.jsonl and config.json; an existing
      checkpoint there is resumed.
    hooks: called as `hook(step)` on the host after every step (step = steps completed).
    log_fn: called on the host with every logged record (step, loss terms, steps_per_sec,
      eta_sec; what metrics.jsonl gets), every `config.log_every_steps` steps and at the end.
    time_limit_s: if set, stop once this many seconds have passed since the call, as on SIGTERM:
      save a checkpoint of the last step and return (rerun to continue from it).
    allow_config_mismatch: resume a checkpoint whose stored config differs from `config` in a
      field that defines what its weights mean (`checkpoint.WEIGHT_FIELDS`).
    checkpoint_every_s: if set, also save a checkpoint once this many seconds have passed since
      the loop started or the last save (besides every `config.checkpoint_every_steps`), so that
      a run killed without warning loses at most about this much work. With several processes
      the clock is read at logging steps and process 0's decides.

  Returns:
    TrainResult with the final state.

  Raises:
    NonFiniteLossError: the loss became NaN or inf; checkpoints written before stay intact.
    checkpoint.CheckpointError: workdir holds a checkpoint that cannot be resumed (unreadable,
      its digests differ, or another geometry: checkpoint.ConfigMismatchError).
    errors.StorageError: workdir cannot be written (a file, read-only, a full disk), or a save
      failed for that reason; a failed save's half-written directory is removed.
  """
  # SIGTERM or SIGINT from here on (also during setup): a save after the next step, then a return.
  with preemption_lib.Preemption("saving a checkpoint and stopping.") as preemption:
    if checkpoint_every_s is not None and not checkpoint_every_s > 0:
      raise ValueError(f"checkpoint_every_s={checkpoint_every_s} must be > 0")
    if time_limit_s is not None:
      if time_limit_s < 0:
        raise ValueError(f"time_limit_s={time_limit_s} must be >= 0")
      preemption.deadline = time.time() + time_limit_s
    try:
      return _train(
          config,
          pathlib.Path(workdir),
          hooks,
          log_fn,
          preemption,
          allow_config_mismatch,
          checkpoint_every_s,
      )
    except OSError as e:  # a write of config.json or metrics.jsonl
      found = errors.storage_error(e)
      if found is None:
        raise
      raise found from e


@dataclasses.dataclass
class _Loop:
  """A run set up by `_start_loop`, and the state its step loop advances.

  Attributes:
    config: the run config.
    workdir: the run directory.
    start_step: the steps completed when this call started (0, or the resumed checkpoint's).
    num_steps: config.num_train_steps.
    log_every: steps between logged records.
    ckpt_every: steps between checkpoints.
    p_train_step: the pmapped train step.
    state: the replicated TrainState.
    task: the replicated on-device task, or None when the images are rendered on the host.
    weight_table: the replicated loss-weight density.
    example_index: int32 [local devices, per device], this process's global example indices,
      sharded over the local devices.
    images_shape: [local devices, per device, H, W, d], the shape of one step's host-rendered
      images.
    prefetcher: the host-rendered images' prefetcher, or None.
    manager: the checkpoint manager.
    log_fn: as in `train`.
    history: the records logged so far.
    pending: (step, metrics) of the steps whose metrics were not yet checked for NaN/inf.
    window_time: wall time at which the current logging window started.
    window_step: the step after which it started.
    window_wait: the prefetcher's wait_seconds when it started.
    preempted: SIGTERM or the time limit stopped the run.
    saving: the step whose asynchronous save is in flight (None: none).
    ckpt_every_s: seconds between time-triggered saves (None: by steps only).
    last_save_time: wall time of the loop's start or of its last save.
  """

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  start_step: int
  num_steps: int
  log_every: int
  ckpt_every: int
  p_train_step: Callable[..., Any]
  state: TrainState
  task: Any
  weight_table: jax.Array
  example_index: jax.Array
  images_shape: tuple[int, ...]
  prefetcher: Optional[Any]  # the task's train_feed (host-rendered tasks)
  manager: Any
  log_fn: Optional[Callable[[dict[str, Any]], None]]
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)
  pending: list[tuple[int, dict[str, jax.Array]]] = dataclasses.field(default_factory=list)
  window_time: float = 0.0
  window_step: int = 0
  window_wait: float = 0.0
  preempted: bool = False
  saving: Optional[int] = None
  ckpt_every_s: Optional[float] = None
  last_save_time: float = 0.0


def _train(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    hooks: Sequence[Callable[[int], None]],
    log_fn: Optional[Callable[[dict[str, Any]], None]],
    preemption: preemption_lib.Preemption,
    allow_config_mismatch: bool = False,
    checkpoint_every_s: Optional[float] = None,
) -> TrainResult:
  """The body of `train`, with the SIGTERM handler installed."""
  errors.check_writable_dir(workdir)
  example_index = _local_example_index(config)
  model, tx, task, weight_table, state = _build_and_restore(config, workdir, allow_config_mismatch)
  start_step, num_steps = int(state.step), int(config.num_train_steps)
  # Written once the checkpoint to resume (if any) is known to fit this config.
  if jax.process_index() == 0:
    # What a killed or failed save left half written, and the log of steps not in the checkpoint.
    checkpoint.remove_temporaries(workdir)
    _truncate_metrics(workdir / METRICS_FILE, start_step)
    _write_json(workdir / CONFIG_FILE, json.loads(config.to_json_best_effort()))
  if start_step >= num_steps:
    logging.info("Nothing to do: step %d >= num_train_steps %d.", start_step, num_steps)
    return TrainResult(jax.device_get(state), [])

  loop = _start_loop(config, workdir, model, tx, task, weight_table, state, example_index, log_fn)
  loop.ckpt_every_s, loop.last_save_time = checkpoint_every_s, time.time()
  logging.info("Training steps %d..%d in %s", start_step + 1, num_steps, workdir)
  completed = False
  try:
    for step in range(start_step + 1, num_steps + 1):
      _take_step(loop, step)
      for hook in hooks:
        hook(step)
      if _after_step(loop, step, preemption):
        break
    completed = True
  finally:
    if loop.prefetcher is not None:
      loop.prefetcher.close()
    try:
      _finish_save(loop)
    except Exception:  # pylint: disable=broad-except
      if completed:  # else the error that stopped the loop is the one to report
        raise
    finally:
      loop.manager.close()
  return TrainResult(jax.device_get(unreplicate(loop.state)), loop.history, loop.preempted)


# Setup.


def _local_example_index(config: ml_collections.ConfigDict) -> np.ndarray:
  """int32 [local devices, per device]: the global indices of this process's examples.

  Raises:
    ValueError: the batch does not split evenly over the devices.
  """
  num_devices, num_local = jax.device_count(), jax.local_device_count()
  if config.batch_size % num_devices:
    raise errors.ConfigError(
        f"batch_size={config.batch_size} is not divisible by the {num_devices} devices."
    )
  per_device = config.batch_size // num_devices
  accum = train_step.grad_accum_steps(config)
  if per_device % accum:
    raise ValueError(
        f"grad_accum_steps={accum} does not divide the per-device batch "
        f"{per_device} (batch_size={config.batch_size} over {num_devices} devices)"
    )
  local_batch = per_device * num_local
  logging.info(
      "Devices: %d (%d local, %s); batch %d = %d per device; compute dtype %s.",
      num_devices,
      num_local,
      jax.devices()[0].device_kind,
      config.batch_size,
      per_device,
      config.model.dtype,
  )
  # This process's examples: global indices [process * local_batch, ... + local_batch).
  return (jax.process_index() * local_batch + np.arange(local_batch, dtype=np.int32)).reshape(
      num_local, per_device
  )


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Cuts metrics.jsonl back to the records of steps <= `step` (the step resumed from), and
  drops a line that a kill left half written: a resumed run logs the steps after its checkpoint
  again, and each step should appear once."""
  if not path.is_file():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    logging.info(
        "%s: kept the %d records up to step %d, dropped %d.",
        path,
        len(kept),
        step,
        len(lines) - len(kept),
    )
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _build_and_restore(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, allow_config_mismatch: bool = False
):
  """(model, tx, task, weight_table, state): the run's pieces, state resumed from workdir."""
  root = jax.random.key(config.seed)
  state_key, density_key = jax.random.split(root)
  del root  # derive every key from the named splits above

  model = build.make_model(config, training=True)
  tx = build.make_optimizer(config)
  task = tasks.get(config.task).make_data(config)
  weight_table = train_step.make_loss_weight_table(config, density_key)
  state = train_step.create_train_state(config, model, tx, state_key)
  logging.info(
      "U-Net parameters: %s", f"{sum(x.size for x in jax.tree_util.tree_leaves(state.params)):,}"
  )

  restored = checkpoint.restore_latest(workdir, state, config, allow_config_mismatch)
  if restored is not None:
    state = restored
  return model, tx, task, weight_table, state


def _start_loop(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    model: nn.Module,
    tx: optax.GradientTransformation,
    task: Any,
    weight_table: jax.Array,
    state: TrainState,
    example_index: np.ndarray,
    log_fn: Optional[Callable[[dict[str, Any]], None]],
) -> _Loop:
  """Compiles the step, replicates its inputs, starts the image prefetcher and the manager."""
  host_task = None
  if tasks.get(config.task).HOST_RENDERED:
    host_task, task = task, None
  start_step = int(state.step)
  p_train_step = train_step.pmapped_train_step(config, model, tx)
  # Replicated once, with pmap's own axis name (another name would recompile the second step).
  state, task, weight_table = jax_utils.replicate((state, task, weight_table), axis_name="batch")
  # Host-rendered images of step s (state.step = s before it), sharded like example_index.
  prefetcher = None
  if host_task is not None:
    prefetcher = tasks.get(config.task).train_feed(host_task, config, example_index, start_step)
  images_shape = (*example_index.shape, *geometry.image_shape(config))
  example_index = _shard_local(example_index)

  manager = checkpoint.make_manager(workdir, max_to_keep=config.keep_checkpoints)
  return _Loop(
      config=config,
      workdir=workdir,
      start_step=start_step,
      num_steps=int(config.num_train_steps),
      log_every=max(int(config.log_every_steps), 1),
      ckpt_every=max(int(config.checkpoint_every_steps), 1),
      p_train_step=p_train_step,
      state=state,
      task=task,
      weight_table=weight_table,
      example_index=example_index,
      images_shape=images_shape,
      prefetcher=prefetcher,
      manager=manager,
      log_fn=log_fn,
      window_time=time.time(),
      window_step=start_step,
  )


# The step loop.


def _take_step(loop: _Loop, step: int) -> None:
  """Runs train step `step` (asynchronously; its metrics join `loop.pending`)."""
  images = None
  if loop.prefetcher is not None:
    images = _shard_local(loop.prefetcher.get().reshape(loop.images_shape))
  loop.state, metrics = loop.p_train_step(
      loop.state, loop.task, loop.weight_table, loop.example_index, images
  )
  loop.pending.append((step, metrics))
  if step == loop.start_step + 1:
    jax.block_until_ready(metrics)
    logging.info("First step (with compilation) took %.1f s.", time.time() - loop.window_time)
    loop.window_time, loop.window_step = time.time(), step
    loop.window_wait = loop.prefetcher.wait_seconds if loop.prefetcher is not None else 0.0


def _after_step(loop: _Loop, step: int, preemption: preemption_lib.Preemption) -> bool:
  """Logs and checkpoints when due after `step`; returns True to stop (SIGTERM, time limit).

  Raises:
    errors.StorageError: the asynchronous save in flight failed (a full disk): the run stops
      at once rather than at the next save.
  """
  if loop.saving is not None and not loop.manager.is_saving_in_progress():
    _finish_save(loop)
  is_last = step == loop.num_steps
  # Several processes agree on stopping only at logging steps (a collective over all of them).
  if jax.process_count() == 1 or step % loop.log_every == 0 or is_last:
    loop.preempted = preemption.any_process() and not is_last
  if step % loop.log_every == 0 or is_last or loop.preempted:
    _log_record(loop, step)
  if step % loop.ckpt_every == 0 or is_last or loop.preempted or _save_due_by_time(loop, step):
    _save_checkpoint(loop, step)
  if loop.preempted:
    logging.warning(
        "Stopped at step %d after SIGTERM or the time limit; rerun with the "
        "same --workdir to resume.",
        step,
    )
  return loop.preempted


def _save_due_by_time(loop: _Loop, step: int) -> bool:
  """Whether `checkpoint_every_s` has passed since the last save (process 0's clock decides)."""
  if loop.ckpt_every_s is None:
    return False
  due = time.time() - loop.last_save_time >= loop.ckpt_every_s
  if jax.process_count() == 1:
    return due
  if step % loop.log_every:
    return False
  return bool(multihost_utils.broadcast_one_to_all(np.int32(due)))


# Logging and checkpoint hooks.


def _check_pending(loop: _Loop) -> list[dict[str, float]]:
  """Fetches the un-checked metrics and raises NonFiniteLossError on a NaN/inf."""
  records = []
  for step, device_metrics in zip(
      [s for s, _ in loop.pending], jax.device_get([m for _, m in loop.pending])
  ):
    record = {k: float(v[0]) for k, v in device_metrics.items()}
    bad = {k: record[k] for k in ("loss", "grad_norm") if not math.isfinite(record[k])}
    if bad:
      latest = loop.manager.latest_step()
      raise NonFiniteLossError(
          f"Non-finite {bad} at step {step}; stopping without saving this state. "
          + (
              f"Last good checkpoint: step {latest} in {checkpoint.checkpoint_dir(loop.workdir)}."
              if latest is not None
              else "No checkpoint was written yet."
          )
      )
    records.append(record)
  loop.pending.clear()
  return records


def _window_record(loop: _Loop, step: int, now: float) -> dict[str, Any]:
  """The record of the logging window that ends after `step`: metric means, speed, ETA."""
  records = _check_pending(loop)
  steps_per_sec = (step - loop.window_step) / max(now - loop.window_time, 1e-9)
  record = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
  eta = (loop.num_steps - step) / steps_per_sec if steps_per_sec > 0 else math.inf
  record.update(step=step, steps_per_sec=steps_per_sec, eta_sec=eta if math.isfinite(eta) else None)
  if loop.prefetcher is not None:
    # Fraction of the window's wall time spent waiting for host-rendered images.
    record["input_wait"] = (loop.prefetcher.wait_seconds - loop.window_wait) / max(
        now - loop.window_time, 1e-9
    )
    loop.window_wait = loop.prefetcher.wait_seconds
  return record


def _log_record(loop: _Loop, step: int) -> None:
  """Records the window: history, log_fn, metrics.jsonl (process 0), the progress line."""
  now = time.time()
  record = _window_record(loop, step, now)
  loop.history.append(record)
  if loop.log_fn is not None:
    loop.log_fn(record)
  if jax.process_index() == 0:
    path = loop.workdir / METRICS_FILE
    try:
      with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    except OSError as e:
      found = errors.storage_error(e, str(path), f"logging step {step}")
      if found is None:
        raise
      raise found from e
  terms = " ".join(f"{k}={record[k]:.4g}" for k in _PROGRESS_TERMS if k in record)
  if "input_wait" in record:
    terms += f" input_wait={record['input_wait']:.0%}"
  eta = record["eta_sec"] if record["eta_sec"] is not None else math.inf
  logging.info(
      "step %d/%d %s | %.2f steps/s, ETA %s",
      step,
      loop.num_steps,
      terms,
      record["steps_per_sec"],
      _format_duration(eta),
  )
  loop.window_time, loop.window_step = now, step


def _save_checkpoint(loop: _Loop, step: int) -> None:
  """Saves `step` (asynchronously) after checking the pending metrics and the parameters."""
  _check_pending(loop)
  host_state = jax.device_get(unreplicate(loop.state))
  if not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host_state.params)):
    raise NonFiniteLossError(
        f"Parameters became non-finite by step {step}; not saving them. Last good checkpoint: "
        f"step {loop.manager.latest_step()} in {checkpoint.checkpoint_dir(loop.workdir)}."
    )
  _finish_save(loop)
  try:
    started = checkpoint.save(loop.manager, step, host_state, loop.config)
  except Exception as e:  # pylint: disable=broad-except  (a storage fault: one line)
    checkpoint.raise_failed_save(e, loop.workdir, step)
  if started:
    loop.saving = step
  loop.last_save_time = time.time()
  logging.info("Saving checkpoint of step %d (asynchronously).", step)


def _finish_save(loop: _Loop) -> None:
  """Waits for the save in flight; a failed one is removed and raised (StorageError for a
  machine fault)."""
  step, loop.saving = loop.saving, None
  checkpoint.finish_saves(loop.manager, loop.workdir, step)
