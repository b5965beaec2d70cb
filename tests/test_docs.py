"""README.md and docs/: every relative link points at a file (and heading) that exists, and every
command of README.md names modules, configs, presets, extras and files that exist; the first
screen holds the two fresh-machine commands; every Python example imports and names what an
installed package has, and runs from a folder outside the checkout.

Reads files, loads configs and imports modules: a few seconds; running the Python examples (after
a small main job whose files one of them reads) takes about a minute on 2 cores.
"""

import ast
import configparser
import importlib
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
import types

import pytest

from ipr_jax.build import config_base
from ipr_jax.build import pretrained

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

MAIN_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:demo "
    "--workdir=runs/demo"
)
TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && "
    "python -m pytest -q -n auto --dist loadfile tests"
)
# Lines of README.md a newcomer sees first.
FIRST_SCREEN_LINES = 45

# Markdown links and images: [text](target) and ![alt](target).
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def heading_anchors(page: pathlib.Path) -> set[str]:
  """GitHub's anchors of a Markdown page's headings (lower case, punctuation dropped, spaces to
  hyphens), outside code blocks."""
  text = _FENCE.sub("", page.read_text())
  anchors = set()
  for line in text.splitlines():
    match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if match:
      title = match.group(1).strip().lower()
      anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
  return anchors


def relative_links(page: pathlib.Path) -> list[str]:
  """The targets of the page's links that are not URLs or mail addresses (code blocks left out)."""
  text = _FENCE.sub("", page.read_text())
  return [target for target in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


def test_the_docs_pages_exist_and_the_readme_links_every_one():
  names = {page.name for page in DOCS}
  assert {
      "binaries_and_configs.md",
      "ipr_variants.md",
      "evaluation_at_scale.md",
      "checkpoints.md",
      "adding_a_task.md",
      "reproducing.md",
      "deviations.md",
      "contributing.md",
  } <= names, names
  linked = {pathlib.Path(t.split("#")[0]).name for t in relative_links(README)}
  assert names <= linked, names - linked
  for target in ("CHANGELOG.md", "constraints.txt"):
    assert target in linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_at_what_exists(page):
  links = relative_links(page)
  assert links or page == README, f"{page.name} links nowhere (not even back to the README)"
  for target in links:
    path_part, _, anchor = target.partition("#")
    path = (page.parent / path_part).resolve() if path_part else page
    assert path.exists(), f"{page.name}: {target} -> {path} does not exist"
    assert ROOT in path.parents or path == ROOT, f"{page.name}: {target} leaves the repository"
    if anchor:
      assert path.suffix == ".md", f"{page.name}: anchor into a non-Markdown file: {target}"
      assert anchor in heading_anchors(
          path
      ), f"{page.name}: no heading #{anchor} in {path.relative_to(ROOT)}"


def test_the_first_screen_holds_the_two_commands():
  first_screen = README.read_text().splitlines()[:FIRST_SCREEN_LINES]
  assert MAIN_COMMAND in first_screen
  assert TEST_COMMAND in first_screen


def shell_blocks(page: pathlib.Path) -> list[str]:
  """The page's bash blocks, continuation lines joined and comments dropped."""
  blocks = []
  for language, body in _FENCE.findall(page.read_text()):
    if language in ("bash", "sh", "shell"):
      lines = [
          line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
          for line in body.replace("\\\n", " ").splitlines()
      ]
      blocks.append("\n".join(line for line in lines if line.strip()))
  return blocks


def extras_declared() -> set[str]:
  setup = configparser.ConfigParser()
  setup.read(ROOT / "setup.cfg")
  return set(setup["options.extras_require"])


def check_command_names_what_exists(command: str) -> list[str]:
  """Problems of one shell command: a `python -m` module that does not exist, a --config whose
  file or preset does not load, an extra that setup.cfg does not declare, a `-c`/`-r` file or a
  pytest path that is not in the checkout."""
  problems = []
  for part in re.split(r"&&|;|\|", command):
    try:
      words = shlex.split(part)
    except ValueError as e:
      problems.append(f"{part!r}: {e}")
      continue
    while words and "=" in words[0] and not words[0].startswith("-"):
      words = words[1:]  # VAR=value prefixes
    if not words:
      continue
    if words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m":
      module = words[2]
      if module not in ("venv", "pip") and importlib.util.find_spec(module) is None:
        problems.append(f"no module {module}")
      if module == "pytest":
        paths = [word for word in words[3:] if not word.startswith("-")][-1:]
        problems += [f"no test path {path}" for path in paths if not (ROOT / path).exists()]
    for word in words:
      if word.startswith("--config="):
        try:
          config_base.load_config(word.split("=", 1)[1])
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f"{word}: {type(e).__name__}: {e}")
      extras = re.fullmatch(r"\.\[([\w,]+)\]", word)
      if extras:
        problems += [
            f"no extra {name}"
            for name in extras.group(1).split(",")
            if name not in extras_declared()
        ]
    if "pip" in words[:3]:
      for flag, value in zip(words, words[1:]):
        if flag in ("-c", "-r") and not (ROOT / value).is_file():
          problems.append(f"no file {value}")
  return problems


