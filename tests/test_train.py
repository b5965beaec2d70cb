"""Tests of the trainer (ipr_jax/trainer.py, train_state.py) on CPU with 2 host devices.

To keep the file near a minute on 2 shared cores, the runs use even_pixels.py:tiny shrunk further
(16x16 images = a 4x4 grid of 4-pixel patches, U-Net widths 16, batch 8) and XLA's
`jax_disable_most_optimizations` (compiles ~4x faster, runs ~2x slower at this size).
"""

import json
import pathlib
import shutil
import signal
import time

import jax
import jax.numpy as jnp
from flax import jax_utils
import numpy as np
import optax
import pytest

from ipr_jax import build
from ipr_jax import tasks
from ipr_jax.build import config_base
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import train_state
from ipr_jax.training import train_step
from ipr_jax.training import trainer
import multiprocess

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(autouse=True, scope="module")
def fast_compilation():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def load_config(name, arg=""):
  return config_base.load_config(f"{CONFIG_DIR / name}.py:{arg}")


def small_config(**overrides):
  """even_pixels.py:tiny, shrunk for tests (see the module docstring)."""
  config = load_config("even_pixels", "tiny")
  config.data.image_size = 16
  config.batch_size = 8
  config.model.hid_dims = (16, 16)
  config.model.attention = (False, True)
  config.model.num_groups = 8
  config.model.num_head_channels = 16
  config.model.t_emb_dim = 32
  config.model.d_emb = 16
  config.time_sampler.density_num_samples = 8000
  for name, value in overrides.items():
    node = config
    *parents, leaf = name.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  a, b = jax.device_get(a), jax.device_get(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# ----------------------------------------------------------------------------------------------
# Optimizer, schedule and EMA against the reference recipe (spec §3.4).
# ----------------------------------------------------------------------------------------------


def test_warmup_schedule_is_torch_linear_lr():
  config = load_config("even_pixels")
  lr = config.optim.learning_rate
  schedule = build.learning_rate_schedule(config)
  # LinearLR(start_factor=2e-4, total_iters=5000): factor 2e-4 + (1 - 2e-4) min(k, 5000) / 5000.
  for k in (0, 1, 2500, 4999, 5000, 10_000):
    factor = 2e-4 + (1 - 2e-4) * min(k, 5000) / 5000
    np.testing.assert_allclose(schedule(k), lr * factor, rtol=1e-6)


def test_cosine_decay_after_warmup():
  config = load_config("even_pixels")
  config.optim.learning_rate, config.optim.warmup_steps = 2e-3, 100
  config.optim.decay_steps, config.optim.decay_end_factor = 1100, 0.1
  schedule = build.learning_rate_schedule(config)
  # Warm-up as torch LinearLR, then the cosine: half way (step 600) the factor is
  # 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55; at and after step 1100 it is 0.1.
  np.testing.assert_allclose(schedule(0), 2e-3 * 2e-4, rtol=1e-5)
  np.testing.assert_allclose(schedule(100), 2e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(600), 2e-3 * 0.55, rtol=1e-5)
  np.testing.assert_allclose(schedule(1100), 2e-4, rtol=1e-5)
  np.testing.assert_allclose(schedule(5000), 2e-4, rtol=1e-5)
  config.optim.decay_steps = 100
  with pytest.raises(ValueError, match="decay_steps=100"):
    build.learning_rate_schedule(config)


def test_adam_eps_follows_precision():
  config = load_config("mnist_sudoku")
  assert build.adam_eps(config) == 1e-7  # bf16-mixed, as the reference ran
  config.model.dtype = "float32"
  assert build.adam_eps(config) == 1e-8
  config.optim.eps = 3e-6
  assert build.adam_eps(config) == 3e-6


def test_first_optimizer_step_is_clipped_adamw():
  config = load_config("even_pixels")
  config.model.dtype = "float32"
  tx = build.make_optimizer(config)
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.25])}
  grads = {"w": jnp.array([3.0, 0.0, -4.0]), "b": jnp.array([0.0])}  # global norm 5 > 1
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = config.optim.learning_rate * 2e-4  # first step of the warm-up
  wd, eps = config.optim.weight_decay, 1e-8
  for name in params:
    g = grads[name] / 5.0  # clipped to norm 1
    # Step 1 of Adam: m_hat = g and v_hat = g^2 (bias-corrected), decoupled weight decay.
    expected = -lr * (g / (jnp.abs(g) + eps) + wd * params[name])
    np.testing.assert_allclose(updates[name], expected, rtol=1e-5, atol=1e-12)


