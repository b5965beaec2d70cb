"""What fits where: memory of the compiled evaluation and training programs, without running them.

XLA's compiled analysis (`jit(f).lower(...).compile().memory_analysis()`) gives the bytes a
program needs on its device: its arguments, its outputs and its temporaries (less what the outputs
alias of the arguments). This module measures it for the evaluation program (SRM + IPR on one
device's puzzles, `runner.make_run_fn`) and for the train step (`train_step.make_train_step`), fits
it linearly in the batch from two compilations, picks the largest evaluation batch that fits a
memory limit less a headroom (`eval.batch_size = "auto"`, resolved by the evaluation binary
before `runner.evaluate`).

The analysis is the backend's own: on the CPU it describes the CPU's compiled program, whose
layouts and fusions differ from a GPU's or a TPU's; the headroom (`config.memory_headroom`, 10% by
default) covers what the analysis leaves out (the runtime's own allocations, fragmentation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ipr_jax import build
from ipr_jax import sampling
from ipr_jax import tasks
from ipr_jax.data import geometry
from ipr_jax.evaluation import runner
from ipr_jax.evaluation import settings as eval_settings
from ipr_jax.evaluation import shards as eval_shards
from ipr_jax.runtime import errors

GB = 1e9
# Per-device batches the linear fit of `auto` compiles at.
FIT_BATCHES = (1, 2)
# eval.batch_size = "auto" never goes above this many puzzles per device.
MAX_AUTO_BATCH_PER_DEVICE = 4096


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """Compiled analysis of one program.

  Attributes:
    bytes: peak device bytes, arguments + outputs + temporaries - aliased.
    argument_bytes, output_bytes, temp_bytes, alias_bytes: XLA's memory_analysis fields.
    flops: XLA's cost_analysis 'flops' (None where the backend gives none).
    compile_seconds: wall time of lower + compile.
  """

  bytes: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  flops: Optional[float]
  compile_seconds: float


def analyse(fn: Callable[..., Any], *args, static_argnums=(), donate_argnums=()) -> ProgramCost:
  """Compiles `jax.jit(fn)` for `args` (arrays or `jax.ShapeDtypeStruct`s) without running it."""
  start = time.time()
  compiled = (
      jax.jit(fn, static_argnums=static_argnums, donate_argnums=donate_argnums)
      .lower(*args)
      .compile()
  )
  seconds = time.time() - start
  memory = compiled.memory_analysis()
  if memory is None:
    raise RuntimeError(f"XLA reports no memory analysis for the program on {jax.default_backend()}")
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  flops = None if not cost or "flops" not in cost else float(cost["flops"])
  total = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes
  )
  return ProgramCost(
      int(total),
      int(memory.argument_size_in_bytes),
      int(memory.output_size_in_bytes),
      int(memory.temp_size_in_bytes),
      int(memory.alias_size_in_bytes),
      flops,
      seconds,
  )


@dataclasses.dataclass(frozen=True)
class LinearFit:
  """bytes(b) = fixed + per_item * b, from two measured batches."""

  fixed: float
  per_item: float

  @classmethod
  def through(cls, b1: int, y1: float, b2: int, y2: float) -> "LinearFit":
    if b1 == b2:
      raise ValueError(f"a linear fit needs two different batches, got {b1} twice")
    per_item = (y2 - y1) / (b2 - b1)
    return cls(fixed=y1 - per_item * b1, per_item=per_item)

  def __call__(self, batch: int) -> float:
    return self.fixed + self.per_item * batch

  def largest(self, budget: float, cap: int = MAX_AUTO_BATCH_PER_DEVICE) -> int:
    """The largest b in [0, cap] with bytes(b) <= budget (0: not even one)."""
    if self(1) > budget:
      return 0
    if self.per_item <= 0:
      return cap
    return int(min(cap, np.floor((budget - self.fixed) / self.per_item)))


def accumulation_steps(
    step_fit: LinearFit, batch: int, budget: float, accumulator_bytes: float
) -> Optional[int]:
  """The smallest number of micro-batches k (`grad_accum_steps`, a divisor of `batch`) whose
  micro-batch step fits `budget`: step_fit(batch / k), plus `accumulator_bytes` (the summed
  gradients: one copy of the parameters) for k > 1; None if not even one example fits."""
  for k in range(1, batch + 1):
    if batch % k == 0 and step_fit(batch // k) + (accumulator_bytes if k > 1 else 0) <= budget:
      return k
  return None


def memory_budget(limit_bytes: float, headroom: float) -> float:
  """The bytes a program may use: limit * (1 - headroom)."""
  if not 0.0 <= headroom < 1.0:
    raise errors.ConfigError(f"memory_headroom={headroom!r} must lie in [0, 1)")
  return limit_bytes * (1.0 - headroom)


def device_memory_bytes(config: Optional[ml_collections.ConfigDict] = None) -> Optional[int]:
  """Memory per device: `config.memory_limit_gb` if set, else the first local device's
  `memory_stats()['bytes_limit']` (GPUs, TPUs), else None (the CPU reports none)."""
  if config is not None and config.get("memory_limit_gb") is not None:
    limit = float(config.memory_limit_gb)
    if not limit > 0:
      raise errors.ConfigError(f"memory_limit_gb={config.memory_limit_gb!r} must be positive")
    return int(limit * GB)
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return None


# ------------------------------------------------------------------------------------------------
# The evaluation program.
# ------------------------------------------------------------------------------------------------


def _abstract(x: Any, batch: Optional[int] = None) -> Any:
  """ShapeDtypeStruct of an array (None stays None), its leading axis set to `batch`."""
  if x is None:
    return None
  shape = tuple(x.shape) if batch is None else (batch, *x.shape[1:])
  return jax.ShapeDtypeStruct(shape, x.dtype)


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of the U-Net parameters of `config` (nothing is initialised)."""
  model = build.make_model(config)
  return jax.eval_shape(lambda k: build.init_params(config, model, k), jax.random.key(0))


