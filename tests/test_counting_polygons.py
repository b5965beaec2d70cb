"""Tests of ipr_jax.data.counting_polygons and ipr_jax.metrics.counting_polygons."""

import colorsys
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ipr_jax.data import counting_polygons as cp
from ipr_jax.metrics import counting_polygons as cpm

GREY = np.full((128, 128, 3), 128, np.uint8)


def coverage(image: np.ndarray, info: cp.RenderInfo) -> np.ndarray:
  """Per-pixel share of the shape colour in [0, 1], where colour and background differ clearly.

  The image is background + a (colour - background), so a is the projection; pixels whose
  background is too close to the colour to tell are NaN.
  """
  bg = info.background.astype(np.float64)
  direction = np.asarray(info.colour, np.float64) - bg
  norm2 = np.sum(direction**2, axis=-1)
  share = np.sum((image.astype(np.float64) - bg) * direction, axis=-1) / np.maximum(norm2, 1.0)
  return np.where(norm2 > 40.0**2, np.clip(share, 0.0, 1.0), np.nan)


def edge_distances(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
  """[P, V] signed distances of points to the edge lines of a convex polygon (positive inside)."""
  centre = vertices.mean(axis=0)
  nxt = np.roll(vertices, -1, axis=0)
  normal = np.stack([nxt[:, 1] - vertices[:, 1], vertices[:, 0] - nxt[:, 0]], -1)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  sign = np.sign(np.sum((centre - vertices) * normal, axis=-1))
  return np.sum((points[:, None, :] - vertices[None]) * normal[None], axis=-1) * sign


PIXELS = np.stack(np.meshgrid(np.arange(128.0), np.arange(128.0), indexing="xy"), -1).reshape(-1, 2)


def count_corners(share: np.ndarray, centre, radius: float) -> int:
  """Corners of a convex shape around `centre`: maxima of its boundary distance over the angle.

  The boundary distance along a ray is the integral of the coverage along it (bilinear samples).
  """
  theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
  steps = np.arange(0.0, 1.3 * radius, 0.1)
  x = centre[0] + np.cos(theta)[:, None] * steps
  y = centre[1] + np.sin(theta)[:, None] * steps
  values = ndimage.map_coordinates(np.nan_to_num(share), [y.ravel(), x.ravel()], order=1)
  rho = values.reshape(x.shape).sum(axis=1) * 0.1
  above = rho > (rho.max() + rho.min()) / 2
  return int(np.sum(above & ~np.roll(above, 1)))


# ------------------------------------------------------------------------------------------------
# Layouts and colour.


def test_layouts_are_valid_pure_and_split_disjoint():
  for num_circles in range(cp.MIN_CIRCLES, cp.MAX_CIRCLES + 1):
    train = cp.circle_layouts(0, num_circles, 12, "train")
    test = cp.circle_layouts(0, num_circles, 12, "test")
    assert train.shape == (12, num_circles, 3)
    for layout in np.concatenate([train, test]):
      x, y, r = layout.T
      assert np.all((x - r >= 0) & (x + r <= 1) & (y - r >= 0) & (y + r <= 1))
      assert np.all((r >= cp.RADIUS_RANGE[0]) & (r <= cp.RADIUS_RANGE[1]))
      for i, j in itertools.combinations(range(num_circles), 2):
        gap = np.hypot(x[i] - x[j], y[i] - y[j])
        assert gap >= cp.CIRCLE_SPACING * (r[i] + r[j])  # disjoint, text included
    # Same layout from the single-layout function, and no circle shared across the splits.
    np.testing.assert_array_equal(cp.circle_layout(0, num_circles, 7, "train"), train[7])
    assert not set(map(tuple, train.reshape(-1, 3))) & set(map(tuple, test.reshape(-1, 3)))
  assert not np.array_equal(cp.circle_layouts(1, 5, 3), cp.circle_layouts(0, 5, 3))


def test_text_fits_in_its_circle_footprint():
  """The digit box at font size int(r), top-left at the centre, stays within 1.25 r."""
  for size in (30, 45, 61):
    font = ImageFont.load_default(size=size)
    assert isinstance(font, ImageFont.FreeTypeFont)  # scalable, offline
    for digit in "123456789":
      x0, y0, x1, y1 = font.getbbox(digit)
      assert x0 >= 0 and y0 >= 0 and np.hypot(x1, y1) < cp.CIRCLE_SPACING * size


@pytest.mark.parametrize("rgb", [(200, 30, 30), (40, 90, 200), (120, 200, 60)])
def test_colour_is_the_hue_opposite_a_single_hue_background(rgb):
  background = np.empty((128, 128, 3), np.uint8)
  background[:] = rgb
  hue_byte = np.asarray(Image.fromarray(background).convert("HSV"))[0, 0, 0]
  # The blur spans 127 bins either way, so only the bin 128 away is untouched by the background.
  expected = colorsys.hsv_to_rgb(((int(hue_byte) + 128) % 256) / 255.0, 1.0, 0.9)
  assert cp.polygon_colour(background) == tuple(int(255 * c) for c in expected)


def test_procedural_backgrounds_leave_hues_free():
  rng = np.random.default_rng(0)
  for _ in range(4):
    background = cp.procedural_background(rng)
    assert background.shape == (128, 128, 3) and background.dtype == np.uint8
    assert background.std(axis=(0, 1)).max() > 5  # textured, not flat
    hues = np.asarray(Image.fromarray(background).convert("HSV"))[..., 0]
    colour_hue = np.asarray(
        Image.fromarray(np.asarray([[cp.polygon_colour(background)]], np.uint8)).convert("HSV")
    )[0, 0, 0]
    circular = np.minimum(
        (hues.astype(int) - colour_hue) % 256, (colour_hue - hues.astype(int)) % 256
    )
    assert np.mean(circular < 16) < 0.02  # the polygon hue is rare in the background


# ------------------------------------------------------------------------------------------------
# Rendering.

BIG_LAYOUT = np.asarray([[0.27, 0.27, 0.2], [0.73, 0.3, 0.2], [0.2, 0.7, 0.1], [0.65, 0.72, 0.1]])


@pytest.mark.parametrize("vertices", [3, 4, 5, 6, 7, (3, 7), (6, 5)])
def test_rendered_polygons_have_the_requested_corners(vertices):
  rng = np.random.default_rng(1)
  image, info = cp.render_image(rng, 2, vertices, BIG_LAYOUT, GREY)
  share = coverage(image, info)
  expected = np.broadcast_to(vertices, (2,))
  for centre, radius, count in zip(info.polygon_centres, info.polygon_radii, expected):
    assert count_corners(share, centre, radius) == count
  assert info.is_uniform == (len(set(expected)) == 1)


def digit_template(info: cp.RenderInfo, slot: int, digit: int) -> np.ndarray:
  """Coverage [128, 128] of one digit drawn alone in text circle `slot` of `info`'s layout."""
  x, y, r = info.layout[info.num_polygons + slot] * cp.CANVAS_SIZE
  canvas = Image.new("L", (cp.CANVAS_SIZE, cp.CANVAS_SIZE), 0)
  ImageDraw.Draw(canvas).text(
      (x, y), str(digit), font=ImageFont.load_default(size=int(r)), fill=255
  )
  return np.asarray(canvas.resize((128, 128), Image.Resampling.BICUBIC)) / 255.0


def check_image_through_layout(image: np.ndarray, info: cp.RenderInfo):
  n = info.num_polygons
  assert image.shape == (128, 128, 3) and image.dtype == np.uint8
  assert info.layout.shape == (n + 2, 3) and len(info.polygon_vertices) == n
  share = coverage(image, info)
  known = ~np.isnan(share)
  colour = np.asarray(info.colour)
  near_text = np.zeros(128 * 128, bool)
  for x0, y0, x1, y1 in info.text_boxes:
    near_text |= (
        (PIXELS[:, 0] > x0 - 3)
        & (PIXELS[:, 0] < x1 + 3)
        & (PIXELS[:, 1] > y0 - 3)
        & (PIXELS[:, 1] < y1 + 3)
    )
  near_polygon = np.zeros(128 * 128, bool)
  flat = image.reshape(-1, 3).astype(int)
  for vertices, centre, radius in zip(
      info.polygon_vertices, info.polygon_centres, info.polygon_radii
  ):
    # The polygon is regular, centred on its layout circle, with its corners on the circle.
    np.testing.assert_allclose(np.linalg.norm(vertices - centre, axis=-1), radius, rtol=1e-9)
    distances = edge_distances(PIXELS, vertices)
    inside = distances.min(axis=1) >= 1.5
    assert inside.any()
    assert np.abs(flat[inside] - colour).max() <= 2
    near_polygon |= distances.min(axis=1) > -3.0
  # Outside every shape and text box the image is the background, untouched.
  far = ~(near_polygon | near_text)
  np.testing.assert_array_equal(flat[far], info.background.reshape(-1, 3)[far])
  # Exactly N separate blobs outside the text boxes, one around each polygon centre.
  blobs, count = ndimage.label(((share > 0.5) & known & ~near_text.reshape(128, 128)))
  assert count == n
  centre_labels = {blobs[int(round(cy)), int(round(cx))] for cx, cy in info.polygon_centres}
  assert centre_labels == set(range(1, n + 1))
  # Each text circle shows its printed number: the best-matching digit template.
  for slot, number in enumerate(info.printed_numbers):
    x0, y0, x1, y1 = info.text_boxes[slot]
    box = (
        (PIXELS[:, 0] > x0 - 3)
        & (PIXELS[:, 0] < x1 + 3)
        & (PIXELS[:, 1] > y0 - 3)
        & (PIXELS[:, 1] < y1 + 3)
    ).reshape(128, 128) & known
    assert (share[box] > 0.5).sum() >= 2
    errors = [np.abs(share[box] - digit_template(info, slot, d)[box]).sum() for d in range(1, 10)]
    assert int(np.argmin(errors)) + 1 == number


def test_test_images_show_the_layout():
  for index in range(6):
    image, info = cp.test_image(0, index)
    n, v = info.num_polygons, int(info.vertices_per_polygon[0])
    assert 1 <= n <= 9 and 3 <= v <= 7 and info.is_uniform and info.numbers_match
    assert info.printed_numbers.tolist() == [n, v]
    check_image_through_layout(image, info)


def test_negatives_show_what_they_claim():
  rng = np.random.default_rng(3)
  layout = cp.circle_layout(0, 5, 11, "train")
  image, info = cp.render_image(
      rng, 3, (4, 6, 4), layout, cp.procedural_background(rng), printed_numbers=(9, 3)
  )
  assert not info.is_uniform and not info.numbers_match
  check_image_through_layout(image, info)


def test_test_image_is_a_pure_function_of_seed_and_index():
  first, info = cp.test_image(5, 17)
  again, _ = cp.test_image(5, 17)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, cp.test_image(5, 18)[0])
  assert not np.array_equal(first, cp.test_image(6, 17)[0])
  batch = cp.CountingPolygonsTask(seed=5).test_batch([17, 3])
  np.testing.assert_array_equal(batch["image"][0], cp.images_to_unit_range(first[None])[0])
  assert batch["num_polygons"][0] == info.num_polygons


