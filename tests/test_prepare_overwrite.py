"""``prepare --overwrite`` replaces a build only once the new one is complete."""

from __future__ import annotations

import pathlib
import shutil

import numpy as np

from anysat_jax.io.torch_pickle.reader import load_pth
from anysat_jax.io.torch_pickle.writer import save_pth
from input_pipeline import builders, prepare

SAMPLES = pathlib.Path(__file__).resolve().parents[1] / "input_pipeline" / "samples"
TREESAT = SAMPLES / "TreeSatAI-TS"
TILE = "Abies_alba_1_1005_WEFL_NLF"


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def _prepare(capsys, manual_dir: pathlib.Path, data_dir: pathlib.Path, *flags: str
             ) -> tuple[int, str]:
  rc = prepare.main(["treesatai_ts", f"--manual_dir={manual_dir}", f"--data_dir={data_dir}",
                     *flags])
  return rc, capsys.readouterr().err


def _s1(data_dir: pathlib.Path) -> np.ndarray:
  source = builders.data_sources("treesatai_ts", str(data_dir))["train"]
  return source[0]["s1-asc"]


def test_overwrite_keeps_the_old_build_until_the_new_one_is_complete(tmp_path, capsys):
  data_dir, build = tmp_path / "data", tmp_path / "data" / "treesatai_ts" / builders.VERSION
  assert _prepare(capsys, TREESAT, data_dir)[0] == 0
  before, entries = _files(build), sorted(p.name for p in data_dir.iterdir())
  s1 = load_pth(TREESAT / "s1-asc" / f"{TILE}.pth")[:, :2]
  np.testing.assert_array_equal(_s1(data_dir), s1)

  rc, err = _prepare(capsys, TREESAT, data_dir)                 # Exists, no --overwrite.
  assert rc == 1 and "exists" in err

  broken = tmp_path / "broken"                                   # A tile that fails the build.
  shutil.copytree(TREESAT, broken)
  (broken / "s1-asc" / f"{TILE}.pth").write_bytes(b"not a checkpoint")
  rc, err = _prepare(capsys, broken, data_dir, "--overwrite")
  assert rc == 1 and f"{TILE}.pth" in err and "not a zip archive" in err
  assert _files(build) == before                                 # The old build is intact,
  assert sorted(p.name for p in data_dir.iterdir()) == entries   # no temporaries left,
  np.testing.assert_array_equal(_s1(data_dir), s1)               # and still reads.

  changed = tmp_path / "changed"                                 # A good build replaces it.
  shutil.copytree(TREESAT, changed)
  save_pth(changed / "s1-asc" / f"{TILE}.pth", 2 * load_pth(TREESAT / "s1-asc" / f"{TILE}.pth"))
  rc, err = _prepare(capsys, changed, data_dir, "--overwrite")
  assert rc == 0, err
  np.testing.assert_array_equal(_s1(data_dir), 2 * s1)
  assert sorted(p.name for p in data_dir.iterdir()) == entries
  assert sorted(p.name for p in (data_dir / "treesatai_ts").iterdir()) == [builders.VERSION]
