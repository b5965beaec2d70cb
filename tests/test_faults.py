"""The fault record: what a new user met on a fresh clone, each case as a test.

| case | before the fix |
|---|---|
| 64 bytes flipped in a checkpoint's data file (same size) | evaluated, exit 0, no warning |
| a checkpoint of the `tiny` preset (14-pixel cells) evaluated with `:demo` (7-pixel) | exit 0 |
| workdir is a file; read-only workdir; a full disk | 41- to 79-line tracebacks |
| a full disk while training | kept going after the async save failed, left
  `checkpoints/4.orbax-checkpoint-tmp`, after which a rerun refused to start |
| kill -9 during training, resume | metrics.jsonl held the steps after the checkpoint twice |
| SIGTERM during training | saved and stopped, but exit status 0 |
| `--config.data.patch_size=14` with the demo preset, in evaluate | "sampler: n must be ..." |
| the same flag twice with different values | the error quoted the first value |

Now: one `error:` line and a non-zero exit (or a correct result) each. The binaries run as
subprocesses on tiny configs; most fail before anything compiles. A full disk is simulated two
ways: a per-process file-size limit (RLIMIT_FSIZE: writes past it fail as on a full disk; works
for any user) and, where this user may mount one, a real 3 MiB tmpfs. A read-only directory is a
read-only tmpfs for root (whom permissions do not stop) and a chmod 555 directory otherwise.
"""

import contextlib
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from ipr_jax import build
from ipr_jax.build import cli
from ipr_jax.build import pretrained
from ipr_jax.evaluation import settings as eval_settings
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import errors
from ipr_jax.training import train_step
from ipr_jax.training import trainer

from test_train import fast_compilation  # noqa: F401  pylint: disable=unused-import

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = "--config=configs/mnist_sudoku.py:demo"
# even_pixels.py:tiny shrunk as tests/test_train.py does (16x16 images, widths 16, batch 2).
TRAIN = [
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
    "--config.log_every_steps=1",
]
# The documented exit statuses (docs/binaries_and_configs.md), as numbers: what a script sees.
EXIT_USAGE, EXIT_STORAGE, EXIT_PREEMPTED = 2, 74, 75
FEW_PUZZLES = ["--config.eval.num_puzzles=2", "--config.eval.batch_size=2", "--config.ipr.budget=1"]


def run_binary(module, args, file_limit_kb=None, timeout=300):
  """Runs `python -m module args`; with `file_limit_kb`, writes past that size in one file fail
  with EFBIG, as on a full disk (`ulimit -f`, SIGXFSZ ignored so that the write fails instead of
  killing the process)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  command = [sys.executable, "-m", module, *args]
  if file_limit_kb is not None:
    command = ["sh", "-c", 'ulimit -f "$0" && trap "" XFSZ && exec "$@"', str(file_limit_kb)]
    command += [sys.executable, "-m", module, *args]
  return subprocess.run(
      command,
      capture_output=True,
      text=True,
      env=env,
      cwd=ROOT,
      timeout=timeout,
      check=False,
  )


def error_line(done, status, *texts):
  """The binary's one `error:` line, after checking the exit status and that no traceback came."""
  output = done.stdout + done.stderr
  assert done.returncode == status, (done.returncode, output[-3000:])
  assert "Traceback" not in output, output[-3000:]
  errors_ = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors_) == 1, done.stderr[-3000:]
  last = [line for line in done.stderr.splitlines() if line.strip()][-1]
  assert last == errors_[0], done.stderr[-3000:]
  for text in texts:
    assert text in errors_[0], errors_[0]
  return errors_[0]


def temporaries(workdir):
  directory = checkpoint.checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(p.name for p in directory.iterdir() if "tmp" in p.name)


