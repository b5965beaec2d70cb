"""Orbax checkpoints of SRM training runs: save, resume, and load parameters for evaluation.

Layout of a run directory (`workdir`):

  workdir/config.json                     resolved config, written when training starts
  workdir/metrics.jsonl                   training metrics, one JSON object per logged step
  workdir/checkpoints/<step>/state        the TrainState (Orbax StandardSave, host numpy arrays)
  workdir/checkpoints/<step>/config       the config as JSON (Orbax JsonSave), beside the state
  workdir/checkpoints/<step>/digest       sha256 of the live and the EMA parameters and of the
                                          whole state (JsonSave)

The digests are written with every save and checked at every restore: a checkpoint whose files
changed since (a flipped byte) is refused with `CheckpointError` naming it. A checkpoint written
before the digests were (no `digest` item) still restores, unchecked, with a warning. The config
stored beside the state is compared with the run's on the fields that define what the weights
mean (`WEIGHT_FIELDS`: the task, the data's geometry, the U-Net's architecture):
`check_stored_config` refuses a checkpoint of another geometry (`ConfigMismatchError`) unless
told to allow it.

The state holds the U-Net's inner parameter dict (what `model.init(...)['params']` returns), so a
model is applied as `model.apply({'params': params}, ...)`.

Anything that is not such a checkpoint (missing, empty, corrupt, or written by another program)
raises `CheckpointError` naming the path, instead of an Orbax or tensorstore trace.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import time
from typing import Any, Mapping, NoReturn, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from ipr_jax.runtime import config_diff
from ipr_jax.runtime import errors

CHECKPOINT_DIR = "checkpoints"
_STATE = "state"
_CONFIG = "config"
_DIGEST = "digest"
_STATE_KEYS = frozenset({"step", "params", "opt_state", "ema_params", "rng"})
# The digest item's fields: which parameters of the state each one covers; "state_sha256"
# covers every leaf (the optimizer state, step and PRNG too).
_DIGEST_FIELDS = {"params_sha256": "params", "ema_params_sha256": "ema_params"}
_STATE_DIGEST = "state_sha256"
# What Orbax names a step directory while it is being written (left behind by a killed or failed
# save; never a checkpoint).
_TEMPORARY = re.compile(r"\d+\.orbax-checkpoint-tmp.*")

# The config fields that define what a checkpoint's weights mean: its task, the flow it was
# trained with (its output is in that flow's parameterisation), the data's geometry and the
# denoiser's architecture (the whole model section but for the fields named in
# _FREE_MODEL_FIELDS). A run whose config differs from the checkpoint's in one of them is refused
# (`check_stored_config`). The output layout (prediction, variance interpolation, per-patch
# sigma) is fixed in the code.
WEIGHT_FIELDS = (
    "task",
    "flow",
    "data.image_size",
    "data.patch_size",
    "data.channels",
    "data.cell_size",
    "data.box_size",
    "model",
)
# Model fields that leave the weights' meaning as it is: the compute dtype (float32 weights
# either way), the training dropout, and the preset's informational name.
_FREE_MODEL_FIELDS = frozenset({"dtype", "dropout", "name"})


class CheckpointError(errors.ConfigError):
  """A path that should hold an ipr_jax checkpoint does not hold a usable one."""


class ConfigMismatchError(CheckpointError):
  """A checkpoint's stored config differs from the run's in a field of `WEIGHT_FIELDS`."""


def state_digest(state: Any) -> str:
  """sha256 of every leaf of a TrainState (names as 'a/b/c' paths, sorted; shapes, dtypes,
  values): the same for the state saved and the target-less restore of it, whose containers
  differ (dicts for dataclasses and named tuples)."""
  digest = hashlib.sha256()
  for name, leaf in sorted(_flat(jax.device_get(state)).items()):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{name}:{leaf.shape}:{leaf.dtype};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def params_digest(params: Any) -> str:
  """sha256 of the parameters' names, shapes, dtypes and values (identifies a checkpoint; also
  what run.json records as params_sha256, `evaluation.settings.params_digest`)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(params)):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


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
      max_to_keep=max_to_keep,
      create=not read_only,
      read_only=read_only,
      # Step directories that a killed or failed save left half written.
      cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(
      checkpoint_dir(workdir).absolute(),
      options=options,
      item_handlers={
          _STATE: ocp.StandardCheckpointHandler(),
          _CONFIG: ocp.JsonCheckpointHandler(),
          _DIGEST: ocp.JsonCheckpointHandler(),
      },
  )


