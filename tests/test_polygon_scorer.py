"""The Counting Polygons scorer: heads, weights files, and the shipped weights' accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.data import counting_polygons as cp_data
from ipr_jax.metrics import counting_polygons as cp_metrics
from ipr_jax.models import polygon_scorer
from ipr_jax.scorers import train_polygon_scorer

SMALL = {"widths": [8, 8, 16], "blocks_per_stage": 1, "stem_patch": 4}


def test_heads_have_the_reference_class_counts():
  scorer = polygon_scorer.make_scorer(SMALL)
  params = polygon_scorer.init_scorer_params(scorer, jax.random.key(0))
  logits = scorer.apply({"params": params}, jnp.zeros((3, 128, 128, 3)))
  assert {k: v.shape for k, v in logits.items()} == {
      "num_polygons": (3, 9),
      "num_vertices": (3, 5),
      "is_uniform": (3, 2),
      "numbers_label": (3, 35),
  }
  cp_metrics.counting_polygons_metrics(logits)  # accepted by the metrics


@pytest.mark.parametrize(
    "shape", [(2, 64, 64, 3), (2, 128, 128, 1), (128, 128, 3), (0, 128, 128, 3)]
)
def test_wrong_image_batch_is_a_clear_error(shape):
  scorer = polygon_scorer.make_scorer(SMALL)
  params = polygon_scorer.init_scorer_params(scorer, jax.random.key(0))
  with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
    scorer.apply({"params": params}, jnp.zeros(shape))


def test_unknown_architecture_key_is_named():
  with pytest.raises(ValueError, match="depth"):
    polygon_scorer.make_scorer({"depth": 3})


def test_weights_file_round_trip_and_errors(tmp_path):
  scorer = polygon_scorer.make_scorer(SMALL)
  params = polygon_scorer.init_scorer_params(scorer, jax.random.key(1))
  path = tmp_path / "scorer.npz"
  polygon_scorer.save_scorer(path, params, SMALL, {"held_out_accuracy": {"is_uniform": 0.5}})
  loaded_scorer, loaded = polygon_scorer.load_scorer(path)
  assert loaded_scorer == scorer
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert polygon_scorer.load_scorer_metadata(path)["held_out_accuracy"] == {"is_uniform": 0.5}

  with pytest.raises(FileNotFoundError, match="missing.npz"):
    polygon_scorer.load_scorer(tmp_path / "missing.npz")
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(path.read_bytes()[:200])
  with pytest.raises(ValueError, match="corrupt.npz"):
    polygon_scorer.load_scorer(corrupt)
  # Parameters that do not fit the architecture stored beside them.
  other = tmp_path / "other.npz"
  polygon_scorer.save_scorer(other, params, {**SMALL, "widths": [8, 8, 32]})
  with pytest.raises(ValueError, match="do not fit"):
    polygon_scorer.load_scorer(other)


def test_digit_map_marks_the_printed_numbers_where_they_are_drawn():
  task = train_polygon_scorer.scorer_task(seed=3)
  examples = [task.example(np.random.default_rng(i)) for i in range(6)]
  digit_map = train_polygon_scorer.auxiliary_targets([info for _, info in examples])["digit_map"]
  assert digit_map.shape == (6, 16, 16) and digit_map.dtype == np.uint8
  for (image, info), cells in zip(examples, digit_map):
    rows, cols = np.nonzero(cells)
    # Exactly the two printed numbers (as a multiset), one cell each.
    assert sorted(cells[rows, cols].tolist()) == sorted(info.printed_numbers.tolist())
    for row, col in zip(rows, cols):
      # The cell holds ink: the image differs from the background there, drawn in the colour.
      block = np.s_[8 * row : 8 * row + 8, 8 * col : 8 * col + 8]
      changed = np.any(image[block] != info.background[block], axis=-1)
      assert changed.any(), (row, col)
      # ... and the polygons are all farther away than the number's own circle.
      centre = np.array([8 * col + 4, 8 * row + 4])
      assert np.all(
          np.linalg.norm(info.polygon_centres - centre, axis=1) > info.polygon_radii
      ), info


def test_digit_map_feeds_the_numbers_head():
  scorer = polygon_scorer.make_scorer({**SMALL, "digit_map": True})
  params = polygon_scorer.init_scorer_params(scorer, jax.random.key(0))
  logits, features = scorer.apply(
      {"params": params}, jnp.zeros((2, 128, 128, 3)), with_features=True
  )
  assert features["digit_map"].shape == (2, 16, 16, 10)
  assert logits["numbers_label"].shape == (2, 35)
  # pooled features + per digit (1..9) the max and the sum of the map's probabilities
  assert params["head_numbers_label"]["kernel"].shape == (16 + 2 * 9, 35)
  plain = polygon_scorer.init_scorer_params(polygon_scorer.make_scorer(SMALL), jax.random.key(0))
  assert "digit_map" not in plain and plain["head_numbers_label"]["kernel"].shape == (16, 35)
  with pytest.raises(ValueError, match="stem_patch=16"):
    polygon_scorer.init_scorer_params(
        polygon_scorer.make_scorer(
            {**SMALL, "stem_patch": 16, "widths": [8, 8], "digit_map": True}
        ),
        jax.random.key(0),
    )


def test_continued_training_keeps_the_parameters_that_fit():
  scorer = polygon_scorer.make_scorer({**SMALL, "digit_map": True})
  fresh = polygon_scorer.init_scorer_params(scorer, jax.random.key(0))
  old = polygon_scorer.init_scorer_params(polygon_scorer.make_scorer(SMALL), jax.random.key(1))
  merged, kept_fresh = train_polygon_scorer._merge_params(fresh, old)
  assert sorted(kept_fresh) == ["digit_map/bias", "digit_map/kernel", "head_numbers_label/kernel"]
  np.testing.assert_array_equal(merged["stem"]["kernel"], old["stem"]["kernel"])
  np.testing.assert_array_equal(
      merged["head_numbers_label"]["bias"], old["head_numbers_label"]["bias"]
  )
  np.testing.assert_array_equal(merged["digit_map"]["kernel"], fresh["digit_map"]["kernel"])


def test_targets_follow_the_head_conventions():
  batch = {
      "num_polygons": np.array([1, 9]),
      "num_vertices": np.array([3, 7]),
      "is_uniform": np.array([True, False]),
      "numbers_label": cp_metrics.numbers_label([1, 9], [3, 7]),
  }
  t = train_polygon_scorer.targets(batch)
  np.testing.assert_array_equal(t["num_polygons"], [0, 8])
  np.testing.assert_array_equal(t["num_vertices"], [0, 4])
  np.testing.assert_array_equal(t["is_uniform"], [1, 0])
  assert cp_metrics.NUMBERS_PAIRS[t["numbers_label"][1]] == (7, 9)


def test_build_scorer_writes_a_loadable_file(tmp_path):
  metadata = train_polygon_scorer.build_scorer(
      str(tmp_path / "s.npz"),
      num_train=64,
      num_held_out=32,
      num_workers=1,
      num_epochs=1,
      batch_size=32,
      widths=(8, 8, 16),
  )
  assert set(metadata["held_out_accuracy"]) == set(cp_metrics.HEAD_CLASSES)
  scorer, _ = polygon_scorer.load_scorer(tmp_path / "s.npz")
  assert tuple(scorer.widths) == (8, 8, 16)
  continued = train_polygon_scorer.build_scorer(
      str(tmp_path / "c.npz"),
      num_train=64,
      num_held_out=32,
      num_workers=1,
      num_epochs=1,
      batch_size=32,
      widths=(4, 4),
      init_from=str(tmp_path / "s.npz"),
  )
  assert continued["continued_from"]["architecture"]["widths"] == [8, 8, 16]  # not (4, 4)
  with pytest.raises(ValueError, match="min_accuracy"):
    train_polygon_scorer.build_scorer(
        str(tmp_path / "t.npz"),
        num_train=64,
        num_held_out=32,
        num_workers=1,
        num_epochs=1,
        batch_size=32,
        widths=(8, 8, 16),
        min_accuracy=1.01,
    )
  assert not (tmp_path / "t.npz").exists()


def test_shipped_scorer_meets_its_reported_accuracy():
  """Re-renders the first held-out images and scores them with the shipped weights."""
  metadata = polygon_scorer.load_scorer_metadata()
  reported = metadata["held_out_accuracy"]
  count = 400
  images, labels = train_polygon_scorer.render_dataset("held_out", count, seed=0)
  scorer, params = polygon_scorer.load_scorer()
  measured = train_polygon_scorer.head_accuracies(scorer, params, images, labels)
  print("reported", reported, "measured on", count, measured)
  for head, value in reported.items():
    n = count if head != "num_vertices" else int(labels["is_uniform"].sum())
    # The reported value is over all num_held_out images; these are the first `count` of them.
    slack = 3.0 * np.sqrt(max(value * (1.0 - value), 1e-4) / n) + 1.0 / n
    assert measured[head] >= value - slack, (head, measured[head], value)
  # The aim for the three shape heads, and a numbers head that reads the digits (chance
  # is about 1/35; the values are in the weights' metadata and the README).
  for head in ("num_polygons", "num_vertices", "is_uniform"):
    assert reported[head] >= 0.99, (head, reported[head])
  assert reported["numbers_label"] >= 0.95, reported["numbers_label"]


@pytest.mark.parametrize("mismatch_prob", [0.0, 1.0])
def test_shipped_scorer_judges_rendered_images_like_their_render_info(mismatch_prob):
  """The evaluation's per-image verdicts on images whose truth is known from rendering.

  mismatch_prob 0: the SRM's own data (uniform, numbers matching), nearly all should pass;
  mismatch_prob 1: random printed numbers, which match the drawing only by chance.
  """
  task = cp_data.CountingPolygonsTask(seed=11, mismatch_prob=mismatch_prob)
  examples = [task.test_image(i) for i in range(64)]
  images = cp_data.images_to_unit_range(np.stack([image for image, _ in examples]))
  scorer, params = polygon_scorer.load_scorer()
  per_image = cp_metrics.per_image_predictions(scorer.apply({"params": params}, images))
  truth = np.array([info.numbers_match for _, info in examples])
  # The data are what the test says they are: all matching, or mostly not.
  assert truth.all() if mismatch_prob == 0.0 else truth.mean() < 0.2
  agree = np.mean(np.asarray(per_image["numbers_match"]) == truth)
  assert agree >= 0.85, (agree, truth.mean())
  assert np.mean(np.asarray(per_image["is_uniform"])) >= 0.9
