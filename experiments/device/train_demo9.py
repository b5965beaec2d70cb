r"""One accelerator call that trains the 9x9 demo SRM (`mnist_sudoku:demo9`) and evaluates it.

  python experiments/device/train_demo9.py --out=$OUT                       # <= 9 min, one GPU
  python experiments/device/train_demo9.py --out=$OUT --resume_from=prev/demo9  # a later call
  python experiments/device/train_demo9.py --scale=tiny --out=/tmp/d9       # the CPU rehearsal

On the workplace's device machine, as bench.py (docs/device.md, docs/nine_by_nine.md):

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      experiments/device/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
      && python3 experiments/device/train_demo9.py --out=$OUT 2>&1 | tee $OUT/log

Stages, each its own process (the parent never starts a JAX backend), all within --deadline_s:

  preflight  bench.py's: every import and version, the devices.
  train      `python -m ipr_jax.train --config=mnist_sudoku:demo9 --workdir=OUT/demo9` with
             --time_limit_s (what the deadline leaves after the evaluation's reserve) and
             --checkpoint_every_s=60: a call cut without warning loses at most a minute, and the
             run resumes from OUT/demo9 in a later call (--resume_from; the binary resumes the
             newest checkpoint and goes on to config.num_train_steps).
  eval       for each of --evals: `python -m ipr_jax.evaluate --config=mnist_sudoku:demo9,<eval>`
             on the EMA weights of the newest checkpoint (step S), SRM and the paper's IPR at
             budgets 0..30 on eval.num_puzzles puzzles of eval seed 35 in shards of
             eval.batch_size, into OUT/demo9/eval_at_step_S/eval/<eval>/; an evaluation cut by
             the deadline keeps its finished shards, which a later call reuses if it evaluates
             the same step (a step trained further is evaluated in its own folder).

What comes back under OUT: demo9/ (checkpoints, metrics.jsonl, config.json,
eval_at_step_S/eval/<name>/results.json ...), train_demo9.jsonl (one row per stage and
measurement, written as it exists), summary.md (the training record and the valid-rate table)
and, from the caller's tee, log. Every file is checked against --max_file_mib (16: what a device
call brings back), and a larger one is named in the summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = bench.ROOT
# The preset per scale. The tiny scale is the suite's form of the same task and U-Net, trained
# for seconds, evaluated on a few puzzles at a small budget.
PRESETS = {"full": "demo9", "tiny": "demo9_tiny"}
# Seconds kept for the evaluation stages when the training's time limit is set, per scale.
EVAL_RESERVE_S = {"full": 180.0, "tiny": 120.0}
# Budgets the summary's table shows (every budget is in each results.json).
TABLE_BUDGETS = (0, 1, 2, 5, 10, 20, 30)
RUN_DIR = "demo9"


def _binary(module: str, args: list[str], timeout_s: float) -> dict:
  """Runs `python -m module args` with a timeout; {'status', 'returncode', 'wall_s', 'log_tail'}."""
  start = time.perf_counter()
  command = [sys.executable, "-m", module, *args]
  print("$", " ".join(command), flush=True)
  try:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=max(timeout_s, 1), check=False
    )
  except subprocess.TimeoutExpired as e:
    tail = e.stderr or b""
    tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    return {
        "status": f"timed out after {timeout_s:.0f} s",
        "returncode": None,
        "wall_s": time.perf_counter() - start,
        "log_tail": tail[-1500:],
    }
  sys.stdout.write(done.stderr[-3000:])
  # 75: stopped by the time limit with its checkpoint saved (ipr_jax.build.cli.EXIT_PREEMPTED).
  status = {0: "ok", 75: "stopped at the time limit, saved"}.get(
      done.returncode, f"exit {done.returncode}"
  )
  return {
      "status": status,
      "returncode": done.returncode,
      "wall_s": time.perf_counter() - start,
      "log_tail": "" if done.returncode in (0, 75) else done.stderr[-1500:],
  }


def training_record(run_dir: pathlib.Path) -> dict:
  """The last logged step of metrics.jsonl: step, loss, steps/s (and the number of records)."""
  path = run_dir / "metrics.jsonl"
  records = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  if not records:
    return {"records": 0}
  last = records[-1]
  return {
      "records": len(records),
      "step": last.get("step"),
      "loss": last.get("loss"),
      "steps_per_sec": last.get("steps_per_sec"),
  }


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
  """The step numbers of the finished checkpoints in run_dir/checkpoints."""
  folder = run_dir / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def large_files(out: pathlib.Path, max_mib: float) -> list[tuple[str, int]]:
  """(path relative to out, bytes) of every file under out larger than max_mib."""
  limit = max_mib * 2**20
  return [
      (str(p.relative_to(out)), p.stat().st_size)
      for p in sorted(out.rglob("*"))
      if p.is_file() and p.stat().st_size > limit
  ]


def table_markdown(budgets: list[dict]) -> str:
  """The valid-rate table of a results.json's `budgets` (those of TABLE_BUDGETS it has)."""
  rows = {row["budget"]: row for row in budgets}
  lines = [
      "| budget | puzzles | valid % | 95% interval | passes per puzzle |",
      "|---:|---:|---:|---|---:|",
  ]
  for budget in TABLE_BUDGETS:
    row = rows.get(budget)
    if row is None:
      continue
    lines.append(
        f"| {budget} | {row['num_puzzles']} | {100 * row['valid_rate']:.1f} | "
        f"[{100 * row['valid_ci_low']:.1f}, {100 * row['valid_ci_high']:.1f}] | "
        f"{row['mean_nfe']:.0f} |"
    )
  return "\n".join(lines)


