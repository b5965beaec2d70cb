r"""What fits where: the compiled memory and FLOPs of the paper presets, without a device.

  python experiments/scale/fit_table.py --out=experiments/scale/fit_table.json [--only=ms,ep,cp]
  python experiments/scale/fit_table.py --programs=eval --redo   # measure the eval rows again

For each paper preset (MNIST Sudoku ms_hard_test with unet_256, Even Pixels ep_test with unet_32,
Counting Polygons cp_test with unet_128) it compiles, on whatever backend JAX has (the CPU here),
and records XLA's compiled analysis (`ipr_jax.evaluation.fit`):

- the evaluation program (SRM + IPR on one device's puzzles) at per-device batches 1 and 2, with
  the paper's random selection and with the uncertainty query (`ipr.selection=uncertainty`:
  a G x B denoiser batch), fitted linearly in the batch;
- the train step at per-device batches 1 and 2, plain and with `remat`;
- one denoiser forward at batch 1, with the time embedded per pixel (the reference's way) and per
  patch (`unet.level_time_patch`): FLOPs per pass, from the compiled program and from the lowered
  one (before XLA's optimisations, quick).

Each measurement is appended to the JSON file as soon as it is made (a long run can be stopped and
its finished rows kept; a rerun skips them), together with the compile time. `--markdown` turns
the JSON into the tables of experiments/README.md: the largest evaluation batch and training
batch per device that fit 16 GB (TPU v5e, Colab), 80 GB (H100) and 141 GB (H200) at the stated
headroom. The CPU backend's layouts and fusions differ from a GPU's or a TPU's: the bytes are an
estimate of the accelerator's, not a measurement on it.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(_ROOT))

from ipr_jax import build  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.build import config_base  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.data import geometry  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.evaluation import fit  # noqa: E402  pylint: disable=g-import-not-at-top

PRESETS = {
    "ms": ("configs/mnist_sudoku.py:ms_hard_test", (56,)),
    "ep": ("configs/even_pixels.py:ep_test", (256, 2048)),  # the 256; the config's 2048
    "cp": ("configs/counting_polygons.py:cp_test", (56,)),
}
MEMORIES_GB = {"TPU v5e / Colab (16 GB)": 16, "H100 (80 GB)": 80, "H200 (141 GB)": 141}
HEADROOM = 0.1
BATCHES = (1, 2)


def _config(name, **overrides):
  config = config_base.load_config(str(_ROOT / PRESETS[name][0]))
  with config.unlocked():
    for dotted, value in overrides.items():
      section, _, field = dotted.rpartition(".")
      (config[section] if section else config)[field] = value
  return config


def _forward_flops(config, per_patch: bool):
  """FLOPs of one denoiser pass at batch 1 (compiled and lowered) and the compile time."""
  model = build.make_model(config)
  if not per_patch:
    model = model.clone(time_patch_size=None)
  h, w, d = geometry.image_shape(config)
  params = fit.abstract_params(config)
  z = jax.ShapeDtypeStruct((1, h, w, d), jnp.float32)
  t = jax.ShapeDtypeStruct((1, h, w, 1), jnp.float32)
  apply = lambda p, z, t: model.apply({"params": p}, z, t)
  lowered = jax.jit(apply).lower(params, z, t)
  lowered_cost = lowered.cost_analysis()
  if isinstance(lowered_cost, (list, tuple)):
    lowered_cost = lowered_cost[0]
  cost = fit.analyse(apply, params, z, t)
  return {
      "flops_compiled": cost.flops,
      "flops_lowered": float(lowered_cost["flops"]),
      "bytes": cost.bytes,
      "compile_seconds": cost.compile_seconds,
  }


def _jobs(names):
  """(key, fn) of every measurement, most valuable first (remat last)."""
  jobs = []
  eval_cost = lambda n, b, **o: fit.eval_program_cost(_config(n, **o), b).__dict__
  train_cost = lambda n, b, **o: fit.train_step_cost(_config(n, **o), b).__dict__
  for name in names:
    for way, per_patch in (("per_patch", True), ("per_pixel", False)):
      jobs.append(
          (f"{name}/forward/{way}", lambda n=name, p=per_patch: _forward_flops(_config(n), p))
      )
    for b in BATCHES:
      jobs.append((f"{name}/eval/random/{b}", lambda n=name, b=b: eval_cost(n, b)))
    for b in BATCHES:
      jobs.append(
          (
              f"{name}/eval/uncertainty/{b}",
              lambda n=name, b=b: eval_cost(n, b, **{"ipr.selection": "uncertainty"}),
          )
      )
    for b in BATCHES:
      jobs.append((f"{name}/train/plain/{b}", lambda n=name, b=b: train_cost(n, b)))
  for name in names:
    for b in BATCHES:
      jobs.append((f"{name}/train/remat/{b}", lambda n=name, b=b: train_cost(n, b, remat=True)))
  return jobs


def _machine():
  commit = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      cwd=_ROOT,
      capture_output=True,
      text=True,
      check=False,
  ).stdout.strip()
  return {
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "commit": commit,
  }


def measure(out: pathlib.Path, names, programs=None, redo: bool = False) -> dict:
  """Measures the rows of `names` not yet in `out` (of the programs `programs`, e.g. ['eval'],
  if given; with `redo` those rows are measured again)."""
  record = json.loads(out.read_text()) if out.exists() else {"rows": {}}
  record["machine"] = _machine()
  for key, job in _jobs(names):
    if programs is not None and key.split("/")[1] not in programs:
      continue
    if key in record["rows"] and not redo:
      continue
    start = time.time()
    try:
      row = job()
    except Exception as e:  # pylint: disable=broad-except  (recorded, the next job runs)
      row = {"error": f"{type(e).__name__}: {e}"}
    row["wall_seconds"] = time.time() - start
    record["rows"][key] = row
    out.write_text(json.dumps(record, indent=1, sort_keys=True))
    print(key, json.dumps(row), flush=True)
  return record


def _fit(rows, prefix):
  points = [(b, rows.get(f"{prefix}/{b}", {}).get("bytes")) for b in BATCHES]
  if any(y is None for _, y in points):
    return None
  (b1, y1), (b2, y2) = points
  return fit.LinearFit.through(b1, y1, b2, y2)


def markdown(record: dict) -> str:
  """The fit table and the FLOPs table of `record`."""
  rows, lines = record["rows"], []
  m = record["machine"]
  lines.append(
      f"Backend {m['backend']} ({m['device']}, {m['cpu_count']} cores), jax {m['jax']}, "
      f"commit {m['commit']}; headroom {HEADROOM:.0%}."
  )
  lines.append("")
  header = "| preset | program | fixed GB | GB per puzzle/example | compile s |"
  header += "".join(f" fits {k} |" for k in MEMORIES_GB)
  lines += [header, "|" + "---|" * (5 + len(MEMORIES_GB))]
  for name in PRESETS:
    for program in ("eval/random", "eval/uncertainty", "train/plain", "train/remat"):
      model = _fit(rows, f"{name}/{program}")
      if model is None:
        continue
      seconds = max(rows[f"{name}/{program}/{b}"]["compile_seconds"] for b in BATCHES)
      cells = [
          str(model.largest(fit.memory_budget(gb * fit.GB, HEADROOM), cap=10**6))
          for gb in MEMORIES_GB.values()
      ]
      lines.append(
          f"| {name} | {program} | {model.fixed / fit.GB:.3f} | "
          f"{model.per_item / fit.GB:.4f} | {seconds:.0f} | " + " | ".join(cells) + " |"
      )
  lines += [
      "",
      "Paper training batch on ONE device: micro-batches `grad_accum_steps` = k (the "
      "smallest divisor of the batch whose micro-batch fits; the accumulated gradients add "
      "one copy of the parameters, estimated as a quarter of the step's argument bytes: "
      "parameters, EMA and Adam's two moments).",
      "",
      "| preset | global batch | program |" + "".join(f" k for {k} |" for k in MEMORIES_GB),
      "|---|---|---|" + "---|" * len(MEMORIES_GB),
  ]
  for name, (_, batches) in PRESETS.items():
    for batch, program in [(b, p) for b in batches for p in ("train/plain", "train/remat")]:
      model = _fit(rows, f"{name}/{program}")
      if model is None:
        continue
      params = rows[f"{name}/{program}/1"]["argument_bytes"] / 4
      cells = []
      for gb in MEMORIES_GB.values():
        budget = fit.memory_budget(gb * fit.GB, HEADROOM)
        k = fit.accumulation_steps(model, batch, budget, params)
        cells.append("none" if k is None else str(k))
      lines.append(f"| {name} | {batch} | {program} | " + " | ".join(cells) + " |")
  lines += [
      "",
      "| preset | time embedding | GFLOP per pass (compiled) | GFLOP (lowered) |" " compile s |",
      "|---|---|---|---|---|",
  ]
  for name in PRESETS:
    for way in ("per_pixel", "per_patch"):
      row = rows.get(f"{name}/forward/{way}")
      if row and "error" not in row:
        compiled = row["flops_compiled"]
        lines.append(
            f"| {name} | {way} | {compiled / 1e9 if compiled else float('nan'):.1f} | "
            f"{row['flops_lowered'] / 1e9:.1f} | {row['compile_seconds']:.0f} |"
        )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=str(_ROOT / "experiments" / "scale" / "fit_table.json"))
  parser.add_argument("--only", default="ms,ep,cp")
  parser.add_argument("--programs", default=None, help="only these, e.g. eval or eval,train")
  parser.add_argument("--redo", action="store_true", help="measure existing rows again")
  parser.add_argument("--markdown", action="store_true", help="print the tables of --out")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  if args.markdown:
    print(markdown(json.loads(out.read_text())))
    return
  programs = None if args.programs is None else args.programs.split(",")
  measure(out, [n.strip() for n in args.only.split(",") if n.strip()], programs, args.redo)


if __name__ == "__main__":
  main()
