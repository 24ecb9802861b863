"""The four real-sample readers, end to end: shipped sample → CLI/TFDS build → data source.

Every value is checked against the raw files read independently here (tifffile, h5py, numpy).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tifffile

from input_pipeline import builders, prepare
from input_pipeline.dataset_spec import DataError
from input_pipeline.datasets import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = REPO / "input_pipeline" / "samples"
TREESAT = SAMPLES / "TreeSatAI-TS"
PASTIS = SAMPLES / "PASTIS"
FLAIR_FAKE = SAMPLES / "FLAIR" / "torchgeo_fake_flair2"
FLAIR_REAL = SAMPLES / "FLAIR" / "real_aerial"
S1F = SAMPLES / "Sen1Floods11"
HAND = S1F / "v1.1" / "data" / "flood_events" / "HandLabeled"
TILE = "Abies_alba_1_1005_WEFL_NLF"


def _doy(yyyymmdd: str) -> int:
  return datetime.datetime.strptime(yyyymmdd, "%Y%m%d").timetuple().tm_yday


def _tif_chw(path: pathlib.Path) -> np.ndarray:
  x = tifffile.imread(path)
  return x[None] if x.ndim == 2 else (np.moveaxis(x, -1, 0) if x.shape[-1] < x.shape[0] else x)


def _build(capsys, dataset: str, manual_dir: pathlib.Path, data_dir: pathlib.Path,
           *flags: str) -> str:
  rc = prepare.main([dataset, f"--manual_dir={manual_dir}", f"--data_dir={data_dir}", *flags])
  out = capsys.readouterr()
  assert rc == 0, out.err
  return out.out


def _examples(name: str, data_dir: pathlib.Path) -> dict[str, dict[str, dict]]:
  """split → example name → example, read back through the TFDS data source."""
  sources = builders.data_sources(name, str(data_dir))
  return {split: {ex["name"].decode(): ex for ex in (src[i] for i in range(len(src)))}
          for split, src in sources.items()}


def test_treesatai_ts(tmp_path, capsys, monkeypatch):
  system_tmp = tmp_path / "system_tmp"
  system_tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
  out = _build(capsys, "treesatai_ts", TREESAT, tmp_path)
  assert "train: 1 examples" in out and "val: 0 examples" in out
  assert list(system_tmp.iterdir()) == []  # The build leaves nothing in the system temp folder.
  ex = _examples("treesatai_ts", tmp_path)["train"][TILE]
  np.testing.assert_array_equal(ex["aerial"], _tif_chw(TREESAT / "aerial" / f"{TILE}.tif"))
  assert ex["aerial"].shape == (4, 304, 304) and ex["aerial"].dtype == np.float32
  with h5py.File(TREESAT / "sentinel" / f"{TILE}.h5", "r") as f:
    s2, s2_products = f["sen-2-data"][()], f["sen-2-products"][()]
    s1_products = f["sen-1-asc-products"][()]
  assert ex["s2"].shape == (146, 10, 6, 6)
  assert ex["s2"][37, 4, 2, 5] == s2[37, 4, 2, 5]
  np.testing.assert_array_equal(ex["s2"], s2)
  assert s2_products[0].startswith(b"S2A_MSIL2A_20200102T") and ex["s2_dates"][0] == 2
  np.testing.assert_array_equal(
      ex["s2_dates"], [_doy(p.decode().split("_")[2][:8]) for p in s2_products])
  twin = np.load(TREESAT / "s1-asc" / f"{TILE}.npy")  # np.save copy of the .pth tensor.
  np.testing.assert_array_equal(ex["s1-asc"], twin[:, :2])
  assert s1_products[0].startswith(b"S1A_IW_GRDH_1SDV_20200103T") and ex["s1-asc_dates"][0] == 3
  assert ex["s1-asc_dates"].shape == (60,) and ex["s1-asc_dates"].dtype == np.int32
  np.testing.assert_array_equal(ex["label"], np.eye(15, dtype=np.float32)[0])  # Abies


def test_treesatai_label_rule():
  from input_pipeline.datasets import treesatai_ts

  y = treesatai_ts.multi_hot([["Betula", 0.73], ["Quercus", 0.04], ["Picea", 0.10],
                              ["Larix", 0.07]])
  assert [treesatai_ts.GENERA[i] for i in np.flatnonzero(y)] == ["Betula", "Picea"]


@pytest.fixture(scope="module")
def pastis_with_spot(tmp_path_factory) -> pathlib.Path:
  """The PASTIS sample plus ``samples.generate``'s fake SPOT tiles in the PASTIS-HD layout."""
  from input_pipeline.samples import generate

  root = tmp_path_factory.mktemp("pastis") / "PASTIS"
  shutil.copytree(PASTIS, root)
  generate.generate("pastis_hd_spot", str(root))
  return root


