"""Tests of ipr_jax/configs/*.py (configs/*.py in a clone): presets parse, reference values
(spec §3, §4.5) are the defaults; packaged names resolve."""

import dataclasses
import importlib.util
import json
import pathlib

from absl import flags
from ml_collections import config_flags
import pytest

from ipr_jax.data import geometry
from ipr_jax.runtime import errors

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "ipr_jax" / "configs"
EVEN_PIXELS = CONFIG_DIR / "even_pixels.py"
MNIST_SUDOKU = CONFIG_DIR / "mnist_sudoku.py"
COUNTING_POLYGONS = CONFIG_DIR / "counting_polygons.py"

PRESETS = {
    EVEN_PIXELS: ["", "tiny", "small", "ep_test", "tiny,ep_test", "ep_test,small"],
    MNIST_SUDOKU: [
        "",
        "demo",
        "tiny",
        "small",
        "ms_hard_test",
        "ms_medium_test",
        "ms_easy_test",
        "ms_corrupted_test",
        "tiny,ms_corrupted_test",
        "small,ms_hard_test",
    ],
    COUNTING_POLYGONS: ["", "tiny", "small", "cp_test", "tiny,cp_test"],
}
ALL_PRESETS = [(path, arg) for path, args in PRESETS.items() for arg in args]

# The shared schema of common.md (every config must have these fields).
SCHEMA = {
    "": [
        "task",
        "seed",
        "batch_size",
        "num_train_steps",
        "checkpoint_every_steps",
        "log_every_steps",
        "flow",
    ],
    "model": [
        "hid_dims",
        "attention",
        "num_blocks",
        "t_emb_dim",
        "d_emb",
        "num_head_channels",
        "dropout",
        "dtype",
        "kind",
        "dit",
    ],
    "data": ["image_size", "channels", "patch_size"],
    "sampler": [
        "steps_per_patch",
        "overlap",
        "stochasticity",
        "temperature",
        "top_k",
        "clean_schedule",
        "clamp_noise",
        "schedule",
        "max_steps",
        "max_order",
        "certainty_decay",
        "num_groups",
        "adaptive_alpha",
        "divergence_threshold",
        "softmax_scale",
    ],
    "ipr": [
        "budget",
        "steps_per_patch",
        "overlap",
        "resampling_ratio",
        "noise_type",
        "mode",
        "num_corruption_swaps",
        "immediate_stop",
        "selection",
        "uncertainty_score",
        "uncertainty_groups",
        "selection_temperature",
        "renoise_time",
        "ratio_schedule",
        "final_resampling_ratio",
        "ratio_decay_iterations",
        "return_iterate",
        "schedule",
        "top_k",
        "max_order",
        "certainty_decay",
        "num_groups",
        "adaptive_alpha",
        "divergence_threshold",
        "softmax_scale",
        "query_cells",
        "chains",
        "choose_at",
    ],
    "eval": ["name", "num_puzzles", "batch_size", "seed", "given_range"],
}


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get(path, arg=""):
  return load(path).get_config(arg)


