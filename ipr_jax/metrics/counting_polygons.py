"""Counting Polygons metrics (spec §6.3), in JAX, from the scorer's four heads.

The scorer (a ResNet in the reference) maps a 128x128 image to four sets of logits:
* 'num_polygons' [B, 9]: class k means k + 1 polygons (1..9);
* 'num_vertices' [B, 5]: class k means k + 3 vertices (3..7);
* 'is_uniform' [B, 2]: class 1 means every polygon has the same number of vertices;
* 'numbers_label' [B, 35]: the two printed numbers as an unordered pair (`NUMBERS_PAIRS`).

Metrics (srmbench's `CountingObjectsEvaluation` names):
* are_vertices_uniform = mean[argmax(is_uniform) == 1];
* numbers_match_objects = mean[the decoded printed pair equals (predicted polygons, predicted
  vertices) in either order] (the reference's src calls it are_numbers_consistent; both keys are
  returned);
* <head>_confidence = mean softmax maximum of each head;
* relative_polygons_count_N (N = 1..9) and relative_vertex_count_V (V = 3..7) = fraction of
  images predicted with N polygons / V vertices; also as arrays 'polygons_count_frequency' [9] and
  'vertex_count_frequency' [5].

Usage::

  logits = scorer_apply(params, images)          # dict of the four heads
  metrics = counting_polygons_metrics(logits)    # dict of float32 scalars (and two arrays)
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.data import counting_polygons as cp_data

# The label space is the task's (its renderer labels the images): defined with the data.
MIN_POLYGONS, MAX_POLYGONS = cp_data.MIN_POLYGONS, cp_data.MAX_POLYGONS
MIN_VERTICES, MAX_VERTICES = cp_data.MIN_VERTICES, cp_data.MAX_VERTICES
NUMBERS_PAIRS = cp_data.NUMBERS_PAIRS
NUM_NUMBERS_CLASSES = cp_data.NUM_NUMBERS_CLASSES  # 35
check_counts = cp_data.check_counts
numbers_label = cp_data.numbers_label
IMAGE_SHAPE = cp_data.IMAGE_SHAPE
HEAD_CLASSES = cp_data.HEAD_CLASSES
check_images = cp_data.check_images
_PAIRS_TABLE = np.asarray(NUMBERS_PAIRS, np.int32)  # [35, 2]


def decode_numbers_label(label: jax.Array) -> jax.Array:
  """Unordered pair (min, max) of a numbers_label class: int32 [..., 2]; works under jit."""
  return jnp.asarray(_PAIRS_TABLE)[jnp.asarray(label, jnp.int32)]


def check_logits(logits: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Validates the four heads' logits: shapes [B, classes] with one shared B."""
  missing = sorted(set(HEAD_CLASSES) - set(logits))
  if missing:
    raise ValueError(f"scorer logits lack heads {missing}; got keys {sorted(logits)}")
  batch = None
  checked = {}
  for name, classes in HEAD_CLASSES.items():
    value = logits[name]
    shape = tuple(np.shape(value))
    if len(shape) != 2 or shape[1] != classes:
      raise ValueError(f"logits[{name!r}] of shape {shape}: expected [B, {classes}]")
    if batch is not None and shape[0] != batch:
      raise ValueError(f"logits[{name!r}] has batch {shape[0]}, the other heads {batch}")
    batch = shape[0]
    checked[name] = value
  if batch == 0:
    raise ValueError("scorer logits with batch 0: need at least one image")
  return checked


