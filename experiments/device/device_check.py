r"""One accelerator check: forward agreement, sampler and training throughput, FLOPs.

  python experiments/device/device_check.py --out=device_check         # one GPU or TPU, < 9 min
  python experiments/device/device_check.py --scale=tiny --out=/tmp/dc # CPU smoke test (tests)

On a machine without ml-collections (the workplace's device image), bring its wheel along:
  pip download ml-collections --no-deps -d .whl                        # here (git-ignored)
  pip install --no-deps .whl/ml_collections-*.whl \
      && python experiments/device/device_check.py --out=$OUT          # there
(tensorflow-datasets is not needed: the Sudoku digits come from the bundled file.)

Sections, in this order (each written to OUT/device_check.json as soon as it is measured, so a run
cut short keeps what it had; OUT/summary.md is the readable form):

  forward  float32 and bfloat16 forwards of the paper U-Nets (unet_32 on 32x32x3, unet_256 on
           252x252x1) with random non-zero weights: the bf16 error relative to float32; the golden
           U-Net cases of tests/golden (the reference's own float32 outputs) at the default and at
           "highest" matmul precision; XLA's FLOP count of one forward per image.
  sampler  SRM + IPR through `runner.Evaluator` (the evaluation binary's path: real test
           puzzles, scoring, pmap) on random non-zero weights in bf16: ms_hard_test with unet_256
           at batch 1, 16, 64 and ep_test with unet_32 at batch 1, 64, 256. The IPR budget is cut
           to `--sampler_budget` to fit the time; the time at the paper's budget 30 is
           extrapolated from the measured denoiser passes per second and the passes the paper's
           budget takes (the per-budget pass counts come from the sampler itself).
  train    the training step (`train_step.pmapped_train_step`, bf16 U-Net) at the paper's batch
           sizes, each in its own process so that its peak memory is its own and an
           out-of-memory stops only that case: unet_32 at 256 and 2048 (Even Pixels), unet_256 at
           28 and 56 (Sudoku).

The reference's figures these are compared with (PyTorch, one H100 80 GB, bf16 autocast, random
weights): 85.8 s per hard Sudoku puzzle (1,323 passes of unet_256), 117.9 s per Even Pixels image
(2,469 passes of unet_32), Even Pixels training at batch 256: 1,341 images/s.
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
import jax.numpy as jnp
import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(_ROOT / "tests"))  # golden_io

from ipr_jax import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax.data import geometry  # pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax.evaluation import runner  # pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax.models import unet  # pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax.training import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from ipr_jax.training import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", None, "Output folder (device_check.json, summary.md).")
_SCALE = flags.DEFINE_enum(
    "scale",
    "full",
    ["full", "tiny"],
    "full: the paper's models and batch sizes; tiny: a CPU smoke test.",
)
_SECTIONS = flags.DEFINE_list("sections", ["forward", "sampler", "train"], "Sections to run.")
_SAMPLER_BUDGET = flags.DEFINE_integer("sampler_budget", 2, "IPR iterations actually run.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed training steps per case.")
_TRAIN_TIMEOUT = flags.DEFINE_integer("train_timeout_s", 150, "Limit per training case.")
_TRAIN_CASE = flags.DEFINE_string(
    "train_case",
    None,
    "Internal: run one training case " "('config_spec@batch') and print its JSON.",
)

# The paper's IPR budget, to which sampler times are extrapolated.
PAPER_BUDGET = 30

# (config spec, image batch) per section and scale. Config specs are relative to configs/. The
# tiny scale is a smoke test of the code paths on CPU: the demo's 4x4 Sudoku with a smaller U-Net.
_FORWARD = {
    "full": [("even_pixels.py", 8), ("mnist_sudoku.py", 2)],
    "tiny": [("mnist_sudoku.py:demo", 2)],
}
_GOLDEN_CASES = {"full": ("ms", "ep"), "tiny": ("ep",)}
_SAMPLER = {
    "full": [
        ("mnist_sudoku.py:ms_hard_test", (1, 16, 64)),
        ("even_pixels.py:ep_test", (1, 64, 256)),
    ],
    "tiny": [("mnist_sudoku.py:demo", (1, 2))],
}
_TRAIN = {
    "full": [
        ("even_pixels.py", 256),
        ("even_pixels.py", 2048),
        ("mnist_sudoku.py", 28),
        ("mnist_sudoku.py", 56),
    ],
    "tiny": [("even_pixels.py:tiny", 4)],
}


def load_config(spec: str, dtype: str, scale: str):
  """configs/<spec> with the U-Net computing in `dtype` (and shrunk at the tiny scale)."""
  config = config_base.load_config(f"{_ROOT / 'configs'}/{spec}")
  config.model.dtype = dtype
  if scale == "tiny":
    config_base.use_tiny_model(config, hid_dims=(16, 16), attention=(False, True))
    config.model.num_head_channels = 16
    config.model.t_emb_dim = 32
    config.model.d_emb = 16
    config.model.dtype = dtype
  return config


def device_facts() -> dict:
  device = jax.devices()[0]
  return {
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
  }


def peak_memory_bytes():
  """Peak bytes in use on device 0 so far (None where the backend does not report it)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of a compiled program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def relative_error(ours, reference) -> dict:
  ours = np.asarray(ours, np.float64)
  reference = np.asarray(reference, np.float64)
  diff = ours - reference
  return {
      "max_abs": float(np.abs(diff).max()),
      "rel_rms": float(np.sqrt(np.mean(diff**2) / max(np.mean(reference**2), 1e-30))),
  }