def parse_flags(argv):
  """Parses argv with a locked config flag, as ipr_jax.train does."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "config", flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("path,arg", ALL_PRESETS)
def test_preset_has_schema_and_consistent_geometry(path, arg):
  config = get(path, arg)
  for section, names in SCHEMA.items():
    node = config[section] if section else config
    for name in names:
      assert name in node, f"{path.name}:{arg} lacks {section}.{name}"
  assert config.data.image_size % config.data.patch_size == 0
  grid = geometry.patch_grid(config)
  assert grid == (config.data.image_size // config.data.patch_size,) * 2
  assert geometry.image_shape(config) == (config.data.image_size,) * 2 + (config.data.channels,)
  assert config.batch_size >= 1 and config.num_train_steps >= 1
  assert len(config.model.hid_dims) == len(config.model.attention)
  for width in config.model.hid_dims:
    assert width % config.model.num_groups == 0
  json.loads(config.to_json_best_effort())  # storable beside a checkpoint


def test_a_patch_size_that_does_not_divide_the_image_is_a_config_error():
  config = get(MNIST_SUDOKU, "demo")
  config.data.patch_size = config.data.image_size // 4 + 1
  with pytest.raises(errors.ConfigError, match="does not divide"):
    geometry.patch_grid(config)


def every_preset():
  """(path, preset) for every size (or none) and evaluation token each config file declares."""
  for path in (EVEN_PIXELS, MNIST_SUDOKU, COUNTING_POLYGONS):
    module = load(path)
    for size in (None, *module._SIZES):  # pylint: disable=protected-access
      for eval_name in module._EVALS:  # pylint: disable=protected-access
        if eval_name == "ms_unique_test" and size not in ("demo", "tiny"):
          continue  # 4x4 only (test_unique_solution_preset)
        yield path, ",".join(token for token in (size, eval_name) if token)


@pytest.mark.parametrize("path,arg", list(every_preset()))
def test_every_preset_samples_with_strictly_increasing_block_starts(path, arg):
  from ipr_jax.evaluation import settings as eval_settings  # pylint: disable=g-import-not-at-top
  from ipr_jax.noise import schedule  # pylint: disable=g-import-not-at-top

  config = get(path, arg)
  eval_settings.check_schedules(config)
  # The same, spelled out for the SRM pass: every patch count the preset can produce.
  sampler = config.sampler
  for n in eval_settings.unknown_counts(config):
    starts = schedule.make_schedule(
        n,
        sampler.steps_per_patch,
        sampler.overlap,
        sampler.clean_schedule,
        kind=sampler.schedule,
        top_k=sampler.top_k,
        total_steps=sampler.max_steps,
    ).block_starts[:-1]
    assert list(starts) == sorted(set(starts)), (arg, n)


def test_a_degenerate_override_is_refused_before_sampling():
  from ipr_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  from ipr_jax.evaluation import settings as eval_settings  # pylint: disable=g-import-not-at-top

  config = get(EVEN_PIXELS, "tiny")
  config.sampler.overlap = 0.9  # 5 steps per patch at overlap 0.9: starts 0, 0, 1, 1, ...
  with pytest.raises(ValueError, match=r"sampler: steps_per_patch=5 and overlap=0.9 .*n=64"):
    eval_settings.check_schedules(config)
  config = get(MNIST_SUDOKU, "tiny")  # 4x4, hard: 11..16 unknown cells, IPR k = 2..4
  config.ipr.steps_per_patch, config.ipr.overlap = 2, 0.9
  with pytest.raises(ValueError, match=r"ipr: steps_per_patch=2 and overlap=0.9 .*n=2 "):
    eval_settings.check_schedules(config)
  config = get(MNIST_SUDOKU, "tiny,ms_corrupted_test")  # all 16 cells are candidates: k = 4
  config.ipr.steps_per_patch, config.ipr.overlap = 2, 0.9
  config.sampler.overlap = 0.9  # no SRM pass in correction mode: not checked
  with pytest.raises(ValueError, match=r"ipr: .*n=4 "):
    eval_settings.check_schedules(config)
  with pytest.raises(ValueError, match="steps_per_patch=2 and overlap=0.9"):
    runner.evaluate(config, "/nonexistent")  # before any checkpoint is read


def test_unique_solution_preset():
  config = get(MNIST_SUDOKU, "demo,ms_unique_test")
  assert config.eval.unique_solution is True
  assert tuple(config.eval.given_range) == (4, 6)
  assert "unique_solution" not in get(MNIST_SUDOKU, "demo").eval  # other runs' settings unchanged
  for preset in ("ms_unique_test", "small,ms_unique_test"):  # 9x9: no uniqueness check
    with pytest.raises(ValueError, match=f"preset '{preset}': ms_unique_test needs a 4x4"):
      get(MNIST_SUDOKU, preset)


def test_even_pixels_defaults_are_the_reference():
  config = get(EVEN_PIXELS)
  assert config.task == "even_pixels"
  assert (config.data.image_size, config.data.channels, config.data.patch_size) == (32, 3, 4)
  # unet_32 (spec §1.7).
  assert tuple(config.model.hid_dims) == (64, 128, 128, 256)
  assert tuple(config.model.attention) == (False, False, True, True)
  assert config.time_sampler.beta_sharpness == 0.75
  assert config.time_sampler.add_zeros is True
  assert config.optim.learning_rate == 8e-4
  assert config.batch_size == 2048
  assert config.num_train_steps == 100_001
  # ep_test (spec §4.5): SRM 30 steps / overlap 0.9; IPR 30 iterations, 30, 0.9, 0.25; seed 42.
  assert (config.sampler.steps_per_patch, config.sampler.overlap) == (30, 0.9)
  ipr = config.ipr
  assert (ipr.budget, ipr.steps_per_patch, ipr.overlap, ipr.resampling_ratio) == (30, 30, 0.9, 0.25)
  assert ipr.mode == "standard"
  assert config.eval.name == "ep_test" and config.eval.seed == 42


def test_mnist_sudoku_defaults_are_the_reference():
  config = get(MNIST_SUDOKU)
  assert config.task == "mnist_sudoku"
  assert (config.data.image_size, config.data.channels, config.data.patch_size) == (252, 1, 28)
  # top_n: 100 of the bundled digits (a documented deviation from ms1000, see the config).
  assert config.data.box_size == 3 and config.data.top_n == 100
  assert tuple(config.data.train_given_range) == (0, 80)
  # unet_256 (spec §1.7).
  assert tuple(config.model.hid_dims) == (128, 128, 256, 256, 512, 512)
  assert tuple(config.model.attention) == (False,) * 4 + (True,) * 2
  assert config.time_sampler.beta_sharpness == 1.0
  assert config.time_sampler.add_zeros is False
  assert config.optim.learning_rate == 1e-4
  assert config.batch_size == 56  # 28 per GPU x 2 GPUs
  assert config.num_train_steps == 250_001
  # ms_hard_test (spec §4.5, §5.1): SRM 3 / 0.0; IPR 30, 10, 0.8, 0.25; given 0..26; seed 35.
  assert (config.sampler.steps_per_patch, config.sampler.overlap) == (3, 0.0)
  ipr = config.ipr
  assert (ipr.budget, ipr.steps_per_patch, ipr.overlap, ipr.resampling_ratio) == (30, 10, 0.8, 0.25)
  assert ipr.mode == "standard"
  assert config.eval.name == "ms_hard_test"
  assert tuple(config.eval.given_range) == (0, 26) and config.eval.seed == 35


def test_mnist_sudoku_corrupted_test_preset():
  config = get(MNIST_SUDOKU, "ms_corrupted_test")
  ipr = config.ipr
  assert (ipr.budget, ipr.steps_per_patch, ipr.overlap, ipr.resampling_ratio) == (15, 10, 0.8, 0.25)
  assert ipr.mode == "correction" and ipr.num_corruption_swaps == 5
  assert tuple(config.eval.given_range) == (81, 81)
  assert config.eval.seed == 4
  ranges = {
      name: tuple(get(MNIST_SUDOKU, name).eval.given_range)
      for name in ("ms_medium_test", "ms_easy_test")
  }
  assert ranges == {"ms_medium_test": (27, 53), "ms_easy_test": (54, 80)}


def test_counting_polygons_defaults_are_the_reference():
  config = get(COUNTING_POLYGONS)
  assert config.task == "counting_polygons"
  # cp_ffhq_8 (spec table, §3): 128x128 RGB, patch 8 (16x16 grid), unet_128.
  assert (config.data.image_size, config.data.channels, config.data.patch_size) == (128, 3, 8)
  assert tuple(config.model.hid_dims) == (128, 128, 256, 256, 512)
  assert tuple(config.model.attention) == (False, False, False, True, True)
  assert config.time_sampler.beta_sharpness == 0.5
  assert config.time_sampler.add_zeros is True
  assert config.optim.learning_rate == 1e-4
  assert config.batch_size == 56
  assert config.num_train_steps == 250_001
  assert config.data.background_dir is None  # procedural backgrounds by default
  # cp_test (spec §4.5): SRM 10 / 0.9; IPR 30 iterations, 10, 0.9, 0.25; seed 193 (§5.4).
  assert (config.sampler.steps_per_patch, config.sampler.overlap) == (10, 0.9)
  ipr = config.ipr
  assert (ipr.budget, ipr.steps_per_patch, ipr.overlap, ipr.resampling_ratio) == (30, 10, 0.9, 0.25)
  assert ipr.mode == "standard"
  assert config.eval.name == "cp_test" and config.eval.seed == 193
  assert config.eval.scorer_path is None  # the shipped scorer


@pytest.mark.parametrize("path", [EVEN_PIXELS, MNIST_SUDOKU, COUNTING_POLYGONS])
def test_training_recipe_is_the_reference(path):
  config = get(path)
  o = config.optim
  assert (o.b1, o.b2, o.weight_decay) == (0.95, 0.999, 1e-6)
  assert (o.warmup_steps, o.warmup_start_factor) == (5000, 2e-4)
  assert o.grad_clip_norm == 1.0 and o.ema_decay == 0.9999
  assert o.eps is None  # derived from the precision: 1e-7 under bf16 (the reference's runs)
  assert config.model.dtype == "bfloat16"
  assert config.model.dropout == 0.1
  assert (
      config.model.num_blocks,
      config.model.t_emb_dim,
      config.model.d_emb,
      config.model.num_head_channels,
      config.model.num_groups,
  ) == (2, 512, 256, 64, 32)
  assert config.loss.vlb_weight == 1.0 and config.loss.sigma_nll_weight == 0.01
  ts = config.time_sampler
  assert ts.name == "mean_beta"
  assert (ts.density_num_samples, ts.density_num_bins, ts.density_blur_sigma) == (80_000, 1000, 0.2)
  s = config.sampler
  assert (s.stochasticity, s.temperature, s.top_k, s.clean_schedule) == (0.5, 1.0, 1, False)
  assert config.ipr.noise_type == "random" and config.ipr.immediate_stop is False


def test_tiny_presets_are_small():
  ep = get(EVEN_PIXELS, "tiny")
  assert ep.data.image_size == 32 and ep.batch_size <= 64 and ep.num_train_steps <= 500
  ms = get(MNIST_SUDOKU, "tiny")
  assert (ms.data.box_size, ms.data.cell_size, ms.data.image_size) == (2, 14, 56)
  assert ms.data.patch_size == ms.data.cell_size
  assert tuple(ms.eval.given_range) == (0, 5)
  assert tuple(get(MNIST_SUDOKU, "tiny,ms_corrupted_test").eval.given_range) == (16, 16)
  cp = get(COUNTING_POLYGONS, "tiny")
  assert cp.data.image_size == 128 and cp.data.patch_size == 32 and cp.batch_size <= 8
  for config in (ep, ms, cp):
    assert max(config.model.hid_dims) <= 32
    assert config.eval.num_puzzles <= 8 and config.ipr.budget <= 4


def test_demo_preset_is_the_shipped_model():
  from ipr_jax.build import pretrained  # pylint: disable=g-import-not-at-top

  demo = get(MNIST_SUDOKU, "demo")
  assert (demo.data.box_size, demo.data.cell_size, demo.data.image_size) == (2, 7, 28)
  assert tuple(demo.eval.given_range) == (0, 5)  # hard
  assert demo.eval.num_puzzles >= 128 and demo.ipr.budget >= 10
  shipped = pretrained.load(demo.eval.pretrained)
  pretrained.check_compatible(demo, shipped)
  assert shipped.config.num_train_steps == demo.num_train_steps
  for section in ("time_sampler", "loss", "optim"):  # the recipe, too
    assert shipped.config[section].to_dict() == demo[section].to_dict(), section


@pytest.mark.parametrize(
    "path,arg,bad",
    [
        (EVEN_PIXELS, "tiny,bogus", "bogus"),
        (EVEN_PIXELS, "ms_hard_test", "ms_hard_test"),  # a Sudoku eval on Even Pixels
        (MNIST_SUDOKU, "tiny,small", "small"),  # two sizes
        (MNIST_SUDOKU, "Tiny", "Tiny"),
        (COUNTING_POLYGONS, "tiny,ep_test", "ep_test"),
    ],
)
def test_unknown_preset_token_raises(path, arg, bad):
  with pytest.raises(ValueError, match=repr(bad)):
    get(path, arg)


def test_command_line_overrides_and_lock():
  config = parse_flags(
      [
          "prog",
          f"--config={MNIST_SUDOKU}:tiny,ms_corrupted_test",
          "--config.batch_size=8",
          "--config.data.tfds_data_dir=/tmp/tfds",
          "--config.optim.eps=1e-6",
      ]
  )
  assert config.batch_size == 8
  assert config.data.tfds_data_dir == "/tmp/tfds"  # a placeholder accepts a value
  assert config.optim.eps == 1e-6
  assert config.ipr.mode == "correction"
  with pytest.raises(AttributeError, match="batch_size"):  # misspelt: suggests the real name
    parse_flags(["prog", f"--config={EVEN_PIXELS}:tiny", "--config.batch_sise=8"])


def test_ipr_section_is_made_from_the_ipr_config_dataclass():
  """config.ipr has one source: the fields, defaults (types included) and order of IPRConfig."""
  from ipr_jax import sampling
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

  section = config_base.base_config("even_pixels", None, unet_preset="unet_32").ipr
  defaults = sampling.IPRConfig.defaults()
  assert list(section.keys()) == sorted(defaults)  # ConfigDict lists its keys sorted
  assert list(json.loads(section.to_json_best_effort(sort_keys=False))) == list(defaults)
  assert section.to_dict() == defaults
  for name, value in defaults.items():
    assert type(section[name]) is type(value), name  # pylint: disable=unidiomatic-typecheck
  assert sampling.IPRConfig(**section.to_dict()) == sampling.IPRConfig()
  assert [f.name for f in dataclasses.fields(sampling.IPRConfig)] == SCHEMA["ipr"]
  docs = sampling.IPRConfig.field_docs()
  assert list(docs) == SCHEMA["ipr"] and all(doc.strip() for doc in docs.values())


def test_sampler_section_is_made_from_the_sampler_config_dataclass():
  """config.sampler has one source, as config.ipr: SamplerConfig's fields, defaults (the
  reference's ms_hard_test values, spec §4.3-4.4: 3 steps per patch, overlap 0), order and
  documentation; every field, clamp_noise included, is a config field (--config.sampler.<name>)."""
  from ipr_jax import sampling
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

  section = config_base.base_config("even_pixels", None, unet_preset="unet_32").sampler
  defaults = sampling.SamplerConfig.defaults()
  assert list(json.loads(section.to_json_best_effort(sort_keys=False))) == list(defaults)
  # SamplerConfig.flow is the run's top-level config.flow, not a field of the section.
  assert section.to_dict() == defaults
  assert dataclasses.asdict(sampling.SamplerConfig()) == {**defaults, "flow": "rectified"}
  assert (defaults["steps_per_patch"], defaults["overlap"]) == (3, 0.0)
  assert [f.name for f in dataclasses.fields(sampling.SamplerConfig)] == SCHEMA["sampler"] + [
      "flow"
  ]
  docs = sampling.SamplerConfig.field_docs()
  assert list(docs) == SCHEMA["sampler"] and all(doc.strip() for doc in docs.values())


@pytest.mark.parametrize(
    "path,arg,overrides",
    [
        (EVEN_PIXELS, "", dict(steps_per_patch=30, overlap=0.9)),
        (EVEN_PIXELS, "tiny", dict(steps_per_patch=5, overlap=0.5)),
        (MNIST_SUDOKU, "", dict()),  # the defaults are ms_hard_test's
        (MNIST_SUDOKU, "demo", dict()),
        (COUNTING_POLYGONS, "", dict(steps_per_patch=10, overlap=0.9)),
        (COUNTING_POLYGONS, "tiny", dict(steps_per_patch=2, overlap=0.5)),
    ],
)
def test_task_configs_override_the_sampler_defaults(path, arg, overrides):
  """A preset's config.sampler is SamplerConfig's defaults with the task's overrides (the
  reference's ep_test / cp_test values, spec §4.3), nothing else."""
  from ipr_jax import sampling  # pylint: disable=g-import-not-at-top

  section = get(path, arg).sampler.to_dict()
  defaults = sampling.SamplerConfig.defaults()
  assert {name: value for name, value in section.items() if value != defaults[name]} == overrides


