"""The synthetic-sample generator and the readers of PLANTED, S2NAIP-Urban, BraDD-S1TS, SICKLE
and TimeSen2Crop, end to end: generate → read → compare with the raw files read independently.
"""

from __future__ import annotations

import codecs
import collections
import csv
import datetime
import hashlib
import json
import pathlib
import pickle
import re
import shutil
import zipfile

import numpy as np
import pytest
import tifffile
from PIL import Image

from anysat_jax.core import dates
from input_pipeline.dataset_spec import DataError, check_example
from input_pipeline.datasets import pastis_hd, planted, registry, s2naip_urban
from input_pipeline.samples import generate

REPO = pathlib.Path(__file__).resolve().parents[1]
PASTIS = REPO / "input_pipeline" / "samples" / "PASTIS"
NUM = {"planted": 2, "s2naip_urban": 2, "bradd_s1ts": 2, "sickle": 3, "timesen2crop": 6}


def _doy(d: datetime.date | str) -> int:
  if isinstance(d, str):
    d = datetime.datetime.strptime(d, "%Y%m%d")
  return d.timetuple().tm_yday


def _read(name: str, root: pathlib.Path, split: str, modalities: tuple[str, ...] | None = None,
          **kwargs) -> dict[str, dict]:
  """key → example, every example checked against the reader contract."""
  spec = registry.get_spec(name, modalities)
  out = {}
  for key, ex in spec.read(str(root), split, **kwargs):
    check_example(spec, key, ex)
    assert ex["name"] == key and key not in out
    out[key] = ex
  return out


