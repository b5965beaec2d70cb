"""The fast tier (`pytest -m "not slow"`) still exercises every module of ipr_jax/, and the slow
list of tests/conftest.py names only tests that exist.

A module counts as exercised when a fast test imports it, or imports a module of the same layer
package that imports it (a test of `ipr_jax.evaluation.runner` exercises the parts of
`ipr_jax.evaluation` the runner imports, not `ipr_jax.sampling`: another layer needs a fast test of
its own). An import at the top of a test file (or in a fixture or helper of that file) counts when
the file has a fast test; an import inside a test function counts when that test is fast; a test
helper module (tests/golden_io.py, ...) lends its imports to the files that import it. A config of
ipr_jax/configs/ counts when a fast test loads it by name (`load_task_config("mnist_sudoku", ...)`,
`task_config(...)`, `"configs/<name>.py:..."` or `"<name>:..."`), a binary when a fast test runs it
(`"-m", "ipr_jax.evaluate"`).

    python tests/test_fast_tier.py     # per module, the fast test files that import it

Reads files only: well under a second.
"""

import ast
import pathlib
import re
import sys

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

import conftest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def package_modules() -> list[str]:
  """Every module of ipr_jax/, dotted (a package by its __init__: `ipr_jax.sampling`)."""
  names = []
  for path in sorted((ROOT / "ipr_jax").rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names.append(".".join(parts))
  return names


def _layer(module: str) -> str:
  """`ipr_jax.evaluation` for `ipr_jax.evaluation.runner`; a top-level module is its own."""
  return ".".join(module.split(".")[:2])


def _module_path(module: str) -> pathlib.Path:
  path = ROOT / pathlib.Path(*module.split("."))
  return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def within_layer(modules: set[str]) -> dict[str, set[str]]:
  """{module: the modules of its own layer package that it imports, directly or not}."""
  direct = {}
  for name in modules:
    found, _ = _names_used([ast.parse(_module_path(name).read_text())], modules, set())
    direct[name] = {m for m in found if _layer(m) == _layer(name) and m != name}
  closure = {}
  for name in modules:
    seen, pending = set(), list(direct[name])
    while pending:
      m = pending.pop()
      if m not in seen:
        seen.add(m)
        pending += direct[m]
    closure[name] = seen
  return closure


def _marked_slow(decorators) -> bool:
  """A `@pytest.mark.slow` among a function's decorators (or a module's `pytestmark`)."""
  for node in decorators:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Attribute) and target.attr == "slow":
      return True
  return False


def _names_used(nodes, modules: set[str], helpers: set[str]) -> tuple[set[str], set[str]]:
  """(package modules, test helper modules) that the AST nodes import, load or run."""
  configs = {name.rsplit(".", 1)[1] for name in modules if name.startswith("ipr_jax.configs.")}
  found, used_helpers = set(), set()

  def add(name):
    parts = name.split(".")
    for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
      if ".".join(parts[:i]) in modules:
        found.add(".".join(parts[:i]))

  for root in nodes:
    for node in ast.walk(root):
      if isinstance(node, ast.Import):
        for alias in node.names:
          add(alias.name)
          if alias.name in helpers:
            used_helpers.add(alias.name)
      elif isinstance(node, ast.ImportFrom) and node.module:
        add(node.module)
        if node.module in helpers:
          used_helpers.add(node.module)
        for alias in node.names:
          add(f"{node.module}.{alias.name}")
      elif isinstance(node, ast.Call):
        func = node.func.id if isinstance(node.func, ast.Name) else None
        if func in ("load_task_config", "task_config") and node.args:
          arg = node.args[0]
          if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            add(f"ipr_jax.configs.{arg.value}")
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        if node.value in modules:  # `"-m", "ipr_jax.evaluate"`
          add(node.value)
        match = re.match(r"^(?:.*configs/)?(\w+)(?:\.py:|\.py$|:)", node.value)
        if match and match.group(1) in configs:
          add(f"ipr_jax.configs.{match.group(1)}")
  return found, used_helpers


def _test_files() -> list[pathlib.Path]:
  return sorted(TESTS.glob("test_*.py"))


def fast_importers() -> dict[str, set[str]]:
  """{package module: the test files whose fast tests import it}."""
  modules = set(package_modules())
  helpers = {p.stem for p in TESTS.glob("*.py") if not p.name.startswith("test_")} - {"conftest"}
  helper_uses = {}
  for name in helpers:
    tree = ast.parse((TESTS / f"{name}.py").read_text())
    helper_uses[name] = _names_used([tree], modules, helpers)

  def with_helpers(found, used_helpers):
    found, pending, seen = set(found), list(used_helpers), set()
    while pending:
      name = pending.pop()
      if name not in seen:
        seen.add(name)
        found |= helper_uses[name][0]
        pending += helper_uses[name][1]
    return found

  reached = within_layer(modules)
  importers: dict[str, set[str]] = {name: set() for name in modules}
  for path in _test_files():
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text())
    file_slow = conftest.is_slow(rel) or any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        and _marked_slow(node.value.elts if isinstance(node.value, ast.List) else [node.value])
        for node in tree.body
    )
    tests, other = [], []
    for node in tree.body:
      if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
        tests.append((node.name, node))
      elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
        for item in node.body:
          if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
            tests.append((f"{node.name}::{item.name}", item))
      else:
        other.append(node)
    fast = [
        node
        for name, node in tests
        if not file_slow
        and not conftest.is_slow(f"{rel}::{name}", whole=True)
        and not _marked_slow(node.decorator_list)
    ]
    if not fast:
      continue
    found = with_helpers(*_names_used(other, modules, helpers))
    found |= with_helpers(*_names_used(fast, modules, helpers))
    for module in found | {m for name in found for m in reached[name]}:
      importers[module].add(path.name)
  return importers


def test_every_package_module_has_a_fast_test():
  unexercised = sorted(name for name, files in fast_importers().items() if not files)
  assert not unexercised, (
      f"modules that no fast test imports: {unexercised}; give each a fast test "
      "(or take a test that imports it off the slow list in tests/conftest.py)"
  )


def test_the_slow_list_names_tests_that_exist():
  for entry in conftest.SLOW:
    path, _, name = entry.partition("::")
    file = ROOT / path
    assert file.is_file(), f"tests/conftest.py SLOW: no file {path}"
    if name:
      function = name.split("[", 1)[0].split("::")[-1]
      assert re.search(
          rf"^\s*def {re.escape(function)}\(", file.read_text(), re.M
      ), f"tests/conftest.py SLOW: no test {name} in {path}"


def test_the_slow_mark_is_registered():
  text = (ROOT / "pyproject.toml").read_text()
  assert re.search(r"^\[tool\.pytest\.ini_options\]", text, re.M)
  assert re.search(r'^\s*"slow: ', text, re.M)


def test_the_check_sees_imports_where_they_count():
  modules = {"ipr_jax", "ipr_jax.sampling", "ipr_jax.sampling.ipr", "ipr_jax.configs.even_pixels"}
  tree = ast.parse(
      "from ipr_jax.sampling import ipr\n"
      "def test_x(task_config):\n"
      "  task_config('even_pixels')\n"
  )
  found, _ = _names_used([tree], modules, set())
  assert found == modules


def main():
  for name, files in sorted(fast_importers().items()):
    print(f"{name:40s} {len(files):3d}  {' '.join(sorted(files)) or 'NONE'}")


if __name__ == "__main__":
  main()
