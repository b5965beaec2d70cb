"""The config sections every task shares, with the reference's global values (spec §1, §3, §4).

`configs/<task>.py` files build on `base_config` and set only what is task-specific; every field is
documented here once, but for the sampler and ipr sections: their fields, defaults and
documentation are those of `sampling.SamplerConfig` and `sampling.IPRConfig` (`sampler_section`,
`ipr_section`). Sections (one builder each): top level (seed, batch, steps,
checkpoints), data (task fields added by the task file), model (U-Net), time_sampler, loss, optim,
sampler, ipr, eval.
"""

from collections.abc import Sequence
import importlib.util
import os
import pathlib

import ml_collections
from ml_collections import config_dict

from ipr_jax import sampling
from ipr_jax.models import unet
from ipr_jax.noise import flows
from ipr_jax.runtime import errors

# The packaged task configs (`ipr_jax/configs/<task>.py`), named by `--config=<task>[:preset]`.
PACKAGED_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def packaged_configs() -> tuple[str, ...]:
  """The names of the packaged configs, sorted: ('counting_polygons', 'even_pixels', ...)."""
  return tuple(
      sorted(
          path.stem for path in PACKAGED_CONFIG_DIR.glob("*.py") if not path.name.startswith("_")
      )
  )


def resolve_config_spec(spec: str | os.PathLike) -> str:
  """The `--config` value with a packaged config's name replaced by its file.

  'mnist_sudoku:demo' -> '<site-packages>/ipr_jax/configs/mnist_sudoku.py:demo'. A spec whose
  path part is an existing file, or looks like a path (has a '/' or ends in '.py'), is returned
  unchanged (a missing file is then reported where it is loaded).

  Raises:
    errors.ConfigError: a bare name that is neither a file nor a packaged config, listing those
      there are.
  """
  spec = str(spec)
  path, colon, preset = spec.partition(":")
  if pathlib.Path(path).is_file() or "/" in path or os.sep in path or path.endswith(".py"):
    return spec
  if path not in packaged_configs():
    raise errors.ConfigError(
        f"--config={spec}: {path!r} is neither a config file nor a packaged config; packaged: "
        f"{', '.join(packaged_configs())} (e.g. --config=mnist_sudoku:demo), or give a file's "
        "path (configs/<task>.py[:preset])"
    )
  return f"{PACKAGED_CONFIG_DIR / path}.py{colon}{preset}"