def test_train_batches_and_scorer_labels():
  plain = cp.CountingPolygonsTask(seed=0).train_batch(np.random.default_rng(0), 8)
  assert plain["image"].shape == (8, 128, 128, 3) and plain["image"].dtype == np.float32
  assert plain["image"].min() >= -1 and plain["image"].max() <= 1
  assert plain["is_uniform"].all() and plain["numbers_match"].all()
  np.testing.assert_array_equal(
      plain["printed_numbers"], np.stack([plain["num_polygons"], plain["num_vertices"]], -1)
  )
  negatives = cp.CountingPolygonsTask(seed=0, nonuniform_prob=1.0, mismatch_prob=1.0)
  batch = negatives.train_batch(np.random.default_rng(1), 24)
  assert not batch["is_uniform"][batch["num_polygons"] > 1].all()
  pairs = np.sort(batch["printed_numbers"], axis=1)
  drawn = np.sort(np.stack([batch["num_polygons"], batch["num_vertices"]], -1), axis=1)
  np.testing.assert_array_equal(
      batch["numbers_match"], batch["is_uniform"] & np.all(pairs == drawn, axis=1)
  )
  assert not batch["numbers_match"].all()
  decoded = np.asarray(cpm.decode_numbers_label(batch["numbers_label"]))
  np.testing.assert_array_equal(decoded, pairs)


