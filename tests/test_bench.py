"""experiments/device/bench.py, the one benchmark of a lent accelerator: its plan fits the minute
it is for, a step cut by its timeout keeps its rows, and its tiny scale runs through an
environment with the device's package set (no ml-collections, no tensorflow-datasets) after the
carried wheel is installed with the device command's own `pip install`.

The rehearsal environment: tests/device_env.py."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

import device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "experiments" / "device" / "bench.py"
WHEELS = device_env.WHEELS
# The tiny steps the rehearsal runs (every kind of step; the other tiny training cases run the
# same code).
_REHEARSED = "ms_eval,ep_cliff,train_ep256,golden"


def _bench(*args, python=sys.executable, env=None, timeout=60):
  return subprocess.run(
      [python, str(BENCH), *args],
      capture_output=True,
      text=True,
      env=env,
      timeout=timeout,
      check=False,
      cwd=ROOT,
  )


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_h100_plan_fits_8_minutes_compilation_included():
  done = _bench("--plan", "--device=h100")
  assert done.returncode == 0, done.stderr
  total = re.search(r"^\| total \| (\d+) \| (\d+) \| (\d+) \|$", done.stdout, re.M)
  assert total, done.stdout
  compile_s, run_s, cap_s = map(int, total.groups())
  assert compile_s > 0 and compile_s + run_s == cap_s <= 8 * 60
  steps = re.findall(r"^\| (\w+) \| \d+ \| \d+ \| \d+ \|$", done.stdout, re.M)
  assert steps[:3] == ["preflight", "ms_eval", "ep_eval"] and "golden" in steps


def test_a_step_cut_by_its_timeout_keeps_its_rows(tmp_path):
  done = _bench(f"--out={tmp_path}", "--only_probe", "--probe_cap=4", "--probe_hang=60")
  assert done.returncode == 0, done.stderr
  rows = _rows(tmp_path / "bench.jsonl")
  probe = [r for r in rows if r["kind"] == "probe"]
  assert [r["note"] for r in probe] == ["written before the hang"]
  (end,) = [r for r in rows if r["kind"] == "step_end"]
  assert end["name"] == "_probe" and end["status"].startswith("timed out")
  assert "_probe" in (tmp_path / "summary.md").read_text()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("rehearsal")
  python, env, target = device_env.device_package_env(tmp)
  out = tmp / "out"
  done = _bench(
      "--scale=tiny",
      f"--out={out}",
      f"--steps={_REHEARSED}",
      "--deadline_s=1200",
      python=str(python),
      env=env,
      timeout=1500,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return _rows(out / "bench.jsonl"), out, target, python


def test_the_carried_wheel_is_the_constraints_version():
  (wheel,) = WHEELS.glob("ml_collections-*.whl")
  pinned = re.search(r"^ml_collections==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
  assert wheel.name.startswith(f"ml_collections-{pinned.group(1)}-py3-none-any")
  assert wheel.stat().st_size < 200_000  # small enough to commit and to travel


def test_preflight_prints_every_import_from_the_carried_wheel(rehearsal):
  rows, _, target, _ = rehearsal
  imports = {r["module"]: r for r in rows if r["kind"] == "import"}
  for module in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "absl", "numpy"):
    assert imports[module].get("version") or imports[module].get("path"), imports[module]
  assert imports["ml_collections"]["path"].startswith(str(target))
  assert "error" in imports["tensorflow_datasets"]
  assert imports["ipr_jax"]["path"].startswith(str(ROOT / "ipr_jax"))
  (devices,) = [r for r in rows if r["kind"] == "devices"]
  assert devices["platform"] == "cpu" and devices["scale"] == "tiny"
  assert rows.index(devices) < min(i for i, r in enumerate(rows) if r["step"] == "ms_eval")


def test_every_rehearsed_step_ends_ok_and_in_order(rehearsal):
  rows, *_ = rehearsal
  ends = [r for r in rows if r["kind"] == "step_end"]
  assert [r["name"] for r in ends] == ["preflight", *_REHEARSED.split(",")]
  assert all(r["status"] == "ok" for r in ends), [r for r in ends if r["status"] != "ok"]


def test_the_evaluation_runs_at_the_auto_batch_compiled_once(rehearsal):
  rows, *_ = rehearsal
  step = [r for r in rows if r["step"] == "ms_eval"]
  (auto,) = [r for r in step if r["kind"] == "auto_batch"]
  (compiled,) = [r for r in step if r["kind"] == "compile"]
  (run,) = [r for r in step if r["kind"] == "run"]
  assert auto["batch"] == compiled["batch"] == run["batch"] == auto["memory_batch"] > 1
  assert auto["predicted_bytes"] <= auto["budget_bytes"] == pytest.approx(0.9 * 10_000_000)
  assert compiled["compile_s"] > 0 and run["call_s"] > 0
  assert run["s_per_puzzle_at_budget_30"] > run["s_per_puzzle_at_budget_0"] > 0
  assert run["passes_per_puzzle_at_budget_30"] > run["passes_per_puzzle_at_budget_0"]
  assert "budget-1 run" in run["extrapolated"] and run["peak_bytes"] is None  # CPU: no counter


def test_the_cliff_alternatives_and_the_flag_process(rehearsal):
  rows, *_ = rehearsal
  step = [r for r in rows if r["step"] == "ep_cliff"]
  variants = {r["variant"] for r in step if r["kind"] == "forward"}
  assert {"default", "precision=highest", "precision=bfloat16"} <= variants
  assert {r["layout"] for r in step if r["kind"] == "conv64"} == {"NHWC", "NCHW"}
  (flag,) = [r for r in step if r["kind"] == "xla_flag"]
  assert flag["status"] == "ok" and flag["flag"] in variants


def test_training_accumulates_and_golden_matches(rehearsal):
  rows, *_ = rehearsal
  (train,) = [r for r in rows if r["kind"] == "train"]
  assert train["grad_accum_steps"] == 2 and train["steps_per_s"] > 0
  golden = {r["precision"]: r for r in rows if r["kind"] == "golden"}
  assert golden["highest"]["max_abs"] < 1e-4  # tests/test_unet.py's tolerance


def test_the_summary_is_remade_from_the_rows(rehearsal):
  _, out, _, python = rehearsal
  written = (out / "summary.md").read_text()
  assert "## Evaluation" in written and "## Training" in written and "## Golden" in written
  (out / "summary.md").unlink()
  done = _bench(f"--summary={out / 'bench.jsonl'}", python=str(python))
  assert done.returncode == 0, done.stderr
  assert (out / "summary.md").read_text() == written