def test_ema_first_update_copies_then_averages():
  tx = optax.sgd(0.5)
  state = train_state.TrainState.create({"w": jnp.array([1.0, 2.0])}, tx, jax.random.key(0))
  state = state.apply_gradients({"w": jnp.array([1.0, -1.0])}, tx, ema_decay=0.9)
  np.testing.assert_allclose(state.params["w"], [0.5, 2.5])
  np.testing.assert_allclose(state.ema_params["w"], [0.5, 2.5])  # copy, not 0.9 * init + ...
  state = state.apply_gradients({"w": jnp.array([1.0, 1.0])}, tx, ema_decay=0.9)
  np.testing.assert_allclose(state.params["w"], [0.0, 2.0])
  np.testing.assert_allclose(state.ema_params["w"], [0.5 + 0.1 * -0.5, 2.5 + 0.1 * -0.5])
  assert int(state.step) == 2


# ----------------------------------------------------------------------------------------------
# Data parallelism.
# ----------------------------------------------------------------------------------------------


def run_pmapped_steps(config, devices, num_steps):
  """num_steps train steps with the global batch split over `devices`."""
  model, tx = build.make_model(config), build.make_optimizer(config)
  task = tasks.get(config.task).make_data(config)
  table = train_step.make_loss_weight_table(config, jax.random.key(1))
  state = train_step.create_train_state(config, model, tx, jax.random.key(0))
  p_step = jax.pmap(
      train_step.make_train_step(config, model, tx),
      axis_name="batch",
      devices=devices,
      donate_argnums=(0,),
  )
  state, task, table = jax_utils.replicate((state, task, table), devices, axis_name="batch")
  index = np.arange(config.batch_size, dtype=np.int32).reshape(len(devices), -1)
  losses = []
  for _ in range(num_steps):
    state, metrics = p_step(state, task, table, index)
    losses.append(float(metrics["loss"][0]))
  return jax.device_get(trainer.unreplicate(state)), losses


def test_pmap_over_two_devices_equals_one_device_on_the_full_batch():
  devices = jax.local_devices()
  assert len(devices) >= 2, "tests/conftest.py should provide 2 host devices"
  config = small_config()  # dropout 0.1 stays on: masks are drawn per example, not per device
  assert config.model.dropout > 0
  two, losses_two = run_pmapped_steps(config, devices[:2], num_steps=2)
  one, losses_one = run_pmapped_steps(config, devices[:1], num_steps=2)
  np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
  assert_trees_close(two.params, one.params)
  assert_trees_close(two.ema_params, one.ema_params)
  assert_trees_close(two.opt_state, one.opt_state)
  # Not vacuous: the parameters moved.
  init = train_step.create_train_state(
      config, build.make_model(config), build.make_optimizer(config), jax.random.key(0)
  )
  assert not np.allclose(
      two.params["decoder"]["out_2"]["kernel"], init.params["decoder"]["out_2"]["kernel"]
  )


def test_batch_must_split_over_devices(tmp_path):
  with pytest.raises(ValueError, match="batch_size=3"):
    trainer.train(small_config(batch_size=3), tmp_path)


# ----------------------------------------------------------------------------------------------
# The loop: interruption and resume, loss reduction, NaN handling.
# ----------------------------------------------------------------------------------------------


def sigterm_at(step_to_stop):
  def hook(step):
    if step == step_to_stop:
      signal.raise_signal(signal.SIGTERM)

  return hook


