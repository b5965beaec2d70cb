"""Counting Polygons: 128x128 images of polygons and two printed numbers, rendered on the host.

Valid: the scorer finds every polygon with the same vertex count and the printed numbers equal to
its polygon and vertex counts (the paper's two metrics at once). No given content.
"""

from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from ipr_jax.data import counting_polygons as cp_data
from ipr_jax.metrics import counting_polygons as cp_metrics
from ipr_jax.models import polygon_scorer
from ipr_jax.tasks import base

NAME = "counting_polygons"
HOST_RENDERED = True
CELL_VERIFIER = False

# Per-image scores whose means are the paper's two metrics.
METRICS = ("are_vertices_uniform", "numbers_match_objects")


def make_data(config: ml_collections.ConfigDict) -> cp_data.CountingPolygonsTask:
  """The host-side generator (rendered by `counting_polygons.TrainImagePrefetcher`)."""
  cp_data.check_image_geometry(config.data.image_size, config.data.channels)
  return cp_data.CountingPolygonsTask(
      seed=config.data.seed, background_dir=config.data.background_dir
  )


unknown_counts = base.all_patches


def train_feed(
    data: cp_data.CountingPolygonsTask,
    config: ml_collections.ConfigDict,
    example_index,
    first_step: int,
) -> cp_data.TrainImagePrefetcher:
  """Renders the training images of steps first_step + 1, ... in background workers:
  `.get()` -> uint8 [num_local, per_device, H, W, 3] for the next step (example_index int
  [num_local, per_device], the global indices of this process's examples), `.wait_seconds`,
  `.close()`."""
  d = config.data
  logging.info(
      "Rendering training images on the host: %d %s, %d steps ahead.",
      d.render_workers,
      "processes" if d.render_processes else "threads",
      d.prefetch_batches,
  )
  return cp_data.TrainImagePrefetcher(
      data,
      config.seed,
      example_index,
      first_step=first_step,
      num_workers=d.render_workers,
      prefetch=d.prefetch_batches,
      use_processes=d.render_processes,
  )


# uint8 training images -> float32 in [-1, 1], on device (inside the train step).
images_on_device = cp_data.unit_range_on_device


def score_fn(scorer: polygon_scorer.PolygonScorer, params: Any) -> Callable[[jax.Array], dict]:
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


class Evaluation(base.Evaluation):
  """Counting Polygons under one config: generated from noise alone, scored by the polygon
  scorer (`config.eval.scorer_path`), whose held-out accuracy goes into results.json."""

  plot_metrics = METRICS
  csv_scores = ("valid", *METRICS)

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    cp_data.check_image_geometry(config.data.image_size, config.data.channels)
    scorer, params = polygon_scorer.load_scorer(config.eval.scorer_path)
    self.score_fn = score_fn(scorer, params)
    accuracy = polygon_scorer.load_scorer_metadata(config.eval.scorer_path).get(
        "held_out_accuracy", {}
    )
    self.metadata["scorer_held_out_accuracy"] = accuracy
    weak = {head: value for head, value in accuracy.items() if value < 0.9}
    if weak:
      logging.warning(
          "The polygon scorer's held-out accuracy is low for %s: the metrics "
          "that rest on these heads are not reliable (numbers_label: "
          "numbers_match_objects and valid).",
          weak,
      )
