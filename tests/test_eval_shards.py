"""Per-batch result files (ipr_jax/eval_shards.py) and the multi-process settings of
host_devices.initialize_distributed: errors that name what is wrong."""

import json

import numpy as np
import pytest

from ipr_jax import eval_shards
from ipr_jax import host_devices


def test_shards_round_trip_and_list_only_complete_files(tmp_path):
  eval_shards.write_shard(tmp_path, 1, {"index": np.arange(3), "nfe": np.ones((3, 2), np.int32)})
  eval_shards.write_shard(tmp_path, 0, {"index": np.arange(3, 5), "nfe": np.zeros((2, 2))})
  (tmp_path / "batch_000002.npz.tmp123").write_bytes(b"half a file")  # a killed write
  assert eval_shards.done_batches(tmp_path) == {0, 1}
  first, second = eval_shards.read_shards(tmp_path, 2)
  np.testing.assert_array_equal(first["index"], [3, 4])
  np.testing.assert_array_equal(second["nfe"], np.ones((3, 2)))
  with pytest.raises(FileNotFoundError, match=r"1 of 3 batches .*batches 2\)"):
    eval_shards.read_shards(tmp_path, 3)


def test_a_damaged_shard_is_named(tmp_path):
  eval_shards.write_shard(tmp_path, 0, {"index": np.arange(3)})
  eval_shards.shard_path(tmp_path, 0).write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(ValueError, match="batch_000000.npz.*delete it"):
    eval_shards.read_shards(tmp_path, 1)


def test_settings_are_written_once_then_compared_field_by_field(tmp_path):
  settings = {"ipr": {"budget": 30, "resampling_ratio": 0.25}, "eval": {"given_range": (0, 26)}}
  with pytest.raises(FileNotFoundError, match="run.json"):
    eval_shards.check_settings(tmp_path, settings)
  eval_shards.check_settings(tmp_path, settings, write=True)
  assert json.loads((tmp_path / "run.json").read_text())["eval"]["given_range"] == [0, 26]
  eval_shards.check_settings(tmp_path, settings)  # tuples and lists are the same setting
  changed = {"ipr": {"budget": 10, "resampling_ratio": 0.25}, "eval": {"given_range": (0, 26)},
             "sampler": {"top_k": 1}}
  with pytest.raises(eval_shards.SettingsMismatchError,
                     match=r"ipr.budget: 30 -> 10; sampler.top_k: '<absent>' -> 1"):
    eval_shards.check_settings(tmp_path, changed, write=True)
  (tmp_path / "run.json").write_text("{not json")
  with pytest.raises(eval_shards.SettingsMismatchError, match="not valid JSON"):
    eval_shards.check_settings(tmp_path, settings)


@pytest.mark.parametrize("env, message", [
    ({host_devices.COORDINATOR_ENV: "127.0.0.1:1234"},
     "IPR_JAX_NUM_PROCESSES, IPR_JAX_PROCESS_ID not set"),
    ({host_devices.COORDINATOR_ENV: "h:1", host_devices.NUM_PROCESSES_ENV: "two",
      host_devices.PROCESS_ID_ENV: "0"}, "IPR_JAX_NUM_PROCESSES='two'"),
    ({host_devices.COORDINATOR_ENV: "h:1", host_devices.NUM_PROCESSES_ENV: "2",
      host_devices.PROCESS_ID_ENV: "2"}, r"IPR_JAX_PROCESS_ID=2 must be in \[0, 2\)"),
])
def test_partial_or_bad_process_settings_are_refused(monkeypatch, env, message):
  for name in (host_devices.COORDINATOR_ENV, host_devices.NUM_PROCESSES_ENV,
               host_devices.PROCESS_ID_ENV):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    host_devices.initialize_distributed()