# ------------------------------------------------------------------------------------------------
# Sections.
# ------------------------------------------------------------------------------------------------


def check_forward(scale: str) -> dict:
  """bf16 vs float32 on the task U-Nets; float32 vs the golden outputs; FLOPs per image."""
  out = {}
  for spec, batch in _FORWARD[scale]:
    config = load_config(spec, "float32", scale)
    shape = geometry.image_shape(config)
    f32_model = build.make_model(config)
    bf16_model = f32_model.clone(dtype=jnp.bfloat16)
    params = unet.nonzero_init(f32_model, shape, jax.random.key(0))
    key_z, key_t = jax.random.split(jax.random.key(1))
    z = jax.random.normal(key_z, (batch, *shape))
    t = jax.random.uniform(key_t, (batch, *shape[:2], 1))
    f32_forward = jax.jit(f32_model.apply).lower({"params": params}, z, t).compile()
    f32 = f32_forward({"params": params}, z, t)
    bf16 = jax.jit(bf16_model.apply)({"params": params}, z, t)
    with jax.default_matmul_precision("highest"):
      highest = jax.jit(f32_model.apply)({"params": params}, z, t)
    out[config.model.name + f"@{shape[0]}x{shape[1]}x{shape[2]}"] = {
        "bf16_vs_f32": relative_error(bf16, f32),
        "f32_default_vs_highest": relative_error(f32, highest),
        "flops_per_image": compiled_flops(f32_forward) / batch,
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
    }
  out["golden"] = check_golden(_GOLDEN_CASES[scale])
  return out


def check_golden(cases) -> dict:
  """The reference's own float32 outputs (tests/golden) against ours at both precisions."""
  import golden_io  # pylint: disable=g-import-not-at-top
  from ipr_jax.conversion import state_dict as sd_lib  # pylint: disable=g-import-not-at-top

  nhwc = lambda x: np.transpose(x, (0, 2, 3, 1))
  out = {}
  for case in cases:
    arrays, _, state_dict, model = golden_io.load_golden_unet(case)
    params = sd_lib.unet_params_from_state_dict(state_dict, model)
    args = ({"params": params}, nhwc(arrays["z"]), nhwc(arrays["t"]))
    default = jax.jit(model.apply)(*args)
    with jax.default_matmul_precision("highest"):
      highest = jax.jit(model.apply)(*args)
    out[case] = {
        "default": relative_error(default, nhwc(arrays["raw"])),
        "highest": relative_error(highest, nhwc(arrays["raw"])),
    }
  return out


def passes_at(nfe_per_budget: np.ndarray, budget: int) -> float:
  """Mean passes per puzzle after `budget` IPR iterations, from the per-budget counts
  [B + 1, P] of a run with B >= 1 (every iteration of a puzzle costs the same)."""
  per_iteration = nfe_per_budget[1] - nfe_per_budget[0]
  return float(np.mean(nfe_per_budget[0] + budget * per_iteration))


