"""Cloud-optimized GeoTIFF writing (numpy and zlib; no GDAL), streamed from row blocks.

The layout is the one GDAL's COG driver writes and its validator checks: the full-resolution
IFD right after the header, then the IFDs of the overviews (reduced-resolution images,
``NewSubfileType`` 1) by decreasing size in the same IFD chain, then the tile data, smallest
overview first and the full-resolution tiles last, each image's tiles in row-major order. All
images are tiled and compressed alike; the georeference, metadata and nodata tags are written
as ``io.geotiff.write_rows`` writes them (georeference and metadata on the full-resolution image,
nodata on every image).

Overviews halve each side (rounding up) until the image fits in one tile; each overview pixel is
the mean of the finite values of its 2 x 2 parent pixels (NaN when there is none). Rows stream
in top to bottom: each level's compressed tiles are spooled to a temporary file next to the
output while memory holds one row of tiles per level; the file is assembled at the end by
copying the spooled tiles.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from typing import IO, Any

import numpy as np

from anysat_jax.io import geotiff

_COMPRESSION_CODE = {"deflate": 8, "zstd": 50000, "none": 1}
# TIFF field types: code -> (struct format of one value, bytes)
_SHORT, _LONG, _ASCII, _DOUBLE, _LONG8 = 3, 4, 2, 12, 16
_FORMATS = {_SHORT: "H", _LONG: "I", _ASCII: "s", _DOUBLE: "d", _LONG8: "Q", 1: "B"}


def _encoder(compression: str):
  if compression == "deflate":
    return lambda b: zlib.compress(b, 6)
  if compression == "zstd":
    try:
      import imagecodecs  # optional: only zstd needs it
    except ImportError as e:
      raise ValueError(f"zstd compression needs the imagecodecs package ({e}); use deflate"
                       ) from None
    return imagecodecs.zstd_encode
  if compression == "none":
    return bytes
  raise ValueError(f"compression must be one of {geotiff.COMPRESSIONS}, got {compression!r}")


def _halve(x: np.ndarray) -> np.ndarray:
  """(k, W, D) -> (ceil(k/2), ceil(W/2), D): mean of the finite values of each 2 x 2 block."""
  k, w, d = x.shape
  pad = np.full((k + k % 2, w + w % 2, d), np.nan, np.float32)
  pad[:k, :w] = x
  blocks = pad.reshape(pad.shape[0] // 2, 2, pad.shape[1] // 2, 2, d)
  finite = np.isfinite(blocks)
  total = np.where(finite, blocks, 0).sum(axis=(1, 3), dtype=np.float32)
  count = finite.sum(axis=(1, 3))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / count, np.float32(np.nan)).astype(np.float32)


class _Level:
  """One image of the pyramid: cuts its rows into tiles, compresses them into a spool file,
  and passes its rows, halved, to the next (smaller) level."""

  def __init__(self, height: int, width: int, side: int, fill: float, encode, spool: IO[bytes],
               below: _Level | None):
    self.height, self.width, self.side, self.fill = height, width, side, fill
    self.encode, self.spool, self.below = encode, spool, below
    self.rows: list[np.ndarray] = []
    self.have = self.done = 0
    self.odd: np.ndarray | None = None   # a row waiting for its pair before halving
    self.counts: list[int] = []

  def push(self, block: np.ndarray) -> None:
    if block.ndim != 3 or block.shape[1] != self.width:
      raise ValueError(f"row block of shape {block.shape} for a raster {self.width} px wide")
    if self.done + self.have + len(block) > self.height:
      raise ValueError(f"more than {self.height} rows")
    self.rows.append(block)
    self.have += len(block)
    while self.have >= self.side:
      self._strip(self.side)
    if self.below is not None:
      if self.odd is not None:
        block = np.concatenate([self.odd, block])
      even = len(block) - len(block) % 2
      self.odd = block[even:] if even < len(block) else None
      if even:
        self.below.push(_halve(block[:even]))

  def finish(self) -> None:
    if self.have:
      self._strip(self.have)
    if self.done != self.height:
      raise ValueError(f"got {self.done} rows for a raster of {self.height} rows")
    if self.below is not None:
      if self.odd is not None:
        self.below.push(_halve(self.odd))
      self.below.finish()

  def _strip(self, take: int) -> None:
    strip = np.concatenate(self.rows) if len(self.rows) > 1 else self.rows[0]
    side = self.side
    for c in range(0, self.width, side):
      tile = np.full((side, side, strip.shape[-1]), self.fill, np.float32)
      part = strip[:take, c:c + side]
      tile[:part.shape[0], :part.shape[1]] = part
      data = self.encode(tile.tobytes())
      self.spool.write(data)
      self.counts.append(len(data))
    self.rows, self.have, self.done = [strip[take:]], self.have - take, self.done + take


def _entry(code: int, dtype: int, values: Any) -> tuple[int, int, int, bytes]:
  """(tag, type, count, little-endian value bytes)."""
  if dtype == _ASCII:
    raw = values.encode("ascii") + b"\0" if isinstance(values, str) else bytes(values)
    return code, dtype, len(raw), raw
  values = list(values) if isinstance(values, (list, tuple, np.ndarray)) else [values]
  fmt = _FORMATS[dtype]
  return code, dtype, len(values), struct.pack(f"<{len(values)}{fmt}", *values)


def _ifd_size(entries: list[tuple[int, int, int, bytes]], big: bool) -> int:
  inline = 8 if big else 4
  head, each, tail = (8, 20, 8) if big else (2, 12, 4)
  extra = sum(len(raw) + len(raw) % 2 for *_, raw in entries if len(raw) > inline)
  return head + each * len(entries) + tail + extra


def _ifd_bytes(entries: list[tuple[int, int, int, bytes]], at: int, next_ifd: int,
               big: bool) -> bytes:
  """An IFD written at file offset ``at``; values that do not fit inline follow its entries."""
  inline = 8 if big else 4
  head, each, tail = (8, 20, 8) if big else (2, 12, 4)
  entries = sorted(entries)
  extra_at = at + head + each * len(entries) + tail
  body, extra = bytearray(struct.pack("<Q" if big else "<H", len(entries))), bytearray()
  for code, dtype, count, raw in entries:
    if len(raw) > inline:
      value = struct.pack("<Q" if big else "<I", extra_at + len(extra))
      extra += raw + b"\0" * (len(raw) % 2)
    else:
      value = raw.ljust(inline, b"\0")
    body += struct.pack("<HHQ" if big else "<HHI", code, dtype, count) + value
  body += struct.pack("<Q" if big else "<I", next_ifd)
  return bytes(body + extra)


def write_cog(path: str | os.PathLike, shape: tuple[int, int, int],
              rows: Iterable[np.ndarray], georef: geotiff.GeoRef | None,
              metadata: Mapping[str, str] | None = None, *, compression: str = "deflate",
              nodata: float | None = None, tile: int | None = None,
              bigtiff: bool | None = None) -> int:
  """Streams float32 row blocks (k, W, D), top to bottom, into a cloud-optimized GeoTIFF of
  ``shape`` (H, W, D) with internal overviews; arguments as ``io.geotiff.write_rows``;
  ``tile``: tile side, px, a multiple of 16 (default: as ``write_rows``); ``bigtiff``: None
  writes a BigTIFF only when offsets pass 4 GiB. Returns the number of overviews.

  Memory: one row of tiles per level. Disk: the compressed tiles once more, in temporary files
  next to ``path``, until the file is assembled."""
  encode = _encoder(compression)
  height, width, bands = shape
  side = tile or min(geotiff.tile_side(bands), -(-max(height, width) // 16) * 16)
  if side % 16 or side <= 0:
    raise ValueError(f"tile side must be a positive multiple of 16 px, got {side}")
  sizes = [(height, width)]
  while max(sizes[-1]) > side:
    sizes.append(tuple(-(-n // 2) for n in sizes[-1]))
  fill = 0.0 if nodata is None else float(nodata)
  directory = os.path.dirname(os.path.abspath(path))
  spools = [tempfile.TemporaryFile(dir=directory) for _ in sizes]
  try:
    level = None
    for (h, w), spool in zip(reversed(sizes), reversed(spools), strict=True):
      level = _Level(h, w, side, fill, encode, spool, level)
    levels = []
    while level is not None:
      levels.append(level)
      level = level.below
    for block in rows:
      levels[0].push(np.asarray(block, np.float32))
    levels[0].finish()
    _assemble(path, levels, bands, side, compression, georef, metadata, nodata, bigtiff)
  finally:
    for spool in spools:
      spool.close()
  return len(sizes) - 1


def _assemble(path: str | os.PathLike, levels: list[_Level], bands: int, side: int,
              compression: str, georef: geotiff.GeoRef | None,
              metadata: Mapping[str, str] | None, nodata: float | None,
              bigtiff: bool | None) -> None:
  """Writes header, all IFDs, then the spooled tiles (smallest level first)."""
  data_bytes = sum(sum(lv.counts) for lv in levels)
  big = bool(bigtiff)
  common = [_entry(258, _SHORT, [32] * bands), _entry(259, _SHORT, _COMPRESSION_CODE[compression]),
            _entry(262, _SHORT, 1), _entry(277, _SHORT, bands), _entry(284, _SHORT, 1),
            _entry(322, _LONG, side), _entry(323, _LONG, side),
            _entry(339, _SHORT, [3] * bands)]
  if bands > 1:
    common.append(_entry(338, _SHORT, [0] * (bands - 1)))
  if nodata is not None:
    common.append(_entry(geotiff.GDAL_NODATA, _ASCII,
                         "nan" if math.isnan(nodata) else repr(float(nodata))))
  main = [_entry(code, dtype, value) for code, dtype, _, value, _ in
          (georef.tags() if georef is not None else [])]
  if metadata:
    main.append(_entry(geotiff.GDAL_METADATA, _ASCII, geotiff.gdal_metadata(metadata)))

  def entries(i: int, offsets: list[int]) -> list[tuple[int, int, int, bytes]]:
    lv = levels[i]
    return [*common, *(main if i == 0 else []), _entry(254, _LONG, 0 if i == 0 else 1),
            _entry(256, _LONG, lv.width), _entry(257, _LONG, lv.height),
            _entry(324, _LONG8 if big else _LONG, offsets or [0] * len(lv.counts)),
            _entry(325, _LONG8 if big else _LONG, lv.counts)]

  def ifd_offsets() -> list[int]:
    at = [16 if big else 8]
    for i in range(len(levels)):
      at.append(at[-1] + _ifd_size(entries(i, []), big))
    return at

  ifd_at = ifd_offsets()
  if bigtiff is None and ifd_at[-1] + data_bytes >= 2**32:   # offsets past 4 GiB: BigTIFF
    big = True
    ifd_at = ifd_offsets()
  header = ifd_at[0]
  # Tile data after the IFDs: the smallest level first, the full resolution last.
  starts, at = {}, ifd_at[-1]
  for i in reversed(range(len(levels))):
    starts[i] = at
    at += sum(levels[i].counts)
  with open(path, "wb") as f:
    f.write(struct.pack("<2sHHHQ", b"II", 43, 8, 0, header) if big
            else struct.pack("<2sHI", b"II", 42, header))
    for i, lv in enumerate(levels):
      offsets = (starts[i] + np.concatenate([[0], np.cumsum(lv.counts)[:-1]])).tolist()
      nxt = ifd_at[i + 1] if i + 1 < len(levels) else 0
      f.write(_ifd_bytes(entries(i, offsets), ifd_at[i], nxt, big))
    for i in reversed(range(len(levels))):
      levels[i].spool.seek(0)
      shutil.copyfileobj(levels[i].spool, f, 2**22)