# ------------------------------------------------------------------------------------------------
# Simulated machine faults.
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(path, options):
  """A tmpfs at `path` (root only); skips the test where it cannot be mounted."""
  path.mkdir(parents=True, exist_ok=True)
  done = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
      capture_output=True,
      check=False,
  )
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _really_read_only(path):
  try:
    with tempfile.NamedTemporaryFile(dir=path):
      return False
  except OSError:
    return True


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory in which nothing can be written, for this user."""
  path = tmp_path / "read_only"
  if os.geteuid() == 0:
    with mounted_tmpfs(path, "ro,size=1m"):
      assert _really_read_only(path)
      yield path
    return
  path.mkdir()
  path.chmod(0o555)
  if not _really_read_only(path):
    pytest.skip("cannot make a read-only directory here")
  yield path
  path.chmod(0o755)


@pytest.fixture(params=["file_size_limit", "tmpfs"])
def full_disk(request, tmp_path):
  """(workdir, file_limit_kb, make_room): a workdir whose disk fills up at the first checkpoint
  (file_limit_kb() for `run_binary`); make_room() gives the rerun space again."""
  if request.param == "file_size_limit":
    state = {"limit_kb": 64}
    yield tmp_path / "run", lambda: state["limit_kb"], lambda: state.update(limit_kb=None)
    return
  disk = tmp_path / "disk"
  with mounted_tmpfs(disk, "size=3m"):
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (2900 * 1024))  # leaves about 170 KB
    yield disk / "run", lambda: None, filler.unlink


# ------------------------------------------------------------------------------------------------
# 1. Checkpoints that prove what they are.
# ------------------------------------------------------------------------------------------------


def _config(preset):
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  return load_task_config("mnist_sudoku", preset)


def _write_checkpoint(workdir, config, params=None):
  if params is None:
    params = build.init_params(config, build.make_model(config), jax.random.key(0))
  return checkpoint.save_params_checkpoint(
      workdir, params, config, build.make_optimizer(config), step=8
  )


def _flip_bytes(step_dir, count=64):
  """Flips `count` bytes in the middle of the checkpoint's largest data file (same size)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
  largest.write_bytes(bytes(data))
  return largest


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
  """A checkpoint of the shipped demo model's weights under the demo config."""
  workdir = tmp_path_factory.mktemp("demo_checkpoint")
  shipped = pretrained.load("mnist_sudoku_demo")
  step_dir = _write_checkpoint(workdir, _config("demo"), shipped.params)
  return workdir, step_dir, shipped


def test_every_save_records_the_digests_of_the_live_and_ema_parameters(demo_checkpoint):
  _, step_dir, shipped = demo_checkpoint
  digests = checkpoint.recorded_digests(step_dir)
  # The shipped weights have the digest that run.json records for them.
  assert digests["params_sha256"] == pretrained.SHIPPED_SHA256["mnist_sudoku_demo"]
  assert digests["ema_params_sha256"] == pretrained.SHIPPED_SHA256["mnist_sudoku_demo"]
  # The whole state's, the optimizer state's bytes included, as the restore sees it.
  restored = checkpoint._restore_state_dict(step_dir)  # pylint: disable=protected-access
  assert digests["state_sha256"] == checkpoint.state_digest(restored)
  assert checkpoint.params_digest(shipped.params) == eval_settings.params_digest(shipped.params)


def test_flipped_bytes_in_a_checkpoint_are_refused(demo_checkpoint, tmp_path):
  workdir, step_dir, _ = demo_checkpoint
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  _flip_bytes(damaged / "checkpoints" / step_dir.name)
  damaged_step = damaged / "checkpoints" / step_dir.name
  for which in ("ema", "live"):
    with pytest.raises(checkpoint.CheckpointError, match="do not match the sha256"):
      checkpoint.restore_params(damaged, which)
  # The binary: one line naming the checkpoint, exit status 2, nothing evaluated.
  done = run_binary(
      "ipr_jax.evaluate",
      [DEMO, *FEW_PUZZLES, f"--checkpoint={damaged}", f"--workdir={tmp_path / 'eval'}"],
  )
  error_line(done, EXIT_USAGE, str(damaged_step), "sha256")
  assert not (tmp_path / "eval" / "eval").exists()


def test_a_checkpoint_without_digests_still_restores(demo_checkpoint, tmp_path, caplog):
  """Checkpoints written before the digests were: restored unchecked, with a warning."""
  workdir, step_dir, shipped = demo_checkpoint
  legacy = tmp_path / "legacy"
  shutil.copytree(workdir, legacy)
  shutil.rmtree(legacy / "checkpoints" / step_dir.name / "digest")
  assert checkpoint.recorded_digests(legacy / "checkpoints" / step_dir.name) is None
  params = checkpoint.restore_params(legacy)
  assert checkpoint.params_digest(params) == checkpoint.params_digest(shipped.params)
  assert "no parameter digest" in caplog.text