def eval_program_cost(
    config: ml_collections.ConfigDict, batch_per_device: int, params: Any = None
) -> ProgramCost:
  """The compiled analysis of the evaluation program on one device's `batch_per_device` puzzles
  (the program the evaluation's batches run: SRM + IPR at `config.ipr.budget`, no snapshots,
  final images with `config.eval.save_samples`; the figure's few puzzles are computed apart)."""
  if batch_per_device < 1:
    raise ValueError(f"batch_per_device={batch_per_device} must be >= 1")
  task = eval_settings.task_evaluation(config)
  run = runner.make_run_fn(config, task)
  params = abstract_params(config) if params is None else jax.tree_util.tree_map(_abstract, params)
  inputs = task.inputs(config.eval.seed, np.arange(1))
  keys = sampling.puzzle_keys(jax.random.key(0), jnp.arange(1))
  noise = jax.ShapeDtypeStruct((batch_per_device, *task.image_shape), jnp.float32)
  return analyse(
      run,
      params,
      _abstract(keys, batch_per_device),
      noise,
      _abstract(inputs["image"], batch_per_device),
      _abstract(inputs["mask"], batch_per_device),
      0,
      bool(config.eval.save_samples),
      static_argnums=(5, 6),
  )


@dataclasses.dataclass(frozen=True)
class AutoBatch:
  """What `auto_eval_batch` chose and why.

  Attributes:
    batch_size: the evaluation batch (per_device x local devices; capped at the puzzles).
    per_device: the largest per-device batch whose analysed bytes fit the budget.
    limit_bytes, headroom, budget_bytes: the memory limit per device, the fraction kept free
      and limit * (1 - headroom).
    fit: the linear model of the analysed bytes in the per-device batch.
    measured: {per-device batch: analysed bytes} of every compilation made.
  """

  batch_size: int
  per_device: int
  limit_bytes: int
  headroom: float
  budget_bytes: float
  fit: LinearFit
  measured: dict[int, int]

  def describe(self) -> str:
    return (
        f"eval.batch_size=auto -> {self.batch_size} ({self.per_device} per device x "
        f"{self.batch_size // max(self.per_device, 1)} device(s)): the compiled evaluation "
        f"program needs {self.fit.fixed / GB:.3g} GB + {self.fit.per_item / GB:.3g} GB per "
        f"puzzle per device (XLA's compiled memory analysis); the budget is "
        f"{self.budget_bytes / GB:.3g} GB = {self.limit_bytes / GB:.3g} GB x (1 - headroom "
        f"{self.headroom:g})"
    )


