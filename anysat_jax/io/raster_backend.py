"""The GeoTIFF backend of ``embed`` and ``predict``: rasterio (GDAL) when it is installed,
tifffile otherwise; the one place where it is chosen (``active``).

Both backends read windows and stream writes, so memory is bounded by the windows, not the
scene:

- ``open_bands(path)``: a lazy (N, H, W) view of the file's bands, its georeference and nodata
  value. An uncompressed, contiguous file is memory-mapped (numpy; either backend); any other
  file is read window by window, decoding only the tiles or strips a window touches: GDAL's
  windowed reads (rasterio, its block cache capped at ``GDAL_CACHE_MIB``) or
  ``io.tiff_windows`` (tifffile). The georeference and nodata value are parsed from the file's
  tags by ``io.geotiff`` with either backend, so they are the same; rasterio adds the CRS's WKT.
- ``write_rows(path, (H, W, D), row_blocks, ...)``: a tiled, compressed, pixel-interleaved
  GeoTIFF streamed from row blocks, one row of tiles in memory. rasterio writes the CRS as GDAL
  does (GeoKeys from the WKT or EPSG code); tifffile copies the input's CRS keys verbatim.
  A CRS rasterio cannot express (no WKT, no EPSG code) is written by tifffile.

Cloud-optimized output is ``io.cog`` with either backend (GDAL's COG driver copies a whole
dataset; ``io.cog`` streams). The choice (``active``): the caller's ``backend`` argument, else
the ``ANYSAT_RASTER_BACKEND`` environment variable (``rasterio`` or ``tifffile``), else
rasterio if it is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from anysat_jax.io import geotiff

BACKENDS = ("rasterio", "tifffile")
ENV = "ANYSAT_RASTER_BACKEND"
GDAL_CACHE_MIB = 64
_RIO_COMPRESSION = {"deflate": "DEFLATE", "zstd": "ZSTD", "none": None}
log = logging.getLogger(__name__)


def active(name: str | None = None) -> str:
  """The backend to use: ``name`` if given, else ``$ANYSAT_RASTER_BACKEND``, else rasterio when
  installed, else tifffile."""
  source = "raster backend" if name else f"${ENV}"
  name = name or os.environ.get(ENV) or None
  if name is None:
    return "rasterio" if importlib.util.find_spec("rasterio") is not None else "tifffile"
  if name not in BACKENDS:
    raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
  if name == "rasterio" and importlib.util.find_spec("rasterio") is None:
    raise ValueError("the rasterio raster backend was asked for but rasterio is not installed "
                     "(pip install rasterio)")
  return name


def _gdal_env():
  import rasterio  # optional: the rasterio backend

  return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MIB * 2**20)


class RasterioWindows:
  """A lazy (N, H, W) view of a raster's bands through GDAL's windowed reads."""

  ndim = 3

  def __init__(self, path: str | os.PathLike):
    import rasterio  # optional: the rasterio backend
    from rasterio.errors import NotGeoreferencedWarning

    self.path = os.fspath(path)
    # The georeference is io.geotiff's (None for a plain TIFF), not GDAL's identity default.
    with _gdal_env(), warnings.catch_warnings():
      warnings.simplefilter("ignore", NotGeoreferencedWarning)
      self._ds = rasterio.open(self.path)
    dtypes = set(self._ds.dtypes)
    if len(dtypes) != 1:
      raise ValueError(f"{self.path}: bands of different types {sorted(dtypes)}")
    self.dtype = np.dtype(dtypes.pop())
    self.shape = (self._ds.count, self._ds.height, self._ds.width)

  @property
  def wkt(self) -> str | None:
    return self._ds.crs.to_wkt() if self._ds.crs else None

  def close(self) -> None:
    self._ds.close()

  def __getitem__(self, key: Any) -> np.ndarray:
    from rasterio.windows import Window  # optional: the rasterio backend

    if not (isinstance(key, tuple) and len(key) == 3
            and all(isinstance(k, slice) and k.step in (None, 1) for k in key)):
      raise TypeError(f"a raster window is indexed as [bands, rows, cols] (slices), not {key!r}")
    (b0, b1, _), (r0, r1, _), (c0, c1, _) = (s.indices(n) for s, n in zip(key, self.shape,
                                                                          strict=True))
    b1, r1, c1 = max(b0, b1), max(r0, r1), max(c0, c1)
    if b1 == b0 or r1 == r0 or c1 == c0:
      return np.empty((b1 - b0, r1 - r0, c1 - c0), self.dtype)
    with _gdal_env():
      return self._ds.read(list(range(b0 + 1, b1 + 1)),
                           window=Window(c0, r0, c1 - c0, r1 - r0))

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    x = self[:, :, :]
    return x if dtype is None else x.astype(dtype)


def open_bands(path: str | os.PathLike, backend: str | None = None
               ) -> tuple[Any, geotiff.GeoRef | None, float | None]:
  """(a lazy (N, H, W) view of the bands in file order and dtype, the georeference or None,
  the GDAL_NODATA value or None) of a GeoTIFF; ``backend`` None: ``active()``. With rasterio
  the georeference also holds the CRS as WKT."""
  path = os.fspath(path)
  if active(backend) == "tifffile":
    return geotiff.open_bands(path)
  georef, nodata, mappable = geotiff.read_header(path)
  view = RasterioWindows(path)
  if georef is not None and view.wkt:
    georef = dataclasses.replace(georef, wkt=view.wkt)
  if mappable:      # a memory map reads an uncompressed file without copies
    view.close()
    return geotiff.memmap_bands(path), georef, nodata
  return view, georef, nodata


def _strips(rows: Iterable[np.ndarray], height: int, width: int, side: int, dtype: Any
            ) -> Iterator[tuple[int, np.ndarray]]:
  """(first row, strip (k, width, D)) of ``side`` rows (the last may be shorter) from row
  blocks of any height covering ``height`` rows."""
  buf: list[np.ndarray] = []
  have = done = 0
  for block in rows:
    if block.ndim != 3 or block.shape[1] != width:
      raise ValueError(f"row block of shape {block.shape} for a raster {width} px wide")
    buf.append(np.asarray(block, dtype))
    have += len(block)
    if done + have > height:
      raise ValueError(f"got {done + have} rows for a raster of {height} rows")
    while have >= side:
      strip = np.concatenate(buf) if len(buf) > 1 else buf[0]
      yield done, strip[:side]
      buf, have, done = [strip[side:]], have - side, done + side
  if done + have != height:
    raise ValueError(f"got {done + have} rows for a raster of {height} rows")
  if have:
    yield done, np.concatenate(buf)


def _crs(georef: geotiff.GeoRef) -> Any:
  from rasterio.crs import CRS  # optional: the rasterio backend

  if georef.wkt:
    return CRS.from_wkt(georef.wkt)
  return CRS.from_epsg(georef.epsg) if georef.epsg is not None else None


def _write_rasterio(path: str, shape: tuple[int, int, int], rows: Iterable[np.ndarray],
                    georef: geotiff.GeoRef | None, metadata: Mapping[str, str] | None,
                    compression: str, nodata: float | None, dtype: Any) -> None:
  import rasterio  # optional: the rasterio backend
  from rasterio.transform import Affine
  from rasterio.windows import Window

  height, width, bands = shape
  side = geotiff.output_tile_side(shape)
  profile = dict(driver="GTiff", height=height, width=width, count=bands,
                 dtype=np.dtype(dtype).name, tiled=True, blockxsize=side, blockysize=side,
                 interleave="pixel", photometric="MINISBLACK", BIGTIFF="IF_SAFER",
                 nodata=nodata)   # MINISBLACK: GDAL would tag 3 or 4 uint8 bands as RGB(A)
  if _RIO_COMPRESSION[compression]:
    profile["compress"] = _RIO_COMPRESSION[compression]
  if georef is not None:
    profile["transform"] = Affine(georef.dx, 0.0, georef.x0, 0.0, -georef.dy, georef.y0)
    profile["crs"] = _crs(georef)
  with _gdal_env(), rasterio.open(path, "w", **profile) as dst:
    if metadata:
      dst.update_tags(**metadata)
    for r0, strip in _strips(rows, height, width, side, dtype):
      dst.write(np.moveaxis(strip, -1, 0), window=Window(0, r0, width, len(strip)))


def write_rows(path: str | os.PathLike, shape: tuple[int, int, int],
               rows: Iterable[np.ndarray], georef: geotiff.GeoRef | None,
               metadata: Mapping[str, str] | None = None, *, compression: str = "deflate",
               nodata: float | None = None, dtype: Any = np.float32,
               backend: str | None = None) -> None:
  """Streams row blocks (k, W, D), top to bottom, into a tiled, compressed, pixel-interleaved
  GeoTIFF of ``shape`` (H, W, D): arguments as ``io.geotiff.write_rows``; ``backend`` None:
  ``active()``. Memory: one row of tiles (and GDAL's block cache, capped, with rasterio)."""
  if compression not in geotiff.COMPRESSIONS:
    raise ValueError(f"compression must be one of {geotiff.COMPRESSIONS}, got {compression!r}")
  name = active(backend)
  if name == "rasterio" and georef is not None and georef.crs_tags and not georef.wkt \
      and georef.epsg is None:
    log.info("%s: the CRS has no WKT nor EPSG code for GDAL; writing it with tifffile, its "
             "GeoKeys copied", path)
    name = "tifffile"
  if name == "tifffile":
    geotiff.write_rows(path, shape, rows, georef, metadata, compression=compression,
                       nodata=nodata, dtype=dtype)
    return
  if nodata is not None and math.isnan(nodata) and np.dtype(dtype).kind != "f":
    raise ValueError(f"nodata nan for an integer map ({np.dtype(dtype).name})")
  _write_rasterio(os.fspath(path), shape, rows, georef, metadata, compression, nodata, dtype)

