"""experiments/confidence_separation.py on hand-made scores whose separation is known."""

import importlib.util
import pathlib

import numpy as np

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "confidence_separation.py"


def _module():
  spec = importlib.util.spec_from_file_location("confidence_separation", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_separation_of_hand_made_scores():
  module = _module()
  # Valid scores 1, 2 against invalid 2, 3: pairs (1<2, 1<3, 2=2 -> half, 2<3) = 3.5 of 4.
  assert module.lower_score_probability(np.array([1.0, 2.0]), np.array([2.0, 3.0])) == 0.875
  # 2 puzzles, budgets 0..1: puzzle 0 invalid (score 5) then valid (score 4): the valid one lower;
  # puzzle 1 valid at both budgets: not counted within puzzles.
  scores = np.array([[5.0, 4.0], [1.0, 9.0]])
  valid = np.array([[False, True], [True, True]])
  result = module.separation(scores, valid)
  assert result["within"] == (1.0, 1)
  # Budget 0: valid {1} vs invalid {5}: 1.0; valid share 0.5.
  assert result["across"][0] == (1.0, 0.5)
