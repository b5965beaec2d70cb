"""The DiT and LightningDiT denoisers against the SRM authors' framework's own outputs.

tests/golden/spatialreasoners/ holds what spatialreasoners 1.0.5 computes (README there): a tiny
DiT and LightningDiT forward with per-token times (exactly 0, exactly 1 and in between), its
intermediates, the framework's image tokenizer, and the parameter counts of the S/B/L/XL sizes.
The Flax model gets the framework's state_dict through the converter, so these tests check the
key mapping, the layouts and every formula of the forward pass at once.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax import build
from ipr_jax.build import config_base
from ipr_jax.conversion import dit_state_dict
from ipr_jax.models import denoiser
from ipr_jax.models import dit as dit_lib
from ipr_jax.models import tokens as tokens_lib
from ipr_jax.noise import flow
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import errors

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "spatialreasoners"
_FORMS = {"dit_tiny": "dit", "lightning_dit_tiny": "lightning_dit"}
# Framework prefixes of a Lightning checkpoint's EMA and live weights.
_EMA, _LIVE = "denoising_model.ema_denoiser.module.", "denoising_model.denoiser."


def _golden(name):
  arrays = dict(np.load(_GOLDEN / f"{name}.npz"))
  state_dict = {k[3:]: v for k, v in arrays.items() if k.startswith("sd/")}
  return arrays, state_dict


def _tiny_model(form, height=16, channels=1, **fields):
  """The golden files' network: hidden 64, depth 2, 2 heads, MLP 2x, sinusoid 64, patch 2."""
  layout = tokens_lib.TokenLayout("patch", height, height, channels, 2, 2)
  settings = dict(hidden=64, depth=2, num_heads=2, mlp_ratio=2.0, d_emb=64)
  settings.update(fields)
  return dit_lib.DiT(layout=layout, form=form, **settings)


def _golden_inputs(arrays):
  """The golden NCHW image as NHWC and its per-token times [2, 64] as a [2, 16, 16, 1] map."""
  z = jnp.asarray(arrays["x_img"].transpose(0, 2, 3, 1))
  per_token = arrays["t"].reshape(2, 8, 8)
  t_map = np.repeat(np.repeat(per_token, 2, axis=1), 2, axis=2)[..., None]
  return z, jnp.asarray(t_map)


@pytest.mark.parametrize("name", sorted(_FORMS))
def test_forward_matches_the_framework_at_every_stage(name):
  arrays, state_dict = _golden(name)
  model = _tiny_model(_FORMS[name])
  params = dit_state_dict.dit_params_from_state_dict(state_dict, model)
  z, t_map = _golden_inputs(arrays)
  out, state = model.apply({"params": params}, z, t_map, mutable=["intermediates"])
  seen = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
  np.testing.assert_allclose(seen["t_emb"], arrays["t_emb"], atol=2e-6, rtol=0)
  np.testing.assert_allclose(
      seen["after_patch_pos_embed"], arrays["after_patch_pos_embed"], atol=2e-6, rtol=0
  )
  for i in range(2):
    np.testing.assert_allclose(seen[f"block_out_{i}"], arrays[f"block_out/{i}"], atol=3e-6, rtol=0)
  # The framework's output is 4 mean features + 1 log-variance per token (no variance rows).
  np.testing.assert_allclose(seen["token_out"][..., :4], arrays["mean_tokens"], atol=2e-6, rtol=0)
  np.testing.assert_allclose(seen["token_out"][..., -1], arrays["logvar_tokens"], atol=2e-6, rtol=0)
  # On the image: u is the mean tokens put back, logvar constant on each token's 2x2 pixels.
  layout = model.layout
  np.testing.assert_allclose(
      np.asarray(tokens_lib.image_to_tokens(out[..., :1], layout)),
      arrays["mean_tokens"],
      atol=2e-6,
      rtol=0,
  )
  logvar = np.asarray(out[..., 2])
  np.testing.assert_allclose(
      logvar[:, ::2, ::2].reshape(2, 64), arrays["logvar_tokens"], atol=2e-6, rtol=0
  )
  np.testing.assert_array_equal(logvar[:, 1::2, 1::2], logvar[:, ::2, ::2])