@pytest.mark.parametrize(
    "path,arg,overrides",
    [
        (EVEN_PIXELS, "", dict(steps_per_patch=30, overlap=0.9)),
        (EVEN_PIXELS, "tiny", dict(budget=2, steps_per_patch=5, overlap=0.5)),
        (MNIST_SUDOKU, "", dict()),  # the defaults are ms_hard_test's (overlap 0.8)
        (MNIST_SUDOKU, "ms_corrupted_test", dict(budget=15, mode="correction")),
        (MNIST_SUDOKU, "tiny", dict(num_corruption_swaps=2, budget=3)),
        (COUNTING_POLYGONS, "", dict(overlap=0.9)),
        (COUNTING_POLYGONS, "tiny", dict(budget=2, steps_per_patch=2, overlap=0.5)),
    ],
)
def test_task_configs_override_the_ipr_defaults(path, arg, overrides):
  """A preset's config.ipr is IPRConfig's defaults with the task's overrides, nothing else."""
  from ipr_jax import sampling  # pylint: disable=g-import-not-at-top

  ipr = get(path, arg).ipr.to_dict()
  defaults = sampling.IPRConfig.defaults()
  changed = {name: value for name, value in ipr.items() if value != defaults[name]}
  assert changed == overrides
  assert dataclasses.asdict(sampling.IPRConfig(**ipr)) == ipr


