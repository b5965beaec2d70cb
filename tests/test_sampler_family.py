"""The SRM sampler family (fixed, random_sequential, graph_sequential, adaptive top_k >= 1):
parity with the SRM reference's own runs (tests/golden/sampler_family.npz and, for
graph_sequential schedules with repeated block starts and planning stopped at max_steps blocks,
tests/golden/sampler_family_repeats.npz, both made by tests/golden/make_sampler_family.py from
Chrixtar/SRM's sampler code), pass counts from the schedule formulas, and the family through
IPR and the evaluation binary."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipr_jax import sampling
from ipr_jax.models.denoiser import DenoiserOutput
from ipr_jax.sampling import greedy
from ipr_jax.sampling import planning
from ipr_jax.tasks import mnist_sudoku

GRID, PATCH = 4, 3


@pytest.fixture(scope="module")
def golden(golden_dir):
  with np.load(golden_dir / "sampler_family.npz") as f:
    return dict(f)


@pytest.fixture(scope="module")
def repeats_golden(golden_dir):
  with np.load(golden_dir / "sampler_family_repeats.npz") as f:
    return dict(f)


def toy_denoiser(golden):
  """The generator's ToyModel in JAX (NHWC): u = tanh(a z + b t + c), v = (tanh(d z) + 1) / 2,
  log-variance = patch mean of e mean_c(z) + f t + g, sigma = exp(logvar / 2)."""
  w = {k: jnp.asarray(golden[f"toy/{k}"])[None, :, :, None] for k in "abcdefg"}

  def denoise(z, t):
    b, h, wd, _ = z.shape
    raw = w["e"] * z.mean(-1, keepdims=True) + w["f"] * t + w["g"]
    pooled = raw.reshape(b, h // PATCH, PATCH, wd // PATCH, PATCH).mean((2, 4))
    logvar = jnp.repeat(jnp.repeat(pooled, PATCH, 1), PATCH, 2)[..., None]
    return DenoiserOutput(
        u=jnp.tanh(w["a"] * z + w["b"] * t + w["c"]),
        v=(jnp.tanh(w["d"] * z) + 1) / 2,
        logvar=logvar,
        sigma=jnp.exp(0.5 * logvar),
    )

  return denoise


def _nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def _inputs(golden, puzzles=None):
  """(z, masked, mask, unknown) of the golden puzzles (rows `puzzles`, default all), NHWC."""
  puzzles = slice(None) if puzzles is None else np.asarray(puzzles)
  rows = golden["unknown"][puzzles]
  unknown = rows > 0.5
  mask = np.kron(rows.reshape(-1, GRID, GRID), np.ones((PATCH, PATCH)))
  mask = mask[..., None].astype(np.float32)
  masked = (1 - mask) * _nhwc(golden["image"][puzzles])
  return masked + mask * _nhwc(golden["noise"][puzzles]), masked, mask, unknown


# Each golden case as a SamplerConfig (alpha 0, no clamp noise: the reference's ~3e-7 clamp
# noise is below the tolerance).
_CASES = {
    "fixed": dict(schedule="fixed", max_steps=12),
    "random_seq000": dict(schedule="random_sequential", max_steps=40, max_order=0),
    "random_seq075": dict(schedule="random_sequential", max_steps=40, max_order=0, overlap=0.75),
    "graph_seq000": dict(schedule="graph_sequential", max_steps=40, max_order=1),
    "graph_seq075": dict(schedule="graph_sequential", max_steps=40, max_order=2, overlap=0.75),
    "adaptive_top1": dict(max_steps=30),
    "adaptive_top2": dict(max_steps=30, top_k=2, overlap=0.5),
    "adaptive_top3": dict(max_steps=25, top_k=3),
}
# The cases of sampler_family_repeats.npz: block starts 0, 0, 1, 2, 3, 3, ... (graph_seq075_repeat,
# 14 steps for 12-14 unknown patches); 8 steps for 10-14 unknown patches, so the planning stops
# at 8 blocks and leaves the other patches at start step 0 (L = 2 at overlap 0.75, L = 1 at 0).
_REPEAT_CASES = {
    "graph_seq075_repeat": dict(
        schedule="graph_sequential", max_steps=14, max_order=2, overlap=0.75
    ),
    "random_seq075_truncated": dict(
        schedule="random_sequential", max_steps=8, max_order=0, overlap=0.75
    ),
    "graph_seq000_truncated": dict(schedule="graph_sequential", max_steps=8, max_order=1),
}


def _config(case):
  settings = _CASES[case] if case in _CASES else _REPEAT_CASES[case]
  return sampling.SamplerConfig(stochasticity=0.0, clamp_noise=False, **settings)


def _lowest_index_ties(batch):
  """Tie priorities that pick the lowest patch index (the generator's identity randperm)."""
  n = GRID * GRID
  return jnp.broadcast_to(-jnp.arange(n, dtype=jnp.float32), (batch, n, n))


def _run(golden, case):
  """The JAX sampler on the golden puzzles under `case`: (z, t_rows [S, B, N], nfe [B]).

  A planned case builds its schedule as `srm_sample` does, with the lowest-index tie break."""
  config = _config(case)
  z, masked, mask, unknown = _inputs(golden, golden.get(f"{case}/puzzles"))
  keys = sampling.puzzle_keys(jax.random.key(0), jnp.arange(len(z)))
  denoise = toy_denoiser(golden)
  table = greedy.srm_table(unknown.shape[1], config)
  order = None
  if table.planned:
    weights = None
    if config.schedule == "graph_sequential":
      weights = planning.weighted_adjacency(
          golden["dependency"], config.max_order, config.certainty_decay
      )
    order = planning.sequential_order(
        jnp.asarray(unknown),
        weights,
        config.overlap,
        _lowest_index_ties(len(z)),
        jnp.asarray(table.num_blocks)[unknown.sum(axis=1)],
    )
  sched = greedy.lookup_schedule(table, jnp.sum(unknown, axis=1), planned_order=order)
  out = jax.jit(
      lambda z, given, unknown, keys: greedy.greedy_loop(
          sampling.Denoiser(denoise, PATCH),
          z,
          given,
          unknown,
          keys,
          sched,
          config,  # the reverse kernel: alpha 0, tau 1, no clamp noise
          record_steps=table.steps_bound(),
      )
  )(z, sampling.Given(masked, mask), jnp.asarray(unknown), keys)
  return np.asarray(out.z), np.asarray(out.t_rows), np.asarray(out.nfe)


@pytest.mark.parametrize("case", sorted(_CASES))
def test_each_schedule_matches_the_reference_run(golden, case):
  """Per puzzle: the same passes, the same patch times at every step and the same sample as the
  reference's sampler run with the same denoiser, noise and given cells."""
  _check_reference_run(golden, case)


@pytest.mark.parametrize("case", sorted(_REPEAT_CASES))
def test_repeated_block_starts_match_the_reference_run(repeats_golden, case):
  """graph_sequential / random_sequential whose blocks start together (two blocks at one step)
  or whose planning stops at max_steps blocks: every pass's patch times and the sample as the
  reference's run (with at most one block per step, the patches behind the first repeated start
  would stay at t = 1 until the last pass)."""
  _check_reference_run(repeats_golden, case)


def _check_reference_run(golden, case):
  z, t_rows, nfe = _run(golden, case)
  config, settings = _config(case), json.loads(str(golden[f"{case}/config_json"]))
  assert settings["max_steps"] == config.max_steps
  if "time_scheduler" in settings:
    planner = settings["time_scheduler"]
    assert (planner["max_order"], planner["inference_overlap"]) == (
        config.max_order,
        config.overlap,
    )
  for b in range(len(z)):
    ref_rows = golden[f"{case}/t_rows/{b}"]  # [passes + 1, N]: the last is the final t_next
    passes = len(ref_rows) - 1
    assert nfe[b] == passes, (case, b)
    np.testing.assert_allclose(t_rows[:passes, b], ref_rows[:-1], atol=1e-6)
    assert not np.any(ref_rows[-1])
  np.testing.assert_allclose(z, _nhwc(golden[f"{case}/sample"]), atol=5e-5)


@pytest.mark.parametrize("case", ["random_seq000", "random_seq075", "graph_seq000", "graph_seq075"])
def test_planned_schedules_match_the_reference_scheduling_matrices(golden, case):
  """The reference's graph_sequential scheduling matrix of 12 more puzzles, rebuilt from the
  planned order and the schedule table: start of each patch's ramp, block length, last row."""
  _check_scheduling_matrices(golden, case)


@pytest.mark.parametrize("case", sorted(_REPEAT_CASES))
def test_repeated_starts_match_the_reference_scheduling_matrices(repeats_golden, case):
  """The same for the schedules with repeated starts or fewer steps than patches (6-14 unknown
  patches: at 8 steps, planning stops at 8 blocks and the rest start at step 0)."""
  _check_scheduling_matrices(repeats_golden, case)


def _check_scheduling_matrices(golden, case):
  config = _config(case)
  rows = [golden[f"{case}/plan_unknown/{i}"] > 0.5 for i in range(12)]
  unknown = jnp.asarray(np.stack(rows))
  weights = None
  if config.schedule == "graph_sequential":
    weights = planning.weighted_adjacency(
        golden["dependency"], config.max_order, config.certainty_decay
    )
  table = greedy.srm_table(GRID * GRID, config)
  n_values = np.array([int(row.sum()) for row in rows])
  blocks = table.num_blocks[n_values]  # min(n, max_steps): the reference's planned blocks
  order = np.asarray(
      planning.sequential_order(
          unknown, weights, config.overlap, _lowest_index_ties(len(rows)), jnp.asarray(blocks)
      )
  )
  for i, row in enumerate(rows):
    n, b = n_values[i], blocks[i]
    assert b == min(n, config.max_steps)
    expected = golden[f"{case}/plan_matrix/{i}"]  # [max_steps, N]
    assert len(expected) == table.max_steps[n] + 1
    assert set(order[i, :b]) <= set(np.flatnonzero(row)) and len(set(order[i, :b])) == b
    assert np.all(order[i, b:] == -1)
    start = np.zeros(GRID * GRID, int)  # unplanned patches: step 0
    start[order[i, :b]] = table.block_starts[n][:b]
    length = table.block_len[n]
    steps = np.arange(len(expected))[:, None]
    age = steps - start[None]
    proto = table.prototypes[n]
    got = np.where(age < 0, 1.0, np.where(age < length, proto[np.clip(age, 0, length - 1)], 0.0))
    got = np.where(row[None], got, 0.0)
    got[-1] = 0.0
    np.testing.assert_allclose(got, expected, atol=1e-7)


def test_graph_order_follows_the_known_neighbours():
  """graph_sequential, one hop: with row 0 of a 4x4 Sudoku given but one cell, that cell (three
  given neighbours in its row, one more in its box) is planned first; without propagation
  (random_sequential) every unknown cell ties."""
  unknown = np.ones((1, 16), bool)
  unknown[0, [0, 1, 2]] = False
  weights = planning.weighted_adjacency(mnist_sudoku.dependency_matrix(2), 1, 0.5)
  ties = _lowest_index_ties(1)
  order = np.asarray(planning.sequential_order(jnp.asarray(unknown), weights, 0.0, ties))
  assert order[0, 0] == 3
  order = np.asarray(planning.sequential_order(jnp.asarray(unknown), None, 0.0, ties))
  assert order[0, 0] == 3 and list(order[0, :13]) == list(range(3, 16))


def test_random_ties_give_every_cell_the_same_chance():
  """Random tie breaks: the first patch of random_sequential is uniform over 16 cells (2,000
  puzzles: every count within 5 standard deviations of 125) and the orders are permutations."""
  keys = sampling.puzzle_keys(jax.random.key(3), jnp.arange(2000))
  unknown = jnp.ones((2000, 16), bool)
  order = np.asarray(
      jax.jit(
          lambda k: planning.sequential_order(unknown, None, 0.0, planning.tie_priorities(k, 16))
      )(keys)
  )
  assert all(sorted(row) == list(range(16)) for row in order[:50])
  counts = np.bincount(order[:, 0], minlength=16)
  std = math.sqrt(2000 * (1 / 16) * (15 / 16))
  assert np.all(np.abs(counts - 125) < 5 * std), counts


def test_the_sudoku_dependency_graph():
  """4x4: every cell depends on 3 in its row, 3 in its column and 1 more in its box; 9x9: 20."""
  for box, neighbours in ((2, 7), (3, 20)):
    matrix = mnist_sudoku.dependency_matrix(box)
    assert matrix.shape == (box**4, box**4)
    np.testing.assert_array_equal(matrix, matrix.T)
    assert np.all(matrix.sum(axis=1) == neighbours) and not np.any(np.diag(matrix))


@pytest.mark.parametrize(
    "kind,top_k,expected",
    [
        # Passes per puzzle from the schedule formulas, steps_per_patch 3, overlap 0:
        ("adaptive", 1, lambda n: 3 * n),
        ("adaptive", 2, lambda n: 3 * math.ceil(n / 2)),
        ("adaptive", 4, lambda n: 3 * math.ceil(n / 4)),
        # fixed and the sequential ones take the adaptive schedule's passes at equal settings.
        ("fixed", 1, lambda n: 3 * n),
        ("random_sequential", 1, lambda n: 3 * n),
        ("graph_sequential", 1, lambda n: 3 * n),
    ],
)
def test_srm_sample_passes(kind, top_k, expected):
  n_values = [1, 5, 9, 16]
  unknown = np.zeros((len(n_values), 16), bool)
  for b, n in enumerate(n_values):
    unknown[b, np.random.default_rng(b).permutation(16)[:n]] = True
  z = np.random.default_rng(0).standard_normal((len(n_values), 12, 12, 1)).astype(np.float32)
  golden = {f"toy/{k}": np.ones((12, 12), np.float32) * 0.3 for k in "abcdefg"}
  config = sampling.SamplerConfig(schedule=kind, top_k=top_k)
  out = sampling.srm_sample(
      sampling.Denoiser(toy_denoiser(golden), PATCH, mnist_sudoku.dependency_matrix(2)),
      sampling.Puzzles(sampling.puzzle_keys(jax.random.key(1), jnp.arange(len(n_values))), noise=z),
      config,
      unknown=unknown,
  )
  assert list(np.asarray(out.nfe)) == [expected(n) for n in n_values]
  order = np.asarray(out.order)
  for b, n in enumerate(n_values):  # every unknown patch generated, once
    assert sorted(order[b, :n]) == sorted(np.flatnonzero(unknown[b]))


def test_graph_sequential_needs_a_dependency_graph():
  config = sampling.SamplerConfig(schedule="graph_sequential")
  golden = {f"toy/{k}": np.zeros((12, 12), np.float32) for k in "abcdefg"}
  with pytest.raises(ValueError, match="graph_sequential.*dependency graph"):
    sampling.srm_sample(
        sampling.Denoiser(toy_denoiser(golden), PATCH),
        sampling.Puzzles(
            sampling.puzzle_keys(jax.random.key(0), jnp.arange(1)),
            noise=np.zeros((1, 12, 12, 1), np.float32),
        ),
        config,
    )


@pytest.mark.parametrize(
    "ipr_schedule,ipr_top_k,per_iteration",
    [
        # IPR regeneration of k = 4 re-noised patches, 10 steps per patch at overlap 0.8 (spec §4.6:
        # 2k + 8 passes); fixed and the sequential ones take the same; top_k 2: ceil(k / 2) blocks.
        ("adaptive", 1, 2 * 4 + 8),
        ("fixed", 1, 2 * 4 + 8),
        ("random_sequential", 1, 2 * 4 + 8),
        ("graph_sequential", 1, 2 * 4 + 8),
        ("adaptive", 2, 2 * 2 + 8),
    ],
)
def test_ipr_regenerates_with_its_own_schedule(ipr_schedule, ipr_top_k, per_iteration):
  """srm_ipr, SRM pass graph_sequential (3 n passes) and IPR regeneration under another
  schedule: passes per budget from the formulas; a changed sample from the regeneration."""
  golden = {f"toy/{k}": np.full((12, 12), 0.3, np.float32) for k in "abcdefg"}
  unknown = np.ones((2, 16), bool)
  unknown[:, :0] = False
  noise = np.random.default_rng(5).standard_normal((2, 12, 12, 1)).astype(np.float32)
  result = sampling.srm_ipr(
      sampling.Denoiser(toy_denoiser(golden), PATCH, mnist_sudoku.dependency_matrix(2)),
      sampling.Puzzles(sampling.puzzle_keys(jax.random.key(2), jnp.arange(2)), noise=noise),
      sampling.SamplerConfig(schedule="graph_sequential"),
      sampling.IPRConfig(budget=2, schedule=ipr_schedule, top_k=ipr_top_k),
  )
  nfe = np.asarray(result.nfe_per_budget)
  np.testing.assert_array_equal(nfe[:, 0], [48, 48 + per_iteration, 48 + 2 * per_iteration])
  assert np.asarray(result.resampled).sum(axis=-1).tolist() == [[4, 4], [4, 4]]


def test_check_schedules_refuses_repeated_starts_only_for_the_adaptive_schedule():
  """3 steps per patch at overlap 0.75 repeats block starts: graph_sequential starts those blocks
  together (as the reference's scheduling matrix), for the SRM pass and the regeneration; the
  adaptive schedule, one block per step, is refused, naming the fields."""
  sampling.check_schedules(
      sampling.SamplerConfig(schedule="graph_sequential", overlap=0.75),
      sampling.IPRConfig(schedule="graph_sequential", steps_per_patch=3, overlap=0.75),
      16,
      range(1, 17),
  )
  with pytest.raises(
      ValueError,
      match=r"sampler: steps_per_patch=3 and overlap=0.75 give repeated block starts",
  ):
    sampling.check_schedules(
        sampling.SamplerConfig(overlap=0.75), sampling.IPRConfig(schedule="fixed"), 16, [10]
    )
  with pytest.raises(ValueError, match=r"ipr: steps_per_patch=3 and overlap=0.75 give repeated"):
    sampling.check_schedules(
        sampling.SamplerConfig(schedule="graph_sequential", overlap=0.75),
        sampling.IPRConfig(steps_per_patch=3, overlap=0.75),
        16,
        [16],
    )


def _puzzle_unknowns(workdir, name):
  with np.load(workdir / "eval" / name / "puzzles.npz") as f:
    return f["unknown_patches"], f["nfe"]


def test_the_evaluation_binary_runs_a_reference_sampler_test(tmp_path):
  """`demo,ms_hard_graph_seq000` with a fixed-schedule regeneration through the evaluation
  binary on the shipped model: the passes of every puzzle from the formulas (SRM 3n, IPR 2k + 8
  with k = max(1, floor(n / 4))) and the settings in results.json."""
  done = subprocess.run(
      [
          sys.executable,
          "-m",
          "ipr_jax.evaluate",
          "--config=configs/mnist_sudoku.py:demo,ms_hard_graph_seq000",
          "--config.eval.num_puzzles=6",
          "--config.eval.batch_size=6",
          "--config.ipr.budget=2",
          "--config.ipr.schedule=fixed",
          f"--workdir={tmp_path}",
      ],
      capture_output=True,
      text=True,
      cwd=pathlib.Path(__file__).resolve().parents[1],
      timeout=600,
      check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  unknown, nfe = _puzzle_unknowns(tmp_path, "ms_hard_graph_seq000")
  k = np.maximum(1, unknown // 4)
  np.testing.assert_array_equal(
      nfe, np.stack([3 * unknown + b * (2 * k + 8) for b in range(3)], axis=1)
  )
  metadata = json.loads((tmp_path / "eval" / "ms_hard_graph_seq000" / "results.json").read_text())[
      "metadata"
  ]
  assert (metadata["sampler"]["schedule"], metadata["sampler"]["max_order"]) == (
      "graph_sequential",
      1,
  )
  assert (metadata["ipr"]["schedule"], metadata["ipr"]["budget"]) == ("fixed", 2)


def test_the_python_api_runs_adaptive_top_k(tmp_path, task_config):
  """runner.evaluate with sampler.top_k=2 and ipr.top_k=2: SRM 3 ceil(n / 2), IPR
  2 ceil(k / 2) + 8 passes per puzzle; the samples are scored (valid rates in [0, 1])."""
  from ipr_jax.evaluation import runner  # pylint: disable=g-import-not-at-top

  config = task_config("mnist_sudoku", "demo")
  config.eval.num_puzzles = 6
  config.eval.batch_size = 6
  config.ipr.budget = 1
  config.sampler.top_k = 2
  config.ipr.top_k = 2
  rows = runner.evaluate(config, str(tmp_path))
  unknown, nfe = _puzzle_unknowns(tmp_path, "ms_hard_test")
  k = np.maximum(1, unknown // 4)
  srm = 3 * np.ceil(unknown / 2)
  np.testing.assert_array_equal(nfe, np.stack([srm, srm + 2 * np.ceil(k / 2) + 8], axis=1))
  assert all(0.0 <= row["valid_rate"] <= 1.0 for row in rows)


# experiments/beyond_paper/run_sampler_family.sh: run name -> (preset, overrides) of the committed
# runs.
_FAMILY_RUNS = {
    "seq_adaptive000": ("demo,ms_hard_seq_adaptive000", []),
    "fixed": ("demo,ms_hard_fixed", []),
    "random_seq000": ("demo,ms_hard_random_seq000", []),
    "graph_seq000": ("demo,ms_hard_graph_seq000", []),
    "adaptive_top2": ("demo", ["sampler.top_k=2"]),
    "adaptive_top4": ("demo", ["sampler.top_k=4"]),
    "seq_adaptive075": ("demo,ms_hard_seq_adaptive075", []),
    "random_seq075": ("demo,ms_hard_random_seq075", []),
    "graph_seq075": ("demo,ms_hard_graph_seq075", []),
    "ipr_graph_seq": ("demo", ["ipr.schedule=graph_sequential"]),
}


@pytest.mark.parametrize("name", sorted(_FAMILY_RUNS))
def test_the_committed_family_runs_record_their_commands(name, task_config):
  """The runs of experiments/README.md's sampler family table hold the settings of the commands
  in experiments/beyond_paper/run_sampler_family.sh (1,000 hard puzzles of seed 35, budget 10),
  the shipped model, and the code and machine they ran on."""
  from ipr_jax.build import pretrained
  from ipr_jax.evaluation import settings as eval_settings
  from ipr_jax.evaluation import shards as eval_shards  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(__file__).resolve().parents[1]
  script = (root / "experiments" / "beyond_paper" / "run_sampler_family.sh").read_text()
  preset, overrides = _FAMILY_RUNS[name]
  assert f"run {name} {preset}" in script
  config = task_config("mnist_sudoku", preset)
  config.eval.num_puzzles, config.eval.batch_size, config.ipr.budget = 1000, 500, 10
  config.eval.name = name
  for override in overrides:
    key, value = override.split("=")
    section, field = key.split(".")
    config[section][field] = type(config[section][field])(value)
  run = root / "experiments" / "results" / "sampler_family" / name / "eval" / name
  shipped = pretrained.load("mnist_sudoku_demo")
  eval_shards.check_settings(
      run / "shards", eval_settings.run_settings(config, shipped.params, "ema"), check_code=False
  )
  metadata = json.loads((run / "results.json").read_text())["metadata"]
  assert metadata["code"]["sha256"] and "sampling/planning.py" in metadata["code"]["files"]
  assert metadata["environment"]["backend"] == "cpu"