def test_time_sinusoid_matches_the_framework_and_clamps_small_times():
  arrays, _ = _golden("dit_tiny")
  t = jnp.asarray(arrays["temb_probe_t"])
  features = np.asarray(dit_lib.time_sinusoid(t, 64))
  # cos/sin of arguments up to 999 in float32: a few 1e-5 apart at the largest.
  np.testing.assert_allclose(features, arrays["temb_probe_sinusoid"], atol=1e-4, rtol=0)
  # max(1000 t - 1, 0): every t <= 0.001 embeds as t = 0 (cos 1, sin 0).
  small = np.asarray(dit_lib.time_sinusoid(jnp.asarray([0.0, 5e-4, 1e-3]), 64))
  np.testing.assert_array_equal(small, np.tile(np.r_[np.ones(32), np.zeros(32)], (3, 1)))


def test_each_token_is_conditioned_on_its_own_time():
  """Changing one region's time changes the conditioning of exactly that region's tokens."""
  arrays, state_dict = _golden("dit_tiny")
  model = _tiny_model("dit")
  params = dit_state_dict.dit_params_from_state_dict(state_dict, model)
  z, t_map = _golden_inputs(arrays)
  moved = t_map.at[:, 4:6, 10:12].set(0.37)  # token (2, 5) = index 21
  _, before = model.apply({"params": params}, z, t_map, mutable=["intermediates"])
  _, after = model.apply({"params": params}, z, moved, mutable=["intermediates"])
  changed = np.any(
      np.asarray(before["intermediates"]["t_emb"][0] != after["intermediates"]["t_emb"][0]),
      axis=-1,
  )
  np.testing.assert_array_equal(np.flatnonzero(changed[0]), [21])
  np.testing.assert_array_equal(np.flatnonzero(changed[1]), [21])


@pytest.mark.parametrize("case", ["uncertainty", "uncertainty_variance"])
def test_framework_token_layout_packs_and_reassembles_as_the_framework(case):
  arrays = dict(np.load(_GOLDEN / "image_dit_tokenizer.npz"))
  layout = tokens_lib.TokenLayout("spatialreasoners", 12, 12, 2, 2, 4)
  image = jnp.asarray(arrays["x_img"].transpose(0, 2, 3, 1))
  tokens = tokens_lib.image_to_tokens(image, layout)
  np.testing.assert_array_equal(np.asarray(tokens), arrays[f"{case}/z_tokens"])
  np.testing.assert_array_equal(np.asarray(tokens_lib.tokens_to_image(tokens, layout)), image)
  coords = tokens_lib.token_coordinates(layout)
  np.testing.assert_array_equal(coords, arrays[f"{case}/coords_ij"])
  np.testing.assert_array_equal(coords[:, ::-1], arrays[f"{case}/coords_xy"])
  t_map = np.repeat(np.repeat(arrays["t_var"].reshape(2, 3, 3), 4, axis=1), 4, axis=2)[..., None]
  np.testing.assert_array_equal(
      np.asarray(tokens_lib.token_times(jnp.asarray(t_map), layout)), arrays[f"{case}/t_tokens"]
  )
  out = jnp.asarray(arrays[f"{case}/model_out"])
  features = layout.features
  mean = np.asarray(tokens_lib.tokens_to_image(out[..., :features], layout))
  np.testing.assert_array_equal(mean, arrays[f"{case}/mean_img"].transpose(0, 2, 3, 1))
  # srm_head's mean over a region of the per-pixel log-variance = the framework's mean over the
  # region's tokens.
  logvar = tokens_lib.token_values_to_image(out[..., -1], layout)
  per_region = np.asarray(logvar).reshape(2, 3, 4, 3, 4).mean(axis=(2, 4)).reshape(2, 9)
  np.testing.assert_allclose(per_region, arrays[f"{case}/logvar_variables"], atol=1e-6, rtol=0)
  if case == "uncertainty_variance":
    v = (np.asarray(tokens_lib.tokens_to_image(out[..., features : 2 * features], layout)) + 1) / 2
    variables = v.reshape(2, 3, 4, 3, 4, 2).transpose(0, 1, 3, 5, 2, 4).reshape(2, 9, 32)
    np.testing.assert_allclose(variables, arrays[f"{case}/v_variables"], atol=1e-7, rtol=0)


