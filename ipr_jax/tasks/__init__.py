"""The tasks: one module per task, and their registry.

  task = tasks.get(config.task)        # the module ipr_jax/tasks/<task>.py
  data = task.make_data(config)        # its data generator
  evaluation = task.Evaluation(config) # what the evaluation needs of it

Each module provides the interface described in `ipr_jax/tasks/base.py` (NAME, HOST_RENDERED,
CELL_VERIFIER, make_data, unknown_counts, Evaluation). Adding a task: a new module here, listed
in `_MODULES`, and a config file `configs/<task>.py` whose `config.task` is its NAME.
"""

import types

from ipr_jax import errors
from ipr_jax.tasks import counting_polygons
from ipr_jax.tasks import even_pixels
from ipr_jax.tasks import mnist_sudoku

_MODULES = (even_pixels, mnist_sudoku, counting_polygons)
_BY_NAME = {module.NAME: module for module in _MODULES}
# The known task names (`config.task`).
TASKS = tuple(_BY_NAME)


def get(name: str) -> types.ModuleType:
  """The module of task `name`.

  Raises:
    ValueError: no task of that name (the message lists the known ones).
  """
  if name not in _BY_NAME:
    raise errors.ConfigError(f"unknown task {name!r}; expected one of {TASKS}")
  return _BY_NAME[name]


def with_cell_verifier() -> tuple[str, ...]:
  """The tasks with a per-cell verifier (what `config.ipr.selection='verifier'` needs)."""
  return tuple(name for name, module in _BY_NAME.items() if module.CELL_VERIFIER)
