"""ipr_jax.metrics."""
