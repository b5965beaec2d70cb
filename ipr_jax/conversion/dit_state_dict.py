"""The SRM authors' framework's DiT state_dicts (spatialreasoners 1.0.5) <-> Flax `dit.DiT` params.

Key rule: a Flax path joined by '.' with `t_emb_mlp_k` -> `t_emb.mlp.k`, `patch_emb_proj` ->
`patch_emb.proj`, `out_layer_x` -> `out_layer.x`, `blocks_i` -> `blocks.i`,
`adaLN_modulation_1` -> `adaLN_modulation.1`, and the leaf `kernel` (transposed: torch Linear
weights are [out, in]) or `scale` (a norm's weight) -> `weight`.

The output layer. The framework's tokenizer reads a token's outputs as mean = [:F], v = [F:2F]
(with predict_variance), logvar = [-1] (with predict_uncertainty), F = features per token;
ipr-jax's DiT emits exactly [mean | v | logvar] (2 F + 1 rows). A framework model
- with predict_variance has `model_d_out` = F + 2 * (features per region) / n + 1 rows (its
  formula over-counts for n > 1, and only [F:2F] is ever read): the rows between 2 F and the
  last are not imported;
- without predict_variance (F + 1 rows) samples with a fixed variance; the v rows are set to
  weight 0, bias -1, so v = 0 and the learned-range sigma is exactly sigma_small (the
  framework's `fixed_small`);
- without predict_uncertainty (F rows) has no uncertainty for SRM's ordering: refused.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.models.dit import DiT
from ipr_jax.runtime import errors

# Prefixes of the framework's Lightning checkpoints (`denoising_model.<...>`) and of its
# checkpoint-mapping scripts' outputs.
EMA_PREFIXES = ("denoising_model.ema_denoiser.module.", "ema_denoiser.module.")
LIVE_PREFIXES = ("denoising_model.denoiser.", "denoiser.")
_IGNORED_KEYS = ("ema_denoiser.n_averaged", "denoising_model.ema_denoiser.n_averaged")
_OUT_KERNEL = ("out_layer_linear", "kernel")
_OUT_BIAS = ("out_layer_linear", "bias")
_MAX_LISTED = 12


def torch_key(path: tuple[str, ...]) -> str:
  """The framework's state_dict key of a Flax param path."""
  key = ".".join(path)
  key = re.sub(r"^t_emb_mlp_", "t_emb.mlp.", key)
  key = key.replace("patch_emb_proj", "patch_emb.proj")
  key = re.sub(r"^out_layer_", "out_layer.", key)
  key = re.sub(r"^blocks_(\d+)", r"blocks.\1", key)
  key = key.replace("adaLN_modulation_1", "adaLN_modulation.1")
  return re.sub(r"\.(kernel|scale)$", ".weight", key)


