"""Counting Polygons images (spec §5.3), rendered on the host with Pillow.

An image (128x128 RGB) shows N filled regular polygons (N in 1..9), all with V vertices (V in
3..7), each in its own circle of a non-overlapping circle layout with N + 2 circles, and the two
numbers N and V printed in the last two circles. The task for a generative model is to keep the
polygons uniform and the printed numbers equal to what is drawn.

Rendering follows the reference:
1. a layout of N + 2 circles (x, y, r), normalised to [0, 1], scaled to a 512x512 canvas;
2. per polygon a rotation offset a ~ U[0, 2pi) and vertices centre + r (cos, sin)(2pi k / V + a);
3. one colour for everything: the hue least present in the background (a 256-bin hue histogram of
   the background in PIL's HSV, circularly padded, blurred with a 255-tap Gaussian of sigma 26,
   argmin / 255), at saturation 1.0 and value 0.9, RGB truncated to integers;
4. on a transparent RGBA canvas: the polygons filled, then str(N) and str(V) in the last two
   circles at font size int(r), with (x, y) as the text's top-left (PIL's default 'la' anchor);
5. canvas resized to 128 (BICUBIC), alpha-composited over the background, converted to RGB.
   Everything has one colour, so only the canvas's alpha is drawn and resized, and the colour is
   blended in with it (`Image.composite`): the same image as the RGBA path up to rounding at
   anti-aliased edges (the reference's RGBA resize goes through premultiplied RGBa, which rounds
   differently there: in one measured image 1% of pixels differed, by at most 17 levels).

Circle layouts are generated here (`circle_layout`): rejection sampling of N + 2 circles with radii
U[0.06, 0.12] (normalised), each inside the canvas, and centres at least 1.25 (r_i + r_j) apart, so
the polygons (within r of the centre) and the printed digits (within 1.17 r: the font's digit box
is at most 0.6 r wide and reaches 1.0 r down from the centre) never touch. Layout i of a split is a
pure function of (seed, split, num_circles, i); train and test layouts come from distinct seed
streams, 95,000 and 5,000 per circle count like the reference file, so the two sets are disjoint.

Backgrounds: procedural by default (`procedural_background`: a smooth random colour field around
one or two base hues with value-noise and stripe texture, so the colour rule has hues to avoid), or
images from a folder (`FolderBackgrounds`, e.g. FFHQ at 128x128; files in any subfolders, relative
resize + centre crop as spec §5), named by `background_dir`.

Usage::

  task = CountingPolygonsTask(seed=0)                  # procedural backgrounds
  batch = task.train_batch(np.random.default_rng(0), 32)   # dict of numpy arrays, see train_batch
  image, info = test_image(seed=0, index=7)            # uint8 [128, 128, 3], RenderInfo
  with TrainImagePrefetcher(task, seed=0, example_index=np.arange(32), first_step=0) as feed:
    images = feed.get()                                  # uint8 [32, 128, 128, 3], step 0

Render throughput (`train_batch`, batch 32, procedural backgrounds), measured on this project's
development host: 2 CPU cores shared with other jobs (load average 5-6 during the runs), so the
numbers are lower bounds for a free core. Inline, one thread: about 140 images/s (per image about
3.2 ms background, 0.5 ms layout, 3.2 ms drawing, resizing and compositing); two processes
rendering separate chunks: about 170-285 images/s. SRM training renders on the host with
`TrainImagePrefetcher` (threads or processes, whole steps in flight, returned in step order) and
logs the fraction of time it waited for images (`input_wait`); see ipr_jax/train.py.

Deviations from the reference, on purpose:
* layouts are generated rather than read from `circle_position_radius.npy` (unavailable);
* the font is Pillow's built-in scalable Aileron Regular (`ImageFont.load_default(size)`, Pillow
  >= 10.1 with FreeType; a subset of Aileron by Sora Sagano, dotcolon.net, released under CC0 1.0,
  shipped inside Pillow, so no font file is needed) instead of Roboto-Regular.ttf;
* backgrounds are procedural unless a folder is given (the reference uses FFHQ);
* randomness: test image i is a pure function of (seed, i) drawn as N ~ U{1..9}, a test layout
  index ~ U{0..4999}, V ~ U{3..7}, the angles, and (procedural) the background, from
  `numpy.random.default_rng([seed, 1, i])`; the reference instead maps index -> (N = i // 5000 + 1,
  layout i % 5000) and seeds `default_rng(i)`. With a folder, test image i uses background
  i % len(folder) like the reference (which has no background train/test split either).

Why over 600 lines: one rendering pipeline (label space, layouts, colour rule, drawing,
backgrounds, the training-image prefetcher) whose steps the reference defines together and whose
constants every step reads; split up, each piece would import most of the others.
"""