def resume_config():
  return small_config(num_train_steps=4, checkpoint_every_steps=3, log_every_steps=1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """4 uninterrupted steps of resume_config() in one process on 2 devices."""
  result = trainer.train(resume_config(), tmp_path_factory.mktemp("straight"))
  assert not result.preempted and int(result.state.step) == 4
  return result


@pytest.fixture(scope="module")
def stopped_at_2(tmp_path_factory):
  """A run of resume_config() stopped by SIGTERM after step 2 (copy it before resuming it)."""
  workdir = tmp_path_factory.mktemp("stopped_at_2")
  result = trainer.train(resume_config(), workdir, hooks=[sigterm_at(2)])
  assert result.preempted and int(result.state.step) == 2
  return workdir


def test_sigterm_then_resume_equals_uninterrupted_run(straight, stopped_at_2, tmp_path):
  config = resume_config()

  workdir = tmp_path / "interrupted"
  shutil.copytree(stopped_at_2, workdir)
  # SIGTERM saved step 2 although checkpoint_every_steps is 3, and the handler was restored.
  assert checkpoint.find_step_dir(workdir).name == "2"
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  resumed = trainer.train(config, workdir)
  assert not resumed.preempted and int(resumed.state.step) == 4
  assert [r["step"] for r in resumed.history] == [3, 4]

  for field in ("params", "ema_params", "opt_state", "rng", "step"):
    assert_trees_close(
        getattr(resumed.state, field), getattr(straight.state, field), rtol=0, atol=0
    )
  # The saved config and the metrics of both parts are in the workdir.
  assert json.loads((workdir / "config.json").read_text())["task"] == "even_pixels"
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
  assert_trees_close(
      checkpoint.restore_params(workdir, "ema"), straight.state.ema_params, rtol=0, atol=0
  )
  # Restarting a finished run does nothing.
  assert int(trainer.train(config, workdir).state.step) == 4


def _override_flags(config):
  """The command-line overrides that turn even_pixels.py:tiny into `config`."""
  flags = []
  for section, names in (
      ("data", ("image_size",)),
      ("model", ("hid_dims", "attention", "num_groups", "num_head_channels", "t_emb_dim", "d_emb")),
      ("time_sampler", ("density_num_samples",)),
  ):
    for name in names:
      value = config[section][name]
      text = f"({','.join(map(str, value))})" if isinstance(value, tuple) else str(value)
      flags.append(f"--config.{section}.{name}={text}")
  for name in ("batch_size", "num_train_steps", "log_every_steps"):
    flags.append(f"--config.{name}={config[name]}")
  return flags


def test_two_processes_resume_a_checkpoint_and_train_like_one(straight, stopped_at_2, tmp_path):
  """The training binary as 2 JAX processes of 1 device each: both resume the step-2 checkpoint
  of a single-process run, train steps 3 and 4 on the same global batch, and write one step-4
  checkpoint equal to the uninterrupted single process on 2 devices."""
  shutil.copytree(stopped_at_2, tmp_path, dirs_exist_ok=True)
  args = [
      f"--config={CONFIG_DIR / 'even_pixels.py'}:tiny",
      f"--workdir={tmp_path}",
      *_override_flags(resume_config()),
      "--config.checkpoint_every_steps=3",
  ]
  # Compiled like this module's runs (see fast_compilation).
  env = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
  outputs = multiprocess.run_processes("ipr_jax.train", args, extra_env=env)
  for out in outputs:
    assert "Training steps 3..4" in out and "step 4/4" in out, out[-2000:]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "3", "4"]
  state = checkpoint.restore_latest(tmp_path, jax.device_get(straight.state))
  assert int(state.step) == 4
  for field in ("params", "ema_params", "opt_state"):
    assert_trees_close(getattr(state, field), getattr(straight.state, field), rtol=1e-4)
  # Process 0 alone appends to metrics.jsonl.
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_time_limit_stops_with_a_checkpoint_and_log_fn_sees_every_record(tmp_path):
  config = small_config(num_train_steps=50, checkpoint_every_steps=100, log_every_steps=1)
  records = []
  # A limit of 0 s has passed by the first step: that step is saved, then the run stops.
  result = trainer.train(config, tmp_path, log_fn=records.append, time_limit_s=0)
  assert result.preempted and int(result.state.step) == 1
  assert checkpoint.find_step_dir(tmp_path).name == "1"
  assert [r["step"] for r in records] == [1] and np.isfinite(records[0]["loss"])
  with pytest.raises(ValueError, match="time_limit_s=-1"):
    trainer.train(config, tmp_path, time_limit_s=-1)