def test_pastis_hd(tmp_path, capsys, pastis_with_spot):
  out = _build(capsys, "pastis_hd", pastis_with_spot, tmp_path)
  assert all(f"{s}: {n} examples" in out for s, n in (("train", 5), ("val", 2), ("test", 2)))
  splits = _examples("pastis_hd", tmp_path)
  assert set(splits["val"]) == {"20275", "20534"} and set(splits["test"]) == {"20213", "30336"}
  meta = {str(f["properties"]["ID_PATCH"]): f["properties"]
          for f in json.loads((PASTIS / "metadata.geojson").read_text())["features"]}
  for pid, ex in splits["train"].items():
    np.testing.assert_array_equal(ex["s2"], np.load(PASTIS / "DATA_S2" / f"S2_{pid}.npy"))
    np.testing.assert_array_equal(ex["s1"], np.load(PASTIS / "DATA_S1A" / f"S1A_{pid}.npy"))
    target = np.load(PASTIS / "ANNOTATIONS" / f"TARGET_{pid}.npy")
    np.testing.assert_array_equal(ex["label"], target[0])
    assert ex["label"].dtype == np.int32
    np.testing.assert_array_equal(
        ex["spot"], _tif_chw(pastis_with_spot / "DATA_SPOT" / "PASTIS_SPOT6_RVB_1M00_2019" /
                             f"SPOT6_RVB_1M00_2019_{pid}.tif"))
    for mod, column in (("s2", "dates-S2"), ("s1", "dates-S1A")):
      days = [_doy(str(d)) for _, d in sorted(meta[pid][column].items(), key=lambda kv: int(kv[0]))]
      np.testing.assert_array_equal(ex[mod + "_dates"], days)
  assert splits["val"]["20275"]["s2_dates"].tolist() == [260, 265, 270]  # 2018-09-17 ...


def test_pastis_hd_cls_without_spot(tmp_path, capsys):
  out = _build(capsys, "pastis_hd_cls", PASTIS, tmp_path, "--modalities=s2,s1")
  assert "pastis_hd_cls_s2_s1" in out
  for split in _examples("pastis_hd_cls_s2_s1", tmp_path).values():
    for pid, ex in split.items():
      assert "spot" not in ex
      classes = set(np.unique(np.load(PASTIS / "ANNOTATIONS" / f"TARGET_{pid}.npy")[0]))
      want = np.zeros(18, np.float32)
      want[[c - 1 for c in classes - {0, 19}]] = 1
      np.testing.assert_array_equal(ex["label"], want)


def test_flair_fake_flair2(tmp_path, capsys):
  out = _build(capsys, "flair", FLAIR_FAKE, tmp_path)
  assert "train: 2 examples" in out
  train = _examples("flair", tmp_path)["train"]
  assert set(train) == {"IMG_273729", "IMG_660532"}
  sen = FLAIR_FAKE / "flair_sen_train" / "D346_2018" / "Z12_IE" / "sen"
  data = np.load(sen / "SEN2_sp_D346_2018_Z12_IE_data.npy")
  centroids = json.loads((FLAIR_FAKE / "flair-2_centroids_sp_to_patch.json").read_text())
  for name, ex in train.items():
    n = name.split("_")[1]
    img = FLAIR_FAKE / "flair_aerial_train" / "D346_2018" / "Z12_IE" / "img" / f"{name}.tif"
    np.testing.assert_array_equal(ex["aerial-flair"], _tif_chw(img))
    assert ex["aerial-flair"].shape == (5, 32, 32)  # The fake sample: 32 px, not resized.
    r, c = centroids[f"{name}.tif"]
    np.testing.assert_array_equal(ex["s2"], data[:, :, r - 5:r + 5, c - 5:c + 5])
    np.testing.assert_array_equal(ex["s2_dates"], [_doy("20210415")] * 2)
    msk = tifffile.imread(FLAIR_FAKE / "flair_labels_train" / "D346_2018" / "Z12_IE" / "msk" /
                          f"MSK_{n}.tif")
    np.testing.assert_array_equal(ex["label"], np.minimum(msk.astype(np.int32), 13) - 1)
    assert ex["label"].min() >= 0 and ex["label"].max() <= 12


def test_flair_real_aerial(tmp_path, capsys):
  _build(capsys, "flair", FLAIR_REAL, tmp_path, "--modalities=aerial-flair")
  splits = _examples("flair_aerial_flair", tmp_path)
  for split, name, domain, zone, codes in (
      ("train", "IMG_036294", "D055_2018", "Z2_UF", {2, 5, 7, 8, 10}),
      ("test", "IMG_084558", "D036_2020", "Z17_UA", {2, 3, 8, 10})):
    ex = splits[split][name]
    assert "s2" not in ex and ex["aerial-flair"].shape == (5, 512, 512)
    aerial = "flair_aerial_train" if split == "train" else "flair_2_aerial_test"
    np.testing.assert_array_equal(ex["aerial-flair"],
                                  _tif_chw(FLAIR_REAL / aerial / domain / zone / "img" /
                                           f"{name}.tif"))
    assert set(np.unique(ex["label"])) == {c - 1 for c in codes}


