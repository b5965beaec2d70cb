"""experiments/beyond_paper/beyond_paper_table.py and failure_kinds.py on hand-made inputs whose
answers are known, and the committed runs of issue 32 (settings, passes, provenance)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _module(name):
  spec = importlib.util.spec_from_file_location(name, _EXPERIMENTS / "beyond_paper" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_equal_pass_cells_take_the_largest_budget_within_the_level():
  module = _module("beyond_paper_table")
  budgets = [
      {
          "budget": b,
          "mean_nfe": 40.0 + 14 * b,
          "valid_rate": 0.5 + b / 100,
          "valid_ci_low": 0.4,
          "valid_ci_high": 0.6,
      }
      for b in range(31)
  ]
  assert module._within(budgets, 450)["budget"] == 29  # 40 + 14 * 29 = 446 <= 450 < 460
  assert module._within(budgets, 39) is None
  assert module._cell(budgets, 450).startswith("79.0% [40.0, 60.0] (b=29, 446)")


_SEED35 = _EXPERIMENTS / "results" / "beyond_paper" / "seed35"


def _committed(run, split):
  path = _SEED35 / run / "eval" / split / "results.json"
  assert (
      path.is_file()
  ), f"{path} is not committed (experiments/beyond_paper/run_beyond_paper.sh final/baselines)"
  return json.loads(path.read_text())["metadata"], path.parent


@pytest.mark.parametrize("split", ["hard", "medium", "unique"])
def test_the_committed_final_runs_record_the_chosen_setting_and_its_passes(split):
  """The committed seed-35 runs of the chosen setting: 1,000 puzzles, three chains, the
  balanced query, and each puzzle's passes 3 (3n + G + b (2k + 8 + G)) with G = 4."""
  meta, folder = _committed("chains3_b6_bal", split)
  assert (meta["ipr"]["chains"], meta["ipr"]["query_cells"], meta["ipr"]["budget"]) == (
      3,
      "balanced",
      6,
  )
  assert (meta["eval"]["seed"], meta["eval"]["num_puzzles"]) == (35, 1000)
  assert meta["code"] is not None and meta["environment"] is not None
  with np.load(folder / "puzzles.npz") as f:
    unknown, nfe = f["unknown_patches"], f["nfe"]
  k = np.maximum(1, unknown // 4)
  expected = np.stack([3 * (3 * unknown + 4 + b * (2 * k + 12)) for b in range(7)], axis=1)
  np.testing.assert_array_equal(nfe, expected)


@pytest.mark.parametrize("split", ["hard", "medium", "unique"])
def test_the_committed_baselines_are_the_papers_ipr_on_the_same_puzzles(split):
  """The paper's IPR beside the chains: budget 30, one chain, random selection, the same 1,000
  puzzles (the same given cells), and each puzzle's passes 3n + b (2k + 8)."""
  meta, folder = _committed("paper_b30", split)
  ipr = meta["ipr"]
  assert (ipr["budget"], ipr["chains"], ipr["selection"], ipr["return_iterate"]) == (
      30,
      1,
      "random",
      "last",
  )
  chains_meta, chains_folder = _committed("chains3_b6_bal", split)
  assert (meta["eval"], meta["sampler"]) == (chains_meta["eval"], chains_meta["sampler"])
  with np.load(folder / "puzzles.npz") as f, np.load(chains_folder / "puzzles.npz") as g:
    unknown, nfe = f["unknown_patches"], f["nfe"]
    np.testing.assert_array_equal(f["index"], g["index"])
    np.testing.assert_array_equal(unknown, g["unknown_patches"])
  k = np.maximum(1, unknown // 4)
  expected = np.stack([3 * unknown + b * (2 * k + 8) for b in range(31)], axis=1)
  np.testing.assert_array_equal(nfe, expected)


def test_the_final_table_compares_runs_of_one_code_and_machine():
  module = _module("beyond_paper_table")
  found = module.runs(_SEED35)
  module.check_like_for_like(found)  # raises SystemExit on a mix
  # ... and it does refuse a mix: another code record, or a missing baseline.
  key = ("unique", "paper_b30")
  mixed = dict(found)
  mixed[key] = json.loads(json.dumps(found[key]))
  mixed[key]["metadata"]["code"]["sha256"] = "0" * 64
  with pytest.raises(SystemExit, match="not one recorded code"):
    module.check_like_for_like(mixed)
  del mixed[key]
  with pytest.raises(SystemExit, match="missing runs: unique/paper_b30"):
    module.check_like_for_like(mixed)


def test_sign_test_closed_forms():
  module = _module("beyond_paper_table")
  assert module.sign_test(5, 0) == 2 / 2**5  # all five discordant pairs one way
  assert module.sign_test(3, 3) == 1.0
  # 2 vs 8: P(X <= 2) = (1 + 10 + 45) / 1024, doubled.
  assert module.sign_test(2, 8) == 2 * 56 / 1024


def test_wrong_cells_are_those_repeated_in_their_row_and_their_column():
  module = _module("failure_kinds")
  grid = np.array([[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]])
  broken = grid.copy()
  broken[0, 0] = 2  # repeats the 2 of row 0 (column 1) and of column 0 (row 2)
  wrong = module.wrong_cells(np.stack([grid, broken]))
  assert not wrong[0].any()
  expected = np.zeros((4, 4), bool)
  expected[0, 0] = True
  np.testing.assert_array_equal(wrong[1], expected)
