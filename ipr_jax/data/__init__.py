"""ipr_jax.data."""