def test_folder_backgrounds(tmp_path):
  (tmp_path / "faces" / "00000").mkdir(parents=True)
  Image.new("RGB", (300, 200), (10, 160, 90)).save(tmp_path / "faces" / "00000" / "a.png")
  Image.new("RGB", (128, 128), (200, 200, 40)).save(tmp_path / "faces" / "b.jpg", quality=100)
  (tmp_path / "faces" / "notes.txt").write_text("not an image")
  folder = cp.folder_backgrounds(tmp_path / "faces")
  assert len(folder) == 2
  np.testing.assert_array_equal(folder[0], np.broadcast_to([10, 160, 90], (128, 128, 3)))
  image, info = cp.test_image(0, 4, background_dir=str(tmp_path / "faces"))
  np.testing.assert_array_equal(info.background, folder[0])  # 4 % 2
  check_image_through_layout(image, info)
  with pytest.raises(ValueError, match="does not exist"):
    cp.folder_backgrounds(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("")
  with pytest.raises(ValueError, match="empty.*holds no images"):
    cp.CountingPolygonsTask(background_dir=str(tmp_path / "empty"))


def test_train_images_depend_only_on_step_and_global_index():
  task = cp.CountingPolygonsTask(seed=0)
  together = cp.render_train_images(task, seed=5, step=3, example_index=np.arange(4))
  halves = np.concatenate(
      [
          cp.render_train_images(task, 5, 3, np.arange(2)),
          cp.render_train_images(task, 5, 3, np.arange(2, 4)),
      ]
  )
  np.testing.assert_array_equal(together, halves)  # any split over devices or hosts
  assert together.shape == (4, 128, 128, 3) and together.dtype == np.uint8
  assert len({im.tobytes() for im in together}) == 4
  next_step = cp.render_train_images(task, 5, 4, np.arange(2))
  assert not np.array_equal(next_step, together[:2])


@pytest.mark.parametrize("use_processes", [False, True])
def test_train_image_prefetcher_returns_steps_in_order(use_processes):
  task = cp.CountingPolygonsTask(seed=0)
  index = np.array([6, 7])
  with cp.TrainImagePrefetcher(
      task,
      seed=1,
      example_index=index,
      first_step=10,
      num_workers=2,
      prefetch=3,
      use_processes=use_processes,
  ) as feed:
    got = [feed.get() for _ in range(4)]
  for k, images in enumerate(got):
    expected = cp.render_train_images(task, 1, 10 + k, index)
    np.testing.assert_array_equal(images, expected)
  # Converted on device to exactly the host conversion.
  np.testing.assert_array_equal(
      jax.jit(cp.unit_range_on_device)(got[0]), cp.images_to_unit_range(got[0])
  )
  assert feed.wait_seconds >= 0.0


def test_train_image_prefetcher_reraises_render_errors():
  class Broken:

    def example(self, rng, split):
      raise RuntimeError("render failed")

  with cp.TrainImagePrefetcher(
      Broken(), seed=0, example_index=np.arange(2), first_step=0, num_workers=1, prefetch=2
  ) as feed:
    with pytest.raises(RuntimeError, match="render failed"):
      feed.get()


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: cp.render_image(np.random.default_rng(0), 0, 3, np.zeros((2, 3)), GREY),
            "num_polygons=0",
        ),
        (
            lambda: cp.render_image(np.random.default_rng(0), 10, 3, np.zeros((12, 3)), GREY),
            "num_polygons=10",
        ),
        (
            lambda: cp.render_image(np.random.default_rng(0), 2, 8, BIG_LAYOUT, GREY),
            "num_vertices=8",
        ),
        (
            lambda: cp.render_image(np.random.default_rng(0), 2, (3, 2), BIG_LAYOUT, GREY),
            "num_vertices=2",
        ),
        (
            lambda: cp.render_image(np.random.default_rng(0), 2, (3, 4, 5), BIG_LAYOUT, GREY),
            "num_vertices",
        ),
        (
            lambda: cp.render_image(np.random.default_rng(0), 2, 4, BIG_LAYOUT, GREY, (0, 4)),
            "num_polygons=0",
        ),
        (lambda: cp.render_image(np.random.default_rng(0), 3, 4, BIG_LAYOUT, GREY), r"\(4, 3\)"),
        (
            lambda: cp.render_image(np.random.default_rng(0), 2, 4, BIG_LAYOUT, GREY[:64]),
            r"\(64, 128, 3\)",
        ),
        (lambda: cp.images_to_unit_range(np.zeros((2, 64, 64, 3), np.uint8)), r"\(2, 64, 64, 3\)"),
        (lambda: cp.circle_layout(0, 12, 0), "num_circles=12"),
        (lambda: cp.circle_layout(0, 5, 5000, "test"), "index=5000"),
        (lambda: cp.circle_layout(0, 5, 0, "val"), "split='val'"),
        (lambda: cp.test_image(0, -1), "index=-1"),
        (lambda: cp.CountingPolygonsTask(mismatch_prob=1.5), "mismatch_prob=1.5"),
    ],
)
def test_bad_input_raises_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# ------------------------------------------------------------------------------------------------
# Metrics.


