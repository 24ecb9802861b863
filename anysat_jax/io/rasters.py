"""One modality's raster and dates from a GeoTIFF, an HDF5 dataset or a ``.npy`` array (numpy).

A raster is read lazily where the file allows it (an uncompressed GeoTIFF or a ``.npy`` is
memory-mapped, a compressed GeoTIFF is read window by window by ``io.raster_backend``; ``.h5``
datasets are read once): ``Raster.data`` is a ``Bands`` view that selects
the bands, reshapes a series stored date by date as T*C bands to (T, C, H, W) and turns the
file's nodata value into NaN, window by window, so a large scene is never copied whole; the
mapped pages are released after each read, so resident memory does not grow with the file.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import mmap
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from anysat_jax.core import modalities as mods
from anysat_jax.io import geotiff, raster_backend

TIFF_SUFFIXES = (".tif", ".tiff")
H5_SUFFIXES = (".h5", ".hdf5")
_DATE = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")


def day_of_year(item: str | bytes | float) -> float:
  """Day of year (1 January = 1) of ``2020-01-02``, ``20200102`` or a name holding such a date
  (e.g. ``S2A_MSIL2A_20200102T102421_...``: the first one); a number up to 3 digits is taken as
  a day of year."""
  if isinstance(item, bytes):
    item = item.decode()
  if not isinstance(item, str):
    return float(item)
  s = item.strip()
  if re.fullmatch(r"\d{1,3}(\.\d*)?", s):
    return float(s)
  match = _DATE.search(s)
  if match is None:
    raise ValueError(f"not a date (YYYY-MM-DD, YYYYMMDD) nor a day of year: {s!r}")
  return float(datetime.date(*map(int, match.groups())).timetuple().tm_yday)


def parse_dates(spec: str) -> np.ndarray:
  """(T,) float32 days of year from a file (one date per line) or a comma-separated list."""
  if os.path.isfile(spec):
    with open(spec) as f:
      items = [line for line in f if line.strip()]
  else:
    items = spec.split(",")
  return np.array([day_of_year(i) for i in items], np.float32)


def _release(x: Any) -> None:
  """Drops the pages of a memory-mapped file that reads have mapped into this process: they
  stay in the page cache, but resident memory stays bounded by the windows read, not the file
  (a file mapping keeps every page it touched resident otherwise)."""
  while isinstance(x, np.ndarray):
    m = getattr(x, "_mmap", None)
    if m is not None:
      if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)
      return
    x = x.base


class Bands:
  """A lazy (C, H, W) or (T, C, H, W) float32 view of a file's (N, H, W) bands.

  ``index`` holds the 0-based file band of every output channel, shaped (C,) or (T, C).
  Slicing ``view[..., rows, cols]`` (the only indexing supported) reads those pixels of those
  bands, as float32, with ``nodata`` values replaced by NaN; ``np.asarray(view)`` reads all.
  """

  def __init__(self, base: Any, index: np.ndarray, nodata: float | None = None,
               offset: tuple[int, int] = (0, 0), size: tuple[int, int] | None = None):
    self.base, self.index, self.nodata = base, np.asarray(index, np.intp), nodata
    self.offset = offset
    self.size = size if size is not None else tuple(base.shape[-2:])

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.index.shape, *self.size)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def crop(self, row: int, col: int, height: int, width: int) -> Bands:
    """The view of ``height`` x ``width`` pixels from (row, col)."""
    return Bands(self.base, self.index, self.nodata,
                 (self.offset[0] + row, self.offset[1] + col), (height, width))

  def __getitem__(self, key: Any) -> np.ndarray:
    if not (isinstance(key, tuple) and len(key) == 3 and key[0] is Ellipsis
            and all(isinstance(k, slice) and k.step in (None, 1) for k in key[1:])):
      raise TypeError(f"a Bands view is indexed as [..., rows, cols] (slices), not {key!r}")
    (r0, r1, _), (c0, c1, _) = (s.indices(n) for s, n in zip(key[1:], self.size, strict=True))
    r0, r1 = r0 + self.offset[0], max(r0, r1) + self.offset[0]
    c0, c1 = c0 + self.offset[1], max(c0, c1) + self.offset[1]
    flat = self.index.ravel()
    x = np.asarray(self.base[flat.min():flat.max() + 1, r0:r1, c0:c1])[flat - flat.min()]
    x = x.astype(np.float32).reshape(*self.index.shape, r1 - r0, c1 - c0)
    _release(self.base)
    if self.nodata is not None and not math.isnan(self.nodata):
      x[x == np.float32(self.nodata)] = np.nan
    return x

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    x = self[..., :, :]
    return x if dtype is None else x.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Raster:
  """One modality as read from disk.

  Attributes:
    data: a lazy ``Bands`` view: image (C, H, W) or time series (T, C, H, W), float32 on read,
      NaN where the file holds its nodata value.
    dates: (T,) day of year, time series only.
    georef: the file's georeference (GeoTIFF inputs), for the pixel (0, 0) of ``data``.
    nodata: the file's nodata value (GeoTIFF ``GDAL_NODATA``), or None.
  """

  data: Bands
  dates: np.ndarray | None = None
  georef: geotiff.GeoRef | None = None
  nodata: float | None = None


def parse_bands(spec: str) -> tuple[int, ...]:
  """``1,2,3`` or ``2-4,8`` (1-based file bands) as a tuple of ints."""
  out: list[int] = []
  for part in spec.split(","):
    lo, sep, hi = part.strip().partition("-")
    try:
      out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
      raise ValueError(f"bands {spec!r}: expected 1-based band numbers like 1,2,3 or 2-4,8"
                       ) from None
  return tuple(out)


def _band_index(m: mods.Modality, shape: tuple[int, ...], bands: Sequence[int] | None,
                ndates: int | None, path: str) -> np.ndarray:
  """0-based file bands of every channel: (C,) for an image, (T, C) for a series; ``shape`` is
  the file array's, (N, H, W) or (T, C, H, W) (a series stored date by date as T*C bands)."""
  c, names = m.channels, ", ".join(m.bands)
  if len(shape) == 4:
    t, per = shape[:2]
  elif m.temporal:
    if ndates is None:
      raise ValueError(f"{m.name}: a time series needs dates (--dates {m.name}=... or "
                       "--h5_dates_key)")
    if shape[0] % ndates:
      raise ValueError(f"{m.name}: {shape[0]} bands in {path} are not a whole number of dates "
                       f"for {ndates} dates; a series is stored date by date as T*C bands")
    t, per = ndates, shape[0] // ndates
  else:
    t, per = None, shape[0]
  what = f"{per} bands per date" if t is not None else f"{per} bands"
  if bands is None:
    if per != c:
      raise ValueError(f"{m.name}: {path} has {what}, expected {c} ({names}); pick them with "
                       f"--bands {m.name}=1,2,... (1-based, in file order)")
    index = np.arange(c)
  else:
    bad = [b for b in bands if not 1 <= b <= per]
    if bad:
      raise ValueError(f"{m.name}: bands {bad} are not in 1..{per} ({path} has {what})")
    if len(set(bands)) != len(bands):
      raise ValueError(f"{m.name}: bands {list(bands)} repeat a band")
    if len(bands) != c:
      raise ValueError(f"{m.name}: {len(bands)} bands selected but the model reads {c} "
                       f"({names}), in that order")
    index = np.asarray(bands) - 1
  return index if t is None else np.arange(t)[:, None] * per + index[None]