import collections
import colorsys
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 128
CANVAS_SIZE = 512
# The task's label space (also the scorer's classes, `HEAD_CLASSES`).
MIN_POLYGONS, MAX_POLYGONS = 1, 9
MIN_VERTICES, MAX_VERTICES = 3, 7
NUM_TEXT_CIRCLES = 2
MIN_CIRCLES, MAX_CIRCLES = MIN_POLYGONS + NUM_TEXT_CIRCLES, MAX_POLYGONS + NUM_TEXT_CIRCLES
NUM_LAYOUTS = {"train": 95_000, "test": 5_000}
RADIUS_RANGE = (0.06, 0.12)
CIRCLE_SPACING = 1.25
COLOUR_SATURATION, COLOUR_VALUE = 1.0, 0.9
HUE_BLUR_TAPS, HUE_BLUR_SIGMA = 255, 26.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_SPLIT_STREAMS = {"train": 0, "test": 1}
_TEST_IMAGE_STREAM = 1
_TRAIN_IMAGE_STREAM = 3
_CANDIDATES_PER_TRY = 64
_TRIES_PER_CIRCLE = 16
_MAX_RESTARTS = 1000
# ToTensor + Normalize(0.5, 0.5) in float32, as torchvision computes it.
_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
_U8_TO_UNIT = ((np.arange(256, dtype=np.float32) / np.float32(255)) - np.float32(0.5)) / np.float32(
    0.5
)


# ------------------------------------------------------------------------------------------------
# Validation.


def _numbers_pairs() -> tuple[tuple[int, int], ...]:
  """The 'ambiguous' labeler's classes: unordered pairs {min, max} of (vertices, polygons).

  Enumerated with vertices in the outer loop and polygons in the inner loop, each new pair taking
  the next class: (1, 3), (2, 3), (3, 3), (3, 4), ..., (3, 9), (1, 4), (2, 4), (4, 4), ...
  """
  pairs = []
  for vertices in range(MIN_VERTICES, MAX_VERTICES + 1):
    for polygons in range(MIN_POLYGONS, MAX_POLYGONS + 1):
      pair = (min(vertices, polygons), max(vertices, polygons))
      if pair not in pairs:
        pairs.append(pair)
  return tuple(pairs)


NUMBERS_PAIRS = _numbers_pairs()
NUM_NUMBERS_CLASSES = len(NUMBERS_PAIRS)  # 35
# An image, NHWC without the batch; and the classes of each head of the scorer (the metrics'
# label space, ipr_jax/metrics/counting_polygons.py).
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
HEAD_CLASSES = {
    "num_polygons": MAX_POLYGONS - MIN_POLYGONS + 1,
    "num_vertices": MAX_VERTICES - MIN_VERTICES + 1,
    "is_uniform": 2,
    "numbers_label": NUM_NUMBERS_CLASSES,
}

# int32 [MAX_POLYGONS + 1, MAX_VERTICES + 1]: class of (polygons, vertices); -1 outside the ranges.
_LABEL_TABLE = np.full((MAX_POLYGONS + 1, MAX_VERTICES + 1), -1, np.int32)
for _p in range(MIN_POLYGONS, MAX_POLYGONS + 1):
  for _v in range(MIN_VERTICES, MAX_VERTICES + 1):
    _LABEL_TABLE[_p, _v] = NUMBERS_PAIRS.index((min(_p, _v), max(_p, _v)))


def check_counts(num_polygons, num_vertices) -> tuple[np.ndarray, np.ndarray]:
  """Validates concrete counts: polygons in 1..9 and vertices in 3..7 (ValueError naming them)."""
  num_polygons = np.asarray(num_polygons)
  num_vertices = np.asarray(num_vertices)
  for name, values, lo, hi in (
      ("num_polygons", num_polygons, MIN_POLYGONS, MAX_POLYGONS),
      ("num_vertices", num_vertices, MIN_VERTICES, MAX_VERTICES),
  ):
    if not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"{name}={values.tolist()!r}: expected integers in {lo}..{hi}")
    bad = values[(values < lo) | (values > hi)]
    if bad.size:
      raise ValueError(f"{name}={bad.ravel()[0].item()} is outside {lo}..{hi}")
  return num_polygons.astype(np.int32), num_vertices.astype(np.int32)


def numbers_label(num_polygons, num_vertices) -> np.ndarray:
  """Class (0..34) of the printed pair (num_polygons, num_vertices), order-free.

  Args:
    num_polygons: int or int array, 1..9.
    num_vertices: int or int array of the same shape, 3..7.

  Returns:
    int32 array of that shape.
  """
  num_polygons, num_vertices = check_counts(num_polygons, num_vertices)
  return _LABEL_TABLE[num_polygons, num_vertices]