def check_sampler(scale: str, budget: int, report) -> dict:
  out = {}
  for spec, batches in _SAMPLER[scale]:
    config = load_config(spec, "bfloat16", scale)
    config.ipr.budget = budget
    shape = geometry.image_shape(config)
    model = build.make_model(config)
    params = unet.nonzero_init(model.clone(dtype=jnp.float32), shape, jax.random.key(0))
    evaluator = runner.Evaluator(config, params)
    rows = []
    for batch in batches:
      indices = np.arange(batch)
      start = time.perf_counter()
      evaluator(indices)
      first_s = time.perf_counter() - start
      start = time.perf_counter()
      result = evaluator(indices)
      call_s = time.perf_counter() - start
      passes = float(result.nfe[-1].sum())
      per_puzzle_paper = passes_at(result.nfe, PAPER_BUDGET)
      passes_per_s = passes / call_s
      rows.append(
          {
              "batch": batch,
              "compile_s": first_s - call_s,
              "call_s": call_s,
              "puzzles_per_s": batch / call_s,
              "passes_per_s": passes_per_s,
              "passes_per_puzzle": passes / batch,
              "passes_per_puzzle_at_budget_30": per_puzzle_paper,
              # The batch's time at budget 30 over its size: the passes it would take at the
              # measured rate.
              "s_per_puzzle_at_budget_30": per_puzzle_paper / passes_per_s,
              "peak_memory_bytes": peak_memory_bytes(),
          }
      )
      out[f"{spec} {config.model.name}"] = rows
      report(out)
  return out


def run_train_case(case: str, scale: str) -> dict:
  """One training case, in this process: compile, then time `--train_steps` steps."""
  from flax import jax_utils  # pylint: disable=g-import-not-at-top

  spec, batch = case.rsplit("@", 1)
  config = load_config(spec, "bfloat16", scale)
  config.batch_size = int(batch)
  num_devices = jax.local_device_count()
  if config.batch_size % num_devices:
    raise ValueError(f"batch {batch} does not split over {num_devices} devices")
  per_device = config.batch_size // num_devices
  model = build.make_model(config)
  tx = build.make_optimizer(config)
  state_key, density_key = jax.random.split(jax.random.key(0))
  state = train_step.create_train_state(config, model, tx, state_key)
  task = tasks.get(config.task).make_data(config)
  weight_table = train_step.make_loss_weight_table(config, density_key)
  example_index = np.arange(config.batch_size, dtype=np.int32).reshape(num_devices, per_device)
  step_fn = train_step.pmapped_train_step(config, model, tx)
  state, task, weight_table = jax_utils.replicate((state, task, weight_table), axis_name="batch")
  start = time.perf_counter()
  # One compilation serves the timing and XLA's FLOP count of the step (per device).
  compiled = step_fn.lower(state, task, weight_table, example_index, None).compile()
  compile_s = time.perf_counter() - start
  step_flops = compiled_flops(compiled) * num_devices
  state, metrics = compiled(state, task, weight_table, example_index, None)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_TRAIN_STEPS.value):
    state, metrics = compiled(state, task, weight_table, example_index, None)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / _TRAIN_STEPS.value
  return {
      "model": config.model.name,
      "batch": config.batch_size,
      "compile_s": compile_s,
      "step_s": step_s,
      "images_per_s": config.batch_size / step_s,
      "loss": float(np.asarray(metrics["loss"])[0]),
      "flops_per_step": step_flops,
      "num_params": int(
          sum(x.size for x in jax.tree_util.tree_leaves(trainer.unreplicate(state.params)))
      ),
      "approx_tflops_per_s": step_flops / step_s / 1e12,
      "peak_memory_bytes": peak_memory_bytes(),
  }


def check_train(scale: str, report) -> dict:
  out = {}
  for spec, batch in _TRAIN[scale]:
    case = f"{spec}@{batch}"
    command = [
        sys.executable,
        __file__,
        f"--train_case={case}",
        f"--scale={scale}",
        f"--train_steps={_TRAIN_STEPS.value}",
    ]
    try:
      done = subprocess.run(
          command, capture_output=True, text=True, timeout=_TRAIN_TIMEOUT.value, check=False
      )
      lines = [line for line in done.stdout.splitlines() if line.startswith("TRAIN_CASE ")]
      if done.returncode == 0 and lines:
        out[case] = json.loads(lines[-1][len("TRAIN_CASE ") :])
      else:
        tail = (done.stderr or done.stdout)[-1500:]
        out[case] = {
            "error": "out of memory"
            if "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
            else f"exit {done.returncode}",
            "log_tail": tail,
        }
    except subprocess.TimeoutExpired:
      out[case] = {"error": f"timed out after {_TRAIN_TIMEOUT.value} s"}
    report(out)
  return out


