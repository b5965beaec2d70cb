"""PyTorch reference state_dict <-> Flax `UNet` params (spec §1.10).

Keys are those of the reference `UNetDenoiser` root (`time_embedding.mlp.*`,
`model.encoder.blocks.*`, ...), without the Lightning prefixes
(`denoiser.` / `ema_denoiser.module.`), which the checkpoint converter strips.
Arrays use PyTorch layouts; this is the only module (with the converter) that
knows them.

The Flax names mirror the PyTorch ones, so the mapping is a rename plus a
layout change:

| Flax                                 | PyTorch                            |
|--------------------------------------|------------------------------------|
| `time_embedding/...`                 | `time_embedding....`               |
| `encoder|bottleneck|decoder/...`     | `model.encoder|bottleneck|decoder` |
| `blocks_7_1`, `blocks_0` (bottleneck)| `blocks.7.1`, `blocks.0`           |
| `conv_1_0`, `conv_1_2`, `conv_2_2`   | `conv_1.0`, `conv_1.2`, `conv_2.2` |
| `embedding_layer_1`, `mlp_0`, `out_2`| `embedding_layer.1`, `mlp.0`, `out.2` |
| Conv `kernel` [kh, kw, I, O]         | `weight` [O, I, kh, kw]            |
| Dense `kernel` [I, O]                | Linear `weight` [O, I]             |
| `qkv`/`proj` Dense `kernel` [I, O]   | Conv1d `weight` [O, I, 1]          |
| GroupNorm `scale`                    | `weight`                           |
| `bias`                               | `bias`                             |

Every NormWithEmbedding of the reference holds the shared time embedding, so
its state_dict repeats `time_embedding.mlp.*` under each
`...norm_with_embedding.t_emb.mlp.*`. Those duplicates are checked equal when
reading and written out again when producing a state_dict, giving the
reference's key counts (424 / 504 / 584 for unet_32 / unet_128 / unet_256).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax.models.unet import UNet
from ipr_jax.runtime import errors

_TOP_LEVEL = {
    "time_embedding": "time_embedding",
    "encoder": "model.encoder",
    "bottleneck": "model.bottleneck",
    "decoder": "model.decoder",
}
_INDEXED = re.compile(r"^(blocks|mlp|out|embedding_layer|conv_1|conv_2)((?:_\d+)+)$")
_CONV1D = ("qkv", "proj")
_T_EMB_PARAMS = ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")
# Registration order of the reference modules, used to order the keys as
# PyTorch's state_dict() does.
_ORDER = (
    "time_embedding",
    "model",
    "encoder",
    "bottleneck",
    "decoder",
    "blocks",
    "out",
    "conv_1",
    "norm_with_embedding",
    "t_emb",
    "mlp",
    "norm",
    "embedding_layer",
    "conv_2",
    "shortcut",
    "qkv",
    "proj",
    "downsample",
    "conv",
    "weight",
    "bias",
)
_MAX_LISTED = 20

FlaxPath = tuple[str, ...]


def _torch_module_name(path: FlaxPath) -> str:
  """('encoder', 'blocks_7_1', 'qkv') -> 'model.encoder.blocks.7.1.qkv'."""
  parts = [_TOP_LEVEL[path[0]]]
  for segment in path[1:]:
    match = _INDEXED.match(segment)
    if match:
      segment = match.group(1) + match.group(2).replace("_", ".")
    parts.append(segment)
  return ".".join(parts)


def _torch_shape(path: FlaxPath, shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] != "kernel":
    return tuple(shape)
  if len(shape) == 4:  # conv [kh, kw, I, O] -> [O, I, kh, kw]
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-2] in _CONV1D:  # dense [I, O] -> conv1d [O, I, 1]
    return (shape[1], shape[0], 1)
  return (shape[1], shape[0])  # dense [I, O] -> linear [O, I]


def _to_torch_layout(path: FlaxPath, value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if path[-2] in _CONV1D:
    return value.T[:, :, None]
  return value.T


def _to_flax_layout(path: FlaxPath, value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if path[-2] in _CONV1D:
    return value[:, :, 0].T
  return value.T


def _torch_key(path: FlaxPath) -> str:
  leaf = "bias" if path[-1] == "bias" else "weight"  # kernel / scale
  return f"{_torch_module_name(path[:-1])}.{leaf}"


def _key_order(key: str):
  return tuple(
      (0, int(part), "")
      if part.isdigit()
      else (1, _ORDER.index(part) if part in _ORDER else len(_ORDER), part)
      for part in key.split(".")
  )


_TEMPLATE_CACHE: dict[tuple, dict[FlaxPath, tuple[int, ...]]] = {}


def param_shapes(model: UNet) -> dict[FlaxPath, tuple[int, ...]]:
  """Flax parameter paths and shapes of `model`, via `jax.eval_shape`."""
  cache_key = (
      tuple(model.hid_dims),
      tuple(model.attention),
      model.d_in,
      model.d_out,
      model.num_blocks,
      model.t_emb_dim,
      model.d_emb,
      model.num_head_channels,
      model.num_groups,
  )
  if cache_key not in _TEMPLATE_CACHE:
    model.check_config()
    z = jax.ShapeDtypeStruct((1, 8, 8, model.d_in), jnp.float32)
    t = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), z, t)
    flat = flax.traverse_util.flatten_dict(variables["params"])
    _TEMPLATE_CACHE[cache_key] = {path: tuple(leaf.shape) for path, leaf in flat.items()}
  return dict(_TEMPLATE_CACHE[cache_key])


def _entries(model: UNet) -> list[tuple[str, FlaxPath | None, tuple[int, ...]]]:
  """(torch key, Flax path or None for a duplicate, torch shape), key order."""
  entries = []
  nwe_prefixes = set()
  for path, shape in param_shapes(model).items():
    entries.append((_torch_key(path), path, _torch_shape(path, shape)))
    if "norm_with_embedding" in path:
      cut = path.index("norm_with_embedding") + 1
      nwe_prefixes.add(_torch_module_name(path[:cut]))
  shapes = {key: shape for key, _, shape in entries}
  for prefix in nwe_prefixes:
    for name in _T_EMB_PARAMS:
      entries.append((f"{prefix}.t_emb.{name}", None, shapes[f"time_embedding.{name}"]))
  return sorted(entries, key=lambda entry: _key_order(entry[0]))


def expected_state_dict_shapes(model: UNet) -> dict[str, tuple[int, ...]]:
  """Reference state_dict keys (duplicates included) and their shapes."""
  return {key: shape for key, _, shape in _entries(model)}


def expected_state_dict_keys(model: UNet) -> list[str]:
  """Reference state_dict keys in PyTorch's order, duplicates included."""
  return [key for key, _, _ in _entries(model)]


