r"""The device campaign: the paper's settings on one accelerator, in one call of at most 9 minutes.

  python experiments/device/device_campaign.py --out=$OUT        # one GPU or TPU chip
  python experiments/device/device_campaign.py --scale=tiny --memory_limit_gb=0.05 \
      --out=/tmp/dc                                               # CPU

Steps, in order of value; each runs in its own process (an out-of-memory or a hang costs only
that step) within what is left of `--deadline_s`, and its JSON is written to OUT/campaign.json as
soon as it is measured (OUT/summary.md is the readable form), compile time apart from run time:

  ms_eval    MNIST Sudoku ms_hard_test, unet_256 in bf16 (random non-zero weights), at the batch
             `eval.batch_size=auto` picks for this device (`ipr_jax.evaluation.fit`; printed):
             seconds per puzzle at budget 0 and, from the measured denoiser passes per second and
             the passes per budget, at the paper's budget 30; peak memory; the compiled
             analysis' bytes.
  ep_eval    the same for Even Pixels ep_test with unet_32.
  train      training steps/s at the paper's global batch sizes on this one device: Sudoku 56
             (plain, then with remat if the plain step does not fit), Even Pixels 256.
  golden     only if time is left: the golden U-Net forwards (tests/golden) against the
             reference's float32 outputs.

The reference (PyTorch, one puzzle at a time, one H100, bf16): 85.8 s per hard puzzle at budget 30
(1,323 passes), 117.9 s per Even Pixels image; its forward at batch 64: 7.51 ms per 252x252 image.
"""

import json
import pathlib
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags
import jax
import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "experiments" / "device"))
sys.path.insert(0, str(_ROOT / "tests"))

import device_check  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax import build  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax import tasks  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.data import geometry  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.evaluation import fit  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax.evaluation import runner  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.models import unet  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.training import train_step as train_step_lib  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# device_check defines --out, --scale and --train_steps, used here as there.
_DEADLINE = flags.DEFINE_float("deadline_s", 540.0, "The whole campaign's time limit.")
_MEMORY = flags.DEFINE_float(
    "memory_limit_gb", None, "Memory per device for the auto batch (default: the device's)."
)
_STEPS = flags.DEFINE_list("steps", ["ms_eval", "ep_eval", "train", "golden"], "Steps to run.")
_STEP = flags.DEFINE_string("step", None, "Internal: run one step here and print its JSON.")
_EVAL_BUDGET = flags.DEFINE_integer(
    "eval_budget",
    1,
    "IPR iterations actually run (>= 1: one "
    "iteration's passes give the extrapolation to budget 30).",
)

PAPER_BUDGET = 30
STEP_NAMES = ("ms_eval", "ep_eval", "train", "golden")
# (config spec relative to configs/, global batch, overrides) per scale.
_EVAL = {
    "full": {"ms_eval": "mnist_sudoku.py:ms_hard_test", "ep_eval": "even_pixels.py:ep_test"},
    "tiny": {"ms_eval": "mnist_sudoku.py:demo", "ep_eval": "even_pixels.py:tiny"},
}
_TRAIN = {
    "full": [
        ("mnist_sudoku.py", 56, {}),
        ("mnist_sudoku.py", 56, {"remat": True}),
        ("even_pixels.py", 256, {}),
    ],
    "tiny": [("even_pixels.py:tiny", 4, {"remat": True, "grad_accum_steps": 2})],
}


def _memory_config(config):
  with config.unlocked():
    config.memory_limit_gb = _MEMORY.value
  return config


