r"""Makes tests/golden/sampler_family.npz: the SRM reference's own sampler family on small cases.

Runs the sampler code of the SRM reference (github.com/Chrixtar/SRM, `src/sampler/`:
fixed_sampler, sequential_adaptive_sampler, manual_sampler with
time_scheduler/graph_sequential; commit ca9da2d) unchanged, in float32 on the CPU, with a
small deterministic denoiser written here (`ToyModel`, the same formulas as
tests/test_sampler_family.py's `toy_denoiser`) and the reference's own rectified flow. Nothing
of the reference is copied into ipr-jax; this script imports it from a checkout:

    git clone https://github.com/Chrixtar/SRM /tmp/srm && git -C /tmp/srm checkout ca9da2d
    pip install torch==2.13.0 jaxtyping
    python tests/golden/make_sampler_family.py --srm_repo=/tmp/srm
    python tests/golden/make_sampler_family.py --srm_repo=/tmp/srm --cases=repeats

The first writes sampler_family.npz (every sampler of the family), the second
sampler_family_repeats.npz: graph_sequential schedules whose block starts repeat (two blocks
starting at one step) and whose planning stops at max_steps blocks (fewer steps than unknown
patches: the patches left unplanned start at step 0).

Only what cannot run without the reference's training stack is replaced: `src.model` (whose
package __init__ imports the Lightning wrapper) is a bare package with a `Wrapper` placeholder,
and `torch.randperm` is the identity while the samplers run, so that the graph scheduler's random
tie break takes the lowest patch index (the tests give the JAX planner that tie order).

Every case runs one puzzle at a time (batch 1: the reference plans a batch's puzzles jointly,
see ipr_jax/sampling/planning.py), with alpha = 0 (DDIM; the only noise is the reference's
~3e-7 clamp noise) so that the JAX sampler can be compared step by step.
"""

import argparse
import json
import pathlib
import sys
import types

import numpy as np
import torch

GRID = 4  # 4x4 patch grid (a 4x4 Sudoku, box 2)
PATCH = 3  # patch side in pixels
CHANNELS = 1
IMAGE = GRID * PATCH


def toy_arrays(seed: int = 0) -> dict[str, np.ndarray]:
  """The toy denoiser's fixed arrays, [H, W] float32 each (stored in the golden file)."""
  rng = np.random.default_rng(seed)
  arrays = {
      name: rng.normal(0, scale, (IMAGE, IMAGE)).astype(np.float32)
      for name, scale in (("a", 0.5), ("b", 0.7), ("c", 0.4), ("d", 0.6), ("e", 0.8), ("f", 1.5))
  }
  # Per-patch log-variance offsets, patch-constant: spread the patches' uncertainties.
  offsets = rng.normal(0, 1.0, (GRID, GRID)).astype(np.float32)
  arrays["g"] = np.kron(offsets, np.ones((PATCH, PATCH), np.float32))
  return arrays


class ToyModel:
  """What the reference samplers call of a model: `forward`, `flow`, `cfg`, `device`, `d_data`.

  u = tanh(a z + b t + c), v = (tanh(d z) + 1) / 2, and a patch-constant log-variance
  l = avgpool_P(e z + f t + g), sigma = exp(l / 2): sigma depends on the state, so the adaptive
  order depends on the sampling so far.
  """

  def __init__(self, arrays, flow):
    self.w = {k: torch.from_numpy(v) for k, v in arrays.items()}
    self.flow = flow
    self.device = torch.device("cpu")
    self.d_data = CHANNELS
    self.cfg = types.SimpleNamespace(
        patch_size=PATCH,
        model=types.SimpleNamespace(parameterization="ut", time_interval=[0.0, 1.0]),
        conditioning=types.SimpleNamespace(label=False, mask=True),
    )

  def forward(self, z_t, t, label=None, c_cat=None, sample=True, use_ema=True):
    del label, c_cat, sample, use_ema
    w = self.w
    u = torch.tanh(w["a"] * z_t + w["b"] * t + w["c"])
    v = (torch.tanh(w["d"] * z_t) + 1) / 2
    raw = w["e"] * z_t.mean(dim=2, keepdim=True) + w["f"] * t + w["g"]
    shape = raw.shape
    pooled = torch.nn.functional.avg_pool2d(raw.reshape(-1, 1, IMAGE, IMAGE), PATCH)
    logvar = torch.kron(pooled, torch.ones(PATCH, PATCH)).reshape(shape)
    return u, v, torch.exp(0.5 * logvar)


