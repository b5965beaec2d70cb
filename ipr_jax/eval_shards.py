"""The results of an evaluation run, one file per batch, so that a stopped run can resume.

    <eval dir>/shards/run.json           what the shards were computed with (below)
    <eval dir>/shards/batch_000012.npz   batch 12's per-puzzle arrays; "index": its puzzles

run.json ("format": 2) records the run's full resolved settings: the task, data, model, sampler,
ipr and eval sections with every field (eval.name aside; the sampler and IPR options as the
sampler resolves them, defaults included), the parameters and their digest, and the batching
(`batches_record`: number of batches, puzzles, a digest of every batch's puzzle indices); and the
code that computed the shards (`code_record`: ipr_jax.__version__ and a sha256 of every file of
`CODE_FILES`). A run whose settings differ is refused (`check_settings`) with an error naming
every differing field, rather than mixed with the shards already there; so is a run of other
code while shards exist: any change of a file of `CODE_FILES` (a comment included) requires
computing the shards again (delete the folder or use another config.eval.name). Without shards,
run.json's code record is simply brought up to date.

Every shard holds the indices of its puzzles ("index"); they are checked against the run's
batches when a shard is reused (`verify_shards`) and when the shards are merged (`read_shards`).

Crash safety: a shard or run.json is written to a temporary name (`*.tmp<pid>`), flushed to disk
(fsync), renamed, and the directory fsynced, so a file under its final name is complete even
after a power cut. A process killed mid-write leaves a temporary file; `remove_temporaries`
deletes them when a run starts. A shard damaged all the same (truncated or corrupt on a flaky
disk or network file system) is found when a run starts: `verify_shards` reads every shard in
full (zip CRCs included), deletes a damaged one with a warning, and the run computes it again.

run.json of format 1 (written before the format field existed: variant fields at the paper's
values left out, no code record) is refused with a pointer to experiments/migrate_run_json.py.
"""

import hashlib
import json
import math
import os
import pathlib
import re
from typing import Any, Iterable, Optional, Sequence

from absl import logging
import numpy as np

import ipr_jax
from ipr_jax import config_diff

SETTINGS_FILE = "run.json"
FORMAT = 2
_SHARD_NAME = re.compile(r"batch_(\d{6})\.npz")
_TEMPORARY = re.compile(r".+\.tmp\d*")

# The files of the package that determine an evaluation's per-puzzle results beyond its settings
# and parameters (`code_record`), relative to the package folder. Chosen as the evaluation's own
# module and every module it imports to compute results, with the shipped weights and data those
# read:
#   evaluate.py, evaluation.py    the binary; key streams, what a shard holds;
#   build.py                      the U-Net a config builds;
#   tasks/*.py                    each task's data, test inputs, scores and verifier;
#   sampler.py, schedule.py, flow.py, gaussian.py
#                                 SRM, IPR and its variants, schedules, the reverse kernel;
#   models/unet.py, models/denoiser.py
#                                 the denoiser (its weights: params_sha256 in the settings);
#   models/classifier.py, models/polygon_scorer.py, metrics/*.py (not the trainers)
#                                 the metrics; metrics/assets/*.npz: their shipped weights;
#   data/*.py, data/assets/mnist_digits_10k.npz
#                                 the test puzzles (tasks/__init__.py imports every task).
# Left out, as they do not change a puzzle's result (`NOT_IN_CODE_RECORD`): checkpoint.py and
# pretrained.py (reading parameters: their digest is a setting), eval_report.py (tables and plots,
# made again from the shards at every merge), cli.py (the command line), eval_shards.py,
# agreement.py, preemption.py and host_devices.py (files, processes, devices: results do not
# depend on the device or process count), fit.py (the batch size of eval.batch_size=auto, a
# recorded setting on which no result depends; the compilation cache). The configs are not code here: their resolved values are settings. The fingerprint is
# of whole files, bytes as they are: simple and conservative (an edit of evaluate.py's command
# line or of a docstring counts too). Weights given by path (eval.classifier_path,
# eval.scorer_path) are identified by their path only. tests/test_evaluate.py
# checks that every package module the listed modules import is listed or left out here, and that
# every shipped metric and data asset is listed.
CODE_FILES = (
    "evaluate.py",
    "evaluation.py",
    "build.py",
    "tasks/__init__.py",
    "tasks/base.py",
    "tasks/mnist_sudoku.py",
    "tasks/even_pixels.py",
    "tasks/counting_polygons.py",
    "sampler.py",
    "schedule.py",
    "flow.py",
    "gaussian.py",
    "models/unet.py",
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
)
# Package modules that the modules of CODE_FILES import but that do not determine results.
NOT_IN_CODE_RECORD = ("agreement", "checkpoint", "cli", "eval_report", "eval_shards", "fit",
                      "host_devices", "preemption", "pretrained")

_PACKAGE_DIR = pathlib.Path(ipr_jax.__file__).resolve().parent


class SettingsMismatchError(ValueError):
  """The shards in a directory were computed with other settings or code than the current run's,
  or hold other puzzles than the run's batches."""


