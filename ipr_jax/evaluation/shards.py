"""The results of an evaluation run, one file per batch, so that a stopped run can resume: the
files, their format and their writing. The evaluation opens them as one object, `store.ShardStore`.

    <eval dir>/shards/run.json           what the shards were computed with (below)
    <eval dir>/shards/batch_000012.npz   batch 12's per-puzzle arrays; "index": its puzzles

run.json ("format": 2) records the run's full resolved settings: the task, data, model, sampler,
ipr and eval sections with every field (eval.name aside; the sampler and IPR options as the
sampler resolves them, defaults included), the parameters and their digest, and the batching
(`batches_record`: number of batches, puzzles, a digest of every batch's puzzle indices); the
code that computed the shards (`code_record`: ipr_jax.__version__ and a sha256 of every file of
`CODE_FILES`); and the environment they were computed in (`ipr_jax.runtime.environment.record`:
package versions, CPU, backend, device kind and count, numerics options, XLA flags). A run whose
settings differ is refused (`check_settings`) with an error naming every differing field, rather
than mixed with the shards already there; so is a run of other code while shards exist: any change
of a file of `CODE_FILES` (a comment included) requires computing the shards again (delete the
folder or use another config.eval.name); and so is a run in another environment, unless the user
accepts it (`allow_environment_change`), which run.json then records under "environment_changes".
Without shards, run.json's code and environment records are simply brought up to date.

Every shard holds the indices of its puzzles ("index"), the digest of the settings and code it
was computed under ("settings_sha256", `settings_digest`) and of its environment
("environment_sha256"), in this order: index, unknown_patches, nfe, seconds, process, the two
digests, then "score.<name>" [P, budget + 1], "final.<name>" and, if saved, "samples"; the digests
are checked against the run's when a shard is reused (when the store opens) and when the shards
are merged (`ShardStore.read`), so that shards copied into another folder, or left after run.json
was deleted, are not mixed into another run.

Crash safety: a shard or run.json is written to a temporary name (`*.tmp<pid>`), flushed to disk
(fsync), renamed, and the directory fsynced, so a file under its final name is complete even
after a power cut. A process killed mid-write leaves a temporary file; `remove_temporaries`
deletes them when a run starts. A shard damaged all the same (truncated or corrupt on a flaky
disk or network file system) is found when a run starts: opening the store reads every shard in
full (zip CRCs included), deletes a damaged one with a warning, and the run computes it again.

run.json of format 1 (written before the format field existed: variant fields at the paper's
values left out, no code record) is refused with a pointer to experiments/migrate_run_json.py (in
git history at commit a976fd0).
"""

import hashlib
import json
import math
import os
import pathlib
import re
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

import ipr_jax
from ipr_jax import tasks
from ipr_jax.runtime import config_diff
from ipr_jax.runtime import environment as environment_lib
from ipr_jax.runtime import errors

SETTINGS_FILE = "run.json"
# The digests every shard holds (`store.ShardStore.write`).
SETTINGS_DIGEST = "settings_sha256"
ENVIRONMENT_DIGEST = "environment_sha256"
FORMAT = 2
_SHARD_NAME = re.compile(r"batch_(\d{6})\.npz")
_TEMPORARY = re.compile(r".+\.tmp\d*")

