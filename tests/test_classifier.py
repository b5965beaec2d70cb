"""Tests of ipr_jax.models.classifier and the classifier trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax.data import digits
from ipr_jax.models import classifier
from ipr_jax.scorers import train_classifier


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shapes = {
      "conv1.weight": (32, 1, 3, 3),
      "conv1.bias": (32,),
      "conv2.weight": (64, 32, 3, 3),
      "conv2.bias": (64,),
      "fc1.weight": (128, 3136),
      "fc1.bias": (128,),
      "fc2.weight": (10, 128),
      "fc2.bias": (10,),
  }
  return {k: (rng.normal(size=s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def numpy_reference_forward(sd: dict[str, np.ndarray], x_nchw: np.ndarray) -> np.ndarray:
  """The srmbench forward pass written out in numpy, PyTorch layouts (NCHW, OIHW, [out, in])."""

  def conv3x3(x, w, b):  # cross-correlation, padding 1
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, wd = x.shape[2:]
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    for dy in range(3):
      for dx in range(3):
        out += np.einsum("bchw,oc->bohw", padded[:, :, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    return out + b[None, :, None, None]

  def pool(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

  x = pool(np.maximum(conv3x3(x_nchw, sd["conv1.weight"], sd["conv1.bias"]), 0))
  x = pool(np.maximum(conv3x3(x, sd["conv2.weight"], sd["conv2.bias"]), 0))
  x = x.reshape(x.shape[0], -1)  # PyTorch .view: (C, H, W) order
  x = np.maximum(x @ sd["fc1.weight"].T + sd["fc1.bias"], 0)
  return x @ sd["fc2.weight"].T + sd["fc2.bias"]


def test_state_dict_conversion_matches_pytorch_layout_forward():
  sd = random_state_dict()
  x = np.random.default_rng(1).uniform(-1, 1, (3, 1, 28, 28)).astype(np.float32)
  params = classifier.classifier_params_from_state_dict(sd)
  logits = classifier.classifier_logits(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(
      logits, numpy_reference_forward(sd, x.astype(np.float64)), rtol=1e-4, atol=1e-4
  )
  back = classifier.state_dict_from_classifier_params(params)
  assert back.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_state_dict_conversion_matches_torch_module():
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class TorchClassifier(nn.Module):
    """The architecture of spec §6.1, written from the spec."""

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
      self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
      self.fc1 = nn.Linear(3136, 128)
      self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
      x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
      x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
      x = torch.relu(self.fc1(x.flatten(1)))
      return self.fc2(x)

  torch.manual_seed(0)
  model = TorchClassifier().eval()
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  x = np.random.default_rng(2).uniform(-1, 1, (4, 1, 28, 28)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x)).numpy()
  params = classifier.classifier_params_from_state_dict(sd)
  logits = classifier.classifier_logits(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_state_dict_strict():
  sd = random_state_dict()
  del sd["fc2.bias"]
  with pytest.raises(ValueError, match="fc2.bias"):
    classifier.classifier_params_from_state_dict(sd)
  sd = random_state_dict()
  sd["extra.weight"] = np.zeros(1)
  with pytest.raises(ValueError, match="extra.weight"):
    classifier.classifier_params_from_state_dict(sd)
  sd = random_state_dict()
  sd["fc1.weight"] = np.zeros((128, 3137), np.float32)
  with pytest.raises(ValueError, match="fc1.weight"):
    classifier.classifier_params_from_state_dict(sd)


def test_param_tree_matches_init():
  params = classifier.init_classifier_params(jax.random.key(0))
  shipped = classifier.load_classifier_params()
  assert jax.tree.structure(params) == jax.tree.structure(shipped)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, shipped)


def test_channel_dropout_in_training_only():
  params = classifier.init_classifier_params(jax.random.key(0))
  x = jnp.ones((2, 28, 28, 1))
  model = classifier.MNISTClassifier()
  np.testing.assert_array_equal(
      model.apply({"params": params}, x), model.apply({"params": params}, x)
  )
  a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(a, b)


def test_bad_input_and_missing_weights(tmp_path):
  params = classifier.init_classifier_params(jax.random.key(0))
  with pytest.raises(ValueError, match=r"\(2, 28, 28, 3\)"):
    classifier.classifier_logits(params, jnp.zeros((2, 28, 28, 3)))
  with pytest.raises(FileNotFoundError, match="nothing.npz"):
    classifier.load_classifier_params(tmp_path / "nothing.npz")


def test_save_load_roundtrip(tmp_path):
  params = classifier.init_classifier_params(jax.random.key(3))
  path = tmp_path / "clf.npz"
  classifier.save_classifier_params(path, params, {"note": "x"})
  loaded = classifier.load_classifier_params(path)
  jax.tree.map(np.testing.assert_array_equal, params, loaded)
  assert classifier.load_classifier_metadata(path) == {"note": "x"}


def test_training_smoke():
  images, labels = digits.load_digits("train")
  params = train_classifier.train_classifier(
      images[::40][:192], labels[::40][:192], num_epochs=2, batch_size=64, learning_rate=1e-3
  )
  logits = classifier.classifier_logits(params, digits.to_unit_range(images[:4])[..., None])
  assert logits.shape == (4, 10) and np.all(np.isfinite(logits))


def test_random_warp_identity_and_background():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1)), jnp.float32)
  warp = jax.jit(train_classifier.random_warp)  # magnitudes traced: one compilation
  same = warp(jax.random.key(0), x, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(same, x, atol=1e-5)
  warped = warp(jax.random.key(0), x, 12.0, 0.1, 2.0, 5.0)
  assert not np.allclose(warped, x) and float(jnp.abs(warped).max()) <= 1.0
  background = warp(jax.random.key(1), -jnp.ones((2, 28, 28, 1)), 12.0, 0.1, 2.0, 5.0)
  np.testing.assert_allclose(background, -1.0, atol=1e-6)


def test_coarsening_is_what_the_metric_sees():
  """Training digits coarsened on device equal the metric's tiles of the task's 7 px cells."""
  images, _ = digits.load_digits("test")
  images = images[:8]
  small = digits.downsample_digits(images, 7)  # what the Sudoku task draws
  from ipr_jax.metrics import sudoku as sudoku_metrics  # pylint: disable=g-import-not-at-top

  grid = np.zeros((1, 28, 28), np.uint8)  # a 4x4 grid of 7 px cells: first 8 cells filled
  for i in range(8):
    r, c = divmod(i, 4)
    grid[0, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] = small[i]
  tiles = sudoku_metrics.image_tiles(digits.to_unit_range(grid)[..., None], 4)[0, :8]
  np.testing.assert_allclose(
      tiles, digits.to_unit_range(train_classifier.coarsen_digits(images, 7))[..., None], atol=1e-6
  )
  on_device = train_classifier.coarsen_tiles(digits.to_unit_range(images)[..., None], 7)
  # Box means before vs after the uint8 rounding: within half a grey level.
  np.testing.assert_allclose(on_device, tiles, atol=1.01 / 255)


@pytest.mark.parametrize("cell_size", [14, 7])
def test_shipped_weights_read_the_demo_digits(cell_size):
  """The weights the metric picks for a cell size read the held-out digits 1-4 that 4x4 Sudoku
  test puzzles draw (the 100 most legible per class) at that size: a correct 16-cell solution
  must score valid."""
  params = classifier.load_classifier_params(cell_size=cell_size)
  bank = digits.load_digit_bank("test", cell_size=cell_size, top_n=100)
  images, labels = [], []
  for digit in range(1, 5):
    count = int(bank.counts[digit])
    images.append(np.asarray(bank.images[digit, :count]))
    labels += [digit] * count
  factor = 28 // cell_size
  tiles = np.repeat(np.repeat(np.concatenate(images), factor, 1), factor, 2)
  logits = classifier.classifier_logits(params, digits.to_unit_range(tiles)[..., None])
  predicted = np.argmax(np.asarray(logits)[:, 1:5], axis=-1) + 1  # the 4x4 metric's rule
  assert np.mean(predicted == np.array(labels)) >= 0.995
  if cell_size == 7:
    assert classifier.load_classifier_metadata(cell_size=7)["cell_size"] == 7
