"""`python -m ipr_jax.evaluate`, with a batch that raises: for the multi-process tests.

IPR_JAX_TEST_FAILING_BATCH=b makes the dispatch of batch b raise a RuntimeError on whichever
process computes it (a process dispatches its next batch before it writes the current one's
shard; tests/test_evaluate.py runs this module with tests/ on PYTHONPATH).
"""

import os

from ipr_jax import evaluate
from ipr_jax.build import cli
from ipr_jax.evaluation import runner
from ipr_jax.runtime import host_devices

FAILING_BATCH_ENV = "IPR_JAX_TEST_FAILING_BATCH"


def _failing(dispatch_batch):
  failing = int(os.environ[FAILING_BATCH_ENV])

  def dispatch(run, b, pad_to):
    if b == failing:
      raise RuntimeError(f"batch {b} failed on purpose")
    return dispatch_batch(run, b, pad_to)

  return dispatch


if __name__ == "__main__":
  # pylint: disable-next=protected-access
  runner._dispatch_batch = _failing(runner._dispatch_batch)
  host_devices.use_cpu_cores()
  evaluate.define_flags()
  cli.run(evaluate.main)