def check_images(images) -> None:
  """Raises ValueError unless `images` is a batch [B, 128, 128, 3] with B >= 1."""
  shape = tuple(np.shape(images))
  if len(shape) != 4 or shape[1:] != IMAGE_SHAPE or shape[0] < 1:
    raise ValueError(
        f"Counting Polygons images of shape {shape}: expected [B, 128, 128, 3] " "(NHWC, B >= 1)"
    )


def check_num_polygons(num_polygons) -> int:
  """N as an int in 1..9, else ValueError naming it."""
  if isinstance(num_polygons, (bool, np.bool_)) or not isinstance(num_polygons, (int, np.integer)):
    raise ValueError(
        f"num_polygons={num_polygons!r}: expected an int in " f"{MIN_POLYGONS}..{MAX_POLYGONS}"
    )
  if not MIN_POLYGONS <= num_polygons <= MAX_POLYGONS:
    raise ValueError(f"num_polygons={num_polygons} is outside {MIN_POLYGONS}..{MAX_POLYGONS}")
  return int(num_polygons)


def check_num_vertices(num_vertices, num_polygons: int) -> np.ndarray:
  """int64 [N] per-polygon vertex counts from an int or a sequence of N ints in 3..7."""
  values = np.asarray(num_vertices)
  if values.ndim == 0:
    values = np.full(num_polygons, values)
  if values.shape != (num_polygons,) or not np.issubdtype(values.dtype, np.integer):
    raise ValueError(
        f"num_vertices={num_vertices!r}: expected an int or {num_polygons} ints "
        f"in {MIN_VERTICES}..{MAX_VERTICES}"
    )
  bad = values[(values < MIN_VERTICES) | (values > MAX_VERTICES)]
  if bad.size:
    raise ValueError(f"num_vertices={bad[0].item()} is outside {MIN_VERTICES}..{MAX_VERTICES}")
  return values.astype(np.int64)


def check_background(background) -> np.ndarray:
  """uint8 [128, 128, 3], else ValueError naming the shape or dtype."""
  background = np.asarray(background)
  if background.shape != (IMAGE_SIZE, IMAGE_SIZE, 3) or background.dtype != np.uint8:
    raise ValueError(
        f"background of shape {background.shape} and dtype {background.dtype}: "
        f"expected uint8 [{IMAGE_SIZE}, {IMAGE_SIZE}, 3]"
    )
  return background


def _check_split(split: str) -> str:
  if split not in NUM_LAYOUTS:
    raise ValueError(f"split={split!r}: expected one of {tuple(NUM_LAYOUTS)}")
  return split


def _check_seed(seed) -> int:
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r}: expected a non-negative int")
  return int(seed)


# ------------------------------------------------------------------------------------------------
# Circle layouts.


def _place_circles(rng: np.random.Generator, num_circles: int) -> np.ndarray | None:
  """One rejection-sampling attempt: largest circles first; None if a circle finds no place."""
  radii = np.sort(rng.uniform(*RADIUS_RANGE, size=num_circles))[::-1]
  placed = np.zeros((0, 3))
  for r in radii:
    for _ in range(_TRIES_PER_CIRCLE):
      centres = rng.uniform(r, 1.0 - r, size=(_CANDIDATES_PER_TRY, 2))
      gaps = np.linalg.norm(centres[:, None, :] - placed[None, :, :2], axis=-1)
      fits = np.all(gaps >= CIRCLE_SPACING * (r + placed[None, :, 2]), axis=1)
      if fits.any():
        placed = np.concatenate([placed, [[*centres[np.argmax(fits)], r]]])
        break
    else:
      return None
  return placed


def circle_layout(seed: int, num_circles: int, index: int, split: str = "train") -> np.ndarray:
  """Layout `index` of a split: float64 [num_circles, 3] normalised (x, y, r), random order.

  A pure function of (seed, split, num_circles, index). Every circle lies inside [0, 1]^2 and
  centres are at least CIRCLE_SPACING (r_i + r_j) apart.

  Args:
    seed: non-negative int, the layout-set seed.
    num_circles: 3..11 (N polygons + 2 number circles).
    index: 0 <= index < NUM_LAYOUTS[split].
    split: 'train' or 'test'; the two splits use distinct seed streams.
  """
  seed = _check_seed(seed)
  _check_split(split)
  if not MIN_CIRCLES <= num_circles <= MAX_CIRCLES:
    raise ValueError(f"num_circles={num_circles} is outside {MIN_CIRCLES}..{MAX_CIRCLES}")
  if not 0 <= index < NUM_LAYOUTS[split]:
    raise ValueError(f"layout index={index} is outside 0..{NUM_LAYOUTS[split] - 1} ({split})")
  rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], num_circles, index])
  for _ in range(_MAX_RESTARTS):
    layout = _place_circles(rng, num_circles)
    if layout is not None:
      return layout[rng.permutation(num_circles)]
  raise RuntimeError(f"no layout of {num_circles} circles after {_MAX_RESTARTS} restarts")


