"""Tests of ipr_jax/runtime/checkpoint.py: round trips, target-free loading, clear errors on bad
dirs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import train_state


def small_params(seed=0, width=4):
  rng = np.random.default_rng(seed)
  return {
      "conv": {
          "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, width)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(width,)), jnp.float32),
      },
      "norm": {"scale": jnp.ones((width,), jnp.float32)},
  }


TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
CONFIG = ml_collections.ConfigDict({"task": "unit_test", "model": {"hid_dims": (4,)}})


def trained_state(num_steps=2, seed=0, width=4):
  """A state after a few real optimizer/EMA steps, so every field holds distinct values."""
  state = train_state.TrainState.create(small_params(seed, width), TX, jax.random.key(seed))
  for i in range(num_steps):
    fill = 0.1 * (i + 1)
    grads = jax.tree_util.tree_map(lambda p, fill=fill: jnp.full_like(p, fill), state.params)
    state = state.apply_gradients(grads, TX, ema_decay=0.9)
  return state


def save_steps(workdir, steps, max_to_keep=None):
  states = {}
  with checkpoint.make_manager(workdir, max_to_keep=max_to_keep) as manager:
    for step in steps:
      states[step] = trained_state(num_steps=step)
      checkpoint.save(manager, step, states[step], CONFIG)
    manager.wait_until_finished()
  return states


def assert_trees_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)


def test_save_keeps_last_k_and_restore_latest_is_exact(tmp_path):
  states = save_steps(tmp_path, [1, 2, 3], max_to_keep=2)
  assert sorted(
      int(p.name) for p in checkpoint.checkpoint_dir(tmp_path).iterdir() if p.name.isdigit()
  ) == [2, 3]
  target = train_state.TrainState.create(small_params(), TX, jax.random.key(7))
  restored = checkpoint.restore_latest(tmp_path, target)
  assert int(restored.step) == 3
  assert_trees_equal(restored, states[3])  # params, opt_state, EMA and PRNG data
  np.testing.assert_array_equal(
      jax.random.key_data(restored.key), jax.random.key_data(states[3].key)
  )


def test_restore_latest_without_checkpoint_is_none(tmp_path):
  target = trained_state(0)
  assert checkpoint.restore_latest(tmp_path, target) is None
  checkpoint.checkpoint_dir(tmp_path).mkdir()
  assert checkpoint.restore_latest(tmp_path, target) is None


@pytest.mark.parametrize("which,field", [("ema", "ema_params"), ("live", "params")])
def test_restore_params_from_any_level_of_the_run_dir(tmp_path, which, field):
  states = save_steps(tmp_path, [1, 2])
  ckpt_dir = checkpoint.checkpoint_dir(tmp_path)
  for path in (tmp_path, ckpt_dir, ckpt_dir / "2"):
    params = checkpoint.restore_params(path, which=which)
    assert isinstance(params, dict)
    assert_trees_equal(params, getattr(states[2], field))
  assert_trees_equal(checkpoint.restore_params(tmp_path, which, step=1), getattr(states[1], field))
  # EMA and live weights really differ after two steps (decay 0.9), so `which` matters.
  assert not np.allclose(states[2].params["conv"]["bias"], states[2].ema_params["conv"]["bias"])
  assert checkpoint.restore_config(tmp_path)["task"] == "unit_test"


def test_save_params_checkpoint_roundtrip(tmp_path):
  params = small_params(3)
  ema = small_params(4)
  step_dir = checkpoint.save_params_checkpoint(
      tmp_path, params, CONFIG, TX, ema_params=ema, step=250_001
  )
  assert step_dir.name == "250001"
  assert_trees_equal(checkpoint.restore_params(tmp_path, "ema"), ema)
  assert_trees_equal(checkpoint.restore_params(step_dir, "live"), params)
  # It is a full training checkpoint: training can resume from it.
  resumed = checkpoint.restore_latest(
      tmp_path, train_state.TrainState.create(small_params(0), TX, jax.random.key(0))
  )
  assert int(resumed.step) == 250_001


def test_bad_arguments(tmp_path):
  save_steps(tmp_path, [1])
  with pytest.raises(ValueError, match="which"):
    checkpoint.restore_params(tmp_path, which="best")
  with pytest.raises(checkpoint.CheckpointError, match="step 5"):
    checkpoint.restore_params(tmp_path, step=5)


def test_missing_path_is_file_not_found(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    checkpoint.restore_params(missing)


def test_foreign_directory_is_a_clear_error(tmp_path):
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path)):
    checkpoint.restore_params(tmp_path)
  # A workdir whose checkpoints/ holds something else: resuming refuses instead of starting over.
  ckpt_dir = checkpoint.checkpoint_dir(tmp_path)
  ckpt_dir.mkdir()
  (ckpt_dir / "model.pt").write_bytes(b"\x80\x02torch")
  with pytest.raises(checkpoint.CheckpointError, match=str(ckpt_dir)):
    checkpoint.restore_latest(tmp_path, trained_state(0))


def test_foreign_orbax_checkpoint_is_a_clear_error(tmp_path):
  # An Orbax checkpoint with a 'state' item that is not a TrainState.
  with checkpoint.make_manager(tmp_path) as manager:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)})))
    manager.wait_until_finished()
  with pytest.raises(checkpoint.CheckpointError, match="not an ipr_jax TrainState"):
    checkpoint.restore_params(tmp_path)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  save_steps(tmp_path, [1])
  state_dir = checkpoint.checkpoint_dir(tmp_path) / "1" / "state"
  for path in state_dir.rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="Could not read"):
    checkpoint.restore_params(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match=str(state_dir.parent)):
    checkpoint.restore_latest(tmp_path, trained_state(0))


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
  save_steps(tmp_path, [1])
  other = train_state.TrainState.create(small_params(width=8), TX, jax.random.key(0))
  with pytest.raises(checkpoint.CheckpointError, match="different config"):
    checkpoint.restore_latest(tmp_path, other)
  extra = train_state.TrainState.create(
      {**small_params(), "head": {"kernel": jnp.ones(2)}}, TX, jax.random.key(0)
  )
  with pytest.raises(checkpoint.CheckpointError, match="head"):
    checkpoint.restore_latest(tmp_path, extra)
