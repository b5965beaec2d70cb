r"""Host rendering throughput of the Counting Polygons training feed.

  python experiments/scale/benchmark_render.py --workers=1,2 --batch_size=56 --steps=20
  python experiments/scale/benchmark_render.py --workers=4,8,16 --processes --steps=40  # many cores

Times `TrainImagePrefetcher` (the feed ipr_jax/train.py uses) delivering `--steps` batches of
`--batch_size` images with each worker count, threads or processes, after one warm-up batch, and
reports images/s and the training steps/s that rate could keep fed. Compare with the trainer's
steps/s on the accelerator: if the feed is slower, the trainer's `input_wait` rises above 0.
Results are printed and written as JSON to --output.
"""

import json
import time

from absl import app
from absl import flags
import numpy as np

from ipr_jax.data import counting_polygons

_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker counts to time.")
_PROCESSES = flags.DEFINE_bool("processes", False, "Processes instead of threads.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 56, "Images per step (cp_ffhq_8: 56).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed batches per worker count.")
_BACKGROUND_DIR = flags.DEFINE_string(
    "background_dir", None, "Folder backgrounds (default: " "procedural)."
)
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the results.")


def main(argv):
  del argv
  task = counting_polygons.CountingPolygonsTask(seed=0, background_dir=_BACKGROUND_DIR.value)
  index = np.arange(_BATCH_SIZE.value)
  results = []
  for workers in [int(w) for w in _WORKERS.value]:
    with counting_polygons.TrainImagePrefetcher(
        task,
        seed=0,
        example_index=index,
        first_step=0,
        num_workers=workers,
        prefetch=workers,
        use_processes=_PROCESSES.value,
    ) as feed:
      feed.get()  # warm-up: process start-up, first renders
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        feed.get()
      seconds = time.perf_counter() - start
    images_per_sec = _STEPS.value * _BATCH_SIZE.value / seconds
    row = {
        "workers": workers,
        "processes": _PROCESSES.value,
        "batch_size": _BATCH_SIZE.value,
        "steps": _STEPS.value,
        "seconds": round(seconds, 2),
        "images_per_sec": round(images_per_sec, 1),
        "steps_per_sec_fed": round(images_per_sec / _BATCH_SIZE.value, 2),
    }
    results.append(row)
    print(json.dumps(row), flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
