"""The package's layers: every module of ipr_jax belongs to one, imports (at top level or inside
functions) only modules of its own layer or of layers below it, and no import chain comes back
to where it started. Also the module length: at most 800 lines unless the module says why (800 as
pyink lays code out, one argument per line where a call does not fit: the 600 lines of the
hand-wrapped code before it, which grew by 10 to 35% per module).

Layers, lowest first (the test's `LAYERS`):

  core      small shared pieces that import no task, model or sampler: the flow and its
            Gaussian, schedules, the time sampler, the image geometry of a config, the train
            state, checkpoints, the evaluation's shard files and reports, devices and signals,
            the error type a user can fix, the record of the software and hardware, the
            persistent compilation cache;
  sampling  SRM and IPR (`ipr_jax.sampling`, and `ipr_jax.sampler`, its former import path);
  data      the tasks' data: digits and grids, Even Pixels, Counting Polygons images and labels;
  models    the U-Net, its denoiser head and losses, the metrics' classifier and scorer networks;
  metrics   the metrics, and `scorers` (the scripts that trained the metrics' weights and ranked
            the digits);
  tasks     one module per task and the registry (`ipr_jax.tasks`);
  build     what a config builds: the model and optimizer, the config sections, the packaged task
            configs (`ipr_jax.configs`), shipped models;
  binaries  training, evaluation, conversion and their command lines; `fit` (the compiled
            memory of the evaluation and training programs, above both).
"""

import ast
import pathlib

import pytest

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ipr_jax"
MAX_LINES = 800
LONG_MODULE_REASON = f"Why over {MAX_LINES} lines:"

LAYERS = (
    (
        "core",
        (
            "ipr_jax",
            "ipr_jax.agreement",
            "ipr_jax.checkpoint",
            "ipr_jax.compilation_cache",
            "ipr_jax.config_diff",
            "ipr_jax.environment",
            "ipr_jax.errors",
            "ipr_jax.eval_report",
            "ipr_jax.eval_shards",
            "ipr_jax.flow",
            "ipr_jax.gaussian",
            "ipr_jax.geometry",
            "ipr_jax.host_devices",
            "ipr_jax.preemption",
            "ipr_jax.schedule",
            "ipr_jax.time_sampler",
            "ipr_jax.torch_files",
            "ipr_jax.train_state",
        ),
    ),
    ("sampling", ("ipr_jax.sampling.*", "ipr_jax.sampler")),
    ("data", ("ipr_jax.data.*",)),
    ("models", ("ipr_jax.models.*", "ipr_jax.losses")),
    ("metrics", ("ipr_jax.metrics.*", "ipr_jax.scorers.*")),
    ("tasks", ("ipr_jax.tasks.*",)),
    ("build", ("ipr_jax.build", "ipr_jax.config_base", "ipr_jax.configs.*", "ipr_jax.pretrained")),
    (
        "binaries",
        (
            "ipr_jax.cli",
            "ipr_jax.convert",
            "ipr_jax.evaluate",
            "ipr_jax.evaluation",
            "ipr_jax.fit",
            "ipr_jax.train",
        ),
    ),
)


def _modules() -> dict[str, pathlib.Path]:
  """{dotted name: file} of every module of the package (a package: its __init__.py)."""
  modules = {}
  for path in sorted(_PACKAGE.rglob("*.py")):
    parts = path.relative_to(_PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


MODULES = _modules()


def _layer(module: str) -> int:
  for rank, (_, patterns) in enumerate(LAYERS):
    for pattern in patterns:
      if module == pattern or (
          pattern.endswith(".*") and (module == pattern[:-2] or module.startswith(pattern[:-1]))
      ):
        return rank
  raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def imports(module: str) -> set[str]:
  """The package modules that `module` imports, anywhere in its file (`from a.b import c`: the
  module a.b.c if there is one, else a.b)."""
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        base = ".".join(
            package.split(".")[: len(package.split(".")) - node.level + 1]
            + ([node.module] if node.module else [])
        )
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
  return {name for name in found if name in MODULES and name != module}


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  """(module, imported) pairs of `graph` ({module: modules it imports}) that go up a layer."""
  return [
      (module, name)
      for module in sorted(graph)
      for name in sorted(graph[module])
      if _layer(name) > _layer(module)
  ]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """An import chain of `graph` that comes back to its start ([a, b, ..., a]), or None."""
  state = {}  # module -> 1 while on the current path, 2 when done

  def visit(module, path):
    state[module] = 1
    for name in sorted(graph.get(module, ())):
      if state.get(name) == 1:
        return path[path.index(name) :] + [name]
      if name not in state:
        cycle = visit(name, path + [name])
        if cycle:
          return cycle
    state[module] = 2
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module, [module])
      if cycle:
        return cycle
  return None


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_is_in_a_layer():
  for module in MODULES:
    _layer(module)


def test_no_import_goes_up_a_layer():
  assert not upward_imports(GRAPH), [
      f"{module} ({LAYERS[_layer(module)][0]}) imports {name} ({LAYERS[_layer(name)][0]})"
      for module, name in upward_imports(GRAPH)
  ]


def test_no_import_cycle():
  assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_the_checks_find_an_upward_import_and_a_cycle():
  """On made-up graphs: the digits importing the classifier (what the ranking asset replaced),
  and the tasks importing build while build imports the tasks (what geometry.py replaced)."""
  assert upward_imports({"ipr_jax.data.digits": {"ipr_jax.models.classifier"}}) == [
      ("ipr_jax.data.digits", "ipr_jax.models.classifier")
  ]
  graph = {
      "ipr_jax.tasks.base": {"ipr_jax.build"},
      "ipr_jax.build": {"ipr_jax.tasks"},
      "ipr_jax.tasks": {"ipr_jax.tasks.base"},
  }
  assert find_cycle(graph) == [
      "ipr_jax.build",
      "ipr_jax.tasks",
      "ipr_jax.tasks.base",
      "ipr_jax.build",
  ]
  with pytest.raises(AssertionError, match="in no layer"):
    _layer("ipr_jax.nowhere")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_long_modules_say_why(module):
  text = MODULES[module].read_text()
  lines = text.count("\n")
  if lines > MAX_LINES:
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert LONG_MODULE_REASON in docstring, (
        f"{module} has {lines} lines (> {MAX_LINES}): split it, or give the reason in its "
        f"docstring after {LONG_MODULE_REASON!r}"
    )
