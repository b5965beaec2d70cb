"""Orbax checkpoints of SRM training runs: save, resume, and load parameters for evaluation.

Layout of a run directory (`workdir`):

  workdir/config.json                     resolved config, written when training starts
  workdir/metrics.jsonl                   training metrics, one JSON object per logged step
  workdir/checkpoints/<step>/state        the TrainState (Orbax StandardSave, host numpy arrays)
  workdir/checkpoints/<step>/config       the config as JSON (Orbax JsonSave), beside the state

The state holds the U-Net's inner parameter dict (what `model.init(...)['params']` returns), so a
model is applied as `model.apply({'params': params}, ...)`.

Anything that is not such a checkpoint (missing, empty, corrupt, or written by another program)
raises `CheckpointError` naming the path, instead of an Orbax or tensorstore trace.
"""

import json
import os
import pathlib
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from ipr_jax import errors

CHECKPOINT_DIR = "checkpoints"
_STATE = "state"
_CONFIG = "config"
_STATE_KEYS = frozenset({"step", "params", "opt_state", "ema_params", "rng"})


class CheckpointError(errors.ConfigError):
  """A path that should hold an ipr_jax checkpoint does not hold a usable one."""


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
  """`workdir/checkpoints`."""
  return pathlib.Path(workdir) / CHECKPOINT_DIR


