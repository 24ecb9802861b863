"""Minimal GeoTIFF input/output with tifffile: (C, H, W) arrays plus a north-up georeference.

Only north-up rasters are handled: a ``ModelPixelScale`` + single ``ModelTiepoint`` pair, or a
``ModelTransformation`` without rotation or shear. Rotated/sheared transformations, ground
control points (several tie points) and south-up rasters are refused with a ``ValueError``.
The CRS (``GeoKeyDirectory``, ``GeoDoubleParams``, ``GeoAsciiParams``) is copied verbatim;
``GTRasterTypeGeoKey`` (PixelIsArea / PixelIsPoint) is honoured when tie points are rewritten.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np
import tifffile

MODEL_PIXEL_SCALE = 33550
MODEL_TIEPOINT = 33922
MODEL_TRANSFORMATION = 34264
GEO_KEY_DIRECTORY = 34735
GEO_DOUBLE_PARAMS = 34736
GEO_ASCII_PARAMS = 34737
CRS_TAGS = (GEO_KEY_DIRECTORY, GEO_DOUBLE_PARAMS, GEO_ASCII_PARAMS)
GDAL_METADATA = 42112
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
  """

  x0: float
  y0: float
  dx: float
  dy: float
  pixel_is_point: bool = False
  crs_tags: tuple[tuple[int, int, int, Any], ...] = ()
  geokeys: dict[str, Any] = dataclasses.field(default_factory=dict)

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


def read(path: str | os.PathLike) -> tuple[np.ndarray, GeoRef | None]:
  """Reads the first image of a (Geo)TIFF: (float32 (C, H, W) in file band order, georeference
  or None). Any interleave (pixel or band) is accepted."""
  path = os.fspath(path)
  with tifffile.TiffFile(path) as tif:
    series = tif.series[0]
    x, axes = series.asarray(), series.axes
    georef = _georef(tif.pages.first, path)
  if axes == "YX":
    x = x[None]
  elif axes == "YXS":
    x = np.moveaxis(x, -1, 0)
  elif len(axes) != 3 or not axes.endswith("YX"):
    raise ValueError(f"{path}: unexpected TIFF axes {axes!r} (shape {x.shape}); expected one "
                     "image of (bands, height, width)")
  return x.astype(np.float32), georef


def write(path: str | os.PathLike, data: np.ndarray, georef: GeoRef | None,
          metadata: Mapping[str, str] | None = None) -> None:
  """Writes float32 (C, H, W) as a band-interleaved GeoTIFF (BigTIFF when over 4 GB), with
  ``georef`` (None: a plain TIFF) and dataset metadata items (GDAL_METADATA, as GDAL writes
  them)."""
  data = np.asarray(data, np.float32)
  if data.ndim != 3:
    raise ValueError(f"expected (C, H, W), got shape {data.shape}")
  tags = georef.tags() if georef is not None else []
  if metadata:
    items = "".join(f"<Item name={quoteattr(k)}>{escape(v)}</Item>" for k, v in metadata.items())
    tags.append((GDAL_METADATA, 2, 0, f"<GDALMetadata>{items}</GDALMetadata>", True))
  tifffile.imwrite(os.fspath(path), data, photometric="minisblack", planarconfig="separate",
                   metadata=None, bigtiff=data.nbytes > 2**32 - 2**25, extratags=tags)
