r"""Trains candidate recipes for the shipped 4x4 demo SRM side by side, picks one, evaluates it.

    python experiments/demo/demo_recipes.py --out=runs/recipes               # one GPU, ~8 minutes
    python experiments/demo/demo_recipes.py --scale=tiny --out=/tmp/recipes  # CPU smoke test

1. Train: every recipe of `RECIPES` (the demo preset's U-Net, 28x28 images: the README's main
   command stays as fast on a CPU) as its own `ipr_jax.train` process, all at once on the one
   accelerator, each stopped by SIGTERM after `--train_seconds` (the binary then saves a
   checkpoint of the step it reached) or at its step count.
2. Select: each run's EMA weights on `--select_puzzles` hard test puzzles of eval seed 36 (not
   the test puzzles of step 3), SRM + the paper's IPR to budget 30. The recipe with the highest
   valid rate at budget 0 (SRM) wins; ties go to budget 30.
3. Tables: the chosen run on 1,000 puzzles (eval seed 35, as the README and
   experiments/README.md) of each of ms_hard_test, ms_medium_test and ms_unique_test, with the
   paper's IPR and with the recommended uncertainty-guided setting (selection=uncertainty,
   return_iterate=confident), budgets 0..30.

Everything goes under --out: one run directory per recipe (checkpoints, metrics.jsonl,
eval/select_hard), the chosen run's eval/<table>/ directories, train/eval logs, and
summary.json (steps reached, losses, selection rates, the choice, wall times). A stage that would
pass --deadline_s is skipped and said so in summary.json.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time

from absl import app
from absl import flags

_ROOT = pathlib.Path(__file__).resolve().parents[2]

_OUT = flags.DEFINE_string("out", "runs/recipes", "Output directory.")
_SCALE = flags.DEFINE_enum("scale", "full", ["full", "tiny"], "tiny: seconds, for a CPU test.")
_TRAIN_SECONDS = flags.DEFINE_float("train_seconds", 240.0, "Wall-time cap of the training stage.")
_DEADLINE = flags.DEFINE_float("deadline_s", 540.0, "Skip stages that would end after this.")
_RECIPES = flags.DEFINE_list("recipes", None, "Subset of RECIPES to train (default: all).")
_SELECT_PUZZLES = flags.DEFINE_integer("select_puzzles", 500, "Puzzles of the selection set.")
_PACK = flags.DEFINE_string("pack", None, "Also write .tar.gz archives of the results here.")

DEMO = "configs/mnist_sudoku.py:demo"
# The shipped run's newest checkpoint. The shipped model of step 20,494 was made by resuming the
# step-3,250 archive that this file replaced (in git history: `git show
# a583717:experiments/demo_run/demo_step3250.tar.gz > step3250.tar.gz`, then --resume_archive).
_RESUME = flags.DEFINE_string(
    "resume_archive",
    "experiments/demo/demo_run/demo_step20494.tar.gz",
    "Checkpoint archive the resumed recipes start from.",
)

# name -> (config overrides, resume from --resume_archive).
RECIPES = {
    # The shipped run continued: batch 32, constant learning rate 2e-3, EMA 0.999.
    "continue_b32": ({"num_train_steps": 40_000, "checkpoint_every_steps": 2_000}, True),
    # Batch 256 from scratch, constant learning rate.
    "b256": (
        {
            "batch_size": 256,
            "num_train_steps": 8_000,
            "optim.ema_decay": 0.9995,
            "checkpoint_every_steps": 2_000,
        },
        False,
    ),
    # Batch 256 with a cosine decay to 5% of the rate.
    "b256_cosine": (
        {
            "batch_size": 256,
            "num_train_steps": 8_000,
            "optim.ema_decay": 0.9995,
            "optim.decay_steps": 8_000,
            "optim.decay_end_factor": 0.05,
            "checkpoint_every_steps": 2_000,
        },
        False,
    ),
    # As b256_cosine, training puzzles with 0-10 given cells (hard and medium) instead of 0-15.
    "b256_cosine_hard": (
        {
            "batch_size": 256,
            "num_train_steps": 8_000,
            "optim.ema_decay": 0.9995,
            "optim.decay_steps": 8_000,
            "optim.decay_end_factor": 0.05,
            "data.train_given_range": "(0, 10)",
            "checkpoint_every_steps": 2_000,
        },
        False,
    ),
}

TABLE_EVALS = ("ms_hard_test", "ms_medium_test", "ms_unique_test")
SETTINGS = {
    "paper": {},
    "uncertainty": {"ipr.selection": "uncertainty", "ipr.return_iterate": "confident"},
}


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _archive_step() -> int:
  """The step of the checkpoint in --resume_archive."""
  with tarfile.open(_ROOT / _RESUME.value) as tar:
    return max(
        int(p.split("/")[2])
        for p in tar.getnames()
        if p.startswith("./checkpoints/") and p.count("/") >= 2
    )


def _tiny(overrides: dict, resume: bool) -> dict:
  """The smoke-test version of a recipe: two steps past its start, small batches."""
  out = dict(
      overrides,
      num_train_steps=_archive_step() + 2 if resume else 2,
      checkpoint_every_steps=2,
      log_every_steps=1,
  )
  if "batch_size" in out:
    out["batch_size"] = 8
  if "optim.decay_steps" in out:
    out["optim.decay_steps"] = 100
  return out


def _recipe(name: str, tiny: bool) -> dict:
  overrides, resume = RECIPES[name]
  return _tiny(overrides, resume) if tiny else dict(overrides)


def _env() -> dict:
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share one GPU
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
  return env


def _last_metrics(run_dir: pathlib.Path) -> dict:
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return {}
  lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return lines[-1] if lines else {}


def _wait(procs: dict, deadline: float, log_dir: pathlib.Path) -> dict:
  """Waits for every process; SIGTERM to those still running at `deadline`, SIGKILL 60 s later.
  Returns name -> exit code."""
  codes, terminated = {}, False
  while len(codes) < len(procs):
    for name, proc in procs.items():
      if name not in codes and proc.poll() is not None:
        codes[name] = proc.returncode
        if proc.returncode not in (0,):
          tail = (log_dir / f"{name}.log").read_text()[-1500:]
          print(f"--- {name} exited with {proc.returncode}:\n{tail}", flush=True)
    now = time.time()
    if not terminated and now >= deadline:
      for name, proc in procs.items():
        if name not in codes:
          proc.send_signal(signal.SIGTERM)
      terminated = True
    if terminated and now >= deadline + 60:
      for name, proc in procs.items():
        if name not in codes:
          proc.kill()
    time.sleep(1.0)
  return codes


def train_stage(out: pathlib.Path, names: list[str], seconds: float, tiny: bool) -> dict:
  log_dir = out / "logs"
  log_dir.mkdir(parents=True, exist_ok=True)
  procs = {}
  for name in names:
    overrides, resume = _recipe(name, tiny), RECIPES[name][1]
    run_dir = out / name
    if resume and not (run_dir / "checkpoints").exists():
      run_dir.mkdir(parents=True, exist_ok=True)
      with tarfile.open(_ROOT / _RESUME.value) as tar:
        tar.extractall(run_dir, filter="data")
    cmd = [
        sys.executable,
        "-m",
        "ipr_jax.train",
        f"--config={DEMO}",
        f"--workdir={run_dir}",
        *_flags(overrides),
    ]
    print(" ".join(cmd), flush=True)
    procs[name] = subprocess.Popen(
        cmd,
        cwd=_ROOT,
        env=_env(),
        stdout=open(log_dir / f"{name}.log", "w"),
        stderr=subprocess.STDOUT,
    )
  start = time.time()
  codes = _wait(procs, start + seconds, log_dir)
  result = {}
  for name in names:
    last = _last_metrics(out / name)
    result[name] = {
        "exit_code": codes[name],
        "step": last.get("step"),
        "loss": last.get("loss"),
        "steps_per_sec": last.get("steps_per_sec"),
        "overrides": _recipe(name, tiny),
        "resumed_from": _RESUME.value if RECIPES[name][1] else None,
    }
    print(f"{name}: {result[name]}", flush=True)
  result["seconds"] = time.time() - start
  return result


def _evaluate(
    run_dir: pathlib.Path, preset: str, name: str, overrides: dict, log: pathlib.Path
) -> subprocess.Popen:
  cmd = [
      sys.executable,
      "-m",
      "ipr_jax.evaluate",
      f"--config={preset}",
      f"--workdir={run_dir}",
      f"--checkpoint={run_dir}",
      f"--config.eval.name={name}",
      *_flags(overrides),
  ]
  print(" ".join(cmd), flush=True)
  return subprocess.Popen(
      cmd, cwd=_ROOT, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT
  )


def _rates(run_dir: pathlib.Path, name: str) -> list[float]:
  with open(run_dir / "eval" / name / "results.json") as f:
    rows = json.load(f)["budgets"]
  return [r["valid_rate"] for r in rows]


def eval_stage(jobs: dict, deadline: float, log_dir: pathlib.Path) -> dict:
  procs = {name: _evaluate(*job, log_dir / f"{name}.log") for name, job in jobs.items()}
  return _wait(procs, deadline, log_dir)


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value).resolve()
  try:
    run_all(out)
  finally:
    if _PACK.value and (out / "summary.json").exists():
      pack(out, pathlib.Path(_PACK.value))


def run_all(out: pathlib.Path) -> None:
  t0 = time.time()
  tiny = _SCALE.value == "tiny"
  out.mkdir(parents=True, exist_ok=True)
  names = _RECIPES.value or list(RECIPES)
  unknown = sorted(set(names) - set(RECIPES))
  if unknown:
    raise app.UsageError(f"unknown recipes {unknown}; expected some of {list(RECIPES)}")
  summary = {"recipes": {}, "skipped": []}

  def save():
    summary["elapsed_s"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

  summary["train"] = train_stage(out, names, _TRAIN_SECONDS.value, tiny)
  save()
  if all(summary["train"][n]["exit_code"] != 0 for n in names):
    raise SystemExit("every training run failed; see the logs above")

  budget = 1 if tiny else 30
  puzzles = 4 if tiny else _SELECT_PUZZLES.value
  select = {
      "eval.seed": 36,
      "eval.num_puzzles": puzzles,
      "eval.batch_size": puzzles,
      "ipr.budget": budget,
  }
  trained = [n for n in names if (out / n / "checkpoints").exists()]
  deadline = t0 + _DEADLINE.value
  start = time.time()
  codes = eval_stage(
      {f"select_{n}": (out / n, DEMO, "select_hard", select) for n in trained},
      deadline,
      out / "logs",
  )
  rates = {n: _rates(out / n, "select_hard") for n in trained if codes[f"select_{n}"] == 0}
  summary["select"] = {"settings": select, "valid_rate": rates, "seconds": time.time() - start}
  if not rates:
    summary["skipped"].append("tables: no recipe was evaluated")
    save()
    raise SystemExit("no recipe could be evaluated; see the logs")
  chosen = max(rates, key=lambda n: (rates[n][0], rates[n][-1]))
  summary["chosen"] = chosen
  print(f"chosen: {chosen} (SRM {rates[chosen][0]:.3f}, IPR {rates[chosen][-1]:.3f})", flush=True)
  save()

  start = time.time()
  table = {
      "eval.num_puzzles": 4 if tiny else 1000,
      "eval.batch_size": 4 if tiny else 500,
      "ipr.budget": budget,
  }
  jobs = {
      f"{ev}_{setting}": (
          out / chosen,
          f"{DEMO},{ev}",
          f"{ev}_{setting}",
          dict(table, **SETTINGS[setting]),
      )
      for ev in TABLE_EVALS
      for setting in SETTINGS
  }
  codes = eval_stage(jobs, deadline, out / "logs")
  summary["tables"] = {
      name: {"exit_code": code, "valid_rate": _rates(out / chosen, name) if code == 0 else None}
      for name, code in codes.items()
  }
  summary["tables_seconds"] = time.time() - start
  save()
  print(json.dumps(summary, indent=1))


def _newest_checkpoint(run: pathlib.Path):
  steps = [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
  return max(steps, key=lambda p: int(p.name)) if steps else None


def pack(out: pathlib.Path, dest: pathlib.Path) -> None:
  """One archive per run (its newest checkpoint, metrics, config, evaluations), one of the logs:
  each under the 16 MB that a device run may send back."""
  dest.mkdir(parents=True, exist_ok=True)
  shutil.copy(out / "summary.json", dest / "summary.json")
  with tarfile.open(dest / "logs.tar.gz", "w:gz") as tar:
    tar.add(out / "logs", "logs")
  for run in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "logs"):
    with tarfile.open(dest / f"run_{run.name}.tar.gz", "w:gz") as tar:
      newest = _newest_checkpoint(run) if (run / "checkpoints").exists() else None
      if newest is not None:
        tar.add(newest, f"{run.name}/checkpoints/{newest.name}")
      for name in ("metrics.jsonl", "config.json", "eval"):
        if (run / name).exists():
          tar.add(run / name, f"{run.name}/{name}")
  print(f"packed {sorted(p.name for p in dest.iterdir())}", flush=True)


if __name__ == "__main__":
  app.run(main)
