r"""SRM weights shipped inside the package: load them with one call, export a run as one.

    from ipr_jax.build import pretrained
    model = pretrained.load("mnist_sudoku_demo")   # .params, .config, .metadata
    pretrained.names()                             # what ships

A shipped model is one `.npz` file under `ipr_jax/assets/`: the EMA parameters (flattened, keys
like `encoder/blocks_1_0/conv_1_2/kernel`), the full training config (`config_json`) and a record
(`metadata_json`: steps, wall time, machine, final loss, git commit of the code that trained it,
and the valid rates measured when it was shipped). The evaluation binary evaluates one when
`config.eval.pretrained` names it (the `demo` preset of configs/mnist_sudoku.py does).

Loading checks the parameters' sha256 (`checkpoint.params_digest`, what run.json records as
params_sha256) against the one recorded for them: `SHIPPED_SHA256` for the models shipped in the
package, `metadata["params_sha256"]` for a file exported since digests are recorded; a file
whose weights changed (a flipped byte) is refused naming it.

Export a training run (EMA weights of its newest or a given checkpoint):

    python -m ipr_jax.build.pretrained --workdir=runs/demo --name=mnist_sudoku_demo \
        --git_commit=$(git rev-parse HEAD)
"""

import dataclasses
import json
import os
import pathlib
import platform
import sys
from typing import Any, Mapping, Optional

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from ipr_jax.runtime import config_diff
from ipr_jax.runtime import errors

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "assets"
_CONFIG_KEY, _METADATA_KEY = "config_json", "metadata_json"
_SEPARATOR = "/"
# The sections a model's weights depend on: an evaluation config must agree with the shipped one.
MODEL_SECTIONS = ("task", "flow", "data", "model")
# The sha256 of each shipped model's parameters (`checkpoint.params_digest`; the params_sha256 of
# the run.json files of its committed tables), checked by `load`.
SHIPPED_SHA256 = {
    "mnist_sudoku_demo": "7f8b054df69dd9652bf7cd7188f4a68cb9a79b600a93c1847d5683ad331ea62e",
}
_DIGEST_KEY = "params_sha256"


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A shipped SRM.

  Attributes:
    name: its file name without `.npz`.
    params: the U-Net's inner parameter dict (numpy leaves).
    config: the config it was trained with (`configs/<task>.py` fields).
    metadata: the training and shipping record.
  """

  name: str
  params: dict
  config: ml_collections.ConfigDict
  metadata: dict


def names() -> list[str]:
  """The models shipped in the package."""
  return sorted(p.stem for p in ASSETS.glob("*.npz"))


def path_of(name: str) -> pathlib.Path:
  """The file of shipped model `name`, or a clear error listing what ships."""
  path = ASSETS / f"{name}.npz"
  if not path.is_file():
    raise FileNotFoundError(
        f"no shipped model named {name!r} (looked for {str(path)!r}); " f"shipped: {names()}"
    )
  return path


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict (leaves as they are)."""
  flat = {}
  for key, value in params.items():
    if _SEPARATOR in key:
      raise ValueError(f"parameter name {key!r} contains {_SEPARATOR!r}")
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + _SEPARATOR))
    else:
      flat[name] = value
  return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  params: dict = {}
  for name, value in flat.items():
    *scopes, leaf = name.split(_SEPARATOR)
    node = params
    for scope in scopes:
      node = node.setdefault(scope, {})
    node[leaf] = value
  return params


def save(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    config: ml_collections.ConfigDict,
    metadata: Mapping[str, Any],
) -> None:
  """Writes params, config and metadata as one compressed `.npz` (float32 leaves); the metadata
  gains the parameters' sha256 (`params_sha256`), which `load_file` checks."""
  from ipr_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: only to save)

  arrays = {k: np.asarray(v, np.float32) for k, v in _flatten(jax.device_get(params)).items()}
  metadata = {**dict(metadata), _DIGEST_KEY: checkpoint.params_digest(_unflatten(arrays))}
  arrays[_CONFIG_KEY] = np.asarray(config.to_json_best_effort(sort_keys=True))
  arrays[_METADATA_KEY] = np.asarray(json.dumps(metadata, sort_keys=True))
  with open(path, "wb") as f:
    np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy's stub


