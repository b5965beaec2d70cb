"""ipr-jax: Iterative Partial Refinement for Spatial Reasoning Models, in JAX/Flax."""

__version__ = "0.1.0"