def test_numbers_label_enumeration():
  pairs = cpm.NUMBERS_PAIRS
  distinct = {(min(p, v), max(p, v)) for p in range(1, 10) for v in range(3, 8)}
  assert len(pairs) == len(set(pairs)) == len(distinct) == 35 and set(pairs) == distinct
  assert pairs[:10] == (
      (1, 3),
      (2, 3),
      (3, 3),
      (3, 4),
      (3, 5),
      (3, 6),
      (3, 7),
      (3, 8),
      (3, 9),
      (1, 4),
  )
  for p, v in itertools.product(range(1, 10), range(3, 8)):
    assert pairs[int(cpm.numbers_label(p, v))] == (min(p, v), max(p, v))
  assert cpm.numbers_label(5, 3) == cpm.numbers_label(3, 5)
  decoded = jax.jit(cpm.decode_numbers_label)(jnp.arange(35))
  np.testing.assert_array_equal(decoded, np.asarray(pairs))


def one_hot_logits(polygons, vertices, uniform, printed, scale=10.0):
  """Logits whose argmaxes are the given counts; printed: list of (polygons, vertices)."""
  labels = cpm.numbers_label(*np.asarray(printed).T)
  return {
      "num_polygons": scale * jax.nn.one_hot(np.asarray(polygons) - 1, 9),
      "num_vertices": scale * jax.nn.one_hot(np.asarray(vertices) - 3, 5),
      "is_uniform": scale * jax.nn.one_hot(np.asarray(uniform, int), 2),
      "numbers_label": scale * jax.nn.one_hot(labels, 35),
  }


