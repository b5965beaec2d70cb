"""The wheel works without a checkout: built from the package's files, installed into a fresh
virtual environment, it runs the main job (`--config=mnist_sudoku:demo`, the packaged config) on
a few puzzles from a folder outside the checkout.

SLOW-ISH, about a minute on 2 cores (the build, a venv, one small evaluation, its compilation).
The build uses pip's build isolation (setuptools from the package index or pip's cache, as
`pip install .` does). The fresh environment gets the test environment's dependencies (jax,
flax, ...) through a .pth line naming this interpreter's site-packages, so nothing else is
downloaded; a path added by a .pth line has its own .pth files ignored, so the editable
install's finder does not reach the new environment, and the test checks which ipr_jax it
imports.
"""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What the build reads: the metadata, the README (long_description) and the package.
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "ipr_jax")
NUM_PUZZLES = 4
BUDGET = 2


def run(args, **kwargs):
  done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False, **kwargs)
  assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-5000:])
  return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """The wheel built from a copy of the package's files (so the checkout stays clean)."""
  source = tmp_path_factory.mktemp("source")
  for name in BUILD_INPUTS:
    if (ROOT / name).is_dir():
      shutil.copytree(
          ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
      )
    else:
      shutil.copy2(ROOT / name, source / name)
  out = tmp_path_factory.mktemp("wheel")
  done = run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "--verbose", "-w", str(out), str(source)]
  )
  # setuptools' warnings (an undeclared package: "Package would be ignored", a deprecated
  # setting) are classes named *Warning; pip's own lower-case "warning:" lines about disabled
  # byte-compiling (PYTHONDONTWRITEBYTECODE) are not about the package.
  log = done.stdout + done.stderr
  assert "would be ignored" not in log and "Warning" not in log, log[-5000:]
  wheels = list(out.glob("ipr_jax-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


def test_the_wheel_holds_the_configs_and_the_assets(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  for task in ("mnist_sudoku", "even_pixels", "counting_polygons"):
    assert f"ipr_jax/configs/{task}.py" in names
  for asset in (
      "ipr_jax/assets/mnist_sudoku_demo.npz",
      "ipr_jax/data/assets/mnist_digits_10k.npz",
      "ipr_jax/data/assets/mnist_digits_10k_ranking.npz",
      "ipr_jax/metrics/assets/mnist_classifier_cell7.npz",
      "ipr_jax/metrics/assets/polygon_scorer.npz",
  ):
    assert asset in names
  assert not any(name.startswith(("tests/", "configs/", "experiments/")) for name in names)


def test_the_installed_wheel_runs_the_main_job_outside_the_checkout(wheel, tmp_path):
  # No PYTHONPATH (a checkout on it would be "already installed" for pip and imported first).
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1")
  venv = tmp_path / "venv"
  run([sys.executable, "-m", "venv", str(venv)], env=env)
  python = venv / "bin" / "python"
  run(
      [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
      env=env,
  )
  site_packages = pathlib.Path(
      run(
          [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env
      ).stdout.strip()
  )
  # The dependencies: this interpreter's site-packages, after the new environment's own.
  test_env = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (site_packages / "test_env_dependencies.pth").write_text("\n".join(sorted(test_env)) + "\n")

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  imported = run(
      [str(python), "-c", "import ipr_jax; print(ipr_jax.__file__)"], cwd=elsewhere, env=env
  ).stdout.strip()
  assert pathlib.Path(imported).resolve().is_relative_to(site_packages.resolve()), imported
  assert not pathlib.Path(imported).resolve().is_relative_to(ROOT), imported

  done = run(
      [
          str(python),
          "-m",
          "ipr_jax.evaluate",
          "--config=mnist_sudoku:demo",
          "--workdir=runs/demo",
          f"--config.eval.num_puzzles={NUM_PUZZLES}",
          "--config.eval.batch_size=2",
          f"--config.ipr.budget={BUDGET}",
      ],
      cwd=elsewhere,
      env=env,
  )
  out = elsewhere / "runs" / "demo" / "eval" / "ms_hard_test"
  results = json.loads((out / "results.json").read_text())
  assert results, "empty results.json"
  with open(out / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [int(row["budget"]) for row in rows] == list(range(BUDGET + 1)), rows
  for row in rows:
    assert int(row["num_puzzles"]) == NUM_PUZZLES
    assert 0.0 <= float(row["valid_rate"]) <= 1.0
    assert float(row["mean_nfe"]) > 0
  for name in ("puzzles.npz", "puzzles.csv", "valid_rate_vs_budget.png", "ipr_process.png"):
    assert (out / name).stat().st_size > 0, name
  assert "valid_rate" in done.stdout + done.stderr
