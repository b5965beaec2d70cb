"""Which of the model's own scores tells a valid chain from a broken one (issue 32's first pilot).

    python experiments/chain_scores_pilot.py run --preset=demo,ms_unique_test --out=unique.npz
    python experiments/chain_scores_pilot.py analyse unique.npz hard.npz
    python experiments/chain_scores_pilot.py run --preset=demo,ms_unique_test --num_puzzles=128 \
        --chains=6 --budget=0 --save_samples --out=unique_k6_b0.npz
    python experiments/chain_scores_pilot.py agreement unique_k6_b0.npz

`run`: K independent SRM + IPR chains (the paper's IPR, `--budget` iterations) on the first
`--num_puzzles` puzzles of eval seed 36 (the selection seed), chain 0 with the evaluation's keys
and noise, chain c > 0 with keys and noise folded from them; then, for each chain's final grid,
the uncertainty query (NLL) of every cell, given ones included, with G = 4 groups and with
G = 16 (one cell at a time). Saves per chain the query scores, the passes and, for this analysis
only, the validity after every budget as the digit classifier reads it (nothing here decides
with it). `analyse`: how often choosing the chain with the lowest score of each aggregate (mean
over the generated cells, over every cell, over the given cells, the balanced mean of the two,
the largest cell score) gives a valid grid, against the best possible choice, and the
within-puzzle AUC (puzzles with valid and broken chains: the chance that a valid chain scores
lower than a broken one). `agreement` (needs `--save_samples`): choosing instead the chain that
agrees with most other chains of its puzzle in pixel space (the number of chains whose every
cell lies within L2 distance tau of its own; ties by the balanced score). The committed outputs
(experiments/results/beyond_paper/score_pilot/: the two four-chain files, made by the code of
commit 7176202, before `ipr.chains` existed; the six-chain file with samples, 2.4 MB, made at
a74d22f, is not committed) come from the 2-core CPU machine.
"""

import argparse
import functools
import sys
import time

import numpy as np


def run(
    preset: str, num_puzzles: int, chains: int, budget: int, out: str, save_samples: bool = False
) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from ipr_jax import build  # pylint: disable=g-import-not-at-top
  from ipr_jax import sampling
  from ipr_jax.build import config_base
  from ipr_jax.evaluation import runner
  from ipr_jax.models import denoiser  # pylint: disable=g-import-not-at-top
  from ipr_jax.sampling.patches import fold_keys  # pylint: disable=g-import-not-at-top
  from ipr_jax.sampling.selection import uncertainty_query  # pylint: disable=g-import-not-at-top

  cfg = config_base.load_config(f"mnist_sudoku:{preset}")
  cfg.eval.seed = 36
  cfg.ipr.budget = budget
  evaluator = runner.Evaluator(cfg, runner.load_params(cfg, "")[0])
  task = evaluator.task
  idx = np.arange(num_puzzles)
  inputs = evaluator.inputs(idx)
  keys = sampling.puzzle_keys(evaluator._sampling_key, jnp.asarray(idx))  # pylint: disable=protected-access
  noise = evaluator._initial_noise(jnp.asarray(idx))  # pylint: disable=protected-access
  denoise = functools.partial(
      denoiser.make_denoise_fn(build.make_model(cfg), task.patch_size), evaluator.params
  )
  sampler_config, ipr_config = runner._sampler_configs(cfg)  # pylint: disable=protected-access
  num_cells = task.num_patches

  @jax.jit
  def chain(keys, noise, image, mask):
    result = sampling.srm_ipr(
        denoise,
        keys,
        image=image,
        mask=mask,
        noise=noise,
        patch_size=task.patch_size,
        sampler_config=sampler_config,
        ipr_config=ipr_config,
    )
    return result.z, runner.score_iterates(task.score_fn, result.iterates), result.nfe

  @functools.partial(jax.jit, static_argnums=(2,))
  def query(z, query_keys, groups):
    every = jnp.ones((z.shape[0], num_cells), bool)
    return uncertainty_query(
        denoise, z, every, query_keys, patch_size=task.patch_size, groups=groups, score="nll"
    )

  saved = {}
  start = time.time()
  for c in range(chains):
    if c == 0:
      chain_keys, chain_noise = keys, noise
    else:
      chain_keys = fold_keys(keys, 7000 + c)
      chain_noise = jax.vmap(lambda k: jax.random.normal(k, noise.shape[1:]))(
          fold_keys(keys, 8000 + c)
      )
    parts = {"q4": [], "q16": [], "valid": [], "nfe": [], "z": []}
    for s in range(0, num_puzzles, 128):
      part = slice(s, s + 128)
      z, scores, nfe = chain(
          chain_keys[part], chain_noise[part], inputs["image"][part], inputs["mask"][part]
      )
      parts["q4"].append(np.asarray(query(z, fold_keys(chain_keys[part], 99), 4)))
      parts["q16"].append(np.asarray(query(z, fold_keys(chain_keys[part], 98), 16)))
      parts["valid"].append(np.asarray(scores["valid"]))
      parts["nfe"].append(np.asarray(nfe))
      if save_samples:
        parts["z"].append(np.asarray(z))
    for name, values in parts.items():
      if not values:
        continue
      saved[f"{name}_{c}"] = np.concatenate(values, axis=1 if name == "valid" else 0)
    print(
        f"chain {c}: valid {saved[f'valid_{c}'][-1].mean():.3f}, mean passes "
        f"{saved[f'nfe_{c}'].mean():.1f}, {time.time() - start:.0f}s",
        flush=True,
    )
  batch = task.data.test_batch(36, idx, task.given_range, task.unique_solution)
  given = ~np.asarray(batch["cell_mask"]).reshape(num_puzzles, -1).astype(bool)
  np.savez(out, given=given, **saved)