def make_manager(
    workdir: str | os.PathLike,
    max_to_keep: int | None = None,
    read_only: bool = False,
) -> ocp.CheckpointManager:
  """A CheckpointManager for `workdir/checkpoints` with items 'state' and 'config'.

  The caller decides when to save (`save` below); the manager keeps the newest `max_to_keep`
  checkpoints (all if None) and saves asynchronously: call `wait_until_finished()` before exit.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only
  )
  return ocp.CheckpointManager(
      checkpoint_dir(workdir).absolute(),
      options=options,
      item_handlers={
          _STATE: ocp.StandardCheckpointHandler(),
          _CONFIG: ocp.JsonCheckpointHandler(),
      },
  )


def _config_as_json(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def save(manager: ocp.CheckpointManager, step: int, state: Any, config: Any) -> bool:
  """Starts an (asynchronous) save of `state` and `config` at `step`.

  Args:
    manager: from `make_manager`.
    step: the step number naming the checkpoint.
    state: a single-device (unreplicated) TrainState; it is copied to host memory first, so the
      caller may donate or overwrite its device buffers right after this call returns.
    config: the run's config (ConfigDict or JSON-serialisable mapping).

  Returns:
    Whether a save was started (False if this step is already saved).
  """
  if step in manager.all_steps():
    return False
  # Real copies: on CPU a device_get result can alias a device buffer that a later donated step
  # overwrites while the asynchronous save is still reading it.
  host_state = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), state)
  return manager.save(
      step,
      args=ocp.args.Composite(
          **{
              _STATE: ocp.args.StandardSave(host_state),
              _CONFIG: ocp.args.JsonSave(_config_as_json(config)),
          }
      ),
  )


def _path_str(path: tuple[Any, ...]) -> str:
  """'params/dense/kernel' for a jax key path; attribute, dict and index keys look alike."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _flat(tree: Any) -> dict[str, Any]:
  return {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _restore_into(restored: Mapping[str, Any], target: Any, step_dir: pathlib.Path) -> Any:
  """Fills `target`'s structure with the arrays of a target-less restore, checking every leaf.

  A target-less restore returns dicts and lists where the target has dataclasses and (named)
  tuples, and drops empty optax states; both sides are compared as flat 'a/b/c' paths.
  """
  saved = _flat(restored)
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  expected = [(_path_str(p), t) for p, t in paths_and_leaves]
  missing = [p for p, _ in expected if p not in saved]
  extra = sorted(set(saved) - {p for p, _ in expected})
  if missing or extra:
    raise CheckpointError(
        f"Checkpoint {step_dir} does not match this model/optimizer: missing {missing[:5]}, "
        f"unexpected {extra[:5]}. Is it from a different config?"
    )
  leaves = []
  for p, t in expected:
    r = np.asarray(saved[p])
    t = np.asarray(t)
    if r.shape != t.shape or r.dtype != t.dtype:
      raise CheckpointError(
          f"Checkpoint {step_dir} does not match this model/optimizer at {p}: saved "
          f"{r.dtype}{list(r.shape)}, expected {t.dtype}{list(t.shape)}. "
          "Is it from a different config?"
      )
    leaves.append(r)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def restore_latest(workdir: str | os.PathLike, target_state: Any) -> Any | None:
  """Restores the newest checkpoint of a run, for resuming it.

  Args:
    workdir: the run directory (holding `checkpoints/`).
    target_state: a single-device TrainState with the expected structure, shapes and dtypes.

  Returns:
    The restored TrainState (host numpy leaves), or None if the run has no checkpoint yet.

  Raises:
    CheckpointError: the checkpoint directory exists but its newest checkpoint cannot be read or
      does not match `target_state`.
  """
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return None
  if not directory.is_dir():
    raise CheckpointError(f"{directory} exists but is not a directory.")
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps:
    if any(directory.iterdir()):
      raise CheckpointError(
          f"{directory} is not empty but holds no checkpoint steps; refusing to start over on "
          "top of it. Use a fresh --workdir or remove that directory."
      )
    return None
  step_dir = directory / str(steps[-1])
  restored = _restore_state_dict(step_dir)
  state = _restore_into(restored, jax.device_get(target_state), step_dir)
  logging.info("Restored step %d from %s", int(state.step), step_dir)
  return state


def _state_dict(restored: Any, step_dir: pathlib.Path) -> dict[str, Any]:
  if not isinstance(restored, Mapping) or not _STATE_KEYS <= set(restored):
    keys = sorted(restored) if isinstance(restored, Mapping) else type(restored).__name__
    raise CheckpointError(
        f"{step_dir} is an Orbax checkpoint but not an ipr_jax TrainState (found {keys}, "
        f"expected {sorted(_STATE_KEYS)})."
    )
  return dict(restored)


def find_step_dir(path: str | os.PathLike, step: int | None = None) -> pathlib.Path:
  """Resolves a run directory, its `checkpoints/` directory or one step directory to a step dir.

  Args:
    path: `workdir`, `workdir/checkpoints` or `workdir/checkpoints/<step>`.
    step: which step to pick when `path` holds several (default: the newest).

  Raises:
    FileNotFoundError: `path` does not exist.
    CheckpointError: `path` holds no checkpoint.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No checkpoint at {path}: the path does not exist.")
  if (path / _STATE).is_dir():
    if step is not None and path.name != str(step):
      raise CheckpointError(f"{path} is the checkpoint of step {path.name}, not {step}.")
    return path
  if (path / CHECKPOINT_DIR).is_dir():
    path = path / CHECKPOINT_DIR
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / _STATE).is_dir())
  if not steps:
    raise CheckpointError(
        f"No ipr_jax checkpoint in {path}: expected a run directory, its '{CHECKPOINT_DIR}' "
        f"directory or a step directory holding '{_STATE}/'."
    )
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"No checkpoint of step {step} in {path}; available: {steps}.")
  return path / str(step)


def _restore_state_dict(step_dir: pathlib.Path) -> dict[str, Any]:
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore((step_dir / _STATE).absolute())
  except Exception as e:  # Orbax/tensorstore raise many types; report them as one.
    raise CheckpointError(
        f"Could not read the checkpoint in {step_dir}: {type(e).__name__}: {e}"
    ) from e
  return _state_dict(restored, step_dir)


def restore_params(path: str | os.PathLike, which: str = "ema", step: int | None = None) -> dict:
  """Loads U-Net parameters from a checkpoint without needing a target structure.

  Args:
    path: a run directory, its `checkpoints/` directory or one step directory.
    which: 'ema' for the EMA weights (what the reference samples with) or 'live' for the
      optimised weights.
    step: the step to load (default: the newest).

  Returns:
    The inner parameter dict (use as `model.apply({'params': params}, ...)`), numpy leaves.
  """
  keys = {"ema": "ema_params", "live": "params"}
  if which not in keys:
    raise errors.ConfigError(f"which must be 'ema' or 'live', got {which!r}.")
  step_dir = find_step_dir(path, step)
  params = _restore_state_dict(step_dir)[keys[which]]
  return jax.tree_util.tree_map(np.asarray, params)


def restore_config(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """The config stored beside a checkpoint, as a plain dict (see `restore_params` for `path`)."""
  step_dir = find_step_dir(path, step)
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      return checkpointer.restore((step_dir / _CONFIG).absolute())
  except Exception as e:  # Orbax raises many types; report them as one.
    raise CheckpointError(
        f"Could not read the config stored in {step_dir}: {type(e).__name__}: {e}"
    ) from e


def save_params_checkpoint(
    workdir: str | os.PathLike,
    params: Any,
    config: Any,
    tx: Any,
    ema_params: Any = None,
    step: int = 0,
    seed: int = 0,
) -> pathlib.Path:
  """Writes a full training checkpoint from imported parameters (e.g. converted PyTorch weights).

  The optimizer state is fresh (`tx.init(params)`), so training can continue from it, and
  `restore_params` reads it like any other checkpoint.

  Args:
    workdir: the run directory to write into (`workdir/checkpoints/<step>`).
    params: the live parameters (inner dict).
    config: the config to store beside the state.
    tx: the optimizer, e.g. `ipr_jax.build.make_optimizer(config)`.
    ema_params: EMA parameters (default: a copy of `params`).
    step: the step number to record (e.g. the reference's global_step).
    seed: seed of the PRNG key stored in the state.

  Returns:
    The written step directory.
  """
  from ipr_jax import train_state  # pylint: disable=g-import-not-at-top

  state = train_state.TrainState.create(params, tx, jax.random.key(seed))
  if ema_params is not None:
    state = state.replace(ema_params=ema_params)
  state = state.replace(step=np.asarray(step, np.int32))
  with make_manager(workdir) as manager:
    save(manager, step, state, config)
    manager.wait_until_finished()
  return checkpoint_dir(workdir) / str(step)
