"""The Counting Polygons scorer: a small ResNet with the reference's four heads (spec §6.3).

The reference scores samples with a torchvision ResNet-50 (downloaded from a hub). This project
cannot download it, so it trains and ships its own, much smaller network
(`ipr_jax/metrics/assets/polygon_scorer.npz`, trained by
`python -m ipr_jax.scorers.train_polygon_scorer`, which also stores the held-out accuracy per head
in the file's metadata). Architecture (`PolygonScorer`, defaults):

  stem   space-to-depth by `stem_patch` (4: 128x128x3 -> 32x32x48, every pixel kept), then a 3x3
         conv to widths[0] channels, GroupNorm, ReLU
  stages one per further width: a residual block (3x3 conv, GroupNorm, ReLU, 3x3 conv, GroupNorm;
         1x1 projection on the skip when the shape changes), stride 1 in the first stage (32x32)
         and 2 in the others (16, 8, 4), then `blocks_per_stage - 1` more blocks of stride 1
  digits with `digit_map`: a 1x1 conv on the stride-8 stage (16x16 cells of 8x8 pixels) gives
         per cell 10 logits, 'no digit centred here' or the digit 1..9 (trained densely on the
         printed numbers' positions, which the renderer knows)
  head   global average pool, then four Dense heads: 'num_polygons' [9], 'num_vertices' [5],
         'is_uniform' [2], 'numbers_label' [35] (see `ipr_jax.metrics.counting_polygons`); with
         `digit_map`, 'numbers_label' also reads, per digit, the map's maximum and summed
         probability over the cells (which digits are printed, and whether one is printed twice)

The space-to-depth stem keeps the full resolution's information at a quarter of the cost of a
stride-1 stem (polygons are 8-15 px in radius and the printed digits 5-11 px tall, so nothing may
be averaged away before the first conv). On 2 CPU cores this network trains at about 55-110
images/s; a variant whose first stage already had stride 2 trained faster but left the vertex
and numbers heads at chance after 40k images.

Why the digit map: trained only through the image-level 'numbers_label' target (and a pooled
digit-presence target), this network left that head at chance through 360k training images
while the other three heads reached 98-99.9%: the two printed digits are 5-11 px tall with 1 px
strokes, and a label for the whole image says neither where they are nor which is which. Dense
targets at the digits' centres give the stride-8 features a direct signal. The map is part of
the scorer; it needs nothing but the image at scoring time.

GroupNorm instead of the reference's BatchNorm, so there is no batch-statistics state and a
sample's score does not depend on the rest of its batch. Inputs are images in [-1, 1], NHWC, with
no ImageNet normalisation (as the reference uses its scorer).
"""

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.data import counting_polygons as cp_data

DEFAULT_WEIGHTS = (
    pathlib.Path(__file__).resolve().parent.parent / "metrics" / "assets" / ("polygon_scorer.npz")
)
IMAGE_SHAPE = cp_data.IMAGE_SHAPE
HEAD_CLASSES = cp_data.HEAD_CLASSES
# The digit map: one cell per 8x8 pixels (16x16 cells), class 0 = no digit centred here, else 1..9.
DIGIT_MAP_STRIDE = 8
DIGIT_CLASSES = 10