def test_every_readme_command_names_what_exists():
  blocks = shell_blocks(README)
  assert len(blocks) >= 2, blocks
  for block in blocks:
    for command in block.splitlines():
      problems = check_command_names_what_exists(command)
      assert not problems, (command, problems)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_the_docs_commands_name_modules_and_configs_that_exist(page):
  for block in shell_blocks(page):
    for command in block.splitlines():
      if command.lstrip().startswith(("gcloud", "srun", "IPR_JAX_")):
        # The python command the launcher runs (gcloud's --command quotes it).
        command = command[command.find("python") :].rstrip("\"'")
      problems = check_command_names_what_exists(command)
      assert not problems, (page.name, command, problems)


def test_the_checker_finds_what_does_not_exist():
  assert check_command_names_what_exists("python -m ipr_jax.nosuch --workdir=x")
  assert check_command_names_what_exists("python -m ipr_jax.evaluate --config=configs/no.py:demo")
  assert check_command_names_what_exists(
      "python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:nosuch"
  )
  assert check_command_names_what_exists("pip install -e '.[nosuch]'")
  assert check_command_names_what_exists("pip install -e . -c nosuch.txt")
  assert not check_command_names_what_exists(
      "pip install -e '.[test,convert]' -c constraints.txt && "
      "python -m ipr_jax.evaluate --config=mnist_sudoku:demo,ms_unique_test --workdir=runs/x"
  )


def python_blocks(page: pathlib.Path) -> list[str]:
  """The page's Python blocks (```python)."""
  return [
      body for language, body in _FENCE.findall(page.read_text()) if language in ("python", "py")
  ]


PYTHON_EXAMPLES = {
    f"{page.name}#{i}": body for page in PAGES for i, body in enumerate(python_blocks(page))
}


def _resolve(module: types.ModuleType, attribute: str):
  """module.attribute, importing a submodule of that name if need be; None if neither exists."""
  if hasattr(module, attribute):
    return getattr(module, attribute)
  try:
    return importlib.import_module(f"{module.__name__}.{attribute}")
  except ImportError:
    return None


