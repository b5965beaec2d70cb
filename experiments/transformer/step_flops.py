"""Training compute per step of the equal-compute runs (run_equal_compute.sh): XLA's cost analysis
of the gradient of the denoiser's output at the demo's batch (32 images of 28x28), for the demo's
U-Net and the DiT of the script. Prints one JSON line per model: parameters, GFLOP per step, and
the steps that give the U-Net's compute at its step count.

    python experiments/transformer/step_flops.py --unet_steps=6000
"""

import argparse
import json

import jax
import jax.numpy as jnp

from ipr_jax import build
from ipr_jax.build import config_base

# The DiT of run_equal_compute.sh (one token per 7x7 cell).
DIT = {"model.kind": "dit", "model.dit.hidden": 192, "model.dit.depth": 6, "model.dit.num_heads": 6}


def step_cost(overrides: dict) -> tuple[int, float]:
  """(parameters, GFLOP of one gradient step at the demo's batch) of mnist_sudoku:demo."""
  config = config_base.load_config("mnist_sudoku:demo")
  for key, value in overrides.items():
    *path, last = key.split(".")
    section = config
    for name in path:
      section = section[name]
    section[last] = value
  model = build.make_model(config, training=True)
  params = build.init_params(config, model, jax.random.PRNGKey(0))
  h, w = config.data.image_size, config.data.image_size
  z = jnp.zeros((config.batch_size, h, w, config.data.channels))
  t = jnp.zeros((config.batch_size, h, w, 1))
  grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, z, t) ** 2))
  cost = jax.jit(grad).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return sum(x.size for x in jax.tree_util.tree_leaves(params)), float(cost["flops"]) / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--unet_steps", type=int, default=6000)
  args = parser.parse_args()
  unet_params, unet_gflop = step_cost({})
  dit_params, dit_gflop = step_cost(DIT)
  total = unet_gflop * args.unet_steps
  for name, params, gflop in (("unet", unet_params, unet_gflop), ("dit", dit_params, dit_gflop)):
    steps = round(total / gflop)
    print(
        json.dumps(
            dict(
                model=name,
                params=params,
                gflop_per_step=round(gflop, 3),
                steps=steps,
                tflop=round(steps * gflop / 1e3, 1),
            )
        )
    )


if __name__ == "__main__":
  main()
