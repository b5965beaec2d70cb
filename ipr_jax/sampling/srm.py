"""`srm_sample`: the SRM pass of any `SamplerConfig.schedule`.

The block schedules (adaptive, fixed, random_sequential, graph_sequential) run the greedy loop
(`greedy.block_srm_sample`); the time-map schedules of the SRM authors' framework (raster,
adaptive_inverse, adaptive_softmax, mask_git) run `time_map_sampler.srm_time_map_sample`. Both
start from the same state and return a `greedy.GreedyResult`.
"""

from typing import Optional

import jax

from ipr_jax.noise import schedule as schedule_lib
from ipr_jax.sampling import greedy
from ipr_jax.sampling import time_map_sampler
from ipr_jax.sampling.config import SamplerConfig
from ipr_jax.sampling.inputs import Denoiser, Puzzles


def srm_sample(
    denoiser: Denoiser,
    puzzles: Puzzles,
    config: SamplerConfig,
    *,
    unknown: Optional[jax.Array] = None,
    record: bool = False,
    step_limit: Optional[int] = None,
) -> greedy.GreedyResult:
  """SRM sampling of a batch under `config.schedule`; arguments and result as
  `greedy.block_srm_sample`'s."""
  if config.schedule in schedule_lib.TIME_MAP_SCHEDULES:
    sample = time_map_sampler.srm_time_map_sample
  else:
    sample = greedy.block_srm_sample
  return sample(denoiser, puzzles, config, unknown=unknown, record=record, step_limit=step_limit)