def test_sen1floods11(tmp_path, capsys):
  out = _build(capsys, "sen1floods11", S1F, tmp_path)
  assert "test: 1 examples" in out
  ex = _examples("sen1floods11", tmp_path)["test"]["Spain_7370579"]
  s2 = tifffile.imread(HAND / "S2Hand" / "Spain_7370579_S2Hand.tif")  # band-separate (13, H, W)
  np.testing.assert_array_equal(ex["s2"], s2[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]][None])
  assert ex["s2"][0, 7, 100, 200] == s2[8, 100, 200]  # B8A
  vv, vh = tifffile.imread(HAND / "S1Hand" / "Spain_7370579_S1Hand.tif")
  assert ex["s1"].shape == (1, 3, 512, 512)
  np.testing.assert_array_equal(ex["s1"][0, :2], np.stack([vv, vh]))
  np.testing.assert_allclose(ex["s1"][0, 2], np.clip(vv / (vh + 1e-10), -1e4, 1e4), rtol=1e-6)
  assert ex["s2_dates"].tolist() == [_doy("20190918")] and ex["s1_dates"].tolist() == [260]
  label = tifffile.imread(HAND / "LabelHand" / "Spain_7370579_LabelHand.tif")
  np.testing.assert_array_equal(ex["label"], label)
  assert (ex["label"] == -1).sum() == 99 and ex["label"].dtype == np.int32


def test_tfds_data_source_by_name(tmp_path, capsys):
  _build(capsys, "treesatai_ts", TREESAT, tmp_path)
  ds = tfds.data_source("treesatai_ts", data_dir=str(tmp_path))
  assert len(ds["train"]) == 1 and ds["train"][0]["s2"].shape == (146, 10, 6, 6)


@pytest.mark.parametrize("rel", [
    "sentinel/Abies_alba_1_1005_WEFL_NLF.h5",
    "s1-asc/Abies_alba_1_1005_WEFL_NLF.pth",
    "aerial/Abies_alba_1_1005_WEFL_NLF.tif",
])
def test_truncated_file_is_a_data_error(tmp_path, capsys, rel):
  root = tmp_path / "TreeSatAI-TS"
  shutil.copytree(TREESAT, root)
  bad = root / rel
  bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
  with pytest.raises(DataError) as e:
    builders.build(registry.get_spec("treesatai_ts"), str(root), str(tmp_path / "out"))
  assert e.value.path == str(bad) and e.value.example_id == TILE
  rc = prepare.main(["treesatai_ts", f"--manual_dir={root}", f"--data_dir={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert rc == 1 and str(bad) in err and TILE in err


def test_missing_file_is_a_data_error(tmp_path):
  root = tmp_path / "Sen1Floods11"
  shutil.copytree(S1F, root)
  (root / HAND.relative_to(S1F) / "S2Hand" / "Spain_7370579_S2Hand.tif").unlink()
  with pytest.raises(DataError, match="missing file.*Spain_7370579.*S2Hand.tif"):
    builders.build(registry.get_spec("sen1floods11"), str(root), str(tmp_path / "out"))


def test_skip_bad_counts(tmp_path, capsys):
  root = tmp_path / "PASTIS"
  shutil.copytree(PASTIS, root)
  for pid in ("10186", "20213"):  # one train, one test patch
    bad = root / "DATA_S1A" / f"S1A_{pid}.npy"
    bad.write_bytes(bad.read_bytes()[:100])
  assert prepare.main(["pastis_hd", f"--manual_dir={root}", f"--data_dir={tmp_path / 'out'}",
                       "--modalities=s2,s1"]) == 1
  err = capsys.readouterr().err  # The first bad patch met (splits are opened in turn).
  assert "S1A_10186.npy" in err and "'10186'" in err or "S1A_20213.npy" in err and "'20213'" in err
  out = _build(capsys, "pastis_hd", root, tmp_path / "out", "--modalities=s2,s1", "--skip_bad")
  assert "train: 4 examples" in out and "test: 1 examples" in out
  assert "skipped 2 bad examples" in out
  assert "10186" not in _examples("pastis_hd_s2_s1", tmp_path / "out")["train"]


def test_registry():
  assert {"treesatai_ts", "pastis_hd", "pastis_hd_cls", "flair", "sen1floods11"} <= set(
      registry.names())
  with pytest.raises(ValueError, match="unknown dataset"):
    registry.get_spec("nope")
  with pytest.raises(ValueError, match="among"):
    registry.get_spec("flair", ["spot"])
  spec = registry.get_spec("flair", ["aerial-flair"])
  assert spec.name == "flair_aerial_flair" and list(spec.modalities) == ["aerial-flair"]
  assert registry.reader_accepts(spec, "on_error")


def test_cli_subprocess_without_tensorflow(tmp_path):
  cmd = [sys.executable, "-X", "importtime", "-m", "input_pipeline.prepare", "sen1floods11",
         f"--manual_dir={S1F}", f"--data_dir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "test: 1 examples" in proc.stdout and "train: 0 examples" in proc.stdout
  imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
  assert "tensorflow" not in imported
