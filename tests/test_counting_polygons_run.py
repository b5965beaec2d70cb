"""Counting Polygons end to end: the train and evaluate binaries' functions on the tiny preset.

The tiny preset is shrunk further (U-Net widths 8, batch 2, 3 steps) so that the 128x128 images stay
cheap on 2 CPU cores; the training images are rendered on the host as in a real run.
"""

import csv
import json

import jax
import numpy as np
import pytest

from ipr_jax.evaluation import runner
from ipr_jax.metrics import counting_polygons as cp_metrics
from ipr_jax.runtime import checkpoint
from ipr_jax.tasks import counting_polygons as counting_polygons_task
from ipr_jax.training import trainer


@pytest.fixture(autouse=True, scope="module")
def fast_compilation():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def tiny_config():
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  config = load_task_config("counting_polygons", "tiny")
  config.batch_size = 2
  config.num_train_steps = 3
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.model.hid_dims = (8, 8, 8)
  config.model.num_head_channels = 8
  config.model.t_emb_dim = 16
  config.model.d_emb = 8
  config.time_sampler.density_num_samples = 2000
  config.data.render_workers = 2
  config.ipr.budget = 1
  config.eval.num_puzzles = 3
  config.eval.batch_size = 2
  config.eval.num_plot_puzzles = 1
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = tiny_config()
  workdir = tmp_path_factory.mktemp("cp_run")
  result = trainer.train(config, workdir)
  return config, workdir, result


def test_train_runs_on_host_rendered_images(trained):
  config, workdir, result = trained
  assert int(result.state.step) == 3 and not result.preempted
  assert [r["step"] for r in result.history] == [1, 2, 3]
  for record in result.history:
    assert np.isfinite(record["loss"]) and 0.0 <= record["input_wait"] <= 1.0
  assert json.loads((workdir / "config.json").read_text())["task"] == "counting_polygons"
  assert checkpoint.find_step_dir(workdir).name == "3"


def test_resume_sees_the_same_images(trained, tmp_path):
  config, _, straight = trained
  workdir = tmp_path / "resumed"
  partial = config.copy_and_resolve_references()
  partial.num_train_steps = 2
  trainer.train(partial, workdir)
  resumed = trainer.train(config, workdir)
  assert int(resumed.state.step) == 3
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      resumed.state.params,
      straight.state.params,
  )


def test_evaluate_writes_both_metrics_per_budget(trained):
  config, workdir, _ = trained
  rows = runner.evaluate(config, str(workdir))
  out = workdir / "eval" / config.eval.name
  for name in ("results.json", "results.csv", "valid_rate_vs_budget.png", "ipr_process.png"):
    assert (out / name).is_file(), name
  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [int(r["budget"]) for r in table] == [0, 1]
  columns = ["valid_rate", "mean_are_vertices_uniform", "mean_numbers_match_objects", "mean_nfe"]
  columns += [f"mean_polygons_count_{n}" for n in range(1, 10)]
  columns += [f"mean_vertex_count_{v}" for v in range(3, 8)]
  for column in columns:
    assert column in table[0], column
  for row in rows:
    assert row["num_puzzles"] == 3
    # valid = uniform and matching: rarer than either, and at least as frequent as the two
    # together allow (Frechet bounds); a per-image valid that is not their conjunction breaks one.
    uniform, match = row["mean_are_vertices_uniform"], row["mean_numbers_match_objects"]
    assert uniform + match - 1 - 1e-9 <= row["valid_rate"] <= min(uniform, match) + 1e-9
  metadata = json.loads((out / "results.json").read_text())["metadata"]
  assert metadata["task"] == "counting_polygons"
  assert set(metadata["scorer_held_out_accuracy"]) == set(cp_metrics.HEAD_CLASSES)


def test_score_fn_agrees_with_the_batch_metrics():
  """Per-image scores averaged over a batch are the spec's batch metrics."""
  from ipr_jax.models import polygon_scorer  # pylint: disable=g-import-not-at-top

  scorer = polygon_scorer.make_scorer({"widths": [8, 8, 16]})
  params = polygon_scorer.init_scorer_params(scorer, jax.random.key(3))
  images = jax.random.uniform(jax.random.key(4), (6, 128, 128, 3), minval=-1.0, maxval=1.0)
  per_image = jax.device_get(counting_polygons_task.score_fn(scorer, params)(images))
  batch = cp_metrics.counting_polygons_metrics(scorer.apply({"params": params}, images))
  for name in ("are_vertices_uniform", "numbers_match_objects"):
    assert np.isclose(np.mean(per_image[name]), batch[name])
  for n in range(1, 10):
    assert np.isclose(
        np.mean(per_image[f"polygons_count_{n}"]), batch[f"relative_polygons_count_{n}"]
    )
  np.testing.assert_array_equal(
      per_image["valid"], per_image["are_vertices_uniform"] & per_image["numbers_match_objects"]
  )


def test_missing_scorer_weights_are_a_clear_error(trained, tmp_path):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.eval.scorer_path = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    runner.evaluate(config, str(workdir))


def test_wrong_geometry_is_a_clear_error(tmp_path):
  config = tiny_config()
  config.data.image_size = 64
  with pytest.raises(ValueError, match="data.image_size=64"):
    trainer.train(config, tmp_path)
  config = tiny_config()
  config.data.background_dir = str(tmp_path / "no_such_folder")
  with pytest.raises(ValueError, match="no_such_folder"):
    trainer.train(config, tmp_path)
