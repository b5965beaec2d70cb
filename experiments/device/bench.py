r"""The one benchmark of a lent accelerator: the paper's programs, in steps of planned length.

  python experiments/device/bench.py --plan --device=h100      # the plan; nothing runs
  python experiments/device/bench.py --out=$OUT                # one GPU or TPU chip, <= 9 min
  python experiments/device/bench.py --scale=tiny --out=/tmp/b # every step in seconds, CPU
  python experiments/device/bench.py --summary=$OUT/bench.jsonl  # summary.md again from the rows

On the workplace's device machine (no ml-collections there; tensorflow-datasets is not needed),
the one command, ready to paste (docs/device.md):

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      experiments/device/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
      && python3 experiments/device/bench.py --out=$OUT

Steps, in order of value; each runs in its own process with its planned cap as its timeout (an
out-of-memory or a hang costs that step alone; time a step leaves unused goes to the next ones)
within `--deadline_s` for the whole run:

  preflight   every import and version (jax, jaxlib, flax, optax, orbax, chex, absl, numpy,
              ml_collections, tensorflow_datasets) and the devices, printed first.
  ms_eval     (a) MNIST Sudoku ms_hard_test, unet_256 in bf16 with random non-zero weights: a
              forward at batch 64 (ms per image, TFLOP/s: the reference's 7.51 ms), then the SRM +
              IPR program at the auto batch (the fit table's linear fit of the compiled bytes,
              `ipr_jax.evaluation.fit`, against the device's usable memory less the headroom;
              eval.num_puzzles set to the batch), compiled once, run once at budget 1: seconds per
              puzzle at budgets 0 and 30 extrapolated from that run (the row says so), predicted
              against the device's analysed and measured peak bytes.
  ep_eval     (b) Even Pixels ep_test with unet_32, the same.
  ep_cliff    (b) the 64-channel convolution cliff: the unet_32 forward at the default and other
              matmul precisions, one 64-channel 3x3 convolution at 32x32 in NHWC and NCHW, and the
              forward and the convolution again under each XLA flag of `--xla_flags_tried` (each
              in its own process, XLA_FLAGS set there).
  train_ms56, train_ep256, train_ep2048
              (c) training steps/s (`train_step.pmapped_train_step`, bf16) at the paper's batches
              on one device with the `grad_accum_steps` the fit table prescribes for its memory.
  golden      (d) the golden U-Net forwards (tests/golden) at the default and the highest matmul
              precision against the reference's float32 outputs.

Every measurement is one JSON line appended to OUT/bench.jsonl the moment it exists (flushed and
fsynced: a step cut by its timeout keeps its rows); the readable OUT/summary.md is written at the
end, and again from the rows with `--summary`. Compile time is kept apart from run time; peak
memory is the device's own counter (`memory_stats()['peak_bytes_in_use']`, None on the CPU).
The parent process never initialises a backend: on a GPU JAX preallocates 75% of the memory per
process, which each step's process must have for itself.

The reference (PyTorch, one H100, bf16): 85.8 s per hard 9x9 puzzle at budget 30 (1,323 passes),
14.5 s at budget 0, 117.9 s per Even Pixels image at budget 30; its forward 7.51 ms per 252x252
image at batch 64; Even Pixels training at batch 256: 1,341 images/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Optional

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIT_TABLE = ROOT / "experiments" / "scale" / "fit_table.json"
PAPER_BUDGET = 30
# IPR iterations the evaluation steps run: one, whose passes give the extrapolation to 0 and 30.
RUN_BUDGET = 1
# The fraction of a GPU's memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION's default).
GPU_USABLE = 0.75
# Card memory in bytes and the (compile, run) seconds planned per step, per device kind. The
# estimates: the compile of the unet_256 SRM + IPR program took 51 s alone on the 2-core CPU
# (fit table), a GPU's with its autotuning is taken as about as long; the run is the batch the
# step sizes to fit the time left (see `eval_step`); training compiles are the fit table's CPU
# times halved; each process's start and imports are about 8 s.
_EVAL_PLAN = {"preflight": (0, 25), "ms_eval": (85, 75), "ep_eval": (40, 40), "ep_cliff": (50, 30)}
_TRAIN_PLAN = {"train_ms56": (45, 10), "train_ep256": (15, 5), "train_ep2048": (15, 10)}
DEVICES: dict[str, dict[str, Any]] = {
    "h100": {"memory": 80 * 2**30, "plan": {**_EVAL_PLAN, **_TRAIN_PLAN, "golden": (10, 5)}},
    "h200": {"memory": 141 * 10**9, "plan": {**_EVAL_PLAN, **_TRAIN_PLAN, "golden": (10, 5)}},
    # The tiny scale on this CPU: generous caps, the run is bounded by --deadline_s.
    "tiny": {
        "memory": None,
        "plan": {
            "preflight": (0, 30),
            "ms_eval": (60, 60),
            "ep_eval": (60, 60),
            "ep_cliff": (60, 60),
            "train_ms56": (60, 30),
            "train_ep256": (60, 30),
            "train_ep2048": (60, 30),
            "golden": (30, 30),
        },
    },
}
STEPS = tuple(DEVICES["h100"]["plan"])
# (preset key of the fit table, config spec relative to configs/) per evaluation step and scale.
_EVAL = {
    "full": {
        "ms_eval": ("ms", "mnist_sudoku.py:ms_hard_test"),
        "ep_eval": ("ep", "even_pixels.py:ep_test"),
    },
    "tiny": {"ms_eval": ("ms", "mnist_sudoku.py:demo"), "ep_eval": ("ep", "even_pixels.py:tiny")},
}
# Image batch of the forward probe (the reference's 64 for Sudoku).
_FORWARD_BATCH = {"full": {"ms": 64, "ep": 2048}, "tiny": {"ms": 4, "ep": 8}}
# Denoiser passes of the longest schedule of a batch at budget RUN_BUDGET, to size the timed batch
# before compiling (hard 9x9: 3 per unknown cell, up to 81, + 2k + 8 per iteration, k = 20; Even
# Pixels: about 2,469 / 31 per budget, the reference's count). The run row has the true counts.
_PASSES_AT_RUN_BUDGET = {"ms": 291, "ep": 160}
# (preset key, config spec, global batch) of the training steps.
_TRAIN = {
    "full": {
        "train_ms56": ("ms", "mnist_sudoku.py", 56),
        "train_ep256": ("ep", "even_pixels.py", 256),
        "train_ep2048": ("ep", "even_pixels.py", 2048),
    },
    "tiny": {
        "train_ms56": ("ms", "mnist_sudoku.py:demo", 4),
        "train_ep256": ("ep", "even_pixels.py:tiny", 4),
        "train_ep2048": ("ep", "even_pixels.py:tiny", 8),
    },
}
_TRAIN_STEPS = {"full": 5, "tiny": 2}
# Tried against the default in ep_cliff, each in its own process (an unknown flag stops only it).
_XLA_FLAGS = {
    "full": [
        "--xla_gpu_force_conv_nhwc=true",
        "--xla_gpu_force_conv_nchw=true",
        "--xla_gpu_autotune_level=4",
    ],
    "tiny": ["--xla_cpu_enable_fast_math=true"],
}
_GOLDEN_CASES = {"full": ("ms", "ep"), "tiny": ("ep",)}
# The tiny scale's memory per device (the CPU reports none): small enough that the auto batch is
# a few puzzles.
_TINY_MEMORY_BYTES = 10_000_000


# ------------------------------------------------------------------------------------------------
# The rows.
# ------------------------------------------------------------------------------------------------


class Rows:
  """Appends JSON rows to a file, each flushed and fsynced as it is written."""

  def __init__(self, path: pathlib.Path, run: str, step: str):
    self.path, self.run, self.step = path, run, step

  def add(self, kind: str, **fields) -> dict:
    row = {"run": self.run, "step": self.step, "kind": kind, "time": time.time(), **fields}
    line = json.dumps(row, default=_jsonable)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line + "\n")
      f.flush()
      os.fsync(f.fileno())
    print(f"[{self.step}] {kind}: {line}", flush=True)
    return row


def _jsonable(x):
  try:
    return float(x) if getattr(x, "ndim", 1) == 0 else list(map(float, x))
  except (TypeError, ValueError):
    return str(x)


def read_rows(path: pathlib.Path, run: Optional[str] = None) -> list[dict]:
  """The rows of `path` of run `run` (default: the last run in it); a cut last line is skipped."""
  rows: list[dict] = []
  if not path.exists():
    return rows
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  if run is None and rows:
    run = rows[-1]["run"]
  return [r for r in rows if r.get("run") == run]


# ------------------------------------------------------------------------------------------------
# The plan.
# ------------------------------------------------------------------------------------------------


def plan(device: str, steps=STEPS) -> list[tuple[str, int, int, int]]:
  """(step, compile s, run s, cap s) of the steps to run on `device` ('h100', 'h200', 'tiny')."""
  table = DEVICES[device]["plan"]
  return [(s, *table[s], sum(table[s])) for s in steps]


def plan_text(device: str, steps=STEPS, deadline_s: float = 540.0) -> str:
  rows = plan(device, steps)
  lines = [f"Plan for {device} (seconds; each step's cap is its timeout):", ""]
  lines += ["| step | compile | run | cap |", "|---|---|---|---|"]
  lines += [f"| {s} | {c} | {r} | {cap} |" for s, c, r, cap in rows]
  total = sum(r[3] for r in rows)
  compile_total = sum(r[1] for r in rows)
  lines += [
      f"| total | {compile_total} | {total - compile_total} | {total} |",
      "",
      f"total {total} s = {total / 60:.1f} min, compilation included; deadline {deadline_s:.0f} s",
  ]
  return "\n".join(lines)


def device_kind_key(kind: str) -> str:
  """'h100', 'h200' or 'tiny' for a JAX device_kind (e.g. 'NVIDIA H100 80GB HBM3')."""
  kind = kind.lower()
  for key in ("h200", "h100"):
    if key in kind:
      return key
  return "h100"  # another accelerator: the H100's plan


# ------------------------------------------------------------------------------------------------
# The steps (run in the step's own process: these import JAX).
# ------------------------------------------------------------------------------------------------


def preflight(rows: Rows, scale: str) -> None:
  import importlib  # pylint: disable=g-import-not-at-top

  for name in (
      "jax",
      "jaxlib",
      "flax",
      "optax",
      "orbax.checkpoint",
      "chex",
      "absl",
      "numpy",
      "yaml",
      "ml_collections",
      "tensorflow_datasets",
      "ipr_jax",
  ):
    try:
      module = importlib.import_module(name)
      rows.add(
          "import",
          module=name,
          version=getattr(module, "__version__", None),
          path=str(getattr(module, "__file__", None)),
      )
    except Exception as e:  # pylint: disable=broad-except  (recorded: the device may lack it)
      rows.add("import", module=name, error=f"{type(e).__name__}: {e}")
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  rows.add(
      "devices",
      python=sys.version.split()[0],
      platform=device.platform,
      device_kind=device.device_kind,
      device_count=jax.device_count(),
      bytes_limit=_memory_stats(device).get("bytes_limit"),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      scale=scale,
  )


def _memory_stats(device) -> dict:
  try:
    return device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without statistics)
    return {}


def peak_bytes() -> Optional[int]:
  """Peak bytes in use on device 0 so far, the device's own counter (None on the CPU)."""
  import jax  # pylint: disable=g-import-not-at-top

  return _memory_stats(jax.devices()[0]).get("peak_bytes_in_use")