def circle_layouts(seed: int, num_circles: int, count: int, split: str = "train") -> np.ndarray:
  """Layouts 0..count-1 of a split: float64 [count, num_circles, 3] (see `circle_layout`)."""
  _check_split(split)
  if not 0 <= count <= NUM_LAYOUTS[split]:
    raise ValueError(f"count={count} is outside 0..{NUM_LAYOUTS[split]} ({split})")
  layouts = [circle_layout(seed, num_circles, i, split) for i in range(count)]
  return np.stack(layouts) if layouts else np.zeros((0, num_circles, 3))


# ------------------------------------------------------------------------------------------------
# Backgrounds and colour.


@functools.lru_cache(maxsize=None)
def _upsample_matrix(grid: int) -> np.ndarray:
  """float32 [128, grid]: cubic-convolution (a = -0.5) upsampling of `grid` samples to 128.

  Sample k sits at the centre of its cell, (k + 0.5) / grid; edges repeat the border sample.
  """
  position = (np.arange(IMAGE_SIZE) + 0.5) * grid / IMAGE_SIZE - 0.5
  base = np.floor(position).astype(np.int64)
  matrix = np.zeros((IMAGE_SIZE, grid), np.float64)
  for tap in range(-1, 3):
    distance = np.abs(position - (base + tap))
    weight = np.where(
        distance <= 1,
        1.5 * distance**3 - 2.5 * distance**2 + 1,
        np.where(distance < 2, -0.5 * distance**3 + 2.5 * distance**2 - 4 * distance + 2, 0.0),
    )
    np.add.at(matrix, (np.arange(IMAGE_SIZE), np.clip(base + tap, 0, grid - 1)), weight)
  return matrix.astype(np.float32)


def _smooth_field(rng: np.random.Generator, grid: int, channels: int) -> np.ndarray:
  """float32 [channels, 128, 128]: U[0, 1) noise on a grid x grid lattice, bicubic-upsampled."""
  matrix = _upsample_matrix(grid)
  coarse = rng.random((channels, grid, grid), dtype=np.float32)
  # einsum's own loops: a BLAS matmul here may start threads, which costs milliseconds when the
  # host's cores are busy.
  return np.einsum("cik,lk->cil", np.einsum("ij,cjk->cik", matrix, coarse), matrix)


def _hsv_to_rgb_u8(hue, saturation, value) -> np.ndarray:
  """uint8 [128, 128, 3] RGB of float HSV fields [128, 128] (hue mod 1), via PIL's HSV."""
  channels = [
      np.clip(np.floor(c * 256.0), 0, 255).astype(np.uint8) for c in (hue % 1.0, saturation, value)
  ]
  hsv = Image.merge("HSV", [Image.fromarray(c) for c in channels])
  return np.asarray(hsv.convert("RGB"))


def procedural_background(rng: np.random.Generator) -> np.ndarray:
  """A random textured colour field: uint8 [128, 128, 3].

  Hues stay within about +-0.1 of one or two base hues (so much of the hue circle is free for the
  polygon colour); saturation and value vary smoothly; value noise on 16 and 32 cells and a random
  stripe pattern add texture.
  """
  base = rng.random()
  second = base + rng.choice([0.0, rng.uniform(0.15, 0.35)])
  low = _smooth_field(rng, int(rng.integers(2, 6)), 4)
  mix = np.clip((low[3] - 0.5) * 6.0 + 0.5, 0.0, 1.0)
  hue = base + (second - base) * mix + 0.15 * (low[0] - 0.5)
  saturation = 0.15 + 0.75 * low[1]
  value = 0.25 + 0.6 * low[2]
  texture = 0.12 * (_smooth_field(rng, 16, 1)[0] - 0.5) + 0.06 * (
      _smooth_field(rng, 32, 1)[0] - 0.5
  )
  angle, frequency = rng.uniform(0, np.pi), rng.uniform(0.1, 0.6)
  stripes = np.sin(
      frequency * (_GRID_X * np.cos(angle) + _GRID_Y * np.sin(angle)) + rng.uniform(0, 2 * np.pi)
  )
  value = value + texture + rng.uniform(0.0, 0.06) * stripes
  return _hsv_to_rgb_u8(hue, np.clip(saturation, 0, 1), np.clip(value, 0, 1))


