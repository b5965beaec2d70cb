"""Verifier-free by construction: the evaluation's sampler never sees the task's scorer.

`runner.make_run_fn` hands `sampling.srm_ipr` no scorer and no solution; it scores the
returned iterates afterwards. Only immediate_stop (the reference's) and selection='verifier' are
handed a verifier (`runner.verifiers`). So under every verifier-free setting the sampler's
outputs (every budget's iterate of every puzzle, the passes, the final digits, the model's own
query scores) must be bit for bit the same whatever the task's scorer and per-cell verifier say:
here the real Sudoku scorer, an adversary whose "valid" is an arbitrary function of the image,
an oracle that reads the solution, and the real scorer with another solution hidden under the
same given cells. The two settings documented to read a verifier are the
positive control: their outputs do change under the oracle, so the comparison can fail.

The denoiser is a cheap deterministic function of (z, t) (the U-Net would cost a compilation
per setting and scorer); the scorers and the wiring are the evaluation's own.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax import sampling
from ipr_jax.build import config_base
from ipr_jax.evaluation import runner
from ipr_jax.evaluation import settings as eval_settings
from ipr_jax.models import denoiser
from ipr_jax.models.denoiser import DenoiserOutput

NUM_PUZZLES = 4


def _toy_denoise(patch_size, params, z, t):
  """A velocity towards a smooth target with a state-dependent per-patch sigma: samples differ
  from their noise and from chain to chain, and the query's scores vary."""
  del params
  b, h, w, _ = z.shape
  u = 0.8 * jnp.tanh(2.0 * z) * (0.5 + t) + 0.1 * jnp.cos(3.0 * z)
  gh, gw = h // patch_size, w // patch_size
  pooled = z.mean(-1).reshape(b, gh, patch_size, gw, patch_size).mean((2, 4))
  sigma = jnp.exp(jnp.sin(3.0 * pooled) - 0.5)
  sigma = jnp.repeat(jnp.repeat(sigma, patch_size, 1), patch_size, 2)[..., None]
  return DenoiserOutput(u=u, v=jax.nn.sigmoid(z), logvar=2 * jnp.log(sigma), sigma=sigma)


def _config(overrides):
  config = config_base.load_config("mnist_sudoku:demo")
  config.eval.num_puzzles = NUM_PUZZLES
  config.ipr.budget = 2
  for name, value in overrides.items():
    section, field = name.split(".")
    config[section][field] = value
  return config