def summary_markdown(rows: list[dict], evals: list[str]) -> str:
  """The readable summary of one call's rows."""
  lines = ["# mnist_sudoku:demo9, one accelerator call", ""]
  devices = [r for r in rows if r["kind"] == "devices"]
  if devices:
    d = devices[0]
    lines.append(f"Device: {d.get('device_kind')} ({d.get('platform')}), python {d.get('python')}")
  versions = {r["module"]: r.get("version") for r in rows if r["kind"] == "import"}
  if versions:
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
  lines += ["", "| stage | status | wall s |", "|---|---|---:|"]
  for r in rows:
    if r["kind"] == "stage_end":
      lines.append(f"| {r['name']} | {r['status']} | {r['wall_s']:.0f} |")
  for r in rows:
    if r["kind"] == "train":
      lines += [
          "",
          f"Training: step {r.get('step')} (this call from step {r.get('start_step')}), "
          f"loss {r.get('loss')}, {r.get('steps_per_sec')} steps/s at the last log; "
          f"checkpoints {r.get('checkpoints')}.",
      ]
  tables = {r["name"]: r for r in rows if r["kind"] == "eval"}
  for name in evals:
    if name in tables:
      lines += ["", f"## {name} (EMA weights of step {tables[name]['step']})", ""]
      lines.append(table_markdown(tables[name]["budgets"]))
    else:
      lines += ["", f"## {name}", "", "no results.json (see the stages)"]
  big = [r for r in rows if r["kind"] == "large_files"]
  if big and big[-1]["files"]:
    lines += ["", f"Files over {big[-1]['max_mib']} MiB: {big[-1]['files']}"]
  return "\n".join(lines) + "\n"


