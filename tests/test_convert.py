"""Checkpoint import: Lightning-style .ckpt files of the golden reference U-Nets -> Orbax.

The golden state_dicts are written as Lightning checkpoints holding both the live (`denoiser.`)
and EMA (`ema_denoiser.module.`) weights; the live copy is deliberately perturbed so that importing
the wrong one fails. The converter runs as the command a user types, and must write exactly the
parameters whose forward tests/test_unet.py checks against the reference's own outputs.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ipr_jax import build
from ipr_jax.conversion import converter
from ipr_jax.conversion import state_dict as state_dict_lib
from ipr_jax.conversion import torch_files
from ipr_jax.runtime import checkpoint

torch = pytest.importorskip("torch")

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _golden(golden_dir, case):
  files = [golden_dir / f"unet_{case}.npz"]
  if case == "ep_tiny":
    files.append(golden_dir / "unet_ep_tiny_sd_decoder.npz")
  arrays, state_dict = {}, {}
  for path in files:
    with np.load(path) as f:
      for k in f.files:
        (state_dict if k.startswith("sd/") else arrays)[k.removeprefix("sd/")] = f[k]
  return json.loads(str(arrays["config_json"])), state_dict, arrays


def _config_overrides(case, golden_config):
  """Command-line overrides turning the task config into the golden tiny U-Net."""
  get = lambda *names: next(golden_config[n] for n in names if n in golden_config)
  hid = tuple(get("hid_dims"))
  attention = tuple(bool(a) for a in get("attention"))
  return {
      "model.hid_dims": hid,
      "model.attention": attention,
      "model.num_blocks": get("num_blocks"),
      "model.t_emb_dim": get("t_emb_dim"),
      "model.d_emb": get("sinusoid_d_emb"),
      "model.num_head_channels": get("num_head_channels"),
      "model.num_groups": 32,
      "model.dtype": "float32",
      "model.dropout": 0.0,
      "model.name": f"golden_{case}",
  }


def _write_lightning_ckpt(path, state_dict):
  ema = {f"ema_denoiser.module.{k}": torch.from_numpy(v) for k, v in state_dict.items()}
  live = {f"denoiser.{k}": torch.from_numpy(v + 1.0) for k, v in state_dict.items()}
  torch.save(
      {
          "state_dict": {**live, **ema, "ema_denoiser.n_averaged": torch.tensor(7)},
          "global_step": 1234,
          "epoch": 3,
      },
      path,
  )


@pytest.mark.parametrize(
    "case,config_file", [("ms_tiny", "mnist_sudoku.py"), ("ep_tiny", "even_pixels.py")]
)
def test_converted_lightning_checkpoint_holds_the_ema_parameters(
    case, config_file, golden_dir, tmp_path, task_config
):
  golden_config, state_dict, _ = _golden(golden_dir, case)
  ckpt = tmp_path / "last.ckpt"
  _write_lightning_ckpt(ckpt, state_dict)
  overrides = _config_overrides(case, golden_config)
  workdir = tmp_path / "run"
  command = [
      sys.executable,
      "-m",
      "ipr_jax.convert",
      f"--torch_checkpoint={ckpt}",
      f"--config={_ROOT / 'configs' / config_file}",
      f"--workdir={workdir}",
  ]
  command += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=_ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (workdir / "checkpoints" / "1234").is_dir()

  config = checkpoint.restore_config(workdir)
  assert tuple(config["model"]["hid_dims"]) == overrides["model.hid_dims"]
  params = checkpoint.restore_params(workdir, which="ema")
  task_config = task_config(config_file.removesuffix(".py"))
  with task_config.unlocked():
    for k, v in overrides.items():
      section, field = k.split(".")
      task_config[section][field] = v
  model = build.make_model(task_config)
  # The binary wrote exactly the EMA state_dict's parameters (not the live ones, which are +1):
  # the mapping that tests/test_unet.py checks against the reference's own forward outputs.
  expected = state_dict_lib.unet_params_from_state_dict(state_dict, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, jax.device_get(expected))


def test_plain_npz_state_dict_needs_no_torch_and_live_weights_are_selectable(golden_dir, tmp_path):
  _, state_dict, _ = _golden(golden_dir, "ms_tiny")
  ckpt = tmp_path / "last.ckpt"
  _write_lightning_ckpt(ckpt, state_dict)
  loaded, extras = torch_files.load_state_dict_file(str(ckpt))
  assert extras["global_step"] == 1234
  live = torch_files.select_denoiser(loaded, "live")
  ema = torch_files.select_denoiser(loaded, "ema")
  assert len(live) == len(ema) == len(state_dict) == 376
  np.testing.assert_array_equal(
      live["time_embedding.mlp.0.bias"], state_dict["time_embedding.mlp.0.bias"] + 1.0
  )
  np.testing.assert_array_equal(
      ema["time_embedding.mlp.0.bias"], state_dict["time_embedding.mlp.0.bias"]
  )
  # The golden .npz itself (keys under sd/) reads without torch as a plain state_dict.
  plain, _ = torch_files.load_state_dict_file(str(golden_dir / "unet_ms_tiny.npz"))
  assert torch_files.select_denoiser(plain).keys() >= set(state_dict)


@pytest.mark.parametrize(
    "config_name,preset,count", [("even_pixels", "unet_32", 424), ("mnist_sudoku", "unet_256", 584)]
)
def test_reference_presets_check_the_key_count(config_name, preset, count, task_config):
  config = task_config(config_name)
  assert config.model.name == preset
  model = build.make_model(config)
  keys = state_dict_lib.expected_state_dict_keys(model)
  assert len(keys) == count == converter.REFERENCE_KEY_COUNTS[preset]
  shapes = state_dict_lib.expected_state_dict_shapes(model)
  truncated = {k: np.zeros(shapes[k], np.float32) for k in keys[:-1]}
  with pytest.raises(ValueError, match=f"{count} keys"):
    converter.convert_denoiser(truncated, config)


def test_mismatched_shapes_and_bad_files_give_clear_errors(golden_dir, tmp_path, task_config):
  golden_config, state_dict, _ = _golden(golden_dir, "ms_tiny")
  config = task_config("mnist_sudoku")
  with config.unlocked():
    for k, v in _config_overrides("ms_tiny", golden_config).items():
      section, field = k.split(".")
      config[section][field] = v
  config.model.hid_dims = (64,) * 6  # Another config: every conv is too wide.
  with pytest.raises(ValueError, match=r"shape"):
    converter.convert_denoiser(state_dict, config)
  junk = tmp_path / "junk.ckpt"
  junk.write_bytes(b"this is not a checkpoint")
  with pytest.raises(ValueError, match="junk.ckpt"):
    torch_files.load_state_dict_file(str(junk))
  with pytest.raises(FileNotFoundError, match="missing.ckpt"):
    torch_files.load_state_dict_file(str(tmp_path / "missing.ckpt"))
  with pytest.raises(ValueError, match="weights"):
    torch_files.select_denoiser({"denoiser.a": np.zeros(1)}, "ema")