# ------------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------------


def summary_markdown(results: dict) -> str:
  facts = results["device"]
  lines = [
      f"# Device check: {facts['device_count']} x {facts['device_kind']} "
      f"({facts['platform']}), JAX {facts['jax']}",
      "",
  ]
  forward = results.get("forward", {})
  if forward:
    lines += [
        "## Forward",
        "",
        "| U-Net | params | GFLOP/image | bf16 vs f32 rel. RMS | "
        "f32 default vs highest rel. RMS |",
        "|---|---|---|---|---|",
    ]
    for name, row in forward.items():
      if name == "golden":
        continue
      lines.append(
          f"| {name} | {row['num_params']:,} | {row['flops_per_image'] / 1e9:.1f} | "
          f"{row['bf16_vs_f32']['rel_rms']:.2e} | "
          f"{row['f32_default_vs_highest']['rel_rms']:.2e} |"
      )
    for case, row in forward.get("golden", {}).items():
      lines.append(
          f"\nGolden `{case}` (max abs error vs the reference): default precision "
          f"{row['default']['max_abs']:.2e}, highest {row['highest']['max_abs']:.2e}"
      )
    lines.append("")
  for name, rows in results.get("sampler", {}).items():
    lines += [
        f"## Sampler: {name} (budget {results['sampler_budget']} run, 30 extrapolated)",
        "",
        "| batch | compile s | call s | puzzles/s | passes/s | s/puzzle at budget 30 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
      lines.append(
          f"| {r['batch']} | {r['compile_s']:.1f} | {r['call_s']:.2f} | "
          f"{r['puzzles_per_s']:.2f} | {r['passes_per_s']:.0f} | "
          f"{r['s_per_puzzle_at_budget_30']:.3f} |"
      )
    lines.append("")
  train_rows = results.get("train", {})
  if train_rows:
    lines += [
        "## Training (bf16)",
        "",
        "| case | images/s | step s | compile s | peak GiB | " "~TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for case, r in train_rows.items():
      if "error" in r:
        lines.append(f"| {case} | {r['error']} | | | | |")
        continue
      peak = r["peak_memory_bytes"]
      lines.append(
          f"| {case} | {r['images_per_s']:.0f} | {r['step_s']:.3f} | "
          f"{r['compile_s']:.1f} | {'-' if peak is None else f'{peak / 2**30:.1f}'} | "
          f"{r['approx_tflops_per_s']:.1f} |"
      )
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _TRAIN_CASE.value:
    print("TRAIN_CASE " + json.dumps(run_train_case(_TRAIN_CASE.value, _SCALE.value)), flush=True)
    return
  if not _OUT.value:
    raise app.UsageError("--out is required")
  unknown = set(_SECTIONS.value) - {"forward", "sampler", "train"}
  if unknown:
    raise app.UsageError(f"unknown --sections {sorted(unknown)}; known: forward, sampler, train")
  out_dir = pathlib.Path(_OUT.value)
  out_dir.mkdir(parents=True, exist_ok=True)
  results = {
      "device": device_facts(),
      "scale": _SCALE.value,
      "sampler_budget": _SAMPLER_BUDGET.value,
  }
  started = time.time()

  def write():
    results["seconds"] = time.time() - started
    (out_dir / "device_check.json").write_text(json.dumps(results, indent=2))
    (out_dir / "summary.md").write_text(summary_markdown(results))

  write()
  for section in ("forward", "sampler", "train"):
    if section not in _SECTIONS.value:
      continue
    print(f"[{time.time() - started:.0f}s] {section} ...", flush=True)

    def report(partial, section=section):
      results[section] = partial
      write()

    try:
      if section == "forward":
        report(check_forward(_SCALE.value))
      elif section == "sampler":
        check_sampler(_SCALE.value, _SAMPLER_BUDGET.value, report)
      else:
        check_train(_SCALE.value, report)
    except Exception:  # pylint: disable=broad-except
      # Keep going: one failing section must not cost the others' numbers.
      results.setdefault("errors", {})[section] = traceback.format_exc()[-3000:]
      write()
  print(summary_markdown(results))
  print(f"wrote {out_dir}/device_check.json and summary.md ({time.time() - started:.0f} s)")


if __name__ == "__main__":
  app.run(main)
