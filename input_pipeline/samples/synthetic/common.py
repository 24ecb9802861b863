"""Helpers the fake-data writers share: smooth random fields, parcel maps, dates, file writers."""

from __future__ import annotations

import csv
import datetime
import json
import os
from collections.abc import Sequence

import numpy as np
import tifffile

Rng = np.random.Generator


def smooth(rng: Rng, h: int, w: int, cells: int = 4) -> np.ndarray:
  """A smooth random field (h, w) in [-1, 1]: a cells x cells grid, bilinearly upsampled."""
  low = rng.uniform(-1, 1, (cells, cells))
  ys, xs = np.linspace(0, cells - 1, h), np.linspace(0, cells - 1, w)
  y0, x0 = np.minimum(ys.astype(int), cells - 2), np.minimum(xs.astype(int), cells - 2)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = low[y0][:, x0] * (1 - fx) + low[y0][:, x0 + 1] * fx
  bottom = low[y0 + 1][:, x0] * (1 - fx) + low[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def parcels(rng: Rng, h: int, w: int, n: int) -> np.ndarray:
  """(h, w) int map of n Voronoi cells (field parcels, land-cover patches)."""
  seeds = rng.uniform(0, 1, (n, 2)) * (h, w)
  yy, xx = np.mgrid[:h, :w] + 0.5
  dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
  return dist.argmin(-1)


def blow_up(x: np.ndarray, factor: int) -> np.ndarray:
  """Nearest upsampling of the last two axes by an integer factor."""
  return x.repeat(factor, -2).repeat(factor, -1)


def dates(rng: Rng, n: int, start: datetime.date, span_days: int) -> list[datetime.date]:
  """n distinct sorted dates in [start, start + span_days)."""
  offsets = np.sort(rng.choice(span_days, n, replace=False))
  return [start + datetime.timedelta(days=int(o)) for o in offsets]


def ymd(d: datetime.date) -> str:
  return d.strftime("%Y%m%d")


def to_uint16(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 65535).astype(np.uint16)


def makedirs_for(path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)


def write_tif(path: str, x: np.ndarray, *, pixel_m: float, epsg: int,
              origin: tuple[float, float], rgb: bool = False) -> None:
  """A GeoTIFF (north-up, ``origin`` = top-left corner in the CRS).

  ``rgb``: x is (H, W, 3), pixel-interleaved photometric RGB; else x is (C, H, W), band-separate.
  """
  geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
  tags = [(33550, "d", 3, (pixel_m, pixel_m, 0.0), True),
          (33922, "d", 6, (0.0, 0.0, 0.0, origin[0], origin[1], 0.0), True),
          (34735, "H", len(geokeys), geokeys, True)]
  makedirs_for(path)
  if rgb:
    tifffile.imwrite(path, x, photometric="rgb", metadata=None, extratags=tags)
  else:
    tifffile.imwrite(path, x, photometric="minisblack", planarconfig="separate", metadata=None,
                     extratags=tags)


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
  makedirs_for(path)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def write_json(path: str, obj) -> None:
  makedirs_for(path)
  with open(path, "w") as f:
    json.dump(obj, f)
