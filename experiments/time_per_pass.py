r"""CPU (or any backend) time per denoiser pass of a config's U-Net, the time embedded per pixel
(the reference's way) and per patch (`unet.level_time_patch`), on random non-zero weights.

  python experiments/time_per_pass.py --config=configs/mnist_sudoku.py:demo --batch=64
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ipr_jax import build  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.build import config_base  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.data import geometry  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.models import unet  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/mnist_sudoku.py:demo")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  config = config_base.load_config(args.config)
  shape = geometry.image_shape(config)
  model = build.make_model(config)
  params = unet.nonzero_init(model, shape, jax.random.key(0))
  grid = shape[0] // config.data.patch_size
  key_z, key_t = jax.random.split(jax.random.key(1))
  z = jax.random.normal(key_z, (args.batch, *shape))
  t = np.repeat(
      np.repeat(
          np.asarray(jax.random.uniform(key_t, (args.batch, grid, grid, 1))),
          config.data.patch_size,
          1,
      ),
      config.data.patch_size,
      2,
  )
  out = {
      "config": args.config,
      "batch": args.batch,
      "backend": jax.default_backend(),
      "levels": [
          [list(s), unet.level_time_patch(shape[:2], s, config.data.patch_size)]
          for s in unet.level_sizes(shape[:2], len(model.hid_dims))
      ],
  }
  results = {}
  for way, m in (("per_pixel", model.clone(time_patch_size=None)), ("per_patch", model)):
    forward = jax.jit(m.apply).lower({"params": params}, z, t).compile()
    results[way] = np.asarray(forward({"params": params}, z, t))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(forward({"params": params}, z, t))
      times.append(time.perf_counter() - start)
    cost = forward.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[way] = {
        "ms_per_image_median": 1e3 * float(np.median(times)) / args.batch,
        "ms_per_image_min": 1e3 * float(np.min(times)) / args.batch,
        "gflop_per_image": float(cost["flops"]) / args.batch / 1e9,
    }
  out["max_abs_difference"] = float(np.abs(results["per_pixel"] - results["per_patch"]).max())
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