def code_record(package_dir: Optional[str | os.PathLike] = None,
                files: Sequence[str] = CODE_FILES) -> dict[str, Any]:
  """The code that computes results: {"ipr_jax_version", "sha256" (of all files), "files":
  {path: sha256 of its bytes}} for `files` (paths relative to `package_dir`, default: the
  installed ipr_jax package).

  Raises:
    FileNotFoundError: a file of `files` is missing.
  """
  root = pathlib.Path(package_dir) if package_dir is not None else _PACKAGE_DIR
  digests = {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in files}
  overall = hashlib.sha256("".join(f"{name}:{d}\n" for name, d in sorted(digests.items()))
                           .encode()).hexdigest()
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
  return {"count": len(batches), "puzzles": int(sum(len(b) for b in batches)),
          "sha256": digest.hexdigest()}


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


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
  """The settings as run.json stores them (tuples become lists, keys sorted)."""
  text = json.dumps(_finite_or_text(settings), sort_keys=True, default=str, allow_nan=False)
  return json.loads(text)


def _fsync_dir(directory: pathlib.Path) -> None:
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
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  _fsync_dir(path.parent)


def write_settings(shard_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
  """Writes run.json (format 2) atomically, creating the directory."""
  shard_dir = pathlib.Path(shard_dir)
  shard_dir.mkdir(parents=True, exist_ok=True)
  record = {**_canonical(settings), "format": FORMAT}
  text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False)
  _write_atomically(shard_dir / SETTINGS_FILE, lambda f: f.write(text.encode()))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """'key: old -> new' for every differing dotted key (`config_diff.differences`)."""
  return [f"{k}: {a!r} -> {b!r}"
          for k, a, b in config_diff.differences(old, new, absent="<absent>")]


def _listed(items: list[str], limit: int = 10) -> str:
  more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
  return "; ".join(items[:limit]) + more


def check_settings(shard_dir: str | os.PathLike, settings: dict[str, Any], write: bool = False,
                   check_code: bool = True) -> None:
  """Checks `settings` (with their "code" record, if any) against the shard directory's run.json.

  With `write`, creates run.json if absent, and brings its "code" record up to date when only the
  code differs and no shard exists yet (nothing computed by the other code would be reused).
  `check_code=False` compares everything but the "code" record (to check a committed run.json,
  a record, against a config).

  Raises:
    SettingsMismatchError: run.json exists and differs, or is not of format 2; the message names
      every differing key with both values.
    FileNotFoundError: run.json is absent and `write` is False.
  """
  shard_dir = pathlib.Path(shard_dir)
  path = shard_dir / SETTINGS_FILE
  settings = {**_canonical(settings), "format": FORMAT}
  if not path.exists():
    if not write:
      raise FileNotFoundError(f"{path} does not exist (process 0 writes it first)")
    write_settings(shard_dir, settings)
    return
  try:
    stored = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SettingsMismatchError(f"{path} is not valid JSON ({e}); delete {shard_dir} to start "
                                "the evaluation over") from None
  if not isinstance(stored, dict) or stored.get("format") != FORMAT:
    found = stored.get("format", 1) if isinstance(stored, dict) else "unknown"
    raise SettingsMismatchError(
        f"{path} is of format {found}, not {FORMAT}: written by an earlier ipr-jax, it records "
        "neither every setting nor the code, so its shards cannot be checked against this run. "
        f"Delete {shard_dir} to compute them again (experiments/migrate_run_json.py converts "
        "such a file, to keep it as a record).")
  code_old, code_new = stored.pop("code", None), settings.pop("code", None)
  differing = _differences(stored, settings)
  if differing:
    raise SettingsMismatchError(
        f"{shard_dir} holds results computed with other settings: {_listed(differing)}. Use "
        "another config.eval.name, or delete that directory to start over.")
  if not check_code or code_old == code_new:
    return
  if write and not done_batches(shard_dir):
    logging.info("%s: no shards yet; recording this run's code in run.json", path)
    write_settings(shard_dir, {**settings, "code": code_new})
    return
  differing = _differences({"code": code_old}, {"code": code_new})
  raise SettingsMismatchError(
      f"{shard_dir} holds results computed by other code: {_listed(differing)}. A change of "
      "the code that computes results (eval_shards.CODE_FILES) requires computing the shards "
      "again: delete that directory, or use another config.eval.name.")


def shard_path(shard_dir: str | os.PathLike, batch: int) -> pathlib.Path:
  return pathlib.Path(shard_dir) / f"batch_{batch:06d}.npz"


def write_shard(shard_dir: str | os.PathLike, batch: int, arrays: dict[str, np.ndarray]) -> None:
  """Writes batch `batch`'s arrays atomically and durably (temporary file, fsync, rename, fsync
  of the directory)."""
  _write_atomically(shard_path(shard_dir, batch), lambda f: np.savez(f, **arrays))


