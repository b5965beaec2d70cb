"""The binaries' command-line errors (ipr_jax.build.cli): one line on stderr naming the bad value,
exit status 2, no traceback; --verbose (or absl's -v 1) shows the traceback.

Every case fails before anything is compiled: a few seconds per process, most of it imports.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from ipr_jax.build import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = "--config=configs/mnist_sudoku.py:demo"

# (arguments, a text the error line must contain: the bad value).
CASES = {
    "misspelt field": ([DEMO, "--config.ipr.budgett=3"], "budgett"),
    "bad preset": (["--config=configs/mnist_sudoku.py:nosuch"], "nosuch"),
    "missing config file": (["--config=configs/nosuch.py"], "configs/nosuch.py"),
    "unknown packaged config": (["--config=nosuch:demo"], "mnist_sudoku"),
    "bad ratio": ([DEMO, "--config.ipr.resampling_ratio=1.5"], "1.5"),
    "missing checkpoint": ([DEMO, "--checkpoint=/nonexistent"], "/nonexistent"),
}


def run_binary(module, args, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
      [sys.executable, "-m", module, *args, f"--workdir={tmp_path}"],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=300,
      check=False,
  )


def assert_one_line_error(done, bad):
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == cli.EXIT_USAGE, (done.returncode, done.stderr[-3000:])
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert len(lines) == 1, done.stderr
  assert lines[0].startswith("error: ") and bad in lines[0], lines[0]


@pytest.mark.parametrize(
    "case",
    [
        "misspelt field",
        "bad preset",
        "missing config file",
        "unknown packaged config",
        "bad ratio",
        "missing checkpoint",
    ],
)
def test_evaluate_reports_a_bad_command_line_in_one_line(case, tmp_path):
  args, bad = CASES[case]
  done = run_binary("ipr_jax.evaluate", args, tmp_path)
  assert_one_line_error(done, bad)
  assert not (tmp_path / "eval").exists()  # stopped before evaluating anything


@pytest.mark.parametrize(
    "case",
    ["misspelt field", "bad preset", "missing config file", "bad ratio", "missing checkpoint"],
)
def test_train_reports_a_bad_command_line_in_one_line(case, tmp_path):
  args, bad = CASES[case]
  if case == "missing checkpoint":  # train has no --checkpoint flag: an unknown flag, named
    bad = "'checkpoint'"
  done = run_binary("ipr_jax.train", args, tmp_path)
  assert_one_line_error(done, bad)
  assert not (tmp_path / "checkpoints").exists()


def test_convert_reports_a_missing_file_in_one_line(tmp_path):
  done = run_binary(
      "ipr_jax.convert", [DEMO, "--torch_checkpoint=/nonexistent/last.ckpt"], tmp_path / "run"
  )
  assert_one_line_error(done, "/nonexistent/last.ckpt")


def test_evaluate_reports_a_bad_setting_found_while_running_in_one_line(tmp_path):
  """A setting that only the run can judge (here: no puzzles) is the user's too."""
  done = run_binary("ipr_jax.evaluate", [DEMO, "--config.eval.num_puzzles=0"], tmp_path)
  assert_one_line_error(done, "config.eval.num_puzzles=0")


_BINARY = """
import sys
import jax.numpy as jnp
from ipr_jax.build import cli
from ipr_jax.runtime import errors

def main(argv):
  kind = argv[1]
  if kind == "jax":
    jnp.concatenate([])  # JAX's own ValueError
  elif kind == "value":
    raise ValueError("an internal check failed")
  elif kind == "config":
    raise errors.ConfigError("config.x=3 is not allowed")
  elif kind == "missing":
    open("/nonexistent/file.txt")

cli.run(main)
"""


@pytest.mark.parametrize(
    "kind, one_line", [("jax", False), ("value", False), ("config", True), ("missing", True)]
)
def test_only_configuration_and_input_errors_lose_their_traceback(kind, one_line, tmp_path):
  """A ConfigError or a missing file is the user's to fix: one line. Anything else, JAX's own
  ValueError or a plain one included, is a bug: its traceback."""
  script = tmp_path / "binary.py"
  script.write_text(_BINARY)
  done = subprocess.run(
      [sys.executable, str(script), kind],
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      cwd=ROOT,
      timeout=120,
      check=False,
  )
  if one_line:
    assert_one_line_error(done, {"config": "config.x=3", "missing": "/nonexistent/file.txt"}[kind])
  else:
    assert done.returncode != 0 and done.returncode != cli.EXIT_USAGE, done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr, done.stderr[-2000:]
    assert "ValueError" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]


@pytest.mark.parametrize(
    "args, last_line",
    [
        ([DEMO, "--config.ipr.budgett=3", "--verbose"], "AttributeError"),  # while parsing
        ([DEMO, "--checkpoint=/nonexistent", "-v", "1"], "FileNotFoundError"),  # while running
    ],
)
def test_verbose_shows_the_traceback(args, last_line, tmp_path):
  done = run_binary("ipr_jax.evaluate", args, tmp_path)
  assert done.returncode != 0
  assert "Traceback (most recent call last)" in done.stderr
  # The exception's own line ends the traceback; with -v 1, absl's INFO lines (JAX clearing its
  # caches at exit) may follow it.
  lines = [
      line
      for line in done.stderr.strip().splitlines()
      if not re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d", line)
  ]
  assert lines[-1].startswith(last_line), done.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, verbose",
    [
        ([], False),
        (["--verbose"], True),
        (["--verbose=false"], False),
        (["--noverbose"], False),
        (["-v", "1"], True),
        (["-v", "0"], False),
        (["--verbosity=2"], True),
        (["-v=1"], True),
        (["--", "--verbose"], False),
        (["--config.ipr.budget=3"], False),
    ],
)
def test_verbose_is_read_from_argv(argv, verbose):
  assert cli.verbose_in(["prog", *argv]) is verbose


def test_check_config_names_the_field_and_value():
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  config = load_task_config("mnist_sudoku", "demo")
  cli.check_config(config)  # the preset itself is fine
  config.ipr.resampling_ratio = 1.5
  with pytest.raises(ValueError, match=r"resampling_ratio.*1\.5"):
    cli.check_config(config)
  config = load_task_config("mnist_sudoku", "demo")
  config.sampler.steps_per_patch = 0
  with pytest.raises(ValueError, match="steps_per_patch"):
    cli.check_config(config)