def load_config(spec: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config that `--config=<spec>` gives the binaries, e.g. 'configs/mnist_sudoku.py:demo'
  or, a packaged config, 'mnist_sudoku:demo'.

  For notebooks and scripts: the file's `get_config(preset)` (preset = the part after the
  colon, None if there is none). Raises FileNotFoundError if the file does not exist, and
  errors.ConfigError for a name that is no packaged config (`resolve_config_spec`).
  """
  file, _, preset = resolve_config_spec(spec).partition(":")
  path = pathlib.Path(file)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} (from {str(spec)!r}) does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_ipr_config_{path.stem}", path)
  if module_spec is None or module_spec.loader is None:
    raise errors.ConfigError(f"config file {str(path)!r} is not a Python module")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset or None)


def parse_preset(
    arg: str | None, sizes: Sequence[str], evals: Sequence[str], default_eval: str
) -> tuple[str | None, str]:
  """Splits a preset string like 'tiny,cp_test' into (size or None, eval name).

  Raises:
    ValueError: an unknown or repeated token, naming it.
  """
  size, eval_name = None, None
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    if token in sizes and size is None:
      size = token
    elif token in evals and eval_name is None:
      eval_name = token
    else:
      raise ValueError(
          f"Unknown or repeated preset token {token!r} in {arg!r}; expected at most one of "
          f"{tuple(sizes)} and at most one of {tuple(evals)}."
      )
  return size, eval_name or default_eval


def base_config(task: str, preset: str | None, unet_preset: str) -> ml_collections.ConfigDict:
  """A config with the shared sections at the reference's global values.

  Args:
    task: 'even_pixels', 'mnist_sudoku' or 'counting_polygons'.
    preset: the preset string the config is built from (stored, informational).
    unet_preset: key of `unet.UNET_PRESETS` for the model section.
  """
  config = ml_collections.ConfigDict()
  config.task = task
  # Preset tokens this config was built from (informational).
  config.preset = preset or ""
  _add_top_level(config)
  config.data = ml_collections.ConfigDict()
  # U-Net denoiser (spec §1).
  config.model = _model_section(unet_preset)
  # Per-patch time sampler (spec §3.1).
  config.time_sampler = _time_sampler_section()
  # Loss = mse + vlb_weight * vlb + sigma_nll_weight * sigma-NLL (spec §3.3).
  config.loss = _loss_section()
  # AdamW with linear warm-up, global-norm clipping and an EMA (spec §3.4).
  config.optim = _optim_section()
  # SRM greedy sampler (spec §4.4): fields, defaults and documentation are
  # `sampling.SamplerConfig`'s.
  config.sampler = sampler_section()
  # Iterative Partial Refinement (spec §4.5): fields, defaults and documentation are
  # `sampling.IPRConfig`'s.
  config.ipr = ipr_section()
  # Evaluation run (spec §4.5, §5.4).
  config.eval = _eval_section()
  return config


def _add_top_level(config: ml_collections.ConfigDict) -> None:
  """The top-level run fields: seed, batch, steps, checkpoints, logging, distribution."""
  # Root seed of model init and of every training random draw (data, times, noise, dropout).
  config.seed = 0
  # Global batch over all devices and hosts.
  config.batch_size = 56
  # Optimizer steps (reference max_steps).
  config.num_train_steps = 250_001
  # The forward process and what the denoiser predicts (`ipr_jax.noise.flows.FLOW_NAMES`).
  config.flow = "rectified"
  # Save a checkpoint every this many steps (and always at the end or on SIGTERM).
  config.checkpoint_every_steps = 5_000
  # Keep the newest this many checkpoints.
  config.keep_checkpoints = 3
  # Print a progress line and append to metrics.jsonl every this many steps.
  config.log_every_steps = 100
  # Call jax.distributed.initialize() first (multi-host TPU pods / multi-node GPU); env-detected.
  config.distributed = False
  # Training memory (same parameters, same updates): rematerialise the U-Net's ResBlocks and
  # attention blocks in the backward pass (recomputed instead of stored) ...
  config.remat = False
  # ... and split each device's batch into this many micro-batches whose gradients are averaged
  # (must divide batch_size / device count; 1: off).
  config.grad_accum_steps = 1
  # Persistent XLA compilation cache of the binaries, so that a rerun, a resume or the next sweep
  # does not compile again: a directory; "" or "off": no cache; None: $JAX_COMPILATION_CACHE_DIR
  # if set, else ~/.cache/ipr_jax/xla (`ipr_jax.runtime.compilation_cache`).
  config.compilation_cache_dir = config_dict.placeholder(str)
  # eval.batch_size="auto": memory per device in GB (None: the device's own limit, from
  # jax.devices()[0].memory_stats(); needed where the device reports none, e.g. the CPU) ...
  config.memory_limit_gb = config_dict.placeholder(float)
  # ... and the fraction of it left free (for what the compiled analysis does not count).
  config.memory_headroom = 0.1


def noise_flow(config: ml_collections.ConfigDict) -> flows.Flow:
  """The `flows.Flow` of `config.flow` ('rectified' where a stored config has none).

  Raises:
    errors.ConfigError: an unknown name, naming the known ones.
  """
  name = config.get("flow", "rectified")
  if name not in flows.FLOW_NAMES:
    raise errors.ConfigError(
        f"flow={name!r} is unknown; expected one of {', '.join(flows.FLOW_NAMES)}"
    )
  return flows.make_flow(name)


def _model_section(unet_preset: str) -> ml_collections.ConfigDict:
  """config.model: the U-Net of `unet.UNET_PRESETS[unet_preset]` and the shared layer settings,
  and the transformer denoiser `model.dit` (used with `model.kind='dit'`)."""
  section = ml_collections.ConfigDict()
  # The denoiser: 'unet' (the reference's U-Net, the fields below) or 'dit' (the transformer of
  # `model.dit`; the U-Net fields are then unused, `dtype` applies to both).
  section.kind = "unet"
  section.dit = _dit_section()
  # Reference preset name (informational; the fields below define the network).
  section.name = unet_preset
  # Channels per resolution level.
  section.hid_dims = tuple(unet.UNET_PRESETS[unet_preset]["hid_dims"])
  # Self-attention at each level.
  section.attention = tuple(unet.UNET_PRESETS[unet_preset]["attention"])
  # ResBlocks per encoder level (the decoder has one more).
  section.num_blocks = 2
  # Width of the time-embedding MLP output.
  section.t_emb_dim = 512
  # Width of the sinusoidal time features.
  section.d_emb = 256
  # Channels per attention head.
  section.num_head_channels = 64
  # GroupNorm groups.
  section.num_groups = 32
  # Dropout inside ResBlocks during training.
  section.dropout = 0.1
  # Compute dtype; params stay float32 (reference: bf16-mixed).
  section.dtype = "bfloat16"
  return section


def _dit_section() -> ml_collections.ConfigDict:
  """config.model.dit: the DiT denoiser (`ipr_jax.models.dit`; model.kind='dit')."""
  section = ml_collections.ConfigDict()
  # 'dit' (LayerNorm, GELU MLP) or 'lightning_dit' (RMSNorm, q/k norm, SwiGLU, 2D rotary).
  section.form = "dit"
  # DiT size: 'S', 'B', 'L' or 'XL' (hidden, depth, heads of `dit.DIT_SIZES`).
  section.size = "S"
  # Width, blocks and attention heads; None: the size's, else this value instead.
  section.hidden = config_dict.placeholder(int)
  section.depth = config_dict.placeholder(int)
  section.num_heads = config_dict.placeholder(int)
  # MLP width over hidden; None: the form's (dit 4, lightning_dit 8/3).
  section.mlp_ratio = config_dict.placeholder(float)
  # Width of the time sinusoid.
  section.d_emb = 256
  # Side of a token's patch in pixels; must divide data.patch_size (a token lies in one region,
  # so has one noise level). None: data.patch_size, one token per region.
  section.patch_size = config_dict.placeholder(int)
  # 'patch' (a token = a patch) or 'spatialreasoners' (the SRM authors' framework's packing, for
  # its checkpoints; `ipr_jax.models.tokens`).
  section.token_layout = "patch"
  return section


def _time_sampler_section() -> ml_collections.ConfigDict:
  """config.time_sampler: the per-patch training time sampler and its loss-weight histogram."""
  section = ml_collections.ConfigDict()
  # Two-stage mean-then-recursive-Beta split.
  section.name = "mean_beta"
  # Scale of the Beta(a_n, a_n) parameters a_n = (n - 1 - n mod 2)^1.05 * sharpness.
  section.beta_sharpness = 1.0
  # Zero a uniformly random fraction of patches (clean context, no loss).
  section.add_zeros = True
  # Time samples drawn for the loss-weight histogram (each gives N patch times).
  section.density_num_samples = 80_000
  # Histogram bins on [0, 1].
  section.density_num_bins = 1000
  # Gaussian smoothing of the histogram: odd kernel size and sigma in bins (reference: 5 and 0.2;
  # 0.2 is effectively no smoothing, spec §7.11).
  section.density_blur_kernel_size = 5
  section.density_blur_sigma = 0.2
  return section


def _loss_section() -> ml_collections.ConfigDict:
  """config.loss: the weights and steps of the VLB and sigma-NLL terms."""
  section = ml_collections.ConfigDict()
  # Weight of the VLB term (learned-range variance; u detached).
  section.vlb_weight = 1.0
  # Weight of the sigma NLL term (u detached).
  section.sigma_nll_weight = 0.01
  # The VLB and sigma terms apply when step > this (reference apply_after_step).
  section.aux_after_step = 0
  # VLB step size: s = t - vlb_time_step.
  section.vlb_time_step = 1e-3
  # s below this counts as 0 (discretized NLL branch).
  section.time_eps = 1e-5
  return section


def _optim_section() -> ml_collections.ConfigDict:
  """config.optim: AdamW, its learning-rate schedule, gradient clipping and the EMA."""
  section = ml_collections.ConfigDict()
  # Peak learning rate.
  section.learning_rate = 1e-4
  # Adam betas.
  section.b1 = 0.95
  section.b2 = 0.999
  # Adam epsilon; None derives it like the reference: 1e-7 under bf16, 1e-8 in float32.
  section.eps = config_dict.placeholder(float)
  # Decoupled weight decay, applied to all parameters.
  section.weight_decay = 1e-6
  # The learning rate ramps linearly from warmup_start_factor * lr over warmup_steps.
  section.warmup_steps = 5_000
  section.warmup_start_factor = 2e-4
  # After the warm-up, a cosine decay to decay_end_factor * lr at step decay_steps, constant after
  # it; None (the reference): constant learning rate.
  section.decay_steps = config_dict.placeholder(int)
  section.decay_end_factor = 0.0
  # Global L2 gradient-norm clip.
  section.grad_clip_norm = 1.0
  # EMA decay (first update copies the weights).
  section.ema_decay = 0.9999
  return section


def sampler_section() -> ml_collections.ConfigDict:
  """config.sampler: every field of `sampling.SamplerConfig` at its default, in field order.

  The fields, defaults (the reference's ms_hard_test values) and their documentation are defined
  once, in `sampling.SamplerConfig` (`SamplerConfig.field_docs()`); configs/<task>.py override
  what is task-specific.
  """
  return ml_collections.ConfigDict(sampling.SamplerConfig.defaults())


def ipr_section() -> ml_collections.ConfigDict:
  """config.ipr: every field of `sampling.IPRConfig` at its default, in field order.

  The fields, defaults and their documentation are defined once, in `sampling.IPRConfig`
  (`IPRConfig.field_docs()`); configs/<task>.py override what is task-specific.
  """
  return ml_collections.ConfigDict(sampling.IPRConfig.defaults())


def _eval_section() -> ml_collections.ConfigDict:
  """config.eval: what an evaluation run generates and how it batches and stores it."""
  section = ml_collections.ConfigDict()
  # Name of the evaluation preset.
  section.name = ""
  # Puzzles / images generated (the reference yaml runs 1, spec §7.2).
  section.num_puzzles = 100
  # Puzzles / images per sampler call; "auto": the largest batch whose compiled evaluation
  # program fits the device memory less eval.memory_headroom (`ipr_jax.evaluation.fit`), printed
  # at the start and recorded in run.json as the number it resolved to (see memory_limit_gb).
  section.batch_size = config_dict.FieldReference(100, field_type=object)
  # Seed of the evaluation randomness.
  section.seed = 42
  # Given-cell range of the test puzzles (MNIST Sudoku only).
  section.given_range = config_dict.placeholder(tuple)
  # Sample with the EMA weights (reference use_ema: true).
  section.use_ema = True
  # Name of a model shipped in the package (`ipr_jax.build.pretrained.names()`) to evaluate when no
  # --checkpoint is given; None: the newest checkpoint in --workdir.
  section.pretrained = config_dict.placeholder(str)
  # Puzzles shown in ipr_process.png: those IPR fixed (invalid after SRM, valid at the end) and
  # one it did not, else others (`eval_report.choose_plot_puzzles`), computed again with samples.
  section.num_plot_puzzles = 4
  # Batch the puzzles by their number of patches to generate (a batch's sampling loop runs until
  # its longest schedule ends); False: in index order. Results per puzzle are the same either way.
  section.sort_by_unknowns = True
  # Also keep every puzzle's final image (uint8) in puzzles.npz.
  section.save_samples = False
  return section


def use_tiny_model(
    config: ml_collections.ConfigDict, hid_dims: Sequence[int], attention: Sequence[bool]
) -> None:
  """Turns `config` into a CPU-sized run: a small float32 U-Net and a fast optimizer schedule."""
  config.model.name = "tiny"
  config.model.hid_dims = tuple(hid_dims)
  config.model.attention = tuple(attention)
  config.model.num_blocks = 1
  config.model.t_emb_dim = 64
  config.model.d_emb = 32
  config.model.num_head_channels = 32
  config.model.num_groups = 8
  config.model.dtype = "float32"
  config.time_sampler.density_num_samples = 10_000
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 50
  config.optim.ema_decay = 0.99
  config.checkpoint_every_steps = 100
  config.log_every_steps = 25