@jax.jit
def _per_image(logits: dict[str, jax.Array]) -> dict[str, jax.Array]:
  classes = {name: jnp.argmax(value, axis=-1) for name, value in logits.items()}
  num_polygons = (classes["num_polygons"] + MIN_POLYGONS).astype(jnp.int32)
  num_vertices = (classes["num_vertices"] + MIN_VERTICES).astype(jnp.int32)
  printed = decode_numbers_label(classes["numbers_label"])
  objects = jnp.stack(
      [jnp.minimum(num_polygons, num_vertices), jnp.maximum(num_polygons, num_vertices)], axis=-1
  )
  out = {
      "num_polygons": num_polygons,
      "num_vertices": num_vertices,
      "is_uniform": classes["is_uniform"] == 1,
      "printed_pair": printed,
      "numbers_match": jnp.all(printed == objects, axis=-1),
  }
  for name, value in logits.items():
    out[f"{name}_confidence"] = jnp.max(jax.nn.softmax(value.astype(jnp.float32), axis=-1), axis=-1)
  return out


def per_image_predictions(logits: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Decoded per-image predictions (jitted).

  Args:
    logits: {'num_polygons' [B, 9], 'num_vertices' [B, 5], 'is_uniform' [B, 2],
      'numbers_label' [B, 35]}.

  Returns:
    {'num_polygons' int32 [B] (1..9), 'num_vertices' int32 [B] (3..7), 'is_uniform' bool [B],
    'printed_pair' int32 [B, 2] (min, max), 'numbers_match' bool [B], '<head>_confidence'
    float32 [B]}.
  """
  return _per_image(check_logits(logits))


@jax.jit
def _metrics(logits: dict[str, jax.Array]) -> dict[str, jax.Array]:
  per_image = _per_image(logits)
  out = {
      "are_vertices_uniform": jnp.mean(per_image["is_uniform"].astype(jnp.float32)),
      "numbers_match_objects": jnp.mean(per_image["numbers_match"].astype(jnp.float32)),
  }
  out["are_numbers_consistent"] = out["numbers_match_objects"]
  for name in HEAD_CLASSES:
    out[f"{name}_confidence"] = jnp.mean(per_image[f"{name}_confidence"])
  polygons = jnp.arange(MIN_POLYGONS, MAX_POLYGONS + 1)
  vertices = jnp.arange(MIN_VERTICES, MAX_VERTICES + 1)
  polygon_freq = jnp.mean((per_image["num_polygons"][:, None] == polygons).astype(jnp.float32), 0)
  vertex_freq = jnp.mean((per_image["num_vertices"][:, None] == vertices).astype(jnp.float32), 0)
  out["polygons_count_frequency"] = polygon_freq
  out["vertex_count_frequency"] = vertex_freq
  for k in range(polygons.shape[0]):
    out[f"relative_polygons_count_{MIN_POLYGONS + k}"] = polygon_freq[k]
  for k in range(vertices.shape[0]):
    out[f"relative_vertex_count_{MIN_VERTICES + k}"] = vertex_freq[k]
  return out


def counting_polygons_metrics(logits: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The Counting Polygons metrics of a batch of scorer logits (jitted).

  Args:
    logits: {'num_polygons' [B, 9], 'num_vertices' [B, 5], 'is_uniform' [B, 2],
      'numbers_label' [B, 35]}.

  Returns:
    float32 scalars 'are_vertices_uniform', 'numbers_match_objects' (= 'are_numbers_consistent'),
    '<head>_confidence' for the four heads, 'relative_polygons_count_1..9',
    'relative_vertex_count_3..7', and arrays 'polygons_count_frequency' [9],
    'vertex_count_frequency' [5].
  """
  return _metrics(check_logits(logits))


def metrics_of_images(
    images: jax.Array,
    scorer_fn: Callable[[jax.Array], Mapping[str, jax.Array]],
    batch_size: int = 256,
) -> dict[str, jax.Array]:
  """Scores images in chunks and returns `counting_polygons_metrics` of all of them.

  Args:
    images: float [B, 128, 128, 3] in [-1, 1] (NHWC).
    scorer_fn: images [b, 128, 128, 3] -> the four heads' logits.
    batch_size: chunk size for `scorer_fn`.
  """
  check_images(images)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be >= 1")
  chunks = [scorer_fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
  logits = {name: jnp.concatenate([jnp.asarray(c[name]) for c in chunks]) for name in HEAD_CLASSES}
  return counting_polygons_metrics(logits)