def param_shapes(model: DiT) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax param path -> shape, from an abstract init (nothing is computed)."""
  layout = model.token_layout
  z = jnp.zeros((1, layout.height, layout.width, layout.channels), jnp.float32)
  t = jnp.zeros((1, layout.height, layout.width, 1), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), z, t)["params"]
  flat = flax.traverse_util.flatten_dict(shapes)
  return {path: tuple(s.shape) for path, s in flat.items()}


def select_weights(state_dict: Mapping[str, np.ndarray], weights: str) -> dict[str, np.ndarray]:
  """The DiT's own keys of a framework checkpoint: 'ema' or 'live' weights, prefix removed.

  A state_dict with neither prefix is taken as the DiT's own.
  """
  if weights not in ("ema", "live"):
    raise errors.ConfigError(f"weights must be 'ema' or 'live', got {weights!r}")
  prefixes = EMA_PREFIXES if weights == "ema" else LIVE_PREFIXES
  every = EMA_PREFIXES + LIVE_PREFIXES
  if not any(k.startswith(every) for k in state_dict):
    return {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}
  for prefix in prefixes:
    chosen = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if chosen:
      return chosen
  raise errors.ConfigError(
      f"the checkpoint has no {weights} weights (no keys starting with {prefixes}); use the "
      "other --weights choice"
  )


def _listing(keys) -> str:
  keys = sorted(keys)
  more = len(keys) - _MAX_LISTED
  return ", ".join(keys[:_MAX_LISTED]) + (f", ... ({more} more)" if more > 0 else "")


def _output_rows(weight: np.ndarray, bias: np.ndarray, model: DiT) -> tuple[np.ndarray, ...]:
  """The framework's out_layer.linear rows -> ipr-jax's [mean | v | logvar] (2 F + 1 rows)."""
  f = model.token_layout.features
  rows = weight.shape[0]
  if rows == f:
    raise errors.ConfigError(
        f"out_layer.linear has {rows} rows = the {f} mean features per token: the model predicts "
        "no uncertainty (predict_uncertainty=False), which SRM's ordering needs"
    )
  if rows == f + 1:
    v_weight = np.zeros((f, weight.shape[1]), np.float32)
    v_bias = np.full((f,), -1.0, np.float32)  # v = 0: the learned-range sigma is sigma_small.
  elif rows >= 2 * f + 1:
    v_weight, v_bias = weight[f : 2 * f], bias[f : 2 * f]
  else:
    raise errors.ConfigError(
        f"out_layer.linear has {rows} rows; a DiT with {f} features per token has {f + 1} "
        f"(uncertainty) or at least {2 * f + 1} (uncertainty and variance): is it a "
        "checkpoint of another patch size, channel count or token layout?"
    )
  new_weight = np.concatenate([weight[:f], v_weight, weight[-1:]], axis=0)
  new_bias = np.concatenate([bias[:f], v_bias, bias[-1:]], axis=0)
  return new_weight, new_bias


def dit_params_from_state_dict(state_dict: Mapping[str, Any], model: DiT) -> dict:
  """Flax params of `model` (predict_variance and predict_uncertainty) from a framework DiT
  state_dict (strict: every key used, every shape checked).

  Args:
    state_dict: key -> array in PyTorch layout, keys relative to the DiT (see `select_weights`).
    model: the DiT the params are for.

  Returns:
    The nested 'params' collection (float32 jax arrays).

  Raises:
    errors.ConfigError: missing or unexpected keys, a shape or dtype mismatch, an output
      layer of another size.
  """
  if not (model.predict_variance and model.predict_uncertainty):
    raise ValueError("the SRM DiT predicts variance and uncertainty")
  shapes = param_shapes(model)
  keys = {torch_key(path): path for path in shapes}
  missing = [k for k in keys if k not in state_dict]
  unexpected = [k for k in state_dict if k not in keys]
  if missing or unexpected:
    raise errors.ConfigError(
        f"the state_dict does not match model.dit (form {model.form!r}, hidden {model.hidden}, "
        f"depth {model.depth}): {len(missing)} missing keys [{_listing(missing)}]; "
        f"{len(unexpected)} unexpected keys [{_listing(unexpected)}]"
    )
  arrays = {}
  for key, path in keys.items():
    value = np.asarray(state_dict[key])
    if not np.issubdtype(value.dtype, np.floating):
      raise errors.ConfigError(f"state_dict[{key!r}] has dtype {value.dtype}; expected floats")
    arrays[path] = value.astype(np.float32)
  weight, bias = _output_rows(
      arrays[("out_layer_linear", "kernel")], arrays[("out_layer_linear", "bias")], model
  )
  arrays[_OUT_KERNEL], arrays[_OUT_BIAS] = weight, bias
  flat = {}
  for path, shape in shapes.items():
    value = arrays[path].T if path[-1] == "kernel" else arrays[path]
    if value.shape != shape:
      raise errors.ConfigError(
          f"state_dict[{torch_key(path)!r}] has shape {arrays[path].shape}; model.dit expects "
          f"{shape[::-1] if path[-1] == 'kernel' else shape}"
      )
    flat[path] = jnp.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


def state_dict_from_dit_params(params: Mapping[str, Any], model: DiT) -> dict[str, np.ndarray]:
  """The framework's state_dict (predict_variance and predict_uncertainty: 2 F + 1 output rows,
  PyTorch layouts) of `model`'s params."""
  del model
  flat = flax.traverse_util.flatten_dict(dict(params.get("params", params)))
  return {
      torch_key(path): np.asarray(value).T if path[-1] == "kernel" else np.asarray(value)
      for path, value in flat.items()
  }
