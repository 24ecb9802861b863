"""Feature extraction (``inference.embed``, ``inference.embed_cli``) and the GeoTIFF helpers
(``io.geotiff``).

AnySat attends over the whole tile, so a window's features depend on its context. What tiled
inference promises, and what is tested here: a window covering the whole scene gives exactly the
untiled call; each window gives exactly the model's output on that window's pixels; a dense cell
covered by one window only keeps that window's value; a cell covered by several windows is their
ramp-weighted mean. Tiled features are not the whole-scene features.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from anysat_jax import AnySat
from anysat_jax.checkpoints import convert
from anysat_jax.core import modalities as mods
from anysat_jax.inference import embed, embed_cli
from anysat_jax.io import cog, geotiff, raster_backend, rasters
from anysat_jax.tools import embed_bench
from anysat_jax.tools.parity import rel_l2
from input_pipeline.datasets import treesatai_ts
from input_pipeline.normalization import load_stats

REPO = pathlib.Path(__file__).resolve().parents[1]
TREESAT = REPO / "input_pipeline" / "samples" / "TreeSatAI-TS"
NAME = "Abies_alba_1_1005_WEFL_NLF"
TIF = TREESAT / "aerial" / f"{NAME}.tif"
H5 = TREESAT / "sentinel" / f"{NAME}.h5"
TINY = dict(dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4)
SAMPLE_ARGS = ["--input", f"aerial={TIF}", "--crop", "aerial=300",
               "--input", f"s2={H5}", "--h5_key", "s2=sen-2-data",
               "--h5_dates_key", "s2=sen-2-products",
               "--input", f"s1-asc={H5}", "--h5_key", "s1-asc=sen-1-asc-data",
               "--h5_dates_key", "s1-asc=sen-1-asc-products",
               "--stats", "treesatai_ts", "--patch_size", "20"]


@pytest.fixture(scope="module")
def model():
  return AnySat("tiny", seed=0, modalities=("aerial", "s2", "s1-asc"), **TINY)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  convert.save(model.params, model.config, path)
  return path


def _input_tags(path):
  with tifffile.TiffFile(path) as tif:
    return {t.code: t.value for t in tif.pages.first.tags.values()}


def test_sample_tile_and_patch_match_the_api(model, tmp_path):
  """Shipped TreeSatAI tile, aerial cropped to 300 px: the written table equals the API on the
  same arrays read by the dataset reader (s1-asc from the .pth there, the .h5 here)."""
  _, ex = next(treesatai_ts.read(str(TREESAT), "train"))
  arrays = {"aerial": ex["aerial"][:, 2:302, 2:302], "s2": ex["s2"], "s1-asc": ex["s1-asc"]}
  batch = {}
  for name, x in arrays.items():
    s = load_stats("treesatai_ts", name)
    batch[name] = ((x - s.mean[:, None, None]) / s.std[:, None, None])[None]
    if name != "aerial":
      batch[name + "_dates"] = ex[name + "_dates"][None].astype(np.float32)
  want_tile = np.asarray(model(batch, 20, "tile"))
  want_patch = np.asarray(model(batch, 20, "patch"))

  embed_cli.run(model, embed_cli.parse_args([*SAMPLE_ARGS, "--out", str(tmp_path / "t.npz")]))
  z = np.load(tmp_path / "t.npz")
  assert rel_l2(z["feature"], want_tile) < 1e-6
  x0, y0 = 565642.600000003 + 2 * 0.20000000000015317, 5770980.399999992 - 2 * 0.19999999999938728
  assert z["name"].tolist() == [NAME] and z["size_m"].tolist() == [60.0]
  np.testing.assert_allclose([z["x"][0], z["y"][0]], [x0, y0], rtol=0, atol=1e-6)
  meta = json.loads(str(z["meta"]))
  assert meta["inputs"]["aerial"]["shape"] == [4, 300, 300]
  assert meta["normalization"]["s2"] == "treesatai_ts: official (AnySat demo)"

  embed_cli.run(model, embed_cli.parse_args([*SAMPLE_ARGS, "--output", "patch",
                                     "--out", str(tmp_path / "p.parquet")]))
  t = pq.read_table(tmp_path / "p.parquet").to_pydict()
  assert rel_l2(np.array(t["feature"]), want_patch.reshape(9, 64)) < 1e-6
  assert t["row_m"] == [0, 0, 0, 20, 20, 20, 40, 40, 40] and t["col_m"][:3] == [0, 20, 40]
  np.testing.assert_allclose(t["y"][3], y0 - 20 * 0.19999999999938728 / 0.2, atol=1e-6)


def _scene(h=24, w=24, t=3, seed=0):
  rng = np.random.default_rng(seed)
  return ({"s2": rng.normal(size=(t, 10, h, w)).astype(np.float32)},
          {"s2": np.array([30, 120, 250], np.float32)[:t]})


def _windows(arrays, dates, origins_px, px):
  return {"s2": np.stack([arrays["s2"][..., r:r + px, c:c + px] for r, c in origins_px]),
          "s2_dates": np.broadcast_to(dates["s2"], (len(origins_px), len(dates["s2"])))}


def test_tiled_dense(model):
  """24x24 px of s2 at 10 m, windows of 120 m overlapping by 60 m, patches of 20 m."""
  arrays, dates = _scene()
  whole = embed.embed_arrays(model, arrays, dates, 20, "dense")
  direct = model(_windows(arrays, dates, [(0, 0)], 24), 20, "dense", raster_dense=True)
  np.testing.assert_array_equal(whole.features, np.asarray(direct)[0])
  one = embed.embed_arrays(model, arrays, dates, 20, "dense", tile_m=240, overlap_m=60)
  np.testing.assert_array_equal(one.features, whole.features)       # one window = untiled

  tiled = embed.embed_arrays(model, arrays, dates, 20, "dense", tile_m=120, overlap_m=60,
                             batch=9)
  starts = [0, 6, 12]
  origins = [(r, c) for r in starts for c in starts]
  np.testing.assert_array_equal(tiled.origins_m, 10.0 * np.array(origins))
  assert tiled.cell_m == 10.0 and tiled.features.shape == (24, 24, 128)
  f = np.asarray(model(_windows(arrays, dates, origins, 12), 20, "dense", raster_dense=True))
  # Cells seen by one window only (the corners) keep that window's value.
  np.testing.assert_array_equal(tiled.features[:6, :6], f[0, :6, :6])
  np.testing.assert_array_equal(tiled.features[18:, 18:], f[8, 6:, 6:])
  # Rows 0-5, columns 6-11: windows (0, 0) and (0, 1), linear weights summing to 1 per column.
  b = (np.arange(6) + 0.5) / 6
  want = (1 - b)[None, :, None] * f[0, :6, 6:] + b[None, :, None] * f[1, :6, :6]
  np.testing.assert_allclose(tiled.features[:6, 6:12], want, rtol=1e-5, atol=1e-6)
  # Context matters: the blended windows differ from one call on the whole scene.
  assert rel_l2(tiled.features, whole.features) > 1e-3


def test_tiled_tile_rows_flush_edge_and_padding(model):
  """A 240 x 280 m scene: columns 0, 60, 120 and a last window flush with the edge (160 m);
  12 windows in batches of 5 (the last padded) give the model's tile vector of each window."""
  arrays, dates = _scene(24, 28)
  emb = embed.embed_arrays(model, arrays, dates, 20, "tile", tile_m=120, overlap_m=60, batch=5)
  origins = [(r, c) for r in (0, 6, 12) for c in (0, 6, 12, 16)]
  np.testing.assert_array_equal(emb.origins_m, 10.0 * np.array(origins))
  want = np.asarray(model(_windows(arrays, dates, origins, 12), 20, "tile"))
  assert rel_l2(emb.features, want) < 1e-6