def test_a_few_hundred_steps_reduce_the_loss(tmp_path):
  config = small_config(num_train_steps=300, checkpoint_every_steps=300, log_every_steps=25)
  result = trainer.train(config, tmp_path)
  losses = [r["loss"] for r in result.history]
  print("loss every 25 steps:", np.round(losses, 4).tolist())
  assert len(losses) == 12
  assert all(np.isfinite(losses))
  # The first window is the untrained model (and its first step has no VLB/sigma terms).
  assert np.mean(losses[-3:]) < 0.75 * losses[0], losses
  record = result.history[-1]
  for key in ("mse", "vlb", "sigma_nll", "grad_norm", "learning_rate", "steps_per_sec"):
    assert key in record


def test_nan_loss_stops_without_saving_the_bad_state(tmp_path, monkeypatch):
  config = small_config(num_train_steps=2, checkpoint_every_steps=2, log_every_steps=1)
  trainer.train(config, tmp_path)
  # Resume with a corrupted loss-weight table (an input of the compiled step, so nothing is
  # recompiled): step 3 gets a NaN loss.
  monkeypatch.setattr(
      train_step,
      "make_loss_weight_table",
      lambda config, key: jnp.full((config.time_sampler.density_num_bins,), jnp.nan, jnp.float32),
  )
  config.num_train_steps = 6
  with pytest.raises(trainer.NonFiniteLossError, match="step 3") as error:
    trainer.train(config, tmp_path)
  assert "Last good checkpoint: step 2" in str(error.value)
  assert checkpoint.find_step_dir(tmp_path).name == "2"
  params = checkpoint.restore_params(tmp_path, "live")
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------------
# Memory: rematerialisation and gradient accumulation give the plain step's update.
# ----------------------------------------------------------------------------------------------


def one_step(config):
  """(state after one step, metrics, grads-free): a jitted single-device step on the batch."""
  model, tx = build.make_model(config, training=True), build.make_optimizer(config)
  task = tasks.get(config.task).make_data(config)
  table = train_step.make_loss_weight_table(config, jax.random.key(1))
  state = train_step.create_train_state(config, model, tx, jax.random.key(0))
  step = jax.jit(train_step.make_train_step(config, model, tx, axis_name=None))
  index = np.arange(config.batch_size, dtype=np.int32)
  return step(state, task, table, index)


@pytest.fixture(scope="module")
def plain_step():
  return one_step(small_config())


@pytest.mark.parametrize(
    "overrides", [dict(grad_accum_steps=4), dict(remat=True), dict(remat=True, grad_accum_steps=2)]
)
def test_remat_and_accumulation_give_the_plain_update(plain_step, overrides):
  want_state, want_metrics = plain_step
  got_state, got_metrics = one_step(small_config(**overrides))
  assert jax.tree_util.tree_structure(got_state.params) == jax.tree_util.tree_structure(
      want_state.params
  )
  for name in ("loss", "mse", "vlb", "sigma_nll", "grad_norm"):
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=2e-5, err_msg=name)
  assert_trees_close(got_state.params, want_state.params)
  assert_trees_close(got_state.ema_params, want_state.ema_params)
  assert_trees_close(got_state.opt_state, want_state.opt_state)


@pytest.mark.parametrize("value,match", [(0, "grad_accum_steps=0"), (3, "grad_accum_steps=3")])
def test_bad_grad_accum_steps_is_an_error_naming_it(tmp_path, value, match):
  config = small_config()
  with config.unlocked():
    config.grad_accum_steps = value
  with pytest.raises(ValueError, match=match):
    trainer.train(config, tmp_path)


def test_checkpoint_every_s_saves_by_the_clock_between_step_checkpoints(tmp_path):
  config = small_config(num_train_steps=8, checkpoint_every_steps=100, log_every_steps=1)
  config.keep_checkpoints = None
  # Steps 3 and 6 take longer than the cadence; the others are quick (step 1 compiles and may
  # be saved too). By steps alone only the last step (8) would be saved.
  slow = lambda step: time.sleep(2.2) if step in (3, 6) else None
  result = trainer.train(config, tmp_path, hooks=[slow], checkpoint_every_s=2.0)
  assert int(result.state.step) == 8 and not result.preempted
  saved = {int(p.name) for p in (tmp_path / "checkpoints").iterdir()}
  assert {3, 6, 8} <= saved <= {1, 3, 6, 8}, saved
  with pytest.raises(ValueError, match="checkpoint_every_s=0"):
    trainer.train(config, tmp_path, checkpoint_every_s=0)