CLONE_CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    "path,arg", [(MNIST_SUDOKU, "demo"), (EVEN_PIXELS, "tiny,ep_test"), (COUNTING_POLYGONS, "")]
)
def test_clone_and_packaged_names_give_the_packaged_config(path, arg):
  """`configs/<task>.py:<preset>` (a clone's file), `<task>:<preset>` (the packaged name) and the
  packaged file give the same config, through load_config and through the binaries' flag."""
  from ipr_jax.build import cli  # pylint: disable=g-import-not-at-top
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

  suffix = f":{arg}" if arg else ""
  packaged = get(path, arg or None)
  assert config_base.load_config(f"{CLONE_CONFIG_DIR / path.name}{suffix}") == packaged
  assert config_base.load_config(f"{path.stem}{suffix}") == packaged
  argv = cli.resolve_config_args(["binary", f"--config={path.stem}{suffix}"])
  assert argv == ["binary", f"--config={path}{suffix}"]
  assert parse_flags(argv).to_dict() == packaged.to_dict()


def test_packaged_configs_are_the_clone_configs():
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

  assert config_base.packaged_configs() == ("counting_polygons", "even_pixels", "mnist_sudoku")
  assert sorted(p.stem for p in CLONE_CONFIG_DIR.glob("*.py")) == list(
      config_base.packaged_configs()
  )


def test_an_unknown_config_name_lists_the_packaged_ones():
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top
  from ipr_jax.runtime import errors  # pylint: disable=g-import-not-at-top

  with pytest.raises(
      errors.ConfigError, match="packaged: counting_polygons, even_pixels, " "mnist_sudoku"
  ):
    config_base.load_config("sudoku:demo")
  # A path stays a path: its absence is reported where the file is loaded.
  assert config_base.resolve_config_spec("configs/nosuch.py:x") == "configs/nosuch.py:x"
  with pytest.raises(FileNotFoundError):
    config_base.load_config("configs/nosuch.py")
