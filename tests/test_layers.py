"""The package's layers: every module of ipr_jax belongs to one, imports (at top level or inside
functions) only modules of its own layer or of layers below it, and no import chain comes back
to where it started. Also the module length: at most 600 lines unless the module says why.

Layers, lowest first (the test's `LAYERS`; docs/layout.md draws them):

  core        `runtime/`: the run machinery that training and evaluation share (errors, checkpoints
              and the train state, devices and processes, signals, the environment record, the
              compilation cache); `noise/`: the noise model (the rectified flow, its Gaussian
              kernels, the sampling schedules, the training time sampler);
  sampling    SRM and IPR (`ipr_jax.sampling`);
  data        the tasks' data: digits and grids, Even Pixels, Counting Polygons images and labels;
  models      the U-Net and its denoiser head, the metrics' classifier and scorer networks;
  metrics     the metrics, and `scorers` (the scripts that trained the metrics' weights and ranked
              the digits);
  tasks       one module per task and the registry (`ipr_jax.tasks`);
  build       what a config builds (`build/`: the model and optimizer, the config sections, the
              image geometry, the command line, shipped models) and the packaged task configs;
  training    `training/`: the loss, the train step and the loop;
  conversion  `conversion/`: reference PyTorch checkpoints and state_dicts into Flax;
  evaluation  `evaluation/`: the runner, its shard store, the reports, the memory fit (which
              also sizes the train step, hence above training);
  binaries    `train.py`, `evaluate.py`, `convert.py`: flags and main only.
"""

import ast
import pathlib

import pytest

_PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ipr_jax"
MAX_LINES = 600
LONG_MODULE_REASON = f"Why over {MAX_LINES} lines:"

LAYERS = (
    ("core", ("ipr_jax", "ipr_jax.runtime.*", "ipr_jax.noise.*")),
    ("sampling", ("ipr_jax.sampling.*",)),
    ("data", ("ipr_jax.data.*",)),
    ("models", ("ipr_jax.models.*",)),
    ("metrics", ("ipr_jax.metrics.*", "ipr_jax.scorers.*")),
    ("tasks", ("ipr_jax.tasks.*",)),
    ("build", ("ipr_jax.build.*", "ipr_jax.configs.*")),
    ("training", ("ipr_jax.training.*",)),
    ("conversion", ("ipr_jax.conversion.*",)),
    ("evaluation", ("ipr_jax.evaluation.*",)),
    ("binaries", ("ipr_jax.convert", "ipr_jax.evaluate", "ipr_jax.train")),
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
