"""The two GeoTIFF backends (``io.raster_backend``: rasterio and tifffile) read the same windows
and write the same maps; reading a compressed scene window by window keeps memory bounded by
the windows, not the scene (numpy only, no model)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
import tifffile

from anysat_jax.io import geotiff, raster_backend, rasters, tiff_windows
from anysat_jax.tools import scene_memory_bench

REPO = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = raster_backend.BACKENDS
UTM32N = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32632)
TAGS = [(geotiff.MODEL_PIXEL_SCALE, 12, 3, (10.0, 10.0, 0.0), True),
        (geotiff.MODEL_TIEPOINT, 12, 6, (0, 0, 0, 500000.0, 5000000.0, 0), True),
        (geotiff.GEO_KEY_DIRECTORY, 3, len(UTM32N), UTM32N, True),
        (geotiff.GDAL_NODATA, 2, 0, "0", True)]
# (name, tifffile.imwrite layout): tiles or strips, pixel or band interleave, predictor.
LAYOUTS = {"tiled-pixel": dict(tile=(32, 48), planarconfig="contig", compression="zlib"),
           "tiled-band": dict(tile=(32, 32), planarconfig="separate", compression="zlib"),
           "strips-pixel": dict(rowsperstrip=7, planarconfig="contig", compression="zlib",
                                predictor=True),
           "uncompressed": dict(planarconfig="separate")}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
  """A 13-band Sentinel-2 series of 2 dates (26 bands, 70 x 90 px, nodata 0) in every layout."""
  rng = np.random.default_rng(0)
  data = rng.integers(1, 9000, size=(26, 70, 90)).astype(np.uint16)
  data[:, :5, :6] = 0
  data[14, 40, 41] = 0
  tmp = tmp_path_factory.mktemp("layouts")
  paths = {}
  for name, kw in LAYOUTS.items():
    paths[name] = tmp / f"{name}.tif"
    x = data if kw["planarconfig"] == "separate" else np.moveaxis(data, 0, -1)
    tifffile.imwrite(paths[name], x, photometric="minisblack", extratags=TAGS, metadata=None,
                     **kw)
  return data, paths


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backends_read_the_same_windows(series, layout):
  """Band selection per date, nodata as NaN, any window: the file's values, same georeference
  with both backends (rasterio adds the CRS's WKT)."""
  data, paths = series
  bands = (2, 3, 4, 5, 6, 7, 8, 13, 11, 12)
  want = data.reshape(2, 13, 70, 90)[:, np.array(bands) - 1].astype(np.float32)
  want[want == 0] = np.nan
  refs = {}
  for backend in BACKENDS:
    r = rasters.read_input("s2", str(paths[layout]), np.array([10.0, 50.0]), bands=bands,
                           backend=backend)
    lazy = not isinstance(r.data.base, np.ndarray)
    assert lazy == (layout != "uncompressed"), type(r.data.base)
    np.testing.assert_array_equal(np.asarray(r.data), want)
    for rows, cols in ((slice(3, 41), slice(17, 89)), (slice(69, 70), slice(0, 1)),
                       (slice(31, 33), slice(47, 49))):
      np.testing.assert_array_equal(r.data[..., rows, cols], want[..., rows, cols])
    assert r.nodata == 0
    refs[backend] = r.georef
  assert "UTM zone 32N" in refs["rasterio"].wkt and refs["tifffile"].wkt is None
  assert refs["rasterio"].epsg == refs["tifffile"].epsg == 32632
  assert refs["tifffile"] == geotiff.GeoRef(**{**vars(refs["rasterio"]), "wkt": None})


def test_tiff_windows_cache_and_sparse_tiles(tmp_path):
  """``TiffWindows`` keeps its decoded-tile cache under the budget; a tile the file leaves
  out (a sparse file) reads as the nodata value."""
  x = np.arange(64 * 64, dtype=np.float32).reshape(1, 64, 64)
  path = tmp_path / "t.tif"
  tifffile.imwrite(path, x[0], tile=(16, 16), compression="zlib", metadata=None)
  view = tiff_windows.TiffWindows(path, cache_mib=0)
  np.testing.assert_array_equal(view[0:1, 5:60, 7:63], x[:, 5:60, 7:63])
  assert len(view._cache) == 1           # the budget 0 keeps only the last tile
  view.close()
  with tifffile.TiffFile(path, mode="r+") as tif:   # drop tile (1, 2)
    page = tif.pages.first
    counts = list(page.databytecounts)
    counts[6] = 0
    page.tags[325].overwrite(counts)
  view = tiff_windows.TiffWindows(path, fill=-1.0)
  got = view[0:1, 0:64, 0:64]
  want = x.copy()
  want[0, 16:32, 32:48] = -1
  np.testing.assert_array_equal(got, want)


def _read_back(path):
  x, ref = geotiff.read(path)
  with tifffile.TiffFile(path) as tif:
    page = tif.pages.first
    items = ElementTree.fromstring(page.tags.valueof(geotiff.GDAL_METADATA))
    info = {"tiled": page.is_tiled, "compression": int(page.compression),
            "nodata": page.tags.valueof(geotiff.GDAL_NODATA), "dtype": str(page.dtype),
            "meta": {i.get("name"): i.text for i in items}}
  return x, ref, info


@pytest.mark.parametrize("dtype,nodata", [(np.float32, float("nan")), (np.uint8, 255)])
def test_backends_write_the_same_map(tmp_path, dtype, nodata):
  """Row blocks of uneven heights stream into the same tiled, deflate-compressed map with
  either backend: same values, georeference (EPSG), nodata and metadata; a missing row is an
  error with both."""
  rng = np.random.default_rng(1)
  hwd = rng.normal(size=(45, 37, 3)).astype(np.float32)
  if dtype == np.uint8:
    hwd = rng.integers(0, 12, size=(45, 37, 1)).astype(np.uint8)
    hwd[:3, :4] = 255
  else:
    hwd[:3, :4] = np.nan
  keys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32631)
  ref = geotiff.GeoRef(500000.0, 5000000.0, 20.0, 20.0,
                       crs_tags=((geotiff.GEO_KEY_DIRECTORY, 3, len(keys), keys),))
  meta = {"anysat": json.dumps({"cell_m": 20}), "crs": "EPSG:32631"}
  got = {}
  for backend in BACKENDS:
    path = tmp_path / f"{backend}.tif"
    blocks = iter([hwd[:4], hwd[4:21], hwd[21:]])
    raster_backend.write_rows(path, hwd.shape, blocks, ref, meta, nodata=nodata, dtype=dtype,
                              backend=backend)
    got[backend] = _read_back(path)
    with pytest.raises(ValueError, match="got 21 rows for a raster of 45 rows"):
      raster_backend.write_rows(tmp_path / "short.tif", hwd.shape, iter([hwd[:4], hwd[4:21]]),
                                ref, backend=backend)
  (x1, r1, i1), (x2, r2, i2) = got["rasterio"], got["tifffile"]
  np.testing.assert_array_equal(x1, np.moveaxis(hwd, -1, 0).astype(np.float32))
  np.testing.assert_array_equal(x1, x2)
  assert (r1.x0, r1.y0, r1.dx, r1.dy, r1.epsg) == (r2.x0, r2.y0, r2.dx, r2.dy, r2.epsg) == \
      (500000.0, 5000000.0, 20.0, 20.0, 32631)
  assert i1 == i2 and i1["tiled"] and i1["compression"] == 8 and i1["meta"] == meta
  assert i1["dtype"] == np.dtype(dtype).name


