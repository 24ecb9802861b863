"""Atomic replacement of an output file: write a temporary sibling, check it reached the disk,
then rename it over the target, so a failed write never leaves a truncated or half-replaced
file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


def check_output(path: str | os.PathLike, inputs: list[str | os.PathLike],
                 overwrite: bool = False) -> str:
  """The absolute output path, refused when it is one of ``inputs`` (same file or same path)
  or when it exists and ``overwrite`` is not set."""
  path = os.path.abspath(os.fspath(path))
  for src in inputs:
    src = os.fspath(src)
    same = os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src)
    if same or os.path.realpath(src) == os.path.realpath(path):
      raise ValueError(f"the output {path} is the input {src}; write elsewhere")
  if os.path.isdir(path):
    raise ValueError(f"the output {path} is a directory")
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"the output {path} exists; pass --overwrite to replace it")
  return path


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside ``path`` (same suffix) to write; when the block succeeds,
  fsyncs it (a full disk raises here, not later) and renames it over ``path``; on any error
  removes it and leaves ``path`` as it was."""
  path = os.path.abspath(os.fspath(path))
  folder, name = os.path.split(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{os.path.splitext(name)[1]}",
                             dir=folder)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)        # mkstemp makes it private; give the usual mode
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
