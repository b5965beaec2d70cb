r"""Trains the Counting Polygons scorer and writes the weights shipped with the package.

    python -m ipr_jax.scorers.train_polygon_scorer              # writes ipr_jax/metrics/assets/...
    python -m ipr_jax.scorers.train_polygon_scorer --num_train=2000 --num_epochs=1 \
        --output=/tmp/scorer.npz --min_accuracy=0

The shipped weights come from four runs (60,000 images each, batch 64, `--cache_dir` set), each
continuing the previous one with `--init_from=<previous output>`; the file's metadata holds the
chain under 'continued_from':
  1. --nodigit_map --num_epochs=4 --learning_rate=2e-3
  2. --nodigit_map --num_epochs=2 --learning_rate=1e-3 --numbers_weight=3
  3. --num_epochs=4 --learning_rate=2e-3         (adds the digit map: the numbers head learns)
  4. --num_epochs=4 --learning_rate=1e-3 --seed=1   (a fresh set of training images)

Data (`CountingPolygonsTask(nonuniform_prob=0.5, mismatch_prob=1.0)`, so every head sees
negatives): `--num_train` images from the training circle layouts, rendered once by
`--num_workers` processes and cached as uint8 in `--cache_dir`, and `--num_held_out` test images
(test layouts, task seed `HELD_OUT_SEED`: disjoint from the training layouts). Targets:
num_polygons - 1, num_vertices - 3, is_uniform, numbers_label (the printed pair). The
num_vertices head is trained and scored on uniform images only: on a non-uniform image no single
vertex count is right.

The scorer's digit map (`--digit_map`, on by default; see `polygon_scorer`) is trained densely:
the cell holding the centre of each printed number's text box is labelled with that digit, every
other cell 'none' (softmax cross-entropy, the digit cells' mean plus the other cells' mean). This
target is what taught the network to read the numbers: without it the numbers_label head stayed
at chance. Two auxiliary multi-label targets are dropped after training (a linear layer on the
pooled features, sigmoid cross-entropy, not part of the shipped scorer): which digits 1..9 are
printed, and which vertex counts 3..7 occur among the polygons (uniform = exactly one).

Held-out accuracy per head is logged after every epoch and stored in the file's metadata
(`load_scorer_metadata`); `tests/test_polygon_scorer.py` re-renders the first held-out images and
checks the shipped weights against it.
"""

import functools
import json
import multiprocessing
import os
import pathlib
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ipr_jax.data import counting_polygons as cp_data
from ipr_jax.models import polygon_scorer

# The scorer's data: every head gets negatives (spec §6.3 and the recipe).
NONUNIFORM_PROB, MISMATCH_PROB = 0.5, 1.0
HELD_OUT_SEED = 7
LABEL_KEYS = ("num_polygons", "num_vertices", "is_uniform", "numbers_label")
# Auxiliary multi-hot targets: printed digits 1..9, vertex counts 3..7 present.
AUX_KEYS = ("printed_digits", "vertex_presence")
# Dense target of the scorer's digit map: uint8 [B, 16, 16], the digit centred in each cell.
DIGIT_MAP_KEY = "digit_map"
TARGET_KEYS = LABEL_KEYS + AUX_KEYS + (DIGIT_MAP_KEY,)
_MAP_CELLS = cp_data.IMAGE_SIZE // polygon_scorer.DIGIT_MAP_STRIDE
_CHUNK = 250


def scorer_task(seed: int) -> cp_data.CountingPolygonsTask:
  return cp_data.CountingPolygonsTask(
      seed=seed, nonuniform_prob=NONUNIFORM_PROB, mismatch_prob=MISMATCH_PROB
  )