def auto_eval_batch(
    config: ml_collections.ConfigDict,
    limit_bytes: int,
    headroom: float,
    cost_fn: Optional[Callable[[int], int]] = None,
    num_devices: Optional[int] = None,
) -> AutoBatch:
  """The largest evaluation batch whose compiled program fits `limit_bytes * (1 - headroom)`.

  Compiles the program at per-device batches `FIT_BATCHES`, fits the bytes linearly, then checks
  the candidate with its own compilation and walks down one batch at a time while it does not
  fit (and up while the fit and the compilation both say b + 1 fits), so that bytes(b) <= budget
  holds for the compiled analysis and the fit puts b + 1 over it (the fit is exact in practice:
  one more compilation). The batch is capped at the puzzles to evaluate.

  Args:
    config: the evaluation config.
    limit_bytes: memory per device.
    headroom: the fraction of it kept free.
    cost_fn: per-device batch -> analysed bytes (default: `eval_program_cost(...).bytes`).
    num_devices: devices the batch is split over (default: the local devices).

  Raises:
    ValueError: not even one puzzle per device fits.
  """
  budget = memory_budget(limit_bytes, headroom)
  num_devices = num_devices or jax.local_device_count()
  cap = max(1, -(-int(config.eval.num_puzzles) // num_devices))
  if cost_fn is None:
    params = abstract_params(config)
    cost_fn = lambda b: eval_program_cost(config, b, params).bytes
  measured: dict[int, int] = {}

  def cost(b: int) -> int:
    if b not in measured:
      measured[b] = int(cost_fn(b))
    return measured[b]

  b1, b2 = FIT_BATCHES
  fit = LinearFit.through(b1, cost(b1), b2, cost(b2))
  if cost(1) > budget:
    raise errors.ConfigError(
        f"eval.batch_size=auto: one puzzle per device needs {cost(1) / GB:.3f} GB, more than the "
        f"budget {budget / GB:.3f} GB ({limit_bytes / GB:.3f} GB less headroom {headroom:g})"
    )
  b = max(1, min(fit.largest(budget, cap), cap))
  while b > 1 and cost(b) > budget:
    b -= 1
  while b < cap and fit(b + 1) <= budget and cost(b + 1) <= budget:
    b += 1
  return AutoBatch(
      batch_size=min(b * num_devices, max(int(config.eval.num_puzzles), 1)),
      per_device=b,
      limit_bytes=int(limit_bytes),
      headroom=float(headroom),
      budget_bytes=budget,
      fit=fit,
      measured=dict(sorted(measured.items())),
  )


def _recorded_batch_size(
    workdir: Optional[str], config: ml_collections.ConfigDict
) -> Optional[int]:
  """eval.batch_size recorded by an earlier run of this evaluation (its shards' run.json)."""
  if not workdir:
    return None
  path = (
      pathlib.Path(workdir) / "eval" / str(config.eval.name) / "shards" / eval_shards.SETTINGS_FILE
  )
  try:
    recorded = json.loads(path.read_text())["eval"]["batch_size"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return recorded if isinstance(recorded, int) and recorded > 0 else None


def resolve_eval_batch_size(
    config: ml_collections.ConfigDict, workdir: Optional[str] = None
) -> ml_collections.ConfigDict:
  """`config` with `eval.batch_size` a number: itself, or for "auto" the batch that fits.

  "auto" resumes an earlier run's batching: if `workdir` holds shards of this evaluation, their
  recorded batch size is taken (the batches must match the shards'), else `auto_eval_batch` at
  `device_memory_bytes(config)` and `config.memory_headroom`. The choice is printed; run.json
  then records the number.

  Raises:
    ValueError: eval.batch_size is neither a positive integer nor "auto", or "auto" has no memory
      limit (a device without memory stats and no `memory_limit_gb`).
  """
  value = config.eval.batch_size
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return config
  if value != "auto":
    raise errors.ConfigError(f"eval.batch_size={value!r} must be a positive integer or 'auto'")
  resolved = copy.deepcopy(config)
  recorded = _recorded_batch_size(workdir, config)
  if recorded is not None:
    print(
        f"eval.batch_size=auto -> {recorded}, as recorded by the shards of this evaluation in "
        f"{workdir} (delete them to choose again).",
        flush=True,
    )
    with resolved.unlocked():
      resolved.eval.batch_size = recorded
    return resolved
  limit = device_memory_bytes(config)
  if limit is None:
    raise errors.ConfigError(
        f"eval.batch_size='auto' needs the device's memory, which "
        f"{jax.devices()[0].device_kind!r} does not report: set "
        f"--config.memory_limit_gb"
    )
  choice = auto_eval_batch(config, limit, float(config.memory_headroom))
  print(choice.describe(), flush=True)
  with resolved.unlocked():
    resolved.eval.batch_size = choice.batch_size
  return resolved


# ------------------------------------------------------------------------------------------------
# The training step.
# ------------------------------------------------------------------------------------------------


def train_step_cost(config: ml_collections.ConfigDict, batch_per_device: int) -> ProgramCost:
  """The compiled analysis of one device's train step at `batch_per_device` examples (with
  `config.remat` and `config.grad_accum_steps`; the state donated, as `train` does)."""
  from ipr_jax.training import train_step  # pylint: disable=g-import-not-at-top  (the heavier import)

  model = build.make_model(config, training=True)
  tx = build.make_optimizer(config)
  step = train_step.make_train_step(config, model, tx, axis_name=None)
  state = jax.eval_shape(
      lambda k: train_step.create_train_state(config, model, tx, k), jax.random.key(0)
  )
  num_bins = int(config.time_sampler.density_num_bins)
  weight_table = jax.ShapeDtypeStruct((num_bins,), jnp.float32)
  index = jax.ShapeDtypeStruct((batch_per_device,), jnp.int32)
  task_module = tasks.get(config.task)
  if task_module.HOST_RENDERED:
    images = jax.ShapeDtypeStruct((batch_per_device, *geometry.image_shape(config)), jnp.uint8)
    return analyse(step, state, None, weight_table, index, images, donate_argnums=(0,))
  task = jax.eval_shape(lambda: task_module.make_data(config))
  return analyse(step, state, task, weight_table, index, donate_argnums=(0,))
