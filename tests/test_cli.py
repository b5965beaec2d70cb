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


def run_binary(module, args, tmp_path, jax_platforms="cpu", timeout=300):
  """`python -m module args --workdir=tmp_path` in the checkout; `jax_platforms=None` leaves
  JAX to try every backend, as a user's shell does (on a machine without a TPU, JAX then logs
  that it found none)."""
  env = {**os.environ, "JAX_PLATFORMS": jax_platforms}
  if jax_platforms is None:
    del env["JAX_PLATFORMS"]
  return subprocess.run(
      [sys.executable, "-m", module, *args, f"--workdir={tmp_path}"],
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=timeout,
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


# What a default log must not show: JAX's backend probe on a machine without a TPU, library
# objects' reprs (Orbax's handlers and options, JAX's devices), Orbax's per-process chatter.
NOISE = ("Unable to initialize backend", "libtpu", " object at 0x", "CpuDevice(", "[process=")
# An absl log line: level, date, time, thread, file:line].
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^:\s]+):\d+\] ")
# A short training run (even_pixels:tiny shrunk as tests/test_faults.py shrinks it) and the main
# job on 2 puzzles.
_SHORT_TRAIN = [
    "--config=configs/even_pixels.py:tiny",
    "--config.data.image_size=16",
    "--config.batch_size=2",
    "--config.model.hid_dims=(16, 16)",
    "--config.model.attention=(False, True)",
    "--config.model.num_groups=8",
    "--config.model.num_head_channels=16",
    "--config.model.t_emb_dim=32",
    "--config.model.d_emb=16",
    "--config.time_sampler.density_num_samples=2000",
    "--config.num_train_steps=2",
]
_SHORT_EVALUATE = [
    "--config=mnist_sudoku:demo",
    "--config.eval.num_puzzles=2",
    "--config.eval.batch_size=2",
    "--config.ipr.budget=1",
]


def noise_in_log(stderr: str) -> list[str]:
  """The lines of a binary's stderr that the user does not need: a `NOISE` text, or an INFO line
  of absl's format logged by a file that is not the package's own (JAX's, Orbax's)."""
  own = {path.name for path in (ROOT / "ipr_jax").rglob("*.py")}
  noise = []
  for line in stderr.splitlines():
    match = _ABSL_LINE.match(line)
    if any(text in line for text in NOISE) or (
        match and match.group(1) == "I" and match.group(2) not in own
    ):
      noise.append(line)
  return noise


def test_noise_in_log_finds_the_libraries_lines():
  tpu = (
      "I1207 00:55:39.005365 140015248526208 xla_bridge.py:849] Unable to initialize backend "
      "'tpu': INTERNAL: Failed to open libtpu.so"
  )
  orbax = (
      "I1207 01:11:54.181761 140542384634752 composite_checkpoint_handler.py:237] Deferred "
      'registration for item: "state".'
  )
  own = "I1207 01:04:45.688484 139886552087424 trainer.py:302] Devices: 2 (2 local, cpu)"
  warning = "W1207 01:04:45.688484 139886552087424 xla_bridge.py:900] An NVIDIA GPU may be present"
  assert noise_in_log("\n".join([tpu, orbax, own, warning, "[2/2] 3s, ..."])) == [tpu, orbax]


@pytest.mark.parametrize("binary", ["train", "evaluate"])
def test_the_default_log_holds_only_what_the_user_needs(binary, tmp_path):
  """A short run of each binary (training saves a checkpoint with Orbax), JAX left to probe
  every backend as in a user's shell: stderr has the binary's own lines and no library chatter
  (`NOISE`, a library's INFO line). --verbose lets it through: the next test."""
  module, args = {
      "train": ("ipr_jax.train", _SHORT_TRAIN),
      "evaluate": ("ipr_jax.evaluate", _SHORT_EVALUATE),
  }[binary]
  done = run_binary(module, args, tmp_path, jax_platforms=None, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert not noise_in_log(done.stderr), done.stderr[-3000:]
  own = {"train": "Training steps 1..2", "evaluate": "Evaluating the ema params"}[binary]
  assert own in done.stderr, done.stderr[-3000:]


def test_quiet_console_filters_the_libraries_unless_verbose():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  def record(name, level, pathname="x.py"):
    return std_logging.LogRecord(name, level, pathname, 1, "message", None, None)

  handler = absl_logging.get_absl_handler()
  before = list(handler.filters)
  try:
    cli.quiet_console(verbose=False)
    cli.quiet_console(verbose=False)  # twice: one set of filters
    quiet = [f for f in handler.filters if f not in before]
    assert sorted(type(f).__name__ for f in quiet) == ["QuietLibraries", "QuietOrbax"]
    passes = lambda r: all(f.filter(r) for f in handler.filters)
    assert not passes(record("jax._src.xla_bridge", std_logging.INFO))
    assert passes(record("jax._src.xla_bridge", std_logging.WARNING))
    assert not passes(record("absl", std_logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
    assert passes(record("absl", std_logging.INFO, "/ipr_jax/training/trainer.py"))
    assert passes(record("jaxtyping", std_logging.INFO))  # another library's name, not JAX's
    cli.quiet_console(verbose=True)
    assert list(handler.filters) == before
    assert passes(record("jax._src.xla_bridge", std_logging.INFO))
  finally:
    for f in list(handler.filters):
      if f not in before:
        handler.removeFilter(f)


@pytest.mark.parametrize(
    "flag, bad", [("--time_limit_s=-1", "time_limit_s=-1"), ("--checkpoint_every_s=0", "0")]
)
def test_train_refuses_a_bad_time_flag_in_one_line(flag, bad, tmp_path):
  done = run_binary("ipr_jax.train", [DEMO, flag], tmp_path)
  assert_one_line_error(done, bad)
  assert not (tmp_path / "checkpoints").exists()