def targets(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Class targets of a task batch: int32 [B] per head (see the module docstring)."""
  return {
      "num_polygons": batch["num_polygons"].astype(np.int32) - cp_data.MIN_POLYGONS,
      "num_vertices": batch["num_vertices"].astype(np.int32) - cp_data.MIN_VERTICES,
      "is_uniform": batch["is_uniform"].astype(np.int32),
      "numbers_label": batch["numbers_label"].astype(np.int32),
  }


def auxiliary_targets(infos) -> dict[str, np.ndarray]:
  """Targets beyond the four heads, from the render info.

  Returns:
    {'printed_digits': float32 multi-hot [B, 9] (digits 1..9 printed), 'vertex_presence':
    float32 multi-hot [B, 5] (vertex counts 3..7 drawn), 'digit_map': uint8 [B, 16, 16], the
    printed digit whose text box is centred in each 8x8-pixel cell, 0 elsewhere}.
  """
  digits = np.zeros((len(infos), 9), np.float32)
  present = np.zeros((len(infos), 5), np.float32)
  digit_map = np.zeros((len(infos), _MAP_CELLS, _MAP_CELLS), np.uint8)
  for row, info in enumerate(infos):
    digits[row, np.asarray(info.printed_numbers) - 1] = 1.0
    present[row, np.asarray(info.vertices_per_polygon) - cp_data.MIN_VERTICES] = 1.0
    for (x0, y0, x1, y1), number in zip(info.text_boxes, info.printed_numbers):
      cell = np.clip(
          np.floor(np.array([(y0 + y1) / 2, (x0 + x1) / 2]) / polygon_scorer.DIGIT_MAP_STRIDE),
          0,
          _MAP_CELLS - 1,
      ).astype(int)
      digit_map[row, cell[0], cell[1]] = number
  return {"printed_digits": digits, "vertex_presence": present, DIGIT_MAP_KEY: digit_map}


def _render_chunk(args) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  split, seed, start, count = args
  task = scorer_task(seed if split == "train" else HELD_OUT_SEED)
  if split == "train":
    rng = np.random.default_rng([seed, start])
    examples = [task.example(rng, "train") for _ in range(count)]
  else:
    examples = [task.test_image(i) for i in range(start, start + count)]
  labels = targets(task.collate(examples))
  labels.update(auxiliary_targets([info for _, info in examples]))
  return np.stack([image for image, _ in examples]), labels


def render_dataset(
    split: str, count: int, seed: int, num_workers: int = 1
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """uint8 images [count, 128, 128, 3] and int32 targets [count] per head.

  'train': random training-layout images, chunk c drawn from default_rng([seed, c * 250]);
  'held_out': test images 0..count-1 of the task seeded `HELD_OUT_SEED`.
  """
  if split not in ("train", "held_out"):
    raise ValueError(f"split={split!r}: expected 'train' or 'held_out'")
  jobs = [(split, seed, s, min(_CHUNK, count - s)) for s in range(0, count, _CHUNK)]
  if num_workers > 1:
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
      parts = pool.map(_render_chunk, jobs)
  else:
    parts = [_render_chunk(job) for job in jobs]
  images = np.concatenate([p[0] for p in parts])
  labels = {k: np.concatenate([p[1][k] for p in parts]) for k in TARGET_KEYS}
  return images, labels


def cached_dataset(cache_dir: str | None, split: str, count: int, seed: int, num_workers: int):
  """`render_dataset`, read from / written to `cache_dir/<split>_<count>_<seed>.npz` if given."""
  if not cache_dir:
    return render_dataset(split, count, seed, num_workers)
  path = pathlib.Path(cache_dir) / (
      f"{split}_{count}_{seed if split == 'train' else 'fixed'}_v3.npz"
  )
  if path.is_file():
    with np.load(path) as f:
      return f["images"], {k: f[k] for k in TARGET_KEYS}
  start = time.time()
  images, labels = render_dataset(split, count, seed, num_workers)
  logging.info("rendered %d %s images in %.0f s", count, split, time.time() - start)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, images=images, **labels)  # type: ignore[arg-type]  # numpy's stub
  os.replace(tmp, path)
  return images, labels


def _digit_map_loss(digit_logits: jax.Array, digit_map: jax.Array) -> jax.Array:
  """Cross-entropy of the digit map [B, h, w, 10] against uint8 targets [B, h, w].

  The mean over the cells holding a digit's centre plus the mean over the other cells, so the
  2 digit cells of an image weigh as much as its 254 empty ones.
  """
  target = digit_map.astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(digit_logits, target)
  is_digit = (target > 0).astype(jnp.float32)
  return jnp.sum(ce * is_digit) / jnp.maximum(jnp.sum(is_digit), 1.0) + jnp.sum(
      ce * (1.0 - is_digit)
  ) / jnp.maximum(jnp.sum(1.0 - is_digit), 1.0)


def _losses(logits: dict[str, jax.Array], labels: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Mean cross-entropy per head; num_vertices only over uniform images."""
  out = {}
  for name in LABEL_KEYS:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[name], labels[name])
    if name == "num_vertices":
      weight = labels["is_uniform"].astype(jnp.float32)
      out[name] = jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    else:
      out[name] = jnp.mean(ce)
  return out


