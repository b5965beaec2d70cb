"""The one error type a user can fix: a bad setting, input file or checkpoint.

`ConfigError` is a ValueError (library callers that catch ValueError keep working). The binaries
(`ipr_jax.cli`) report it, and FileNotFoundError, in one line without a traceback; every other
exception, JAX's own shape and type errors included, keeps its traceback, since it is a bug to
look into rather than a value to change.
"""


class ConfigError(ValueError):
  """A setting, input file or checkpoint that cannot be used; the message names the value."""
