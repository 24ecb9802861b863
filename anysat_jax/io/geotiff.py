"""Minimal GeoTIFF input/output with tifffile: (C, H, W) arrays plus a north-up georeference.

Reading memory-maps an uncompressed file (``open_bands``), or decodes only the tiles or strips
a window touches (``io.tiff_windows``), so a window of a large scene reads only its pixels.
Writing streams rows into a compressed (deflate, or zstd with ``imagecodecs``), internally
tiled, pixel-interleaved GeoTIFF: memory holds one row of tiles, not the raster. This is the
tifffile backend; ``io.raster_backend`` chooses between it and rasterio.

Only north-up rasters are handled: a ``ModelPixelScale`` + single ``ModelTiepoint`` pair, or a
``ModelTransformation`` without rotation or shear. Rotated/sheared transformations, ground
control points (several tie points) and south-up rasters are refused with a ``ValueError``.
The CRS (``GeoKeyDirectory``, ``GeoDoubleParams``, ``GeoAsciiParams``) is copied verbatim;
``GTRasterTypeGeoKey`` (PixelIsArea / PixelIsPoint) is honoured when tie points are rewritten.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import tifffile

from anysat_jax.io import tiff_windows

MODEL_PIXEL_SCALE = 33550
MODEL_TIEPOINT = 33922
MODEL_TRANSFORMATION = 34264
GEO_KEY_DIRECTORY = 34735
GEO_DOUBLE_PARAMS = 34736
GEO_ASCII_PARAMS = 34737
CRS_TAGS = (GEO_KEY_DIRECTORY, GEO_DOUBLE_PARAMS, GEO_ASCII_PARAMS)
GDAL_METADATA = 42112
GDAL_NODATA = 42113
COMPRESSIONS = ("deflate", "zstd", "none")
_TIFF_COMPRESSION = {"deflate": "zlib", "zstd": "zstd", "none": None}
_TILE_BYTES = 2**24     # at most, uncompressed, all bands of a pixel-interleaved tile
_USER_DEFINED = 32767
_WGS84_ELLIPSOID, _GRS80_ELLIPSOID = 7030, 7019
_RASTER_TYPE_KEY = 1025
_PIXEL_IS_POINT = 2
_DOUBLE = 12  # TIFF data type code


class _NodataNoise(logging.Filter):
  """Drops tifffile's complaint that a GDAL_NODATA value (e.g. -9999) does not fit uint8."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "GDAL_NODATA" not in record.getMessage()


logging.getLogger("tifffile").addFilter(_NodataNoise())