def _read_array(modality: str, path: str, h5_key: str | None, h5_dates_key: str | None,
                backend: str | None = None
                ) -> tuple[Any, np.ndarray | None, geotiff.GeoRef | None, float | None]:
  """(bands (N, H, W) or (T, C, H, W), dates from the file, georef, nodata)."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in H5_SUFFIXES and (h5_key or h5_dates_key):
    raise ValueError(f"{modality}: --h5_key / --h5_dates_key given but {path} is not .h5")
  if suffix in TIFF_SUFFIXES:
    x, georef, nodata = raster_backend.open_bands(path, backend)
    return x, None, georef, nodata
  if suffix in H5_SUFFIXES:
    import h5py  # optional: only .h5 inputs need it

    with h5py.File(path, "r") as f:
      for key in (h5_key, h5_dates_key):
        if key is not None and key not in f:
          raise ValueError(f"{modality}: {path} has no dataset {key!r} (it has: {', '.join(f)})")
      if h5_key is None:
        raise ValueError(f"{modality}: {path} is an HDF5 file; name its dataset with --h5_key "
                         f"{modality}=KEY (it has: {', '.join(f)})")
      x = np.asarray(f[h5_key])
      dates = None
      if h5_dates_key is not None:
        dates = np.array([day_of_year(d) for d in f[h5_dates_key][()]], np.float32)
    return x, dates, None, None
  if suffix == ".npy":
    return np.load(path, mmap_mode="r", allow_pickle=False), None, None, None
  raise ValueError(f"{modality}: {path}: unknown input format {suffix!r} (expected .tif, .h5 "
                   "or .npy)")


def read_input(modality: str, path: str, dates: np.ndarray | None = None,
               h5_key: str | None = None, h5_dates_key: str | None = None,
               bands: Sequence[int] | None = None, backend: str | None = None) -> Raster:
  """Reads one modality from a GeoTIFF, ``.h5`` (dataset ``h5_key``, dates from the dataset
  ``h5_dates_key``: numbers or strings holding dates) or ``.npy`` file, with checks.

  ``bands``: the file's 1-based bands feeding the registry's channels, in the registry's order
  (default: all, when the file has exactly the registry's count per date). ``backend``: the
  GeoTIFF reader (``io.raster_backend``; None: the active one).
  """
  m = mods.get(modality)
  x, file_dates, georef, nodata = _read_array(modality, path, h5_key, h5_dates_key, backend)
  if file_dates is not None:
    if dates is not None:
      raise ValueError(f"{modality}: dates given twice (--dates and --h5_dates_key)")
    dates = file_dates
  if x.dtype.kind not in "iuf":
    raise ValueError(f"{modality}: {path} holds {x.dtype} values; expected real numbers")
  if georef is not None and georef.metric and not (
      math.isclose(georef.dx, m.gsd, rel_tol=1e-3) and math.isclose(georef.dy, m.gsd,
                                                                     rel_tol=1e-3)):
    raise ValueError(f"{modality}: {path} has {georef.dx:g} x {georef.dy:g} m pixels but the "
                     f"model reads {modality} at {m.gsd:g} m; resample it first")
  if x.ndim == 2:
    x = x[None]
  layout = "(T, C, H, W) or (T*C, H, W)" if m.temporal else "(C, H, W)"
  if x.ndim != 3 and not (m.temporal and x.ndim == 4):
    raise ValueError(f"{modality}: expected {layout} with C = {m.channels} "
                     f"({', '.join(m.bands)}), got shape {x.shape} from {path}")
  if not m.temporal and dates is not None:
    raise ValueError(f"{modality}: a single image takes no dates")
  index = _band_index(m, x.shape, bands, None if dates is None else len(dates), path)
  if m.temporal:
    if dates is None:
      raise ValueError(f"{modality}: a time series needs dates (--dates {modality}=... or "
                       "--h5_dates_key)")
    if len(dates) != index.shape[0]:
      raise ValueError(f"{modality}: {len(dates)} dates for {index.shape[0]} acquisitions in "
                       f"{path}")
    dates = np.asarray(dates, np.float32)
  base = x if x.ndim == 3 else x.reshape(-1, *x.shape[-2:])   # lazy views are (N, H, W)
  return Raster(Bands(base, index, nodata), dates, georef, nodata)


def center_crop(raster: Raster, height: int, width: int) -> Raster:
  """The central ``height`` x ``width`` pixels (offsets rounded down), georeference moved."""
  h, w = raster.data.shape[-2:]
  if not (0 < height <= h and 0 < width <= w):
    raise ValueError(f"cannot crop {height}x{width} px out of {h}x{w} px")
  r0, c0 = (h - height) // 2, (w - width) // 2
  georef = raster.georef.window(r0, c0) if raster.georef is not None else None
  return dataclasses.replace(raster, data=raster.data.crop(r0, c0, height, width),
                             georef=georef)