def test_patch_layout_is_the_golden_files_token_packing():
  arrays, _ = _golden("dit_tiny")
  layout = tokens_lib.TokenLayout("patch", 16, 16, 1, 2, 2)
  image = jnp.asarray(arrays["x_img"].transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(
      np.asarray(tokens_lib.image_to_tokens(image, layout)), arrays["z_tokens"]
  )
  np.testing.assert_array_equal(tokens_lib.token_coordinates(layout), arrays["coords_ij"][0])
  # One token per region: both layouts are the same.
  one = dict(height=12, width=12, channels=2, token_size=4, region_size=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 12, 2))
  np.testing.assert_array_equal(
      np.asarray(tokens_lib.image_to_tokens(x, tokens_lib.TokenLayout("patch", **one))),
      np.asarray(tokens_lib.image_to_tokens(x, tokens_lib.TokenLayout("spatialreasoners", **one))),
  )


def _preset_counts():
  counts = json.loads((_GOLDEN / "preset_param_counts.json").read_text())["counts"]
  return sorted(counts.items())


@pytest.mark.parametrize("key,entry", _preset_counts(), ids=[k for k, _ in _preset_counts()])
def test_size_presets_have_the_frameworks_parameter_counts(key, entry):
  form, size, inputs = key.split("/")
  channels = entry["d_in"] // 4  # patch 2: d_in = 4 C
  height = 252 if inputs.startswith("mnist") else 32
  region = 28 if height == 252 else 2
  layout = tokens_lib.TokenLayout("patch", height, height, channels, 2, region)
  model = dit_lib.make_dit(layout, size, form, predict_variance=False, predict_uncertainty=False)
  assert dit_lib.mlp_width(model.hidden, model.mlp_ratio) == entry["ffn_hidden"]
  shapes = jax.eval_shape(
      model.init,
      jax.random.PRNGKey(0),
      jnp.zeros((1, height, height, channels)),
      jnp.zeros((1, height, height, 1)),
  )
  assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == entry["n_params"]


def test_state_dict_round_trip_and_the_output_rows():
  arrays, state_dict = _golden("dit_tiny")
  model = _tiny_model("dit")
  params = dit_state_dict.dit_params_from_state_dict(state_dict, model)
  exported = dit_state_dict.state_dict_from_dit_params(params, model)
  assert exported["out_layer.linear.weight"].shape == (2 * 4 + 1, 64)
  again = dit_state_dict.dit_params_from_state_dict(exported, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)
  # A framework model without variance rows samples with sigma_small: v = 0 exactly.
  z, t_map = _golden_inputs(arrays)
  head = denoiser.srm_head(model.apply({"params": params}, z, t_map), 2)
  np.testing.assert_array_equal(np.asarray(head.v), 0.0)
  t, s = jnp.full((1, 1, 1, 1), 0.6), jnp.full((1, 1, 1, 1), 0.4)
  np.testing.assert_allclose(
      flow.sigma_learned(t, s, 1.0, jnp.zeros(())), flow.sigma_small(t, s, 1.0), rtol=1e-6
  )
  # The framework's over-counted variance rows (F + 2 * per-region / n + 1): [F:2F] is v.
  f = 4
  weight, bias = state_dict["out_layer.linear.weight"], state_dict["out_layer.linear.bias"]
  rng = np.random.default_rng(0)
  extra_w, extra_b = rng.normal(size=(12, 64)), rng.normal(size=12)
  padded = dict(
      state_dict,
      **{
          "out_layer.linear.weight": np.concatenate([weight[:f], extra_w, weight[-1:]]),
          "out_layer.linear.bias": np.concatenate([bias[:f], extra_b, bias[-1:]]),
      },
  )
  with_v = dit_state_dict.dit_params_from_state_dict(padded, model)
  kernel = np.asarray(with_v["out_layer_linear"]["kernel"])
  np.testing.assert_allclose(kernel[:, f : 2 * f], extra_w[:f].T.astype(np.float32))
  np.testing.assert_array_equal(kernel[:, -1], weight[-1])


