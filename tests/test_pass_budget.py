"""experiments/pass_budget/pass_budget_table.py on hand-made runs whose answers are known, and the
committed runs of issue 42 (settings, passes from the schedules' formulas, provenance, the
README's table)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
_RESULTS = _EXPERIMENTS / "results" / "pass_budget"


def _module():
  path = _EXPERIMENTS / "pass_budget" / "pass_budget_table.py"
  spec = importlib.util.spec_from_file_location("pass_budget_table", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _meta(chains=1, choose_at="every_budget", groups=4, budget=3):
  ipr = {
      "budget": budget,
      "chains": chains,
      "choose_at": choose_at,
      "uncertainty_groups": groups,
      "query_cells": "balanced",
      "renoise_time": 1.0,
      "steps_per_patch": 10,
      "overlap": 0.8,
  }
  return {
      "ipr": ipr,
      "sampler": {"steps_per_patch": 3},
      "params_sha256": "a" * 64,
      "code": {"sha256": "c" * 64},
      "environment": {"cpu": "test cpu", "backend": "cpu", "device_count": 2},
  }


def _budgets(passes, rates):
  return [
      {
          "budget": b,
          "mean_nfe": float(p),
          "valid_rate": r,
          "valid_ci_low": r - 0.05,
          "valid_ci_high": r + 0.05,
      }
      for b, (p, r) in enumerate(zip(passes, rates))
  ]


def test_final_budget_passes_drop_the_queries_of_the_earlier_budgets():
  module = _module()
  # Three chains of G = 4: budget 2 of an every_budget run spent 3 * 4 * 2 = 24 query passes on
  # the budgets before it.
  row = {"budget": 2, "mean_nfe": 199.0}
  assert module.final_budget_passes(_meta(chains=3), row) == 199.0 - 24
  assert module.final_budget_passes(_meta(chains=3, groups=2), row) == 199.0 - 12
  assert module.final_budget_passes(_meta(chains=3, choose_at="final_budget"), row) == 199.0
  assert module.final_budget_passes(_meta(chains=1), row) == 199.0


def _write_run(root, split, name, meta, passes, rates, valid):
  folder = root / name / "eval" / split
  folder.mkdir(parents=True)
  meta = json.loads(json.dumps(meta))
  (folder / "results.json").write_text(
      json.dumps({"metadata": meta, "budgets": _budgets(passes, rates)})
  )
  index = np.arange(valid.shape[0])[::-1]  # stored in another order than the puzzles'
  np.savez(folder / "puzzles.npz", index=index, valid=valid[index])


def _final_runs(root, splits=("hard", "medium", "unique")):
  """A chosen run of 210 passes and two baselines whose budgets 1 and 2 lie within them."""
  ours = np.array([[False, True]] * 6 + [[False, False]] * 2)  # 6 of 8 valid at its budget 1
  theirs = np.zeros((8, 4), bool)
  theirs[:3, 2] = True  # 3 of 8 valid at budget 2; puzzles 0-2 both, 3-5 ours only
  theirs[6, 2] = True  # ... and puzzle 6 theirs only
  for split in splits:
    _write_run(
        root, split, "chosen", _meta(3, "final_budget", budget=1), [120, 210], [0.1, 0.75], ours
    )
    for name in ("chains3_b2_bal", "paper_b12"):
      _write_run(root, split, name, _meta(), [100, 180, 205, 260], [0.1, 0.2, 0.5, 0.6], theirs)


def test_final_table_matches_each_baseline_at_its_largest_budget_within_the_chosen_passes(
    tmp_path,
):
  module = _module()
  _final_runs(tmp_path)
  table = module.final_table(tmp_path)
  assert "| hard | chosen | budget 1, chains 3, balanced, final_budget | 1 | 210 | 75.0%" in table
  # 205 <= 210 < 260: budget 2 of each baseline.
  assert "| hard | paper_b12 | budget 3 | 2 | 205 | 50.0% [45.0, 55.0]" in table
  lines = module.paired(tmp_path).splitlines()
  assert len(lines) == 6
  assert lines[0] == (
      "hard: chosen (210 passes) only 3, chains3_b2_bal at budget 2 (205 passes) only 1, "
      f"p = {2 * 5 / 16:.2g}"
  )


def test_the_final_table_refuses_a_mix_or_a_missing_run(tmp_path):
  module = _module()
  _final_runs(tmp_path)
  found = module.runs(tmp_path)
  module.check_like_for_like(found, required=module.FINAL_RUNS, splits=module.SPLITS)
  mixed = dict(found)
  key = ("unique", "paper_b12")
  mixed[key] = json.loads(json.dumps(found[key]))
  mixed[key]["metadata"]["code"]["sha256"] = "0" * 64
  with pytest.raises(SystemExit, match="not one recorded code"):
    module.check_like_for_like(mixed, required=module.FINAL_RUNS, splits=module.SPLITS)
  del mixed[key]
  with pytest.raises(SystemExit, match="missing runs: unique/paper_b12"):
    module.check_like_for_like(mixed, required=module.FINAL_RUNS, splits=module.SPLITS)


# The committed runs. k = max(1, floor(n / 4)) cells re-noised of n unknown; regeneration passes
# ceil(p + (k - 1) (1 - overlap) p): 2k + 8 at the paper's p = 10, overlap 0.8; k + 4 at p = 5,
# overlap 0.8 (and at t0 = 0.5 of p = 10); k + 1 at p = 2, overlap 0.5. SRM 3n, or 2n at 2 steps
# per cell. G = 4 query passes per chain and query.
_PILOT = {  # name: (chains, budget, SRM passes per cell, regeneration passes of k)
    "c3_b6_steps5": (3, 6, 3, lambda k: k + 4),
    "c3_b6_half": (3, 6, 3, lambda k: k + 4),
    "c3_b10_steps2": (3, 10, 3, lambda k: k + 1),
    "c3_b8_srm2_steps2": (3, 8, 2, lambda k: k + 1),
    "c3_b12_srm2_steps2": (3, 12, 2, lambda k: k + 1),
    "c6_b12_srm2_steps2": (6, 12, 2, lambda k: k + 1),
}


def _committed(seed, name, split):
  folder = _RESULTS / f"seed{seed}" / name / "eval" / split
  assert (folder / "results.json").is_file(), f"{folder} is not committed (run_pass_budget.sh)"
  meta = json.loads((folder / "results.json").read_text())["metadata"]
  with np.load(folder / "puzzles.npz") as f:
    return meta, f["unknown_patches"], f["nfe"], f["index"]


def _pilot_runs():
  return sorted(
      (path.parents[2].name, path.parent.name)
      for path in (_RESULTS / "seed36").glob("*/eval/*/results.json")
  )


def test_the_pilot_holds_the_runs_the_readme_names():
  assert set(name for name, _ in _pilot_runs()) == set(_PILOT)


@pytest.mark.parametrize("name, split", _pilot_runs())
def test_the_committed_pilot_runs_have_their_settings_and_passes(name, split):
  """Every-budget chains of seed 36: K (s n + G + b (regeneration + G)) per puzzle."""
  chains, budget, srm_steps, regeneration = _PILOT[name]
  meta, unknown, nfe, _ = _committed(36, name, split)
  ipr = meta["ipr"]  # results.json of code before choose_at; run.json has it (migrated)
  assert (ipr["chains"], ipr["budget"], ipr.get("choose_at"), ipr["query_cells"]) == (
      chains,
      budget,
      None,
      "balanced",
  )
  assert (meta["eval"]["seed"], meta["eval"]["num_puzzles"]) == (36, 256)
  assert meta["sampler"]["steps_per_patch"] == srm_steps
  k = np.maximum(1, unknown // 4)
  expected = np.stack(
      [chains * (srm_steps * unknown + 4 + b * (regeneration(k) + 4)) for b in range(budget + 1)],
      axis=1,
  )
  np.testing.assert_array_equal(nfe, expected)


@pytest.mark.parametrize("split", ["hard", "medium", "unique"])
def test_the_committed_final_runs_have_their_settings_and_passes(split):
  """Seed 35, 1,000 puzzles, the same puzzles in each run: the chosen setting's
  3 (2n + b (k + 1)) before the final budget and 3 (2n + 8 (k + 1)) + 3 G at it; today's
  chains' 3 (3n + G + b (2k + 8 + G)); the paper's IPR's 3n + b (2k + 8)."""
  meta, unknown, nfe, index = _committed(35, "chosen", split)
  ipr = meta["ipr"]
  assert (ipr["chains"], ipr["budget"], ipr["choose_at"], ipr["query_cells"]) == (
      3,
      8,
      "final_budget",
      "balanced",
  )
  assert (ipr["steps_per_patch"], ipr["overlap"], meta["sampler"]["steps_per_patch"]) == (2, 0.5, 2)
  assert (meta["eval"]["seed"], meta["eval"]["num_puzzles"]) == (35, 1000)
  k = np.maximum(1, unknown // 4)
  expected = np.stack([3 * (2 * unknown + b * (k + 1)) for b in range(9)], axis=1)
  expected[:, -1] += 3 * 4
  np.testing.assert_array_equal(nfe, expected)
  chains_meta, chains_unknown, chains_nfe, chains_index = _committed(35, "chains3_b2_bal", split)
  assert (chains_meta["ipr"]["chains"], chains_meta["ipr"]["choose_at"]) == (3, "every_budget")
  expected = np.stack([3 * (3 * unknown + 4 + b * (2 * k + 12)) for b in range(3)], axis=1)
  np.testing.assert_array_equal(chains_nfe, expected)
  paper_meta, paper_unknown, paper_nfe, paper_index = _committed(35, "paper_b12", split)
  assert (paper_meta["ipr"]["chains"], paper_meta["ipr"]["selection"]) == (1, "random")
  expected = np.stack([3 * unknown + b * (2 * k + 8) for b in range(13)], axis=1)
  np.testing.assert_array_equal(paper_nfe, expected)
  for other_index, other_unknown in ((chains_index, chains_unknown), (paper_index, paper_unknown)):
    np.testing.assert_array_equal(other_index, index)
    np.testing.assert_array_equal(other_unknown, unknown)
  for other in (chains_meta, paper_meta):
    assert other["eval"] == meta["eval"]


def test_a_longer_budget_repeats_the_shorter_runs_budgets():
  """The chains' trajectories do not depend on the budget they run to (what lets the pilot read
  the choice at budget b of a longer run as a run to budget b): budgets 0..8 of the budget-12
  pilot run are those of the budget-8 run, puzzle for puzzle."""
  folder = lambda name: _RESULTS / "seed36" / name / "eval" / "hard" / "puzzles.npz"
  with np.load(folder("c3_b8_srm2_steps2")) as short, np.load(folder("c3_b12_srm2_steps2")) as long:
    np.testing.assert_array_equal(short["index"], long["index"])
    np.testing.assert_array_equal(short["valid"], long["valid"][:, :9])
    np.testing.assert_array_equal(short["nfe"], long["nfe"][:, :9])


@pytest.mark.parametrize("split", ["hard", "medium", "unique"])
@pytest.mark.parametrize(
    "baseline, earlier, budgets",
    [("chains3_b2_bal", "chains3_b6_bal", 3), ("paper_b12", "paper_b30", 13)],
)
def test_the_baselines_repeat_issue_32s_runs_under_the_new_code(split, baseline, earlier, budgets):
  """The new code leaves the earlier settings' samples alone: today's chains and the paper's IPR
  rerun with it on seed 35 equal issue 32's runs (code 28e01ad52cd1) in every valid flag, digit
  grid and pass count of the budgets they share."""
  new = _RESULTS / "seed35" / baseline / "eval" / split / "puzzles.npz"
  old = (
      _EXPERIMENTS
      / "results"
      / "beyond_paper"
      / "seed35"
      / earlier
      / "eval"
      / split
      / "puzzles.npz"
  )
  with np.load(new) as a, np.load(old) as b:
    order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
    np.testing.assert_array_equal(a["index"][order_a], b["index"][order_b])
    for field in ("valid", "nfe", "duplicate_count"):
      np.testing.assert_array_equal(
          a[field][order_a], b[field][order_b][:, :budgets], err_msg=field
      )


def test_the_readme_tables_are_the_scripts_output():
  module = _module()
  readme = (_EXPERIMENTS / "README.md").read_text()
  seed35, seed36 = _RESULTS / "seed35", _RESULTS / "seed36"
  assert module.final_table(seed35) in readme
  assert module.paired(seed35) in readme
  assert module.pilot_table(seed36) in readme