def _adversaries(task, solution):
  """The task's own scorer and two that a leak would profit from, each with a per-cell verifier
  of the same kind: (name, score_fn, cell_verify_fn)."""
  real_score, real_cells = task.score_fn, task.cell_verify_fn

  def tiled(z):  # the solution for a batch of puzzles or of their chains (puzzle-major)
    return jnp.repeat(solution, z.shape[0] // solution.shape[0], axis=0)

  def arbitrary_score(z):  # "valid" for bright images: says nothing about the rules
    out = dict(real_score(z))
    out["valid"] = z.mean((1, 2, 3)) > jnp.median(z.mean((1, 2, 3)))
    return out

  def arbitrary_cells(z):  # "broken" for bright cells
    return sampling.patch_mean(z, task.patch_size) > 0

  def oracle_score(z):  # reads the solution: "valid" for the samples closer to it than most
    out = dict(real_score(z))
    error = jnp.mean((z - tiled(z)) ** 2, axis=(1, 2, 3))
    out["valid"] = error <= jnp.median(error)
    return out

  def oracle_cells(z):  # reads the solution: the cells farther from it than most
    error = sampling.patch_mean((z - tiled(z)) ** 2, task.patch_size)
    return error > jnp.median(error, axis=1, keepdims=True)

  return [
      ("real", real_score, real_cells),
      ("arbitrary", arbitrary_score, arbitrary_cells),
      ("oracle", oracle_score, oracle_cells),
  ]


def _outputs(overrides, monkeypatch):
  """{scorer name: what the sampler produced} for the settings `overrides`."""
  monkeypatch.setattr(
      denoiser,
      "make_denoise_fn",
      lambda model, patch_size: functools.partial(_toy_denoise, patch_size),
  )
  config = _config(overrides)
  eval_settings.check_schedules(config)
  task = eval_settings.task_evaluation(config)
  indices = np.arange(NUM_PUZZLES)
  inputs = task.inputs(config.eval.seed, indices)
  keys = sampling.puzzle_keys(jax.random.key(7), jnp.asarray(indices))
  noise = jax.random.normal(jax.random.key(8), (NUM_PUZZLES, *task.image_shape))
  solution = jnp.asarray(inputs["image"], jnp.float32)
  # The same given cells over another solution: what the generated cells hide is changed.
  hidden = np.asarray(inputs["mask"]) > 0
  other_image = np.where(hidden, -np.asarray(inputs["image"]), inputs["image"])
  cases = [(name, s, c, inputs["image"]) for name, s, c in _adversaries(task, solution)]
  cases.append(("other_solution", task.score_fn, task.cell_verify_fn, other_image))
  produced = {}
  for name, score_fn, cell_verify_fn, image in cases:
    adversarial = copy.copy(task)
    adversarial.score_fn, adversarial.cell_verify_fn = score_fn, cell_verify_fn
    run = runner.make_run_fn(config, adversarial)
    out = jax.jit(run, static_argnums=(5, 6))(
        None, keys, noise, image, inputs["mask"], NUM_PUZZLES, True
    )
    out = jax.device_get(out)
    produced[name] = {
        "iterates": out["snapshots"],
        "z": out["z"],
        "nfe": out["nfe"],
        "digits": out["final"]["digit_grid"],
        "valid": out["scores"]["valid"],
        "model_uncertainty": out["scores"].get("model_uncertainty"),
    }
  return produced


VERIFIER_FREE = {
    "paper": {},
    "uncertainty_confident": {
        "ipr.selection": "uncertainty",
        "ipr.return_iterate": "confident",
    },
    "chains_balanced": {"ipr.chains": 2, "ipr.query_cells": "balanced"},
    "chains_final_budget_cheap": {
        "ipr.chains": 2,
        "ipr.query_cells": "balanced",
        "ipr.choose_at": "final_budget",
        "ipr.steps_per_patch": 5,
    },
    "chains_confident_all": {
        "ipr.chains": 3,
        "ipr.query_cells": "all",
        "ipr.return_iterate": "confident",
        "ipr.selection": "uncertainty",
    },
    "partial_linear_fixed": {
        "ipr.renoise_time": 0.5,
        "ipr.ratio_schedule": "linear",
        "ipr.noise_type": "fixed",
    },
    "graph_sequential": {
        "sampler.schedule": "graph_sequential",
        "ipr.schedule": "graph_sequential",
    },
    "time_maps_inverse_raster": {
        "sampler.schedule": "adaptive_inverse",
        "ipr.schedule": "raster",
    },
    "time_maps_softmax_mask_git": {
        "sampler.schedule": "adaptive_softmax",
        "ipr.schedule": "mask_git",
    },
}


@pytest.mark.parametrize("setting", sorted(VERIFIER_FREE))
def test_verifier_free_outputs_do_not_depend_on_the_scorer(setting, monkeypatch):
  produced = _outputs(VERIFIER_FREE[setting], monkeypatch)
  real = produced["real"]
  assert not np.array_equal(real["iterates"][0], real["iterates"][-1]), "IPR changed nothing"
  for name in ("arbitrary", "oracle", "other_solution"):
    for field, value in real.items():
      if field == "valid" and name != "other_solution":
        continue
      if value is None:
        assert produced[name][field] is None
        continue
      np.testing.assert_array_equal(produced[name][field], value, err_msg=f"{name}: {field}")
  # The adversaries do say other things than the real scorer (the comparison above means
  # something): their "valid" differs somewhere.
  assert not np.array_equal(produced["arbitrary"]["valid"], real["valid"])


@pytest.mark.parametrize(
    "overrides",
    [{"ipr.immediate_stop": True}, {"ipr.selection": "verifier"}],
    ids=["immediate_stop", "verifier_selection"],
)
def test_the_settings_that_read_a_verifier_do_change_under_an_oracle(overrides, monkeypatch):
  """The positive control: the two documented readers of a verifier follow the oracle."""
  produced = _outputs(overrides, monkeypatch)
  assert not np.array_equal(produced["oracle"]["iterates"], produced["real"]["iterates"])


def test_a_verifier_handed_to_a_verifier_free_setting_is_refused():
  x = jnp.zeros((2, 4, 4, 1))
  keys = sampling.puzzle_keys(jax.random.key(0), jnp.arange(2))
  denoiser = sampling.Denoiser(functools.partial(_toy_denoise, 2, None), 2)
  puzzles = sampling.Puzzles(keys, image=x, mask=jnp.ones((2, 4, 4, 1)), noise=x)
  sampler_config = sampling.SamplerConfig(2, 0.0)
  with pytest.raises(ValueError, match="verify_fn is read only by immediate_stop"):
    sampling.srm_ipr(
        denoiser,
        puzzles,
        sampler_config,
        sampling.IPRConfig(budget=1),
        verify_fn=lambda z: z,
    )
  with pytest.raises(ValueError, match="cell_verify_fn is read only by selection='verifier'"):
    sampling.srm_ipr(
        denoiser,
        puzzles,
        sampler_config,
        sampling.IPRConfig(budget=1, selection="uncertainty"),
        cell_verify_fn=lambda z: z,
    )
  # ipr_refine refuses them alike.
  with pytest.raises(ValueError, match="verify_fn is read only by immediate_stop"):
    sampling.ipr_refine(
        denoiser, puzzles, x, sampler_config, sampling.IPRConfig(budget=1), verify_fn=lambda z: z
    )
  # What the evaluation hands: nothing to a verifier-free setting.
  assert runner.verifiers(sampling.IPRConfig(chains=3, query_cells="balanced"), None) == {}