def eval_step(name: str, scale: str) -> dict:
  """One evaluation preset at the auto batch: compile, one timed call, the extrapolation."""
  config = _memory_config(device_check.load_config(_EVAL[scale][name], "bfloat16", scale))
  config.ipr.budget = _EVAL_BUDGET.value
  limit = fit.device_memory_bytes(config)
  if limit is None:
    raise ValueError("no device memory to size the batch by: pass --memory_limit_gb")
  start = time.perf_counter()
  choice = fit.auto_eval_batch(config, limit, float(config.memory_headroom))
  auto_s = time.perf_counter() - start
  print(choice.describe(), flush=True)
  shape = geometry.image_shape(config)
  params = unet.nonzero_init(
      build.make_model(config).clone(dtype=np.float32), shape, jax.random.key(0)
  )
  evaluator = runner.Evaluator(config, params)
  indices = np.arange(choice.batch_size)
  start = time.perf_counter()
  evaluator(indices)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  result = evaluator(indices)
  call_s = time.perf_counter() - start
  passes = float(result.nfe[-1].sum())
  rate = passes / call_s
  return {
      "config": _EVAL[scale][name],
      "model": config.model.name,
      "batch": choice.batch_size,
      "per_device": choice.per_device,
      "analysed_bytes": choice.measured.get(choice.per_device),
      "fit_gb": [choice.fit.fixed / fit.GB, choice.fit.per_item / fit.GB],
      "limit_bytes": choice.limit_bytes,
      "headroom": choice.headroom,
      "auto_s": auto_s,
      # The first call compiles; on a shared CPU the difference can be noise.
      "first_call_s": first_s,
      "compile_s": first_s - call_s,
      "call_s": call_s,
      "budget_run": config.ipr.budget,
      "passes_per_s": rate,
      "s_per_puzzle_at_budget_0": float(np.mean(result.nfe[0])) / rate,
      "s_per_puzzle_at_budget_30": device_check.passes_at(result.nfe, PAPER_BUDGET) / rate,
      "passes_per_puzzle_at_budget_30": device_check.passes_at(result.nfe, PAPER_BUDGET),
      "peak_memory_bytes": device_check.peak_memory_bytes(),
  }


def train_case(spec: str, batch: int, overrides: dict, scale: str) -> dict:
  """Training at global `batch` on this process's devices: compile, then timed steps."""
  from flax import jax_utils  # pylint: disable=g-import-not-at-top

  config = device_check.load_config(spec, "bfloat16", scale)
  config.batch_size = batch
  with config.unlocked():
    for key, value in overrides.items():
      config[key] = value
  num_devices = jax.local_device_count()
  per_device = batch // num_devices
  model, tx = build.make_model(config, training=True), build.make_optimizer(config)
  state_key, density_key = jax.random.split(jax.random.key(0))
  state = train_step_lib.create_train_state(config, model, tx, state_key)
  task = tasks.get(config.task).make_data(config)
  table = train_step_lib.make_loss_weight_table(config, density_key)
  index = np.arange(batch, dtype=np.int32).reshape(num_devices, per_device)
  step_fn = train_step_lib.pmapped_train_step(config, model, tx)
  state, task, table = jax_utils.replicate((state, task, table), axis_name="batch")
  start = time.perf_counter()
  compiled = step_fn.lower(state, task, table, index, None).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, task, table, index, None)
  jax.block_until_ready(metrics)
  steps = flags.FLAGS.train_steps
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, task, table, index, None)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  return {
      "config": spec,
      "batch": batch,
      **overrides,
      "compile_s": compile_s,
      "step_s": step_s,
      "steps_per_s": 1 / step_s,
      "images_per_s": batch / step_s,
      "loss": float(np.asarray(metrics["loss"])[0]),
      "peak_memory_bytes": device_check.peak_memory_bytes(),
  }


def train_step(scale: str, run_case, report) -> dict:
  """Every training case of `scale` (`run_case(argument) -> row`, `report(rows so far)` after
  each); at full scale the remat case only where the plain one failed."""
  out = {}
  for spec, batch, overrides in _TRAIN[scale]:
    key = f"{spec}@{batch}" + "".join(f",{k}={v}" for k, v in overrides.items())
    plain = out.get(f"{spec}@{batch}")
    if scale == "full" and overrides and plain is not None and "error" not in plain:
      continue  # remat only matters where the plain step did not fit
    out[key] = run_case(json.dumps([spec, batch, overrides]))
    report(out)
  return out


def run_one(step: str, scale: str, argument: str = "") -> dict:
  """A step in this process."""
  if step in ("ms_eval", "ep_eval"):
    return eval_step(step, scale)
  if step == "train_case":
    spec, batch, overrides = json.loads(argument)
    return train_case(spec, batch, overrides, scale)
  if step == "golden":
    return device_check.check_golden(device_check._GOLDEN_CASES[scale])  # pylint: disable=protected-access
  raise ValueError(f"unknown step {step!r}")


