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
    for name in ("chains3_b2_bal", "paper_b16"):
      _write_run(root, split, name, _meta(), [100, 180, 205, 260], [0.1, 0.2, 0.5, 0.6], theirs)


def test_final_table_matches_each_baseline_at_its_largest_budget_within_the_chosen_passes(
    tmp_path,
):
  module = _module()
  _final_runs(tmp_path)
  table = module.final_table(tmp_path)
  assert "| hard | chosen | budget 1, chains 3, balanced, final_budget | 1 | 210 | 75.0%" in table
  # 205 <= 210 < 260: budget 2 of each baseline.
  assert "| hard | paper_b16 | budget 3 | 2 | 205 | 50.0% [45.0, 55.0]" in table
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
  key = ("unique", "paper_b16")
  mixed[key] = json.loads(json.dumps(found[key]))
  mixed[key]["metadata"]["code"]["sha256"] = "0" * 64
  with pytest.raises(SystemExit, match="not one recorded code"):
    module.check_like_for_like(mixed, required=module.FINAL_RUNS, splits=module.SPLITS)
  del mixed[key]
  with pytest.raises(SystemExit, match="missing runs: unique/paper_b16"):
    module.check_like_for_like(mixed, required=module.FINAL_RUNS, splits=module.SPLITS)