def test_metrics_on_constructed_batches():
  # Uniform and matching (in either printed order).
  good = cpm.counting_polygons_metrics(one_hot_logits([4, 5], [5, 4], [1, 1], [(4, 5), (4, 5)]))
  assert good["are_vertices_uniform"] == 1.0 and good["numbers_match_objects"] == 1.0
  # Non-uniform, wrong numbers, and one of each.
  logits = one_hot_logits(
      polygons=[4, 5, 3, 2],
      vertices=[5, 4, 6, 3],
      uniform=[1, 1, 0, 1],
      printed=[(4, 5), (5, 4), (3, 6), (2, 4)],
  )
  metrics = cpm.counting_polygons_metrics(logits)
  assert metrics["are_vertices_uniform"] == pytest.approx(0.75)
  assert metrics["numbers_match_objects"] == pytest.approx(0.75)
  assert metrics["are_numbers_consistent"] == metrics["numbers_match_objects"]
  np.testing.assert_allclose(
      metrics["polygons_count_frequency"], [0, 0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0]
  )
  np.testing.assert_allclose(metrics["vertex_count_frequency"], [0.25, 0.25, 0.25, 0.25, 0])
  assert metrics["relative_polygons_count_2"] == pytest.approx(0.25)
  assert metrics["relative_vertex_count_7"] == 0.0
  for head, classes in cpm.HEAD_CLASSES.items():  # softmax maximum of a one-hot * 10
    expected = np.exp(10.0) / (np.exp(10.0) + classes - 1)
    assert metrics[f"{head}_confidence"] == pytest.approx(expected, rel=1e-5)
  wrong = cpm.counting_polygons_metrics(one_hot_logits([1, 9], [7, 3], [1, 0], [(2, 7), (8, 3)]))
  assert wrong["numbers_match_objects"] == 0.0 and wrong["are_vertices_uniform"] == 0.5
  per_image = cpm.per_image_predictions(logits)
  np.testing.assert_array_equal(per_image["numbers_match"], [True, True, True, False])
  np.testing.assert_array_equal(per_image["printed_pair"], [[4, 5], [4, 5], [3, 6], [2, 4]])