class ResidualBlock(nn.Module):
  """Two 3x3 convolutions with GroupNorm and a (projected) skip connection."""

  features: int
  strides: int = 1
  num_groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H / strides, W / strides, features]."""
    y = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False, name="conv1")(x)
    y = nn.relu(nn.GroupNorm(self.num_groups, name="norm1")(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
    y = nn.GroupNorm(self.num_groups, scale_init=nn.initializers.zeros, name="norm2")(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False, name="skip")(x)
    return nn.relu(x + y)


class PolygonScorer(nn.Module):
  """Images [B, 128, 128, 3] in [-1, 1] -> logits of the four heads (module docstring)."""

  widths: Sequence[int] = (32, 32, 64, 128, 256)
  blocks_per_stage: int = 1
  num_groups: int = 8
  stem_patch: int = 4
  digit_map: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, with_features: bool = False):
    """Scores images.

    Args:
      images: float [B, 128, 128, 3] in [-1, 1].
      with_features: also return intermediate outputs (for the training losses).

    Returns:
      {'num_polygons' [B, 9], 'num_vertices' [B, 5], 'is_uniform' [B, 2],
      'numbers_label' [B, 35]}, float32 logits; with `with_features`, the pair (logits,
      {'pooled': [B, widths[-1]], and with `digit_map` 'digit_map': [B, h, w, 10] logits of the
      digit (0 = none) centred in each cell of the DIGIT_MAP_STRIDE grid}).
    """
    cp_data.check_images(images)
    x = images.astype(jnp.float32)
    if self.stem_patch > 1:
      b, h, w, c = x.shape
      p = self.stem_patch
      x = (
          x.reshape(b, h // p, p, w // p, p, c)
          .transpose(0, 1, 3, 2, 4, 5)
          .reshape(b, h // p, w // p, p * p * c)
      )
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.GroupNorm(self.num_groups, name="stem_norm")(x))
    extras = {}
    for stage, width in enumerate(self.widths[1:]):
      for block in range(self.blocks_per_stage):
        strides = 2 if block == 0 and stage > 0 else 1
        x = ResidualBlock(
            width, strides=strides, num_groups=self.num_groups, name=f"stage{stage}_block{block}"
        )(x)
      if self.digit_map and self.stem_patch * 2**stage == DIGIT_MAP_STRIDE:
        extras["digit_map"] = nn.Conv(DIGIT_CLASSES, (1, 1), name="digit_map")(x)
    pooled = jnp.mean(x, axis=(1, 2))
    logits = {
        name: nn.Dense(classes, name=f"head_{name}")(pooled)
        for name, classes in HEAD_CLASSES.items()
        if name != "numbers_label"
    }
    numbers_input = pooled
    if self.digit_map:
      if "digit_map" not in extras:
        raise ValueError(
            f"digit_map needs a stage at stride {DIGIT_MAP_STRIDE}; stem_patch="
            f"{self.stem_patch} and {len(self.widths) - 1} stages give none"
        )
      # Per digit: the strongest cell (is it printed?) and the summed probability (how often:
      # the pairs (3, 3) .. (7, 7) print one digit twice).
      probs = jax.nn.softmax(extras["digit_map"], axis=-1)[..., 1:]
      numbers_input = jnp.concatenate(
          [pooled, jnp.max(probs, axis=(1, 2)), jnp.sum(probs, axis=(1, 2))], axis=-1
      )
    logits["numbers_label"] = nn.Dense(HEAD_CLASSES["numbers_label"], name="head_numbers_label")(
        numbers_input
    )
    logits = {name: logits[name] for name in HEAD_CLASSES}
    return (logits, {"pooled": pooled, **extras}) if with_features else logits


def make_scorer(architecture: Mapping | None = None) -> PolygonScorer:
  """A PolygonScorer from an architecture dict (its fields: widths, blocks_per_stage, ...)."""
  architecture = dict(architecture or {})
  unknown = sorted(
      set(architecture) - {"widths", "blocks_per_stage", "num_groups", "stem_patch", "digit_map"}
  )
  if unknown:
    raise ValueError(f"unknown scorer architecture keys {unknown}")
  if "widths" in architecture:
    architecture["widths"] = tuple(int(w) for w in architecture["widths"])
  return PolygonScorer(**architecture)


def init_scorer_params(scorer: PolygonScorer, key: jax.Array) -> dict:
  """Randomly initialised parameters of `scorer`."""
  return jax.jit(scorer.init)(key, jnp.zeros((1, *IMAGE_SHAPE)))["params"]


def num_parameters(params) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------------------------------------
# Weights file: flat '/'-joined parameter names, plus JSON metadata (architecture, accuracies).

_METADATA_KEY = "metadata_json"


def save_scorer(
    path: str | pathlib.Path,
    params: Mapping,
    architecture: Mapping,
    metadata: Mapping | None = None,
) -> None:
  """Writes parameters (float32) with the architecture and metadata as one .npz file."""
  flat = {
      "/".join(str(getattr(k, "key", k)) for k in key_path): np.asarray(value, np.float32)
      for key_path, value in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  info = {"architecture": dict(architecture), **dict(metadata or {})}
  flat[_METADATA_KEY] = np.asarray(json.dumps(info, sort_keys=True, default=list))
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    np.savez_compressed(f, **flat)  # type: ignore[arg-type]  # numpy's stub
  tmp.replace(path)


def _read(path: str | pathlib.Path | None) -> tuple[dict[str, np.ndarray], dict]:
  path = pathlib.Path(DEFAULT_WEIGHTS if path is None else path)
  if not path.is_file():
    raise FileNotFoundError(f"polygon scorer weights not found: {str(path)!r}")
  try:
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # zipfile / pickle errors of a truncated or foreign file
    raise ValueError(
        f"polygon scorer weights {str(path)!r} are not a readable .npz file: {e}"
    ) from e
  if _METADATA_KEY not in arrays:
    raise ValueError(f"polygon scorer weights {str(path)!r} have no {_METADATA_KEY!r} entry")
  return arrays, json.loads(str(arrays.pop(_METADATA_KEY)))


def load_scorer_metadata(path: str | pathlib.Path | None = None) -> dict:
  """The metadata stored with the weights (architecture, training recipe, held-out accuracy)."""
  return _read(path)[1]


def load_scorer(path: str | pathlib.Path | None = None) -> tuple[PolygonScorer, dict]:
  """(scorer, params) from a weights file; default: the weights shipped in the package.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is unreadable or its parameters do not fit its architecture.
  """
  arrays, metadata = _read(path)
  scorer = make_scorer(metadata["architecture"])
  expected = jax.eval_shape(scorer.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))["params"]
  params: dict[str, Any] = {}
  problems: list[str] = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    names = [str(getattr(k, "key", k)) for k in key_path]
    name = "/".join(names)
    value = arrays.pop(name, None)
    if value is None or value.shape != leaf.shape:
      problems.append(
          f"{name}: expected {leaf.shape}, got " f"{'nothing' if value is None else value.shape}"
      )
      continue
    node = params
    for part in names[:-1]:
      node = node.setdefault(part, {})
    node[names[-1]] = jnp.asarray(value, jnp.float32)
  if problems or arrays:
    raise ValueError(
        f"polygon scorer weights {str(path or DEFAULT_WEIGHTS)!r} do not fit "
        f"{metadata['architecture']}: {problems[:5]} unexpected {sorted(arrays)[:5]}"
    )
  return scorer, params