# The files of the package that determine an evaluation's per-puzzle results beyond its settings
# and parameters (`code_record`), relative to the package folder. Chosen as the evaluation's own
# module and every module it imports to compute results, with the shipped weights and data those
# read:
#   evaluate.py, evaluation/runner.py, evaluation/settings.py
#                                 the binary; the evaluation program (SRM + IPR, the scores of
#                                 every budget), what a shard holds; a config's key streams,
#                                 sampler options, test puzzles and batches;
#   build/__init__.py, data/geometry.py
#                                 the U-Net a config builds, the image and patch grid shapes;
#   tasks/*.py                    each task's data, test inputs, scores and verifier;
#   sampling/*.py, noise/schedule.py, noise/flow.py, noise/flows.py, noise/gaussian.py
#                                 SRM, IPR and its variants, schedules, the flows (config.flow)
#                                 and their reverse kernels;
#   models/unet.py, models/dit.py, models/tokens.py, models/denoiser.py
#                                 the denoiser (its weights: params_sha256 in the settings);
#   models/classifier.py, models/polygon_scorer.py, metrics/*.py (not the trainers)
#                                 the metrics; metrics/assets/*.npz: their shipped weights;
#   data/*.py, data/assets/mnist_digits_10k*.npz
#                                 the test puzzles (tasks/__init__.py imports every task).
# Left out, as they do not change a puzzle's result (`NOT_IN_CODE_RECORD`): checkpoint.py and
# pretrained.py (reading parameters: their digest is a setting), evaluation/results.py (the merge,
# results.json and, through evaluation/report.py, tables and plots: made again from the shards at
# every merge), cli.py and errors.py (the command line and its messages), config_base.py (the
# configs' defaults and the check of config.flow: resolved values are settings), config_diff.py
# (how settings are compared, and the model section as recorded: a record, not a result),
# evaluation/shards.py and evaluation/store.py (the shard files and their checks: what a shard
# holds, runner.py computes), environment.py (its record is checked on its own), agreement.py,
# preemption.py and host_devices.py (files, processes, devices: results do not depend on the
# device or process count), fit.py (the batch size of eval.batch_size=auto, a recorded setting
# on which no result depends), compilation_cache.py (where compiled programs are kept). The
# configs are not code here: their resolved values are settings. The fingerprint is of whole
# files, bytes as they are: simple and conservative (an edit of evaluate.py's command line or of
# a docstring counts too). Weights
# given by path (eval.classifier_path, eval.scorer_path) are identified by their path only.
# tests/test_evaluate.py checks that every package module the listed modules import is listed or
# left out here, and that every shipped metric and data asset is listed.
CODE_FILES = (
    "evaluate.py",
    "evaluation/runner.py",
    "evaluation/settings.py",
    "build/__init__.py",
    "data/geometry.py",
    "tasks/__init__.py",
    "tasks/base.py",
    "tasks/mnist_sudoku.py",
    "tasks/even_pixels.py",
    "tasks/counting_polygons.py",
    "sampling/__init__.py",
    "sampling/config.py",
    "sampling/patches.py",
    "sampling/inputs.py",
    "sampling/planning.py",
    "sampling/greedy.py",
    "sampling/srm.py",
    "sampling/query.py",
    "sampling/selection.py",
    "sampling/chains.py",
    "sampling/refinement.py",
    "sampling/ipr.py",
    "sampling/time_maps.py",
    "sampling/time_map_sampler.py",
    "noise/schedule.py",
    "noise/flow.py",
    "noise/flows.py",
    "noise/gaussian.py",
    "models/unet.py",
    "models/dit.py",
    "models/tokens.py",
    "models/denoiser.py",
    "models/classifier.py",
    "models/polygon_scorer.py",
    "metrics/sudoku.py",
    "metrics/even_pixels.py",
    "metrics/counting_polygons.py",
    "metrics/assets/mnist_classifier.npz",
    "metrics/assets/mnist_classifier_cell7.npz",
    "metrics/assets/polygon_scorer.npz",
    "data/sudoku.py",
    "data/sudoku_grids.py",
    "data/digits.py",
    "data/even_pixels.py",
    "data/counting_polygons.py",
    "data/assets/mnist_digits_10k.npz",
    "data/assets/mnist_digits_10k_ranking.npz",
)
# Package modules that the modules of CODE_FILES import but that do not determine results.
NOT_IN_CODE_RECORD = (
    "build/cli",
    "build/config_base",
    "build/pretrained",
    "evaluation/fit",
    "evaluation/results",
    "evaluation/shards",
    "evaluation/store",
    "runtime/agreement",
    "runtime/checkpoint",
    "runtime/compilation_cache",
    "runtime/config_diff",
    "runtime/environment",
    "runtime/errors",
    "runtime/host_devices",
    "runtime/preemption",
)
# run.json's records of where the shards were computed, checked apart from the settings.
ENVIRONMENT = "environment"
ENVIRONMENT_CHANGES = "environment_changes"

