"""Tests of ipr_jax/evaluation/fit.py: compiled memory analysis, eval.batch_size="auto",
compilation cache."""

import copy
import json
import os

import jax
import pytest

from ipr_jax.evaluation import fit
from ipr_jax.runtime import compilation_cache


@pytest.fixture(autouse=True, scope="module")
def fast_compilation():
  """XLA's quick compilation (as tests/test_train.py): the analyses compare programs compiled
  the same way, which is all these tests need."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def demo(task_config):
  config = task_config("mnist_sudoku", "demo")
  with config.unlocked():
    config.ipr.budget = 1
    config.eval.num_puzzles = 64
  return config


def test_linear_fit_and_largest_batch():
  model = fit.LinearFit.through(1, 110.0, 3, 130.0)
  assert (model.fixed, model.per_item) == (100.0, 10.0)
  assert model.largest(150.0) == 5
  assert model.largest(149.9) == 4
  assert model.largest(105.0) == 0
  assert model.largest(1e9, cap=7) == 7
  with pytest.raises(ValueError, match="two different batches"):
    fit.LinearFit.through(2, 1.0, 2, 1.0)


@pytest.mark.parametrize("headroom", [-0.1, 1.0])
def test_bad_headroom_names_it(headroom):
  with pytest.raises(ValueError, match=f"memory_headroom={headroom}"):
    fit.memory_budget(1e9, headroom)


def test_auto_batch_walks_to_the_compiled_boundary():
  # A program whose bytes are not linear: 1000 + 100 b, plus 500 from b = 6 on.
  cost = lambda b: 1000 + 100 * b + (500 if b >= 6 else 0)

  class Config:  # what auto_eval_batch reads

    class eval:  # pylint: disable=invalid-name
      num_puzzles = 1000

  choice = fit.auto_eval_batch(Config, 2000, 0.0, cost_fn=cost, num_devices=2)
  assert choice.per_device == 5  # the fit says 10; 6..10 do not fit once compiled
  assert cost(5) <= choice.budget_bytes < cost(6)
  assert choice.batch_size == 10
  smaller = fit.auto_eval_batch(Config, 1500, 0.0, cost_fn=cost, num_devices=2)
  assert smaller.per_device == 5 and cost(5) <= 1500 < cost(6)
  assert fit.auto_eval_batch(Config, 1400, 0.0, cost_fn=cost, num_devices=1).per_device == 4
  with pytest.raises(ValueError, match="one puzzle per device"):
    fit.auto_eval_batch(Config, 1050, 0.0, cost_fn=cost)


def test_auto_batch_follows_the_compiled_analysis(demo):
  """On the CPU with explicit limits: the batch is the largest whose compiled evaluation program
  fits limit * (1 - headroom), and a smaller limit gives a smaller batch."""
  params = fit.abstract_params(demo)
  costs = {}

  def cost(b):
    if b not in costs:
      costs[b] = fit.eval_program_cost(demo, b, params).bytes
    return costs[b]

  per_item = cost(2) - cost(1)
  assert per_item > 0
  headroom = 0.1
  results = []
  for extra in (2.5, 6.5):
    limit = (cost(1) + extra * per_item) / (1 - headroom)
    choice = fit.auto_eval_batch(demo, limit, headroom, cost_fn=cost, num_devices=1)
    b = choice.per_device
    assert cost(b) <= limit * (1 - headroom) < cost(b + 1)
    results.append(b)
  assert results[0] < results[1]
  assert "eval.batch_size=auto ->" in choice.describe()


def test_resolve_auto_batch_size(demo, tmp_path, capsys):
  config = copy.deepcopy(demo)
  with config.unlocked():
    config.eval.batch_size = 16
  assert fit.resolve_eval_batch_size(config) is config
  with config.unlocked():
    config.eval.batch_size = "autox"
  with pytest.raises(ValueError, match="eval.batch_size='autox'"):
    fit.resolve_eval_batch_size(config)
  with config.unlocked():
    config.eval.batch_size = "auto"
  if fit.device_memory_bytes(config) is None:  # the CPU reports no memory
    with pytest.raises(ValueError, match="memory_limit_gb"):
      fit.resolve_eval_batch_size(config)
  # An earlier run's shards fix the batching (a resume must see the same batches).
  shard_dir = tmp_path / "eval" / config.eval.name / "shards"
  shard_dir.mkdir(parents=True)
  (shard_dir / "run.json").write_text(json.dumps({"eval": {"batch_size": 24}}))
  resolved = fit.resolve_eval_batch_size(config, str(tmp_path))
  assert resolved.eval.batch_size == 24 and config.eval.batch_size == "auto"
  assert "as recorded by the shards" in capsys.readouterr().out
  with config.unlocked():
    config.memory_limit_gb = 0.004
  resolved = fit.resolve_eval_batch_size(config, str(tmp_path / "fresh"))
  assert isinstance(resolved.eval.batch_size, int) and 1 <= resolved.eval.batch_size <= 64
  assert f"auto -> {resolved.eval.batch_size}" in capsys.readouterr().out


def test_train_step_cost_is_smaller_with_accumulation_and_remat(task_config):
  config = task_config("even_pixels", "tiny")
  with config.unlocked():
    config.data.image_size = 16
    config.model.hid_dims = (16, 16)
    config.model.attention = (False, True)
    config.model.num_groups = 8
    config.model.num_head_channels = 16
    config.time_sampler.density_num_samples = 8000
  plain = fit.train_step_cost(config, 8)
  with config.unlocked():
    config.grad_accum_steps = 4
  accumulated = fit.train_step_cost(config, 8)
  assert accumulated.temp_bytes < plain.temp_bytes
  assert plain.alias_bytes > 0  # the state is donated, as in train


def test_compilation_cache_dir(monkeypatch, tmp_path, demo):
  config = copy.deepcopy(demo)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert compilation_cache.directory(config) == str(tmp_path / "env")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert compilation_cache.directory(config) == os.path.expanduser(compilation_cache.DEFAULT_DIR)
  with config.unlocked():
    config.compilation_cache_dir = "off"
  assert compilation_cache.directory(config) is None
  assert compilation_cache.enable(config) is None
  with config.unlocked():
    config.compilation_cache_dir = str(tmp_path / "mine")
  assert compilation_cache.directory(config) == str(tmp_path / "mine")