def test_mismatched_state_dicts_are_refused_naming_the_key():
  _, state_dict = _golden("lightning_dit_tiny")
  with pytest.raises(errors.ConfigError, match="missing keys.*blocks.0.norm1.weight"):
    dit_state_dict.dit_params_from_state_dict(state_dict, _tiny_model("dit"))
  bad = dict(state_dict, **{"patch_emb.proj.weight": np.zeros((64, 12), np.float32)})
  with pytest.raises(errors.ConfigError, match="patch_emb.proj.weight"):
    dit_state_dict.dit_params_from_state_dict(bad, _tiny_model("lightning_dit"))
  no_uncertainty = dict(state_dict)
  no_uncertainty["out_layer.linear.weight"] = state_dict["out_layer.linear.weight"][:4]
  no_uncertainty["out_layer.linear.bias"] = state_dict["out_layer.linear.bias"][:4]
  with pytest.raises(errors.ConfigError, match="no uncertainty"):
    dit_state_dict.dit_params_from_state_dict(no_uncertainty, _tiny_model("lightning_dit"))
  with pytest.raises(errors.ConfigError, match="no ema weights"):
    dit_state_dict.select_weights({_LIVE + k: v for k, v in state_dict.items()}, "ema")


def test_layouts_and_configs_refuse_what_cannot_be_built():
  with pytest.raises(ValueError, match="does not divide the region"):
    tokens_lib.TokenLayout("patch", 28, 28, 1, 2, 7)
  with pytest.raises(ValueError, match="unknown"):
    tokens_lib.TokenLayout("rows", 28, 28, 1, 7, 7)
  config = config_base.load_config("mnist_sudoku:demo")
  config.model.kind = "transformer"
  with pytest.raises(errors.ConfigError, match="model.kind='transformer'"):
    build.make_model(config)
  config.model.kind = "dit"
  config.model.dit.num_heads = 5
  with pytest.raises(errors.ConfigError, match="num_heads=5"):
    build.make_model(config)


def test_remat_gives_the_same_gradients():
  arrays, state_dict = _golden("lightning_dit_tiny")
  z, t_map = _golden_inputs(arrays)
  grads = []
  for remat in (False, True):
    model = _tiny_model("lightning_dit", remat=remat)
    params = dit_state_dict.dit_params_from_state_dict(state_dict, model)
    loss = lambda p, m=model: jnp.sum(m.apply({"params": p}, z, t_map) ** 2)
    grads.append(jax.grad(loss)(params))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads
  )