def check_python_names_what_exists(code: str) -> list[str]:
  """Problems of a Python example, as run by an installed package outside the checkout (call it
  with the working directory elsewhere): an import that fails, an attribute of an imported module
  that does not exist (`report.no_such_figure`), a `load_config("...")` that does not load (a
  checkout's `configs/...` path), a `pretrained.load("...")` of a model that is not shipped."""
  try:
    tree = ast.parse(code)
  except SyntaxError as e:
    return [f"syntax error: {e}"]
  problems: list[str] = []
  modules: dict[str, types.ModuleType] = {}  # the names the example binds to modules
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        try:
          module = importlib.import_module(alias.name)
        except ImportError as e:
          problems.append(f"import {alias.name}: {e}")
          continue
        top = alias.name.split(".")[0]
        modules[alias.asname or top] = module if alias.asname else importlib.import_module(top)
    elif isinstance(node, ast.ImportFrom) and node.module:
      try:
        parent = importlib.import_module(node.module)
      except ImportError as e:
        problems.append(f"from {node.module} import ...: {e}")
        continue
      for alias in node.names:
        value = _resolve(parent, alias.name)
        if value is None:
          problems.append(f"from {node.module} import {alias.name}: no such name")
        elif isinstance(value, types.ModuleType):
          modules[alias.asname or alias.name] = value
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      chain, base = [], node
      while isinstance(base, ast.Attribute):
        chain.append(base.attr)
        base = base.value
      if isinstance(base, ast.Name) and base.id in modules:
        value, path = modules[base.id], base.id
        for attribute in reversed(chain):
          if not isinstance(value, types.ModuleType):
            break
          path += f".{attribute}"
          value = _resolve(value, attribute)
          if value is None:
            problems.append(f"{path} does not exist")
            break
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
      argument = node.args[0].value
      if node.func.attr == "load_config":
        try:
          config_base.load_config(argument)
        except Exception as e:  # pylint: disable=broad-except
          problems.append(f"load_config({argument!r}): {type(e).__name__}: {e}")
      elif node.func.attr == "load" and ast.unparse(node.func.value) == "pretrained":
        if argument not in pretrained.names():
          problems.append(f"pretrained.load({argument!r}): shipped are {pretrained.names()}")
  return list(dict.fromkeys(problems))


def test_the_docs_have_their_python_examples():
  assert {"binaries_and_configs.md#0", "binaries_and_configs.md#1"} <= set(PYTHON_EXAMPLES), sorted(
      PYTHON_EXAMPLES
  )


@pytest.mark.parametrize("example", sorted(PYTHON_EXAMPLES))
def test_the_python_examples_name_what_an_installed_package_has(example, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # outside the checkout: its configs/ and experiments/ are not here
  problems = check_python_names_what_exists(PYTHON_EXAMPLES[example])
  assert not problems, (example, problems)


def test_the_python_checker_finds_what_does_not_exist(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for code in (
      "from ipr_jax.evaluation import nosuch",
      "from ipr_jax import eval_report",  # the module's name before the layers
      "import ipr_jax.evaluation.nosuch",
      "from ipr_jax.evaluation import report\nreport.no_such_figure()",
      "import ipr_jax.evaluation.report\nipr_jax.evaluation.report.nosuch",
      "from ipr_jax.build import config_base as c\nc.load_config('configs/mnist_sudoku.py:demo')",
      "from ipr_jax.build import config_base as c\nc.load_config('mnist_sudoku:nosuch')",
      "from ipr_jax.build import pretrained\npretrained.load('nosuch')",
      "def broken(:",
  ):
    assert check_python_names_what_exists(code), code
  assert not check_python_names_what_exists(
      "import numpy as np\nfrom ipr_jax.evaluation import report, runner\n"
      "from ipr_jax.build import config_base\nconfig_base.load_config('mnist_sudoku:demo')\n"
      "report.batch_result_figure, runner.Evaluator, np.arange"
  )


def test_the_python_examples_run_outside_the_checkout(tmp_path):
  """Each example in a fresh interpreter, in a folder outside the checkout where the main job
  (on 4 puzzles, budget 2) has run, as the examples that read its files expect."""
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["MPLBACKEND"] = "Agg"
  run = lambda args: subprocess.run(
      args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600, check=False
  )
  done = run(
      [
          sys.executable,
          "-m",
          "ipr_jax.evaluate",
          "--config=mnist_sudoku:demo",
          "--workdir=runs/demo",
          "--config.eval.num_puzzles=4",
          "--config.ipr.budget=2",
      ]
  )
  assert done.returncode == 0, done.stderr[-3000:]
  for example, code in sorted(PYTHON_EXAMPLES.items()):
    done = run([sys.executable, "-c", code])
    assert done.returncode == 0, (example, done.stderr[-3000:])
