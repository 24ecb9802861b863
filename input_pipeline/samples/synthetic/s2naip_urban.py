"""Fake S2NAIP-Urban: ``num`` (default 2) examples per split (train, val).

``<split>_dict.json`` (lists ``name``, ``s2_dates``, ``s1_dates``, ``l8_dates``; dates
``"YYYYMMDD"``), ``naip/<name>.png`` (RGBA = R, G, B, NIR, 512 x 512), ``sentinel2/<name>_8.tif``
(T*4 bands B2, B3, B4, B8, 64 x 64 uint16), ``_16.tif`` (T*6 bands B5, B6, B7, B8A, B11, B12,
32 x 32), ``sentinel1/<name>.tif`` (T*2 bands VV, VH, dB float32, 64 x 64),
``landsat/<name>_8.tif`` (T bands B8 pan, 64 x 64 uint16) and ``_16.tif`` (T*10 bands B1-B7, B9,
B10, B11, 32 x 32). Bands are date-major. T: s2 4-6, s1 2-3, l8 4. The unused ``openstreetmap/``
labels are not written. Land covers: built-up, vegetation, water, bare soil.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
from PIL import Image

from input_pipeline.samples.synthetic import common
from input_pipeline.samples.synthetic.common import Rng

NUM = 2
# Per land cover: NAIP R, G, B, NIR.
_NAIP_RGBN = np.array([[150, 140, 135, 90], [70, 100, 60, 170], [40, 60, 80, 20],
                       [170, 150, 120, 110]], np.float64)
# Reflectance x 1e4 in the projector's order B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12.
_S2_COVER = np.array([[1100, 1200, 1300, 1400, 1500, 1600, 1700, 1750, 2200, 2000],
                      [400, 700, 500, 1100, 2300, 2700, 2900, 3000, 1800, 900],
                      [600, 700, 500, 400, 300, 250, 200, 180, 100, 80],
                      [1200, 1500, 1800, 2000, 2200, 2300, 2400, 2500, 3000, 2600]], np.float64)
_S2_10M, _S2_20M = [0, 1, 2, 6], [3, 4, 5, 7, 8, 9]  # B2 B3 B4 B8 | B5 B6 B7 B8A B11 B12
_S1_COVER = np.array([[-5, -12], [-8, -14], [-20, -26], [-12, -20]], np.float64)  # VV, VH dB
# Landsat-8 L1 digital numbers, order B8 (pan), B1-B7, B9, B10, B11.
_L8_COVER = np.array(
    [[11000, 10500, 10200, 10000, 10300, 13000, 14000, 12500, 5100, 27000, 25500],
     [8500, 9500, 9000, 9200, 8200, 20000, 14000, 10000, 5050, 24500, 23500],
     [7800, 9800, 9200, 8500, 7500, 6800, 5800, 5600, 5000, 23000, 22000],
     [12000, 10800, 10800, 11500, 12500, 16000, 18500, 16000, 5100, 28000, 26500]], np.float64)


def _cover_series(rng: Rng, table: np.ndarray, cover: np.ndarray, t: int,
                  jitter: float) -> np.ndarray:
  """(T, C, H, W) values of ``table[cover]`` with a smooth field, date gains and noise."""
  h, w = cover.shape
  x = np.moveaxis(table[cover], -1, 0)[None] * (1 + 0.08 * common.smooth(rng, h, w))
  x = x * (1 + 0.05 * rng.normal(size=(t, 1, 1, 1)))
  return x + jitter * rng.normal(size=x.shape)


def write(out: str, rng: Rng, num: int) -> list[str]:
  """Writes ``num`` examples per split under ``out``; returns their names."""
  names = []
  for split in ("train", "val"):
    table: dict[str, list] = {"name": [], "s2_dates": [], "s1_dates": [], "l8_dates": []}
    for _ in range(num):
      name = f"{int(rng.integers(10_000, 100_000))}_{int(rng.integers(10_000, 100_000))}"
      cover16 = rng.integers(4, size=8)[common.parcels(rng, 16, 16, 8)]
      origin = (float(rng.integers(400, 600)) * 1000, float(rng.integers(4000, 4400)) * 1000)
      geo = {"epsg": 32610, "origin": origin}
      naip = _NAIP_RGBN[common.blow_up(cover16, 32)]
      naip += 25 * common.smooth(rng, 512, 512, 8)[..., None]
      naip += 8 * rng.normal(size=naip.shape)
      path = os.path.join(out, "naip", name + ".png")
      common.makedirs_for(path)
      Image.fromarray(np.clip(np.rint(naip), 0, 255).astype(np.uint8), "RGBA").save(path)
      t_s2, t_s1, t_l8 = int(rng.integers(4, 7)), int(rng.integers(2, 4)), 4
      year_start = datetime.date(int(rng.integers(2019, 2022)), 1, 1)
      cover64, cover32 = common.blow_up(cover16, 4), common.blow_up(cover16, 2)
      s2_10 = _cover_series(rng, _S2_COVER[:, _S2_10M], cover64, t_s2, 30)
      s2_20 = _cover_series(rng, _S2_COVER[:, _S2_20M], cover32, t_s2, 30)
      s1 = _cover_series(rng, _S1_COVER, cover64, t_s1, 1.0)
      pan = _cover_series(rng, _L8_COVER[:, :1], cover64, t_l8, 100)
      l8 = _cover_series(rng, _L8_COVER[:, 1:], cover32, t_l8, 100)
      files = {("sentinel2", "_8"): (common.to_uint16(s2_10), 10.0),
               ("sentinel2", "_16"): (common.to_uint16(s2_20), 20.0),
               ("sentinel1", ""): (s1.astype(np.float32), 10.0),
               ("landsat", "_8"): (common.to_uint16(pan), 10.0),
               ("landsat", "_16"): (common.to_uint16(l8), 20.0)}
      for (folder, suffix), (x, pixel_m) in files.items():
        common.write_tif(os.path.join(out, folder, f"{name}{suffix}.tif"),
                         x.reshape(-1, *x.shape[-2:]), pixel_m=pixel_m, **geo)
      table["name"].append(name)
      for key, t in (("s2_dates", t_s2), ("s1_dates", t_s1), ("l8_dates", t_l8)):
        table[key].append([common.ymd(d) for d in common.dates(rng, t, year_start, 365)])
      names.append(name)
    common.write_json(os.path.join(out, f"{split}_dict.json"), table)
  return names
