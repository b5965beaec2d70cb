"""The sampler's former import path, kept so that code written before the split keeps working.

The sampler now lives in the package `ipr_jax.sampling` (config, patches, greedy, selection, ipr);
`from ipr_jax import sampler` gives its public names (`sampler.srm_ipr`, `sampler.IPRConfig`,
...), the same objects as `ipr_jax.sampling`'s. New code imports `ipr_jax.sampling`.
"""

# pylint: disable=g-importing-member,unused-import,wildcard-import
from ipr_jax.sampling import *  # noqa: F401,F403
from ipr_jax.sampling import __all__  # noqa: F401
