"""The evaluation keeps the devices busy (ipr_jax/evaluation/runner.py `_compute_batches`): a
batch is handed to the devices as soon as the previous one's results are fetched, before their
shard is written, and that changes nothing the shards guarantee. A batch that fails after it was
dispatched raises its own error, the shards before it are complete, and neither its shard nor the
next one's exists; a stop request drops the batch in flight; the results equal batches computed
one at a time with nothing in flight."""

import signal

import jax
import numpy as np
import pytest

from ipr_jax.build import pretrained
from ipr_jax.evaluation import runner
from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.evaluation import store as store_lib

NUM_PUZZLES, BATCH_SIZE = 8, 2  # 4 batches, so that some are dispatched while others are written


@pytest.fixture(scope="module")
def shipped():
  return pretrained.load("mnist_sudoku_demo")


def _config():
  from conftest import load_task_config  # pylint: disable=g-import-not-at-top

  config = load_task_config("mnist_sudoku", "demo")
  config.eval.num_puzzles, config.eval.batch_size = NUM_PUZZLES, BATCH_SIZE
  config.ipr.budget = 2
  config.eval.save_samples = True
  config.eval.sort_by_unknowns = False  # batch b: puzzles 2b and 2b + 1
  config.eval.name = "overlap"
  return config


def _shard_dir(workdir):
  return workdir / "eval" / "overlap" / "shards"


def _shards(workdir):
  shard_dir = _shard_dir(workdir)
  return {
      b: eval_shards.load_shard(eval_shards.shard_path(shard_dir, b))
      for b in sorted(eval_shards.done_batches(shard_dir))
  }


def _record(monkeypatch, events, fail=None, sigterm=None):
  """Logs ("dispatch" | "collect" | "write", batch) in the order they happen; `fail` = (where,
  batch) makes that step of that batch raise instead, `signal` = (where, batch) raises SIGTERM
  there first (a stop request arriving while that batch computes)."""
  dispatch, collect, write = (
      runner.Evaluator.dispatch,
      runner.Evaluator.collect,
      store_lib.ShardStore.write,
  )
  batch_of = {}  # first puzzle index -> batch number

  def check(where, batch):
    events.append((where, batch))
    if sigterm == (where, batch):
      signal.raise_signal(signal.SIGTERM)
    if fail == (where, batch):
      raise RuntimeError(f"batch {batch} failed on purpose at its {where}")

  def logged_dispatch(self, indices, *args, **kwargs):
    batch = int(np.asarray(indices).reshape(-1)[0]) // BATCH_SIZE
    check("dispatch", batch)
    dispatched = dispatch(self, indices, *args, **kwargs)
    batch_of[id(dispatched)] = batch
    return dispatched

  def logged_collect(self, dispatched):
    check("collect", batch_of[id(dispatched)])
    return collect(self, dispatched)

  def logged_write(self, batch, arrays):
    check("write", batch)
    return write(self, batch, arrays)

  monkeypatch.setattr(runner.Evaluator, "dispatch", logged_dispatch)
  monkeypatch.setattr(runner.Evaluator, "collect", logged_collect)
  monkeypatch.setattr(store_lib.ShardStore, "write", logged_write)


@pytest.fixture(scope="module")
def overlapped(shipped, tmp_path_factory):
  """A whole run, each step of the loop logged; its shards."""
  workdir = tmp_path_factory.mktemp("overlapped")
  events = []
  with pytest.MonkeyPatch.context() as monkeypatch:
    _record(monkeypatch, events)
    runner.evaluate(_config(), str(workdir))
  return workdir, events, _shards(workdir)