@functools.partial(jax.jit, static_argnames=("scorer", "optimizer"), donate_argnums=(0, 1, 2))
def _train_step(
    params, opt_state, ema, images_u8, labels, *, scorer, optimizer, ema_decay, numbers_weight
):
  """One step on {'scorer': scorer params, 'aux': auxiliary linear layer}."""

  def loss_fn(p):
    images = cp_data.unit_range_on_device(images_u8)
    logits, features = scorer.apply({"params": p["scorer"]}, images, with_features=True)
    per_head = _losses(logits, labels)
    if scorer.digit_map:
      per_head["digit_map"] = _digit_map_loss(features["digit_map"], labels[DIGIT_MAP_KEY])
    aux_logits = features["pooled"] @ p["aux"]["kernel"] + p["aux"]["bias"]
    aux_targets = jnp.concatenate([labels[k] for k in AUX_KEYS], axis=-1)
    per_head["auxiliary"] = jnp.mean(optax.sigmoid_binary_cross_entropy(aux_logits, aux_targets))
    total = sum(per_head.values()) + (numbers_weight - 1.0) * per_head["numbers_label"]
    return total, per_head

  (_, per_head), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
  return params, opt_state, ema, per_head


@functools.partial(jax.jit, static_argnames=("scorer",))
def _predict(params, images_u8, *, scorer):
  logits, features = scorer.apply(
      {"params": params}, cp_data.unit_range_on_device(images_u8), with_features=True
  )
  if scorer.digit_map:
    logits = {**logits, DIGIT_MAP_KEY: features[DIGIT_MAP_KEY]}
  return {name: jnp.argmax(value, axis=-1) for name, value in logits.items()}


def head_accuracies(
    scorer, params, images_u8: np.ndarray, labels: dict[str, np.ndarray], batch_size: int = 250
) -> dict[str, float]:
  """Accuracy per head (num_vertices over uniform images only).

  With a digit map and a 'digit_map' target, also 'digit_cells' (the fraction of digit-centre
  cells predicted as their digit) and 'empty_cells' (of the other cells, predicted empty).
  """
  preds: dict[str, Any] = {}
  for start in range(0, len(images_u8), batch_size):
    out = _predict(params, jnp.asarray(images_u8[start : start + batch_size]), scorer=scorer)
    for k, v in out.items():
      preds.setdefault(k, []).append(np.asarray(v))
  preds = {k: np.concatenate(v) for k, v in preds.items()}
  accuracy = {}
  for k in LABEL_KEYS:
    correct = preds[k] == labels[k]
    if k == "num_vertices":
      correct = correct[labels["is_uniform"] == 1]
    accuracy[k] = float(np.mean(correct))
  if DIGIT_MAP_KEY in preds and DIGIT_MAP_KEY in labels:
    target, is_digit = labels[DIGIT_MAP_KEY], labels[DIGIT_MAP_KEY] > 0
    accuracy["digit_cells"] = float(np.mean(preds[DIGIT_MAP_KEY][is_digit] == target[is_digit]))
    accuracy["empty_cells"] = float(np.mean(preds[DIGIT_MAP_KEY][~is_digit] == 0))
  return accuracy


