"""The task registry (ipr_jax/tasks): one module per task, no task branches elsewhere."""

import ast
import pathlib
import re

import pytest

from conftest import load_task_config
from ipr_jax import tasks
from ipr_jax.tasks import base

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_get_names_the_unknown_task_and_the_known_ones():
  with pytest.raises(
      ValueError,
      match=r"unknown task 'sudoku'; expected one of \('even_pixels', "
      r"'mnist_sudoku', 'counting_polygons'\)",
  ):
    tasks.get("sudoku")


@pytest.mark.parametrize("name", ["even_pixels", "mnist_sudoku", "counting_polygons"])
def test_every_config_file_has_its_task_module(name):
  config = load_task_config(name, "tiny")
  module = tasks.get(config.task)
  assert module.NAME == name and name in tasks.TASKS
  assert issubclass(module.Evaluation, base.Evaluation)
  for attribute in ("HOST_RENDERED", "CELL_VERIFIER", "make_data", "unknown_counts"):
    assert hasattr(module, attribute), attribute
  assert module.HOST_RENDERED == (name == "counting_polygons")
  if module.HOST_RENDERED:  # what train.py takes from a host-rendered task
    assert callable(module.train_feed) and callable(module.images_on_device)


def test_only_sudoku_has_a_cell_verifier():
  assert tasks.with_cell_verifier() == ("mnist_sudoku",)


def test_the_trainer_imports_no_task_module():
  """train.py reaches a task's data only through the registry."""
  source = (_ROOT / "ipr_jax" / "train.py").read_text()
  assert not re.search(r"^from ipr_jax\.(data|tasks)\.|^from ipr_jax\.data import", source, re.M)


def test_no_task_branches_outside_the_registry():
  """What differs between tasks lives in their modules: no `config.task ==` anywhere else."""
  files = [*(_ROOT / "ipr_jax").rglob("*.py"), _ROOT / "experiments" / "ipr_colab.ipynb"]
  branches = [
      f"{path.relative_to(_ROOT)}:{n + 1}"
      for path in files
      if "tasks" not in path.relative_to(_ROOT).parts
      for n, line in enumerate(path.read_text().splitlines())
      if re.search(r"config\.task\s*(==|!=|\bin\b)", line)
  ]
  assert not branches, branches


def test_no_data_module_imports_the_metrics():
  """The data modules are below the metrics: the metrics may read the data's label spaces, not
  the other way round."""
  for path in (_ROOT / "ipr_jax" / "data").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = (
          [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
          if isinstance(node, ast.ImportFrom)
          else [a.name for a in node.names]
          if isinstance(node, ast.Import)
          else []
      )
      assert not any(n.startswith("ipr_jax.metrics") for n in names), path.name
