r"""Evaluation binary: SRM + IPR on many test puzzles, the valid rate at every IPR budget.

  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:ms_hard_test --workdir=runs/ms
  python -m ipr_jax.evaluate --config=configs/even_pixels.py:tiny --workdir=runs/ep_tiny \
      --config.ipr.budget=2 --config.eval.num_puzzles=4

It restores the EMA parameters of the newest Orbax checkpoint in `--workdir` (or `--checkpoint`:
a run directory, its `checkpoints/` folder or one step folder), runs the SRM greedy sampler and
`config.ipr.budget` IPR iterations on `config.eval.num_puzzles` test puzzles, in batches of
`config.eval.batch_size` split over all local devices with pmap, and writes to
`workdir/eval/<config.eval.name>/`:

  results.json, results.csv    one row per budget b = 0..B (b = 0 is plain SRM): valid rate and
                               its 95% Wilson interval, mean duplicate count (Sudoku), the Even
                               Pixels metrics, or the Counting Polygons metrics
                               (are_vertices_uniform, numbers_match_objects, per-count
                               frequencies), mean denoiser passes spent so far;
  valid_rate_vs_budget.png     the curve (Counting Polygons: with both metrics);
  ipr_process.png              a few puzzles across IPR iterations, invalid cells outlined.

Valid means: Sudoku, no rule broken by the classified digits; Even Pixels, exactly half of the
pixels in each hue; Counting Polygons, the scorer finds the polygons uniform and the printed
numbers equal to its polygon and vertex counts (both metrics at once).

Test puzzle i is a pure function of (config.eval.seed, i), and so is all of its sampling
randomness, so results do not depend on the batch size or the number of devices.

In Python: `Evaluator(config, params)(indices)` runs SRM + IPR on any puzzle indices and returns
their per-puzzle scores, passes and (optionally) samples; `evaluate(config, workdir)` is the whole
run of the binary.
"""

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from ipr_jax import checkpoint
from ipr_jax import eval_report
from ipr_jax import host_devices
from ipr_jax import pretrained
from ipr_jax import sampler
from ipr_jax import train
from ipr_jax.data import counting_polygons
from ipr_jax.data import sudoku
from ipr_jax.metrics import counting_polygons as cp_metrics
from ipr_jax.metrics import even_pixels as even_pixels_metrics
from ipr_jax.metrics import sudoku as sudoku_metrics
from ipr_jax.models import classifier as classifier_lib
from ipr_jax.models import denoiser
from ipr_jax.models import polygon_scorer

# Seed streams of the evaluation: puzzle content, initial noise and sampling never share a key.
_SAMPLING_STREAM, _NOISE_STREAM = 1, 2


def sudoku_score_fn(classifier_params: Any, box_size: int) -> Callable[[jax.Array], dict]:
  """z [B, H, W, 1] -> {'valid', 'duplicate_count'} per puzzle, through the digit classifier."""

  def score(z):
    grids = sudoku_metrics.predict_digit_grids(classifier_params, z, box_size)
    count = sudoku_metrics.duplicate_count(grids)
    return {"valid": count == 0, "duplicate_count": count}

  return score


def even_pixels_score_fn(z: jax.Array) -> dict:
  """z [B, 32, 32, 3] -> {'valid' (exactly even), 'color_imbalance', 'saturation_std', 'value_std'}."""
  per_image = even_pixels_metrics.per_image_metrics(z)
  return {"valid": per_image["color_imbalance"] == 0, **per_image}


# Per-image Counting Polygons scores whose means are the paper's two metrics.
CP_METRICS = ("are_vertices_uniform", "numbers_match_objects")