def _merge_params(fresh, loaded) -> tuple[dict, list[str]]:
  """`fresh` with every leaf that `loaded` has at the same path and shape taken from `loaded`.

  Returns the merged tree and the '/'-joined names of the leaves kept fresh.
  """
  loaded_leaves = {
      jax.tree_util.keystr(path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(loaded)[0]
  }
  kept_fresh = []

  def pick(path, leaf):
    old = loaded_leaves.get(jax.tree_util.keystr(path))
    if old is None or old.shape != leaf.shape:
      kept_fresh.append("/".join(str(getattr(k, "key", k)) for k in path))
      return leaf
    return jnp.asarray(old)

  return jax.tree_util.tree_map_with_path(pick, fresh), kept_fresh


def train_scorer(
    images_u8: np.ndarray,
    labels: dict[str, np.ndarray],
    architecture: dict,
    *,
    seed: int = 0,
    num_epochs: int = 4,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    weight_decay: float = 1e-4,
    ema_decay: float = 0.999,
    eval_fn=None,
    log_every_steps: int = 100,
    init_params=None,
    numbers_weight: float = 1.0,
):
  """Trains a PolygonScorer; returns (scorer, EMA params).

  `init_params` (optional) seed every parameter they have with the same name and shape; the
  others (e.g. a digit map added to an older scorer) start from a random initialisation.
  """
  scorer = polygon_scorer.make_scorer(architecture)
  steps_per_epoch = len(images_u8) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size={batch_size} exceeds the {len(images_u8)} training images")
  total = num_epochs * steps_per_epoch
  warmup = max(1, min(500, total // 10))
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total)
  optimizer = optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay)
  )
  scorer_params = polygon_scorer.init_scorer_params(scorer, jax.random.key(seed))
  if init_params is not None:
    scorer_params, kept_fresh = _merge_params(scorer_params, init_params)
    if kept_fresh:
      logging.info("not in the initial parameters, initialised randomly: %s", kept_fresh)
  logging.info(
      "scorer %s: %s parameters", architecture, f"{polygon_scorer.num_parameters(scorer_params):,}"
  )
  num_aux = sum(labels[k].shape[-1] for k in AUX_KEYS)
  params = {
      "scorer": scorer_params,
      "aux": {"kernel": jnp.zeros((scorer.widths[-1], num_aux)), "bias": jnp.zeros(num_aux)},
  }
  opt_state = optimizer.init(params)
  ema = jax.tree.map(jnp.copy, params)
  rng = np.random.default_rng(seed)
  step, start = 0, time.time()
  for epoch in range(num_epochs):
    order = rng.permutation(len(images_u8))
    window = []
    for i in range(steps_per_epoch):
      batch = order[i * batch_size : (i + 1) * batch_size]
      params, opt_state, ema, per_head = _train_step(
          params,
          opt_state,
          ema,
          jnp.asarray(images_u8[batch]),
          {k: jnp.asarray(v[batch]) for k, v in labels.items()},
          scorer=scorer,
          optimizer=optimizer,
          ema_decay=min(ema_decay, (1.0 + step) / (10.0 + step)),
          numbers_weight=numbers_weight,
      )
      window.append(per_head)
      step += 1
      if step % log_every_steps == 0:
        mean = {k: float(np.mean([float(w[k]) for w in window])) for k in window[0]}
        window = []
        elapsed = time.time() - start
        logging.info(
            "step %d/%d (%.1f img/s, ETA %.0f min) loss %s",
            step,
            total,
            step * batch_size / elapsed,
            (total - step) * elapsed / step / 60,
            " ".join(f"{k}={v:.4f}" for k, v in mean.items()),
        )
    if eval_fn is not None:
      logging.info(
          "epoch %d/%d: held-out accuracy %s (EMA %s)",
          epoch + 1,
          num_epochs,
          eval_fn(scorer, params["scorer"]),
          eval_fn(scorer, ema["scorer"]),
      )
  return scorer, ema["scorer"]