def test_dense_geotiff_keeps_crs_scales_pixels(model, tmp_path):
  """Aerial dense map of the cropped tile: 2 m cells, corner moved by the 2 px crop, CRS keys
  copied verbatim (the tifffile backend; rasterio's: ``test_geotiff_backends``)."""
  out = tmp_path / "d.tif"
  embed_cli.run(model, embed_cli.parse_args(
      ["--input", f"aerial={TIF}", "--crop", "aerial=300", "--stats", "treesatai_ts",
       "--patch_size", "20", "--output", "dense", "--dense_bands", "last", "--out", str(out),
       "--raster_backend", "tifffile"]))
  data, ref = geotiff.read(out)
  aerial = geotiff.read(TIF)[0][:, 2:302, 2:302]
  s = load_stats("treesatai_ts", "aerial")
  emb = embed.embed_arrays(model, {"aerial": aerial}, {}, 20, "dense", dense_bands="last",
                           stats={"aerial": (s.mean, s.std)})
  assert data.shape == (64, 30, 30)
  np.testing.assert_array_equal(data, np.moveaxis(emb.features, -1, 0))
  src, got = _input_tags(TIF), _input_tags(out)
  for code in geotiff.CRS_TAGS:
    assert got[code] == src[code], code
  sx, sy, _ = src[geotiff.MODEL_PIXEL_SCALE]
  np.testing.assert_allclose(got[geotiff.MODEL_PIXEL_SCALE], (10 * sx, 10 * sy, 0), rtol=1e-12)
  x, y = src[geotiff.MODEL_TIEPOINT][3:5]
  np.testing.assert_allclose(got[geotiff.MODEL_TIEPOINT], (0, 0, 0, x + 2 * sx, y - 2 * sy, 0),
                             rtol=0, atol=1e-6)
  items = ElementTree.fromstring(got[geotiff.GDAL_METADATA])
  assert json.loads(items.find("Item[@name='anysat']").text)["cell_m"] == 2.0
  assert items.find("Item[@name='crs']").text == "EPSG:25832"      # resolved from UTM keys
  assert os.path.getsize(out) < data.nbytes                         # deflate, tiled
  with tifffile.TiffFile(out) as tif:
    assert tif.pages.first.is_tiled and tif.pages.first.compression == 8


