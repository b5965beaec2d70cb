"""experiments/transformer/equal_compute_table.py on hand-made runs whose answers are known, and the
committed runs of issue 41's equal-compute tables (puzzles, passes, weights, the README's table)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
_COMMITTED = _EXPERIMENTS / "results" / "equal_compute"


def _module():
  path = _EXPERIMENTS / "transformer" / "equal_compute_table.py"
  spec = importlib.util.spec_from_file_location("equal_compute_table", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write_run(root, name, valid, *, kind="unet", flow="rectified", steps=100, code="c" * 64):
  """A run folder as run_equal_compute.sh leaves it; `valid`: [P, B] flags."""
  num_puzzles, num_budgets = valid.shape
  folder = root / name / "eval" / "ms_hard_test"
  (folder / "shards").mkdir(parents=True)
  digest = f"{name:0<64}"[:64]
  run = {
      "code": {"sha256": code},
      "eval": {"seed": 35},
      "sampler": {},
      "ipr": {},
      "model": {"kind": kind},
      "params": "ema",
      "params_sha256": digest,
  }
  if flow != "rectified":
    run["flow"] = flow
  (folder / "shards" / "run.json").write_text(json.dumps(run))
  rows = [
      {
          "budget": b,
          "valid_rate": float(valid[:, b].mean()),
          "valid_ci_low": 0.0,
          "valid_ci_high": 1.0,
          "mean_nfe": 10.0 + 5 * b,
      }
      for b in range(num_budgets)
  ]
  meta = {
      "code": {"sha256": code},
      "eval": {"num_puzzles": num_puzzles, "seed": 35},
      "environment": {
          "cpu": "test cpu",
          "backend": "cpu",
          "device_count": 1,
          "packages": {"jax": "0"},
      },
  }
  (folder / "results.json").write_text(json.dumps({"metadata": meta, "budgets": rows}))
  order = np.arange(num_puzzles)[::-1]  # stored out of index order, as shards merge them
  np.savez(
      folder / "puzzles.npz",
      index=order,
      unknown_patches=np.full(num_puzzles, 12),
      num_given=np.full(num_puzzles, 4),
      valid=valid[order],
  )
  train = root / name / "train"
  train.mkdir()
  (train / "config.json").write_text(
      json.dumps({"num_train_steps": steps, "model": {"kind": kind}, "flow": flow})
  )
  (train / "metrics.jsonl").write_text(
      "\n".join(json.dumps({"step": s, "loss": 1.0 / s}) for s in (50, steps))
  )
  (train / "final_digest.json").write_text(json.dumps({"ema_params_sha256": digest}))


def _three_runs(root, budgets=31):
  rng = np.random.default_rng(0)
  for name, kind, flow in (
      ("unet_rectified", "unet", "rectified"),
      ("dit_rectified", "dit", "rectified"),
      ("unet_cosine", "unet", "cosine"),
  ):
    _write_run(root, name, rng.random((20, budgets)) < 0.5, kind=kind, flow=flow)
  (root / "step_flops.jsonl").write_text(
      json.dumps({"model": "unet", "params": 10, "gflop_per_step": 2.0})
      + "\n"
      + json.dumps({"model": "dit", "params": 20, "gflop_per_step": 1.0})
      + "\n"
  )


def test_paired_counts_the_puzzles_only_one_run_solves(tmp_path):
  module = _module()
  a = np.zeros((10, 31), bool)
  b = np.zeros((10, 31), bool)
  a[:6, 0] = True  # a solves puzzles 0-5 at budget 0 ...
  b[4:7, 0] = True  # ... b solves 4-6: a only 4 (0-3), b only 1 (6)
  a[:, 30] = b[:, 30] = True
  _write_run(tmp_path, "dit_rectified", a, kind="dit")
  _write_run(tmp_path, "unet_rectified", b)
  runs = {name: module.load(tmp_path, name) for name in ("dit_rectified", "unet_rectified")}
  lines = module.paired(runs, pairs=(("dit_rectified", "unet_rectified"),)).splitlines()
  # 4 vs 1 discordant: p = 2 (1 + 5) / 32.
  assert lines[0] == (
      f"- budget 0: dit_rectified only 4, unet_rectified only 1, p = {2 * 6 / 32:.2g}"
  )
  assert lines[1] == "- budget 30: dit_rectified only 0, unet_rectified only 0, p = 1"


def test_the_table_states_each_runs_compute_from_the_measured_flops(tmp_path):
  module = _module()
  _three_runs(tmp_path)
  runs = {name: module.load(tmp_path, name) for name in module.RUNS}
  module.check_like_for_like(runs)
  lines = module.table(runs, module.load_costs(tmp_path)).splitlines()
  unet, dit, cosine = lines[2:5]
  # 100 steps x 2 GFLOP = 0.2 TFLOP (U-Net), 100 x 1 = 0.1 (DiT); final loss 1 / 100.
  assert "| rectified | 10 | 100 | 0.2 | 0.0100 |" in unet
  assert "| rectified | 20 | 100 | 0.1 | 0.0100 |" in dit
  assert "| cosine | 10 |" in cosine
  assert ", 10 passes" in unet and ", 160 passes" in unet  # budgets 0 and 30


def test_the_table_refuses_runs_that_differ_in_more_than_the_model(tmp_path):
  module = _module()
  _three_runs(tmp_path)
  runs = {name: module.load(tmp_path, name) for name in module.RUNS}
  code = {**runs["unet_cosine"]["run"], "code": {"sha256": "0" * 64}}
  other = {**runs, "unet_cosine": {**runs["unet_cosine"], "run": code}}
  with pytest.raises(SystemExit, match="unet_cosine: another code"):
    module.check_like_for_like(other)
  puzzles = dict(runs["dit_rectified"]["puzzles"], unknown_patches=np.full(20, 11))
  other = {**runs, "dit_rectified": {**runs["dit_rectified"], "puzzles": puzzles}}
  with pytest.raises(SystemExit, match="other puzzles than unet_rectified"):
    module.check_like_for_like(other)


def test_the_table_refuses_weights_that_are_not_the_trained_ones(tmp_path):
  module = _module()
  _three_runs(tmp_path)
  digest = tmp_path / "dit_rectified" / "train" / "final_digest.json"
  digest.write_text(json.dumps({"ema_params_sha256": "f" * 64}))
  with pytest.raises(SystemExit, match="not the EMA weights of the training run"):
    module.load(tmp_path, "dit_rectified")
  metrics = tmp_path / "unet_cosine" / "train" / "metrics.jsonl"
  metrics.write_text(json.dumps({"step": 50, "loss": 1.0}))
  runs = {name: module.load(tmp_path, name) for name in ("unet_rectified", "unet_cosine")}
  with pytest.raises(SystemExit, match="training stopped at step 50 of 100"):
    module.table(runs, module.load_costs(tmp_path))


_NAMES = ("unet_rectified", "dit_rectified", "unet_cosine")


def _committed(name):
  folder = _COMMITTED / name / "eval" / "ms_hard_test"
  assert (
      folder / "results.json"
  ).is_file(), f"{folder} is not committed (experiments/transformer/run_equal_compute.sh evaluate)"
  run = json.loads((folder / "shards" / "run.json").read_text())
  with np.load(folder / "puzzles.npz") as f:
    puzzles = {key: f[key] for key in f.files}
  return run, puzzles


@pytest.mark.parametrize("name", _NAMES)
def test_the_committed_runs_are_the_papers_ipr_on_1000_hard_puzzles_of_seed_35(name):
  """Each model on the same 1,000 hard puzzles (0-5 of 16 cells given), the paper's IPR to
  budget 30, and each puzzle's passes 3n + b (2k + 8): 3 SRM steps per unknown cell, then k =
  max(1, n // 4) cells regenerated in 10 steps at overlap 0.8 per iteration."""
  run, puzzles = _committed(name)
  assert (run["eval"]["seed"], run["eval"]["num_puzzles"]) == (35, 1000)
  assert tuple(run["eval"]["given_range"]) == (0, 5)
  ipr = run["ipr"]
  assert (ipr["budget"], ipr["chains"], ipr["selection"], ipr["return_iterate"]) == (
      30,
      1,
      "random",
      "last",
  )
  unknown = puzzles["unknown_patches"]
  np.testing.assert_array_equal(16 - unknown, puzzles["num_given"])
  assert unknown.min() >= 11
  k = np.maximum(1, unknown // 4)
  expected = np.stack([3 * unknown + b * (2 * k + 8) for b in range(31)], axis=1)
  np.testing.assert_array_equal(puzzles["nfe"], expected)
  reference, reference_puzzles = _committed("unet_rectified")
  np.testing.assert_array_equal(np.sort(puzzles["index"]), np.arange(1000))
  for key in ("index", "unknown_patches"):
    np.testing.assert_array_equal(puzzles[key], reference_puzzles[key])
  assert (run["sampler"], run["ipr"]) == (reference["sampler"], reference["ipr"])


def test_the_committed_runs_are_the_models_they_are_named_after():
  records = {name: _committed(name)[0] for name in _NAMES}
  assert records["dit_rectified"]["model"]["kind"] == "dit"
  assert (
      records["dit_rectified"]["model"]["dit"]["hidden"],
      records["dit_rectified"]["model"]["dit"]["depth"],
  ) == (192, 6)
  assert "kind" not in records["unet_rectified"]["model"]  # the U-Net's record, as before
  assert records["unet_cosine"]["model"] == records["unet_rectified"]["model"]
  assert records["unet_cosine"].get("flow") == "cosine"
  assert "flow" not in records["unet_rectified"] and "flow" not in records["dit_rectified"]
  assert len({r["params_sha256"] for r in records.values()}) == 3


def test_the_committed_models_were_trained_at_equal_compute():
  module = _module()
  costs = module.load_costs(_COMMITTED)
  steps = {}
  for name in _NAMES:
    config = json.loads((_COMMITTED / name / "train" / "config.json").read_text())
    kind = config["model"].get("kind", "unet")
    steps[name] = config["num_train_steps"]
    assert config["batch_size"] == 32
    assert costs[kind]["steps"] == steps[name]
  unet = steps["unet_rectified"] * costs["unet"]["gflop_per_step"]
  dit = steps["dit_rectified"] * costs["dit"]["gflop_per_step"]
  assert abs(dit - unet) / unet < 1e-3  # within one DiT step of the U-Net's compute
  assert steps["unet_cosine"] == steps["unet_rectified"]


def test_the_readme_shows_the_scripts_table():
  module = _module()
  runs = {name: module.load(_COMMITTED, name) for name in module.RUNS}
  module.check_like_for_like(runs)
  readme = (_EXPERIMENTS / "README.md").read_text()
  assert module.table(runs, module.load_costs(_COMMITTED)) in readme
  for line in module.paired(runs).splitlines():
    assert line in readme
