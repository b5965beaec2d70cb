"""An evaluation run's shard directory as one object: `ShardStore`.

    store = ShardStore.open(shard_dir, settings, batches, set_up_error=error)  # every process
    store.reused                   the batches whose shards were there (read in full, checked)
    store.write(b, arrays)         batch b's shard, with the run's digests
    shards = store.read()          every batch's shard, in batch order, checked
    per_puzzle = store.merge(shards, num_puzzles)

Opening is a collective of all processes (`agreement.agree`, twice): every process reports its
set-up error and its settings, which must equal process 0's (`shards.check_processes_agree`);
then process 0 alone checks (or writes) run.json (`shards.check_settings`), removes the temporary
files of killed writes and reads every existing shard, deleting damaged ones and refusing those
of other settings, batching, code or (not accepted) environment; its findings, or its error, reach
every process. Every shard written holds the run's digests and every shard read or reused is
checked against them, and against its batch's puzzle indices. The files themselves, their format
and how they are written (atomically, synced): `shards`.
"""

import collections
import dataclasses
import pathlib
from typing import Any, Callable, Iterable, Optional, Sequence

from absl import logging
import jax
import numpy as np

from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.runtime import agreement
from ipr_jax.runtime import environment as environment_lib

# A shard's first arrays, in the order FORMAT 2 writes them; the run's digests follow, then the
# batch's scores and final facts.
_LEADING = ("index", "unknown_patches", "nfe", "seconds", "process")