def test_cli_subprocess(ckpt, tmp_path):
  """The command line on the shipped sample, s2 dense map at 10 m georeferenced by the aerial."""
  out = tmp_path / "s2.tif"
  proc = subprocess.run(
      [sys.executable, "-m", "anysat_jax.embed", *SAMPLE_ARGS, "--weights", str(ckpt),
       "--output", "dense", "--output_modality", "s2", "--dense_bands", "first", "--out", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "wrote a 6x6 dense map of 64 bands at 10 m" in proc.stderr
  assert "RANDOM" not in proc.stderr
  data, ref = geotiff.read(out)
  assert data.shape == (64, 6, 6) and np.isfinite(data).all()
  np.testing.assert_allclose((ref.dx, ref.dy), (50 * 0.20000000000015317,
                                                50 * 0.19999999999938728), rtol=1e-12)


def test_errors(model, ckpt, caplog):
  arrays = {"aerial": np.zeros((4, 304, 304), np.float32),
            "s2": np.zeros((2, 10, 6, 6), np.float32)}
  dates = {"s2": np.array([1.0, 2.0])}
  with pytest.raises(ValueError, match=r"s2: 6x6 px x 10 m = 60 x 60 m but aerial: 304x304 px "
                     r"x 0.2 m = 60.8 x 60.8 m; all inputs must cover the same ground extent"):
    embed.embed_arrays(model, arrays, dates, 20)
  s2, s2_dates = _scene(24, 28)
  with pytest.raises(ValueError, match="240 x 280 m, not square; give a window size"):
    embed.embed_arrays(model, s2, s2_dates, 20)
  with pytest.raises(ValueError, match="window 130 m must be a positive multiple of the patch "
                     "size 20 m"):
    embed.embed_arrays(model, s2, s2_dates, 20, tile_m=130)
  with pytest.raises(ValueError, match="overlap 120 m must be a multiple of the patch size 20 m, "
                     "at least 0 and less than the window 120 m"):
    embed.embed_arrays(model, s2, s2_dates, 20, tile_m=120, overlap_m=120)
  with pytest.raises(ValueError, match=r"output_modality 'aerial' is not among the inputs "
                     r"\(s2\) \(windows of 120 m\)"):
    embed.embed_arrays(model, s2, s2_dates, 20, "dense", "aerial", tile_m=120)
  with pytest.raises(ValueError, match="s2: 2 dates for 146 acquisitions"):
    rasters.read_input("s2", str(H5), np.array([1.0, 2.0]), "sen-2-data")
  # The command line reports the mismatch (no --crop) and exits with status 2.
  argv = [a for a in SAMPLE_ARGS if a not in ("--crop", "aerial=300")]
  assert embed_cli.main([*argv, "--weights", str(ckpt), "--out", "unused.npz"]) == 2
  assert "but aerial: 304x304 px x 0.2 m = 60.8 x 60.8 m" in caplog.text


def test_aerial_band_names_follow_the_colour_infrared_file():
  """TreeSatAI's aerial tiles are colour-infrared, bands NIR, G, B, R in the file (the archive's
  documentation); the reader keeps file order, as the official loader does."""
  bands = mods.get("aerial").bands
  assert bands == ("NIR", "G", "B", "R")
  assert [bands.index(b) + 1 for b in ("R", "G", "B")] == [4, 2, 3]  # 1-based file bands
  pixels = tifffile.imread(TIF)  # (H, W, C), pixel-interleaved
  means = pixels.reshape(-1, 4).mean(0)
  np.testing.assert_allclose(means, [137.262, 86.090, 82.252, 75.972], atol=1e-3)
  # Over forest the near infrared is the brightest band and red the darkest.
  assert np.argmax(means) == bands.index("NIR") and np.argmin(means) == bands.index("R")
  read = rasters.read_input("aerial", str(TIF)).data
  np.testing.assert_array_equal(read, np.moveaxis(pixels, -1, 0))


def test_dates():
  assert rasters.parse_dates("2020-01-02,20200201, 45").tolist() == [2, 32, 45]
  assert rasters.day_of_year(b"S1A_IW_GRDH_1SDV_20200103T170841_20200103T170906") == 3
  with pytest.raises(ValueError, match="not a date"):
    rasters.day_of_year("March")


def _write_raw(path, tags):
  extratags = [(code, 12 if code != geotiff.GEO_KEY_DIRECTORY else 3, len(v), v, True)
               for code, v in tags.items()]
  tifffile.imwrite(path, np.zeros((2, 4, 4), np.float32), photometric="minisblack",
                   planarconfig="separate", extratags=extratags)


def test_geotiff_georeferences(tmp_path):
  # Projected, PixelIsPoint: the tie point is the centre of pixel (0, 0).
  keys = (1, 1, 0, 2, 1024, 0, 1, 1, 1025, 0, 1, 2)
  _write_raw(tmp_path / "p.tif", {geotiff.MODEL_PIXEL_SCALE: (10.0, 10.0, 0.0),
                                  geotiff.MODEL_TIEPOINT: (0, 0, 0, 500005.0, 4999995.0, 0),
                                  geotiff.GEO_KEY_DIRECTORY: keys})
  x, ref = geotiff.read(tmp_path / "p.tif")
  assert x.shape == (2, 4, 4) and ref.pixel_is_point
  assert (ref.x0, ref.y0, ref.dx, ref.dy) == (500000.0, 5000000.0, 10.0, 10.0)
  geotiff.write(tmp_path / "q.tif", x[:, :1, :1], ref.window(1, 2, 3))
  assert _input_tags(tmp_path / "q.tif")[geotiff.MODEL_TIEPOINT] == (
      0, 0, 0, 500035.0, 4999975.0, 0)
  assert geotiff.read(tmp_path / "q.tif")[1].xy(0, 0) == (500020.0, 4999990.0)

  # A north-up ModelTransformation is read; a rotated one is refused.
  m = (10.0, 0, 0, 500000.0, 0, -10.0, 0, 5000000.0, 0, 0, 1, 0, 0, 0, 0, 1)
  _write_raw(tmp_path / "m.tif", {geotiff.MODEL_TRANSFORMATION: m})
  ref = geotiff.read(tmp_path / "m.tif")[1]
  assert (ref.x0, ref.y0, ref.dx, ref.dy, ref.pixel_is_point) == (500000, 5000000, 10, 10, False)
  _write_raw(tmp_path / "r.tif", {geotiff.MODEL_TRANSFORMATION: (10.0, 1.0, *m[2:])})
  with pytest.raises(ValueError, match="rotated or sheared"):
    geotiff.read(tmp_path / "r.tif")

  # A projected raster in metres whose pixels are not the modality's is refused.
  _write_raw(tmp_path / "s2.tif", {geotiff.MODEL_PIXEL_SCALE: (20.0, 20.0, 0.0),
                                   geotiff.MODEL_TIEPOINT: (0, 0, 0, 500000.0, 5000000.0, 0),
                                   geotiff.GEO_KEY_DIRECTORY: (1, 1, 0, 1, 1024, 0, 1, 1)})
  with pytest.raises(ValueError, match="has 20 x 20 m pixels but the model reads s2 at 10 m"):
    rasters.read_input("s2", str(tmp_path / "s2.tif"), np.array([1.0]))


def test_missing_values_are_masked_and_empty_windows_are_nodata(model, caplog):
  """NaNs in a window give finite features equal to the model's on the same pixels marked
  missing in ``s2_valid``; a window without any valid value is NaN (nodata), in the table and
  in the dense map, where the other windows' cells stay finite."""
  arrays, dates = _scene()
  holed = arrays["s2"].copy()
  holed[1, :, 2:5, 3:7] = np.nan                       # part of window (0, 0)
  holed[:, :, 12:, 12:] = np.nan                       # all of window (1, 1)
  origins = [(0, 0), (0, 12), (12, 0), (12, 12)]
  with caplog.at_level("INFO", "anysat_jax"):
    emb = embed.embed_arrays(model, {"s2": holed}, dates, 20, "tile", tile_m=120, batch=4)
  assert "s2: 4440 of 17280 values are missing (nodata or NaN/Inf); masked" in caplog.text
  batch = _windows(arrays, dates, origins, 12)
  batch["s2_valid"] = np.isfinite(_windows({"s2": holed}, dates, origins, 12)["s2"])
  want = np.asarray(model({**batch, "s2_valid": batch["s2_valid"].astype(np.uint8)}, 20))
  assert np.isfinite(emb.features[:3]).all() and np.isnan(emb.features[3]).all()
  np.testing.assert_allclose(emb.features[:3], want[:3], rtol=1e-5, atol=1e-6)
  assert rel_l2(emb.features[0], np.asarray(model(_windows(arrays, dates, origins, 12), 20))[0]
                ) > 1e-4                               # the holes changed window (0, 0)
  with pytest.raises(ValueError, match=r"s2: 4440 of 17280 values are missing"):
    embed.embed_arrays(model, {"s2": holed}, dates, 20, tile_m=120, missing="raise")

  dense = embed.embed_arrays(model, {"s2": holed}, dates, 20, "dense", tile_m=120, batch=4)
  assert np.isnan(dense.features[12:, 12:]).all() and np.isfinite(dense.features[:12]).all()


def test_cli_bands_nodata_overwrite_and_refusals(ckpt, tmp_path, caplog):
  """A 13-band series with a nodata value: ``--bands`` picks the registry's 10 per date, the
  nodata pixels are masked; the output is refused where it is an input or exists (unless
  ``--overwrite``), and a failed write leaves the old file as it was."""
  rng = np.random.default_rng(2)
  data = rng.integers(1, 5000, size=(2 * 13, 12, 12)).astype(np.uint16)
  data[3, 4, 5] = 0
  src = tmp_path / "s2.tif"
  keys = (1, 1, 0, 2, 1024, 0, 1, 1, 3072, 0, 1, 32632)
  tifffile.imwrite(src, data, photometric="minisblack", planarconfig="separate", extratags=[
      (geotiff.MODEL_PIXEL_SCALE, 12, 3, (10.0, 10.0, 0.0), True),
      (geotiff.MODEL_TIEPOINT, 12, 6, (0, 0, 0, 500000.0, 5000000.0, 0), True),
      (geotiff.GEO_KEY_DIRECTORY, 3, len(keys), keys, True),
      (geotiff.GDAL_NODATA, 2, 0, "0", True)])
  out = tmp_path / "f.tif"
  argv = ["--input", f"s2={src}", "--bands", "s2=2-8,13,11,12", "--dates", "s2=100,200",
          "--stats", "pastis_hd", "--patch_size", "20", "--weights", str(ckpt),
          "--output", "dense", "--dense_bands", "first"]
  with caplog.at_level("INFO", "anysat_jax"):
    assert embed_cli.main([*argv, "--out", str(out)]) == 0
  assert "s2: 1 of 2880 values are missing" in caplog.text
  got, ref = geotiff.read(out)
  assert ref.epsg == 32632 and got.shape == (64, 12, 12) and np.isfinite(got).all()
  stats = load_stats("pastis_hd", "s2")
  pick = np.array([2, 3, 4, 5, 6, 7, 8, 13, 11, 12]) - 1
  x = data.reshape(2, 13, 12, 12)[:, pick].astype(np.float32)
  x[0, 2, 4, 5] = np.nan
  want = embed.embed_arrays(AnySat.from_pretrained(ckpt), {"s2": x}, {"s2": np.array([100, 200])},
                            20, "dense", dense_bands="first", stats={"s2": (stats.mean,
                                                                            stats.std)})
  np.testing.assert_allclose(got, np.moveaxis(want.features, -1, 0), rtol=1e-5, atol=1e-6)
  cogged = tmp_path / "f_cog.tif"
  assert embed_cli.main([*argv, "--cog", "--out", str(cogged)]) == 0
  cog_data, cog_ref = geotiff.read(cogged)
  np.testing.assert_array_equal(cog_data, got)
  place = lambda r: (r.x0, r.y0, r.dx, r.dy, r.epsg)      # the CRS keys are the backend's
  assert place(cog_ref) == place(ref)
  assert embed_cli.main([*argv, "--output", "tile", "--cog", "--out", str(tmp_path / "t.npz")]
                        ) == 2
  assert "--cog writes a dense map's GeoTIFF; --output tile writes a table" in caplog.text
  cogged.unlink()

  before = out.read_bytes()
  caplog.clear()
  assert embed_cli.main([*argv, "--out", str(src)]) == 2
  assert "is the input" in caplog.text and tifffile.imread(src).shape == data.shape
  assert embed_cli.main([*argv, "--out", str(out)]) == 2
  assert "exists; pass --overwrite to replace it" in caplog.text

  def full_disk(path, shape, rows, *a, **k):
    next(iter(rows))
    with open(path, "wb") as f:
      f.write(b"II*\0")
    raise OSError(28, "No space left on device")
  original = raster_backend.write_rows
  raster_backend.write_rows = full_disk
  try:
    assert embed_cli.main([*argv, "--out", str(out), "--overwrite"]) == 2
  finally:
    raster_backend.write_rows = original
  assert "No space left on device" in caplog.text and out.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tif", "s2.tif"]
  assert embed_cli.main([*argv, "--out", str(out), "--overwrite", "--dense_bands", "last"]) == 0
  assert out.read_bytes() != before


def _mean_2x2(x):
  """Reference overview: the mean of the finite values of each 2 x 2 block (edges: 1 or 2)."""
  h, w, d = x.shape
  out = np.full((-(-h // 2), -(-w // 2), d), np.nan, np.float32)
  for i in range(out.shape[0]):
    for j in range(out.shape[1]):
      block = x[2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1, d)
      for c in range(d):
        finite = block[:, c][np.isfinite(block[:, c])]
        if finite.size:
          out[i, j, c] = finite.astype(np.float64).mean()
  return out


@pytest.mark.parametrize("bigtiff", [False, True])
def test_cog_layout_overviews_and_georeference(tmp_path, bigtiff):
  """``io.cog.write_cog``: the layout GDAL's COG validator checks (full-resolution IFD at the
  start, overview IFDs after it by decreasing size, all IFDs before the data, the smallest
  overview's tiles first and the full resolution's last), exact full-resolution values,
  overviews equal to the 2 x 2 mean of finite values, and the georeference kept."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(100, 70, 3)).astype(np.float32)
  x[:5, :7] = np.nan
  x[40:44, 20:22, 1] = np.nan
  keys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32631)
  ref = geotiff.GeoRef(500000.0, 5000000.0, 10.0, 10.0,
                       crs_tags=((geotiff.GEO_KEY_DIRECTORY, 3, len(keys), keys),))
  path = tmp_path / "map.tif"
  blocks = (x[r:r + 7] for r in range(0, 100, 7))   # blocks that do not align with the tiles
  n = cog.write_cog(path, x.shape, blocks, ref, {"anysat": "{}"}, nodata=float("nan"), tile=16,
                    bigtiff=bigtiff)
  assert n == 3
  data, got_ref = geotiff.read(path)
  np.testing.assert_array_equal(data, np.moveaxis(x, -1, 0))
  assert got_ref.epsg == 32631 and (got_ref.x0, got_ref.y0, got_ref.dx) == (500000, 5e6, 10)
  with tifffile.TiffFile(path) as tif:
    assert tif.is_bigtiff == bigtiff
    pages = list(tif.pages)
    assert [p.shape[:2] for p in pages] == [(100, 70), (50, 35), (25, 18), (13, 9)]
    assert [p.tags.valueof(254) for p in pages] == [0, 1, 1, 1]
    assert all(p.is_tiled and p.tilewidth == 16 and p.compression == 8 for p in pages)
    assert pages[0].tags.valueof(geotiff.GDAL_METADATA) == \
        '<GDALMetadata><Item name="anysat">{}</Item></GDALMetadata>'
    assert all(p.tags.valueof(geotiff.GDAL_NODATA) == "nan" for p in pages)
    assert all(p.tags.get(geotiff.GEO_KEY_DIRECTORY) is None for p in pages[1:])
    ifds = [p.offset for p in pages]
    assert ifds[0] == (16 if bigtiff else 8) and ifds == sorted(ifds)
    first = [p.dataoffsets[0] for p in pages]
    assert min(first) > ifds[-1] and first == sorted(first, reverse=True)
    for p in pages:   # each image's tiles in row-major order, back to back
      ends = np.add(p.dataoffsets, p.databytecounts)
      np.testing.assert_array_equal(ends[:-1], p.dataoffsets[1:])
    level = x
    for p in pages[1:]:
      level = _mean_2x2(level)
      np.testing.assert_allclose(p.asarray(), level, rtol=1e-6, atol=1e-6, equal_nan=True)


def _rss_file_kib() -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_window_reads_keep_resident_memory_bounded(tmp_path):
  """Reading a memory-mapped GeoTIFF window by window does not leave the file resident: after
  reading all 80 MB of it, resident file-backed memory has grown by less than 16 MB."""
  path = tmp_path / "scene.tif"
  tifffile.imwrite(path, shape=(2000, 2000, 10), dtype=np.uint16, photometric="minisblack",
                   planarconfig="contig", metadata=None)
  scene = tifffile.memmap(path, mode="r+")
  scene[:] = np.arange(2000, dtype=np.uint16)[:, None, None]
  scene.flush()
  del scene
  r = rasters.read_input("s2", str(path), dates=np.array([1.0], np.float32))
  before, total = _rss_file_kib(), 0.0
  for i in range(0, 2000, 400):
    for j in range(0, 2000, 400):
      window = r.data[..., i:i + 400, j:j + 400]
      assert window.shape == (1, 10, 400, 400)
      total += float(window.astype(np.float64).sum())
  assert total == 10 * 2000 * sum(range(2000))
  assert _rss_file_kib() - before < 16 * 1024


def test_bench_scene_is_a_georeferenced_sentinel2_geotiff(tmp_path):
  """``tools.embed_bench.make_scene``: the scene the memory benchmark embeds."""
  path = tmp_path / "s2.tif"
  embed_bench.make_scene(str(path), 300, dates=2)
  r = rasters.read_input("s2", str(path), dates=np.array([15.0, 45.0], np.float32))
  assert r.data.shape == (2, 10, 300, 300) and r.georef.epsg == 32631 and r.georef.dx == 10
  x = r.data[..., 0:300, 0:300]
  assert 200 <= x.min() and x.max() < 4500 and len(np.unique(x[0, 0, :, 0])) > 1