def test_a_changed_shipped_model_is_refused(tmp_path, monkeypatch):
  original = pretrained.path_of("mnist_sudoku_demo")
  with np.load(original) as f:
    arrays = {k: f[k] for k in f.files}
  name = next(k for k in arrays if k.endswith("kernel"))
  arrays[name] = arrays[name].copy()
  arrays[name].reshape(-1)[:16] = 2.5e38  # what 64 flipped bytes made of a checkpoint's weights
  np.savez_compressed(tmp_path / "mnist_sudoku_demo.npz", **arrays)
  monkeypatch.setattr(pretrained, "ASSETS", tmp_path)
  with pytest.raises(errors.ConfigError, match="mnist_sudoku_demo.npz.*sha256"):
    pretrained.load("mnist_sudoku_demo")


def test_a_checkpoint_of_another_geometry_is_refused_unless_allowed(tmp_path):
  """A `tiny` checkpoint (14-pixel cells; the same U-Net) under the demo config (7-pixel)."""
  tiny, demo = _config("tiny"), _config("demo")
  step_dir = _write_checkpoint(tmp_path / "tiny", tiny)
  done = run_binary(
      "ipr_jax.evaluate",
      [DEMO, *FEW_PUZZLES, f"--checkpoint={tmp_path / 'tiny'}", f"--workdir={tmp_path}"],
  )
  line = error_line(done, EXIT_USAGE, str(step_dir), "--allow_config_mismatch")
  for field in ("data.cell_size: 14 (checkpoint) vs 7", "data.image_size: 56", "data.patch_size"):
    assert field in line, line
  assert not (tmp_path / "eval").exists()
  # Deliberate reuse, allowed: the weights load (the U-Net is the same).
  params, source, _ = eval_settings.load_params(
      demo, str(tmp_path), str(tmp_path / "tiny"), allow_config_mismatch=True
  )
  assert source == str(step_dir) and params
  # A field that leaves the weights' meaning alone (the compute dtype) is no mismatch.
  demo_bf16 = _config("tiny")
  demo_bf16.model.dtype = "bfloat16"
  assert checkpoint.check_stored_config(step_dir, demo_bf16) == []
  # Resuming training under another geometry is refused too, before config.json is replaced.
  state = train_step.create_train_state(
      demo, build.make_model(demo), build.make_optimizer(demo), jax.random.key(0)
  )
  with pytest.raises(checkpoint.ConfigMismatchError, match="data.cell_size"):
    checkpoint.restore_latest(tmp_path / "tiny", state, demo)


def test_a_converted_checkpoint_gets_digests(tmp_path):
  from ipr_jax.conversion import converter  # pylint: disable=g-import-not-at-top
  from ipr_jax.conversion import state_dict as state_dict_lib  # pylint: disable=g-import-not-at-top

  shipped = pretrained.load("mnist_sudoku_demo")
  state_dict = state_dict_lib.state_dict_from_unet_params(
      shipped.params, build.make_model(shipped.config)
  )
  np.savez(tmp_path / "sd.npz", **state_dict)
  step_dir = converter.convert_checkpoint(str(tmp_path / "sd.npz"), _config("demo"), str(tmp_path))
  digests = checkpoint.recorded_digests(step_dir)
  assert digests["ema_params_sha256"] == pretrained.SHIPPED_SHA256["mnist_sudoku_demo"]


# ------------------------------------------------------------------------------------------------
# 2. One line for the machine's own faults.
# ------------------------------------------------------------------------------------------------


def _convert_input(tmp_path):
  path = tmp_path / "sd.npz"
  if not path.exists():
    from ipr_jax.conversion import state_dict as state_dict_lib  # pylint: disable=g-import-not-at-top

    shipped = pretrained.load("mnist_sudoku_demo")
    np.savez(
        path,
        **state_dict_lib.state_dict_from_unet_params(
            shipped.params, build.make_model(shipped.config)
        ),
    )
  return path


def _binary_args(binary, workdir, tmp_path):
  if binary == "train":
    return "ipr_jax.train", [*TRAIN, f"--workdir={workdir}"]
  if binary == "evaluate":
    return "ipr_jax.evaluate", [DEMO, *FEW_PUZZLES, f"--workdir={workdir}"]
  return "ipr_jax.convert", [
      f"--torch_checkpoint={_convert_input(tmp_path)}",
      DEMO,
      f"--workdir={workdir}",
  ]