def _within_auc(score: np.ndarray, valid: np.ndarray) -> tuple[float, int]:
  aucs = []
  for s, v in zip(score, valid):
    pos, neg = s[v], s[~v]
    if len(pos) and len(neg):
      aucs.append((pos[:, None] < neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
  return float(np.mean(aucs)), len(aucs)


def _balanced(cells: np.ndarray, given: np.ndarray) -> np.ndarray:
  """`[P, K]` the balanced score of cell scores `[P, K, N]` (given `[P, 1, N]`)."""
  on_given = (cells * given).sum(-1) / np.maximum(given.sum(-1), 1)
  generated = (cells * ~given).sum(-1) / (~given).sum(-1)
  return np.where(given.any(-1), 0.5 * (on_given + generated), generated)


def agreement(path: str, taus=(2.0, 3.0, 4.0, 5.0)) -> None:
  with np.load(path) as f:
    data = dict(f)
  chains = len([k for k in data if k.startswith("valid_")])
  valid = np.stack([data[f"valid_{c}"][-1] for c in range(chains)], 1)  # [P, K]
  balanced = _balanced(
      np.stack([data[f"q4_{c}"] for c in range(chains)], 1), data["given"][:, None, :]
  )
  z = np.stack([data[f"z_{c}"][..., 0] for c in range(chains)], 1)  # [P, K, H, W]
  side = int(round(data["given"].shape[1] ** 0.5))
  p, _, h, w = z.shape
  cells = z.reshape(p, chains, side, h // side, side, w // side).transpose(0, 1, 2, 4, 3, 5)
  cells = cells.reshape(p, chains, side * side, -1)
  distance = np.sqrt(((cells[:, :, None] - cells[:, None]) ** 2).sum(-1))  # [P, K, K, N]
  pick = lambda score: valid[np.arange(p), score.argmin(1)].mean()
  print(f"{path}: {p} puzzles, {chains} chains; balanced score chooses {pick(balanced):.3f}")
  for tau in taus:
    agreeing = ((distance > tau).sum(-1) == 0).sum(-1) - 1  # other chains agreeing on every cell
    print(f"  most agreeing chain, tau {tau}: {pick(-agreeing + 1e-3 * balanced):.3f}")


def analyse(path: str) -> None:
  with np.load(path) as f:
    data = dict(f)
  given = data["given"][:, None, :]
  chains = len([k for k in data if k.startswith("valid_")])
  valid = np.stack([data[f"valid_{c}"][-1] for c in range(chains)], 1)  # [P, K]
  print(
      f"{path}: {valid.shape[0]} puzzles, {chains} chains; valid per chain "
      f"{valid.mean():.3f}, some chain valid {valid.any(1).mean():.3f}"
  )
  print("| query | aggregate | chosen chain valid | within-puzzle AUC (puzzles) |")
  print("|---|---|---|---|")
  for q in ("q4", "q16"):
    cells = np.stack([data[f"{q}_{c}"] for c in range(chains)], 1)  # [P, K, N]
    on_given = (cells * given).sum(-1) / np.maximum(given.sum(-1), 1)
    generated = (cells * ~given).sum(-1) / (~given).sum(-1)
    aggregates = {
        "generated cells": generated,
        "all cells": cells.mean(-1),
        "given cells": on_given,
        "balanced": _balanced(cells, given),
        "largest cell": cells.max(-1),
    }
    for name, score in aggregates.items():
      chosen = valid[np.arange(len(valid)), score.argmin(1)].mean()
      auc, count = _within_auc(score, valid)
      print(f"| {q} | {name} | {chosen:.3f} | {auc:.3f} ({count}) |")


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  make = sub.add_parser("run")
  make.add_argument("--preset", default="demo")
  make.add_argument("--num_puzzles", type=int, default=256)
  make.add_argument("--chains", type=int, default=4)
  make.add_argument("--budget", type=int, default=6)
  make.add_argument("--out", required=True)
  make.add_argument("--save_samples", action="store_true", help="keep every chain's final grid")
  read = sub.add_parser("analyse")
  read.add_argument("paths", nargs="+")
  agree = sub.add_parser("agreement")
  agree.add_argument("paths", nargs="+")
  args = parser.parse_args(argv)
  if args.command == "run":
    run(args.preset, args.num_puzzles, args.chains, args.budget, args.out, args.save_samples)
  elif args.command == "agreement":
    for path in args.paths:
      agreement(path)
  else:
    for path in args.paths:
      analyse(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
