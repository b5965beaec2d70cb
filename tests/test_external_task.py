"""The external-task example (experiments/external_task/): a task registered from outside ipr_jax
trains for a few steps and is evaluated by the package's binaries' library functions; its file
enters the code record. Also `tasks.register_task`'s checks."""

import json
import pathlib
import sys
import types

import jax
import numpy as np
import pytest

from ipr_jax import tasks
from ipr_jax.build import config_base
from ipr_jax.evaluation import runner
from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.tasks import base
from ipr_jax.training import trainer

_EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "external_task"


@pytest.fixture(name="config")
def fixture_config():
  """The example's config (loading it registers the task); the task is forgotten afterwards, so
  that other tests in this process see the built-in tasks only."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)  # compilation dominates here
  try:
    yield config_base.load_config(_EXAMPLE / "checkerboard_config.py")
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
    tasks.unregister_task("checkerboard")
    sys.modules.pop("checkerboard_task", None)
    sys.path.remove(str(_EXAMPLE))


def test_the_example_task_trains_and_evaluates(config, tmp_path):
  assert "checkerboard" in tasks.names() and "checkerboard" not in tasks.TASKS
  config.num_train_steps = 5
  config.log_every_steps = 5
  trainer.train(config, tmp_path)
  rows = runner.evaluate(config, str(tmp_path))
  assert [row["budget"] for row in rows] == [0, 1, 2]
  assert all(row["num_puzzles"] == 8 and np.isfinite(row["mean_broken_pairs"]) for row in rows)
  run = json.loads((tmp_path / "eval" / "checkerboard_test" / "shards" / "run.json").read_text())
  files, registered = run["code"]["files"], "registered/checkerboard/checkerboard_task.py"
  assert set(files) == set(eval_shards.CODE_FILES) | {registered}


def test_the_example_scores_checkerboards(config):
  module = tasks.get(config.task)
  data = module.make_data(config)
  batch = data.test_batch(3, np.arange(6), (4, 10))
  scores = module.score_fn(2)(batch["image"])
  assert np.asarray(scores["valid"]).all()  # the solutions are checkerboards
  given = 16 - np.asarray(batch["mask"][:, ::2, ::2, 0]).sum(axis=(1, 2))
  np.testing.assert_array_equal(given, batch["num_given"])
  flipped = np.asarray(batch["image"]).copy()
  flipped[:, :2, :2] *= -1  # one patch of the wrong colour: its two neighbours break the rule
  np.testing.assert_array_equal(module.score_fn(2)(flipped)["broken_pairs"], 2)


def _task_module(name, **overrides):
  module = types.ModuleType(name)
  module.__file__ = __file__
  module.NAME, module.HOST_RENDERED, module.CELL_VERIFIER = name, False, False
  module.make_data = module.unknown_counts = lambda config: None
  module.Evaluation = type("Evaluation", (base.Evaluation,), {})
  for key, value in overrides.items():
    setattr(module, key, value)
  return module


def test_register_task_checks_the_interface_and_the_name():
  with pytest.raises(ValueError, match=r"lacks \['make_data'\]"):
    tasks.register_task(_without(_task_module("t1"), "make_data"))
  with pytest.raises(ValueError, match="must subclass"):
    tasks.register_task(_task_module("t2", Evaluation=object))
  with pytest.raises(ValueError, match="taken by ipr_jax.tasks.even_pixels"):
    tasks.register_task(_task_module("even_pixels"))
  with pytest.raises(ValueError, match="built-in"):
    tasks.unregister_task("even_pixels")
  module = _task_module("t3")
  tasks.register_task(module, code_files=["conftest.py"])
  try:
    tasks.register_task(module)  # again: nothing happens
    assert tasks.get("t3") is module
    record = eval_shards.code_record()["files"]
    assert {"registered/t3/test_external_task.py", "registered/t3/conftest.py"} <= set(record)
  finally:
    tasks.unregister_task("t3")
  assert "t3" not in tasks.names()
  assert set(eval_shards.code_record()["files"]) == set(eval_shards.CODE_FILES)


def _without(module, attribute):
  delattr(module, attribute)
  return module
