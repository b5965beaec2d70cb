r"""Conversion binary: official SRM PyTorch checkpoints (and the srmbench MNIST classifier) into
ipr-jax's Orbax checkpoints.

  python -m ipr_jax.convert --torch_checkpoint=last.ckpt \
      --config=configs/mnist_sudoku.py --workdir=runs/ms1000_28_official
  python -m ipr_jax.convert --torch_classifier=mnist_classifier.pth --classifier_out=clf.npz

What is accepted and how strictly it is mapped: `ipr_jax.conversion.converter`.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ipr_jax.build import cli
from ipr_jax.conversion import converter
from ipr_jax.runtime import checkpoint


def define_flags() -> None:
  """The binary's flags; defined only when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Task config the checkpoint belongs to (configs/<task>.py[:preset], or a "
      "packaged config's name: <task>[:preset]).",
      lock_config=True,
  )
  flags.DEFINE_string(
      "torch_checkpoint", None, "Lightning .ckpt, torch .pth/.pt or .npz denoiser state_dict."
  )
  flags.DEFINE_string("workdir", None, "Run directory to write the Orbax checkpoint to.")
  flags.DEFINE_enum(
      "weights", "ema", ["ema", "live"], "Which weights of a Lightning checkpoint to import."
  )
  flags.DEFINE_integer(
      "step", None, "Step to record (default: the checkpoint's global_step, else 0)."
  )
  flags.DEFINE_string(
      "torch_classifier", None, "srmbench MNIST classifier state_dict (.pth/.pt/.npz)."
  )
  flags.DEFINE_string("classifier_out", None, "Where to write the converted classifier (.npz).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.torch_checkpoint and not f.torch_classifier:
    raise app.UsageError(
        "give --torch_checkpoint (with --config, --workdir) and/or "
        "--torch_classifier (with --classifier_out)"
    )
  if f.torch_checkpoint:
    if f.config is None or not f.workdir:
      raise app.UsageError("--torch_checkpoint needs --config and --workdir")
    step_dir = converter.convert_checkpoint(
        f.torch_checkpoint, f.config, f.workdir, f.weights, f.step
    )
    logging.info("Wrote %s (%s weights of %s).", step_dir, f.weights, f.torch_checkpoint)
    digests = checkpoint.recorded_digests(step_dir) or {}
    print(
        f"converted {f.torch_checkpoint} -> {step_dir} "
        f"(params sha256 {digests.get('params_sha256', '?')})"
    )
  if f.torch_classifier:
    if not f.classifier_out:
      raise app.UsageError("--torch_classifier needs --classifier_out")
    out = converter.convert_classifier(f.torch_classifier, f.classifier_out)
    print(f"converted {f.torch_classifier} -> {out}")


if __name__ == "__main__":
  define_flags()
  # A bad flag, config or file (or torch missing): one line on stderr, exit status 2.
  cli.run(main, user_errors=(ImportError,))
