"""ipr_jax.models."""
