"""The device machine's package set, rehearsed here: this environment's packages less
ml-collections, tensorflow-datasets and the editable ipr_jax, with the carried ml-collections
wheel installed by the device command's own `pip install` (docs/device.md).

`python -m venv --without-pip`, its site-packages made of symbolic links to this environment's
(the package travels as the working tree: PYTHONPATH, as on the device)."""

import os
import pathlib
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHEELS = ROOT / "experiments" / "device" / "wheels"
# Not on the device machine (the editable ipr_jax: the working tree travels instead).
_ABSENT = ("ml_collections", "tensorflow_datasets", "__editable__", "ipr_jax")


def _venv_without(root: pathlib.Path) -> pathlib.Path:
  """A Python whose packages are this environment's but for `_ABSENT`."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
  python = root / "bin" / "python"
  site = pathlib.Path(
      subprocess.run(
          [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
          capture_output=True,
          text=True,
          check=True,
      ).stdout.strip()
  )
  ours = pathlib.Path(sysconfig.get_paths()["purelib"])
  for entry in ours.iterdir():
    if not entry.name.startswith(_ABSENT):
      (site / entry.name).symlink_to(entry)
  return python


def device_package_env(tmp: pathlib.Path) -> tuple[pathlib.Path, dict, pathlib.Path]:
  """(python, environment, the wheel's install target) of the device's package set under tmp.

  Checks first that neither ml_collections nor tensorflow_datasets imports there, then installs
  the carried wheel with the device command's pip line."""
  python = _venv_without(tmp / "env")
  bare = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  for module in ("ml_collections", "tensorflow_datasets"):
    probe = subprocess.run([str(python), "-c", f"import {module}"], env=bare, check=False)
    assert probe.returncode != 0, f"{module} is importable in the rehearsal environment"
  target = tmp / "site"
  install = (
      f"{python} -m pip install -q --no-index --no-deps --no-compile --target {target} "
      f"experiments/device/wheels/*.whl"
  )
  subprocess.run(install, shell=True, cwd=ROOT, env=bare, check=True)
  env = {
      **bare,
      "PYTHONPATH": f"{target}:{ROOT}",
      "PYTHONUNBUFFERED": "1",
      # The tiny programs compile ~4x faster without XLA's optimisations and still run in seconds.
      "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",
  }
  return python, env, target