@dataclasses.dataclass(frozen=True)
class GeoRef:
  """A north-up georeference in CRS units (x east, y north).

  Attributes:
    x0, y0: CRS coordinates of the outer top-left corner of pixel (0, 0).
    dx, dy: pixel width and height, both > 0 (rows go south).
    pixel_is_point: the file's ``GTRasterTypeGeoKey`` is PixelIsPoint.
    crs_tags: the CRS tags as tifffile ``extratags`` entries ``(code, dtype, count, value)``.
    geokeys: the decoded GeoKeys (name -> int, float or str), for metadata.
    wkt: the CRS as WKT when a reader resolved it (the rasterio backend), else None.
  """

  x0: float
  y0: float
  dx: float
  dy: float
  pixel_is_point: bool = False
  crs_tags: tuple[tuple[int, int, int, Any], ...] = ()
  geokeys: dict[str, Any] = dataclasses.field(default_factory=dict)
  wkt: str | None = None

  def xy(self, row: float, col: float) -> tuple[float, float]:
    """CRS coordinates of the pixel corner at fractional (row, col) (0, 0 = top-left)."""
    return self.x0 + col * self.dx, self.y0 - row * self.dy

  def window(self, row: float, col: float, factor: float = 1.0) -> GeoRef:
    """The georeference of a raster whose pixel (0, 0) starts at this raster's (row, col) and
    whose pixels are ``factor`` times larger (a crop, a window, or a coarser feature grid)."""
    x0, y0 = self.xy(row, col)
    return dataclasses.replace(self, x0=x0, y0=y0, dx=self.dx * factor, dy=self.dy * factor)

  @property
  def metric(self) -> bool:
    """True for a projected CRS in metres (pixel sizes comparable with a modality's gsd)."""
    return self.geokeys.get("GTModelTypeGeoKey") == 1 and \
        self.geokeys.get("ProjLinearUnitsGeoKey", 9001) == 9001

  @property
  def epsg(self) -> int | None:
    """The CRS's EPSG code when the GeoKeys name one (projected, else geographic), or resolve
    a user-defined UTM one (``ProjectionGeoKey`` 160zz/161zz on WGS 84, or on GRS 80: ETRS89
    zones 28-38, NAD83 zones 1-23); else None."""
    keys = self.geokeys
    for key in ("ProjectedCSTypeGeoKey", "GeographicTypeGeoKey"):
      code = keys.get(key)
      if isinstance(code, int) and 0 < code != _USER_DEFINED:
        return code
    proj = keys.get("ProjectionGeoKey")
    if not (isinstance(proj, int) and 16001 <= proj <= 16160 and 1 <= proj % 100 <= 60):
      return None
    zone, north = proj % 100, proj < 16100
    ellipsoid = keys.get("GeogEllipsoidGeoKey")
    if ellipsoid == _WGS84_ELLIPSOID or keys.get("GeographicTypeGeoKey") == 4326:
      return (32600 if north else 32700) + zone
    if ellipsoid == _GRS80_ELLIPSOID and north and 28 <= zone <= 38:
      return 25800 + zone
    if ellipsoid == _GRS80_ELLIPSOID and north and zone <= 23:
      return 26900 + zone
    return None

  def tags(self) -> list[tuple[int, int, int, Any, bool]]:
    """tifffile ``extratags`` writing this georeference (pixel scale + one tie point)."""
    half = 0.5 if self.pixel_is_point else 0.0  # raster (0, 0) is a pixel centre then
    x, y = self.xy(half, half)
    return [(MODEL_PIXEL_SCALE, _DOUBLE, 3, (self.dx, self.dy, 0.0), True),
            (MODEL_TIEPOINT, _DOUBLE, 6, (0.0, 0.0, 0.0, x, y, 0.0), True),
            *((code, dtype, count, value, True) for code, dtype, count, value in self.crs_tags)]


def _plain(value: Any) -> Any:
  """JSON-friendly GeoKey value (enums become ints)."""
  if isinstance(value, enum.Enum):
    return int(value.value)
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def _georef(page: tifffile.TiffPage, path: str) -> GeoRef | None:
  """The page's north-up georeference, or None when it has none."""
  tags = page.tags
  transform = tags.valueof(MODEL_TRANSFORMATION)
  if transform is not None:
    m = np.asarray(transform, np.float64).reshape(4, 4)
    if m[0, 1] or m[1, 0]:
      raise ValueError(f"{path}: the ModelTransformation is rotated or sheared "
                       f"({m[:2, :2].tolist()}); only north-up rasters are supported, resample "
                       "it first (e.g. gdalwarp)")
    dx, dy, (i, j, x, y) = m[0, 0], -m[1, 1], (0.0, 0.0, m[0, 3], m[1, 3])
  else:
    scale, tie = tags.valueof(MODEL_PIXEL_SCALE), tags.valueof(MODEL_TIEPOINT)
    if scale is None or tie is None:
      return None
    if len(tie) != 6:
      raise ValueError(f"{path}: {len(tie) // 6} tie points (ground control points); only one "
                       "tie point with a pixel scale is supported")
    (dx, dy), (i, j, _, x, y, _) = scale[:2], tie
  if not (dx > 0 and dy > 0):
    raise ValueError(f"{path}: pixel size ({dx}, {-dy}) is not north-up (x east, y north)")
  keys = page.geotiff_tags or {}
  point = _plain(keys.get("GTRasterTypeGeoKey")) == _PIXEL_IS_POINT
  half = 0.5 if point else 0.0
  crs = tuple((code, int(t.dtype), t.count, t.value) for code in CRS_TAGS
              if (t := tags.get(code)) is not None)
  geokeys = {str(k): _plain(v) for k, v in keys.items() if str(k).endswith("GeoKey")}
  return GeoRef(float(x - (i + half) * dx), float(y + (j + half) * dy), float(dx), float(dy),
                point, crs, geokeys)


