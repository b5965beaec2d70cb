"""The tasks: one module per task, and their registry.

  task = tasks.get(config.task)        # the task's module
  data = task.make_data(config)        # its data generator
  evaluation = task.Evaluation(config) # what the evaluation needs of it

Each module provides the interface described in `ipr_jax/tasks/base.py` (NAME, HOST_RENDERED,
CELL_VERIFIER, make_data, unknown_counts, Evaluation). The built-in tasks are the modules of this
package; a task of one's own project is a module anywhere that calls

  tasks.register_task(sys.modules[__name__])      # at its end; optional code_files=(...)

and a config file that imports that module (so that every binary that loads the config knows the
task) and sets `config.task` to its NAME. Its files enter the evaluation's code record
(`ipr_jax.evaluation.shards.code_record` reads them from `registered_code_files`): a change of
them requires computing the shards again.
"""

import os
import pathlib
import types
from typing import Sequence

from ipr_jax.runtime import errors
from ipr_jax.tasks import base
from ipr_jax.tasks import counting_polygons
from ipr_jax.tasks import even_pixels
from ipr_jax.tasks import mnist_sudoku

_MODULES = (even_pixels, mnist_sudoku, counting_polygons)
_BY_NAME = {module.NAME: module for module in _MODULES}
# The built-in task names (`tasks.names()` adds the registered ones).
TASKS = tuple(_BY_NAME)
_INTERFACE = ("NAME", "HOST_RENDERED", "CELL_VERIFIER", "make_data", "unknown_counts", "Evaluation")
_HOST_FEED = ("train_feed", "images_on_device")
# The files of the registered tasks that determine results, {name in the code record: path}.
_CODE_FILES: dict[str, pathlib.Path] = {}


def names() -> tuple[str, ...]:
  """Every known task name: the built-in ones, then the registered ones in registration order."""
  return tuple(_BY_NAME)


def get(name: str) -> types.ModuleType:
  """The module of task `name`.

  Raises:
    ValueError: no task of that name (the message lists the known ones).
  """
  if name not in _BY_NAME:
    raise errors.ConfigError(
        f"unknown task {name!r}; expected one of {names()} (a task of your own project: its "
        "module calls tasks.register_task, and its config imports it)"
    )
  return _BY_NAME[name]


def register_task(module: types.ModuleType, code_files: Sequence[str | os.PathLike] = ()) -> None:
  """Adds a task defined outside ipr_jax (the interface of `ipr_jax/tasks/base.py`).

  Registering the same module again does nothing, so its module may register itself on import.

  Args:
    module: the task's module.
    code_files: other files that determine its results (its data or metric modules, assets),
      absolute or relative to the module's folder; they and the module's own file enter the code
      record as `registered/<NAME>/<path relative to the module's folder>`.

  Raises:
    ValueError: the module lacks part of the interface, its Evaluation is not a subclass of
      `base.Evaluation`, or its NAME is taken by another module.
  """
  missing = [
      a
      for a in _INTERFACE + (_HOST_FEED if getattr(module, "HOST_RENDERED", False) else ())
      if not hasattr(module, a)
  ]
  if missing:
    raise ValueError(f"task module {module.__name__} lacks {missing} (see ipr_jax/tasks/base.py)")
  if not (isinstance(module.Evaluation, type) and issubclass(module.Evaluation, base.Evaluation)):
    raise ValueError(f"{module.__name__}.Evaluation must subclass ipr_jax.tasks.base.Evaluation")
  known = _BY_NAME.get(module.NAME)
  if known is module:
    return
  if known is not None:
    raise ValueError(
        f"task name {module.NAME!r} of {module.__name__} is taken by " f"{known.__name__}"
    )
  if module.__file__ is None:
    raise ValueError(f"task module {module.__name__} has no file to record")
  folder = pathlib.Path(module.__file__).resolve().parent
  files = [pathlib.Path(module.__file__).resolve()]
  files += [(folder / f).resolve() for f in code_files]
  _CODE_FILES.update({f"registered/{module.NAME}/{os.path.relpath(f, folder)}": f for f in files})
  _BY_NAME[module.NAME] = module


def unregister_task(name: str) -> None:
  """Forgets a registered task and its code files (built-in tasks stay)."""
  if name in TASKS:
    raise ValueError(f"{name!r} is a built-in task")
  if _BY_NAME.pop(name, None) is not None:
    for record_name in [n for n in _CODE_FILES if n.startswith(f"registered/{name}/")]:
      del _CODE_FILES[record_name]


def registered_code_files() -> dict[str, pathlib.Path]:
  """The files of the registered tasks that enter the evaluation's code record, {name in the
  record (`registered/<NAME>/<path>`): absolute path}."""
  return dict(_CODE_FILES)


def with_cell_verifier() -> tuple[str, ...]:
  """The tasks with a per-cell verifier (what `config.ipr.selection='verifier'` needs)."""
  return tuple(name for name, module in _BY_NAME.items() if module.CELL_VERIFIER)