_PEAK = """if True:
  import sys
  import numpy as np
  from anysat_jax.io import raster_backend, rasters, tiff_windows
  tiff_windows.CACHE_MIB = raster_backend.GDAL_CACHE_MIB = 8
  r = rasters.read_input("s2", sys.argv[1], np.array([1.0]), backend=sys.argv[2])
  h = r.data.shape[-1]
  missing = sum(int(np.isnan(r.data[..., i:i + 512, j:j + 512]).sum()) for i in range(0, h, 512)
                for j in range(0, h, 512))                 # as inference.embed.count_missing
  total = sum(float(np.nansum(r.data[..., i:i + 128, j:j + 128])) for i in range(0, h, 128)
              for j in range(0, h, 128))
  with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
  print(missing, total, peak)
"""


def test_window_reads_of_a_compressed_scene_are_bounded(tmp_path):
  """Counting the missing values in 512 px blocks and reading every 128 px window of a tiled,
  compressed 2048 x 2048 x 10 scene (160 MiB as float32) peaks within 40 MiB of doing so on a
  512 x 512 one, with either backend (reader caches set to 8 MiB); the sums match."""
  scenes = {}
  for px in (512, 2048):
    scenes[px] = tmp_path / f"s2_{px}.tif"
    scene_memory_bench.make_scene(str(scenes[px]), px)
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = {}
  for backend in BACKENDS:
    for px, path in scenes.items():
      proc = subprocess.run([sys.executable, "-c", _PEAK, str(path), backend], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
      assert proc.returncode == 0, proc.stderr
      missing, total, peak = proc.stdout.split()
      out[backend, px] = int(missing), float(total), int(peak) / 1024
  for px in scenes:
    assert out["rasterio", px][:2] == out["tifffile", px][:2]
    assert out["rasterio", px][0] > 0                       # the nodata corner
  for backend in BACKENDS:
    growth = out[backend, 2048][2] - out[backend, 512][2]
    assert growth < 40, (backend, growth, out)


def test_the_backend_is_chosen_in_one_place(monkeypatch):
  """The caller's choice over ``$ANYSAT_RASTER_BACKEND`` over the default (rasterio, installed
  here)."""
  monkeypatch.delenv(raster_backend.ENV, raising=False)
  assert raster_backend.active() == "rasterio"
  monkeypatch.setenv(raster_backend.ENV, "tifffile")
  assert raster_backend.active() == "tifffile"
  assert raster_backend.active("rasterio") == "rasterio"
  monkeypatch.setenv(raster_backend.ENV, "gdal")
  with pytest.raises(ValueError, match=r"ANYSAT_RASTER_BACKEND must be one of"):
    raster_backend.active()
  with pytest.raises(ValueError, match="raster backend must be one of"):
    raster_backend.active("gdal")
