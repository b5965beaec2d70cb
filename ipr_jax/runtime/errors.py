"""The errors a user can fix: a bad setting, input file or checkpoint, or a machine fault.

`ConfigError` is a ValueError (library callers that catch ValueError keep working). The binaries
(`ipr_jax.build.cli`) report it, and FileNotFoundError, in one line without a traceback; every other
exception, JAX's own shape and type errors included, keeps its traceback, since it is a bug to
look into rather than a value to change.

`StorageError` is the machine's own fault: a path that should be a writable directory is a file,
is read-only, or its disk is full. The binaries report it in one line naming the path and what to
do (exit status `cli.EXIT_STORAGE`). `storage_error` recognises such a fault in an OSError, or in
the ValueError that tensorstore (Orbax's writer) raises for one, through the exception's causes.
"""

import errno
import re
from typing import Optional


class ConfigError(ValueError):
  """A setting, input file or checkpoint that cannot be used; the message names the value."""


class StorageError(OSError):
  """A directory the run must write cannot be written (a file, read-only, or a full disk); the
  message names the path and what to do."""

  def __str__(self) -> str:
    return str(self.strerror) if self.strerror else super().__str__()


# errno -> (what it means, what to do).
_NO_SPACE = ("no space left on the device", "free space there or use another --workdir")
_READ_ONLY = ("not writable", "make it writable or use another --workdir")
_NOT_A_DIR = ("a file where a directory is needed", "give a directory (or a new path) as --workdir")
STORAGE_ERRNOS = {
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or use another --workdir"),
    errno.EFBIG: (
        "a file grew past the size limit of the file system or of the process (ulimit -f)",
        "use another --workdir or raise the limit",
    ),
    errno.EROFS: ("on a read-only file system", _READ_ONLY[1]),
    errno.EACCES: ("not writable (permission denied)", _READ_ONLY[1]),
    errno.EPERM: ("not writable (operation not permitted)", _READ_ONLY[1]),
    errno.ENOTDIR: _NOT_A_DIR,
    errno.EEXIST: ("a file where a directory is needed", _NOT_A_DIR[1]),
}
# What tensorstore's messages say of an OS error (it raises ValueError, not OSError).
_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "Operation not permitted": errno.EPERM,
    "Not a directory": errno.ENOTDIR,
}
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def _fault(exc: BaseException) -> Optional[tuple[int, Optional[str]]]:
  """(errno, path or None) of a storage fault that `exc` or one of its causes is, else None."""
  seen: set[int] = set()
  current: Optional[BaseException] = exc
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, StorageError):
      return None  # already described
    if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
      return current.errno, current.filename
    if isinstance(current, (ValueError, RuntimeError)):
      text = str(current)
      code = _OS_ERROR_CODE.search(text)
      number = int(code.group(1)) if code else None
      if number not in STORAGE_ERRNOS:
        number = next((n for t, n in _TEXTS.items() if t in text), None)
      if number is not None:
        paths = _QUOTED_PATH.findall(text)
        return number, paths[-1] if paths else None
    current = current.__cause__ or current.__context__
  return None


def storage_error(
    exc: BaseException,
    path: Optional[str] = None,
    doing: str = "",
    default_path: Optional[str] = None,
) -> Optional[StorageError]:
  """A StorageError describing `exc` if it (or a cause) is a storage fault, else None.

  Args:
    exc: the exception raised by a write (OSError, or tensorstore's ValueError).
    path: the path to name (default: the one the exception names).
    doing: what was being written, e.g. "saving the checkpoint of step 4".
    default_path: the path to name if neither `path` nor the exception names one (e.g. the
      run's --workdir).
  """
  found = _fault(exc)
  if found is None:
    return None
  number, named = found
  where = path or named or default_path or "the run directory"
  meaning, action = STORAGE_ERRNOS[number]
  if number in (errno.ENOTDIR, errno.EEXIST) and named and path and named != path:
    where = named
  doing = f" while {doing}" if doing else ""
  error = StorageError(number, f"{where}: {meaning}{doing}; {action}, then rerun")
  error.filename = where
  return error


def check_writable_dir(path, flag: str = "--workdir") -> None:
  """Creates directory `path` (and its parents) if needed and checks that a file can be written
  in it, before a run spends time on work it could not save.

  Raises:
    StorageError: `path` is a file (or under one), read-only, or on a full disk.
  """
  import os  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    error = StorageError(
        errno.ENOTDIR, f"{path}: is a file, not a directory; give a directory as {flag}"
    )
    error.filename = str(path)
    raise error
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".ipr_jax_write_test.", dir=path)
    try:
      os.write(fd, b"\0" * 4096)
      os.fsync(fd)
    finally:
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    found = storage_error(e, str(path), f"checking that {flag}={path} can be written")
    if found is None:
      raise
    raise found from e
