r"""The devices' idle time between evaluation batches: a whole-process A/B of two source trees.

  git worktree add /tmp/old <commit>     # the code before
  python experiments/scale/eval_idle_ab.py --trees=/tmp/old,. --names=before,after --repeats=3 \
      --output=/tmp/eval_idle_ab.json -- --config=configs/mnist_sudoku.py:demo \
      --config.eval.num_puzzles=40 --config.eval.batch_size=2 --config.ipr.budget=2 \
      --config.eval.save_samples=True

Runs `python -m ipr_jax.evaluate <flags> --workdir=<fresh dir>` with each tree's `ipr_jax` in turn,
A B A B ... (`--repeats` each, after one untimed warm-up run per tree that fills the compilation
cache), and times the whole process. Inside each run it wraps the Evaluator's pmapped program
(`Evaluator._p_run`, the same in both trees) and logs, for each batch of the loop, when the host
called it (t_call) and when its outputs were ready (t_ready, a thread blocked on them). The devices
are idle between batches b - 1 and b for max(0, t_call(b) - t_ready(b - 1)): the host's fetching,
shard write, fsync, progress line and next inputs, whatever it does before handing batch b over.
The figure's puzzles, computed again after the loop (with samples), are left out. Prints a table
with the per-run numbers, the medians and the ratios after / before of the medians.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

_CHILD = "--child"


def _child(tree: str, timings_path: str, flags: list[str]) -> None:
  """One evaluation with `tree`'s ipr_jax, its pmapped program's calls logged to `timings_path`."""
  sys.path.insert(0, tree)
  from ipr_jax import evaluate  # pylint: disable=g-import-not-at-top
  from ipr_jax.build import cli  # pylint: disable=g-import-not-at-top
  from ipr_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from ipr_jax.runtime import host_devices  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  assert pathlib.Path(runner.__file__).resolve().is_relative_to(pathlib.Path(tree).resolve())
  calls: list[dict] = []
  waiters: list[threading.Thread] = []
  init = runner.Evaluator.__init__

  def logged_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    p_run = self._p_run  # pylint: disable=protected-access

    def logged_p_run(*run_args):
      call = {"t_call": time.time(), "num_snapshots": int(run_args[5])}
      outputs = p_run(*run_args)
      call["t_returned"] = time.time()
      calls.append(call)

      def wait():
        jax.block_until_ready(outputs)
        call["t_ready"] = time.time()

      waiters.append(threading.Thread(target=wait, daemon=True))
      waiters[-1].start()
      return outputs

    self._p_run = logged_p_run  # pylint: disable=protected-access

  runner.Evaluator.__init__ = logged_init
  host_devices.use_cpu_cores()
  evaluate.define_flags()
  sys.argv = ["ipr_jax.evaluate", *flags]
  try:
    cli.run(evaluate.main)
  finally:
    for waiter in waiters:
      waiter.join()
    pathlib.Path(timings_path).write_text(json.dumps(calls))


def _idle(calls: list[dict]) -> dict:
  """The loop's batches (no samples kept: `num_snapshots` 0): idle gaps and device time."""
  loop = sorted((c for c in calls if c["num_snapshots"] == 0), key=lambda c: c["t_call"])
  gaps = [max(0.0, b["t_call"] - a["t_ready"]) for a, b in zip(loop, loop[1:])]
  return {
      "batches": len(loop),
      "idle_s": sum(gaps),
      "idle_per_gap_s": sum(gaps) / max(len(gaps), 1),
      "loop_s": loop[-1]["t_ready"] - loop[0]["t_call"],
  }


def _run(tree: str, flags: list[str], cache_dir: str) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    timings = os.path.join(workdir, "timings.json")
    command = [sys.executable, os.path.abspath(__file__), _CHILD, tree, timings, *flags]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
    start = time.time()
    done = subprocess.run(
        [*command, f"--workdir={workdir}/run"], env=env, cwd=tree, capture_output=True, text=True
    )
    wall = time.time() - start
    if done.returncode != 0:
      raise RuntimeError(
          f"{tree}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
      )
    row = {"wall_s": wall, "load_1min_after": os.getloadavg()[0]}
    row.update(_idle(json.loads(pathlib.Path(timings).read_text())))
    for path in pathlib.Path(workdir, "run", "eval").glob("*/results.json"):
      row["eval_s"] = json.loads(path.read_text())["metadata"]["throughput"]["seconds"]
  return row


def main() -> None:
  args = sys.argv[1:]
  if args[:1] == [_CHILD]:
    _child(args[1], args[2], args[3:])
    return
  split = args.index("--")
  options = dict(a.lstrip("-").split("=", 1) for a in args[:split])
  flags = args[split + 1 :]
  trees = [os.path.abspath(t) for t in options["trees"].split(",")]
  names = options.get("names", ",".join(trees)).split(",")
  repeats = int(options.get("repeats", "3"))
  cache_dir = options.get("cache_dir") or tempfile.mkdtemp(prefix="eval_idle_cache_")
  for tree in trees:  # warm-up: the compilation cache filled, untimed
    _run(tree, flags, cache_dir)
  runs: dict[str, list[dict]] = {name: [] for name in names}
  for repeat in range(repeats):
    for name, tree in zip(names, trees):
      runs[name].append(_run(tree, flags, cache_dir))
      print(f"{repeat} {name}: {json.dumps(runs[name][-1])}", flush=True)
  keys = ["wall_s", "eval_s", "loop_s", "idle_s", "idle_per_gap_s"]
  medians = {n: {k: statistics.median(r[k] for r in runs[n]) for k in keys} for n in names}
  print("| tree | " + " | ".join(keys) + " |")
  print("|---" * (len(keys) + 1) + "|")
  for name in names:
    for r in runs[name]:
      print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    print(f"| {name} median | " + " | ".join(f"{medians[name][k]:.3f}" for k in keys) + " |")
  if len(names) == 2:
    a, b = names
    ratios = {k: medians[b][k] / medians[a][k] if medians[a][k] else None for k in keys}
    print(
        f"| {b} / {a} | "
        + " | ".join("-" if v is None else f"{v:.3f}" for v in ratios.values())
        + " |"
    )
  if "output" in options:
    pathlib.Path(options["output"]).write_text(
        json.dumps(
            {"flags": flags, "trees": dict(zip(names, trees)), "runs": runs, "medians": medians},
            indent=1,
        )
    )


if __name__ == "__main__":
  main()
