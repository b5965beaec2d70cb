r"""Cold and warm compile times of the paper Sudoku evaluation program (unet_256, 252x252, one
puzzle per device) through the binaries' persistent compilation cache (`compilation_cache.enable`):
run it twice with the same --cache_dir; the first run compiles (cold), the second reads
the cache (warm).

  python experiments/compile_cache_times.py --cache_dir=/tmp/xla_cache   # cold
  python experiments/compile_cache_times.py --cache_dir=/tmp/xla_cache   # warm
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ipr_jax.build import config_base  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.evaluation import fit  # noqa: E402  pylint: disable=g-import-not-at-top
from ipr_jax.runtime import compilation_cache  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cache_dir", required=True)
  parser.add_argument("--config", default="configs/mnist_sudoku.py:ms_hard_test")
  args = parser.parse_args()
  config = config_base.load_config(args.config)
  with config.unlocked():
    config.compilation_cache_dir = args.cache_dir
  print("cache:", compilation_cache.enable(config))
  cost = fit.eval_program_cost(config, 1)
  print(
      json.dumps(
          {"config": args.config, "compile_seconds": cost.compile_seconds, "bytes": cost.bytes}
      )
  )


if __name__ == "__main__":
  main()
