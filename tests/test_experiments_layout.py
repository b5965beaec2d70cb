"""experiments/: the index at the top of experiments/README.md names every script there, and every
`experiments/...` path that README.md, docs/ and experiments/ name exists, but for the one-off
scripts removed since (named with the commit that holds them). Reads files only."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
INDEX = EXPERIMENTS / "README.md"
# Removed one-offs: git history keeps them at this commit (experiments/README.md says which table
# each made).
REMOVED_AT = "a976fd0"
REMOVED = {
    "migrate_run_json.py",
    "chain_scores_pilot.py",
    "compile_cache_times.py",
    "time_per_pass.py",
    "confidence_separation.py",
}
# Paths as they were at an older commit (`git show <commit>:experiments/...`).
_AT_COMMIT = re.compile(r"[0-9a-f]{7,40}:$")
_PATH = re.compile(r"experiments/[\w./-]*[\w/]")


def _scripts() -> list[pathlib.Path]:
  skip = {EXPERIMENTS / "results"}
  return sorted(
      p
      for p in EXPERIMENTS.rglob("*")
      if p.suffix in (".py", ".sh") and not any(s in p.parents for s in skip)
  )


def _index_text() -> str:
  text = INDEX.read_text()
  start = text.index("## Which script makes which table")
  return text[start : text.index("\n## ", start + 1)]


def test_the_index_names_every_script():
  index = _index_text()
  for script in _scripts():
    rel = script.relative_to(EXPERIMENTS)
    folder = rel.parts[0]
    if folder == "external_task":
      assert "`external_task/`" in index
      continue
    assert len(rel.parts) == 2, f"{rel}: scripts live in a folder by purpose (docs/layout.md)"
    assert f"`{rel.as_posix()}`" in index or (
        f"`{rel.name}`" in index and f"`{folder}/" in index
    ), f"experiments/{rel} is missing from the index of experiments/README.md"


def test_named_experiments_paths_exist():
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *EXPERIMENTS.rglob("*.md")]
  pages += [*_scripts(), *sorted((ROOT / "tests").glob("*.py"))]
  missing = []
  for page in pages:
    if "results" in page.relative_to(ROOT).parts:
      continue
    text = page.read_text()
    for match in _PATH.finditer(text):
      path = match.group(0)
      if _AT_COMMIT.search(text[max(0, match.start() - 41) : match.start()]):
        continue  # `git show <commit>:experiments/...`: the path at that commit
      if re.search(r"--(out|output)=$", text[max(0, match.start() - 10) : match.start()]):
        continue  # what a command would write
      path = path.rstrip("/")
      name = path.rsplit("/", 1)[-1]
      if name in REMOVED:
        assert REMOVED_AT in text, f"{page.name} names the removed {path} without {REMOVED_AT}"
        continue
      if not (ROOT / path).exists():
        missing.append(f"{page.relative_to(ROOT)}: {path}")
  assert not missing, missing