def test_the_next_batch_is_dispatched_before_the_current_shard_is_written(overlapped):
  _, events, _ = overlapped
  loop = events[: 3 * (NUM_PUZZLES // BATCH_SIZE)]  # then the figure's puzzles, computed again
  assert loop == [
      ("dispatch", 0),
      ("collect", 0),
      ("dispatch", 1),
      ("write", 0),
      ("collect", 1),
      ("dispatch", 2),
      ("write", 1),
      ("collect", 2),
      ("dispatch", 3),
      ("write", 2),
      ("collect", 3),
      ("write", 3),
  ]


def test_results_equal_batches_computed_one_at_a_time(shipped, overlapped):
  """Bit for bit: every shard's arrays (all but its timing) equal its batch computed alone,
  with nothing else in flight."""
  _, _, shards = overlapped
  config = _config()
  evaluator = runner.Evaluator(config, shipped.params)
  assert sorted(shards) == [0, 1, 2, 3]
  for b, shard in shards.items():
    indices = np.arange(b * BATCH_SIZE, (b + 1) * BATCH_SIZE)
    alone = evaluator(indices, keep_final=True, pad_to=BATCH_SIZE)
    jax.block_until_ready(alone.nfe)
    np.testing.assert_array_equal(shard["index"], indices)
    np.testing.assert_array_equal(shard["nfe"], alone.nfe.T)
    for name, value in alone.scores.items():
      np.testing.assert_array_equal(shard[f"score.{name}"], value.T, err_msg=name)
    for name, value in alone.final.items():
      np.testing.assert_array_equal(shard[f"final.{name}"], value, err_msg=name)
    np.testing.assert_array_equal(shard["samples"], runner._as_uint8(alone.final_samples))  # pylint: disable=protected-access
    assert float(shard["seconds"]) > 0


@pytest.mark.parametrize("where", ["collect", "dispatch"])
def test_a_batch_that_fails_after_the_next_was_dispatched(
    shipped, overlapped, tmp_path, monkeypatch, where
):
  """Batch 2 fails: at its fetch, where its computation's errors surface (it was dispatched
  before batch 1's shard was written); or at its dispatch, during batch 1's round, before batch
  1's shard is written. Its own error is raised, shards 0 and 1 are complete (equal to the
  uninterrupted run's), there is no shard of batch 2 or 3, and the rerun computes batches 2 and
  3 only, to the uninterrupted run's files."""
  reference_dir, _, reference = overlapped
  events = []
  _record(monkeypatch, events, fail=(where, 2))
  with pytest.raises(RuntimeError, match=f"^batch 2 failed on purpose at its {where}$"):
    runner.evaluate(_config(), str(tmp_path))
  assert events.index(("dispatch", 2)) < events.index(("write", 1))
  assert ("dispatch", 3) not in events and ("write", 2) not in events
  shards = _shards(tmp_path)
  assert sorted(shards) == [0, 1]
  assert not [p for p in _shard_dir(tmp_path).iterdir() if ".tmp" in p.name]
  for b, shard in shards.items():
    assert shard.keys() == reference[b].keys()
    for key in shard:
      if key != "seconds":
        np.testing.assert_array_equal(shard[key], reference[b][key], err_msg=f"{b} {key}")

  monkeypatch.undo()
  computed = []
  runner.evaluate(_config(), str(tmp_path), after_batch=computed.append)
  assert computed == [2, 3]
  for name in ("puzzles.npz",):
    with (
        np.load(tmp_path / "eval" / "overlap" / name) as mine,
        np.load(reference_dir / "eval" / "overlap" / name) as theirs,
    ):
      assert mine.files == theirs.files
      for key in mine.files:
        np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)


@pytest.mark.parametrize("when", ["while_batch_1_computes", "after_batch_1_is_written"])
def test_sigterm_stops_after_the_round_and_drops_the_batch_in_flight(
    shipped, overlapped, tmp_path, monkeypatch, when
):
  """SIGTERM while batch 1 computes: batch 1's shard is written, batch 2 is not even dispatched
  (the process exits without waiting for it). SIGTERM after batch 1's shard is written, with
  batch 2 already in flight: batch 2 is dropped, its shard never written. Either way the run stops
  after 2 of 4 batches, and the rerun ends with the uninterrupted run's shards."""
  _, _, reference = overlapped
  events = []
  _record(monkeypatch, events, sigterm=("collect", 1) if when.startswith("while") else None)
  hook = None
  if when.startswith("after"):
    hook = lambda b: signal.raise_signal(signal.SIGTERM) if b == 1 else None
  with pytest.raises(runner.EvaluationStopped, match="stopped after 2 of 4 batches"):
    runner.evaluate(_config(), str(tmp_path), after_batch=hook)
  assert (("dispatch", 2) in events) == when.startswith("after")
  assert ("write", 2) not in events and ("collect", 2) not in events
  assert eval_shards.done_batches(_shard_dir(tmp_path)) == {0, 1}
  monkeypatch.undo()
  computed = []
  runner.evaluate(_config(), str(tmp_path), after_batch=computed.append)
  assert computed == [2, 3]
  for b, shard in _shards(tmp_path).items():
    for key in shard:
      if key != "seconds":
        np.testing.assert_array_equal(shard[key], reference[b][key], err_msg=f"{b} {key}")
