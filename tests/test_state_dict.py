"""Tests for ipr_jax.conversion.state_dict (spec §1.10)."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_golden_unet

from ipr_jax.conversion import state_dict as sd_lib
from ipr_jax.models import unet as unet_lib


def _load_golden_state_dict(golden_dir, case):
  del golden_dir  # conftest.load_golden_unet reads tests/golden itself.
  _, config, state_dict, model = load_golden_unet(case)
  return state_dict, config, model


@pytest.fixture(scope="module")
def ep_golden(golden_dir):
  return _load_golden_state_dict(golden_dir, "ep")


# Spec §1.10 key counts and §1.9 unique parameter counts.
@pytest.mark.parametrize(
    "preset,d_in,d_out,total,duplicates,unique_params",
    [
        ("unet_32", 3, 7, 424, 88, 19_718_791),
        ("unet_128", 3, 7, 504, 108, 76_765_191),
        ("unet_256", 1, 3, 584, 128, 118_994_691),
    ],
)
def test_preset_key_counts(preset, d_in, d_out, total, duplicates, unique_params):
  model = unet_lib.make_unet(preset, d_in, d_out)
  shapes = sd_lib.expected_state_dict_shapes(model)
  assert len(shapes) == total
  dup = [k for k in shapes if ".norm_with_embedding.t_emb.mlp." in k]
  assert len(dup) == duplicates
  assert sum(int(np.prod(s)) for k, s in shapes.items() if k not in dup) == unique_params


def test_unet_256_shapes_from_the_spec():
  shapes = sd_lib.expected_state_dict_shapes(unet_lib.make_unet("unet_256", 1, 3))
  expected = {
      "time_embedding.mlp.0.weight": (512, 256),
      "time_embedding.mlp.2.bias": (512,),
      "model.encoder.blocks.0.0.weight": (128, 1, 3, 3),
      "model.encoder.blocks.7.0.shortcut.weight": (256, 128, 1, 1),
      "model.encoder.blocks.7.0.norm_with_embedding.embedding_layer.1.weight": (256, 512),
      "model.encoder.blocks.9.0.downsample.weight": (256, 256, 3, 3),
      "model.encoder.blocks.13.1.qkv.weight": (1536, 512, 1),
      "model.encoder.blocks.13.1.proj.weight": (512, 512, 1),
      "model.bottleneck.blocks.1.norm.weight": (512,),
      "model.bottleneck.blocks.2.conv_2.2.weight": (512, 512, 3, 3),
      "model.decoder.blocks.0.0.conv_1.0.weight": (1024,),
      "model.decoder.blocks.5.2.conv.weight": (512, 512, 3, 3),
      "model.decoder.blocks.6.0.shortcut.weight": (256, 768, 1, 1),
      "model.decoder.blocks.8.1.conv.weight": (256, 256, 3, 3),
      "model.decoder.blocks.12.0.conv_1.2.weight": (128, 384, 3, 3),
      "model.decoder.blocks.17.0.norm_with_embedding.t_emb.mlp.2.weight": (512, 512),
      "model.decoder.out.0.weight": (128,),
      "model.decoder.out.2.weight": (3, 128, 3, 3),
  }
  for key, shape in expected.items():
    assert shapes[key] == shape, key


@pytest.mark.parametrize("case", ["ms", "ep"])
def test_keys_match_the_reference_state_dict_in_order(golden_dir, case):
  state_dict, config, model = _load_golden_state_dict(golden_dir, case)
  keys = sd_lib.expected_state_dict_keys(model)
  assert len(keys) == config["num_state_dict_keys"]
  assert keys == list(state_dict)
  shapes = sd_lib.expected_state_dict_shapes(model)
  assert all(shapes[k] == state_dict[k].shape for k in keys)


def test_golden_round_trip_is_exact(ep_golden):
  state_dict, config, model = ep_golden
  params = sd_lib.unet_params_from_state_dict(state_dict, model)
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert count == config["num_params_unique"]
  back = sd_lib.state_dict_from_unet_params(params, model)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == np.float32
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_layouts_follow_pytorch(ep_golden):
  state_dict, _, model = ep_golden
  params = sd_lib.unet_params_from_state_dict(state_dict, model)
  conv = state_dict["model.encoder.blocks.4.0.conv_1.2.weight"]  # [O,I,3,3]
  kernel = params["encoder"]["blocks_4_0"]["conv_1_2"]["kernel"]
  assert kernel.shape == (3, 3, 32, 64)
  assert kernel[2, 0, 5, 7] == conv[7, 5, 2, 0]
  linear = state_dict["time_embedding.mlp.0.weight"]  # [O, I]
  dense = params["time_embedding"]["mlp_0"]["kernel"]
  assert dense.shape == (256, 64) and dense[200, 3] == linear[3, 200]
  qkv = state_dict["model.decoder.blocks.0.1.qkv.weight"]  # [3C, C, 1]
  qkv_kernel = params["decoder"]["blocks_0_1"]["qkv"]["kernel"]
  assert qkv_kernel.shape == (64, 192)
  assert qkv_kernel[10, 150] == qkv[150, 10, 0]
  norm = params["decoder"]["out_0"]
  np.testing.assert_array_equal(norm["scale"], state_dict["model.decoder.out.0.weight"])
  np.testing.assert_array_equal(norm["bias"], state_dict["model.decoder.out.0.bias"])


def test_params_round_trip_through_state_dict():
  model = unet_lib.UNet(
      hid_dims=(32, 64),
      attention=(False, True),
      d_in=2,
      d_out=5,
      num_blocks=1,
      t_emb_dim=16,
      num_head_channels=32,
  )
  shapes = sd_lib.param_shapes(model)
  rng = np.random.default_rng(0)
  params = flax.traverse_util.unflatten_dict(
      {path: jnp.asarray(rng.standard_normal(shape), jnp.float32) for path, shape in shapes.items()}
  )
  state_dict = sd_lib.state_dict_from_unet_params({"params": params}, model)
  # 4 duplicated time-embedding tensors per ResBlock (2 + 2 + 4 ResBlocks).
  assert sum(".t_emb." in k for k in state_dict) == 4 * 8
  back = sd_lib.unet_params_from_state_dict(state_dict, model)
  flat, flat_back = (flax.traverse_util.flatten_dict(p) for p in (params, back))
  assert set(flat) == set(flat_back)
  for path in flat:
    np.testing.assert_array_equal(flat_back[path], flat[path])


# ---------------------------------------------------------------------------
# Strictness.
# ---------------------------------------------------------------------------


def test_missing_key_is_named(ep_golden):
  state_dict, _, model = ep_golden
  bad = dict(state_dict)
  del bad["model.decoder.blocks.3.1.proj.bias"]
  with pytest.raises(
      ValueError,
      match=r"1 missing keys \[model\.decoder\." r"blocks\.3\.1\.proj\.bias\]; 0 unexpected",
  ):
    sd_lib.unet_params_from_state_dict(bad, model)


def test_unexpected_key_is_named(ep_golden):
  state_dict, _, model = ep_golden
  bad = dict(state_dict, **{"model.decoder.extra.weight": np.zeros(3)})
  with pytest.raises(ValueError, match=r"1 unexpected keys \[model\.decoder" r"\.extra\.weight\]"):
    sd_lib.unet_params_from_state_dict(bad, model)


def test_prefixed_keys_get_a_hint(ep_golden):
  state_dict, _, model = ep_golden
  bad = {"denoiser." + k: v for k, v in state_dict.items()}
  with pytest.raises(ValueError, match=r"422 missing keys.*prefix.*denoiser"):
    sd_lib.unet_params_from_state_dict(bad, model)


def test_misshaped_key_names_key_and_both_shapes(ep_golden):
  state_dict, _, model = ep_golden
  key = "model.encoder.blocks.4.0.conv_1.2.weight"
  bad = dict(state_dict)
  bad[key] = np.transpose(state_dict[key], (1, 0, 2, 3))
  with pytest.raises(
      ValueError, match=rf"{re.escape(key)}.*" r"\(32, 64, 3, 3\).*\(64, 32, 3, 3\)"
  ):
    sd_lib.unet_params_from_state_dict(bad, model)


def test_differing_duplicate_time_embedding_raises(ep_golden):
  state_dict, _, model = ep_golden
  key = "model.bottleneck.blocks.2.norm_with_embedding.t_emb.mlp.2.bias"
  bad = dict(state_dict)
  bad[key] = state_dict[key] + 1e-3
  with pytest.raises(
      ValueError, match=r"t_emb\.mlp\.2\.bias.*differs.*" r"time_embedding\.mlp\.2\.bias"
  ):
    sd_lib.unet_params_from_state_dict(bad, model)


def test_integer_arrays_are_rejected(ep_golden):
  state_dict, _, model = ep_golden
  key = "model.decoder.out.2.bias"
  bad = dict(state_dict)
  bad[key] = np.zeros(state_dict[key].shape, np.int64)
  with pytest.raises(ValueError, match=r"out\.2\.bias.*dtype int64"):
    sd_lib.unet_params_from_state_dict(bad, model)


def test_wrong_model_is_rejected(ep_golden):
  state_dict, _, model = ep_golden
  other = model.clone(d_out=5)
  with pytest.raises(ValueError, match=r"out\.2\.weight.*\(7, 32, 3, 3\).*" r"\(5, 32, 3, 3\)"):
    sd_lib.unet_params_from_state_dict(state_dict, other)


def test_inverse_rejects_params_of_another_model(ep_golden):
  state_dict, _, model = ep_golden
  params = sd_lib.unet_params_from_state_dict(state_dict, model)
  with pytest.raises(ValueError, match=r"decoder/out_2/bias.*\(7,\).*\(5,\)"):
    sd_lib.state_dict_from_unet_params(params, model.clone(d_out=5))
  del params["decoder"]["out_0"]
  with pytest.raises(
      ValueError, match=r"2 missing \[decoder/out_0/bias, " r"decoder/out_0/scale\]"
  ):
    sd_lib.state_dict_from_unet_params(params, model)
