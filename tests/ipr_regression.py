"""Fixed SRM + IPR runs whose outputs are stored in tests/regression/ipr_default_path.npz.

The file was written by the code before the IPR variants existed (commit 72915ad):

    PYTHONPATH=<checkout of 72915ad> python tests/ipr_regression.py \
        tests/regression/ipr_default_path.npz

`test_sampler.test_default_path_matches_the_stored_runs` reruns the same cases with today's
code and the default (paper) settings. The denoiser is a cheap deterministic function of (z, t)
whose samples differ from their noise and whose sigma depends on the state, so the patch order
and every re-noised set matter.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from ipr_jax import sampling
from ipr_jax.models.denoiser import DenoiserOutput

PATCH = 2
SHAPE = (4, 8, 8, 2)  # 4 puzzles, 4x4 patches of 2x2 pixels, 2 channels


def denoise(z, t):
  """A velocity pulling z towards a smooth target, with a state-dependent patch sigma."""
  b, h, w, _ = z.shape
  u = 0.8 * jnp.tanh(z) * (0.5 + t) + 0.1 * jnp.cos(z)
  pooled = z.mean(-1).reshape(b, h // PATCH, PATCH, w // PATCH, PATCH).mean((2, 4))
  sigma = jnp.exp(jnp.sin(2.0 * pooled) + 0.1)
  sigma = jnp.repeat(jnp.repeat(sigma, PATCH, 1), PATCH, 2)[..., None]
  return DenoiserOutput(u=u, v=jax.nn.sigmoid(z), logvar=2 * jnp.log(sigma), sigma=sigma)


def inputs():
  rng = np.random.default_rng(2026)
  image = rng.uniform(-1, 1, SHAPE).astype(np.float32)
  mask = np.ones(SHAPE[:3] + (1,), np.float32)
  for b, given in enumerate([[0, 5], [3], [0, 6, 9, 15], []]):
    for p in given:
      r, c = divmod(p, 4)
      mask[b, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = 0.0
  noise = rng.standard_normal(SHAPE).astype(np.float32)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(5), jnp.arange(4))
  return keys, image, mask, noise


def _score(z):
  return {"mean": z.mean((1, 2, 3)), "corner": z[:, 0, 0, 0]}


CASES = {
    "standard": dict(ipr=dict(budget=3, steps_per_patch=4, overlap=0.5)),
    "fixed_noise": dict(
        ipr=dict(budget=2, steps_per_patch=4, overlap=0.5, noise_type="fixed", resampling_ratio=0.5)
    ),
    "correction": dict(
        ipr=dict(
            budget=2, steps_per_patch=4, overlap=0.5, mode="correction", num_corruption_swaps=3
        )
    ),
}


def run(name: str) -> dict[str, np.ndarray]:
  """The outputs of case `name` as numpy arrays."""
  keys, image, mask, noise = inputs()
  ipr_config = sampling.IPRConfig(**CASES[name]["ipr"])
  sampler_config = sampling.SamplerConfig(steps_per_patch=3, overlap=0.5, stochasticity=0.5)
  result = jax.jit(
      lambda keys, image, mask, noise: sampling.srm_ipr(
          sampling.Denoiser(denoise, PATCH),
          sampling.Puzzles(
              keys, image=image, mask=None if ipr_config.mode == "correction" else mask, noise=noise
          ),
          sampler_config,
          ipr_config,
      )
  )(keys, image, mask, noise)
  out = {
      "z": result.z,
      "nfe_per_budget": result.nfe_per_budget,
      "resampled": result.resampled,
      "initial_order": result.initial_order,
  }
  # The stored scores were computed inside the scan by the code of 72915ad; today the sampler
  # returns the iterates and the caller scores them.
  scores = jax.vmap(_score)(result.iterates)
  out.update({f"score_{k}": v for k, v in scores.items()})
  return {k: np.asarray(v) for k, v in out.items()}


if __name__ == "__main__":
  arrays = {f"{name}/{k}": v for name in CASES for k, v in run(name).items()}
  np.savez(sys.argv[1], **arrays)
  print(f"wrote {len(arrays)} arrays to {sys.argv[1]}")
