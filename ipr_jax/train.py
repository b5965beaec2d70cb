r"""Training binary: trains an SRM denoiser the way the reference does (spec §3).

  python -m ipr_jax.train --config=configs/even_pixels.py:tiny --workdir=runs/ep_tiny

What a run does (data parallel over every device, checkpoints, resuming, the progress line, the
exit statuses): `ipr_jax.training.trainer`, the library behind it (`trainer.train(config,
workdir)` from Python).
"""

from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from ipr_jax.build import cli
from ipr_jax.runtime import checkpoint
from ipr_jax.runtime import compilation_cache
from ipr_jax.runtime import host_devices
from ipr_jax.training import trainer


def define_flags() -> None:
  """The binary's flags; defined only when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Training config: a file, e.g. configs/even_pixels.py:tiny, or a packaged "
      "config's name, e.g. even_pixels:tiny.",
      lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")
  flags.DEFINE_bool(
      "allow_config_mismatch",
      False,
      "Resume a checkpoint whose stored config differs from this one in a field that "
      "defines what its weights mean (data geometry, U-Net architecture).",
  )
  flags.DEFINE_float(
      "time_limit_s",
      None,
      "Stop after this many seconds as on SIGTERM: save a checkpoint of the last step and exit "
      "with status 75 (rerun to resume).",
  )
  flags.DEFINE_float(
      "checkpoint_every_s",
      None,
      "Also save a checkpoint every this many seconds of wall time (besides "
      "config.checkpoint_every_steps): a run killed without warning loses at most that much.",
  )
  flags.register_validator("time_limit_s", lambda v: v is None or v >= 0, "expected a number >= 0")
  flags.register_validator(
      "checkpoint_every_s", lambda v: v is None or v > 0, "expected a number > 0"
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  host_devices.use_cpu_cores(config.batch_size)  # before the first JAX call initialises XLA
  if config.distributed:
    host_devices.initialize_distributed()
  cache = compilation_cache.enable(config)
  logging.info("Compilation cache: %s", cache or "off (config.compilation_cache_dir)")
  # The devices' reprs are for debugging (-v 1; the trainer logs their count and kind), except in
  # a multi-process run, where each process's line says which it is.
  logging.vlog(
      0 if jax.process_count() > 1 else 1,
      "JAX process %d/%d, local devices %s",
      jax.process_index(),
      jax.process_count(),
      jax.local_devices(),
  )
  try:
    result = trainer.train(
        config,
        flags.FLAGS.workdir,
        time_limit_s=flags.FLAGS.time_limit_s,
        allow_config_mismatch=flags.FLAGS.allow_config_mismatch,
        checkpoint_every_s=flags.FLAGS.checkpoint_every_s,
    )
  except (trainer.NonFiniteLossError, checkpoint.CheckpointError) as e:
    logging.error("%s", e)
    raise SystemExit(f"Training stopped: {e}") from None
  if result.preempted:
    cli.stopped(
        f"stopped at step {int(result.state.step)} of {config.num_train_steps} (SIGTERM, SIGINT "
        f"or the time limit), its checkpoint saved in "
        f"{checkpoint.checkpoint_dir(flags.FLAGS.workdir)}; rerun the same command to resume "
        f"(exit status {cli.EXIT_PREEMPTED})."
    )


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  # A bad flag, config or setting: one line on stderr, exit status 2 (ipr_jax.build.cli).
  cli.run(main)
