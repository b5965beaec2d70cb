"""The results of an evaluation run, one file per batch, so that a stopped run can resume.

    <eval dir>/shards/run.json           the settings the shards were computed with
    <eval dir>/shards/batch_000012.npz   batch 12's per-puzzle arrays

A shard is written to a temporary name and renamed, so a file under its final name is complete;
a process killed mid-write leaves only a `.tmp` file, which is ignored and replaced. A run whose
settings differ from run.json is refused rather than mixed with the shards already there.
"""

import json
import os
import pathlib
import re
from typing import Any

import numpy as np

SETTINGS_FILE = "run.json"
_SHARD_NAME = re.compile(r"batch_(\d{6})\.npz")


class SettingsMismatchError(ValueError):
  """The shards in a directory were computed with other settings than the current run's."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
  """The settings as JSON would store them (tuples become lists, keys sorted)."""
  return json.loads(json.dumps(settings, sort_keys=True, default=str))


def check_settings(shard_dir: str | os.PathLike, settings: dict[str, Any],
                   write: bool = False) -> None:
  """Checks `settings` against the shard directory's run.json; with `write`, creates it if absent.

  Raises:
    SettingsMismatchError: run.json exists and differs; the message names every differing key
      with both values.
    FileNotFoundError: run.json is absent and `write` is False.
  """
  shard_dir = pathlib.Path(shard_dir)
  path = shard_dir / SETTINGS_FILE
  settings = _canonical(settings)
  if not path.exists():
    if not write:
      raise FileNotFoundError(f"{path} does not exist (process 0 writes it first)")
    shard_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise SettingsMismatchError(f"{path} is not valid JSON ({e}); delete {shard_dir} to start "
                                "the evaluation over") from None
  old, new = _flatten(stored), _flatten(settings)
  differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  if differing:
    details = "; ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
                        for k in differing[:10])
    more = f" (and {len(differing) - 10} more)" if len(differing) > 10 else ""
    raise SettingsMismatchError(
        f"{shard_dir} holds results computed with other settings: {details}{more}. Use another "
        "config.eval.name, or delete that directory to start over.")


def shard_path(shard_dir: str | os.PathLike, batch: int) -> pathlib.Path:
  return pathlib.Path(shard_dir) / f"batch_{batch:06d}.npz"


def write_shard(shard_dir: str | os.PathLike, batch: int, arrays: dict[str, np.ndarray]) -> None:
  """Writes batch `batch`'s arrays atomically (temporary file, then rename)."""
  path = shard_path(shard_dir, batch)
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def done_batches(shard_dir: str | os.PathLike) -> set[int]:
  """The batch numbers whose shard files exist (complete by construction)."""
  shard_dir = pathlib.Path(shard_dir)
  if not shard_dir.is_dir():
    return set()
  return {int(m.group(1)) for m in map(_SHARD_NAME.fullmatch, os.listdir(shard_dir)) if m}


def read_shards(shard_dir: str | os.PathLike, num_batches: int) -> list[dict[str, np.ndarray]]:
  """The arrays of batches 0..num_batches-1, in batch order.

  Raises:
    FileNotFoundError: some batches have no shard (their numbers are listed).
    ValueError: a shard cannot be read.
  """
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
      with np.load(path) as data:
        shards.append({k: data[k] for k in data.files})
    except Exception as e:  # a zip or npy error: the file is damaged
      raise ValueError(f"cannot read {path} ({type(e).__name__}: {e}); delete it and rerun to "
                       "compute that batch again") from None
  return shards