def _nodata(page: tifffile.TiffPage, path: str) -> float | None:
  """The GDAL_NODATA value (a number or ``nan``), or None."""
  text = page.tags.valueof(GDAL_NODATA)
  if text is None:
    return None
  try:
    return float(str(text).strip("\x00 "))
  except ValueError:
    raise ValueError(f"{path}: GDAL_NODATA tag {text!r} is not a number") from None


def _to_bands(x: np.ndarray, axes: str, path: str) -> np.ndarray:
  if axes == "YX":
    return x[None]
  if axes == "YXS":
    return np.moveaxis(x, -1, 0)
  if len(axes) != 3 or not axes.endswith("YX"):
    raise ValueError(f"{path}: unexpected TIFF axes {axes!r} (shape {x.shape}); expected one "
                     "image of (bands, height, width)")
  return x


def read_header(path: str | os.PathLike) -> tuple[GeoRef | None, float | None, bool]:
  """(georeference or None, GDAL_NODATA value or None, whether the first image can be
  memory-mapped: uncompressed and contiguous) of a (Geo)TIFF, from its tags only."""
  path = os.fspath(path)
  with tifffile.TiffFile(path) as tif:
    page = tif.pages.first
    return _georef(page, path), _nodata(page, path), tif.series[0].dataoffset is not None


def memmap_bands(path: str | os.PathLike) -> np.ndarray:
  """The first image of an uncompressed, contiguous TIFF as a read-only (N, H, W) map."""
  path = os.fspath(path)
  with tifffile.TiffFile(path) as tif:
    axes = tif.series[0].axes
  return _to_bands(tifffile.memmap(path, mode="r", series=0), axes, path)


def open_bands(path: str | os.PathLike) -> tuple[Any, GeoRef | None, float | None]:
  """The first image of a (Geo)TIFF as a lazy (N, H, W) view in file band order and dtype: a
  read-only memory map when the file is uncompressed and contiguous, else a
  ``tiff_windows.TiffWindows`` that decodes the tiles or strips a window touches; with its
  georeference (or None) and GDAL_NODATA value (or None). Any interleave is accepted."""
  georef, nodata, mappable = read_header(path)
  if mappable:
    return memmap_bands(path), georef, nodata
  return tiff_windows.TiffWindows(path, nodata), georef, nodata


def read(path: str | os.PathLike) -> tuple[np.ndarray, GeoRef | None]:
  """Reads the first image of a (Geo)TIFF: (float32 (C, H, W) in file band order, georeference
  or None). Any interleave (pixel or band) is accepted."""
  path = os.fspath(path)
  with tifffile.TiffFile(path) as tif:
    series = tif.series[0]
    x = _to_bands(series.asarray(), series.axes, path)
    georef = _georef(tif.pages.first, path)
  return x.astype(np.float32), georef