@pytest.mark.parametrize("binary", ["train", "evaluate", "convert"])
def test_a_workdir_that_is_a_file_is_one_line(binary, tmp_path):
  workdir = tmp_path / "a_file"
  workdir.write_text("not a directory")
  module, args = _binary_args(binary, workdir, tmp_path)
  error_line(run_binary(module, args), EXIT_STORAGE, str(workdir), "not a directory")
  assert workdir.read_text() == "not a directory"


@pytest.mark.parametrize("binary", ["train", "evaluate", "convert"])
def test_a_read_only_workdir_is_one_line(binary, read_only_dir, tmp_path):
  module, args = _binary_args(binary, read_only_dir, tmp_path)
  error_line(run_binary(module, args), EXIT_STORAGE, str(read_only_dir), "writable")


def test_a_full_disk_stops_training_in_one_line_and_the_rerun_resumes(full_disk):
  workdir, file_limit_kb, make_room = full_disk
  args = [
      *TRAIN,
      "--config.num_train_steps=12",
      "--config.checkpoint_every_steps=4",
      "--config.keep_checkpoints=1",
      f"--workdir={workdir}",
  ]
  done = run_binary("ipr_jax.train", args, file_limit_kb())
  line = error_line(done, EXIT_STORAGE, str(checkpoint.checkpoint_dir(workdir)), "step 4")
  assert "no space" in line or "size limit" in line, line
  output = done.stdout + done.stderr
  assert "Saving checkpoint of step 8" not in output  # stopped at the failed save, not after
  assert len(output.splitlines()) < 60, output[-3000:]
  assert temporaries(workdir) == [] and checkpoint.checkpoint_dir(workdir).is_dir()
  make_room()
  done = run_binary("ipr_jax.train", args, file_limit_kb())
  assert done.returncode == 0, done.stderr[-3000:]
  metrics = (workdir / "metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in metrics]
  assert steps == list(range(1, 13))


@pytest.mark.parametrize("binary", ["evaluate", "convert"])
def test_a_full_disk_in_evaluate_and_convert_is_one_line(binary, tmp_path):
  workdir = tmp_path / "run"
  module, args = _binary_args(binary, workdir, tmp_path)
  # 8 KB a file: the workdir check passes, run.json or the checkpoint's data does not fit.
  done = run_binary(module, args, file_limit_kb=8)
  error_line(done, EXIT_STORAGE, str(workdir))
  assert temporaries(workdir) == []
  if binary == "evaluate":
    assert not list((workdir / "eval").rglob("batch_*"))


class _SaveFailsLater:
  """A checkpoint manager whose saves fail in the background, as on a disk that fills up while
  Orbax writes: `save` starts, and the error surfaces when the save is waited for."""

  def __init__(self, manager, workdir):
    self._manager, self._workdir, self._failing = manager, workdir, None

  def __getattr__(self, name):
    return getattr(self._manager, name)

  def save(self, step, args):
    del args
    (checkpoint.checkpoint_dir(self._workdir) / f"{step}.orbax-checkpoint-tmp").mkdir()
    self._failing = step
    return True

  def is_saving_in_progress(self):
    return False

  def wait_until_finished(self):
    if self._failing is not None:
      self._failing = None
      raise ValueError(
          "RESOURCE_EXHAUSTED: Error writing local file: Failed to write: No space left on "
          "device [os_error_code='28']"
      )


def _small_config(**overrides):
  from test_train import small_config  # pylint: disable=g-import-not-at-top

  config = small_config(**overrides)
  config.batch_size = 2
  return config


def test_a_failed_async_save_stops_training_at_the_next_step(tmp_path, monkeypatch):
  make_manager = checkpoint.make_manager
  monkeypatch.setattr(
      checkpoint,
      "make_manager",
      lambda workdir, **kwargs: _SaveFailsLater(make_manager(workdir, **kwargs), workdir),
  )
  config = _small_config(num_train_steps=12, checkpoint_every_steps=4, log_every_steps=1)
  seen = []
  with pytest.raises(Exception) as raised:  # pylint: disable=broad-exception-caught
    trainer.train(config, tmp_path, hooks=[seen.append])
  assert seen == [1, 2, 3, 4, 5]  # not on to the next save at step 8
  assert isinstance(raised.value, errors.StorageError), raised.value
  assert "no space left on the device while saving the checkpoint of step 4" in str(raised.value)
  assert temporaries(tmp_path) == []


def test_a_killed_save_does_not_block_the_rerun(tmp_path):
  """A kill -9 during the first save leaves `checkpoints/<step>.orbax-checkpoint-tmp`."""
  config = _small_config(num_train_steps=2, checkpoint_every_steps=2)
  leftover = checkpoint.checkpoint_dir(tmp_path) / "4.orbax-checkpoint-tmp"
  (leftover / "state").mkdir(parents=True)
  result = trainer.train(config, tmp_path)  # starts over, removing the half-written directory
  assert int(result.state.step) == 2 and not leftover.exists()
  assert checkpoint.find_step_dir(tmp_path).name == "2"


def test_resuming_cuts_metrics_back_to_the_restored_step(tmp_path):
  """kill -9 after the checkpoint of step 4 and the records of steps 5 and 6 (the last one half
  written): the resumed run logs 5 and 6 again, once each."""
  config = _small_config(num_train_steps=6, checkpoint_every_steps=4, log_every_steps=1)
  trainer.train(config, tmp_path)
  shutil.rmtree(checkpoint.checkpoint_dir(tmp_path) / "6")  # as if killed before this save
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "lo')  # a record the kill cut short
  config.num_train_steps = 8
  trainer.train(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 9))


