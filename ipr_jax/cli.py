"""The binaries' command line: absl flags, with a user's mistake reported in one line.

    if __name__ == "__main__":
      define_flags()
      cli.run(main)   # instead of app.run(main)

A misspelt flag or config field, a bad config file or preset, an invalid setting (checked when
the flags are parsed, before anything compiles: the `sampler` and `ipr` sections as the sampler
reads them) and, while `main` runs, a configuration or input error (`errors.ConfigError`: a bad
setting, checkpoint or input file, shards of other settings; FileNotFoundError; the errors named
in `user_errors`) end the binary with one line on stderr, `error: <what>`, exit status 2
(EXIT_USAGE) and no traceback. Anything else, a plain ValueError or JAX's own shape and type
errors included, is a bug to look into and keeps its traceback. `--verbose`, or absl's `-v 1` /
`--verbosity=1`, shows the traceback of a user error too.
"""

import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
import ml_collections

from ipr_jax import errors

# The exit status of a bad command line or setting (what argparse and absl's usage errors use).
EXIT_USAGE = 2
_TRACEBACK_HINT = " (--verbose shows the traceback)"


def one_line(text: str) -> str:
  """`text` with its lines joined by single spaces."""
  return " ".join(str(text).split())


def fail(message: str) -> None:
  """Writes `error: message` as one line to stderr and exits with EXIT_USAGE."""
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(EXIT_USAGE)


def verbose_in(argv: Sequence[str]) -> bool:
  """Whether `argv` asks for tracebacks: --verbose, or absl's verbosity of at least 1 (read from
  argv, since a command line that does not parse has no flag values)."""
  verbose = False
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    name, _, value = arg.lstrip("-").partition("=")
    if name == "verbose":
      verbose = value.lower() not in ("false", "0", "no")
    elif name == "noverbose":
      verbose = False
    elif name in ("v", "verbosity"):
      if not value and i + 1 < len(args):
        value = args[i + 1]
      try:
        verbose = verbose or int(value) >= 1
      except ValueError:
        pass
  return verbose


def _flag_naming(argv: Sequence[str], text: str) -> str:
  """The first --config... argument of argv whose dotted name ends in a word of `text`, else
  the --config= argument, else '--config'."""
  words = {w.strip("'\"?.,") for w in text.split()}
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("config.") and name.rsplit(".", 1)[-1] in words:
      return arg
  return next((a for a in argv[1:] if a.startswith("--config=")), "--config")


def _config_error_message(argv: Sequence[str], error: BaseException) -> str:
  """One line naming the argument for an error that a config file or override raised."""
  if isinstance(error, flags.Error):
    text = str(error)
    if "Traceback (most recent call last)" in text:  # config_flags embeds the config's traceback
      head = text.split(": Error whilst parsing config file", 1)[0]
      return f"{head}: {text.strip().splitlines()[-1].strip()}"  # the exception's own line
    return one_line(text) + " (--helpshort lists the flags)"
  if isinstance(error, OSError):  # config_flags could not load the file
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{_flag_naming(argv, '')}: {lines[-1] if lines else error}"
  # A misspelt field: ml_collections' KeyError message, quoted and escaped inside another error.
  message = str(error.args[0] if error.args else error)
  message = message.replace("\\'", "'").replace('\\"', '"').replace("\\n", " ")
  while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
    message = message[1:-1]
  return f"{_flag_naming(argv, message)}: {type(error).__name__}: {one_line(message)}"


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses invalid sampler and IPR settings (ValueError naming the field and value), as the
  sampler would read them: before a binary restores or compiles anything."""
  from ipr_jax import sampling  # pylint: disable=g-import-not-at-top

  if "sampler" in config:
    sampling.SamplerConfig(**config.sampler.to_dict())
  if "ipr" in config:
    sampling.IPRConfig(**config.ipr.to_dict())


def resolve_config_args(argv: Sequence[str]) -> list[str]:
  """argv with the value of --config (`--config=V` or `--config V`) resolved by
  `config_base.resolve_config_spec`: a packaged config's name (`mnist_sudoku:demo`) becomes its
  file's path. Raises errors.ConfigError for a name that is no packaged config."""
  from ipr_jax import config_base  # pylint: disable=g-import-not-at-top

  resolved = list(argv[:1])
  args = list(argv[1:])
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--":
      resolved.extend(args[i:])
      break
    name, equals, value = arg.partition("=")
    if name in ("--config", "-config") and equals:
      arg = f"{name}={config_base.resolve_config_spec(value)}"
    elif arg in ("--config", "-config") and i + 1 < len(args):
      resolved.append(arg)
      i += 1
      arg = config_base.resolve_config_spec(args[i])
    resolved.append(arg)
    i += 1
  return resolved


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, plus the config's loading and checks; a mistake: one line, EXIT_USAGE.

  A packaged config's name as --config (`mnist_sudoku:demo`) is resolved to its file first
  (`resolve_config_args`). The --config file is loaded here (config_flags otherwise reports a
  missing file only when the config is first read) and checked with `check_config`.
  """
  try:
    argv = resolve_config_args(argv)
  except errors.ConfigError as e:
    if verbose_in(argv):
      raise
    fail(str(e))
  try:
    remaining = flags.FLAGS(argv)
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None:
      config.keys()  # a file that failed to load raises here
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    if verbose_in(argv):
      raise
    fail(_config_error_message(argv, e))
  if config is not None:
    try:
      check_config(config)
    except ValueError as e:
      if verbose_in(argv):
        raise
      fail(f"{_flag_naming(argv, str(e))}: {e}")
  return remaining


def run(
    main: Callable[[list[str]], None], user_errors: tuple[type[BaseException], ...] = ()
) -> None:
  """app.run(main) with `parse_flags`, a --verbose flag, and one line for a user error."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the traceback of an error (else one line).")
  user = (FileNotFoundError, errors.ConfigError, *user_errors)

  def guarded(argv):
    try:
      return main(argv)
    except user as e:
      if flags.FLAGS.verbose or flags.FLAGS.verbosity >= 1:
        raise
      fail(f"{e}{_TRACEBACK_HINT}")

  app.run(guarded, flags_parser=parse_flags)