def _ratio(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
  return np.clip(a.astype(np.float32) / (b.astype(np.float32) + np.float32(eps)), -1e4, 1e4)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Each dataset generated once (seed 0), read-only for the tests."""
  out = {}
  for name, num in NUM.items():
    out[name] = tmp_path_factory.mktemp(name)
    generate.generate(name, str(out[name]), seed=0, num=num)
  return out


# ---------------------------------------------------------------------------------------------
# PLANTED.


def test_planted(roots):
  root = roots["planted"]
  for split in ("train", "val", "test"):
    labels = json.loads((root / split / "labels2.json").read_text())
    examples = _read("planted", root, split)
    assert list(examples) == list(labels)
    for sid, ex in examples.items():
      assert ex["label"] == labels[sid] and ex["label"].dtype == np.int32
      for mod in ("s2", "s1", "l7", "alos", "modis"):
        raw = np.load(root / split / sid / f"{sid}_{mod}.npz")["arr_0"]
        mask = np.load(root / split / sid / f"{sid}_{mod}_mask.npz")["arr_0"]
        ms = np.load(root / split / sid / f"{sid}_{mod}_timestamp.npz")["arr_0"]
        days = [datetime.datetime.fromtimestamp(m / 1000, datetime.UTC).timetuple().tm_yday
                for m in ms.tolist()]
        np.testing.assert_array_equal(ex[mod + "_dates"], days)
        if mod in ("s1", "alos"):
          want = np.stack([raw[..., 0], raw[..., 1], _ratio(raw[..., 0], raw[..., 1], 1e-10)], 1)
          want_valid = np.stack([mask[..., 0], mask[..., 1], mask[..., 0] & mask[..., 1]], 1)
        else:
          want, want_valid = raw.transpose(0, 3, 1, 2), mask.transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(ex[mod], want)
        np.testing.assert_array_equal(ex[mod + "_valid"], want_valid)
      # One pixel by hand: s2 B4 (channel 2) at date 1, row 3, column 5.
      raw = np.load(root / split / sid / f"{sid}_s2.npz")["arr_0"]
      assert ex["s2"][1, 2, 3, 5] == raw[1, 3, 5, 2]
  # The fake data has gaps (cloudy dates, SLC-off stripes) and label structure per class.
  ex = next(iter(_read("planted", root, "train").values()))
  assert 0 < ex["s2_valid"].mean() < 1 and 0 < ex["l7_valid"].mean() < 1
  assert set(_read("planted", root, "train", modalities=("s2",))[ex["name"]]) == {
      "name", "label", "s2", "s2_dates", "s2_valid"}


def test_utc_day_of_year():
  stamps = ["2020-12-31T23:30:00", "2021-01-01T00:30:00", "2020-02-29T12:00:00",
            "1969-12-31T12:00:00"]
  ms = [int(datetime.datetime.fromisoformat(s).replace(tzinfo=datetime.UTC).timestamp() * 1000)
        for s in stamps]
  np.testing.assert_array_equal(dates.utc_day_of_year(np.array(ms)), [366, 1, 60, 365])


def test_planted_ratio_clipped():
  x = np.array([[5.0, 0.0], [-3.0, 2.0], [0.0, 0.0]], np.float32).reshape(3, 2, 1, 1)
  valid = np.array([[1, 1], [1, 0], [1, 1]], np.uint8).reshape(3, 2, 1, 1)
  out, out_valid = planted.ratio_channels(x, valid)
  np.testing.assert_allclose(out[:, 2, 0, 0], [1e4, -1.5, 0.0])
  np.testing.assert_array_equal(out_valid[:, 2, 0, 0], [1, 0, 1])


# ---------------------------------------------------------------------------------------------
# S2NAIP-Urban.


def _up2(x: np.ndarray) -> np.ndarray:
  """Exact 2x bilinear upsampling (align_corners=False) of the last two axes."""
  for axis in (-1, -2):
    n = x.shape[axis]
    i = np.arange(n)
    even = 0.75 * x + 0.25 * np.take(x, np.maximum(i - 1, 0), axis)
    odd = 0.75 * x + 0.25 * np.take(x, np.minimum(i + 1, n - 1), axis)
    shape = list(x.shape)
    shape[axis] = 2 * n
    x = np.stack([even, odd], axis=axis).reshape(shape)
  return x


def test_bilinear_matches_torch():
  # torch.nn.functional.interpolate(x, size=4, mode="bilinear", align_corners=False).
  x = np.array([[0.0, 1.0], [2.0, 3.0]])
  want = [[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5],
          [2.0, 2.25, 2.75, 3.0]]
  np.testing.assert_allclose(s2naip_urban.upsample_bilinear(x, 4), want)
  y = np.random.default_rng(0).uniform(size=(3, 32, 32))
  np.testing.assert_allclose(s2naip_urban.upsample_bilinear(y, 64), _up2(y), atol=1e-6)


def test_s2naip_urban(roots):
  root = roots["s2naip_urban"]
  for split in ("train", "val"):
    table = json.loads((root / f"{split}_dict.json").read_text())
    examples = _read("s2naip_urban", root, split)
    assert list(examples) == table["name"]
    for i, (name, ex) in enumerate(examples.items()):
      assert "label" not in ex
      naip = np.asarray(Image.open(root / "naip" / f"{name}.png"))
      np.testing.assert_array_equal(ex["naip"], naip.transpose(2, 0, 1))
      t = len(table["s2_dates"][i])
      s2_8 = tifffile.imread(root / "sentinel2" / f"{name}_8.tif").reshape(t, 4, 64, 64)
      s2_16 = tifffile.imread(root / "sentinel2" / f"{name}_16.tif").reshape(t, 6, 32, 32)
      np.testing.assert_array_equal(ex["s2"][:, [0, 1, 2, 6]], s2_8)  # B2 B3 B4 B8
      np.testing.assert_allclose(ex["s2"][:, [3, 4, 5, 7, 8, 9]], _up2(s2_16.astype(np.float64)),
                                 rtol=1e-6)  # B5 B6 B7 B8A B11 B12
      assert ex["s2"][2, 6, 10, 20] == s2_8[2, 3, 10, 20]  # B8 of date 2, by hand.
      t = len(table["l8_dates"][i])
      pan = tifffile.imread(root / "landsat" / f"{name}_8.tif")
      l8 = tifffile.imread(root / "landsat" / f"{name}_16.tif").reshape(t, 10, 32, 32)
      np.testing.assert_array_equal(ex["l8"][:, 0], pan)
      np.testing.assert_allclose(ex["l8"][:, 1:], _up2(l8.astype(np.float64)), rtol=1e-6)
      t = len(table["s1_dates"][i])
      s1 = tifffile.imread(root / "sentinel1" / f"{name}.tif").reshape(t, 2, 64, 64)
      np.testing.assert_array_equal(ex["s1"][:, :2], s1)
      np.testing.assert_allclose(ex["s1"][:, 2], _ratio(s1[:, 0], s1[:, 1], 1e-10), rtol=1e-6)
      for mod in ("s2", "s1", "l8"):
        np.testing.assert_array_equal(ex[mod + "_dates"],
                                      [_doy(d) for d in table[mod + "_dates"][i]])


# ---------------------------------------------------------------------------------------------
# BraDD-S1TS.


class _RawTorchUnpickler(pickle.Unpickler):
  """An independent reader of the generated ``torch.save`` archives (numpy tensors)."""

  def __init__(self, zf: zipfile.ZipFile, prefix: str):
    super().__init__(zf.open(f"{prefix}/data.pkl"))
    self.zf, self.prefix = zf, prefix

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return lambda storage, offset, size, stride, *_: np.lib.stride_tricks.as_strided(
          storage[offset:], size, [s * storage.itemsize for s in stride]).copy()
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("datetime", "datetime"):
      return datetime.datetime
    if (module, name) == ("_codecs", "encode"):  # How protocol 2 stores a datetime's bytes.
      return codecs.encode
    if module == "torch":
      return {"FloatStorage": np.float32, "ByteStorage": np.uint8}[name]
    raise pickle.UnpicklingError(f"{module}.{name}")

  def persistent_load(self, pid):
    kind, dtype, key, location, numel = pid
    assert (kind, location) == ("storage", "cpu")
    return np.frombuffer(self.zf.read(f"{self.prefix}/data/{key}"), dtype)[:numel]


def test_bradd_s1ts(roots):
  root = roots["bradd_s1ts"]
  with open(root / "meta.csv", newline="") as f:
    meta = list(csv.DictReader(f))
  for split, close_set in (("train", "train"), ("val", "validation"), ("test", "test")):
    examples = _read("bradd_s1ts", root, split)
    files = [r["file"] for r in meta if r["close_set"] == close_set]
    assert list(examples) == [f.removesuffix(".pt") for f in files]
    for file, (key, ex) in zip(files, examples.items(), strict=True):
      with zipfile.ZipFile(root / "Samples" / file) as zf:
        assert {f"{key}/data.pkl", f"{key}/version", f"{key}/byteorder"} <= set(zf.namelist())
        raw = _RawTorchUnpickler(zf, key).load()
      image, label = raw["image"], raw["label"]
      assert image.shape[1:] == (2, 48, 48) and label.shape == (2, 48, 48)
      np.testing.assert_array_equal(ex["s1"][:, :2], image)
      np.testing.assert_allclose(ex["s1"][:, 2], _ratio(image[:, 0], image[:, 1], 1e-6),
                                 rtol=1e-6)
      np.testing.assert_array_equal(ex["label"], label[1])
      assert 0 < ex["label"].mean() < 1 and not label[0].any()
      assert all(type(d) is datetime.datetime for d in raw["image_dates"] + raw["label_dates"])
      days = [d.timetuple().tm_yday for d in raw["image_dates"]]
      np.testing.assert_array_equal(ex["s1_dates"], days)
      # The change is visible: VH drops inside the deforested area by the last date.
      last = ex["s1"][-1, 1]
      assert last[ex["label"] == 1].mean() < 0.7 * last[ex["label"] == 0].mean()


def test_day_of_year_formats():
  """The one date parser of the readers: date objects, ISO, YYYYMMDD, names holding a date."""
  for d in (datetime.date(2020, 3, 1), datetime.datetime(2020, 3, 1, 13, 5), "2020-03-01",
            "2020-03-01T13:05:00", 20200301, "20200301", b"S2A_MSIL2A_20200301T102421_N0214",
            " 2020-03-01\n"):
    assert dates.day_of_year(d) == 61, d
  assert dates.day_of_year("20211231") == 365 and dates.day_of_year("2020-12-31") == 366
  with pytest.raises(ValueError, match="not a date.*'March'"):
    dates.day_of_year("March")
  with pytest.raises(ValueError, match="not a valid date: '20201301'"):
    dates.day_of_year("20201301")


# ---------------------------------------------------------------------------------------------
# SICKLE.


def _nearest32(x: np.ndarray) -> np.ndarray:
  h, w = x.shape[-2:]
  rows = np.floor(np.arange(32) * h / 32).astype(int)
  cols = np.floor(np.arange(32) * w / 32).astype(int)
  return x[..., rows[:, None], cols]


def _file_day(sensor: str, path: pathlib.Path) -> str:
  if sensor == "L8":
    return re.fullmatch(r"LC08_\d+_(\d{8})", path.stem).group(1)
  return re.search(r"(?:^|_)(\d{8})T", path.stem).group(1)


def test_sickle(roots):
  root = roots["sickle"]
  with open(root / "sickle_dataset_tabular.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  labels_seen = set()
  for split in ("train", "val"):
    split_rows = [r for r in rows if r["SPLIT"] == split]
    plots = {int(r["PLOT_ID"]) for r in split_rows}
    examples = _read("sickle", root, split)
    assert list(examples) == [r["UNIQUE_ID"] for r in split_rows]
    for uid, ex in examples.items():
      mask = tifffile.imread(root / "masks" / "10m" / f"{uid}.tif")
      plot, crop = mask[0].astype(int), mask[1].astype(int)
      want = np.where(crop == 0, -1, np.where(crop == 1, 0, 1))
      want[(plot != 0) & ~np.isin(plot, list(plots))] = -1
      np.testing.assert_array_equal(ex["label"], _nearest32(want))
      labels_seen |= set(np.unique(ex["label"]).tolist())
      for mod, sensor in (("s2", "S2"), ("s1", "S1"), ("l8", "L8")):
        files = sorted((root / "images" / sensor / "npy" / uid).glob("*.npz"),
                       key=lambda p, s=sensor: _file_day(s, p))
        np.testing.assert_array_equal(ex[mod + "_dates"],
                                      [_doy(_file_day(sensor, p)) for p in files])
        for t, path in enumerate(files):
          raw = dict(np.load(path))
          if mod == "s2":  # Projector order: B8 in slot 6, B8A in slot 7; missing band → 0.
            for slot, band in enumerate(("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11",
                                         "B12")):
              want = _nearest32(raw[band]) if band in raw else np.zeros((32, 32))
              np.testing.assert_array_equal(ex["s2"][t, slot], want)
          elif mod == "s1":
            vv, vh = _nearest32(raw["VV"]), _nearest32(raw["VH"])
            np.testing.assert_array_equal(ex["s1"][t, :2], np.stack([vv, vh]))
            np.testing.assert_allclose(ex["s1"][t, 2], _ratio(vv, vh, 1e-6), rtol=1e-6)
          else:
            for slot in range(1, 8):
              np.testing.assert_array_equal(ex["l8"][t, slot], _nearest32(raw[f"SR_B{slot}"]))
            np.testing.assert_array_equal(ex["l8"][t, 9], _nearest32(raw["ST_B10"]))
            assert not ex["l8"][t, [0, 8, 10]].any()
            np.testing.assert_array_equal(ex["l8_valid"][t, :, 0, 0],
                                          [0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0])
  assert labels_seen == {-1, 0, 1}
  # One S2 acquisition of the first sample lacks B12 (as happens in the release): zeros.
  first = _read("sickle", root, "train")[rows[0]["UNIQUE_ID"]]
  assert (~first["s2"][:, 9].any(axis=(1, 2))).sum() == 1
  # The official test loader reads the val rows.
  val, test = _read("sickle", root, "val"), _read("sickle", root, "test")
  assert list(val) == list(test)
  np.testing.assert_array_equal(val[next(iter(val))]["s2"], test[next(iter(test))]["s2"])


# ---------------------------------------------------------------------------------------------
# TimeSen2Crop.


def test_timesen2crop(roots):
  root = roots["timesen2crop"]
  tiles = {"train": {"32TNT", "33UWP"}, "val": {"33TWN"}, "test": {"33UVP"}}
  for split, want_tiles in tiles.items():
    examples = _read("timesen2crop", root, split)
    assert {k.rsplit("_", 2)[0] for k in examples} == want_tiles
    assert len(examples) == NUM["timesen2crop"] * len(want_tiles)
    for key, ex in examples.items():
      tile, label, k = key.rsplit("_", 2)
      with open(root / tile / "dates.csv", newline="") as f:
        days = [_doy(r["acquisition_date"]) for r in csv.DictReader(f)]
      with open(root / tile / label / f"{k}.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B11", "B12", "Flag"]
        raw = np.array([[float(v) for v in row] for row in reader])
      assert ex["label"] == int(label)
      np.testing.assert_array_equal(ex["s2_dates"], days)
      s2 = ex["s2"][:, :, 0, 0]
      np.testing.assert_array_equal(s2[:, [0, 1, 2, 3, 4, 5]], raw[:, :6])  # B2-B7
      np.testing.assert_array_equal(s2[:, 7], raw[:, 6])  # B8A in its own slot
      np.testing.assert_array_equal(s2[:, [8, 9]], raw[:, [7, 8]])  # B11, B12
      assert not s2[:, 6].any()  # B8: not in the dataset
      np.testing.assert_array_equal(ex["s2_valid"][:, :, 0, 0],
                                    np.tile([1, 1, 1, 1, 1, 1, 0, 1, 1, 1], (len(days), 1)))


# ---------------------------------------------------------------------------------------------
# PASTIS-HD SPOT.


def test_pastis_hd_spot_for_the_shipped_sample(tmp_path):
  root = tmp_path / "PASTIS"
  shutil.copytree(PASTIS, root)
  ids = generate.generate("pastis_hd_spot", str(root))
  meta = json.loads((root / "metadata.geojson").read_text())
  assert ids == [str(f["properties"]["ID_PATCH"]) for f in meta["features"]]
  for pid in ids:
    path = root / pastis_hd.SPOT_DIR / f"SPOT6_RVB_1M00_2019_{pid}.tif"
    with tifffile.TiffFile(path) as tif:
      page = tif.pages[0]
      rgb = page.asarray()
      assert page.photometric == tifffile.PHOTOMETRIC.RGB and rgb.dtype == np.uint8
      assert page.tags["ModelPixelScaleTag"].value[:2] == (4.0, 4.0)  # 1280 m / 320 px
      assert page.tags["GeoKeyDirectoryTag"].value[-1] == 2154
    s2 = np.load(root / "DATA_S2" / f"S2_{pid}.npy")
    assert rgb.shape == (10 * s2.shape[-2], 10 * s2.shape[-1], 3) == (320, 320, 3)
    # Coloured by the patch's classes: each 10 x 10 block is one class colour (+ texture).
    classes = np.load(root / "ANNOTATIONS" / f"TARGET_{pid}.npy")[0]
    blocks = rgb.reshape(32, 10, 32, 10, 3).mean((1, 3))
    centres = []
    for c in np.unique(classes):
      centres.append(blocks[classes == c].mean(0))
      assert np.abs(blocks[classes == c] - centres[-1]).max() < 45
    gaps = np.abs(np.array(centres)[:, None] - np.array(centres)[None]).max(-1)
    assert (gaps[np.triu_indices(len(centres), 1)] > 0).all()


def test_pastis_hd_spot_without_a_pastis_root(tmp_path):
  (pid,) = generate.generate("pastis_hd_spot", str(tmp_path), seed=3, num=1)
  with tifffile.TiffFile(tmp_path / pastis_hd.SPOT_DIR / f"SPOT6_RVB_1M00_2019_{pid}.tif") as tif:
    assert tif.series[0].shape == (1280, 1280, 3)
    assert tif.pages[0].tags["ModelPixelScaleTag"].value[:2] == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Determinism, CLI and errors.


def _digest(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", [*NUM, "pastis_hd_spot"])
def test_generation_is_deterministic(tmp_path, name):
  num = 1 if name != "timesen2crop" else 2
  digests = []
  for run, seed in enumerate((7, 7, 8)):
    generate.generate(name, str(tmp_path / str(run)), seed=seed, num=num)
    digests.append(_digest(tmp_path / str(run)))
  assert digests[0] == digests[1]
  assert digests[0] != digests[2]


def test_cli(tmp_path, capsys):
  generate.main(["bradd_s1ts", str(tmp_path), "--seed", "2", "--num", "1"])
  assert "bradd_s1ts: wrote 3 examples" in capsys.readouterr().out
  assert len(list((tmp_path / "Samples").glob("*.pt"))) == 3
  with pytest.raises(ValueError, match="unknown dataset"):
    generate.generate("nope", str(tmp_path))


def _victim(name: str, root: pathlib.Path, damage: str) -> tuple[pathlib.Path, str]:
  """A file of a ``train`` example to damage, and that example's id."""
  if name == "planted":
    sid = next(iter(json.loads((root / "train" / "labels2.json").read_text())))
    return root / "train" / sid / f"{sid}_s2.npz", sid
  if name == "s2naip_urban":
    name0 = json.loads((root / "train_dict.json").read_text())["name"][0]
    return root / "sentinel2" / f"{name0}_16.tif", name0
  if name == "bradd_s1ts":
    return root / "Samples" / "sample_00000.pt", "sample_00000"
  if name == "sickle":  # A deleted acquisition is just absent, a deleted mask is an error.
    with open(root / "sickle_dataset_tabular.csv", newline="") as f:
      uid = next(csv.DictReader(f))["UNIQUE_ID"]
    if damage == "delete":
      return root / "masks" / "10m" / f"{uid}.tif", uid
    return next((root / "images" / "S2" / "npy" / uid).glob("*.npz")), uid
  path = next((root / "32TNT").glob("*/*.csv"))
  return path, f"32TNT_{path.parent.name}_{path.stem}"


@pytest.mark.parametrize("name,damage", [(n, d) for n in NUM for d in ("truncate", "delete")
                                         if (n, d) != ("timesen2crop", "delete")])
def test_bad_file_is_a_data_error(roots, tmp_path, name, damage):
  root = tmp_path / name
  shutil.copytree(roots[name], root)
  path, key = _victim(name, root, damage)
  if damage == "truncate":
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  else:
    path.unlink()
  with pytest.raises(DataError) as info:
    _read(name, root, "train")
  assert str(path) in str(info.value) and repr(key) in str(info.value)
  assert info.value.example_id == key
  skipped = []
  good = _read(name, root, "train", on_error=skipped.append)
  assert [e.example_id for e in skipped] == [key] and key not in good and good