def counting_polygons_score_fn(scorer: polygon_scorer.PolygonScorer,
                               params: Any) -> Callable[[jax.Array], dict]:
  """z [B, 128, 128, 3] -> per-image {'valid', the two metrics, count indicators, confidences}.

  Averaged over images (as `eval_report.budget_table` does), 'polygons_count_<N>' and
  'vertex_count_<V>' are the relative frequencies of the predicted counts (spec §6.3).
  """

  def score(z):
    predictions = cp_metrics.per_image_predictions(scorer.apply({"params": params}, z))
    out = {
        "valid": predictions["is_uniform"] & predictions["numbers_match"],
        "are_vertices_uniform": predictions["is_uniform"],
        "numbers_match_objects": predictions["numbers_match"],
    }
    for n in range(cp_metrics.MIN_POLYGONS, cp_metrics.MAX_POLYGONS + 1):
      out[f"polygons_count_{n}"] = predictions["num_polygons"] == n
    for v in range(cp_metrics.MIN_VERTICES, cp_metrics.MAX_VERTICES + 1):
      out[f"vertex_count_{v}"] = predictions["num_vertices"] == v
    for head in cp_metrics.HEAD_CLASSES:
      out[f"{head}_confidence"] = predictions[f"{head}_confidence"]
    return out

  return score


def invalid_sudoku_cells(grids: np.ndarray) -> np.ndarray:
  """bool [..., n, n]: True where a cell's digit repeats in its row, column or box."""
  grids = np.asarray(grids)
  n = grids.shape[-1]
  box = int(round(n ** 0.5))
  onehot = grids[..., None] == np.arange(1, n + 1)  # [..., n, n, n]
  rows = onehot.sum(-2, keepdims=True)
  cols = onehot.sum(-3, keepdims=True)
  boxes = onehot.reshape(*grids.shape[:-2], box, box, box, box, n).sum((-4, -2), keepdims=True)
  boxes = np.broadcast_to(boxes, (*grids.shape[:-2], box, box, box, box, n))
  boxes = boxes.reshape(*grids.shape[:-2], n, n, n)
  repeated = (rows > 1) | (cols > 1) | (boxes > 1)
  return np.any(onehot & repeated, axis=-1)


class _Task:
  """What the evaluation needs of a task: test inputs, a score function, cell geometry."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.name = config.task
    self.patch_size = config.data.patch_size
    self.plot_metrics = ()  # row means drawn beside the valid rate
    self.metadata = {}  # task facts written into results.json
    self.is_sudoku = config.task == "mnist_sudoku"
    if config.task == "mnist_sudoku":
      self.data = train.make_task(config)
      self.box_size = config.data.box_size
      path = config.eval.classifier_path
      self.classifier_params = classifier_lib.load_classifier_params(
          path, cell_size=config.data.cell_size)
      self.score_fn = sudoku_score_fn(self.classifier_params, self.box_size)
      self.given_range = tuple(config.eval.given_range)
      self.cell_size = config.data.cell_size
    elif config.task == "even_pixels":
      self.data = None
      self.score_fn = even_pixels_score_fn
      self.cell_size = config.data.patch_size
    elif config.task == "counting_polygons":
      counting_polygons.check_image_geometry(config.data.image_size, config.data.channels)
      self.data = None
      scorer, params = polygon_scorer.load_scorer(config.eval.scorer_path)
      self.score_fn = counting_polygons_score_fn(scorer, params)
      accuracy = polygon_scorer.load_scorer_metadata(config.eval.scorer_path).get(
          "held_out_accuracy", {})
      self.metadata["scorer_held_out_accuracy"] = accuracy
      weak = {head: value for head, value in accuracy.items() if value < 0.9}
      if weak:
        logging.warning("The polygon scorer's held-out accuracy is low for %s: the metrics "
                        "that rest on these heads are not reliable (numbers_label: "
                        "numbers_match_objects and valid).", weak)
      self.cell_size = config.data.patch_size
      self.plot_metrics = CP_METRICS
    else:
      raise ValueError(f"unknown task {config.task!r}; expected one of {train.TASKS}")
    self.image_shape = train.image_shape(config)

  def inputs(self, seed: int, indices: np.ndarray) -> dict[str, Optional[jax.Array]]:
    """Test inputs of puzzles `indices`: image [B, H, W, d] and mask [B, H, W, 1] (or None)."""
    if self.data is None:
      return {"image": None, "mask": None}
    batch = self.data.test_batch(seed, indices, self.given_range)
    return {"image": batch["image"], "mask": batch["mask"]}

  def invalid_cells(self, samples: np.ndarray) -> Optional[np.ndarray]:
    """[..., gh, gw] bool rule violations of samples [..., H, W, d] (Sudoku only)."""
    if not self.is_sudoku:
      return None
    flat = samples.reshape(-1, *samples.shape[-3:])
    grids = np.asarray(sudoku_metrics.predict_digit_grids(
        self.classifier_params, jnp.asarray(flat), self.box_size))
    n = grids.shape[-1]
    return invalid_sudoku_cells(grids).reshape(*samples.shape[:-3], n, n)


def _sampler_configs(config: ml_collections.ConfigDict):
  return (sampler.SamplerConfig(**config.sampler.to_dict()),
          sampler.IPRConfig(**config.ipr.to_dict()))


def unknown_counts(config: ml_collections.ConfigDict) -> list[int]:
  """The numbers of patches the SRM pass can have to generate under `config.eval`.

  Sudoku: every cell count minus a given count of `config.eval.given_range`; Even Pixels and
  Counting Polygons: all patches.
  """
  grid_h, grid_w = train.patch_grid(config)
  num_patches = grid_h * grid_w
  if config.task != "mnist_sudoku":
    return [num_patches]
  lo, hi = sudoku.check_given_range(tuple(config.eval.given_range), config.data.box_size)
  return [num_patches - given for given in range(lo, hi + 1)]


def check_schedules(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if the sampler or IPR schedule of `config` is degenerate for any patch
  count the evaluation can produce (see `sampler.check_schedules`)."""
  sampler_config, ipr_config = _sampler_configs(config)
  grid_h, grid_w = train.patch_grid(config)
  sampler.check_schedules(sampler_config, ipr_config, grid_h * grid_w, unknown_counts(config))


