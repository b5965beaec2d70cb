r"""Throughput of SRM + IPR (one compiled program per batch) at several batch sizes.

  python experiments/device/benchmark_sampler.py --task=ms_hard --unet=tiny --batch_sizes=1,4
  python experiments/device/benchmark_sampler.py --task=ms_hard --unet=unet_256 --dtype=bfloat16 \
      --batch_sizes=1,16,64 --budget=30          # on a GPU
  python experiments/device/benchmark_sampler.py --task=ep_test --unet=unet_32 --dtype=bfloat16 \
      --batch_sizes=1,16,64
  python experiments/device/benchmark_sampler.py --task=cp_test --unet=unet_128 --dtype=bfloat16 \
      --batch_sizes=1,16,64

The U-Net has random weights (a fresh init with its zero-initialised layers redrawn, so sigma and
the selection order are not degenerate); the sampler settings are the reference's ms_hard_test
(SRM 3 / 0.0, IPR 10 / 0.8, ratio 0.25), ep_test (SRM 30 / 0.9, IPR 30 / 0.9) or cp_test (128x128,
8x8 patches; SRM 10 / 0.9, IPR 10 / 0.9). For each batch
size it reports the compile time, the steady-state time of one call (median of --repeats), puzzles
per second and denoiser passes (NFE) per second, and the speed-up over batch 1 run puzzle by puzzle
(the reference's way). Results are printed and written as JSON to --output.

--mode=evaluation measures what the evaluation binary does per batch, with a real config and its
model (default: the shipped demo model on hard 4x4 puzzles):

  python experiments/device/benchmark_sampler.py --mode=evaluation \
      --config=configs/mnist_sudoku.py:demo --num_puzzles=256 --batch_size=32 --budget=10

  * batch order: every batch of `--num_puzzles` puzzles timed through one compiled
    `runner.Evaluator` (compiled before timing), batched in index order and batched by the
    number of unknown cells (`config.eval.sort_by_unknowns`); total seconds, puzzles/s, passes/s;
  * the transfers the binary no longer makes per batch: copying the parameters to the devices
    (before: pmap broadcast them with every call) and fetching the batch's final images to the
    host (before: the whole sampler result came back), each the median of --repeats.
"""

import json
import os
import time

from absl import app
from absl import flags
from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax import sampling
from ipr_jax.build import config_base
from ipr_jax.build import pretrained
from ipr_jax.evaluation import runner
from ipr_jax.evaluation import settings as eval_settings
from ipr_jax.models import denoiser
from ipr_jax.models import unet
from ipr_jax.runtime import host_devices

_TASK = flags.DEFINE_enum("task", "ms_hard", ["ms_hard", "ep_test", "cp_test"], "Sampler settings.")
_UNET = flags.DEFINE_string("unet", "tiny", "U-Net preset (unet_32/unet_128/unet_256) or 'tiny'.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4"], "Batch sizes to time.")
_BUDGET = flags.DEFINE_integer("budget", 30, "IPR iterations.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per batch size (median reported).")
_NUM_GIVEN = flags.DEFINE_integer("num_given", 13, "Sudoku given cells (hard: 0..26).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")
_MODE = flags.DEFINE_enum(
    "mode",
    "sampler",
    ["sampler", "evaluation"],
    "sampler: one jitted call per batch size; evaluation: the binary's " "batches.",
)
_CONFIG = flags.DEFINE_string(
    "config",
    "configs/mnist_sudoku.py:demo",
    "--mode=evaluation: the task config (its model must be shipped, " "config.eval.pretrained).",
)
_NUM_PUZZLES = flags.DEFINE_integer("num_puzzles", 256, "--mode=evaluation: puzzles.")
_EVAL_BATCH = flags.DEFINE_integer("batch_size", 32, "--mode=evaluation: puzzles per batch.")

_SETTINGS = {
    "ms_hard": dict(
        image=252,
        channels=1,
        patch=28,
        sampler=sampling.SamplerConfig(steps_per_patch=3, overlap=0.0),
        ipr=dict(steps_per_patch=10, overlap=0.8),
    ),
    "ep_test": dict(
        image=32,
        channels=3,
        patch=4,
        sampler=sampling.SamplerConfig(steps_per_patch=30, overlap=0.9),
        ipr=dict(steps_per_patch=30, overlap=0.9),
    ),
    "cp_test": dict(
        image=128,
        channels=3,
        patch=8,
        sampler=sampling.SamplerConfig(steps_per_patch=10, overlap=0.9),
        ipr=dict(steps_per_patch=10, overlap=0.9),
    ),
}