def test_sigterm_saves_and_exits_with_the_preempted_status(tmp_path):
  args = [
      *TRAIN,
      "--config.num_train_steps=100000",
      "--config.checkpoint_every_steps=100000",
      f"--workdir={tmp_path}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  with subprocess.Popen(
      [sys.executable, "-m", "ipr_jax.train", *args],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  ) as process:
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists():
      assert process.poll() is None and time.time() < deadline, "training did not start"
      time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
  assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
  assert "Traceback" not in stderr
  last = [line for line in stderr.splitlines() if line.strip()][-1]
  assert "rerun the same command to resume" in last, last
  steps = checkpoint.checkpoint_dir(tmp_path)
  assert [p.name for p in steps.iterdir() if p.name.isdigit()], "no checkpoint saved"


def test_the_time_limit_flag_saves_and_exits_with_the_preempted_status(tmp_path):
  args = [*TRAIN, "--config.num_train_steps=100000", "--time_limit_s=0", f"--workdir={tmp_path}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  done = subprocess.run(
      [sys.executable, "-m", "ipr_jax.train", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
  # A limit of 0 s has passed by the first step: that step is saved.
  assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()] == ["1"]


def test_a_patch_size_that_does_not_fit_the_cells_is_one_line(tmp_path):
  done = run_binary(
      "ipr_jax.evaluate", [DEMO, "--config.data.patch_size=14", f"--workdir={tmp_path}"]
  )
  error_line(done, EXIT_USAGE, "--config.data.patch_size=14", "expected 7")


def test_a_flag_given_twice_is_reported_by_the_value_used(tmp_path):
  done = run_binary(
      "ipr_jax.evaluate",
      [
          DEMO,
          "--config.ipr.resampling_ratio=0.5",
          "--config.ipr.resampling_ratio=1.5",
          f"--workdir={tmp_path}",
      ],
  )
  error_line(done, EXIT_USAGE, "--config.ipr.resampling_ratio=1.5", "got 1.5")


def test_the_exit_statuses_are_the_documented_ones():
  assert (cli.EXIT_USAGE, cli.EXIT_STORAGE, cli.EXIT_PREEMPTED) == (2, 74, 75)


def test_storage_errors_name_the_path_and_what_to_do():
  error = errors.storage_error(OSError(errno.ENOSPC, "No space left on device", "/x/y"))
  assert isinstance(error, errors.StorageError)
  assert str(error) == "/x/y: no space left on the device; free space there or use another " + (
      "--workdir, then rerun"
  )
  tensorstore = ValueError(
      'RESOURCE_EXHAUSTED: Failed writing: "/w/checkpoints/4.orbax-checkpoint-tmp/d/ab": '
      "Failed to write 466121 bytes to file 4: No space left on device [os_error_code='28']"
  )
  error = errors.storage_error(tensorstore, "/w/checkpoints", "saving the checkpoint of step 4")
  assert str(error).startswith("/w/checkpoints: no space left on the device while saving")
  assert errors.storage_error(ValueError("a bug")) is None
  assert errors.storage_error(FileNotFoundError(errno.ENOENT, "missing", "/x")) is None