def build_scorer(
    output: str,
    *,
    cache_dir: str | None = None,
    seed: int = 0,
    num_train: int = 60_000,
    num_held_out: int = 4_000,
    num_workers: int = 2,
    num_epochs: int = 4,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    widths=(32, 32, 64, 128, 256),
    blocks_per_stage: int = 1,
    stem_patch: int = 4,
    digit_map: bool = True,
    min_accuracy: float = 0.0,
    init_from: str | None = None,
    numbers_weight: float = 1.0,
) -> dict:
  """Renders the data, trains a scorer and writes it to `output`; returns the stored metadata.

  `init_from` names a weights file to continue training from (its architecture is used, with
  `digit_map` as given here, and its metadata is kept under 'continued_from'); otherwise training
  starts from scratch.

  Raises:
    ValueError: a head's held-out accuracy is below `min_accuracy` (nothing is written).
  """
  architecture = {
      "widths": [int(w) for w in widths],
      "blocks_per_stage": int(blocks_per_stage),
      "stem_patch": int(stem_patch),
      "digit_map": bool(digit_map),
  }
  start = time.time()
  held_images, held_labels = cached_dataset(cache_dir, "held_out", num_held_out, seed, num_workers)
  train_images, train_labels = cached_dataset(cache_dir, "train", num_train, seed, num_workers)
  render_seconds = time.time() - start
  evaluate = lambda scorer, p: head_accuracies(scorer, p, held_images, held_labels)
  start = time.time()
  init_params, previous = None, None
  if init_from:
    previous = polygon_scorer.load_scorer_metadata(init_from)
    architecture = {**previous["architecture"], "digit_map": bool(digit_map)}
    init_params = polygon_scorer.load_scorer(init_from)[1]
  scorer, params = train_scorer(
      train_images,
      train_labels,
      architecture,
      seed=seed,
      num_epochs=num_epochs,
      batch_size=batch_size,
      learning_rate=learning_rate,
      eval_fn=evaluate,
      init_params=init_params,
      numbers_weight=numbers_weight,
  )
  train_seconds = time.time() - start
  held_out = evaluate(scorer, params)
  logging.info("held-out accuracy %s after %.0f s", held_out, train_seconds)
  digit_cells = {k: held_out.pop(k) for k in ("digit_cells", "empty_cells") if k in held_out}
  if min(held_out.values()) < min_accuracy:
    raise ValueError(
        f"held-out accuracy {held_out} below min_accuracy={min_accuracy}; " "weights not written"
    )
  metadata = {
      "held_out_accuracy": held_out,
      "held_out_digit_map_accuracy": digit_cells,
      "num_held_out": num_held_out,
      "held_out_task_seed": HELD_OUT_SEED,
      "held_out_uniform_images": int(held_labels["is_uniform"].sum()),
      "num_train": num_train,
      "seed": seed,
      "num_epochs": num_epochs,
      "batch_size": batch_size,
      "learning_rate": learning_rate,
      "numbers_weight": numbers_weight,
      "nonuniform_prob": NONUNIFORM_PROB,
      "mismatch_prob": MISMATCH_PROB,
      "num_parameters": polygon_scorer.num_parameters(params),
      "render_seconds": round(render_seconds, 1),
      "train_seconds": round(train_seconds, 1),
      "input_range": "[-1, 1] RGB, NHWC 128x128",
  }
  if previous is not None:
    metadata["continued_from"] = previous
  polygon_scorer.save_scorer(output, params, architecture, metadata)
  logging.info("wrote %s: %s", output, json.dumps(metadata))
  return metadata


def define_flags() -> None:
  """The script's flags; defined only when it runs (importing this module defines none)."""
  flags.DEFINE_string(
      "output", str(polygon_scorer.DEFAULT_WEIGHTS), "Where to write the weights (.npz)."
  )
  flags.DEFINE_string(
      "cache_dir", None, "Folder caching the rendered images (None: render in memory)."
  )
  flags.DEFINE_integer("seed", 0, "Seed of the training images, init and shuffling.")
  flags.DEFINE_integer("num_train", 60_000, "Training images.")
  flags.DEFINE_integer("num_held_out", 4_000, "Held-out test-layout images.")
  flags.DEFINE_integer("num_workers", 2, "Rendering processes.")
  flags.DEFINE_integer("num_epochs", 4, "Passes over the training images.")
  flags.DEFINE_integer("batch_size", 64, "Batch size.")
  flags.DEFINE_float("learning_rate", 2e-3, "Peak AdamW learning rate.")
  flags.DEFINE_list("widths", ["32", "32", "64", "128", "256"], "Stem and stage widths.")
  flags.DEFINE_integer("blocks_per_stage", 1, "Residual blocks per stage.")
  flags.DEFINE_integer("stem_patch", 4, "Space-to-depth factor before the stem.")
  flags.DEFINE_bool(
      "digit_map",
      True,
      "Give the scorer a dense digit map (trained on the printed digits' centres) "
      "that feeds the numbers_label head.",
  )
  flags.DEFINE_string("init_from", None, "Continue training from this weights file.")
  flags.DEFINE_float("numbers_weight", 1.0, "Loss weight of the numbers_label head.")
  flags.DEFINE_float(
      "min_accuracy", 0.0, "Refuse to write weights if a head's held-out accuracy is below this."
  )


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    build_scorer(
        f.output,
        cache_dir=f.cache_dir,
        seed=f.seed,
        num_train=f.num_train,
        num_held_out=f.num_held_out,
        num_workers=f.num_workers,
        num_epochs=f.num_epochs,
        batch_size=f.batch_size,
        learning_rate=f.learning_rate,
        widths=f.widths,
        blocks_per_stage=f.blocks_per_stage,
        stem_patch=f.stem_patch,
        digit_map=f.digit_map,
        min_accuracy=f.min_accuracy,
        init_from=f.init_from,
        numbers_weight=f.numbers_weight,
    )
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  define_flags()
  app.run(main)