def sudoku_dependency() -> np.ndarray:
  """The 4x4 Sudoku dependency matrix (same row, column or box; no self-dependency)."""
  side, box = GRID, 2
  row, col = np.divmod(np.arange(side * side), side)
  cell_box = (row // box) * box + col // box
  related = (
      (row[:, None] == row[None])
      | (col[:, None] == col[None])
      | (cell_box[:, None] == cell_box[None])
  )
  return (related & ~np.eye(side * side, dtype=bool)).astype(np.float32)


def import_reference(srm_repo: pathlib.Path):
  """The reference's sampler and flow modules, imported from the checkout."""
  sys.path.insert(0, str(srm_repo))
  model_pkg = types.ModuleType("src.model")
  model_pkg.__path__ = [str(srm_repo / "src" / "model")]
  model_pkg.Wrapper = object
  sys.modules["src.model"] = model_pkg
  import src.model.flow as flow_lib  # pylint: disable=import-outside-toplevel
  import src.sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  from src.sampler import time_scheduler  # pylint: disable=import-outside-toplevel

  return flow_lib, sampler_lib, time_scheduler


def masks_with_counts(seed: int, counts) -> np.ndarray:
  """`[len(counts), N]` float32 unknown-patch rows with counts[i] unknown patches in row i."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((len(counts), GRID * GRID), np.float32)
  for i, count in enumerate(counts):
    rows[i, rng.permutation(GRID * GRID)[:count]] = 1.0
  return rows


def masks(seed: int, num: int) -> np.ndarray:
  """`[num, N]` float32 unknown-patch rows with 6..14 unknown patches each."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((num, GRID * GRID), np.float32)
  for i in range(num):
    rows[i, rng.permutation(GRID * GRID)[: rng.integers(6, 15)]] = 1.0
  return rows


def to_pixels(rows: np.ndarray) -> np.ndarray:
  """`[B, N]` -> `[B, 1, H, W]`."""
  grid = rows.reshape(-1, 1, GRID, GRID)
  return np.kron(grid, np.ones((PATCH, PATCH), np.float32)).astype(np.float32)


def _graph(max_steps: int, max_order: int, overlap: float) -> dict:
  return dict(
      name="manual",
      max_steps=max_steps,
      time_scheduler=dict(name="graph_sequential", max_order=max_order, inference_overlap=overlap),
  )


# --cases=repeats: (settings, unknown-patch counts of its 3 puzzles). Block starts repeat at
# overlap 0.75 with L = 3 (max_steps 14, n = 12..14: starts 0, 0, 1, 2, 3, 3, ...); max_steps 8
# < n plans 8 blocks (overlap 0.75: L = 2, starts 0, 0, 1, 1, ...; overlap 0: L = 1, starts
# 0..7, the last on the final zero row) and leaves the other patches at start step 0.
REPEAT_CASES = {
    "graph_seq075_repeat": (_graph(14, 2, 0.75), (12, 13, 14)),
    "random_seq075_truncated": (_graph(8, 0, 0.75), (10, 12, 14)),
    "graph_seq000_truncated": (_graph(8, 1, 0.0), (10, 12, 14)),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--srm_repo", required=True, type=pathlib.Path)
  parser.add_argument("--cases", choices=("family", "repeats"), default="family")
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if args.out is None:
    name = "sampler_family.npz" if args.cases == "family" else "sampler_family_repeats.npz"
    args.out = pathlib.Path(__file__).parent / name
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(2)
  flow_lib, sampler_lib, time_scheduler = import_reference(args.srm_repo)
  flow = flow_lib.RectifiedFlow(
      flow_lib.RectifiedFlowCfg(name="rectified", variance="learned_range"), "ut"
  )
  arrays = toy_arrays()
  model = ToyModel(arrays, flow)
  dependency = sudoku_dependency()
  torch.randperm = lambda n, device=None, **kw: torch.arange(n, device=device)

  if args.cases == "repeats":
    rows = np.concatenate(
        [masks_with_counts(seed=4 + i, counts=c) for i, (_, c) in enumerate(REPEAT_CASES.values())]
    )
    rng = np.random.default_rng(5)
  else:
    rows = masks(seed=1, num=3)
    rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (len(rows), CHANNELS, IMAGE, IMAGE)).astype(np.float32)
  noises = rng.standard_normal((len(rows), CHANNELS, IMAGE, IMAGE)).astype(np.float32)
  # Each case: (settings, the indices of its puzzles in rows).
  cases = {
      "fixed": dict(name="fixed", max_steps=12),
      "random_seq000": dict(
          name="manual",
          max_steps=40,
          time_scheduler=dict(name="graph_sequential", max_order=0, inference_overlap=0.0),
      ),
      "random_seq075": dict(
          name="manual",
          max_steps=40,
          time_scheduler=dict(name="graph_sequential", max_order=0, inference_overlap=0.75),
      ),
      "graph_seq000": dict(
          name="manual",
          max_steps=40,
          time_scheduler=dict(name="graph_sequential", max_order=1, inference_overlap=0.0),
      ),
      "graph_seq075": dict(
          name="manual",
          max_steps=40,
          time_scheduler=dict(name="graph_sequential", max_order=2, inference_overlap=0.75),
      ),
      "adaptive_top1": dict(name="sequential_adaptive", max_steps=30, top_k=1, overlap=0.0),
      "adaptive_top2": dict(name="sequential_adaptive", max_steps=30, top_k=2, overlap=0.5),
      "adaptive_top3": dict(name="sequential_adaptive", max_steps=25, top_k=3, overlap=0.0),
  }
  cases = {case: (settings, range(len(rows))) for case, settings in cases.items()}
  if args.cases == "repeats":
    cases = {
        case: (settings, range(3 * i, 3 * i + 3))
        for i, (case, (settings, _)) in enumerate(REPEAT_CASES.items())
    }
  out = {f"toy/{k}": v for k, v in arrays.items()}
  out.update(unknown=rows, image=images, noise=noises, dependency=dependency)
  for case, (settings, puzzles) in cases.items():
    settings = dict(settings, alpha=0.0, temperature=1.0, use_ema=False)
    if settings["name"] == "fixed":
      cfg = sampler_lib.FixedSamplerCfg(**settings)
    elif settings["name"] == "manual":
      cfg = sampler_lib.ManualSamplerCfg(
          **{
              **settings,
              "time_scheduler": time_scheduler.GraphSequentialCfg(**settings["time_scheduler"]),
          }
      )
    else:
      cfg = sampler_lib.SequentialAdaptiveSamplerCfg(**settings)
    sampler = sampler_lib.get_sampler(cfg, PATCH, (GRID, GRID), torch.from_numpy(dependency))
    samples, times = [], []
    for i in puzzles:
      mask = torch.from_numpy(to_pixels(rows[i : i + 1]))
      masked = (1 - mask) * torch.from_numpy(images[i : i + 1])
      torch.manual_seed(0)
      res = sampler.sample(
          model,
          z_t=torch.from_numpy(noises[i : i + 1]),
          mask=mask,
          masked=masked,
          return_intermediate=True,
          return_time=True,
      )
      samples.append(res["sample"].numpy())
      # [steps + 1, 1, H, W] -> patch times [steps + 1, N]
      t = res["all_t"][0].numpy()[:, 0, ::PATCH, ::PATCH].reshape(len(res["all_t"][0]), -1)
      times.append(t)
    out[f"{case}/sample"] = np.concatenate(samples)
    if args.cases == "repeats":  # Its puzzles' rows of `unknown`, `image` and `noise`.
      out[f"{case}/puzzles"] = np.array(list(puzzles), np.int64)
    for i, t in enumerate(times):
      out[f"{case}/t_rows/{i}"] = t.astype(np.float32)
    if settings["name"] == "manual":  # The planned schedules alone, for more masks.
      plan_rows = masks(seed=3, num=12)
      for i, row in enumerate(plan_rows):
        matrix = sampler.time_scheduler.get_scheduling_matrix(
            1, torch.device("cpu"), torch.from_numpy(to_pixels(row[None]))
        )
        out[f"{case}/plan_unknown/{i}"] = row
        out[f"{case}/plan_matrix/{i}"] = matrix[:, 0].numpy()
    out[f"{case}/config_json"] = np.array(json.dumps(settings))
  out["config_json"] = np.array(
      json.dumps(
          {
              "reference": "Chrixtar/SRM ca9da2d src/sampler",
              "torch": torch.__version__,
              "grid": GRID,
              "patch": PATCH,
              "channels": CHANNELS,
              "flow": "rectified, learned_range, ut",
              "tie_break": "torch.randperm replaced by arange: lowest patch index",
          }
      )
  )
  np.savez_compressed(args.out, **out)
  print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(out)} arrays)")


if __name__ == "__main__":
  main()