def remove_temporaries(workdir: str | os.PathLike) -> list[str]:
  """Deletes the step directories that a killed or failed save left half written
  (`<step>.orbax-checkpoint-tmp*`); returns their names. Call when no save is in flight."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  removed = sorted(p.name for p in directory.iterdir() if _TEMPORARY.fullmatch(p.name))
  for name in removed:
    shutil.rmtree(directory / name, ignore_errors=True)
  return removed


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
  digests = {key: params_digest(getattr(host_state, name)) for key, name in _DIGEST_FIELDS.items()}
  digests[_STATE_DIGEST] = state_digest(host_state)
  return manager.save(
      step,
      args=ocp.args.Composite(
          **{
              _STATE: ocp.args.StandardSave(host_state),
              _CONFIG: ocp.args.JsonSave(_config_as_json(config)),
              _DIGEST: ocp.args.JsonSave({"format": 1, **digests}),
          }
      ),
  )


def finish_saves(manager: ocp.CheckpointManager, workdir: str | os.PathLike, step: Any = None):
  """Waits for the manager's asynchronous saves to end.

  A save that failed leaves nothing behind that a rerun would trust or that blocks it: its
  half-written step directory is removed before the error is raised.

  Raises:
    errors.StorageError: the save failed for a machine fault (a full disk, a read-only
      directory), naming the checkpoint directory and what to do.
  """
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise_failed_save(e, workdir, step)


def raise_failed_save(error: Exception, workdir: str | os.PathLike, step: Any = None) -> NoReturn:
  """Removes the half-written step directories of a failed save, then raises `error`, as an
  errors.StorageError naming the checkpoint directory if it is a machine fault.

  The save's other writes may still be in flight when its first error surfaces (tensorstore
  goes on writing the other arrays and recreates the directory), so the removal is repeated
  until the directory stays gone for a moment (at most a few seconds; a rerun removes what is
  left and never takes it for a checkpoint).
  """
  deadline, quiet_since = time.time() + 5.0, None
  while time.time() < deadline:
    if remove_temporaries(workdir):
      quiet_since = None
    elif quiet_since is None:
      quiet_since = time.time()
    elif time.time() - quiet_since > 0.5:
      break
    time.sleep(0.05)
  doing = "saving a checkpoint" if step is None else f"saving the checkpoint of step {step}"
  found = errors.storage_error(error, str(checkpoint_dir(workdir)), doing)
  if found is None:
    raise error
  raise found from error


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


def restore_latest(
    workdir: str | os.PathLike,
    target_state: Any,
    config: Any = None,
    allow_config_mismatch: bool = False,
) -> Any | None:
  """Restores the newest checkpoint of a run, for resuming it.

  Args:
    workdir: the run directory (holding `checkpoints/`).
    target_state: a single-device TrainState with the expected structure, shapes and dtypes.
    config: the run's config, compared with the checkpoint's (`check_stored_config`); None: not
      compared.
    allow_config_mismatch: resume even if the configs differ in a field of `WEIGHT_FIELDS`.

  Returns:
    The restored TrainState (host numpy leaves), or None if the run has no checkpoint yet.

  Raises:
    CheckpointError: the checkpoint directory exists but its newest checkpoint cannot be read,
      does not match `target_state` or its digest, or (ConfigMismatchError) was trained with
      another geometry or architecture than `config`.
  """
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return None
  if not directory.is_dir():
    raise CheckpointError(f"{directory} exists but is not a directory.")
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps:
    # Half-written step directories of a killed or failed save are not a foreign checkpoint.
    if any(not _TEMPORARY.fullmatch(p.name) for p in directory.iterdir()):
      raise CheckpointError(
          f"{directory} is not empty but holds no checkpoint steps; refusing to start over on "
          "top of it. Use a fresh --workdir or remove that directory."
      )
    return None
  step_dir = directory / str(steps[-1])
  if config is not None:
    check_stored_config(step_dir, config, allow_config_mismatch)
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
  state = _state_dict(restored, step_dir)
  check_digests(step_dir, state)
  return state


def _restore_json(step_dir: pathlib.Path, item: str, what: str) -> Any:
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      return checkpointer.restore((step_dir / item).absolute())
  except Exception as e:  # Orbax raises many types; report them as one.
    raise CheckpointError(
        f"Could not read the {what} stored in {step_dir}: {type(e).__name__}: {e}"
    ) from e


def recorded_digests(step_dir: str | os.PathLike) -> Optional[dict[str, str]]:
  """The parameter digests recorded when `step_dir` was saved ({'params_sha256': ...,
  'ema_params_sha256': ...}), or None for a checkpoint written before digests were."""
  step_dir = pathlib.Path(step_dir)
  if not (step_dir / _DIGEST).exists():
    return None
  record = _restore_json(step_dir, _DIGEST, "parameter digests")
  if not isinstance(record, Mapping) or not all(k in record for k in _DIGEST_FIELDS):
    raise CheckpointError(
        f"{step_dir / _DIGEST} is damaged: it does not hold the parameter digests "
        f"{sorted(_DIGEST_FIELDS)}; use another step or checkpoint."
    )
  return {k: str(record[k]) for k in (*_DIGEST_FIELDS, _STATE_DIGEST) if k in record}


def check_digests(step_dir: str | os.PathLike, state: Mapping[str, Any]) -> None:
  """Checks a restored state's live and EMA parameters against the digests recorded at save.

  Raises:
    CheckpointError: a digest differs (the checkpoint's files changed since it was saved).
  """
  step_dir = pathlib.Path(step_dir)
  recorded = recorded_digests(step_dir)
  if recorded is None:
    logging.warning(
        "%s has no parameter digest (written before ipr_jax recorded them): its parameters "
        "are not checked.",
        step_dir,
    )
    return
  for key, name in _DIGEST_FIELDS.items():
    if params_digest(state[name]) != recorded[key]:
      raise CheckpointError(
          f"{step_dir}: its {name} do not match the sha256 recorded when it was saved "
          f"({step_dir / _DIGEST}): the checkpoint's files changed or were damaged since; use "
          "another step or checkpoint, or train again."
      )
  if _STATE_DIGEST in recorded and state_digest(state) != recorded[_STATE_DIGEST]:
    raise CheckpointError(
        f"{step_dir}: its optimizer state, step or PRNG do not match the sha256 recorded when it "
        f"was saved ({step_dir / _DIGEST}): the checkpoint's files changed or were damaged "
        "since; use another step or checkpoint."
    )


def _weight_fields(config: Mapping[str, Any]) -> dict[str, Any]:
  """The values of `WEIGHT_FIELDS` in a config as JSON, as {'a.b': value} (absent ones left
  out; a config without `model.kind` or `flow` is a U-Net's and the rectified flow's, as every
  config was before the DiT and the other flows existed)."""
  as_json: dict[str, Any] = json.loads(json.dumps(config, default=str))
  if isinstance(as_json.get("model"), dict):
    as_json["model"] = config_diff.model_record(as_json["model"])
    as_json["model"].setdefault("kind", "unet")
  flat = config_diff.flatten(config_diff.with_flow(as_json))
  chosen = {}
  for key, value in flat.items():
    for field in WEIGHT_FIELDS:
      if key == field or key.startswith(field + "."):
        if field == "model" and key.split(".", 1)[1] in _FREE_MODEL_FIELDS:
          break
        chosen[key] = value
        break
  return chosen


def config_mismatches(stored: Mapping[str, Any], config: Any) -> list[tuple[str, Any, Any]]:
  """(field, the checkpoint's value, the run's value) of every field of `WEIGHT_FIELDS` in which
  a checkpoint's stored config and the run's `config` differ, sorted. A field one side lacks (a
  config of an older or newer version) is not compared."""
  ours, theirs = _weight_fields(_config_as_json(config)), _weight_fields(dict(stored))
  return [
      (key, theirs[key], ours[key])
      for key in sorted(ours.keys() & theirs.keys())
      if theirs[key] != ours[key]
  ]


def check_stored_config(
    path: str | os.PathLike, config: Any, allow_mismatch: bool = False
) -> list[tuple[str, Any, Any]]:
  """Compares the config stored with a checkpoint with the run's on `WEIGHT_FIELDS`.

  Args:
    path: a run directory, its `checkpoints/` directory or one step directory.
    config: the run's config (ConfigDict or mapping).
    allow_mismatch: only warn (the user reuses the weights under another config on purpose).

  Returns:
    The differences (empty if none), as `config_mismatches`.

  Raises:
    ConfigMismatchError: they differ and `allow_mismatch` is False; the message names every
      differing field with both values.
  """
  step_dir = find_step_dir(path)
  differences = config_mismatches(restore_config(step_dir), config)
  if not differences:
    return []
  listed = "; ".join(f"{key}: {a!r} (checkpoint) vs {b!r} (this run)" for key, a, b in differences)
  if allow_mismatch:
    logging.warning("Using %s under another config (allowed): %s", step_dir, listed)
    return differences
  raise ConfigMismatchError(
      f"{step_dir} was trained with another config in fields that define what its weights mean: "
      f"{listed}. Use the config it was trained with (stored in {step_dir / _CONFIG}), or pass "
      "--allow_config_mismatch to use it anyway."
  )


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
  return _restore_json(step_dir, _CONFIG, "config")


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
  from ipr_jax.runtime import train_state  # pylint: disable=g-import-not-at-top

  state = train_state.TrainState.create(params, tx, jax.random.key(seed))
  if ema_params is not None:
    state = state.replace(ema_params=ema_params)
  state = state.replace(step=np.asarray(step, np.int32))
  try:
    manager = make_manager(workdir)
  except OSError as e:  # e.g. workdir is a file
    raise_failed_save(e, workdir, step)
  with manager:
    try:
      save(manager, step, state, config)
    except Exception as e:  # pylint: disable=broad-except
      raise_failed_save(e, workdir, step)
    finish_saves(manager, workdir, step)
  return checkpoint_dir(workdir) / str(step)
