"""Output directories, checked and created before any work.

A command that trains or measures for minutes and only then finds that it
cannot write its result has lost that work; so every command makes the
directory it writes to first, through :func:`make_dir`, and a path that cannot
be one (a file in the way, a read-only or virtual file system such as
``/proc``, no permission) is one error line naming the flag, the path and why.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def check_dir(path: str | os.PathLike, named: str, purpose: str) -> Path:
  """``path`` as a directory to be made: it is not a file, nor below one.

  Args:
    path: the directory.
    named: how the error names it, e.g. ``"--workdir runs/x"``.
    purpose: what the directory is for, e.g. ``"the run directory"``.

  Raises:
    ValueError: naming ``named``, the file in the way, and what is expected.
  """
  if not str(path).strip():
    raise ValueError(f"{named.strip()} is empty: name a directory ({purpose})")
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{named} is a file; expected a directory ({purpose}, created if missing)")
  blocking = next((p for p in path.absolute().parents if p.exists() and not p.is_dir()), None)
  if blocking is not None:
    raise ValueError(f"{named}: {blocking} is a file, so no directory can be made in it")
  return path


def make_dir(path: str | os.PathLike, named: str, purpose: str) -> Path:
  """Checks ``path`` (:func:`check_dir`), creates it with its parents, and writes
  (then removes) a probe file in it: permission bits do not tell (root passes
  ``os.access`` on ``/proc`` and ``/sys``, where no file can be made).

  Raises:
    ValueError: as :func:`check_dir`, or the operating system's reason the
      directory cannot be created or written (no permission, a read-only or
      virtual file system), with the fix.
  """
  path = check_dir(path, named, purpose)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ValueError(
      f"{named}: cannot create the directory {path} ({error.strerror or error}); choose one"
      " you can write to"
    ) from error
  try:
    with tempfile.NamedTemporaryFile(dir=path, prefix=".pixelrnn_jax-probe-"):
      pass
  except OSError as error:
    reason = error.strerror or str(error)
    if error.errno == errno.ENOENT and path.is_dir():  # /proc, /sys: "no such file" misleads
      reason = "it takes no new files: a virtual file system such as /proc or /sys"
    raise ValueError(
      f"{named}: cannot write in the directory {path} ({reason}); choose one you can write to"
    ) from error
  return path