_PACKAGE_DIR = pathlib.Path(ipr_jax.__file__).resolve().parent


class SettingsMismatchError(errors.ConfigError):
  """The shards in a directory were computed with other settings or code than the current run's,
  or hold other puzzles than the run's batches."""


def code_record(
    package_dir: Optional[str | os.PathLike] = None, files: Sequence[str] = CODE_FILES
) -> dict[str, Any]:
  """The code that computes results: {"ipr_jax_version", "sha256" (of all files), "files":
  {path: sha256 of its bytes}} for `files` (paths relative to `package_dir`, default: the
  installed ipr_jax package, then also the files of registered tasks,
  `tasks.registered_code_files`).

  Raises:
    FileNotFoundError: a file of `files` is missing.
  """
  root = pathlib.Path(package_dir) if package_dir is not None else _PACKAGE_DIR
  paths = {name: root / name for name in files}
  if package_dir is None:
    paths.update(tasks.registered_code_files())
  digests = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in paths.items()}
  overall = hashlib.sha256(
      "".join(f"{name}:{d}\n" for name, d in sorted(digests.items())).encode()
  ).hexdigest()
  return {"ipr_jax_version": ipr_jax.__version__, "sha256": overall, "files": digests}


def batches_record(batches: Sequence[np.ndarray]) -> dict[str, Any]:
  """The batching of a run: number of batches, of puzzles, and a sha256 of every batch's puzzle
  indices in batch order (so that another batch size or another puzzle-to-batch assignment
  differs)."""
  digest = hashlib.sha256()
  for batch in batches:
    batch = np.asarray(batch, dtype="<i8").reshape(-1)
    digest.update(np.int64(len(batch)).astype("<i8").tobytes())
    digest.update(batch.tobytes())
  return {
      "count": len(batches),
      "puzzles": int(sum(len(b) for b in batches)),
      "sha256": digest.hexdigest(),
  }