def relative_resize_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
  """Spec §5 steps 2-3: halve (BOX) while both sides >= 2 size, BICUBIC to cover, centre crop."""
  while image.width >= 2 * size and image.height >= 2 * size:
    image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
  scale = size / min(image.width, image.height)
  covered = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
  if covered != image.size:
    image = image.resize(covered, Image.Resampling.BICUBIC)
  left = int(round((image.width - size) / 2.0))
  top = int(round((image.height - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


class FolderBackgrounds:
  """Background images from a local folder (searched recursively), as uint8 [128, 128, 3].

  Files with suffixes IMAGE_SUFFIXES, sorted by path; each is loaded on demand, converted to RGB,
  relative-resized and centre-cropped to 128.
  """

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    if not self.path.is_dir():
      raise ValueError(f"background folder {str(self.path)!r} does not exist")
    self.files = sorted(
        p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not self.files:
      raise ValueError(
          f"background folder {str(self.path)!r} holds no images "
          f"(looked for {', '.join(IMAGE_SUFFIXES)})"
      )

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> np.ndarray:
    with Image.open(self.files[index % len(self.files)]) as image:
      return np.asarray(relative_resize_crop(image.convert("RGB")))

  def sample(self, rng: np.random.Generator) -> np.ndarray:
    return self[int(rng.integers(len(self.files)))]


def folder_backgrounds(path: str | pathlib.Path) -> FolderBackgrounds:
  """The images of a folder as backgrounds (ValueError if it is missing or holds no images)."""
  return FolderBackgrounds(path)


@functools.lru_cache(maxsize=1)
def _hue_blur_kernel() -> np.ndarray:
  offsets = np.arange(HUE_BLUR_TAPS) - HUE_BLUR_TAPS // 2
  kernel = np.exp(-0.5 * (offsets / HUE_BLUR_SIGMA) ** 2)
  return kernel / kernel.sum()


def polygon_colour(background: np.ndarray) -> tuple[int, int, int]:
  """RGB of the hue least present in the background, at S = 1.0, V = 0.9 (spec §5.3 step 3)."""
  hue = np.asarray(Image.fromarray(check_background(background)).convert("HSV"))[..., 0]
  histogram = np.bincount(hue.ravel(), minlength=256).astype(np.float64)
  pad = HUE_BLUR_TAPS // 2
  padded = np.concatenate([histogram[-pad:], histogram, histogram[:pad]])
  blurred = np.convolve(padded, _hue_blur_kernel(), mode="valid")
  rgb = colorsys.hsv_to_rgb(np.argmin(blurred) / 255.0, COLOUR_SATURATION, COLOUR_VALUE)
  return tuple(int(255 * c) for c in rgb)


# ------------------------------------------------------------------------------------------------
# Rendering.


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=size)


def _to_image_coords(canvas_xy: np.ndarray) -> np.ndarray:
  """Canvas pixel coordinates -> output pixel coordinates (pixel (i, j) centred at (i, j))."""
  scale = IMAGE_SIZE / CANVAS_SIZE
  return (np.asarray(canvas_xy, np.float64) + 0.5) * scale - 0.5


@dataclasses.dataclass(frozen=True)
class RenderInfo:
  """What an image shows. Coordinates are output pixels (x right, y down, pixel (i, j) at (i, j)).

  Attributes:
    num_polygons: N.
    vertices_per_polygon: int64 [N].
    printed_numbers: int64 [2], the numbers printed in the two text circles, in that order.
    layout: float64 [N + 2, 3], the normalised (x, y, r) used; the last two hold the numbers.
    angle_offsets: float64 [N] rotation of each polygon (radians).
    polygon_centres: float64 [N, 2]; polygon_radii: float64 [N].
    polygon_vertices: tuple of N float64 [v_i, 2].
    text_boxes: float64 [2, 4] (x0, y0, x1, y1) bounding the two printed numbers.
    colour: (r, g, b) of polygons and numbers.
    background: uint8 [128, 128, 3], the image under the shapes.
  """

  num_polygons: int
  vertices_per_polygon: np.ndarray
  printed_numbers: np.ndarray
  layout: np.ndarray
  angle_offsets: np.ndarray
  polygon_centres: np.ndarray
  polygon_radii: np.ndarray
  polygon_vertices: tuple[np.ndarray, ...]
  text_boxes: np.ndarray
  colour: tuple[int, int, int]
  background: np.ndarray

  @property
  def is_uniform(self) -> bool:
    return bool(np.all(self.vertices_per_polygon == self.vertices_per_polygon[0]))

  @property
  def numbers_match(self) -> bool:
    """Uniform and the printed pair equals (N, V) in either order (the scorer's 'consistent')."""
    drawn = sorted((self.num_polygons, int(self.vertices_per_polygon[0])))
    return self.is_uniform and sorted(self.printed_numbers.tolist()) == drawn


def render_image(
    rng: np.random.Generator,
    num_polygons: int,
    num_vertices,
    layout: np.ndarray,
    background: np.ndarray,
    printed_numbers: Sequence[int] | None = None,
) -> tuple[np.ndarray, RenderInfo]:
  """Draws one Counting Polygons image.

  Args:
    rng: draws the N rotation offsets.
    num_polygons: N in 1..9.
    num_vertices: V in 3..7 for all polygons, or N per-polygon counts (scorer negatives).
    layout: [N + 2, 3] normalised (x, y, r) circles; the first N hold polygons, the last two the
      printed numbers.
    background: uint8 [128, 128, 3].
    printed_numbers: (polygons, vertices) to print, each in its range; default (N, first V).

  Returns:
    (uint8 [128, 128, 3] image, RenderInfo).
  """
  num_polygons = check_num_polygons(num_polygons)
  vertices = check_num_vertices(num_vertices, num_polygons)
  layout = np.asarray(layout, np.float64)
  if layout.shape != (num_polygons + NUM_TEXT_CIRCLES, 3):
    raise ValueError(
        f"layout of shape {layout.shape}: expected [{num_polygons + 2}, 3] for "
        f"num_polygons={num_polygons}"
    )
  if not np.all((layout >= 0.0) & (layout <= 1.0)):
    raise ValueError("layout values must be normalised to [0, 1]")
  background = check_background(background)
  if printed_numbers is None:
    printed_numbers = (num_polygons, int(vertices[0]))
  printed = np.asarray(printed_numbers)
  if printed.shape != (2,):
    raise ValueError(f"printed_numbers={printed_numbers!r}: expected (polygons, vertices)")
  check_counts(printed[0], printed[1])
  printed = printed.astype(np.int64)

  angles = rng.uniform(0.0, 2.0 * np.pi, size=num_polygons)
  colour = polygon_colour(background)
  # Everything is drawn in one colour, so the RGBA canvas of the reference reduces to its alpha:
  # resizing the premultiplied canvas and compositing equals blending with the resized mask.
  mask = Image.new("L", (CANVAS_SIZE, CANVAS_SIZE), 0)
  draw = ImageDraw.Draw(mask)
  xyr = layout * CANVAS_SIZE
  polygon_vertices = []
  for (x, y, r), count, angle in zip(xyr[:num_polygons], vertices, angles):
    theta = 2.0 * np.pi * np.arange(count) / count + angle
    points = np.stack([x + r * np.cos(theta), y + r * np.sin(theta)], axis=-1)
    draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    polygon_vertices.append(_to_image_coords(points))
  boxes = []
  for (x, y, r), number in zip(xyr[num_polygons:], printed):
    font = _font(int(r))
    draw.text((x, y), str(number), font=font, fill=255)
    x0, y0, x1, y1 = draw.textbbox((x, y), str(number), font=font)
    boxes.append([*_to_image_coords([x0 - 0.5, y0 - 0.5]), *_to_image_coords([x1 - 0.5, y1 - 0.5])])
  alpha = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
  image = Image.composite(
      Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour), Image.fromarray(background), alpha
  )
  info = RenderInfo(
      num_polygons=num_polygons,
      vertices_per_polygon=vertices,
      printed_numbers=printed,
      layout=layout,
      angle_offsets=angles,
      polygon_centres=_to_image_coords(xyr[:num_polygons, :2]),
      polygon_radii=xyr[:num_polygons, 2] * IMAGE_SIZE / CANVAS_SIZE,
      polygon_vertices=tuple(polygon_vertices),
      text_boxes=np.asarray(boxes),
      colour=colour,
      background=background,
  )
  return np.asarray(image), info


def check_image_geometry(image_size: int, channels: int) -> None:
  """Raises ValueError unless a config's (data.image_size, data.channels) is (128, 3)."""
  if (image_size, channels) != (IMAGE_SIZE, 3):
    raise ValueError(
        f"counting_polygons images are {IMAGE_SIZE}x{IMAGE_SIZE} RGB; "
        f"data.image_size={image_size}, data.channels={channels}"
    )


def unit_range_on_device(images_u8: jax.Array) -> jax.Array:
  """`images_to_unit_range` under jit: the same float32 values, by the same lookup table."""
  return jnp.asarray(_U8_TO_UNIT)[images_u8.astype(jnp.int32)]


def images_to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [B, 128, 128, 3] -> float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
  images = np.asarray(images)
  if (
      images.ndim != 4
      or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)
      or images.dtype != np.uint8
  ):
    raise ValueError(
        f"image batch of shape {images.shape} and dtype {images.dtype}: expected "
        f"uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3]"
    )
  return _U8_TO_UNIT.take(images)


# ------------------------------------------------------------------------------------------------
# The task: random training examples and deterministic test images.


@dataclasses.dataclass(frozen=True)
class CountingPolygonsTask:
  """Host-side Counting Polygons generator.

  Attributes:
    seed: seeds the layout sets and the test images.
    background_dir: a folder of background images; None = procedural backgrounds.
    nonuniform_prob: probability (when N > 1) that each polygon draws its own V ~ U{3..7}
      (negatives for the scorer; the reference's scorer data uses 0.5, the generative model 0).
    mismatch_prob: probability that the printed numbers are drawn independently, polygons
      ~ U{1..9} and vertices ~ U{3..7} (the reference's scorer data: 1.0; generative model: 0).
  """

  seed: int = 0
  background_dir: str | None = None
  nonuniform_prob: float = 0.0
  mismatch_prob: float = 0.0

  def __post_init__(self):
    _check_seed(self.seed)
    for name in ("nonuniform_prob", "mismatch_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value}: must be in [0, 1]")
    if self.background_dir is not None:
      object.__setattr__(self, "_folder", folder_backgrounds(self.background_dir))

  def _background(self, rng: np.random.Generator, index: int | None) -> np.ndarray:
    folder = getattr(self, "_folder", None)
    if folder is None:
      return procedural_background(rng)
    return folder.sample(rng) if index is None else folder[index]

  def example(
      self, rng: np.random.Generator, split: str = "train", index: int | None = None
  ) -> tuple[np.ndarray, RenderInfo]:
    """One random image of a split's layouts: (uint8 [128, 128, 3], RenderInfo)."""
    num_polygons = int(rng.integers(MIN_POLYGONS, MAX_POLYGONS + 1))
    layout = circle_layout(
        self.seed,
        num_polygons + NUM_TEXT_CIRCLES,
        int(rng.integers(NUM_LAYOUTS[_check_split(split)])),
        split,
    )
    if split == "train":
      layout = layout[rng.permutation(len(layout))]
    if num_polygons > 1 and rng.random() < self.nonuniform_prob:
      vertices = rng.integers(MIN_VERTICES, MAX_VERTICES + 1, size=num_polygons)
    else:
      vertices = np.full(num_polygons, rng.integers(MIN_VERTICES, MAX_VERTICES + 1))
    printed = (num_polygons, int(vertices[0]))
    if rng.random() < self.mismatch_prob:
      printed = (
          int(rng.integers(MIN_POLYGONS, MAX_POLYGONS + 1)),
          int(rng.integers(MIN_VERTICES, MAX_VERTICES + 1)),
      )
    background = self._background(rng, index)
    return render_image(rng, num_polygons, vertices, layout, background, printed)

  def test_image(self, index: int) -> tuple[np.ndarray, RenderInfo]:
    """Test image `index` (>= 0): a pure function of (task, index)."""
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
      raise ValueError(f"test image index={index!r}: expected a non-negative int")
    rng = np.random.default_rng([self.seed, _TEST_IMAGE_STREAM, int(index)])
    return self.example(rng, "test", int(index))

  def collate(self, examples) -> dict[str, np.ndarray]:
    """(image, RenderInfo) pairs -> a batch dict (keys as `train_batch`)."""
    images, infos = zip(*examples)
    printed = np.stack([info.printed_numbers for info in infos]).astype(np.int32)
    return {
        "image": images_to_unit_range(np.stack(images)),
        "num_polygons": np.asarray([i.num_polygons for i in infos], np.int32),
        "num_vertices": np.asarray([i.vertices_per_polygon[0] for i in infos], np.int32),
        "is_uniform": np.asarray([i.is_uniform for i in infos]),
        "printed_numbers": printed,
        "numbers_label": numbers_label(printed[:, 0], printed[:, 1]),
        "numbers_match": np.asarray([i.numbers_match for i in infos]),
    }

  def train_batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
    """A random training batch from the train layouts, as numpy arrays.

    Returns:
      {'image': float32 [B, 128, 128, 3] in [-1, 1], 'num_polygons': int32 [B] (1..9),
      'num_vertices': int32 [B] (the first polygon's, 3..7), 'is_uniform': bool [B],
      'printed_numbers': int32 [B, 2], 'numbers_label': int32 [B] (0..34), 'numbers_match': bool
      [B]}. Scorer class targets are num_polygons - 1, num_vertices - 3, is_uniform and
      numbers_label.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}: must be >= 1")
    return self.collate([self.example(rng, "train") for _ in range(batch_size)])

  def test_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Test images `indices` with the same keys as `train_batch`."""
    if len(indices) == 0:
      raise ValueError("test_batch needs at least one index")
    return self.collate([self.test_image(int(i)) for i in indices])


def test_image(seed: int, index: int, **task_options) -> tuple[np.ndarray, RenderInfo]:
  """Test image `index` for `seed`: a pure function of (seed, index, task_options)."""
  return CountingPolygonsTask(seed=seed, **task_options).test_image(index)


test_image.__test__ = False  # not a pytest test


# ------------------------------------------------------------------------------------------------
# The SRM training feed: images of (step, global example index), rendered ahead of use.


def render_train_images(
    task: CountingPolygonsTask, seed: int, step: int, example_index: np.ndarray
) -> np.ndarray:
  """uint8 [len(example_index), 128, 128, 3]: the training images of `step`.

  Example i of step s is drawn from `default_rng([seed, 3, s, i])`, so an image depends only on
  (task, seed, step, global index): not on the number of devices, hosts or render workers.
  """
  images = []
  for index in np.asarray(example_index).reshape(-1):
    rng = np.random.default_rng([_check_seed(seed), _TRAIN_IMAGE_STREAM, int(step), int(index)])
    images.append(task.example(rng, "train")[0])
  return np.stack(images)


# The task of a rendering process, set once when it starts: a task with a background folder
# carries its file list (70,000 FFHQ paths pickle to 2 MB and take about 0.7 s to pickle and
# unpickle), which must not travel with every step.
_PROCESS_TASK: CountingPolygonsTask | None = None


def _set_process_task(task: CountingPolygonsTask) -> None:
  global _PROCESS_TASK
  _PROCESS_TASK = task


def _render_in_process(seed: int, step: int, example_index: np.ndarray) -> np.ndarray:
  return render_train_images(_PROCESS_TASK, seed, step, example_index)


class TrainImagePrefetcher:
  """Renders the SRM training images of steps first_step, first_step + 1, ... ahead of use.

  `num_workers` threads (or 'spawn' processes) render whole steps concurrently; `get` returns
  them in step order, so the stream is reproducible. `wait_seconds` accumulates the time `get`
  blocked, i.e. the time the accelerator waited for input.

  Args:
    task: the CountingPolygonsTask to draw from.
    seed: training seed (see `render_train_images`).
    example_index: int [n], the global indices of this host's examples.
    first_step: the step of the first `get`.
    num_workers: rendering threads or processes.
    prefetch: steps kept in flight (>= num_workers keeps every worker busy).
    use_processes: processes instead of threads.
  """

  def __init__(
      self,
      task: CountingPolygonsTask,
      seed: int,
      example_index: np.ndarray,
      first_step: int,
      num_workers: int = 4,
      prefetch: int = 8,
      use_processes: bool = False,
  ):
    if num_workers < 1 or prefetch < 1:
      raise ValueError(f"num_workers={num_workers} and prefetch={prefetch}: each must be >= 1")
    self._seed = _check_seed(seed)
    self._example_index = np.asarray(example_index).reshape(-1)
    if use_processes:
      self._executor = concurrent.futures.ProcessPoolExecutor(
          num_workers,
          mp_context=multiprocessing.get_context("spawn"),
          initializer=_set_process_task,
          initargs=(task,),
      )
      self._render = _render_in_process
    else:
      self._executor = concurrent.futures.ThreadPoolExecutor(
          num_workers, thread_name_prefix="render"
      )
      self._render = functools.partial(render_train_images, task)
    self._pending: collections.deque = collections.deque()
    self._next_step = int(first_step)
    self.wait_seconds = 0.0
    for _ in range(prefetch):
      self._submit()

  def _submit(self) -> None:
    self._pending.append(
        self._executor.submit(self._render, self._seed, self._next_step, self._example_index)
    )
    self._next_step += 1

  def get(self) -> np.ndarray:
    """uint8 [n, 128, 128, 3]: the next step's images (re-raises a worker's error).

    uint8 is a quarter of the float32 bytes to copy to the accelerator; `unit_range_on_device`
    converts them there.
    """
    start = time.monotonic()
    images = self._pending.popleft().result()
    self.wait_seconds += time.monotonic() - start
    self._submit()
    return images

  def close(self) -> None:
    """Cancels what is queued and waits for the running renders."""
    self._executor.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
