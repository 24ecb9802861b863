"""io.directories: a folder is replaced whole or not at all."""

from __future__ import annotations

import os
import pathlib

import pytest

from anysat_jax.io import directories


def _tree(folder) -> dict[str, str]:
  return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def test_built_aside_replaces_only_on_success(tmp_path):
  dest = tmp_path / "out"
  with directories.built_aside(dest) as tmp:               # New: created.
    assert pathlib.Path(tmp).parent == tmp_path and pathlib.Path(tmp).name.startswith(".out.tmp-")
    (pathlib.Path(tmp) / "a.txt").write_text("1")
  assert _tree(dest) == {"a.txt": "1"}
  with pytest.raises(RuntimeError, match="disk full"), directories.built_aside(dest) as tmp:
    (pathlib.Path(tmp) / "b.txt").write_text("2")
    raise RuntimeError("disk full")
  assert _tree(dest) == {"a.txt": "1"}                      # Failed: untouched.
  with directories.built_aside(dest) as tmp:                # Existing: replaced whole.
    (pathlib.Path(tmp) / "b.txt").write_text("2")
  assert _tree(dest) == {"b.txt": "2"}
  assert sorted(os.listdir(tmp_path)) == ["out"]            # No temporaries left.


def test_swap_puts_the_old_folder_back_if_the_new_one_cannot_move_in(tmp_path, monkeypatch):
  dest, new = tmp_path / "out", tmp_path / "new"
  dest.mkdir()
  (dest / "a.txt").write_text("old")
  new.mkdir()
  rename, calls = os.rename, []

  def failing_second_rename(src, dst):
    calls.append((src, dst))
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    rename(src, dst)
  monkeypatch.setattr(os, "rename", failing_second_rename)
  with pytest.raises(OSError, match="No space left"):
    directories.swap_into_place(new, dest)
  monkeypatch.undo()
  assert _tree(dest) == {"a.txt": "old"}
  assert sorted(os.listdir(tmp_path)) == ["new", "out"]


def test_swap_refuses_to_replace_a_file(tmp_path):
  (tmp_path / "out").write_text("mine")
  (tmp_path / "new").mkdir()
  with pytest.raises(FileExistsError, match="not a directory"):
    directories.swap_into_place(tmp_path / "new", tmp_path / "out")
  assert (tmp_path / "out").read_text() == "mine"
