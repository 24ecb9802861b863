"""Directory outputs built aside and swapped into place, so a failed write leaves the old one.

A writer builds into ``sibling_tempdir(dest)`` (same parent, hence same file system), checks what
it wrote, then calls ``swap_into_place(tmp, dest)``. POSIX has no atomic exchange of two
directories, so an existing ``dest`` is renamed aside first, the new one renamed in, and the old
one deleted only then; if the second rename fails the old one is renamed back. A reader can
therefore see the old directory, the new one, or (between two renames) none, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def sibling_tempdir(dest: str | os.PathLike, tag: str = 'tmp') -> str:
  """A new empty directory ``<parent>/.<name>.<tag>-XXXXXX`` next to ``dest`` (parent created)."""
  dest = os.path.abspath(os.fspath(dest))
  parent = os.path.dirname(dest)
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(dest)}.{tag}-')


def swap_into_place(new: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Renames directory ``new`` to ``dest``, replacing an existing ``dest`` directory."""
  new, dest = os.fspath(new), os.path.abspath(os.fspath(dest))
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  if not os.path.lexists(dest):
    os.rename(new, dest)
    return
  if not os.path.isdir(dest) or os.path.islink(dest):
    raise FileExistsError(f'{dest} exists and is not a directory; refusing to replace it')
  old = sibling_tempdir(dest, 'old')
  os.rmdir(old)  # Only its unique name is wanted; rename needs the name free.
  os.rename(dest, old)
  try:
    os.rename(new, dest)
  except BaseException:
    os.rename(old, dest)
    raise
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def built_aside(dest: str | os.PathLike) -> Iterator[str]:
  """``with built_aside(dest) as tmp:`` write and check ``tmp``; on a clean exit it replaces
  ``dest`` (``swap_into_place``); on an exception ``dest`` is untouched and ``tmp`` deleted."""
  tmp = sibling_tempdir(dest)
  try:
    yield tmp
    swap_into_place(tmp, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
