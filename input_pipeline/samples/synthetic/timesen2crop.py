"""Fake TimeSen2Crop: ``num`` (default 6) pixels per tile.

Tiles ``32TNT``, ``33UWP`` (train), ``33TWN`` (val), ``33UVP`` (test), ``2019_33UVP`` (unused),
each with ``dates.csv`` (``acquisition_date`` YYYYMMDD) and ``<class 0-15>/<k>.csv`` (header
``B2,B3,B4,B5,B6,B7,B8A,B11,B12,Flag``, one row per date, reflectance x 1e4 integers, Flag 0
clear / 1 cloud / 2 shadow / 3 snow). T 5-8.
"""

from __future__ import annotations

import datetime
import os

import numpy as np

from input_pipeline.samples.synthetic import common
from input_pipeline.samples.synthetic.common import Rng

NUM = 6
CLASSES = 16
TILES = ("32TNT", "33UWP", "33TWN", "33UVP", "2019_33UVP")
BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B11", "B12")
_BASE = np.array([400, 700, 500, 1100, 2300, 2700, 3000, 1800, 900], np.float64)


def write(out: str, rng: Rng, num: int) -> list[str]:
  """Writes ``num`` pixels per tile under ``out``; returns ``<tile>_<class>_<k>`` names."""
  signature = rng.uniform(-1, 1, (CLASSES, len(BANDS)))
  phase = rng.uniform(0, 365, CLASSES)  # Day of peak greenness per class.
  nir = np.isin(BANDS, ("B6", "B7", "B8A"))
  names = []
  for tile in TILES:
    start = datetime.date(2019, 1, 1) if tile.startswith("2019") else datetime.date(2017, 9, 1)
    dates = common.dates(rng, int(rng.integers(5, 9)), start, 365)
    common.write_csv(os.path.join(out, tile, "dates.csv"), ("acquisition_date",),
                     [(common.ymd(d),) for d in dates])
    doy = np.array([d.timetuple().tm_yday for d in dates])
    counts = [0] * CLASSES
    for _ in range(num):
      c = int(rng.integers(CLASSES))
      season = np.cos(2 * np.pi * (doy - phase[c]) / 365)[:, None]
      x = _BASE * (1 + 0.3 * signature[c]) * (1 + 0.4 * season * nir)
      x = x * (1 + 0.03 * rng.normal(size=x.shape))
      flag = np.where(rng.uniform(size=len(dates)) < 0.15, rng.integers(1, 4, len(dates)), 0)
      x[flag == 1] += 3000
      x[flag == 2] *= 0.5
      x[flag == 3] += 5000 * ~nir
      rows = np.concatenate([np.clip(np.rint(x), 0, None), flag[:, None]], 1).astype(np.int64)
      common.write_csv(os.path.join(out, tile, str(c), f"{counts[c]}.csv"), BANDS + ("Flag",),
                       rows.tolist())
      names.append(f"{tile}_{c}_{counts[c]}")
      counts[c] += 1
  return names