def _listing(keys: list[str]) -> str:
  shown = ", ".join(keys[:_MAX_LISTED])
  more = len(keys) - _MAX_LISTED
  return shown + (f", ... ({more} more)" if more > 0 else "")


def unet_params_from_state_dict(state_dict: Mapping[str, Any], model: UNet) -> dict:
  """Flax params of `model` from a reference state_dict (strict).

  Args:
    state_dict: reference key -> array (numpy or anything `np.asarray`
      accepts) in PyTorch layout, keys relative to the `UNetDenoiser` root.
    model: the UNet the params are for.

  Returns:
    The nested 'params' collection (float32 jax arrays).

  Raises:
    ValueError: on missing or unexpected keys, a shape mismatch, or a
      duplicated time-embedding entry that differs from
      `time_embedding.mlp.*`.
  """
  entries = _entries(model)
  expected = {key for key, _, _ in entries}
  missing = [key for key, _, _ in entries if key not in state_dict]
  unexpected = sorted(key for key in state_dict if key not in expected)
  if missing or unexpected:
    message = (
        "state_dict does not match the model: "
        f"{len(missing)} missing keys [{_listing(missing)}]; "
        f"{len(unexpected)} unexpected keys [{_listing(unexpected)}]"
    )
    if missing and unexpected:
      prefixes = {key[: -len(missing[0])] for key in unexpected if key.endswith("." + missing[0])}
      if prefixes:
        message += f" (the unexpected keys carry a prefix " f"{sorted(prefixes)}; strip it first)"
    raise errors.ConfigError(message)

  flat = {}
  for key, path, shape in entries:
    value = np.asarray(state_dict[key])
    if value.shape != shape:
      raise errors.ConfigError(
          f"state_dict[{key!r}] has shape {value.shape}; the " f"model expects {shape}"
      )
    if not np.issubdtype(value.dtype, np.floating):
      raise errors.ConfigError(
          f"state_dict[{key!r}] has dtype {value.dtype}; " "expected a floating dtype"
      )
    if path is None:
      source = "time_embedding." + key.split(".t_emb.", 1)[1]
      if not np.array_equal(value, np.asarray(state_dict[source])):
        raise errors.ConfigError(
            f"state_dict[{key!r}] differs from "
            f"state_dict[{source!r}]; they must be the same "
            "shared time embedding"
        )
      continue
    flat[path] = jnp.asarray(_to_flax_layout(path, value.astype(np.float32)))
  return flax.traverse_util.unflatten_dict(flat)


def state_dict_from_unet_params(params: Mapping[str, Any], model: UNet) -> dict[str, np.ndarray]:
  """Reference state_dict (PyTorch layouts, duplicates included) of params.

  Args:
    params: the 'params' collection of `model` (a {'params': ...} variables
      dict is accepted too).
    model: the UNet the params belong to.

  Returns:
    Ordered key -> float32 numpy array, keys as in the reference.

  Raises:
    ValueError: if the params tree does not match the model.
  """
  params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
  if set(params) == {"params"}:
    params = params["params"]
  flat = flax.traverse_util.flatten_dict(params)
  template = param_shapes(model)
  missing = sorted("/".join(p) for p in template if p not in flat)
  unexpected = sorted("/".join(p) for p in flat if p not in template)
  if missing or unexpected:
    raise errors.ConfigError(
        "params do not match the model: "
        f"{len(missing)} missing [{_listing(missing)}]; "
        f"{len(unexpected)} unexpected [{_listing(unexpected)}]"
    )
  for path, shape in template.items():
    if tuple(np.shape(flat[path])) != shape:
      raise errors.ConfigError(
          f"params[{'/'.join(path)!r}] has shape "
          f"{tuple(np.shape(flat[path]))}; the model expects "
          f"{shape}"
      )
  out = {}
  for key, path, _ in _entries(model):
    if path is None:
      source = "time_embedding." + key.split(".t_emb.", 1)[1]
      out[key] = out[source].copy()
    else:
      value = np.asarray(jax.device_get(flat[path]), dtype=np.float32)
      out[key] = np.ascontiguousarray(_to_torch_layout(path, value))
  return out
