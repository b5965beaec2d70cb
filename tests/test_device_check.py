"""experiments/device/device_check.py at its tiny scale on CPU: every section runs and reports
numbers that agree with facts from elsewhere (the golden tolerance, the spec's pass counts).

It runs as the device machine would run it: a separate process, from the checkout.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import load_task_config
from ipr_jax import build
from ipr_jax import tasks
from ipr_jax.build import config_base

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  # The tiny programs compile ~4x faster without XLA's optimisations and still run in seconds.
  env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
  done = subprocess.run(
      [
          sys.executable,
          str(ROOT / "experiments" / "device" / "device_check.py"),
          "--scale=tiny",
          f"--out={out}",
          "--train_steps=2",
      ],
      capture_output=True,
      text=True,
      env=env,
      timeout=900,
      check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((out / "device_check.json").read_text())
  assert "errors" not in results, results.get("errors")
  return results, (out / "summary.md").read_text()


def _tiny_scale_num_params(name, preset):
  """Parameters of the U-Net that device_check.py's tiny scale documents: the preset with
  `use_tiny_model(hid_dims=(16, 16), attention=(False, True))`, 16 channels per head, a 32-wide
  time embedding of 16 sinusoidal features."""
  config = load_task_config(name, preset)
  config_base.use_tiny_model(config, hid_dims=(16, 16), attention=(False, True))
  config.model.num_head_channels, config.model.t_emb_dim, config.model.d_emb = 16, 32, 16
  params = build.init_params(config, build.make_model(config), jax.random.key(0))
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_forward_section(check):
  results, summary = check
  assert results["device"]["platform"] == "cpu"
  forward = results["forward"]
  row = forward["tiny@28x28x1"]  # the demo's 4x4 Sudoku images, a smaller U-Net
  # bf16 computes differently from float32, but not wildly.
  assert 0 < row["bf16_vs_f32"]["rel_rms"] < 0.05
  # The U-Net the tiny scale promises: the demo config shrunk further, counted here.
  assert row["num_params"] == _tiny_scale_num_params("mnist_sudoku", "demo")
  # Every weight is used at least once per image (one multiply-add = 2 FLOPs).
  assert row["flops_per_image"] > 2 * row["num_params"]
  assert "tiny@28x28x1" in summary
  # tests/test_unet.py's tolerance for the golden forwards.
  assert forward["golden"]["ep"]["highest"]["max_abs"] < 1e-4


def _spec_passes(num_unknown, budget):
  """ms_hard_test on the 4x4 grid: 3 passes per unknown cell (SRM, overlap 0), then 2k + 8 per
  IPR iteration (10 steps per cell at overlap 0.8) for k = max(1, unknown // 4) cells."""
  k = np.maximum(1, num_unknown // 4)
  return 3 * num_unknown + budget * (2 * k + 8)


def test_sampler_section_counts_the_spec_passes(check):
  results, summary = check
  assert results["sampler_budget"] == 2
  config = load_task_config("mnist_sudoku", "demo")
  task = tasks.get(config.task).make_data(config)
  (ms_name,) = [n for n in results["sampler"] if n.startswith("mnist_sudoku")]
  for row in results["sampler"][ms_name]:
    batch = task.test_batch(
        config.eval.seed, np.arange(row["batch"]), tuple(config.eval.given_range)
    )
    unknown = 16 - np.asarray(batch["num_given"])
    passes_2, passes_30 = np.mean(_spec_passes(unknown, 2)), np.mean(_spec_passes(unknown, 30))
    assert row["passes_per_puzzle"] == pytest.approx(passes_2)
    assert row["passes_per_puzzle_at_budget_30"] == pytest.approx(passes_30)
    assert row["puzzles_per_s"] == pytest.approx(row["batch"] / row["call_s"])
    assert row["passes_per_s"] == pytest.approx(row["batch"] * passes_2 / row["call_s"])
    # The time per puzzle at budget 30: the measured call's time per puzzle (budget 2), scaled by
    # the spec's pass counts of the two budgets. E.g. batch 1, hard test puzzle 0 (12 unknown
    # cells, k = 3, 14 passes per iteration): 456 / 64 = (36 + 30 * 14) / (36 + 2 * 14) times
    # the call.
    assert row["s_per_puzzle_at_budget_30"] == pytest.approx(
        row["call_s"] / row["batch"] * passes_30 / passes_2, rel=1e-6
    )
  assert "## Sampler" in summary


def test_train_section_runs_a_case_in_its_own_process(check):
  results, summary = check
  (case,) = results["train"].values()
  assert "error" not in case, case
  assert case["num_params"] == _tiny_scale_num_params("even_pixels", "tiny")
  assert case["batch"] == 4 and case["images_per_s"] == pytest.approx(4 / case["step_s"])
  assert np.isfinite(case["loss"])
  # The step's FLOPs: at least a forward and a backward (2 x 2 FLOPs per weight) per image.
  assert case["flops_per_step"] > 4 * case["batch"] * case["num_params"]
  assert case["peak_memory_bytes"] is None  # CPU reports no allocator statistics
  assert "## Training" in summary
