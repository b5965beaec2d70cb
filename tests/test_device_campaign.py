"""experiments/device/device_campaign.py at its tiny scale on CPU, as the device machine runs it (a
separate process from the checkout): every step writes its row, the evaluation steps at the batch
`eval.batch_size=auto` picks under an explicit memory limit, compile time apart from run time."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_campaign")
  env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
  done = subprocess.run(
      [
          sys.executable,
          str(ROOT / "experiments" / "device" / "device_campaign.py"),
          "--scale=tiny",
          "--memory_limit_gb=0.01",
          f"--out={out}",
          "--train_steps=1",
          "--steps=ms_eval,train",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=900,
      check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads((out / "campaign.json").read_text()), (out / "summary.md").read_text()


def test_evaluation_steps_run_at_the_auto_batch(campaign):
  results, summary = campaign
  for name in ("ms_eval",):  # ep_eval runs the same code on another task
    row = results["steps"][name]
    assert "error" not in row, row
    assert row["limit_bytes"] == 10_000_000 and row["headroom"] == 0.1
    assert 1 <= row["batch"] and row["analysed_bytes"] <= row["limit_bytes"] * 0.9
    assert row["first_call_s"] > 0 and row["call_s"] > 0
    # Budget 30 costs more passes, and so more time, than budget 0.
    assert row["s_per_puzzle_at_budget_30"] > row["s_per_puzzle_at_budget_0"] > 0
    assert name in summary


def test_train_step_runs_rematerialised_and_accumulated(campaign):
  results, summary = campaign
  (row,) = results["steps"]["train"].values()
  assert "error" not in row, row
  assert row["remat"] and row["grad_accum_steps"] == 2 and row["steps_per_s"] > 0
  assert "golden" not in results["steps"] and "ep_eval" not in results["steps"]
  assert "train even_pixels.py:tiny@4" in summary