def _run(module, *args, timeout=300):
  done = subprocess.run(
      [sys.executable, "-m", module, *args],
      capture_output=True,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      cwd=_ROOT,
      timeout=timeout,
      check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done


# The golden network on the 4x4 tiny Sudoku (56x56, 14 px regions): its parameters do not depend
# on the image size (the position embedding is fixed), so the golden weights fit.
_DIT_TINY = [
    "--config=mnist_sudoku:tiny",
    "--config.model.kind=dit",
    "--config.model.dit.form=lightning_dit",
    "--config.model.dit.hidden=64",
    "--config.model.dit.depth=2",
    "--config.model.dit.num_heads=2",
    "--config.model.dit.mlp_ratio=2.0",
    "--config.model.dit.d_emb=64",
    "--config.model.dit.patch_size=2",
]


def test_converter_binary_imports_a_framework_checkpoint_that_evaluate_runs(tmp_path):
  arrays, state_dict = _golden("lightning_dit_tiny")
  ckpt = tmp_path / "framework.npz"
  live = {_LIVE + k: v + 1.0 for k, v in state_dict.items()}  # the wrong weights, if taken
  np.savez(ckpt, **live, **{_EMA + k: v for k, v in state_dict.items()})
  workdir = tmp_path / "run"
  _run("ipr_jax.convert", f"--torch_checkpoint={ckpt}", f"--workdir={workdir}", *_DIT_TINY)
  params = checkpoint.restore_params(str(workdir), which="ema")
  # The written parameters reproduce the framework's output on its golden inputs.
  model = _tiny_model("lightning_dit")
  z, t_map = _golden_inputs(arrays)
  _, state = model.apply({"params": params}, z, t_map, mutable=["intermediates"])
  token_out = np.asarray(state["intermediates"]["token_out"][0])
  np.testing.assert_allclose(token_out[..., :4], arrays["mean_tokens"], atol=2e-6, rtol=0)
  np.testing.assert_allclose(token_out[..., -1], arrays["logvar_tokens"], atol=2e-6, rtol=0)
  done = _run(
      "ipr_jax.evaluate",
      f"--workdir={workdir}",
      *_DIT_TINY,
      "--config.eval.num_puzzles=2",
      "--config.ipr.budget=1",
  )
  assert "valid rate" in done.stdout + done.stderr
  # What the run is checked against on a resume: the DiT and its fields (never mixed with a U-Net).
  run = json.loads((workdir / "eval" / "ms_hard_test" / "shards" / "run.json").read_text())
  assert run["model"]["kind"] == "dit" and run["model"]["dit"]["form"] == "lightning_dit"


def test_a_dit_trains_through_the_binary(tmp_path):
  workdir = tmp_path / "run"
  small = [
      "--config=mnist_sudoku:tiny",
      "--config.model.kind=dit",
      "--config.model.dit.hidden=32",
      "--config.model.dit.depth=1",
      "--config.model.dit.num_heads=2",
      "--config.num_train_steps=4",
      "--config.batch_size=4",
      "--config.checkpoint_every_steps=4",
  ]
  _run("ipr_jax.train", f"--workdir={workdir}", *small)
  assert (workdir / "checkpoints" / "4").is_dir()
  config = config_base.load_config("mnist_sudoku:tiny")
  config.model.kind = "dit"
  config.model.dit.update(dict(hidden=32, depth=1, num_heads=2))
  model = build.make_model(config)
  params = checkpoint.restore_params(str(workdir), which="live")
  z = jax.random.normal(jax.random.PRNGKey(1), (2, 56, 56, 1))
  t = jnp.ones((2, 56, 56, 1))
  head = denoiser.srm_head(model.apply({"params": params}, z, t), 14)
  # Four steps of training move the zero-initialised output layer: u is no longer 0.
  assert float(jnp.abs(head.u).max()) > 1e-3


def test_weights_of_another_denoiser_or_flow_are_refused():
  """A stored config from before the DiT and the other flows (no model.kind, no flow) is a
  U-Net's under the rectified flow: a DiT or another flow does not match it; the U-Net and the
  rectified flow still do (shipped models, older checkpoints)."""
  from ipr_jax.build import pretrained  # pylint: disable=g-import-not-at-top

  config = config_base.load_config("mnist_sudoku:demo")
  stored = json.loads(config.to_json())
  del stored["flow"], stored["model"]["kind"], stored["model"]["dit"]
  assert checkpoint.config_mismatches(stored, config) == []
  config.flow = "cosine"
  assert checkpoint.config_mismatches(stored, config) == [("flow", "rectified", "cosine")]
  config.flow = "rectified"
  config.model.kind = "dit"
  assert ("model.kind", "unet", "dit") in checkpoint.config_mismatches(stored, config)
  shipped = pretrained.load("mnist_sudoku_demo")
  demo = config_base.load_config("mnist_sudoku:demo")
  pretrained.check_compatible(demo, shipped)
  demo.flow = "diffusion_linear"
  with pytest.raises(errors.ConfigError, match="flow: 'diffusion_linear'"):
    pretrained.check_compatible(demo, shipped)
  demo.flow = "rectified"
  demo.model.kind = "dit"
  with pytest.raises(errors.ConfigError, match="model.kind: 'dit'"):
    pretrained.check_compatible(demo, shipped)