def load_file(path: str | os.PathLike, expected_sha256: Optional[str] = None) -> Pretrained:
  """Reads a file written by `save`; checks the parameters against the model of its config and
  against their recorded sha256.

  Args:
    path: the `.npz` file.
    expected_sha256: the parameters' digest to check (default: the one the file's metadata
      records, if any; a file exported before digests were recorded is not checked).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a shipped-model file, does not fit its own config, or its
      parameters' sha256 differs from the one expected (a changed or damaged file).
  """
  from ipr_jax import build  # pylint: disable=g-import-not-at-top  (flax and optax: only to load)

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"model file not found: {str(path)!r}")
  try:
    with np.load(path) as f:
      flat = {k: f[k] for k in f.files}
  except Exception as e:  # a truncated or foreign file: numpy raises several types
    raise errors.ConfigError(f"{str(path)!r} is not a readable .npz model file: {e}") from e
  missing = [k for k in (_CONFIG_KEY, _METADATA_KEY) if k not in flat]
  if missing:
    raise errors.ConfigError(
        f"{str(path)!r} lacks {missing}: not a file written by ipr_jax.build.pretrained"
    )
  config = ml_collections.ConfigDict(json.loads(str(flat.pop(_CONFIG_KEY))))
  metadata = json.loads(str(flat.pop(_METADATA_KEY)))
  params = _unflatten(flat)
  model = build.make_model(config)
  expected = jax.eval_shape(lambda: build.init_params(config, model, jax.random.key(0)))
  want = {k: tuple(v.shape) for k, v in _flatten(expected).items()}
  have = {k: tuple(v.shape) for k, v in flat.items()}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:6]
    raise errors.ConfigError(
        f"{str(path)!r}: parameters do not fit the model of its config "
        f"(first differences, name and shape: {diff})"
    )
  expected = expected_sha256 or metadata.get(_DIGEST_KEY)
  if expected is not None:
    from ipr_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top

    if checkpoint.params_digest(params) != expected:
      raise errors.ConfigError(
          f"{str(path)!r}: its parameters do not match the sha256 recorded for them "
          f"({expected[:16]}...): the file was changed or damaged; reinstall the package or "
          "export the model again"
      )
  return Pretrained(name=path.stem, params=params, config=config, metadata=metadata)


def load(name: str) -> Pretrained:
  """The shipped model `name` (see `names()`), its parameters checked against
  `SHIPPED_SHA256`."""
  return load_file(path_of(name), SHIPPED_SHA256.get(name))


def check_compatible(config: ml_collections.ConfigDict, shipped: Pretrained) -> None:
  """Raises ValueError if `config` changes a field the shipped weights depend on.

  Only the sections in MODEL_SECTIONS are compared (sampler, IPR and eval settings are free).
  """

  def section(c, name):
    if name == "flow":
      return c.get("flow", "rectified")
    value = c[name]
    if name == "model":
      return config_diff.model_record(value)
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value

  def normalise(value):  # JSON turns tuples into lists
    return json.loads(json.dumps(value))

  differences = []
  for name in MODEL_SECTIONS:  # In this order; each section's keys sorted.
    ours, theirs = normalise(section(config, name)), normalise(section(shipped.config, name))
    differences += [
        f"{key}: {a!r} (shipped: {b!r})"
        for key, a, b in config_diff.differences({name: ours}, {name: theirs})
    ]
  if differences:
    raise errors.ConfigError(
        f"the config does not match the shipped model {shipped.name!r}: " + "; ".join(differences)
    )