def tile_side(bands: int) -> int:
  """Tile side (px, a multiple of 16, at most 256) keeping a tile of all bands under 16 MiB."""
  return int(min(256, max(16, math.isqrt(_TILE_BYTES // (4 * bands)) // 16 * 16)))


def output_tile_side(shape: tuple[int, int, int]) -> int:
  """Tile side of a written (H, W, D) raster: ``tile_side(D)``, smaller for small maps."""
  height, width, bands = shape
  return min(tile_side(bands), -(-max(height, width) // 16) * 16)


def _tiles(rows: Iterable[np.ndarray], height: int, width: int, side: int,
           fill: float, dtype: Any = np.float32) -> Iterator[np.ndarray]:
  """Tiles (side, side, D) in row-major order from row blocks (k, width, D) covering
  ``height`` rows; edge tiles padded with ``fill``. Holds one row of tiles."""
  buf: list[np.ndarray] = []
  have, done = 0, 0
  for block in itertools.chain(rows, [None]):
    if block is not None:
      if block.ndim != 3 or block.shape[1] != width:
        raise ValueError(f"row block of shape {block.shape} for a raster {width} px wide")
      buf.append(np.asarray(block, dtype))
      have += len(block)
    while have >= side or (block is None and have > 0):
      strip = np.concatenate(buf) if len(buf) > 1 else buf[0]
      take = min(side, have)
      if done + take > height or (block is None and done + take != height):
        raise ValueError(f"got {done + have} rows for a raster of {height} rows")
      for c in range(0, width, side):
        tile = np.full((side, side, strip.shape[-1]), fill, dtype)
        part = strip[:take, c:c + side]
        tile[:part.shape[0], :part.shape[1]] = part
        yield tile
      buf, have, done = [strip[take:]], have - take, done + take


def gdal_metadata(items: Mapping[str, str]) -> str:
  """Dataset metadata items as GDAL writes them in its GDAL_METADATA tag (XML)."""
  body = "".join(f"<Item name={quoteattr(k)}>{escape(v)}</Item>" for k, v in items.items())
  return f"<GDALMetadata>{body}</GDALMetadata>"


def write_rows(path: str | os.PathLike, shape: tuple[int, int, int],
               rows: Iterable[np.ndarray], georef: GeoRef | None,
               metadata: Mapping[str, str] | None = None, *, compression: str = "deflate",
               nodata: float | None = None, dtype: Any = np.float32,
               level: int | None = None) -> None:
  """Streams row blocks (k, W, D), top to bottom, into a tiled, pixel-interleaved
  GeoTIFF of ``shape`` (H, W, D) (BigTIFF when over 4 GB): ``compression`` deflate, zstd
  (needs ``imagecodecs``) or none, at the codec's ``level`` (None: its default); ``georef``
  (None: a plain TIFF); dataset metadata items (GDAL_METADATA, as GDAL writes them); ``nodata``
  written as GDAL_NODATA and used to pad edge tiles; ``dtype`` float32 or an integer type
  (class maps). Memory: one row of tiles."""
  if compression not in COMPRESSIONS:
    raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
  height, width, bands = shape
  tags = georef.tags() if georef is not None else []
  if metadata:
    tags.append((GDAL_METADATA, 2, 0, gdal_metadata(metadata), True))
  if nodata is not None:
    tags.append((GDAL_NODATA, 2, 0, "nan" if math.isnan(nodata) else repr(float(nodata)), True))
  side = output_tile_side(shape)
  fill = 0.0 if nodata is None else nodata
  codec = _TIFF_COMPRESSION[compression]
  try:
    with tifffile.TiffWriter(os.fspath(path), bigtiff=height * width * bands * 4 > 2**32 - 2**25
                             ) as tif:
      tiles = _tiles(rows, height, width, side, fill, dtype)
      one = bands == 1          # tifffile takes one band as a 2-D image, without a sample axis
      tif.write((t[..., 0] for t in tiles) if one else tiles,
                shape=(height, width) if one else (height, width, bands),
                dtype=dtype, tile=(side, side), photometric="minisblack",
                planarconfig=None if one else "contig", compression=codec, metadata=None,
                compressionargs=None if level is None or codec is None else {"level": level},
                extratags=tags)
  except (KeyError, ImportError, ModuleNotFoundError) as e:
    if compression != "zstd":
      raise
    raise ValueError(f"zstd compression needs the imagecodecs package ({e}); use deflate"
                     ) from None


def write(path: str | os.PathLike, data: np.ndarray, georef: GeoRef | None,
          metadata: Mapping[str, str] | None = None, *, compression: str = "deflate",
          nodata: float | None = None) -> None:
  """Writes float32 (C, H, W) like ``write_rows``."""
  data = np.asarray(data, np.float32)
  if data.ndim != 3:
    raise ValueError(f"expected (C, H, W), got shape {data.shape}")
  c, h, w = data.shape
  rows = (np.moveaxis(data[:, r:r + 256], 0, -1) for r in range(0, h, 256))
  write_rows(path, (h, w, c), rows, georef, metadata, compression=compression, nodata=nodata)
