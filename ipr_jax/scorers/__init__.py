"""ipr_jax.scorers: how the metrics' shipped weights and the digit ranking were made (scripts)."""
