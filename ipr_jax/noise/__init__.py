"""The noise model: the rectified flow and its Gaussian kernels, the schedules of the samplers, the
per-patch time sampler of training."""