@dataclasses.dataclass(frozen=True, eq=False)
class ShardStore:
  """The shards of one run: its settings' digests, its batches, what was found when it opened.

  Attributes:
    directory: the shard directory (`<eval dir>/shards`).
    batches: the run's puzzle indices per batch; shard b must hold `batches[b]`.
    settings_digest: what every shard of the run holds as "settings_sha256"
      (`shards.settings_digest`).
    environment: this run's environment digest, what its shards hold as "environment_sha256".
    environments: the environment digests whose shards belong to the run (None: any, a change
      accepted).
    reused: the batches whose shards were there when the store was opened.
    damaged: the names of the damaged shards deleted when it was opened (computed again).
    removed: the temporary files of killed writes removed when it was opened.
    stop_requested: a process asked to stop (SIGTERM, SIGINT, a deadline) while it was opened.
  """

  directory: str
  batches: Sequence[np.ndarray]
  settings_digest: str
  environment: str
  environments: Optional[frozenset[str]]
  reused: frozenset[int] = frozenset()
  damaged: tuple[str, ...] = ()
  removed: tuple[str, ...] = ()
  stop_requested: bool = False

  @classmethod
  def of(
      cls,
      directory: str,
      settings: dict[str, Any],
      batches: Sequence[np.ndarray],
      environments: Optional[Iterable[str]] = None,
  ) -> "ShardStore":
    """The store of a run of `settings` (with their code and environment records) and `batches`
    whose shards may come from `environments` (environment digests; None: any) besides this
    run's, without opening it: nothing is read or checked."""
    mine = environment_lib.digest(settings[eval_shards.ENVIRONMENT])
    return cls(
        directory,
        batches,
        eval_shards.settings_digest(settings),
        mine,
        None if environments is None else frozenset(environments) | {mine},
    )

  @classmethod
  def open(
      cls,
      directory: str,
      settings: Optional[dict[str, Any]],
      batches: Optional[Sequence[np.ndarray]],
      set_up_error: Optional[BaseException] = None,
      stop: Callable[[], bool] = lambda: False,
      allow_environment_change: bool = False,
  ) -> "ShardStore":
    """Opens the run's store on every process: a collective, called once by each process before
    any computes (see the module docstring).

    Args:
      directory: the shard directory.
      settings: what run.json records (`settings.recorded_settings`); None after a set-up error.
      batches: the run's puzzle indices per batch; None after a set-up error.
      set_up_error: an error this process met while setting the run up, raised on every process.
      stop: whether this process was asked to stop (`Preemption.this_process`); a request of any
        process sets `stop_requested` of every process's store.
      allow_environment_change: reuse shards computed in another environment (recorded in
        run.json).

    Raises:
      The first failing process's `set_up_error`, or process 0's error checking the directory:
      shards.SettingsMismatchError (the processes disagree, or the shards there were computed
      with other settings, other code or in another environment, or hold other puzzles), an
      OSError.
    """
    outcome = agreement.agree(
        set_up_error,
        stop=stop(),
        payload=None if settings is None else eval_shards.canonical(settings),
    )
    eval_shards.check_processes_agree(outcome.payloads)  # the same verdict on every process
    if settings is None or batches is None:
      raise ValueError("ShardStore.open needs the run's settings and batches")

    error, prepared = None, None
    if jax.process_index() == 0:
      try:
        prepared = cls._prepare(directory, settings, batches, allow_environment_change)
      except Exception as e:  # pylint: disable=broad-except  (raised on every process by agree)
        error = e
    outcome = agreement.agree(error, stop=outcome.stop or stop(), payload=prepared)
    prepared = outcome.payloads[0]
    return dataclasses.replace(
        cls.of(directory, settings, batches, prepared["environments"]),
        reused=frozenset(prepared["done"]),
        damaged=tuple(prepared["damaged"]),
        removed=tuple(prepared["removed"]),
        stop_requested=outcome.stop,
    )

  @classmethod
  def _prepare(
      cls,
      directory: str,
      settings: dict[str, Any],
      batches: Sequence[np.ndarray],
      allow_environment_change: bool,
  ) -> dict[str, Any]:
    """Process 0, before any process computes: checks (or writes) run.json, removes the temporary
    files of killed writes, reads every existing shard (deleting the damaged ones, refusing those
    of other settings). Returns the batches done ("done"), the temporary files removed
    ("removed"), the damaged shards deleted ("damaged") and the environment digests whose shards
    may be merged ("environments", None: any)."""
    environments = eval_shards.check_settings(
        directory, settings, write=True, allow_environment_change=allow_environment_change
    )
    if allow_environment_change:
      environments = None
    removed = eval_shards.remove_temporaries(directory)
    done, damaged = cls.of(directory, settings, batches, environments)._verify()
    return {
        "done": sorted(done),
        "removed": removed,
        "damaged": damaged,
        "environments": None if environments is None else sorted(environments),
    }

  def done(self) -> set[int]:
    """The batch numbers whose shard files exist now (by name; `reused`: those checked when the
    store was opened)."""
    return eval_shards.done_batches(self.directory)

  def write(self, batch: int, arrays: dict[str, np.ndarray]) -> None:
    """Writes batch `batch`'s shard, atomically and durably: `arrays` (its per-puzzle arrays, from
    "index" on) with the run's settings and environment digests."""
    shard = {k: v for k, v in arrays.items() if k in _LEADING}
    shard.update(self._digest_arrays())
    shard.update((k, v) for k, v in arrays.items() if k not in shard)
    eval_shards.write_shard(self.directory, batch, shard)

  def read(self) -> list[dict[str, np.ndarray]]:
    """The arrays of every batch's shard, in batch order, each checked against its batch's
    puzzles and the run's digests.

    Raises:
      FileNotFoundError: some batches have no shard (their numbers are listed).
      ValueError: a shard cannot be read.
      shards.SettingsMismatchError: a shard holds other puzzles than its batch, or was computed
        under other settings, code or (not accepted) environment.
    """
    num_batches = len(self.batches)
    missing = sorted(set(range(num_batches)) - eval_shards.done_batches(self.directory))
    if missing:
      shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
      raise FileNotFoundError(
          f"{len(missing)} of {num_batches} batches have no results in "
          f"{self.directory} (batches {shown}); rerun the same command to "
          "compute them"
      )
    shards = []
    for batch in range(num_batches):
      path = eval_shards.shard_path(self.directory, batch)
      try:
        arrays = eval_shards.load_shard(path)
      except Exception as e:  # a zip or npy error: the file is damaged
        raise ValueError(
            f"cannot read {path} ({type(e).__name__}: {e}); delete it and rerun to "
            "compute that batch again"
        ) from None
      self._check(path, arrays, batch)
      shards.append(arrays)
    return shards

  def merge(self, shards: list[dict[str, np.ndarray]], num_puzzles: int) -> dict[str, np.ndarray]:
    """`merge_shards` of `shards` (`read`) and the run's batches: the per-puzzle arrays in puzzle
    index order."""
    return merge_shards(shards, list(self.batches), num_puzzles)

  @staticmethod
  def environment_counts(shards: list[dict[str, np.ndarray]]) -> dict[str, int]:
    """{environment digest: number of `shards` computed there}, sorted by digest."""
    found = collections.Counter(str(shard[eval_shards.ENVIRONMENT_DIGEST]) for shard in shards)
    return dict(sorted(found.items()))

  def _digest_arrays(self) -> dict[str, np.ndarray]:
    """The digest arrays a new shard of this run holds."""
    return {
        eval_shards.SETTINGS_DIGEST: np.asarray(self.settings_digest),
        eval_shards.ENVIRONMENT_DIGEST: np.asarray(self.environment),
    }

  def _verify(self) -> tuple[set[int], list[str]]:
    """Reads every existing shard in full: the batches done, and the names of the damaged shards
    (unreadable: truncated, corrupt), which are deleted with a warning so that they are computed
    again.

    Raises:
      shards.SettingsMismatchError: a readable shard holds other puzzles than its batch, its
        number is not one of the run's batches, or it was computed under other settings, code or
        (not accepted) environment.
    """
    done, damaged = set(), []
    for batch in sorted(eval_shards.done_batches(self.directory)):
      path = eval_shards.shard_path(self.directory, batch)
      if batch >= len(self.batches):
        raise eval_shards.SettingsMismatchError(
            f"{path} is batch {batch}, but this run has {len(self.batches)} "
            f"batches: the shards are of another batching. Delete "
            f"{path.parent} to start over."
        )
      try:
        arrays = eval_shards.load_shard(path)
      except Exception as e:  # a zip, CRC or npy error: the file is damaged
        logging.warning(
            "%s is damaged (%s: %s); deleting it, the batch is computed again",
            path,
            type(e).__name__,
            e,
        )
        path.unlink(missing_ok=True)
        damaged.append(path.name)
        continue
      self._check(path, arrays, batch)
      done.add(batch)
    if damaged:
      eval_shards.fsync_dir(pathlib.Path(self.directory))
    return done, damaged

  def _check(self, path: pathlib.Path, arrays: dict[str, np.ndarray], batch: int) -> None:
    """Raises SettingsMismatchError unless the shard `arrays` (read from `path`) hold the puzzles
    of batch `batch` and the run's settings digest and one of its environment digests."""
    if "index" not in arrays:
      raise eval_shards.SettingsMismatchError(
          f"{path} has no 'index' array: not a shard of this evaluation"
      )
    index, expected = (np.asarray(a).reshape(-1) for a in (arrays["index"], self.batches[batch]))
    if index.shape != expected.shape or not np.array_equal(index, expected):
      show = lambda a: np.array2string(a, threshold=12, separator=",")
      raise eval_shards.SettingsMismatchError(
          f"{path} holds puzzles {show(index)} ({len(index)}), but batch {batch} of this run is "
          f"{show(expected)} ({len(expected)}): the shards are of another batching. Delete "
          f"{path.parent} to start over."
      )
    settings_digest, environment_digest = (
        eval_shards.SETTINGS_DIGEST,
        eval_shards.ENVIRONMENT_DIGEST,
    )
    if settings_digest not in arrays or environment_digest not in arrays:
      raise eval_shards.SettingsMismatchError(
          f"{path} records no settings digest (written by an earlier ipr-jax), so it cannot be "
          f"checked against this run: delete {path.parent} to compute it again"
      )
    if str(arrays[settings_digest]) != self.settings_digest:
      raise eval_shards.SettingsMismatchError(
          f"{path} was computed under other settings or code (settings_sha256 "
          f"{str(arrays[settings_digest])[:12]}..., this run's {self.settings_digest[:12]}...): "
          f"it is not a shard of this run (copied in, or left after run.json was replaced). "
          f"Delete {path.parent} to start over, or use another config.eval.name."
      )
    found = str(arrays[environment_digest])
    if self.environments is not None and found not in self.environments:
      raise eval_shards.SettingsMismatchError(
          f"{path} was computed in another environment (environment_sha256 {found[:12]}..., "
          f"this run's {self.environment[:12]}...): delete {path.parent} to compute it again, "
          "or pass --allow_environment_change to reuse it"
      )


def merge_shards(
    shards: list[dict[str, np.ndarray]], batches: list[np.ndarray], num_puzzles: int
) -> dict[str, np.ndarray]:
  """The per-puzzle arrays of all shards, in puzzle index order (what puzzles.npz holds):
  index [P], unknown_patches [P], nfe [P, budget + 1], one [P, budget + 1] array per score,
  the final facts (Sudoku: digit_grid [P, n, n]) and, if saved, samples uint8 [P, H, W, d].

  Raises:
    shards.SettingsMismatchError: shard b does not hold the puzzles of `batches[b]`, or the
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
