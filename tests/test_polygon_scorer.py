"""The Counting Polygons scorer: heads, weights files, and the shipped weights' accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.metrics import counting_polygons as cp_metrics
from ipr_jax.metrics import train_polygon_scorer
from ipr_jax.models import polygon_scorer

SMALL = {"widths": [8, 8, 16], "blocks_per_stage": 1, "stem_patch": 4}


def test_heads_have_the_reference_class_counts():
  scorer = polygon_scorer.make_scorer(SMALL)
  params = polygon_scorer.init_scorer_params(scorer, jax.random.key(0))
  logits = scorer.apply({"params": params}, jnp.zeros((3, 128, 128, 3)))
  assert {k: v.shape for k, v in logits.items()} == {
      "num_polygons": (3, 9), "num_vertices": (3, 5), "is_uniform": (3, 2),
      "numbers_label": (3, 35)}
  cp_metrics.counting_polygons_metrics(logits)  # accepted by the metrics


@pytest.mark.parametrize("shape", [(2, 64, 64, 3), (2, 128, 128, 1), (128, 128, 3),
                                   (0, 128, 128, 3)])
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


def test_targets_follow_the_head_conventions():
  batch = {"num_polygons": np.array([1, 9]), "num_vertices": np.array([3, 7]),
           "is_uniform": np.array([True, False]),
           "numbers_label": cp_metrics.numbers_label([1, 9], [3, 7])}
  t = train_polygon_scorer.targets(batch)
  np.testing.assert_array_equal(t["num_polygons"], [0, 8])
  np.testing.assert_array_equal(t["num_vertices"], [0, 4])
  np.testing.assert_array_equal(t["is_uniform"], [1, 0])
  assert cp_metrics.NUMBERS_PAIRS[t["numbers_label"][1]] == (7, 9)


def test_build_scorer_writes_a_loadable_file(tmp_path):
  metadata = train_polygon_scorer.build_scorer(
      str(tmp_path / "s.npz"), num_train=64, num_held_out=32, num_workers=1, num_epochs=1,
      batch_size=32, widths=(8, 8, 16))
  assert set(metadata["held_out_accuracy"]) == set(cp_metrics.HEAD_CLASSES)
  scorer, _ = polygon_scorer.load_scorer(tmp_path / "s.npz")
  assert tuple(scorer.widths) == (8, 8, 16)
  continued = train_polygon_scorer.build_scorer(
      str(tmp_path / "c.npz"), num_train=64, num_held_out=32, num_workers=1, num_epochs=1,
      batch_size=32, widths=(4, 4), init_from=str(tmp_path / "s.npz"))
  assert continued["continued_from"]["architecture"]["widths"] == [8, 8, 16]  # not (4, 4)
  with pytest.raises(ValueError, match="min_accuracy"):
    train_polygon_scorer.build_scorer(
        str(tmp_path / "t.npz"), num_train=64, num_held_out=32, num_workers=1, num_epochs=1,
        batch_size=32, widths=(8, 8, 16), min_accuracy=1.01)
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
  # The heads the paper's metrics rest on are usable (the issue aims at 99%; the shipped weights'
  # values are in their metadata and the README).
  for head in ("num_polygons", "num_vertices", "is_uniform"):
    assert reported[head] >= 0.97, (head, reported[head])