def _batch_indices(num_puzzles: int, batch_size: int, num_devices: int):
  """Yields (indices padded to a multiple of num_devices, number of real puzzles)."""
  per_call = -(-batch_size // num_devices) * num_devices
  for start in range(0, num_puzzles, per_call):
    real = np.arange(start, min(start + per_call, num_puzzles))
    padded = np.concatenate([real, np.full(per_call - len(real), real[-1])])
    yield padded, len(real)


def load_params(config: ml_collections.ConfigDict, workdir: str,
                checkpoint_path: Optional[str] = None) -> tuple[Any, str, str]:
  """The U-Net parameters to evaluate: (params, where they came from, 'ema' | 'live').

  `checkpoint_path` if given, else the shipped model `config.eval.pretrained` if set (its EMA
  weights; `config` must agree with it on the task, data and model sections), else the newest
  checkpoint in `workdir`.
  """
  if checkpoint_path is None and config.eval.pretrained:
    shipped = pretrained.load(config.eval.pretrained)
    pretrained.check_compatible(config, shipped)
    source = f"shipped model {shipped.name!r} ({pretrained.path_of(shipped.name)})"
    return shipped.params, source, "ema"
  which = "ema" if config.eval.use_ema else "live"
  source = checkpoint_path or workdir
  params = checkpoint.restore_params(source, which=which)
  return params, str(checkpoint.find_step_dir(source)), which


@dataclasses.dataclass
class BatchResult:
  """SRM + IPR results of a batch of test puzzles.

  Attributes:
    indices: `[P]` the puzzle indices, in the order of the other arrays.
    scores: `{name: [budget + 1, P]}` per-puzzle scores after budgets 0..budget (0 = SRM).
    nfe: `[budget + 1, P]` cumulative denoiser passes after each budget.
    samples: `[S, budget + 1, H, W, d]` samples in [-1, 1] after every budget of the puzzles
      `sample_indices`, or None.
    sample_indices: `[S]` puzzle indices of `samples`.
  """
  indices: np.ndarray
  scores: dict[str, np.ndarray]
  nfe: np.ndarray
  samples: Optional[np.ndarray] = None
  sample_indices: Optional[np.ndarray] = None


class Evaluator:
  """SRM + IPR on test puzzles of one config with one set of U-Net parameters.

  Compiled once per batch shape and split over all local devices with pmap. Test puzzle i (its
  content, initial noise and sampling randomness) is a function of (config.eval.seed, i) only, so
  a puzzle's result does not depend on the batch it is in or on the number of devices.

    evaluator = Evaluator(config, params)
    result = evaluator(np.arange(8), samples_per_device=None)  # keep every sample
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any):
    self.sampler_config, self.ipr_config = _sampler_configs(config)
    check_schedules(config)
    self.config = config
    self.task = _Task(config)
    self.params = params
    self.num_devices = jax.local_device_count()
    denoise = denoiser.make_denoise_fn(train.make_model(config), self.task.patch_size)
    task, sampler_config, ipr_config = self.task, self.sampler_config, self.ipr_config

    def run(params, keys, noise, image, mask, num_snapshots):
      return sampler.srm_ipr(
          functools.partial(denoise, params), keys, image=image, mask=mask, noise=noise,
          patch_size=task.patch_size, sampler_config=sampler_config, ipr_config=ipr_config,
          score_fn=task.score_fn,
          verify_fn=(lambda z: task.score_fn(z)["valid"]) if ipr_config.immediate_stop else None,
          num_snapshots=num_snapshots)

    self._p_run = jax.pmap(run, in_axes=(None, 0, 0, 0, 0), static_broadcasted_argnums=5)
    root = jax.random.key(config.eval.seed)
    self._sampling_key = jax.random.fold_in(root, _SAMPLING_STREAM)
    noise_key = jax.random.fold_in(root, _NOISE_STREAM)
    self._initial_noise = jax.jit(jax.vmap(
        lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), task.image_shape)))

  def inputs(self, indices: np.ndarray) -> dict[str, Optional[jax.Array]]:
    """Test puzzles `indices`: image [P, H, W, d] and mask [P, H, W, 1] (None for tasks
    without given content)."""
    return self.task.inputs(self.config.eval.seed, np.asarray(indices))

  def invalid_cells(self, samples: np.ndarray) -> Optional[np.ndarray]:
    """[..., gh, gw] bool rule violations of samples [..., H, W, d] (Sudoku; else None)."""
    return self.task.invalid_cells(samples)

  def puzzle_images(self, indices: np.ndarray) -> Optional[np.ndarray]:
    """[P, H, W, d] what the sampler is given, for display: the given cells, the cells to
    generate at 0 (mid-grey); None for tasks without given content."""
    inputs = self.inputs(indices)
    if inputs["mask"] is None:
      return None
    mask = np.asarray(inputs["mask"], np.float32)
    return (1.0 - mask) * np.asarray(inputs["image"], np.float32)

  def __call__(self, indices, samples_per_device: Optional[int] = 0) -> BatchResult:
    """Runs SRM + IPR on puzzles `indices` ([P] ints).

    Args:
      indices: the test puzzle indices.
      samples_per_device: keep the samples after every budget of the first this many puzzles of
        each device's share (None: of every puzzle).

    Returns:
      BatchResult of the P puzzles.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    real = len(indices)
    if real == 0:
      raise ValueError("Evaluator needs at least one puzzle index, got none.")
    if samples_per_device is not None and samples_per_device < 0:
      raise ValueError(f"samples_per_device={samples_per_device} must be >= 0 or None")
    num_devices = self.num_devices
    per_device = -(-real // num_devices)
    padded = np.concatenate([indices, np.full(per_device * num_devices - real, indices[-1])])
    num_snapshots = per_device if samples_per_device is None else min(samples_per_device,
                                                                        per_device)
    inputs = self.inputs(padded)
    keys = sampler.puzzle_keys(self._sampling_key, jnp.asarray(padded))
    noise = self._initial_noise(jnp.asarray(padded))
    shard = lambda x: None if x is None else x.reshape(num_devices, -1, *x.shape[1:])
    result = self._p_run(self.params, shard(keys), shard(noise), shard(inputs["image"]),
                         shard(inputs["mask"]), num_snapshots)
    result = jax.device_get(result)
    unshard = lambda x: np.asarray(x).swapaxes(0, 1).reshape(x.shape[1], -1)[:, :real]
    out = BatchResult(indices, {k: unshard(v) for k, v in result.scores.items()},
                      unshard(result.nfe_per_budget))
    if result.snapshots is not None:
      # [devices, budgets, S, H, W, d] -> [devices * S, budgets, ...], real puzzles only.
      snapshots = np.asarray(result.snapshots).swapaxes(1, 2)
      positions = (np.arange(num_devices)[:, None] * per_device
                   + np.arange(num_snapshots)[None, :]).reshape(-1)
      keep = positions < real
      out.samples = snapshots.reshape(-1, *snapshots.shape[2:])[keep]
      out.sample_indices = padded[positions[keep]]
    return out


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint_path: Optional[str] = None) -> list[dict[str, Any]]:
  """Runs SRM + IPR on `config.eval.num_puzzles` test puzzles and writes the results.

  Args:
    config: the task config (sections model, data, sampler, ipr, eval).
    workdir: run directory; results go to `workdir/eval/<config.eval.name>/`.
    checkpoint_path: what to restore (default: `workdir`).

  Returns:
    The per-budget rows written to results.csv.
  """
  num_puzzles, batch_size = config.eval.num_puzzles, config.eval.batch_size
  if num_puzzles < 1 or batch_size < 1:
    raise ValueError(f"config.eval.num_puzzles={num_puzzles} and config.eval.batch_size="
                     f"{batch_size} must be positive")
  check_schedules(config)
  params, source, which = load_params(config, workdir, checkpoint_path)
  logging.info("Evaluating the %s params of %s.", which, source)
  evaluator = Evaluator(config, params)
  num_devices = evaluator.num_devices
  per_device = -(-batch_size // num_devices)
  num_snapshots = min(config.eval.num_plot_puzzles, per_device)

  scores, nfe, snapshots = [], [], None
  start_time = time.time()
  done = 0
  for indices, real in _batch_indices(num_puzzles, batch_size, num_devices):
    # Full-size batches (the last one padded) so that every batch reuses one compilation.
    batch = evaluator(indices, num_snapshots)
    scores.append({k: v[:, :real] for k, v in batch.scores.items()})
    nfe.append(batch.nfe[:, :real])
    if snapshots is None and batch.samples is not None:
      snapshots = batch.samples[:min(num_snapshots, real)]  # [P, budgets, H, W, d]
      snapshot_indices = batch.sample_indices[:len(snapshots)]
    done += real
    elapsed = time.time() - start_time
    running = np.concatenate([s["valid"] for s in scores], axis=1).mean(axis=1)
    print(f"[{done}/{num_puzzles}] {elapsed:.0f}s elapsed, ETA "
          f"{elapsed / done * (num_puzzles - done):.0f}s; valid rate at budget 0 "
          f"{running[0]:.3f}, at budget {len(running) - 1} {running[-1]:.3f}", flush=True)

  scores = {k: np.concatenate([s[k] for s in scores], axis=1) for k in scores[0]}
  rows = eval_report.budget_table(scores, np.concatenate(nfe, axis=1))
  out_dir = os.path.join(workdir, "eval", config.eval.name)
  metadata = {
      "task": config.task,
      "eval": config.eval.to_dict(),
      "sampler": config.sampler.to_dict(),
      "ipr": config.ipr.to_dict(),
      "checkpoint": source,
      "params": which,
      "devices": [str(d) for d in jax.local_devices()],
      "seconds": time.time() - start_time,
      **evaluator.task.metadata,
  }
  eval_report.write_results(out_dir, rows, metadata)
  eval_report.plot_valid_rate(os.path.join(out_dir, "valid_rate_vs_budget.png"), rows,
                              f"{config.task} / {config.eval.name}",
                              metrics=evaluator.task.plot_metrics)
  if snapshots is not None and len(snapshots):
    eval_report.plot_ipr_process(
        os.path.join(out_dir, "ipr_process.png"), snapshots, evaluator.invalid_cells(snapshots),
        evaluator.task.cell_size, puzzles=evaluator.puzzle_images(snapshot_indices))
  print(eval_report.format_table(rows))
  print(f"wrote {out_dir}/results.json, results.csv and plots")
  return rows


def define_flags() -> None:
  """The binary's flags; defined only when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file(
      "config", None, "Task config file, e.g. configs/mnist_sudoku.py:ms_hard_test.",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory; results go to workdir/eval/<name>.")
  flags.DEFINE_string("checkpoint", None,
                      "Checkpoint to evaluate (default: the shipped model config.eval.pretrained "
                      "if the config names one, else the newest checkpoint in --workdir).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.config is None or not f.workdir:
    raise app.UsageError("--config and --workdir are required")
  try:
    evaluate(f.config, f.workdir, f.checkpoint)
  except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  host_devices.use_cpu_cores()
  define_flags()
  app.run(main)