def usable_memory(scale: str) -> tuple[int, str]:
  """(bytes a process may use on device 0, where that number comes from)."""
  import jax  # pylint: disable=g-import-not-at-top

  if scale == "tiny":
    return _TINY_MEMORY_BYTES, "the tiny scale's limit"
  device = jax.devices()[0]
  limit = _memory_stats(device).get("bytes_limit")
  if limit:
    return int(limit), "the device's bytes_limit (on a GPU: JAX's preallocated 75%)"
  card = DEVICES[device_kind_key(device.device_kind)]["memory"]
  return int(card * GPU_USABLE), f"{GPU_USABLE:.0%} of the card's nominal memory"


def load_config(spec: str, dtype: str, scale: str):
  """configs/<spec> with the U-Net computing in `dtype` (shrunk further at the tiny scale)."""
  sys.path.insert(0, str(ROOT))
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

  config = config_base.load_config(f"{ROOT / 'configs'}/{spec}")
  if scale == "tiny":
    config_base.use_tiny_model(config, hid_dims=(16, 16), attention=(False, True))
    config.model.num_head_channels = 16
    config.model.t_emb_dim = 32
    config.model.d_emb = 16
  config.model.dtype = dtype
  return config


def _flops(compiled) -> Optional[float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _analysed_bytes(compiled) -> Optional[int]:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )


def _time_calls(fn, args, repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn(*args)` (after one untimed call)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _unet_forward(config, batch: int):
  """(jitted apply, its arguments) of the config's U-Net on `batch` random images."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from ipr_jax import build  # pylint: disable=g-import-not-at-top
  from ipr_jax.data import geometry  # pylint: disable=g-import-not-at-top
  from ipr_jax.models import unet  # pylint: disable=g-import-not-at-top

  shape = geometry.image_shape(config)
  model = build.make_model(config)
  params = unet.nonzero_init(model.clone(dtype=jnp.float32), shape, jax.random.key(0))
  key_z, key_t = jax.random.split(jax.random.key(1))
  z = jax.random.normal(key_z, (batch, *shape))
  t = jax.random.uniform(key_t, (batch, *shape[:2], 1))
  return jax.jit(lambda p, z, t: model.apply({"params": p}, z, t)), (params, z, t)


def forward_row(rows: Rows, config, batch: int, label: str, repeats: int = 5, **extra) -> dict:
  """Compiles and times the U-Net forward; one row: compile s, ms per image, TFLOP/s."""
  fn, args = _unet_forward(config, batch)
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  call_s = _time_calls(compiled, args, repeats)
  flops = _flops(compiled)
  return rows.add(
      "forward",
      variant=label,
      model=config.model.name,
      image_shape=list(args[1].shape[1:]),
      batch=batch,
      compile_s=compile_s,
      call_s=call_s,
      ms_per_image=1e3 * call_s / batch,
      gflop_per_image=None if flops is None else flops / batch / 1e9,
      tflop_per_s=None if flops is None else flops / call_s / 1e12,
      **extra,
  )


def _fit_table_rows() -> dict:
  return json.loads(FIT_TABLE.read_text())["rows"] if FIT_TABLE.exists() else {}


def _linear_fit(prefix: str):
  from ipr_jax.evaluation import fit  # pylint: disable=g-import-not-at-top

  rows = _fit_table_rows()
  points = [rows.get(f"{prefix}/{b}", {}) for b in fit.FIT_BATCHES]
  if any("bytes" not in p for p in points):
    return None, None
  (b1, b2), (p1, p2) = fit.FIT_BATCHES, points
  return fit.LinearFit.through(b1, p1["bytes"], b2, p2["bytes"]), p1


def eval_step(rows: Rows, name: str, scale: str, step_end: float) -> None:
  """One evaluation preset: the forward probe, the auto batch, one compile, one run."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ipr_jax import build  # pylint: disable=g-import-not-at-top
  from ipr_jax import sampling  # pylint: disable=g-import-not-at-top
  from ipr_jax.data import geometry  # pylint: disable=g-import-not-at-top
  from ipr_jax.evaluation import fit  # pylint: disable=g-import-not-at-top
  from ipr_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from ipr_jax.evaluation import settings as eval_settings  # pylint: disable=g-import-not-at-top
  from ipr_jax.models import unet  # pylint: disable=g-import-not-at-top

  key, spec = _EVAL[scale][name]
  config = load_config(spec, "bfloat16", scale)
  config.ipr.budget = RUN_BUDGET
  probe = forward_row(rows, config, _FORWARD_BATCH[scale][key], "default")

  # The auto batch: the largest whose predicted bytes fit the usable memory less the headroom.
  limit, source = usable_memory(scale)
  headroom = float(config.memory_headroom)
  budget = fit.memory_budget(limit, headroom)
  if scale == "full":
    model_fit, _ = _linear_fit(f"{key}/eval/random")
    fit_source = "experiments/scale/fit_table.json (XLA's analysis on the CPU backend)"
  else:  # no fit-table row for the tiny U-Net: fit.py's analysis here, at batches 1 and 2
    b1, b2 = fit.FIT_BATCHES
    cost = {b: fit.eval_program_cost(config, b).bytes for b in (b1, b2)}
    model_fit, fit_source = fit.LinearFit.through(b1, cost[b1], b2, cost[b2]), "fit.py here"
  memory_batch = max(1, model_fit.largest(budget))
  # The batch whose run fits the time left: the longest schedule's passes at the probe's rate.
  per_image_s = probe["call_s"] / probe["batch"]
  passes = _PASSES_AT_RUN_BUDGET[key]
  compile_estimate = DEVICES["tiny" if scale == "tiny" else _device_key()]["plan"][name][0]
  run_time = 0.7 * (step_end - time.time() - compile_estimate)
  time_batch = max(1, int(run_time / (passes * per_image_s))) if scale == "full" else memory_batch
  batch = min(memory_batch, time_batch)
  rows.add(
      "auto_batch",
      model=config.model.name,
      batch=batch,
      memory_batch=memory_batch,
      time_batch=time_batch,
      limited_by="memory" if batch == memory_batch else "time",
      limit_bytes=limit,
      limit_source=source,
      headroom=headroom,
      budget_bytes=budget,
      fit_fixed_bytes=model_fit.fixed,
      fit_per_puzzle_bytes=model_fit.per_item,
      fit_source=fit_source,
      predicted_bytes=model_fit(batch),
      predicted_bytes_at_memory_batch=model_fit(memory_batch),
      estimated_run_s=passes * per_image_s * batch,
  )

  with config.unlocked():
    config.eval.num_puzzles = max(int(config.eval.num_puzzles), batch)
    config.eval.batch_size = batch
  task = eval_settings.task_evaluation(config)
  shape = geometry.image_shape(config)
  params = unet.nonzero_init(
      build.make_model(config).clone(dtype=jnp.float32), shape, jax.random.key(0)
  )
  run = jax.jit(runner.make_run_fn(config, task), static_argnums=(5, 6))

  def arguments(b):
    indices = np.arange(b)
    inputs = task.inputs(config.eval.seed, indices)
    keys = sampling.puzzle_keys(jax.random.key(1), jnp.asarray(indices))
    noise = jax.random.normal(jax.random.key(2), (b, *task.image_shape))
    return (params, keys, noise, inputs["image"], inputs["mask"], 0, False)

  while True:  # compiled once per batch size; a second size only if the device's analysis says
    args = arguments(batch)
    start = time.perf_counter()
    compiled = run.lower(*args).compile()
    compile_s = time.perf_counter() - start
    analysed = _analysed_bytes(compiled)
    rows.add(
        "compile",
        batch=batch,
        compile_s=compile_s,
        analysed_bytes=analysed,
        predicted_bytes=model_fit(batch),
        budget_bytes=budget,
        flops=_flops(compiled),
    )
    if analysed is None or analysed <= budget or batch == 1:
      break
    batch = max(1, int(batch * budget / analysed))  # the device's program is larger: step down

  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args[:5]))
  call_s = time.perf_counter() - start
  nfe = np.asarray(out["nfe"], np.float64)  # [budget + 1, B] cumulative passes
  per_iteration = nfe[1] - nfe[0]
  at = lambda b: nfe[0] + b * per_iteration  # every IPR iteration of a puzzle costs the same
  # The batch runs in lockstep until its longest schedule ends: its time at budget b is the run's
  # time scaled by the longest schedule's passes at b over those run.
  batch_s = lambda b: call_s * float(at(b).max()) / float(nfe[-1].max())
  rows.add(
      "run",
      model=config.model.name,
      batch=batch,
      budget_run=RUN_BUDGET,
      call_s=call_s,
      image_passes_per_s=batch * float(nfe[-1].max()) / call_s,
      puzzle_passes_per_s=float(nfe[-1].sum()) / call_s,
      passes_per_puzzle_at_budget_0=float(at(0).mean()),
      passes_per_puzzle_at_budget_30=float(at(PAPER_BUDGET).mean()),
      max_passes_run=float(nfe[-1].max()),
      s_per_puzzle_at_budget_0=batch_s(0) / batch,
      s_per_puzzle_at_budget_30=batch_s(PAPER_BUDGET) / batch,
      extrapolated=(
          f"budgets 0 and 30 from the budget-{RUN_BUDGET} run: its time scaled by the longest "
          "schedule's passes (the sampler's own per-budget counts)"
      ),
      predicted_bytes=model_fit(batch),
      analysed_bytes=analysed,
      peak_bytes=peak_bytes(),
      valid_rate_random_weights=float(np.mean(np.asarray(out["scores"].get("valid", [0]))[-1])),
  )


def _device_key() -> str:
  import jax  # pylint: disable=g-import-not-at-top

  return device_kind_key(jax.devices()[0].device_kind)


def _conv_row(rows: Rows, batch: int, layout: str, label: str, repeats: int = 5, **extra) -> dict:
  """One 64 -> 64 channel 3x3 convolution at 32x32 in bf16, in `layout` ('NHWC' or 'NCHW')."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 64), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64), jnp.bfloat16)
  if layout == "NCHW":
    x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    numbers = ("NCHW", "OIHW", "NCHW")
  else:
    numbers = ("NHWC", "HWIO", "NHWC")
  fn = jax.jit(
      lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=numbers)
  )
  start = time.perf_counter()
  compiled = fn.lower(x, w).compile()
  compile_s = time.perf_counter() - start
  call_s = _time_calls(compiled, (x, w), repeats)
  flops = 2.0 * batch * 32 * 32 * 64 * 64 * 9
  return rows.add(
      "conv64",
      variant=label,
      layout=layout,
      batch=batch,
      compile_s=compile_s,
      call_s=call_s,
      tflop_per_s=flops / call_s / 1e12,
      **extra,
  )


def cliff_step(rows: Rows, scale: str, out_path: pathlib.Path, step_end: float) -> None:
  """The unet_32 forward and a 64-channel convolution under alternatives, each on one row."""
  import jax  # pylint: disable=g-import-not-at-top

  config = load_config(_EVAL[scale]["ep_eval"][1], "bfloat16", scale)
  batch = _FORWARD_BATCH[scale]["ep"]
  forward_row(rows, config, batch, "default")
  _conv_row(rows, batch, "NHWC", "default")
  _conv_row(rows, batch, "NCHW", "default")
  for precision in ("highest", "bfloat16"):
    with jax.default_matmul_precision(precision):
      forward_row(rows, config, batch, f"precision={precision}")
  for flag in _XLA_FLAGS[scale]:
    left = step_end - time.time()
    if left < 10:
      rows.add("xla_flag", flag=flag, error="skipped: no time left in the step")
      continue
    done = _run_step_process(
        "_cliff_flag",
        out_path,
        rows.run,
        scale,
        left,
        env={"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()},
        extra=[f"--flag={flag}"],
        step_name="ep_cliff",
    )
    rows.add("xla_flag", flag=flag, **done)


def cliff_flag_step(rows: Rows, scale: str, flag: str) -> None:
  """The default forward and the NHWC convolution under XLA_FLAGS (set by the caller)."""
  config = load_config(_EVAL[scale]["ep_eval"][1], "bfloat16", scale)
  batch = _FORWARD_BATCH[scale]["ep"]
  forward_row(rows, config, batch, flag, xla_flag=flag)
  _conv_row(rows, batch, "NHWC", flag, xla_flag=flag)


def accumulation_steps(key: str, batch: int, scale: str) -> tuple[int, str]:
  """(grad_accum_steps, why): the fit table's smallest k for this device's usable memory."""
  from ipr_jax.evaluation import fit  # pylint: disable=g-import-not-at-top

  if scale == "tiny":
    return 2, "the tiny scale exercises accumulation (k = 2)"
  model_fit, first = _linear_fit(f"{key}/train/plain")
  if model_fit is None:
    return 1, "no fit-table row"
  limit, source = usable_memory(scale)
  budget = fit.memory_budget(limit, 0.1)
  k = fit.accumulation_steps(model_fit, batch, budget, first["argument_bytes"] / 4)
  if k is None:
    return batch, f"no micro-batch fits {budget / 1e9:.1f} GB ({source}): one example at a time"
  return k, f"the fit table's smallest k for {budget / 1e9:.1f} GB ({source}, headroom 0.1)"


def train_step_case(rows: Rows, name: str, scale: str) -> None:
  """Training at the step's global batch on one device: compile, then timed steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import jax_utils  # pylint: disable=g-import-not-at-top

  from ipr_jax import build  # pylint: disable=g-import-not-at-top
  from ipr_jax import tasks  # pylint: disable=g-import-not-at-top
  from ipr_jax.training import train_step  # pylint: disable=g-import-not-at-top

  key, spec, batch = _TRAIN[scale][name]
  config = load_config(spec, "bfloat16", scale)
  config.batch_size = batch
  k, why = accumulation_steps(key, batch, scale)
  with config.unlocked():
    config.grad_accum_steps = k
    config.remat = scale == "tiny"
  rows.add("train_plan", model=config.model.name, batch=batch, grad_accum_steps=k, why=why)
  model, tx = build.make_model(config, training=True), build.make_optimizer(config)
  state_key, density_key = jax.random.split(jax.random.key(0))
  state = train_step.create_train_state(config, model, tx, state_key)
  task = tasks.get(config.task).make_data(config)
  table = train_step.make_loss_weight_table(config, density_key)
  devices = jax.local_devices()[:1]  # one device
  index = np.arange(batch, dtype=np.int32).reshape(1, batch)
  step_fn = train_step.pmapped_train_step(config, model, tx)
  state, task, table = jax_utils.replicate((state, task, table), devices)
  start = time.perf_counter()
  compiled = step_fn.lower(state, task, table, index, None).compile()
  compile_s = time.perf_counter() - start
  rows.add("train_compile", batch=batch, compile_s=compile_s, flops=_flops(compiled))
  state, metrics = compiled(state, task, table, index, None)
  jax.block_until_ready(metrics)
  steps = _TRAIN_STEPS[scale]
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, task, table, index, None)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  flops = _flops(compiled)
  rows.add(
      "train",
      model=config.model.name,
      batch=batch,
      grad_accum_steps=k,
      remat=bool(config.remat),
      steps_timed=steps,
      step_s=step_s,
      steps_per_s=1.0 / step_s,
      images_per_s=batch / step_s,
      tflop_per_s=None if flops is None else flops / step_s / 1e12,
      loss=float(np.asarray(metrics["loss"])[0]),
      peak_bytes=peak_bytes(),
  )


def golden_step(rows: Rows, scale: str) -> None:
  """The reference's own float32 outputs (tests/golden) against ours at both precisions."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(ROOT / "tests"))
  import golden_io  # pylint: disable=g-import-not-at-top

  from ipr_jax.conversion import state_dict as sd_lib  # pylint: disable=g-import-not-at-top

  nhwc = lambda x: np.transpose(x, (0, 2, 3, 1))
  for case in _GOLDEN_CASES[scale]:
    arrays, _, state_dict, model = golden_io.load_golden_unet(case)
    params = sd_lib.unet_params_from_state_dict(state_dict, model)
    args = ({"params": params}, nhwc(arrays["z"]), nhwc(arrays["t"]))
    reference = np.asarray(nhwc(arrays["raw"]), np.float64)
    for precision in ("default", "highest"):
      with jax.default_matmul_precision(precision):
        ours = np.asarray(jax.jit(model.apply)(*args), np.float64)
      diff = ours - reference
      rows.add(
          "golden",
          case=case,
          precision=precision,
          max_abs=float(np.abs(diff).max()),
          rel_rms=float(np.sqrt(np.mean(diff**2) / max(np.mean(reference**2), 1e-30))),
      )


def probe_step(rows: Rows, seconds: float) -> None:
  """For the tests: one row, then a hang (the parent's timeout must keep the row)."""
  rows.add("probe", note="written before the hang")
  time.sleep(seconds)
  rows.add("probe", note="never written when the cap is shorter than the hang")


def run_here(step: str, args) -> None:
  rows = Rows(pathlib.Path(args.jsonl), args.run, args.step_name or step)
  step_end = args.step_end or (time.time() + 600)
  if step == "preflight":
    preflight(rows, args.scale)
  elif step in ("ms_eval", "ep_eval"):
    eval_step(rows, step, args.scale, step_end)
  elif step == "ep_cliff":
    cliff_step(rows, args.scale, pathlib.Path(args.jsonl), step_end)
  elif step == "_cliff_flag":
    cliff_flag_step(rows, args.scale, args.flag)
  elif step.startswith("train_"):
    train_step_case(rows, step, args.scale)
  elif step == "golden":
    golden_step(rows, args.scale)
  elif step == "_probe":
    probe_step(rows, float(args.flag or 60))
  else:
    raise ValueError(f"unknown step {step!r}")


# ------------------------------------------------------------------------------------------------
# The parent: one process per step, each with its cap.
# ------------------------------------------------------------------------------------------------


def _run_step_process(
    step: str,
    jsonl: pathlib.Path,
    run: str,
    scale: str,
    timeout_s: float,
    env: Optional[dict] = None,
    extra=(),
    step_name: Optional[str] = None,
) -> dict:
  """Runs `step` in a fresh process; {'status', 'returncode', 'wall_s', 'log_tail'}."""
  command = [
      sys.executable,
      str(pathlib.Path(__file__).resolve()),
      f"--step={step}",
      f"--jsonl={jsonl}",
      f"--run={run}",
      f"--scale={scale}",
      f"--step_end={time.time() + timeout_s}",
      *extra,
  ]
  if step_name:
    command.append(f"--step_name={step_name}")
  start = time.perf_counter()
  try:
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=max(timeout_s, 1),
        check=False,
        env={**os.environ, **(env or {})},
    )
  except subprocess.TimeoutExpired as e:
    tail = (e.stderr or b"")[-1500:]
    tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    return {
        "status": f"timed out after {timeout_s:.0f} s (its rows so far are kept)",
        "returncode": None,
        "wall_s": time.perf_counter() - start,
        "log_tail": tail,
    }
  sys.stdout.write(done.stdout)
  tail = (done.stderr or "")[-1500:]
  oom = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
  status = "ok" if done.returncode == 0 else ("out of memory" if oom else f"exit {done.returncode}")
  return {
      "status": status,
      "returncode": done.returncode,
      "wall_s": time.perf_counter() - start,
      "log_tail": "" if status == "ok" else tail,
  }


def run_all(args) -> pathlib.Path:
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  jsonl = out / "bench.jsonl"
  run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
  steps = ["_probe"] if args.only_probe else [s for s in STEPS if s in (args.steps or STEPS)]
  if "preflight" not in steps and not args.only_probe:
    steps.insert(0, "preflight")
  parent = Rows(jsonl, run, "bench")
  started = time.time()
  device = args.device
  caps: dict[str, float] = {}
  for i, step in enumerate(steps):
    if i == 0 or not caps:
      if device == "auto":  # the plan of the device the preflight saw
        kinds = [r for r in read_rows(jsonl, run) if r["kind"] == "devices"]
        device = device_kind_key(kinds[0]["device_kind"]) if kinds else "auto"
      if device != "auto" or step != "preflight":
        caps = {
            s: cap
            for s, _, _, cap in plan(
                device if device != "auto" else "h100", [s for s in steps if s in STEPS]
            )
        }
        caps["_probe"] = args.probe_cap
        parent.add(
            "plan",
            device=device,
            scale=args.scale,
            deadline_s=args.deadline_s,
            steps=steps,
            caps=caps,
            argv=sys.argv[1:],
        )
        print(
            plan_text(
                device if device != "auto" else "h100",
                [s for s in steps if s in STEPS],
                args.deadline_s,
            ),
            flush=True,
        )
    cap = caps.get(step, DEVICES["h100"]["plan"]["preflight"][1])
    left = args.deadline_s - (time.time() - started)
    later = sum(caps.get(s, 0) for s in steps[i + 1 :])
    # The step's cap, and what earlier steps left unused, but never the later steps' caps.
    timeout = min(left, cap if step == "_probe" else max(cap, left - later))
    if timeout < 3:
      parent.add("step_end", name=step, status="skipped: no time left", wall_s=0.0)
      continue
    print(f"[{time.time() - started:.0f} s] {step} (timeout {timeout:.0f} s)", flush=True)
    extra = [f"--flag={args.probe_hang}"] if step == "_probe" else []
    done = _run_step_process(step, jsonl, run, args.scale, timeout, extra=extra)
    parent.add("step_end", name=step, timeout_s=timeout, **done)
  (out / "summary.md").write_text(summary_markdown(read_rows(jsonl, run)))
  print((out / "summary.md").read_text(), flush=True)
  print(f"wrote {jsonl} and {out / 'summary.md'} ({time.time() - started:.0f} s)")
  return out


# ------------------------------------------------------------------------------------------------
# The summary.
# ------------------------------------------------------------------------------------------------


def _gb(x) -> str:
  return "-" if x is None else f"{x / 1e9:.2f}"


def _f(x, spec=".3g") -> str:
  return "-" if x is None else format(x, spec)


def summary_markdown(rows: list[dict]) -> str:
  """The readable summary of one run's rows."""
  by = lambda kind, step=None: [
      r for r in rows if r["kind"] == kind and (step is None or r["step"] == step)
  ]
  lines = []
  devices = by("devices")
  if devices:
    d = devices[0]
    versions = {r["module"]: r.get("version") or r.get("error", "?") for r in by("import")}
    lines += [
        f"# Benchmark: {d['device_count']} x {d['device_kind']} ({d['platform']}), "
        f"scale {d['scale']}, run {rows[0]['run']}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
  else:
    lines += [f"# Benchmark, run {rows[0]['run'] if rows else '?'} (no preflight row)", ""]
  ends = by("step_end")
  if ends:
    lines += ["| step | status | wall s | timeout s |", "|---|---|---|---|"]
    for r in ends:
      lines.append(
          f"| {r['name']} | {r['status']} | {_f(r.get('wall_s'), '.0f')} | "
          f"{_f(r.get('timeout_s'), '.0f')} |"
      )
    lines.append("")
  runs = by("run")
  if runs:
    lines += [
        "## Evaluation (random non-zero weights, bf16; budgets 0 and 30 extrapolated from a "
        "budget-1 run)",
        "",
        "| step | model | batch (memory / time) | compile s | run s | s/puzzle b=0 | "
        "s/puzzle b=30 | image passes/s | predicted GB | analysed GB | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
      auto = next((a for a in by("auto_batch", r["step"])), {})
      comp = [c for c in by("compile", r["step"]) if c["batch"] == r["batch"]]
      lines.append(
          f"| {r['step']} | {r['model']} | {r['batch']} ({auto.get('memory_batch', '-')} / "
          f"{auto.get('time_batch', '-')}) | {_f(comp[-1]['compile_s'] if comp else None, '.1f')} "
          f"| {r['call_s']:.2f} | {r['s_per_puzzle_at_budget_0']:.4f} | "
          f"{r['s_per_puzzle_at_budget_30']:.4f} | {r['image_passes_per_s']:.0f} | "
          f"{_gb(r['predicted_bytes'])} | {_gb(r['analysed_bytes'])} | {_gb(r['peak_bytes'])} |"
      )
    lines.append("")
  forwards, convs = by("forward"), by("conv64")
  if forwards or convs:
    lines += [
        "## Forwards and the 64-channel convolution",
        "",
        "| step | what | variant | batch | compile s | ms per image / call | TFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in forwards:
      lines.append(
          f"| {r['step']} | {r['model']} forward | {r['variant']} | {r['batch']} | "
          f"{r['compile_s']:.1f} | {r['ms_per_image']:.4f} | {_f(r['tflop_per_s'], '.2f')} |"
      )
    for r in convs:
      lines.append(
          f"| {r['step']} | conv 64->64 3x3 32x32 {r['layout']} | {r['variant']} | {r['batch']} "
          f"| {r['compile_s']:.1f} | {1e3 * r['call_s']:.3f} ms | {r['tflop_per_s']:.2f} |"
      )
    for r in by("xla_flag"):
      if r.get("status") != "ok":
        lines.append(f"\nXLA flag `{r['flag']}`: {r.get('status') or r.get('error')}")
    lines.append("")
  trains = by("train")
  if trains or by("train_plan"):
    lines += [
        "## Training (bf16, one device)",
        "",
        "| step | model | batch | grad_accum_steps | steps/s | images/s | TFLOP/s | peak GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in trains:
      lines.append(
          f"| {r['step']} | {r['model']} | {r['batch']} | {r['grad_accum_steps']} | "
          f"{r['steps_per_s']:.2f} | {r['images_per_s']:.0f} | {_f(r['tflop_per_s'], '.1f')} | "
          f"{_gb(r['peak_bytes'])} |"
      )
    lines.append("")
  goldens = by("golden")
  if goldens:
    lines += ["## Golden forwards (against the reference's float32)", ""]
    lines += ["| case | precision | max abs | rel. RMS |", "|---|---|---|---|"]
    for r in goldens:
      lines.append(f"| {r['case']} | {r['precision']} | {r['max_abs']:.2e} | {r['rel_rms']:.2e} |")
    lines.append("")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="folder for bench.jsonl and summary.md")
  parser.add_argument("--scale", choices=("full", "tiny"), default="full")
  parser.add_argument(
      "--device",
      choices=("auto", "h100", "h200", "tiny"),
      default="auto",
      help="the plan's device kind (auto: from the first step's device)",
  )
  parser.add_argument("--plan", action="store_true", help="print the plan and stop")
  parser.add_argument("--deadline_s", type=float, default=540.0)
  parser.add_argument(
      "--steps",
      type=lambda s: s.split(","),
      default=None,
      help=f"a subset of {','.join(STEPS)} (preflight always runs)",
  )
  parser.add_argument("--summary", help="a bench.jsonl: write summary.md beside it and stop")
  # Internal: one step in this process.
  parser.add_argument("--step", help=argparse.SUPPRESS)
  parser.add_argument("--step_name", help=argparse.SUPPRESS)
  parser.add_argument("--jsonl", help=argparse.SUPPRESS)
  parser.add_argument("--run", help=argparse.SUPPRESS)
  parser.add_argument("--step_end", type=float, help=argparse.SUPPRESS)
  parser.add_argument("--flag", help=argparse.SUPPRESS)
  parser.add_argument("--only_probe", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--probe_cap", type=float, default=10.0, help=argparse.SUPPRESS)
  parser.add_argument("--probe_hang", type=float, default=60.0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps:
    unknown = set(args.steps) - set(STEPS)
    if unknown:
      parser.error(f"unknown --steps {sorted(unknown)}; known: {', '.join(STEPS)}")
  if args.step:
    sys.path.insert(0, str(ROOT))
    run_here(args.step, args)
    return
  if args.summary:
    path = pathlib.Path(args.summary)
    (path.parent / "summary.md").write_text(summary_markdown(read_rows(path)))
    print((path.parent / "summary.md").read_text())
    return
  device = "tiny" if args.scale == "tiny" else args.device
  if args.plan:
    print(plan_text("h100" if device == "auto" else device, args.steps or STEPS, args.deadline_s))
    return
  if not args.out:
    parser.error("--out is required")
  args.device = device
  run_all(args)


if __name__ == "__main__":
  main()
