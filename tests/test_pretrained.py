"""Shipped models: the file format, its checks, and the shipped demo model's record."""

import jax
import numpy as np
import pytest

from ipr_jax import build
from ipr_jax.build import pretrained
from ipr_jax.runtime import checkpoint


@pytest.fixture(scope="module")
def tiny():
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  config = load_task_config("mnist_sudoku", "tiny")
  params = build.init_params(config, build.make_model(config), jax.random.key(0))
  return config, jax.device_get(params)


def test_save_load_roundtrip(tiny, tmp_path):
  config, params = tiny
  path = tmp_path / "m.npz"
  pretrained.save(path, params, config, {"steps": 3})
  loaded = pretrained.load_file(path)
  # The metadata gains the parameters' sha256, which loading checks.
  assert loaded.name == "m" and loaded.metadata == {
      "steps": 3,
      "params_sha256": checkpoint.params_digest(params),
  }
  assert jax.tree.structure(loaded.params) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
  pretrained.check_compatible(config, loaded)
  assert tuple(loaded.config.model.hid_dims) == tuple(config.model.hid_dims)


def test_bad_files_are_clear_errors(tiny, tmp_path):
  config, params = tiny
  with pytest.raises(FileNotFoundError, match="nothing.npz"):
    pretrained.load_file(tmp_path / "nothing.npz")
  with pytest.raises(FileNotFoundError, match="no_such_model"):
    pretrained.load("no_such_model")
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="corrupt.npz"):
    pretrained.load_file(corrupt)
  foreign = tmp_path / "foreign.npz"
  np.savez(foreign, x=np.zeros(3))
  with pytest.raises(ValueError, match="config_json"):
    pretrained.load_file(foreign)
  # Weights of another model under this config: refused, naming a parameter.
  other = config.copy_and_resolve_references()
  other.model.hid_dims = (16, 32, 32)
  shapes = jax.eval_shape(
      lambda: build.init_params(other, build.make_model(other), jax.random.key(0))
  )
  small = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)  # no compilation needed
  mismatched = tmp_path / "mismatched.npz"
  pretrained.save(mismatched, small, config, {})
  with pytest.raises(ValueError, match="do not fit the model"):
    pretrained.load_file(mismatched)


def test_check_compatible_names_the_changed_field(tiny, tmp_path):
  config, params = tiny
  path = tmp_path / "m.npz"
  pretrained.save(path, params, config, {})
  shipped = pretrained.load_file(path)
  changed = config.copy_and_resolve_references()
  changed.data.cell_size = 7
  with pytest.raises(ValueError, match=r"data.cell_size: 7 \(shipped: 14\)"):
    pretrained.check_compatible(changed, shipped)
  free = config.copy_and_resolve_references()
  free.ipr.budget, free.eval.num_puzzles = 30, 1000  # sampling settings are free
  pretrained.check_compatible(free, shipped)


def test_export_run_writes_the_ema_weights_and_record(tiny, tmp_path):
  config, params = tiny
  ema = jax.tree.map(lambda x: x + 1.0, params)
  checkpoint.save_params_checkpoint(
      tmp_path / "run", params, config, build.make_optimizer(config), ema_params=ema, step=7
  )
  path = pretrained.export_run(
      tmp_path / "run", "exported", git_commit="abc", extra={"note": "x"}, output_dir=tmp_path
  )
  loaded = pretrained.load_file(path)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, ema)
  assert loaded.metadata["steps"] == 7 and loaded.config.num_train_steps == 7
  assert loaded.metadata["git_commit"] == "abc" and loaded.metadata["note"] == "x"


def test_the_shipped_demo_model_is_small_and_recorded():
  assert "mnist_sudoku_demo" in pretrained.names()
  path = pretrained.path_of("mnist_sudoku_demo")
  assert path.stat().st_size < 5e6
  demo = pretrained.load("mnist_sudoku_demo")
  for key in (
      "steps",
      "batch_size",
      "machine",
      "git_commit",
      "final_loss",
      "wall_time_seconds",
      "regression",
  ):
    assert key in demo.metadata, key
  assert len(demo.metadata["git_commit"]) == 40


def test_the_shipped_demo_weights_are_the_committed_runs_ema_weights(tmp_path):
  """The shipped weights are the EMA weights of the committed training checkpoint
  (experiments/demo/demo_run), and the metadata's steps are that checkpoint's step, the last step
  its metrics.jsonl logged, and the demo preset's recipe (DEMO_TRAIN_STEPS)."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  archive = (
      pathlib.Path(__file__).resolve().parent.parent
      / "experiments"
      / "demo"
      / "demo_run"
      / "demo_step20494.tar.gz"
  )
  with tarfile.open(archive) as tar:
    tar.extractall(tmp_path, filter="data")
  demo = pretrained.load("mnist_sudoku_demo")
  step_dir = checkpoint.find_step_dir(tmp_path)
  ema = checkpoint.restore_params(tmp_path, which="ema")
  assert jax.tree.structure(ema) == jax.tree.structure(demo.params)
  jax.tree.map(np.testing.assert_array_equal, ema, demo.params)
  logged = [
      json.loads(line)["step"]
      for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
      if line.strip()
  ]
  demo_steps = load_task_config("mnist_sudoku", "demo").num_train_steps
  assert demo.metadata["steps"] == int(step_dir.name) == logged[-1] == demo_steps
  assert demo.metadata["logged_step"] == logged[-1]