def run_call(args) -> pathlib.Path:
  started = time.time()
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  run_dir = out / RUN_DIR
  jsonl = out / "train_demo9.jsonl"
  run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
  rows = bench.Rows(jsonl, run, "train_demo9")
  preset = PRESETS[args.scale]
  rows.add("plan", scale=args.scale, preset=preset, deadline_s=args.deadline_s, argv=sys.argv[1:])
  if args.resume_from:
    source = pathlib.Path(args.resume_from)
    if not (source / "checkpoints").is_dir():
      raise SystemExit(f"--resume_from={source}: no checkpoints/ folder there")
    if run_dir.exists():
      raise SystemExit(f"--resume_from: {run_dir} exists already; give an empty --out")
    shutil.copytree(source, run_dir)
    rows.add("resumed", source=str(source), checkpoints=checkpoint_steps(run_dir))

  def left() -> float:
    return args.deadline_s - (time.time() - started)

  def stage_end(name: str, done: dict) -> None:
    rows.add("stage_end", name=name, **done)

  done = bench._run_step_process(  # pylint: disable=protected-access
      "preflight", jsonl, run, args.scale, min(40.0, left()), step_name="preflight"
  )
  stage_end("preflight", done)

  start_step = (checkpoint_steps(run_dir) or [0])[-1]
  train_s = args.train_s if args.train_s is not None else left() - args.eval_reserve_s
  if train_s > 5:
    done = _binary(
        "ipr_jax.train",
        [
            f"--config=mnist_sudoku:{preset}",
            f"--workdir={run_dir}",
            f"--time_limit_s={train_s:.0f}",
            f"--checkpoint_every_s={args.checkpoint_every_s}",
        ],
        # The binary stops itself at the limit; the margin covers its last save and exit.
        timeout_s=min(train_s + 45, left()),
    )
    stage_end("train", done)
  else:
    stage_end("train", {"status": f"skipped ({train_s:.0f} s left for it)", "wall_s": 0})
  rows.add(
      "train",
      start_step=start_step,
      checkpoints=checkpoint_steps(run_dir),
      **training_record(run_dir),
  )

  for name in args.evals:
    if not checkpoint_steps(run_dir) or left() < 10:
      why = "no time left" if checkpoint_steps(run_dir) else "no checkpoint"
      stage_end(f"eval {name}", {"status": f"skipped: {why}", "wall_s": 0})
      continue
    overrides = [f"--config.{k}={v}" for k, v in args.eval_overrides]
    step = checkpoint_steps(run_dir)[-1]
    workdir = run_dir / f"eval_at_step_{step}"
    done = _binary(
        "ipr_jax.evaluate",
        [
            f"--config=mnist_sudoku:{preset},{name}",
            f"--workdir={workdir}",
            f"--checkpoint={run_dir / 'checkpoints' / str(step)}",
            *overrides,
        ],
        timeout_s=left(),
    )
    stage_end(f"eval {name}", done)
    results = workdir / "eval" / name / "results.json"
    if results.exists():
      budgets = json.loads(results.read_text())["budgets"]
      rows.add("eval", name=name, step=step, budgets=budgets)

  rows.add("large_files", max_mib=args.max_file_mib, files=large_files(out, args.max_file_mib))
  summary = summary_markdown(bench.read_rows(jsonl, run), args.evals)
  (out / "summary.md").write_text(summary)
  print(summary, flush=True)
  print(f"wrote {jsonl} and {out / 'summary.md'} ({time.time() - started:.0f} s)", flush=True)
  return out


def _override(text: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"{text!r}: expected field=value, e.g. eval.num_puzzles=500")
  return key, value


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="the output folder (the device's $OUT)")
  parser.add_argument("--scale", choices=tuple(PRESETS), default="full")
  parser.add_argument("--deadline_s", type=float, default=540.0)
  parser.add_argument(
      "--train_s",
      type=float,
      default=None,
      help="the training's time limit (default: what the deadline leaves after --eval_reserve_s;"
      " 0: evaluate only)",
  )
  parser.add_argument("--eval_reserve_s", type=float, default=None)
  parser.add_argument("--checkpoint_every_s", type=float, default=60.0)
  parser.add_argument(
      "--resume_from", help="a previous call's OUT/demo9 (its checkpoints, metrics, shards)"
  )
  parser.add_argument(
      "--evals",
      type=lambda s: [x for x in s.split(",") if x],
      default=["ms_hard_test"],
      help="evaluation presets, in order (e.g. ms_hard_test,ms_medium_test,ms_easy_test)",
  )
  parser.add_argument(
      "--eval_override",
      dest="eval_overrides",
      type=_override,
      action="append",
      default=[],
      help="a config override of the evaluations, e.g. eval.num_puzzles=500 (repeatable)",
  )
  parser.add_argument("--max_file_mib", type=float, default=16.0)
  args = parser.parse_args(argv)
  if args.eval_reserve_s is None:
    args.eval_reserve_s = EVAL_RESERVE_S[args.scale]
  run_call(args)


if __name__ == "__main__":
  main()