def done_batches(shard_dir: str | os.PathLike) -> set[int]:
  """The batch numbers whose shard files exist (by name: `verify_shards` reads them)."""
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


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every array of a shard, read in full (so that the zip's CRCs are checked)."""
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def _check_index(path: pathlib.Path, arrays: dict[str, np.ndarray], batch: int,
                 expected: np.ndarray) -> None:
  if "index" not in arrays:
    raise SettingsMismatchError(f"{path} has no 'index' array: not a shard of this evaluation")
  index, expected = np.asarray(arrays["index"]).reshape(-1), np.asarray(expected).reshape(-1)
  if index.shape != expected.shape or not np.array_equal(index, expected):
    show = lambda a: np.array2string(a, threshold=12, separator=",")
    raise SettingsMismatchError(
        f"{path} holds puzzles {show(index)} ({len(index)}), but batch {batch} of this run is "
        f"{show(expected)} ({len(expected)}): the shards are of another batching. Delete "
        f"{path.parent} to start over.")


def verify_shards(shard_dir: str | os.PathLike,
                  batches: Sequence[np.ndarray]) -> tuple[set[int], list[str]]:
  """Reads every existing shard in full: the batches done, and the names of the damaged shards
  (unreadable: truncated, corrupt), which are deleted with a warning so that they are computed
  again.

  Raises:
    SettingsMismatchError: a readable shard holds other puzzles than its batch of `batches`, or
      its number is not one of the run's batches.
  """
  done, damaged = set(), []
  for batch in sorted(done_batches(shard_dir)):
    path = shard_path(shard_dir, batch)
    if batch >= len(batches):
      raise SettingsMismatchError(f"{path} is batch {batch}, but this run has {len(batches)} "
                                  f"batches: the shards are of another batching. Delete "
                                  f"{path.parent} to start over.")
    try:
      arrays = _load(path)
    except Exception as e:  # a zip, CRC or npy error: the file is damaged
      logging.warning("%s is damaged (%s: %s); deleting it, the batch is computed again", path,
                      type(e).__name__, e)
      path.unlink(missing_ok=True)
      damaged.append(path.name)
      continue
    _check_index(path, arrays, batch, batches[batch])
    done.add(batch)
  if damaged:
    _fsync_dir(pathlib.Path(shard_dir))
  return done, damaged


def read_shards(shard_dir: str | os.PathLike,
                batches: int | Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
  """The arrays of batches 0..n-1, in batch order.

  Args:
    shard_dir: the shard directory.
    batches: the run's batches (each shard's "index" must equal its batch's puzzle indices), or
      only their number n.

  Raises:
    FileNotFoundError: some batches have no shard (their numbers are listed).
    ValueError: a shard cannot be read.
    SettingsMismatchError: a shard holds other puzzles than its batch.
  """
  num_batches = batches if isinstance(batches, int) else len(batches)
  missing = sorted(set(range(num_batches)) - done_batches(shard_dir))
  if missing:
    shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
    raise FileNotFoundError(f"{len(missing)} of {num_batches} batches have no results in "
                            f"{shard_dir} (batches {shown}); rerun the same command to "
                            "compute them")
  shards = []
  for batch in range(num_batches):
    path = shard_path(shard_dir, batch)
    try:
      arrays = _load(path)
    except Exception as e:  # a zip or npy error: the file is damaged
      raise ValueError(f"cannot read {path} ({type(e).__name__}: {e}); delete it and rerun to "
                       "compute that batch again") from None
    if not isinstance(batches, int):
      _check_index(path, arrays, batch, batches[batch])
    shards.append(arrays)
  return shards


def migrate_format_1(stored: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
  """A format-1 run.json (`stored`) as format 2: `resolved` (the run's full settings, as
  `evaluate.run_settings` gives them for the config `stored` describes) plus a "code" record
  that says the code was not recorded (so that the shards of such a run are never reused).

  Raises:
    ValueError: `resolved` changes a value `stored` records (it may only add fields), or
      `stored` is not of format 1.
  """
  if "format" in stored:
    raise ValueError(f"run.json is of format {stored['format']}, not 1")
  old, new = config_diff.flatten(_canonical(stored)), config_diff.flatten(_canonical(resolved))
  changed = [f"{k}: {old[k]!r} -> {new.get(k, '<absent>')!r}" for k in sorted(old)
             if new.get(k, "<absent>") != old[k]]
  if changed:
    raise ValueError(f"the resolved settings change recorded values: {_listed(changed)}")
  code = {"ipr_jax_version": None, "sha256": None, "files": None,
          "note": "format 1 recorded no code; migrated by experiments/migrate_run_json.py"}
  return {**_canonical(resolved), "code": code, "format": FORMAT}


def format_of(path: str | os.PathLike) -> Optional[int]:
  """The format of a run.json file (1 when it has no "format" field), None if unreadable."""
  try:
    stored = json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return None
  return stored.get("format", 1) if isinstance(stored, dict) else None


def iter_settings_files(root: str | os.PathLike) -> Iterable[pathlib.Path]:
  """Every `shards/run.json` below `root`, sorted."""
  return sorted(pathlib.Path(root).glob(f"**/shards/{SETTINGS_FILE}"))
