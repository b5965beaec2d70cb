"""The equal-compute tables of issue 41 in experiments/README.md (U-Net vs DiT, rectified vs cosine
flow), from the runs of experiments/transformer/run_equal_compute.sh
(experiments/results/equal_compute/<name>/eval/ms_hard_test/; training records in <name>/train/,
the models' parameters and FLOPs per step in step_flops.jsonl).

    python experiments/transformer/equal_compute_table.py [RESULTS_DIR]

Per model: its parameters, training steps and compute (steps x the gradient step's FLOPs at batch
32, as step_flops.py measured them), the final training loss, then the valid rate [95%
interval] and mean denoiser passes per puzzle of SRM (budget 0) and of the paper's IPR at budgets
10, 20 and 30. Then the paired comparisons of each `PAIRS` entry on the same puzzles (puzzles only
one of the two solves, exact sign test). Refuses runs that differ in anything but the model and
the flow: code, environment, puzzles, sampler and IPR settings.
"""

import json
import pathlib
import sys

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "beyond_paper"))
# pylint: disable=wrong-import-position
from beyond_paper_table import sign_test  # noqa: E402
from sampler_family_table import _rate  # noqa: E402

_RESULTS = _HERE.parent / "results" / "equal_compute"
SPLIT = "ms_hard_test"
# name -> (denoiser, flow), in the table's order.
RUNS = {
    "unet_rectified": ("U-Net (the demo's)", "rectified"),
    "dit_rectified": ("DiT, hidden 192, 6 blocks", "rectified"),
    "unet_cosine": ("U-Net (the demo's)", "cosine"),
}
BUDGETS = (0, 10, 20, 30)
PAIRS = (("dit_rectified", "unet_rectified"), ("unet_cosine", "unet_rectified"))
# What may differ between the runs: the weights and what made them.
_MODEL_FIELDS = ("model", "flow", "params_sha256")


def load(results_dir: pathlib.Path, name: str) -> dict:
  """One run: its results.json, shards/run.json, per-puzzle arrays and training record."""
  folder = results_dir / name / "eval" / SPLIT
  if not (folder / "results.json").is_file():
    raise SystemExit(f"{name}: no {folder / 'results.json'} (run_equal_compute.sh evaluate)")
  with np.load(folder / "puzzles.npz") as f:
    puzzles = {key: f[key] for key in f.files}
  train = results_dir / name / "train"
  config = json.loads((train / "config.json").read_text())
  metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
  run = json.loads((folder / "shards" / "run.json").read_text())
  digest = json.loads((train / "final_digest.json").read_text())
  if (run["params"], run["params_sha256"]) != ("ema", digest["ema_params_sha256"]):
    raise SystemExit(
        f"{name}: the evaluated weights ({run['params']}, {run['params_sha256'][:12]}) are not "
        f"the EMA weights of the training run's last checkpoint "
        f"({digest['ema_params_sha256'][:12]})"
    )
  return {
      "results": json.loads((folder / "results.json").read_text()),
      "run": run,
      "puzzles": puzzles,
      "config": config,
      "metrics": metrics,
  }


def check_like_for_like(runs: dict) -> None:
  """Raises SystemExit unless the runs share the code, the environment, the puzzles (indices,
  unknown cells) and every recorded setting besides the model and the flow."""
  (first_name, first), *others = runs.items()
  for name, run in others:
    for field in sorted(set(first["run"]) | set(run["run"])):
      if field in _MODEL_FIELDS:
        continue
      if first["run"].get(field) != run["run"].get(field):
        raise SystemExit(f"{name}: another {field} than {first_name}")
    for key in ("index", "unknown_patches", "num_given"):
      if not np.array_equal(first["puzzles"][key], run["puzzles"][key]):
        raise SystemExit(f"{name}: other puzzles than {first_name} ({key})")


def _model_cell(run: dict, costs: dict) -> tuple:
  """(parameters, steps, TFLOP, final loss) of a run's training; `costs`: step_flops.jsonl's
  rows by model kind."""
  config = run["config"]
  kind = config["model"].get("kind", "unet")
  steps = config["num_train_steps"]
  last = run["metrics"][-1]
  if last["step"] != steps:
    raise SystemExit(f"training stopped at step {last['step']} of {steps}")
  return costs[kind]["params"], steps, steps * costs[kind]["gflop_per_step"] / 1000, last["loss"]


def table(runs: dict, costs: dict) -> str:
  lines = [
      "| denoiser | flow | parameters | steps | TFLOP | final loss | "
      + " | ".join("SRM" if b == 0 else f"IPR b={b}" for b in BUDGETS)
      + " | model |",
      "|---" * (7 + len(BUDGETS)) + "|",
  ]
  for name, run in runs.items():
    denoiser, flow = RUNS[name]
    recorded_flow = run["run"].get("flow", "rectified")
    if recorded_flow != flow:
      raise SystemExit(f"{name}: run.json records flow {recorded_flow!r}, not {flow!r}")
    num_params, steps, tflop, loss = _model_cell(run, costs)
    rows = {row["budget"]: row for row in run["results"]["budgets"]}
    cells = [f"{_rate(rows[b])}, {rows[b]['mean_nfe']:.0f} passes" for b in BUDGETS]
    lines.append(
        f"| {denoiser} | {flow} | {num_params:,} | {steps:,} | {tflop:.1f} | {loss:.4f} | "
        + " | ".join(cells)
        + f" | {run['run']['params_sha256'][:12]} |"
    )
  first = next(iter(runs.values()))["results"]["metadata"]
  env = first["environment"]
  lines.append("")
  lines.append(
      f"Code record sha256 {first['code']['sha256'][:12]}; machine {env['cpu']}, "
      f"{env['backend']} x{env['device_count']}, jax {env['packages'].get('jax')}; "
      f"{first['eval']['num_puzzles']:,} puzzles of eval seed {first['eval']['seed']}."
  )
  return "\n".join(lines)


def paired(runs: dict, pairs=PAIRS, budgets=(0, 30)) -> str:
  """Per pair and budget: puzzles only the first solves, only the second, the sign test's p."""
  lines = []
  for a, b in pairs:
    for budget in budgets:
      valid = []
      for name in (a, b):
        p = runs[name]["puzzles"]
        valid.append(p["valid"][np.argsort(p["index"]), budget].astype(bool))
      wins, losses = int(np.sum(valid[0] & ~valid[1])), int(np.sum(~valid[0] & valid[1]))
      lines.append(
          f"- budget {budget}: {a} only {wins}, {b} only {losses}, "
          f"p = {sign_test(wins, losses):.2g}"
      )
  return "\n".join(lines)


def load_costs(results_dir: pathlib.Path) -> dict:
  """step_flops.jsonl's rows by model kind ('unet', 'dit')."""
  lines = (results_dir / "step_flops.jsonl").read_text().splitlines()
  return {row["model"]: row for row in map(json.loads, lines)}


def main(argv):
  results_dir = pathlib.Path(argv[0]) if argv else _RESULTS
  runs = {name: load(results_dir, name) for name in RUNS}
  check_like_for_like(runs)
  print(table(runs, load_costs(results_dir)))
  print()
  print(paired(runs))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
