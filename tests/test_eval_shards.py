"""Per-batch result files (ipr_jax/evaluation/shards.py: run.json, crash safety; the checks at
resume and merge: ipr_jax/evaluation/store.py), the agreement of processes on errors
(ipr_jax/runtime/agreement.py, one process) and the multi-process settings of
host_devices.initialize_distributed: errors that name what is wrong."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

import ipr_jax
from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.evaluation import store as store_lib
from ipr_jax.runtime import agreement
from ipr_jax.runtime import config_diff
from ipr_jax.runtime import environment
from ipr_jax.runtime import host_devices


def _open(tmp_path, batches, settings=None, **kwargs):
  """The shard store of a one-process run of `batches` in `tmp_path` (run.json written)."""
  settings = settings or {"ipr": {"budget": 30}, "code": _code(), "environment": _environment()}
  return store_lib.ShardStore.open(str(tmp_path), settings, batches, **kwargs)


def test_shards_round_trip_and_list_only_complete_files(tmp_path):
  batches = [np.arange(3, 5), np.arange(3), np.arange(5, 6)]
  store = _open(tmp_path, batches)
  assert store.reused == set() and sorted(os.listdir(tmp_path)) == ["run.json"]
  store.write(1, {"index": np.arange(3), "nfe": np.ones((3, 2), np.int32)})
  store.write(0, {"index": np.arange(3, 5), "nfe": np.zeros((2, 2))})
  (tmp_path / "batch_000002.npz.tmp123").write_bytes(b"half a file")  # a killed write
  assert store.done() == eval_shards.done_batches(tmp_path) == {0, 1}
  with pytest.raises(FileNotFoundError, match=r"1 of 3 batches .*batches 2\)"):
    store.read()
  reopened = _open(tmp_path, batches[:2])
  assert reopened.reused == {0, 1} and reopened.removed == ("batch_000002.npz.tmp123",)
  first, second = reopened.read()
  np.testing.assert_array_equal(first["index"], [3, 4])
  np.testing.assert_array_equal(second["nfe"], np.ones((3, 2)))


def test_a_shard_holds_the_runs_digests_after_its_bookkeeping(tmp_path):
  """FORMAT 2's order of a shard's arrays: index, unknown_patches, nfe, seconds, process, the
  digests, then the scores and final facts."""
  store = _open(tmp_path, [np.arange(2)])
  arrays = {
      "index": np.arange(2),
      "unknown_patches": np.ones(2),
      "nfe": np.ones((2, 3)),
      "seconds": np.float64(1.0),
      "process": np.int64(0),
      "score.valid": np.ones((2, 3), bool),
      "final.digit_grid": np.zeros((2, 4, 4)),
  }
  store.write(0, arrays)
  with np.load(eval_shards.shard_path(tmp_path, 0)) as shard:
    assert shard.files == [
        *list(arrays)[:5],
        "settings_sha256",
        "environment_sha256",
        *list(arrays)[5:],
    ]
    assert str(shard["settings_sha256"]) == store.settings_digest
    assert str(shard["environment_sha256"]) == store.environment


def test_opening_the_store_raises_the_set_up_error_and_reports_a_stop(tmp_path):
  with pytest.raises(ValueError, match="the set-up failed"):
    store_lib.ShardStore.open(
        str(tmp_path), None, None, set_up_error=ValueError("the set-up failed")
    )
  assert not tmp_path.joinpath("run.json").exists()
  assert not _open(tmp_path, [np.arange(2)]).stop_requested
  assert _open(tmp_path, [np.arange(2)], stop=lambda: True).stop_requested


def test_a_damaged_shard_is_named(tmp_path):
  store = _open(tmp_path, [np.arange(3)])
  store.write(0, {"index": np.arange(3)})
  eval_shards.shard_path(tmp_path, 0).write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(ValueError, match="batch_000000.npz.*delete it"):
    store.read()


def test_settings_are_written_once_then_compared_field_by_field(tmp_path):
  settings = {"ipr": {"budget": 30, "resampling_ratio": 0.25}, "eval": {"given_range": (0, 26)}}
  with pytest.raises(FileNotFoundError, match="run.json"):
    eval_shards.check_settings(tmp_path, settings)
  eval_shards.check_settings(tmp_path, settings, write=True)
  assert json.loads((tmp_path / "run.json").read_text())["eval"]["given_range"] == [0, 26]
  eval_shards.check_settings(tmp_path, settings)  # tuples and lists are the same setting
  changed = {
      "ipr": {"budget": 10, "resampling_ratio": 0.25},
      "eval": {"given_range": (0, 26)},
      "sampler": {"top_k": 1},
  }
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"ipr.budget: 30 -> 10; sampler.top_k: '<absent>' -> 1",
  ):
    eval_shards.check_settings(tmp_path, changed, write=True)
  (tmp_path / "run.json").write_text("{not json")
  with pytest.raises(eval_shards.SettingsMismatchError, match="not valid JSON"):
    eval_shards.check_settings(tmp_path, settings)


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {host_devices.COORDINATOR_ENV: "127.0.0.1:1234"},
            "IPR_JAX_NUM_PROCESSES, IPR_JAX_PROCESS_ID not set",
        ),
        (
            {
                host_devices.COORDINATOR_ENV: "h:1",
                host_devices.NUM_PROCESSES_ENV: "two",
                host_devices.PROCESS_ID_ENV: "0",
            },
            "IPR_JAX_NUM_PROCESSES='two'",
        ),
        (
            {
                host_devices.COORDINATOR_ENV: "h:1",
                host_devices.NUM_PROCESSES_ENV: "2",
                host_devices.PROCESS_ID_ENV: "2",
            },
            r"IPR_JAX_PROCESS_ID=2 must be in \[0, 2\)",
        ),
    ],
)
def test_partial_or_bad_process_settings_are_refused(monkeypatch, env, message):
  for name in (
      host_devices.COORDINATOR_ENV,
      host_devices.NUM_PROCESSES_ENV,
      host_devices.PROCESS_ID_ENV,
  ):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    host_devices.initialize_distributed()


# ------------------------------------------------------------------------------------------------
# run.json of format 2: every setting, the batching, the code.
# ------------------------------------------------------------------------------------------------


def _code(sampler_digest="a" * 64):
  return {
      "ipr_jax_version": "0.1.0",
      "sha256": "c" * 64,
      "files": {"evaluate.py": "b" * 64, "sampler.py": sampler_digest},
  }


def test_a_format_1_run_json_is_refused_with_a_pointer_to_the_migration(tmp_path):
  (tmp_path / "run.json").write_text(json.dumps({"ipr": {"budget": 30}, "task": "mnist_sudoku"}))
  with pytest.raises(
      eval_shards.SettingsMismatchError, match=r"format 1, not 2.*migrate_run_json.py"
  ):
    eval_shards.check_settings(
        tmp_path, {"ipr": {"budget": 30}, "task": "mnist_sudoku"}, write=True
    )


def test_other_code_is_refused_while_shards_exist_and_recorded_when_none_do(tmp_path):
  settings = {"ipr": {"budget": 30}}
  eval_shards.check_settings(tmp_path, {**settings, "code": _code()}, write=True)
  stored = json.loads((tmp_path / "run.json").read_text())
  assert stored["format"] == 2 and stored["code"]["files"]["sampler.py"] == "a" * 64
  # No shard yet: nothing of the other code would be reused, run.json takes the new code.
  eval_shards.check_settings(tmp_path, {**settings, "code": _code("d" * 64)}, write=True)
  assert json.loads((tmp_path / "run.json").read_text())["code"]["files"]["sampler.py"] == (
      "d" * 64
  )
  eval_shards.write_shard(tmp_path, 0, {"index": np.arange(2)})
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"other code: code.files.sampler.py: 'd{64}' -> 'e{64}'\. .*"
      r"requires computing the shards again",
  ):
    eval_shards.check_settings(tmp_path, {**settings, "code": _code("e" * 64)}, write=True)
  # A committed run.json is a record: its settings can be checked without the code.
  eval_shards.check_settings(tmp_path, {**settings, "code": _code("e" * 64)}, check_code=False)
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"ipr.budget: 30 -> 31"):
    eval_shards.check_settings(
        tmp_path, {"ipr": {"budget": 31}, "code": _code("d" * 64)}, check_code=False
    )
  # Settings are compared first, and refused with or without shards.
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"other settings: ipr.budget"):
    eval_shards.check_settings(tmp_path, {"ipr": {"budget": 31}, "code": _code("e" * 64)})


def test_non_finite_settings_are_stored_as_text_and_compare_equal(tmp_path):
  settings = {"ipr": {"selection_temperature": float("inf"), "x": float("nan")}}
  eval_shards.check_settings(tmp_path, settings, write=True)
  text = (tmp_path / "run.json").read_text()
  assert json.loads(text, parse_constant=_refuse_constant)["ipr"]["x"] == "nan"
  eval_shards.check_settings(tmp_path, settings)  # NaN == NaN as a setting


def _refuse_constant(name):
  raise AssertionError(f"not strict JSON: {name}")


def test_code_record_hashes_each_listed_file(tmp_path):
  (tmp_path / "models").mkdir()
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "models" / "b.py").write_bytes(b"y = 2\n")
  files = ("a.py", "models/b.py")
  record = eval_shards.code_record(tmp_path, files)
  assert record["files"] == {
      "a.py": hashlib.sha256(b"x = 1\n").hexdigest(),
      "models/b.py": hashlib.sha256(b"y = 2\n").hexdigest(),
  }
  assert record["ipr_jax_version"] == ipr_jax.__version__
  (tmp_path / "a.py").write_text("x = 1  # a comment counts\n")
  changed = eval_shards.code_record(tmp_path, files)
  assert changed["files"]["models/b.py"] == record["files"]["models/b.py"]
  assert changed["files"]["a.py"] != record["files"]["a.py"]
  assert changed["sha256"] != record["sha256"]
  with pytest.raises(FileNotFoundError):
    eval_shards.code_record(tmp_path, files + ("missing.py",))
  # The package's own list exists in full.
  assert set(eval_shards.code_record()["files"]) == set(eval_shards.CODE_FILES)


def test_batches_record_tells_batch_sizes_and_assignments_apart():
  batches = [np.array([0, 2]), np.array([1, 3]), np.array([4])]
  record = eval_shards.batches_record(batches)
  assert record["count"] == 3 and record["puzzles"] == 5
  assert eval_shards.batches_record([b.copy() for b in batches]) == record
  assert eval_shards.batches_record([np.array([0, 2, 1]), np.array([3, 4])])["sha256"] != (
      record["sha256"]
  )  # another batch size
  assert (
      eval_shards.batches_record([np.array([0, 1]), np.array([2, 3]), np.array([4])])["sha256"]
      != record["sha256"]
  )  # the same sizes, other puzzles per batch
  assert eval_shards.batches_record([np.array([0, 2, 1, 3]), np.array([4])])["sha256"] != (
      record["sha256"]
  )  # the same order, other boundaries


# ------------------------------------------------------------------------------------------------
# Crash safety.
# ------------------------------------------------------------------------------------------------


def test_writes_sync_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    real_fsync(fd)

  def replace(src, dst):
    events.append(("replace", str(src), str(dst)))
    real_replace(src, dst)

  monkeypatch.setattr(eval_shards.os, "fsync", fsync)
  monkeypatch.setattr(eval_shards.os, "replace", replace)
  eval_shards.write_shard(tmp_path, 3, {"index": np.arange(2)})
  final = str(eval_shards.shard_path(tmp_path, 3))
  tmp = f"{final}.tmp{os.getpid()}"
  assert events == [("fsync", tmp), ("replace", tmp, final), ("fsync", str(tmp_path))]
  events.clear()
  eval_shards.write_settings(tmp_path, {"ipr": {"budget": 1}})
  final = str(tmp_path / "run.json")
  tmp = f"{final}.tmp{os.getpid()}"
  assert events == [("fsync", tmp), ("replace", tmp, final), ("fsync", str(tmp_path))]
  assert sorted(os.listdir(tmp_path)) == ["batch_000003.npz", "run.json"]


def test_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path):
  eval_shards.write_shard(tmp_path, 0, {"index": np.arange(2)})
  eval_shards.write_settings(tmp_path, {"ipr": {"budget": 1}})
  for name in ("batch_000001.npz.tmp4242", "run.json.tmp17", "batch_000002.npz.tmp"):
    (tmp_path / name).write_bytes(b"half a file")
  (tmp_path / "notes.txt").write_text("kept")
  removed = eval_shards.remove_temporaries(tmp_path)
  assert removed == ["batch_000001.npz.tmp4242", "batch_000002.npz.tmp", "run.json.tmp17"]
  assert sorted(os.listdir(tmp_path)) == ["batch_000000.npz", "notes.txt", "run.json"]
  assert eval_shards.remove_temporaries(tmp_path / "absent") == []


def test_damaged_shards_are_deleted_at_resume_and_others_are_checked(tmp_path):
  batches = [np.array([0, 3]), np.array([1, 4]), np.array([2]), np.array([5])]
  store = _open(tmp_path, batches)
  for b, batch in enumerate(batches):
    store.write(b, {"index": batch, "nfe": np.full((len(batch), 3), b)})
  whole = eval_shards.shard_path(tmp_path, 1).read_bytes()
  eval_shards.shard_path(tmp_path, 1).write_bytes(whole[: len(whole) // 2])  # truncated
  corrupt = bytearray(eval_shards.shard_path(tmp_path, 2).read_bytes())
  position = corrupt.index(b"\x93NUMPY", corrupt.index(b"nfe.npy")) + 140  # in nfe's data
  corrupt[position] ^= 0xFF  # a flipped byte: only the zip's CRC tells
  eval_shards.shard_path(tmp_path, 2).write_bytes(bytes(corrupt))
  store = _open(tmp_path, batches)
  assert store.reused == {0, 3}
  assert store.damaged == ("batch_000001.npz", "batch_000002.npz")
  assert eval_shards.done_batches(tmp_path) == {0, 3}
  with pytest.raises(FileNotFoundError, match=r"2 of 4 batches .*batches 1, 2\)"):
    store.read()
  # A readable shard of other puzzles is refused, not recomputed.
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"batch_000003.npz holds puzzles \[5\] \(1\), but batch 3 of this run "
      r"is \[6\] \(1\)",
  ):
    _open(tmp_path, batches[:3] + [np.array([6])])
  with pytest.raises(eval_shards.SettingsMismatchError, match="batch 3, but this run has 3"):
    _open(tmp_path, batches[:3])


def test_reading_checks_every_shard_against_its_batch(tmp_path):
  store = _open(tmp_path, [np.array([0, 2]), np.array([1, 3])])
  store.write(0, {"index": np.array([0, 2])})
  store.write(1, {"index": np.array([1, 3])})
  assert len(store.read()) == 2
  other = dataclasses.replace(store, batches=[np.array([0, 1]), np.array([2, 3])])
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"batch_000000.npz holds puzzles"):
    other.read()


# ------------------------------------------------------------------------------------------------
# Errors agreed by all processes (one process here; two: tests/test_evaluate.py).
# ------------------------------------------------------------------------------------------------


def test_agree_with_one_process_reraises_or_returns_the_stop_flag():
  assert agreement.agree(None, stop=True, payload={"done": [1]}) == agreement.Outcome(
      True, [{"done": [1]}]
  )
  error = ValueError("mine")
  with pytest.raises(ValueError) as raised:
    agreement.agree(error)
  assert raised.value is error


def test_other_processes_rebuild_the_error_type_and_message():
  error = agreement.rebuild_error(
      0,
      "ipr_jax.evaluation.shards",
      "SettingsMismatchError",
      "x holds results computed with other settings: ipr.budget",
  )
  assert type(error) is eval_shards.SettingsMismatchError
  assert str(error) == "x holds results computed with other settings: ipr.budget"
  error = agreement.rebuild_error(1, "builtins", "FileNotFoundError", "[Errno 2] no: 'a'")
  assert type(error) is FileNotFoundError and str(error) == "[Errno 2] no: 'a'"
  for module, name in (
      ("jaxlib.xla_extension", "XlaRuntimeError"),
      ("builtins", "print"),
      ("ipr_jax.evaluation.shards", "NoSuchError"),
  ):
    error = agreement.rebuild_error(1, module, name, "boom")
    assert type(error) is agreement.ProcessError
    assert str(error) == f"process 1 failed: {module}.{name}: boom"


def test_config_diff_names_every_differing_leaf_by_its_dotted_key():
  """The one diff of eval_shards.check_settings and pretrained.check_compatible."""
  old = {"ipr": {"budget": 30, "gone": 1, "same": None}, "task": "a", "eval": {"seed": 1}}
  new = {
      "ipr": {"budget": 10, "same": None},
      "task": "b",
      "sampler": {"top_k": 1},
      "eval": {"seed": 1},
  }
  assert config_diff.differences(old, new, absent="<absent>") == [
      ("ipr.budget", 30, 10),
      ("ipr.gone", 1, "<absent>"),
      ("sampler.top_k", "<absent>", 1),
      ("task", "a", "b"),
  ]
  assert config_diff.differences(old, old) == []
  assert config_diff.flatten({"a": {"b": [1, 2]}, "c": 3}) == {"a.b": [1, 2], "c": 3}


def _environment(jaxlib="0.10.2"):
  return {"packages": {"jax": "0.10.2", "jaxlib": jaxlib}, "device_count": 2}


def test_another_environment_is_refused_while_shards_exist_unless_accepted(tmp_path):
  settings = {"ipr": {"budget": 30}, "code": _code()}
  first, second = _environment(), _environment(jaxlib="0.11.0")
  digest = lambda env: {environment.digest(env)}
  assert eval_shards.check_settings(
      tmp_path, {**settings, "environment": first}, write=True
  ) == digest(first)
  # No shard yet: run.json simply takes the new environment.
  eval_shards.check_settings(tmp_path, {**settings, "environment": second}, write=True)
  assert json.loads((tmp_path / "run.json").read_text())["environment"] == second
  eval_shards.write_shard(tmp_path, 0, {"index": np.arange(2)})
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"another environment: environment\.packages\.jaxlib: '0\.11\.0' -> "
      r"'0\.10\.2'\..*--allow_environment_change",
  ):
    eval_shards.check_settings(tmp_path, {**settings, "environment": first}, write=True)
  # Accepted: recorded, and from then on both environments' shards belong to the run.
  assert (
      eval_shards.check_settings(
          tmp_path, {**settings, "environment": first}, write=True, allow_environment_change=True
      )
      is None
  )
  stored = json.loads((tmp_path / "run.json").read_text())
  assert stored["environment"] == second and stored["environment_changes"] == [first]
  assert eval_shards.check_settings(
      tmp_path, {**settings, "environment": first}, write=True
  ) == digest(first) | digest(second)
  # The environment is not a setting: a committed record is checked without it.
  eval_shards.check_settings(tmp_path, settings, check_code=False)


def test_each_shard_is_checked_against_the_runs_digests(tmp_path):
  settings = {"ipr": {"budget": 30}, "code": _code(), "environment": _environment()}
  env = environment.digest(_environment())
  batches = [np.array([0, 1]), np.array([2, 3])]
  store = _open(tmp_path, batches, settings)
  assert store.settings_digest == eval_shards.settings_digest(settings)
  assert store.environment == env and store.environments == {env}
  # The digest ignores the environment records, not the code.
  assert store.settings_digest == eval_shards.settings_digest(
      {**settings, "environment": _environment("0.11.0"), "environment_changes": [{}]}
  )
  assert store.settings_digest != eval_shards.settings_digest({**settings, "code": _code("e" * 64)})
  store.write(0, {"index": batches[0]})
  assert _open(tmp_path, batches, settings).reused == {0}
  # A store of another environment reads the shard only with the change accepted.
  elsewhere = {**settings, "environment": _environment("0.11.0")}
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"another environment"):
    store_lib.ShardStore.of(str(tmp_path), elsewhere, batches[:1], environments=()).read()
  assert len(store_lib.ShardStore.of(str(tmp_path), elsewhere, batches[:1]).read()) == 1
  eval_shards.write_shard(tmp_path, 1, {"index": batches[1]})  # an earlier ipr-jax's
  with pytest.raises(eval_shards.SettingsMismatchError, match=r"records no settings digest"):
    _open(tmp_path, batches, settings)
  # Left after run.json was replaced: a shard of other settings is refused.
  eval_shards.shard_path(tmp_path, 1).unlink()
  (tmp_path / "run.json").unlink()
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"batch_000000\.npz was computed under other settings or code",
  ):
    _open(tmp_path, batches, {**settings, "ipr": {"budget": 31}})


def test_processes_that_would_compute_different_things_are_named():
  settings = {"ipr": {"budget": 30}, "code": _code(), "environment": _environment()}
  eval_shards.check_processes_agree([settings, dict(settings)])
  other = {**settings, "ipr": {"budget": 3}, "environment": _environment("0.11.0")}
  with pytest.raises(
      eval_shards.SettingsMismatchError,
      match=r"the 3 processes of this run would compute different things: "
      r"environment\.packages\.jaxlib: '0\.10\.2' \(process 0\) vs "
      r"'0\.11\.0' \(process 2\); ipr\.budget: 30 \(process 0\) vs 3 "
      r"\(process 2\)\.",
  ):
    eval_shards.check_processes_agree([settings, settings, other])


def test_sigint_asks_for_a_stop_and_a_second_one_interrupts():
  """Ctrl-C: the first SIGINT is a stop request, like SIGTERM; the second raises
  KeyboardInterrupt; the handlers are restored afterwards."""
  import signal  # pylint: disable=g-import-not-at-top
  from ipr_jax.runtime import preemption  # pylint: disable=g-import-not-at-top

  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with preemption.Preemption("stopping.") as stop:
    assert not stop.this_process()
    signal.raise_signal(signal.SIGINT)
    assert stop.this_process()
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