def regression_facts(evaluator, num_puzzles: int, batch_size: int) -> dict[str, np.ndarray]:
  """What a shipped model's regression record holds per puzzle and budget, and what a rerun is
  compared with it by (tests/test_evaluate.py): the sample of each of the regression puzzles
  0..num_puzzles-1 after every budget (`evaluator.samples_per_budget`, in batches of
  `batch_size`) as its classified digits ('digit_grid' [P, budget + 1, n, n]) and the mean of
  each cell's pixels ('cell_mean' [P, budget + 1, gh, gw]: a sampler change moves these long
  before it changes a digit; another XLA or CPU moves them by about 1e-5).

  Args:
    evaluator: an `runner.Evaluator` of the regression config and the model's parameters.
    num_puzzles: the regression set's size; batch_size: its batch size.
  """
  samples = evaluator.samples_per_budget(np.arange(num_puzzles), batch_size)
  cell = evaluator.task.cell_size
  num, budgets, height, width, depth = samples.shape
  cells = samples.reshape(num, budgets, height // cell, cell, width // cell, cell, depth)
  return {
      "digit_grid": evaluator.final_facts(samples)["digit_grid"],
      "cell_mean": cells.mean(axis=(3, 5, 6)),
  }


def _training_record(workdir: pathlib.Path, step: int) -> dict[str, Any]:
  """Steps, wall time and final loss from a run's metrics.jsonl (up to `step`)."""
  records = []
  metrics_path = workdir / "metrics.jsonl"
  if metrics_path.is_file():
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  records = [r for r in records if r["step"] <= step]
  if not records:
    return {}
  last = records[-1]
  # Each record covers the steps since the previous one at its steps_per_sec (the first step,
  # which compiles, is not in any window).
  seconds, previous = 0.0, 1
  for record in records:
    seconds += (record["step"] - previous) / max(record["steps_per_sec"], 1e-9)
    previous = record["step"]
  return {
      "final_loss": last["loss"],
      "final_mse": last["mse"],
      "logged_step": last["step"],
      "train_seconds_excluding_compilation": round(seconds, 1),
  }


def export_run(
    workdir: str | os.PathLike,
    name: str,
    step: Optional[int] = None,
    git_commit: str = "",
    extra: Optional[Mapping[str, Any]] = None,
    output_dir: str | os.PathLike = ASSETS,
) -> pathlib.Path:
  """Writes the EMA weights of a training run as a shipped model.

  Args:
    workdir: the training run directory (checkpoints/, config.json, metrics.jsonl).
    name: the model's name (file `output_dir/name.npz`).
    step: the checkpoint step (default: the newest).
    git_commit: the commit of the code that trained it.
    extra: more metadata (e.g. measured valid rates).
    output_dir: where to write.

  Returns:
    The written path.
  """
  from ipr_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  step_dir = checkpoint.find_step_dir(workdir, step)
  step = int(step_dir.name)
  params = checkpoint.restore_params(step_dir, which="ema")
  config = ml_collections.ConfigDict(checkpoint.restore_config(step_dir))
  config.num_train_steps = step  # what the shipped weights had: the schedule has no decay phase
  metadata = {
      "name": name,
      "steps": step,
      "batch_size": int(config.batch_size),
      "weights": "ema",
      "machine": f"{platform.machine()}, {os.cpu_count()} cores ({platform.platform()})",
      "git_commit": git_commit,
      **_training_record(workdir, step),
      **dict(extra or {}),
  }
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  path = output_dir / f"{name}.npz"
  save(path, params, config, metadata)
  load_file(path)  # refuse to leave a file that does not load
  return path


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if not f.workdir or not f.name:
    raise app.UsageError("--workdir and --name are required")
  extra = {}
  if f.extra_metadata:
    with open(f.extra_metadata) as fh:
      extra = json.load(fh)
  try:
    path = export_run(f.workdir, f.name, f.step, f.git_commit, extra)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training run directory to export.")
  flags.DEFINE_string("name", None, "Name of the shipped model (file ipr_jax/assets/NAME.npz).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_string("git_commit", "", "Commit of the code that trained the model.")
  flags.DEFINE_string("extra_metadata", None, "JSON file of more metadata to record.")
  app.run(main)