def _model(name: str, channels: int, dtype) -> unet.UNet:
  if name == "tiny":
    return unet.UNet(
        hid_dims=(32, 32, 32),
        attention=(False, False, True),
        d_in=channels,
        d_out=2 * channels + 1,
        num_blocks=1,
        t_emb_dim=64,
        d_emb=32,
        num_head_channels=32,
        num_groups=8,
        dtype=dtype,
    )
  return unet.make_unet(name, channels, 2 * channels + 1, dtype=dtype)


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def evaluation_benchmark() -> dict:
  """The evaluation binary's per-batch work: batch order and the transfers it avoids."""
  config = config_base.load_config(_CONFIG.value)
  config.ipr.budget = _BUDGET.value
  config.eval.num_puzzles = _NUM_PUZZLES.value
  config.eval.batch_size = _EVAL_BATCH.value
  if not config.eval.pretrained:
    raise app.UsageError(f"{_CONFIG.value} names no shipped model (config.eval.pretrained)")
  params = pretrained.load(config.eval.pretrained).params
  evaluator = runner.Evaluator(config, params)
  pad_to = config.eval.batch_size
  jax.block_until_ready(evaluator(np.arange(pad_to), pad_to=pad_to).nfe)  # compile
  rows = []
  unknown_all = evaluator.task.unknown_patches(config.eval.seed, np.arange(_NUM_PUZZLES.value))
  for sort in (False, True):
    config.eval.sort_by_unknowns = sort
    batches = eval_settings.puzzle_batches(config, unknown_all)
    start = time.perf_counter()
    passes = 0.0
    for batch in batches:
      passes += float(evaluator(batch, pad_to=pad_to).nfe[-1].sum())
    seconds = time.perf_counter() - start
    unknown = [unknown_all[b] for b in batches]
    row = dict(
        sort_by_unknowns=sort,
        seconds=seconds,
        puzzles_per_s=config.eval.num_puzzles / seconds,
        nfe_per_s=passes / seconds,
        mean_batch_max_unknown=float(np.mean([u.max() for u in unknown])),
        mean_unknown=float(np.mean(np.concatenate(unknown))),
    )
    rows.append(row)
    print(json.dumps(row), flush=True)

  devices = jax.local_devices()
  per_device = -(-pad_to // len(devices))
  shape = (len(devices), per_device, *evaluator.task.image_shape)
  images = jax.pmap(lambda x: x + 1.0, devices=devices)(jnp.zeros(shape, jnp.float32))
  transfers = dict(
      params_to_devices_s=_median_seconds(
          lambda: jax_utils.replicate(params, devices), _REPEATS.value
      ),
      final_images_to_host_s=_median_seconds(lambda: jax.device_get(images), _REPEATS.value),
      final_images_bytes=int(np.prod(shape)) * 4,
      num_params=int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
  )
  print(json.dumps(transfers), flush=True)
  return dict(
      mode="evaluation",
      config=_CONFIG.value,
      num_puzzles=config.eval.num_puzzles,
      batch_size=pad_to,
      budget=config.ipr.budget,
      devices=len(devices),
      device=f"{devices[0].platform}:{devices[0].device_kind}",
      jax=jax.__version__,
      order=rows,
      transfers_per_batch=transfers,
  )


def main(argv):
  del argv
  if _MODE.value == "evaluation":
    result = evaluation_benchmark()
    print(json.dumps(result, indent=2))
    if _OUTPUT.value:
      os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
      with open(_OUTPUT.value, "w") as f:
        json.dump(result, f, indent=2)
    return
  settings = _SETTINGS[_TASK.value]
  shape = (settings["image"], settings["image"], settings["channels"])
  model = _model(_UNET.value, settings["channels"], jnp.dtype(_DTYPE.value))
  params = unet.nonzero_init(model, shape, jax.random.key(0))
  denoise = denoiser.make_denoise_fn(model, settings["patch"])
  ipr_config = sampling.IPRConfig(budget=_BUDGET.value, **settings["ipr"])
  grid = settings["image"] // settings["patch"]

  @jax.jit
  def run(params, keys, image, mask, noise):
    result = sampling.srm_ipr(
        sampling.Denoiser(lambda z, t: denoise(params, z, t), settings["patch"]),
        sampling.Puzzles(keys, image=image, mask=mask, noise=noise),
        settings["sampler"],
        ipr_config,
    )
    return result.z, result.nfe

  def inputs(batch):
    keys = sampling.puzzle_keys(jax.random.key(1), jnp.arange(batch))
    noise = jax.random.normal(jax.random.key(3), (batch, *shape))
    if _TASK.value != "ms_hard":
      return keys, None, None, noise
    image = jax.random.uniform(jax.random.key(2), (batch, *shape), minval=-1, maxval=1)
    cells = np.ones((batch, grid * grid), np.float32)
    cells[:, : _NUM_GIVEN.value] = 0  # The first cells are given.
    mask = np.kron(cells.reshape(batch, grid, grid), np.ones((settings["patch"],) * 2))
    return keys, image, jnp.asarray(mask[..., None], jnp.float32), noise

  device = jax.devices()[0]
  rows = []
  for batch in [int(b) for b in _BATCH_SIZES.value]:
    args = inputs(batch)
    start = time.perf_counter()
    _, nfe = jax.block_until_ready(run(params, *args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(run(params, *args))
      times.append(time.perf_counter() - start)
    call_s = float(np.median(times))
    row = dict(
        batch=batch,
        first_call_s=compile_s,
        call_s=call_s,
        puzzles_per_s=batch / call_s,
        nfe_per_puzzle=float(np.mean(nfe)),
        nfe_per_s=float(np.sum(nfe)) / call_s,
    )
    rows.append(row)
    print(json.dumps(row), flush=True)
  base = next((r for r in rows if r["batch"] == 1), None)
  if base is not None:
    for r in rows:
      r["speedup_vs_batch1_loop"] = r["puzzles_per_s"] / base["puzzles_per_s"]
  result = dict(
      task=_TASK.value,
      unet=_UNET.value,
      dtype=_DTYPE.value,
      budget=_BUDGET.value,
      device=f"{device.platform}:{device.device_kind}",
      jax=jax.__version__,
      rows=rows,
  )
  print(json.dumps(result, indent=2))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  host_devices.use_cpu_cores()
  app.run(main)