def _finite_or_text(value: Any) -> Any:
  """JSON-safe settings: tuples as lists, non-finite floats as the strings 'nan', 'inf', '-inf'
  (JSON has no literal for them, and NaN would differ from itself)."""
  if isinstance(value, dict):
    return {str(k): _finite_or_text(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_text(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  return value


def canonical(settings: dict[str, Any]) -> dict[str, Any]:
  """The settings as run.json stores them (tuples become lists, keys sorted)."""
  text = json.dumps(_finite_or_text(settings), sort_keys=True, default=str, allow_nan=False)
  return json.loads(text)


def check_processes_agree(per_process: Sequence[dict[str, Any]]) -> None:
  """Raises SettingsMismatchError unless every process's settings (`canonical`, with their code
  and environment records) equal process 0's; the message names each differing field with
  process 0's value and the other process's, and is the same on every process that calls this
  with the same list (after `agreement.agree`)."""
  found = []
  for process, settings in enumerate(per_process[1:], start=1):
    differing = config_diff.differences(per_process[0], settings, absent="<absent>")
    found += [f"{key}: {a!r} (process 0) vs {b!r} (process {process})" for key, a, b in differing]
  if found:
    raise SettingsMismatchError(
        f"the {len(per_process)} processes of this run would compute different things: "
        f"{_listed(found)}. Give every process the same checkout, environment, config "
        "overrides and checkpoint."
    )


def fsync_dir(directory: pathlib.Path) -> None:
  """Syncs `directory` (its entries: names created, renamed, deleted) where the file system can."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some file systems (network, FUSE) cannot sync a directory
    pass
  finally:
    os.close(fd)


def _write_atomically(path: pathlib.Path, write) -> None:
  """Calls write(binary file) on a temporary file, syncs it, renames it to `path`, syncs the
  directory: `path` is the complete file or absent, also after a crash or power cut."""
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    tmp.unlink(missing_ok=True)
    if isinstance(e, OSError) and e.filename is None:  # a failed write names no file
      e.filename = str(path)
    raise
  fsync_dir(path.parent)


def write_settings(shard_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
  """Writes run.json (format 2) atomically, creating the directory."""
  shard_dir = pathlib.Path(shard_dir)
  shard_dir.mkdir(parents=True, exist_ok=True)
  record = {**canonical(settings), "format": FORMAT}
  text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False)
  _write_atomically(shard_dir / SETTINGS_FILE, lambda f: f.write(text.encode()))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """'key: old -> new' for every differing dotted key (`config_diff.differences`)."""
  return [
      f"{k}: {a!r} -> {b!r}" for k, a, b in config_diff.differences(old, new, absent="<absent>")
  ]


def _listed(items: list[str], limit: int = 10) -> str:
  more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
  return "; ".join(items[:limit]) + more


def settings_digest(settings: dict[str, Any]) -> str:
  """sha256 of the settings and code record as run.json stores them, without the environment
  records: what every shard of a run holds as "settings_sha256"."""
  kept = {
      k: v
      for k, v in canonical(settings).items()
      if k not in (ENVIRONMENT, ENVIRONMENT_CHANGES, "format")
  }
  return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def check_settings(
    shard_dir: str | os.PathLike,
    settings: dict[str, Any],
    write: bool = False,
    check_code: bool = True,
    allow_environment_change: bool = False,
) -> Optional[set[str]]:
  """Checks `settings` (with their "code" and "environment" records, if any) against the shard
  directory's run.json.

  With `write`, creates run.json if absent, and brings its "code" and "environment" records up to
  date when only they differ and no shard exists yet (nothing computed by the other code or in
  the other environment would be reused). With shards, another environment is refused unless
  `allow_environment_change`; accepted, the new environment is appended to run.json's
  "environment_changes". `check_code=False` compares everything but the code and environment
  records (to check a committed run.json, a record, against a config).

  Returns:
    The digests of the environments whose shards this run may reuse (`environment.digest`), or
    None for any (no environment record to compare, or a change accepted).

  Raises:
    SettingsMismatchError: run.json exists and differs, or is not of format 2; the message names
      every differing key with both values.
    FileNotFoundError: run.json is absent and `write` is False.
  """
  shard_dir = pathlib.Path(shard_dir)
  path = shard_dir / SETTINGS_FILE
  settings = {**canonical(settings), "format": FORMAT}
  if not path.exists():
    if not write:
      raise FileNotFoundError(f"{path} does not exist (process 0 writes it first)")
    write_settings(shard_dir, settings)
    return _environment_digests(settings)
  stored = _read_settings(path)
  code_old, code_new = stored.pop("code", None), settings.pop("code", None)
  env_old, env_new = stored.pop(ENVIRONMENT, None), settings.pop(ENVIRONMENT, None)
  changes = stored.pop(ENVIRONMENT_CHANGES, [])
  differing = _differences(stored, settings)
  if differing:
    raise SettingsMismatchError(
        f"{shard_dir} holds results computed with other settings: {_listed(differing)}. Use "
        "another config.eval.name, or delete that directory to start over."
    )
  if not check_code:
    return None
  has_shards = bool(done_batches(shard_dir))
  if code_old != code_new:
    if has_shards or not write:
      differing = _differences({"code": code_old}, {"code": code_new})
      raise SettingsMismatchError(
          f"{shard_dir} holds results computed by other code: {_listed(differing)}. A change of "
          "the code that computes results (eval_shards.CODE_FILES) requires computing the shards "
          "again: delete that directory, or use another config.eval.name."
      )
  current = {**settings, "code": code_new, ENVIRONMENT: env_new}
  if env_new is None or env_new == env_old or env_new in changes:
    if write and code_old != code_new:
      logging.info("%s: no shards yet; recording this run's code in run.json", path)
      write_settings(shard_dir, {**current, ENVIRONMENT_CHANGES: changes} if changes else current)
    return _environment_digests({ENVIRONMENT: env_old, ENVIRONMENT_CHANGES: changes})
  if not has_shards:
    if write:
      logging.info("%s: no shards yet; recording this run's code and environment", path)
      write_settings(shard_dir, current)
    return _environment_digests(current)
  differing = _differences({ENVIRONMENT: env_old}, {ENVIRONMENT: env_new})
  if not allow_environment_change:
    raise SettingsMismatchError(
        f"{shard_dir} holds results computed in another environment: {_listed(differing)}. "
        "Shards of another environment can differ in single puzzles (XLA, CPU kind, flags); "
        "delete that directory or use another config.eval.name to compute them again, or pass "
        "--allow_environment_change (evaluate(..., allow_environment_change=True)) to reuse them "
        "(recorded in run.json and results.json)."
    )
  logging.warning(
      "%s: reusing shards of another environment (%s), as allowed", shard_dir, _listed(differing)
  )
  if write:
    write_settings(
        shard_dir, {**current, ENVIRONMENT: env_old, ENVIRONMENT_CHANGES: [*changes, env_new]}
    )
  return None


def _read_settings(path: pathlib.Path) -> dict[str, Any]:
  """run.json of format 2 as a dict."""
  try:
    stored = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SettingsMismatchError(
        f"{path} is not valid JSON ({e}); delete {path.parent} to start " "the evaluation over"
    ) from None
  if not isinstance(stored, dict) or stored.get("format") != FORMAT:
    found = stored.get("format", 1) if isinstance(stored, dict) else "unknown"
    raise SettingsMismatchError(
        f"{path} is of format {found}, not {FORMAT}: written by an earlier ipr-jax, it records "
        "neither every setting nor the code, so its shards cannot be checked against this run. "
        f"Delete {path.parent} to compute them again (experiments/migrate_run_json.py at commit "
        "a976fd0 converts such a file, to keep it as a record)."
    )
  return stored


def _environment_digests(settings: dict[str, Any]) -> Optional[set[str]]:
  """The digests of run.json's environment and accepted changes; None without a record."""
  if settings.get(ENVIRONMENT) is None:
    return None
  return {
      environment_lib.digest(e)
      for e in [settings[ENVIRONMENT], *settings.get(ENVIRONMENT_CHANGES, [])]
  }


def shard_path(shard_dir: str | os.PathLike, batch: int) -> pathlib.Path:
  return pathlib.Path(shard_dir) / f"batch_{batch:06d}.npz"


def write_shard(shard_dir: str | os.PathLike, batch: int, arrays: dict[str, np.ndarray]) -> None:
  """Writes batch `batch`'s arrays atomically and durably (temporary file, fsync, rename, fsync
  of the directory)."""
  _write_atomically(shard_path(shard_dir, batch), lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]  # numpy's stub


def done_batches(shard_dir: str | os.PathLike) -> set[int]:
  """The batch numbers whose shard files exist (by name: the store reads them when it opens)."""
  shard_dir = pathlib.Path(shard_dir)
  if not shard_dir.is_dir():
    return set()
  return {int(m.group(1)) for m in map(_SHARD_NAME.fullmatch, os.listdir(shard_dir)) if m}


def remove_temporaries(shard_dir: str | os.PathLike) -> list[str]:
  """Deletes the temporary files (`*.tmp*`) that writes killed midway left; returns their names.
  Call only when no process of the run writes (process 0, before the others start)."""
  shard_dir = pathlib.Path(shard_dir)
  if not shard_dir.is_dir():
    return []
  removed = sorted(name for name in os.listdir(shard_dir) if _TEMPORARY.fullmatch(name))
  for name in removed:
    (shard_dir / name).unlink(missing_ok=True)
  return removed


def load_shard(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every array of a shard, read in full (so that the zip's CRCs are checked)."""
  with np.load(path) as data:
    return {k: data[k] for k in data.files}