def in_subprocess(step: str, argument: str, timeout_s: float) -> dict:
  """`run_one` in a fresh process (its own memory), its JSON or the error."""
  if timeout_s < 5:
    return {"error": "skipped: no time left"}
  command = [
      sys.executable,
      __file__,
      f"--step={step}",
      f"--scale={flags.FLAGS.scale}",
      f"--train_steps={flags.FLAGS.train_steps}",
      f"--eval_budget={_EVAL_BUDGET.value}",
      f"--argument={argument}",
  ]
  if _MEMORY.value is not None:
    command.append(f"--memory_limit_gb={_MEMORY.value}")
  start = time.perf_counter()
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s"}
  lines = [line for line in done.stdout.splitlines() if line.startswith("STEP ")]
  if done.returncode == 0 and lines:
    row = json.loads(lines[-1][len("STEP ") :])
  else:
    tail = (done.stderr or done.stdout)[-1500:]
    oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
    row = {"error": "out of memory" if oom else f"exit {done.returncode}", "log_tail": tail}
  row["wall_s"] = time.perf_counter() - start
  return row


def summary_markdown(results: dict) -> str:
  facts = results["device"]
  lines = [
      f"# Device campaign: {facts['device_count']} x {facts['device_kind']} "
      f"({facts['platform']}), JAX {facts['jax']}, scale {results['scale']}",
      "",
  ]
  evals = {k: v for k, v in results["steps"].items() if k.endswith("_eval")}
  if evals:
    lines += [
        "| step | model | auto batch | compile s | s/puzzle b=0 | s/puzzle b=30 | "
        "passes/s | peak GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in evals.items():
      if "error" in r:
        lines.append(f"| {name} | {r['error']} | | | | | | |")
        continue
      peak = r["peak_memory_bytes"]
      lines.append(
          f"| {name} | {r['model']} | {r['batch']} | {r['compile_s']:.1f} | "
          f"{r['s_per_puzzle_at_budget_0']:.3f} | {r['s_per_puzzle_at_budget_30']:.3f} "
          f"| {r['passes_per_s']:.0f} | {'-' if peak is None else f'{peak / 1e9:.1f}'} |"
      )
    lines.append("")
  for case, r in results["steps"].get("train", {}).items():
    if "error" in r:
      lines.append(f"- train {case}: {r['error']}")
    else:
      lines.append(
          f"- train {case}: {r['steps_per_s']:.2f} steps/s ({r['images_per_s']:.0f} "
          f"images/s), compile {r['compile_s']:.1f} s"
      )
  golden = results["steps"].get("golden")
  if golden and "error" not in golden:
    for case, row in golden.items():
      if not isinstance(row, dict):
        continue
      lines.append(
          f"- golden {case}: max abs error {row['default']['max_abs']:.2e} (default "
          f"precision), {row['highest']['max_abs']:.2e} (highest)"
      )
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _STEP.value:
    row = run_one(_STEP.value, flags.FLAGS.scale, flags.FLAGS.argument or "")
    print("STEP " + json.dumps(row), flush=True)
    return
  if not flags.FLAGS.out:
    raise app.UsageError("--out is required")
  unknown = set(_STEPS.value) - set(STEP_NAMES)
  if unknown:
    raise app.UsageError(f"unknown --steps {sorted(unknown)}; known: {', '.join(STEP_NAMES)}")
  out_dir = pathlib.Path(flags.FLAGS.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  results = {"device": device_check.device_facts(), "scale": flags.FLAGS.scale, "steps": {}}
  left = lambda: _DEADLINE.value - (time.time() - started)

  def write():
    results["seconds"] = time.time() - started
    (out_dir / "campaign.json").write_text(json.dumps(results, indent=2))
    (out_dir / "summary.md").write_text(summary_markdown(results))

  write()
  for step in STEP_NAMES:
    if step not in _STEPS.value:
      continue
    print(f"[{time.time() - started:.0f}s] {step} ...", flush=True)
    try:
      if step == "train":

        def report(rows):
          results["steps"]["train"] = dict(rows)
          write()

        train_step(flags.FLAGS.scale, lambda a: in_subprocess("train_case", a, left()), report)
      else:
        results["steps"][step] = in_subprocess(step, "", left())
    except Exception:  # pylint: disable=broad-except  (keep the other steps' numbers)
      results["steps"][step] = {"error": traceback.format_exc()[-2000:]}
    write()
  print(summary_markdown(results))
  print(f"wrote {out_dir}/campaign.json and summary.md ({time.time() - started:.0f} s)")


if __name__ == "__main__":
  flags.DEFINE_string("argument", None, "Internal: the step's argument.")
  app.run(main)
