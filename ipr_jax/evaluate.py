r"""Evaluation binary: SRM + IPR on many test puzzles, the valid rate at every IPR budget.

  python -m ipr_jax.evaluate --config=configs/mnist_sudoku.py:ms_hard_test --workdir=runs/ms
  python -m ipr_jax.evaluate --config=configs/even_pixels.py:tiny --workdir=runs/ep_tiny \
      --config.ipr.budget=2 --config.eval.num_puzzles=4

It restores the EMA parameters of the newest Orbax checkpoint in `--workdir` (or `--checkpoint`:
a run directory, its `checkpoints/` folder or one step folder), runs the SRM greedy sampler and
`config.ipr.budget` IPR iterations on `config.eval.num_puzzles` test puzzles, in batches of
`config.eval.batch_size` split over the local devices with pmap, and writes to
`workdir/eval/<config.eval.name>/`:

  shards/                      one file per batch, written as soon as the batch is done; a rerun
                               of the same command skips the batches done (after SIGTERM, a crash
                               or a lost machine), computes damaged ones again, and refuses
                               shards of other settings, batching or code (run.json: every
                               setting resolved, the code's fingerprint, the environment;
                               each shard: their digests; see eval_shards); shards of another
                               environment only with --allow_environment_change;
  results.json, results.csv    one row per budget b = 0..B (b = 0 is plain SRM): valid rate and
                               its 95% Wilson interval, mean duplicate count (Sudoku), the Even
                               Pixels metrics, or the Counting Polygons metrics
                               (are_vertices_uniform, numbers_match_objects, per-count
                               frequencies), mean denoiser passes spent so far; results.json also
                               holds the run's throughput (puzzles/s, denoiser passes/s, devices);
  puzzles.npz, puzzles.csv     one record per puzzle: index, unknown_patches, valid, the task's
                               scores and nfe at every budget ([P, B + 1] arrays), for Sudoku the
                               final classified digit grid, with eval.save_samples the final
                               images (uint8); `np.load(".../puzzles.npz")`,
                               `pandas.read_csv(".../puzzles.csv")`;
  valid_rate_vs_budget.png     the curve (Counting Polygons: with both metrics);
  ipr_process.png              a few puzzles across IPR iterations, invalid cells outlined.

Valid means: Sudoku, no rule broken by the classified digits; Even Pixels, exactly half of the
pixels in each hue; Counting Polygons, the scorer finds the polygons uniform and the printed
numbers equal to its polygon and vertex counts (both metrics at once).

Test puzzle i is a pure function of (config.eval.seed, i), and so is all of its sampling
randomness, so results do not depend on the batch size, the order of the batches, the number of
devices or the number of processes. With `--config.distributed=True` the processes of a
multi-host run (`host_devices.initialize_distributed`) split the batches; process 0 writes the
merged files. They first agree that they compute the same thing (settings, code, environment,
weights); they end together: an error on any of them (a settings mismatch that process 0 finds,
a failed batch) ends all with the same message, and SIGTERM or SIGINT to any one stops all after
the current round of batches (`agreement`).

The checkpoint's parameter digests are checked, and its stored config is compared with this
run's on the fields that define what its weights mean (the data's geometry, the U-Net): a
mismatch is refused, naming the fields, unless `--allow_config_mismatch`. SIGTERM or SIGINT stops
the run after the current round of batches with exit status 75 (`cli.EXIT_PREEMPTED`): rerun
the same command to compute the rest. A workdir that cannot be written (a file, read-only, a full
disk) is one error line, exit status 74.

In Python (`ipr_jax.evaluation.runner`): `Evaluator(config,
params)(indices)` runs SRM + IPR on any puzzle indices and returns their per-puzzle scores,
passes and (optionally) samples; `evaluate(config, workdir)` is the whole run of the binary.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from ipr_jax.build import cli
from ipr_jax.evaluation import fit
from ipr_jax.evaluation import runner
from ipr_jax.runtime import compilation_cache
from ipr_jax.runtime import host_devices


def define_flags() -> None:
  """The binary's flags; defined only when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Task config: a file, e.g. configs/mnist_sudoku.py:ms_hard_test, or a "
      "packaged config's name, e.g. mnist_sudoku:ms_hard_test.",
      lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Run directory; results go to workdir/eval/<name>.")
  flags.DEFINE_string(
      "checkpoint",
      None,
      "Checkpoint to evaluate (default: the shipped model config.eval.pretrained "
      "if the config names one, else the newest checkpoint in --workdir).",
  )
  flags.DEFINE_bool(
      "allow_environment_change",
      False,
      "Reuse shards computed in another environment (package versions, CPU, "
      "devices, XLA flags); recorded in run.json and results.json.",
  )
  flags.DEFINE_bool(
      "allow_config_mismatch",
      False,
      "Evaluate a checkpoint whose stored config differs from this one in a field "
      "that defines what its weights mean (data geometry, U-Net architecture).",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.config is None or not f.workdir:
    raise app.UsageError("--config and --workdir are required")
  if f.config.distributed:
    host_devices.initialize_distributed()
  cache = compilation_cache.enable(f.config)
  print(f"Compilation cache: {cache or 'off (config.compilation_cache_dir)'}", flush=True)
  # eval.batch_size = "auto": the largest batch that fits this device (or the one that the run's
  # shards were computed with).
  config = fit.resolve_eval_batch_size(f.config, f.workdir)
  try:
    runner.evaluate(
        config,
        f.workdir,
        f.checkpoint,
        allow_environment_change=f.allow_environment_change,
        allow_config_mismatch=f.allow_config_mismatch,
    )
  except runner.EvaluationStopped as e:
    cli.stopped(str(e))  # exit status cli.EXIT_PREEMPTED


if __name__ == "__main__":
  host_devices.use_cpu_cores()
  define_flags()
  # A bad flag, config, setting, file or checkpoint: one line on stderr, exit status 2 (cli).
  cli.run(main)
