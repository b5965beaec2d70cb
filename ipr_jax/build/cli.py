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

A fault of the machine (`errors.StorageError`, or an OSError of a full disk, a read-only
directory or a file where a directory should be, also as tensorstore reports it) ends the binary
with one line naming the path and what to do, exit status 74 (EXIT_STORAGE). A run stopped by
SIGTERM or SIGINT before its end (it saved what it had; rerun to resume) exits with status 75
(EXIT_PREEMPTED), so that `train && evaluate` does not evaluate an unfinished model.
"""

import logging as std_logging
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from ipr_jax.runtime import errors

# The exit status of a bad command line or setting (what argparse and absl's usage errors use).
EXIT_USAGE = 2
# The exit status of a machine fault: a full disk, a read-only or missing directory (sysexits.h
# EX_IOERR).
EXIT_STORAGE = 74
# The exit status of a run stopped early by SIGTERM or SIGINT, its work saved: rerun the same
# command to resume (sysexits.h EX_TEMPFAIL, "try again later").
EXIT_PREEMPTED = 75
_TRACEBACK_HINT = " (--verbose shows the traceback)"


def one_line(text: str) -> str:
  """`text` with its lines joined by single spaces."""
  return " ".join(str(text).split())


def fail(message: str, status: int = EXIT_USAGE) -> None:
  """Writes `error: message` as one line to stderr and exits with `status`."""
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(status)


def stopped(message: str) -> None:
  """Writes `message` (a run stopped early, how to resume it) as one line to stderr and exits
  with EXIT_PREEMPTED."""
  sys.stderr.write(f"{one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(EXIT_PREEMPTED)


class QuietOrbax(std_logging.Filter):
  """Drops Orbax's INFO chatter (dozens of lines per save) from the console and the tracebacks
  it (and asyncio, of its tasks) logs of a failed save (the binary reports the error itself, in
  one line); keeps its warnings and errors as lines."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.name == "asyncio" and "orbax" in record.getMessage():
      return False  # "Task exception was never retrieved": a failed save's writes, reported
    if "orbax" not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


# The loggers whose INFO (and DEBUG) lines are the libraries' own business, not the user's: JAX's
# (every run on a machine without a TPU logs "Unable to initialize backend 'tpu': ... libtpu.so"
# when the backends start; CPU and GPU runs do not need one) and those below them.
QUIET_LOGGERS = ("jax", "jaxlib")


class QuietLibraries(std_logging.Filter):
  """Drops the INFO and DEBUG lines of JAX's loggers (`QUIET_LOGGERS`: e.g. "Unable to
  initialize backend 'tpu'" on every machine without one); their warnings and errors stay (a
  GPU that JAX cannot use, a failed compilation)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(record.name == n or record.name.startswith(n + ".") for n in QUIET_LOGGERS)


def quiet_console(verbose: bool) -> None:
  """The binaries' console log: only what the user needs, the binaries' own lines and every
  warning and error (`QuietLibraries`, `QuietOrbax`), unless `verbose` (--verbose, -v 1): then
  the libraries' lines too, JAX's and Orbax's INFO lines and Orbax's tracebacks, as far as absl's
  verbosity lets them through. Either way the dozens of "Event loop is closed" errors after a
  failed Orbax save stay away (the binary reports the failure itself)."""
  handler = logging.get_absl_handler()
  for old in [f for f in handler.filters if isinstance(f, (QuietOrbax, QuietLibraries))]:
    handler.removeFilter(old)
  if not verbose:
    handler.addFilter(QuietLibraries())
    handler.addFilter(QuietOrbax())
  _quiet_closed_event_loops()


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


def _quiet_closed_event_loops() -> None:
  """Drops the "Event loop is closed" errors that tensorstore's callbacks raise, by dozens, as
  unraisable exceptions once a failed Orbax save has closed its event loop (the binary reports
  the failure itself, in one line); any other unraisable exception is printed as before."""
  previous = sys.unraisablehook

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook


def _flag_naming(argv: Sequence[str], text: str) -> str:
  """The last --config... argument of argv whose dotted name ends in a word of `text` (a word
  may be `a.b=value`), else the last --config= argument, else '--config'. The last, since a flag
  given twice takes the value given last."""
  words = {w.strip("'\"?.,:;()") for w in text.split()}
  words |= {w.split("=", 1)[0].rsplit(".", 1)[-1] for w in words}
  for arg in reversed(argv[1:]):
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("config.") and name.rsplit(".", 1)[-1] in words:
      return arg
  return next((a for a in reversed(argv[1:]) if a.startswith("--config=")), "--config")


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


def check_geometry(config: ml_collections.ConfigDict) -> None:
  """Refuses a patch size that does not divide the image size or, for a task of cells (Sudoku:
  `data.cell_size`), is not the cell size, naming the fields and the value expected."""
  from ipr_jax.data import geometry  # pylint: disable=g-import-not-at-top

  data = config.get("data")
  if data is None or "patch_size" not in data or "image_size" not in data:
    return
  cell = data.get("cell_size")
  if cell is not None and data.patch_size != cell:
    raise errors.ConfigError(
        f"data.patch_size={data.patch_size!r} does not fit data.cell_size={cell!r}: "
        f"expected {cell} (one SRM patch per cell)"
    )
  geometry.patch_grid(config)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses invalid sampler and IPR settings (ValueError naming the field and value), as the
  sampler would read them, an unknown flow, and a patch size that does not fit the image
  (`check_geometry`):
  before a binary restores or compiles anything."""
  from ipr_jax import sampling  # pylint: disable=g-import-not-at-top

  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

  check_geometry(config)
  if "task" in config:
    config_base.noise_flow(config)
  if "sampler" in config:
    sampling.SamplerConfig(**config.sampler.to_dict())
  if "ipr" in config:
    sampling.IPRConfig(**config.ipr.to_dict())


def resolve_config_args(argv: Sequence[str]) -> list[str]:
  """argv with the value of --config (`--config=V` or `--config V`) resolved by
  `config_base.resolve_config_spec`: a packaged config's name (`mnist_sudoku:demo`) becomes its
  file's path. Raises errors.ConfigError for a name that is no packaged config."""
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

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
    verbose = lambda: flags.FLAGS.verbose or flags.FLAGS.verbosity >= 1
    quiet_console(verbose())
    try:
      return main(argv)
    except errors.StorageError as e:
      if verbose():
        raise
      fail(str(e), EXIT_STORAGE)
    except user as e:
      if verbose():
        raise
      fail(f"{e}{_TRACEBACK_HINT}")
    except Exception as e:  # pylint: disable=broad-except  (a storage fault in one line)
      workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
      storage = errors.storage_error(e, default_path=workdir and f"a file in {workdir}")
      if storage is None or verbose():
        raise
      fail(str(storage), EXIT_STORAGE)

  app.run(guarded, flags_parser=parse_flags)