def test_oracle_scorer_on_generated_images():
  """A scorer that reads the true labels gives the data's own match and uniform rates."""
  task = cp.CountingPolygonsTask(seed=2, nonuniform_prob=0.5, mismatch_prob=0.5)
  batch = task.test_batch(range(10))
  logits = one_hot_logits(
      batch["num_polygons"], batch["num_vertices"], batch["is_uniform"], batch["printed_numbers"]
  )
  metrics = cpm.metrics_of_images(
      batch["image"], lambda images: {k: v[: len(images)] for k, v in logits.items()}, batch_size=16
  )
  pairs = np.sort(batch["printed_numbers"], axis=1)
  drawn = np.sort(np.stack([batch["num_polygons"], batch["num_vertices"]], -1), axis=1)
  assert metrics["numbers_match_objects"] == pytest.approx(np.all(pairs == drawn, 1).mean())
  assert metrics["are_vertices_uniform"] == pytest.approx(batch["is_uniform"].mean())


@pytest.mark.parametrize(
    "logits, message",
    [
        ({"num_polygons": np.zeros((2, 9))}, "lack heads"),
        (
            {**one_hot_logits([1], [3], [1], [(1, 3)]), "num_polygons": np.zeros((1, 8))},
            r"logits\['num_polygons'\] of shape \(1, 8\)",
        ),
        (
            {**one_hot_logits([1], [3], [1], [(1, 3)]), "numbers_label": np.zeros((2, 35))},
            "batch 2",
        ),
    ],
)
def test_metrics_bad_logits(logits, message):
  with pytest.raises(ValueError, match=message):
    cpm.counting_polygons_metrics(logits)


def test_metrics_bad_values_and_images():
  with pytest.raises(ValueError, match="num_polygons=0"):
    cpm.numbers_label(0, 3)
  with pytest.raises(ValueError, match="num_vertices=8"):
    cpm.numbers_label(3, 8)
  with pytest.raises(ValueError, match=r"\(2, 64, 64, 3\)"):
    cpm.metrics_of_images(np.zeros((2, 64, 64, 3)), lambda x: None)
