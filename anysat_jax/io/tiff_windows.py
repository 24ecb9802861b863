"""Windows of a tiled or striped, compressed TIFF, decoded segment by segment (tifffile, numpy).

``TiffWindows(path)`` is a lazy (N, H, W) array of the file's first image: ``view[b0:b1, r0:r1,
c0:c1]`` reads and decodes only the tiles (or strips) the window touches, with any compression
and predictor tifffile decodes (deflate, LZW, zstd and others with ``imagecodecs``), pixel- or
band-interleaved. Decoded segments are kept in a small least-recently-used cache (``cache_mib``,
default ``CACHE_MIB`` = 64 MiB) so that neighbouring windows do not decode a tile again; memory
holds that cache and the window, not the file.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import numpy as np
import tifffile

CACHE_MIB = 64


class TiffWindows:
  """A lazy (N, H, W) view of a TIFF's first image (N bands in file order, the file's dtype)."""

  def __init__(self, path: str | os.PathLike, fill: float | None = None,
               cache_mib: int | None = None):
    self.path = os.fspath(path)
    self._tif = tifffile.TiffFile(self.path)
    page = self._page = self._tif.pages.first
    if page.imagedepth > 1:
      raise ValueError(f"{self.path}: a volumetric TIFF (image depth {page.imagedepth}) is not "
                       "an image of bands")
    self.dtype = np.dtype(page.dtype)
    bands = page.samplesperpixel
    self.shape = (bands, page.imagelength, page.imagewidth)
    self._separate = page.planarconfig == 2 and bands > 1
    self._seg_h = page.tilelength if page.is_tiled else min(page.rowsperstrip, self.shape[1])
    self._seg_w = page.tilewidth if page.is_tiled else self.shape[2]
    self._rows = math.ceil(self.shape[1] / self._seg_h)
    self._cols = math.ceil(self.shape[2] / self._seg_w)
    want = self._rows * self._cols * (bands if self._separate else 1)
    if len(page.dataoffsets) != want:
      raise ValueError(f"{self.path}: {len(page.dataoffsets)} tiles or strips, expected {want} "
                       f"for {self.shape[1]}x{self.shape[2]} px")
    self._fill = 0 if fill is None or (math.isnan(fill) and self.dtype.kind != "f") else fill
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._cache_bytes = 0
    self._budget = (CACHE_MIB if cache_mib is None else cache_mib) * 2**20

  ndim = 3

  def close(self) -> None:
    self._tif.close()

  def _segment(self, index: int) -> np.ndarray:
    """Decoded segment ``index`` (in the file's offsets order) as (h, w, samples)."""
    seg = self._cache.get(index)
    if seg is not None:
      self._cache.move_to_end(index)
      return seg
    page, fh = self._page, self._tif.filehandle
    offset, count = page.dataoffsets[index], page.databytecounts[index]
    data = None
    if count:
      with fh.lock:
        fh.seek(offset)
        data = fh.read(count)
    kwargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader} \
        if page.compression in (6, 7, 34892, 33007) else {}
    seg, _, shape = page.decode(data, index, _fullsize=page.is_tiled, **kwargs)
    samples = 1 if self._separate else self.shape[0]
    if seg is None:      # a sparse file's missing tile
      seg = np.full((self._seg_h, self._seg_w, samples), self._fill, self.dtype)
    else:
      seg = np.asarray(seg).reshape(shape[1], shape[2], samples)
    self._cache[index] = seg
    self._cache_bytes += seg.nbytes
    while self._cache_bytes > self._budget and len(self._cache) > 1:
      _, old = self._cache.popitem(last=False)
      self._cache_bytes -= old.nbytes
    return seg

  def __getitem__(self, key: Any) -> np.ndarray:
    if not (isinstance(key, tuple) and len(key) == 3
            and all(isinstance(k, slice) and k.step in (None, 1) for k in key)):
      raise TypeError(f"a TIFF window is indexed as [bands, rows, cols] (slices), not {key!r}")
    (b0, b1, _), (r0, r1, _), (c0, c1, _) = (s.indices(n) for s, n in zip(key, self.shape,
                                                                          strict=True))
    b1, r1, c1 = max(b0, b1), max(r0, r1), max(c0, c1)
    out = np.empty((b1 - b0, r1 - r0, c1 - c0), self.dtype)
    if out.size == 0:
      return out
    h, w = self._seg_h, self._seg_w
    planes = range(b0, b1) if self._separate else (None,)
    for i in range(r0 // h, (r1 - 1) // h + 1):
      for j in range(c0 // w, (c1 - 1) // w + 1):
        ys, ye = max(r0, i * h), min(r1, (i + 1) * h)
        xs, xe = max(c0, j * w), min(c1, (j + 1) * w)
        for p in planes:
          index = (0 if p is None else p * self._rows * self._cols) + i * self._cols + j
          seg = self._segment(index)[ys - i * h:ye - i * h, xs - j * w:xe - j * w]
          if p is None:
            out[:, ys - r0:ye - r0, xs - c0:xe - c0] = np.moveaxis(seg[..., b0:b1], -1, 0)
          else:
            out[p - b0, ys - r0:ye - r0, xs - c0:xe - c0] = seg[..., 0]
    return out

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    x = self[:, :, :]
    return x if dtype is None else x.astype(dtype)
