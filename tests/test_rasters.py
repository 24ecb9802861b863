"""Raster reading (``io.rasters``, ``io.geotiff``), numpy only: band selection, nodata, lazy
windows, atomic replacement, compressed streaming writes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from anysat_jax.io import atomic, geotiff, rasters

UTM32N = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32632)


def _s2_tiff(path, data, nodata=None, compression=None):
  """A 10 m projected GeoTIFF, band interleaved."""
  tags = [(geotiff.MODEL_PIXEL_SCALE, 12, 3, (10.0, 10.0, 0.0), True),
          (geotiff.MODEL_TIEPOINT, 12, 6, (0, 0, 0, 500000.0, 5000000.0, 0), True),
          (geotiff.GEO_KEY_DIRECTORY, 3, len(UTM32N), UTM32N, True)]
  if nodata is not None:
    tags.append((geotiff.GDAL_NODATA, 2, 0, str(nodata), True))
  tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate",
                   extratags=tags, compression=compression)


def test_band_selection_per_date_and_lazy_reads(tmp_path):
  """A 13-band Sentinel-2 series, 2 dates stored as 26 bands, B8A last: ``--bands`` picks the
  registry's 10 of every date, in the registry's order; the file is memory-mapped."""
  rng = np.random.default_rng(0)
  data = rng.integers(0, 10000, size=(26, 8, 9)).astype(np.uint16)
  _s2_tiff(tmp_path / "s2.tif", data)
  bands = rasters.parse_bands("2-8,13,11,12")
  assert bands == (2, 3, 4, 5, 6, 7, 8, 13, 11, 12)
  r = rasters.read_input("s2", str(tmp_path / "s2.tif"), np.array([10.0, 50.0]), bands=bands)
  want = data.reshape(2, 13, 8, 9)[:, np.array(bands) - 1].astype(np.float32)
  assert r.data.shape == (2, 10, 8, 9) and isinstance(r.data.base, np.memmap)
  np.testing.assert_array_equal(np.asarray(r.data), want)
  np.testing.assert_array_equal(r.data[..., 2:5, 3:9], want[..., 2:5, 3:9])
  crop = rasters.center_crop(r, 4, 5).data
  np.testing.assert_array_equal(crop[..., 1:3, :], want[..., 3:5, 2:7])
  assert r.georef.epsg == 32632

  with pytest.raises(ValueError, match=r"s2: .* has 13 bands per date, expected 10 \(B2, B3, .*"
                     r"pick them with --bands s2=1,2,\.\.\. \(1-based, in file order\)"):
    rasters.read_input("s2", str(tmp_path / "s2.tif"), np.array([10.0, 50.0]))
  with pytest.raises(ValueError, match=r"s2: bands \[14\] are not in 1\.\.13"):
    rasters.read_input("s2", str(tmp_path / "s2.tif"), np.array([1.0, 2.0]),
                       bands=(2, 3, 4, 5, 6, 7, 8, 14, 11, 12))
  with pytest.raises(ValueError, match=r"s2: 3 bands selected but the model reads 10"):
    rasters.read_input("s2", str(tmp_path / "s2.tif"), np.array([1.0, 2.0]), bands=(1, 2, 3))
  with pytest.raises(ValueError, match=r"s2: bands \[1, 1, .*\] repeat a band"):
    rasters.read_input("s2", str(tmp_path / "s2.tif"), np.array([1.0, 2.0]),
                       bands=(1, 1, 3, 4, 5, 6, 7, 8, 9, 10))
  with pytest.raises(ValueError, match=r"26 bands .* are not a whole number of dates for 3"):
    rasters.read_input("s2", str(tmp_path / "s2.tif"), np.array([1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match="expected 1-based band numbers"):
    rasters.parse_bands("B2,B3")


def test_nodata_and_nan_read_as_nan(tmp_path):
  data = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6) + 1
  data[1, 2, 3] = -9999
  data[0, 0, :2] = np.nan
  path = tmp_path / "aerial.tif"
  tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate",
                   extratags=[(geotiff.GDAL_NODATA, 2, 0, "-9999", True)], compression="zlib")
  r = rasters.read_input("aerial", str(path))
  assert r.nodata == -9999 and not isinstance(r.data.base, np.memmap)   # compressed: read once
  x = np.asarray(r.data)
  assert np.isnan(x).sum() == 3 and np.isnan(x[1, 2, 3]) and np.isnan(x[0, 0, :2]).all()
  np.testing.assert_array_equal(x[~np.isnan(x)], data[np.isfinite(data) & (data != -9999)])
  with pytest.raises(ValueError, match="holds complex64 values; expected real numbers"):
    np.save(tmp_path / "c.npy", np.zeros((4, 6, 6), np.complex64))
    rasters.read_input("aerial", str(tmp_path / "c.npy"))


def test_streamed_geotiff_is_tiled_compressed_and_exact(tmp_path):
  """Row blocks of any height stream into 16 px tiles; deflate makes a smooth map smaller."""
  rng = np.random.default_rng(1)
  base = rng.normal(size=(5, 3, 40)).astype(np.float32)
  data = np.repeat(np.repeat(base, 10, axis=1), 1, axis=2)[:, :27]   # (5, 27, 40)
  hwd = np.moveaxis(data, 0, -1)
  blocks = [hwd[:4], hwd[4:21], hwd[21:]]
  ref = geotiff.GeoRef(500000.0, 5000000.0, 10.0, 10.0)
  geotiff.write_rows(tmp_path / "m.tif", hwd.shape, iter(blocks), ref, {"k": "v"},
                     nodata=float("nan"))
  x, got = geotiff.read(tmp_path / "m.tif")
  np.testing.assert_array_equal(x, data)
  assert (got.x0, got.dy) == (500000.0, 10.0)
  with tifffile.TiffFile(tmp_path / "m.tif") as tif:
    page = tif.pages.first
    assert page.is_tiled and page.compression == 8 and page.tags.valueof(42113) == "nan"
  assert os.path.getsize(tmp_path / "m.tif") < data.nbytes
  with pytest.raises(ValueError, match="got 21 rows for a raster of 27 rows"):
    geotiff.write_rows(tmp_path / "n.tif", hwd.shape, iter(blocks[:2]), None)


def test_atomic_replacement(tmp_path):
  src, out = tmp_path / "in.tif", tmp_path / "out.npz"
  src.write_bytes(b"input")
  with pytest.raises(ValueError, match="is the input"):
    atomic.check_output(src, [src])
  link = tmp_path / "link.tif"
  link.symlink_to(src)
  with pytest.raises(ValueError, match="is the input"):
    atomic.check_output(link, [str(src)])
  out.write_bytes(b"old")
  with pytest.raises(ValueError, match="exists; pass --overwrite to replace it"):
    atomic.check_output(out, [src])
  assert atomic.check_output(out, [src], overwrite=True) == str(out)
  with pytest.raises(OSError, match="No space left"), atomic.replacing(out) as tmp:
    with open(tmp, "wb") as f:
      f.write(b"partial")
    raise OSError(28, "No space left on device")
  assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == [
      "in.tif", "link.tif", "out.npz"]
  with atomic.replacing(out) as tmp, open(tmp, "wb") as f:
    f.write(b"new")
  assert out.read_bytes() == b"new" and oct(out.stat().st_mode & 0o777) != "0o600"


def test_io_imports_no_jax():
  code = ("import sys, anysat_jax.io.rasters, anysat_jax.io.tables, anysat_jax.inference.tiling;"
          "print(sorted(m for m in ('jax', 'flax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "[]"
