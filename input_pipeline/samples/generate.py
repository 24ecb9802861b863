"""Writes small, format-faithful fake datasets in the published on-disk layouts.

For the datasets of which no public sample exists (``shared/data/README.md`` section 5): same
file types, keys, dtypes, per-pixel shapes and date formats as the real releases, with few
examples and short time series. Values are drawn in the real ranges and the labels have spatial
(or spectral) structure that the inputs reflect, so a model can overfit them. The output depends
only on ``seed`` (byte-identical files for the same seed).

Usage::

  python -m input_pipeline.samples.generate DATASET OUT_DIR [--seed N] [--num N]

Datasets (``num`` = what it counts, default):

- ``planted``: ``<split>/labels2.json`` (``{id: class 0-39}``) and ``<split>/<id>/<id>_<m>.npz``
  (``arr_0`` float32 (T, H, W, C)), ``<id>_<m>_mask.npz`` (uint8 0/1, same shape) and
  ``<id>_<m>_timestamp.npz`` (int64 (T,), ms since the Unix epoch) for ``m`` in s2 (8, 12, 12,
  10), s1 (8, 12, 12, 3: VV, VH dB, incidence angle), l7 (20, 4, 4, 6), alos (4, 4, 4, 3: HH, HV
  DN, incidence angle), modis (60, 1, 1, 7): the real fixed shapes. ``num`` per split (3).
- ``s2naip_urban``: ``<split>_dict.json`` (lists ``name``, ``s2_dates``, ``s1_dates``,
  ``l8_dates``; dates ``"YYYYMMDD"``), ``naip/<name>.png`` (RGBA = R, G, B, NIR, 512 x 512),
  ``sentinel2/<name>_8.tif`` (T*4 bands B2, B3, B4, B8, 64 x 64 uint16), ``_16.tif`` (T*6 bands
  B5, B6, B7, B8A, B11, B12, 32 x 32), ``sentinel1/<name>.tif`` (T*2 bands VV, VH, dB float32,
  64 x 64), ``landsat/<name>_8.tif`` (T bands B8 pan, 64 x 64 uint16) and ``_16.tif`` (T*10 bands
  B1-B7, B9, B10, B11, 32 x 32). Bands are date-major. T: s2 4-6, s1 2-3, l8 4. ``num`` per
  split (2). The unused ``openstreetmap/`` labels are not written.
- ``bradd_s1ts``: ``meta.csv`` (index, ``file``, ``close_set``) and ``Samples/<file>``, a
  ``torch.save`` zip archive (written without torch by ``anysat_jax.io.torch_pickle.save_pth``) of
  a dict ``image`` float32 (T, 2, 48, 48) (VV, VH linear power), ``image_dates`` /
  ``label_dates`` (lists of ``datetime.datetime``) and ``label`` uint8 (2, 48, 48) (entry 0
  zeros, entry 1 the deforestation map). T 4-8. ``num`` per split (3).
- ``sickle``: ``sickle_dataset_tabular.csv`` (``UNIQUE_ID``, ``PLOT_ID``, ``SPLIT``, ``YEAR``,
  ``STANDARD_SEASON``, ``SOWING_DAY``, ``TRANSPLANTING_DAY``, ``HARVESTING_DAY``),
  ``images/S2/npy/<uid>/<name>.npz`` (uint16 per band B1-B12 incl. B8A, B9; names
  ``<date>T..._<date>T..._T44PMT`` or ``T44PMT_<date>T...``), ``images/S1/npy/<uid>/S1A_IW_GRDH_
  1SDV_<date>T..._....npz`` (float32 VV, VH dB, angle), ``images/L8/npy/<uid>/LC08_142052_
  <date>.npz`` (uint16 SR_B1-SR_B7, ST_B10, QA_PIXEL) and ``masks/10m/<uid>.tif`` (float32, 6
  bands: plot id, crop type (1 paddy, 2-21 other), sowing, transplanting, harvesting day, yield;
  the release's masks have several layers, of which AnySat reads the first two). 10 m rasters
  are 28-40 px per side, Landsat 30 m ones a third of that (assumed: the release's sizes vary
  and are not documented; readers resize to 32 x 32). One S2 file lacks ``B12``, as happens in
  the release. ``num`` per split (3).
- ``timesen2crop``: tiles ``32TNT``, ``33UWP`` (train), ``33TWN`` (val), ``33UVP`` (test),
  ``2019_33UVP`` (unused), each with ``dates.csv`` (``acquisition_date`` YYYYMMDD) and
  ``<class 0-15>/<k>.csv`` (header ``B2,B3,B4,B5,B6,B7,B8A,B11,B12,Flag``, one row per date,
  reflectance x 1e4 integers, Flag 0 clear / 1 cloud / 2 shadow / 3 snow). T 5-8. ``num`` pixels
  per tile (6).
- ``pastis_hd_spot``: ``DATA_SPOT/PASTIS_SPOT6_RVB_1M00_2019/SPOT6_RVB_1M00_2019_<id>.tif``, RGB
  uint8 pixel-interleaved GeoTIFF (EPSG:2154). If ``OUT_DIR`` holds a PASTIS root
  (``metadata.geojson``, ``DATA_S2``), one image per ``ID_PATCH`` with 10 SPOT pixels per S2
  pixel over the same extent (the real 1280 x 1280 at 1 m for 128 x 128 S2 patches; 320 x 320 at
  4 m for the shipped sample's 32 x 32 patches, which were downsampled 4x), coloured by the
  patch's ``TARGET`` classes; otherwise ``num`` (2) fresh 1280 x 1280 images.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import tifffile
from PIL import Image

from anysat_jax.io.torch_pickle.writer import save_pth

Rng = np.random.Generator


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _smooth(rng: Rng, h: int, w: int, cells: int = 4) -> np.ndarray:
  """A smooth random field (h, w) in [-1, 1]: a cells x cells grid, bilinearly upsampled."""
  low = rng.uniform(-1, 1, (cells, cells))
  ys, xs = np.linspace(0, cells - 1, h), np.linspace(0, cells - 1, w)
  y0, x0 = np.minimum(ys.astype(int), cells - 2), np.minimum(xs.astype(int), cells - 2)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = low[y0][:, x0] * (1 - fx) + low[y0][:, x0 + 1] * fx
  bottom = low[y0 + 1][:, x0] * (1 - fx) + low[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _parcels(rng: Rng, h: int, w: int, n: int) -> np.ndarray:
  """(h, w) int map of n Voronoi cells (field parcels, land-cover patches)."""
  seeds = rng.uniform(0, 1, (n, 2)) * (h, w)
  yy, xx = np.mgrid[:h, :w] + 0.5
  dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
  return dist.argmin(-1)


def _blow_up(x: np.ndarray, factor: int) -> np.ndarray:
  """Nearest upsampling of the last two axes by an integer factor."""
  return x.repeat(factor, -2).repeat(factor, -1)


def _dates(rng: Rng, n: int, start: datetime.date, span_days: int) -> list[datetime.date]:
  """n distinct sorted dates in [start, start + span_days)."""
  offsets = np.sort(rng.choice(span_days, n, replace=False))
  return [start + datetime.timedelta(days=int(o)) for o in offsets]


def _ymd(d: datetime.date) -> str:
  return d.strftime("%Y%m%d")


def _makedirs_for(path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)


def _write_tif(path: str, x: np.ndarray, *, pixel_m: float, epsg: int,
               origin: tuple[float, float], rgb: bool = False) -> None:
  """A GeoTIFF (north-up, ``origin`` = top-left corner in the CRS).

  ``rgb``: x is (H, W, 3), pixel-interleaved photometric RGB; else x is (C, H, W), band-separate.
  """
  geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
  tags = [(33550, "d", 3, (pixel_m, pixel_m, 0.0), True),
          (33922, "d", 6, (0.0, 0.0, 0.0, origin[0], origin[1], 0.0), True),
          (34735, "H", len(geokeys), geokeys, True)]
  _makedirs_for(path)
  if rgb:
    tifffile.imwrite(path, x, photometric="rgb", metadata=None, extratags=tags)
  else:
    tifffile.imwrite(path, x, photometric="minisblack", planarconfig="separate", metadata=None,
                     extratags=tags)


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
  _makedirs_for(path)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def _write_json(path: str, obj) -> None:
  _makedirs_for(path)
  with open(path, "w") as f:
    json.dump(obj, f)


def _to_uint16(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 65535).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# PLANTED.

PLANTED_CLASSES = 40
# modality -> (T, H, W, per-channel typical value); channels as stored.
_PLANTED = {
    "s2": (8, 12, 12, (400, 700, 500, 1100, 2300, 2700, 2900, 3000, 1800, 900)),
    "s1": (8, 12, 12, (-11.0, -17.0, 38.0)),
    "l7": (20, 4, 4, (400, 700, 600, 2800, 1800, 900)),
    "alos": (4, 4, 4, (5000.0, 2200.0, 35.0)),
    "modis": (60, 1, 1, (500, 2800, 300, 600, 2600, 1700, 800)),
}


def _planted_dates(rng: Rng, mod: str, t: int) -> list[datetime.date]:
  if mod == "alos":  # Yearly mosaics.
    return [datetime.date(2017 + i, 7, 1) for i in range(t)]
  if mod == "modis":  # 8-day composites.
    start = datetime.date(2018, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
    return [start + datetime.timedelta(days=8 * i) for i in range(t)]
  return _dates(rng, t, datetime.date(2018, 1, 1), 3 * 365)


def _planted_valid(rng: Rng, mod: str, shape: tuple[int, ...]) -> np.ndarray:
  """uint8 (T, H, W, C) validity: cloudy S2 dates, Landsat-7 SLC-off stripes, random gaps."""
  t, h, w, c = shape
  valid = rng.uniform(size=(t, h, w, 1)) > 0.03
  if mod in ("s2", "modis"):
    valid &= (rng.uniform(size=(t, 1, 1, 1)) > 0.25)
  if mod == "l7":
    stripes = (np.arange(h)[:, None] + np.arange(w)[None, :]) % 3 == 0
    valid &= ~(stripes[None, :, :, None] & (np.arange(t) % 2 == 1)[:, None, None, None])
  return np.broadcast_to(valid, shape).astype(np.uint8)


def _gen_planted(out: str, rng: Rng, num: int) -> list[str]:
  signature = {m: rng.uniform(-1, 1, (PLANTED_CLASSES, len(v[3]))) for m, v in _PLANTED.items()}
  ids = [str(1_000_000 + i) for i in rng.choice(9_000_000, 3 * num, replace=False)]
  names = []
  for s, split in enumerate(("train", "val", "test")):
    labels = {}
    for sid in ids[s * num:(s + 1) * num]:
      c = int(rng.integers(PLANTED_CLASSES))
      labels[sid] = c
      for mod, (t, h, w, base) in _PLANTED.items():
        shape = (t, h, w, len(base))
        field = _smooth(rng, h, w)[None, :, :, None]
        gain = 1 + 0.25 * signature[mod][c] + 0.08 * field + 0.05 * rng.normal(size=shape)
        x = (np.asarray(base, np.float64) * gain).astype(np.float32)
        valid = _planted_valid(rng, mod, shape)
        x[valid == 0] = 0
        ms = [(d - datetime.date(1970, 1, 1)).days * 86_400_000 + int(rng.integers(86_400_000))
              for d in _planted_dates(rng, mod, t)]
        prefix = os.path.join(out, split, sid, f"{sid}_{mod}")
        _makedirs_for(prefix)
        np.savez(prefix + ".npz", x)
        np.savez(prefix + "_mask.npz", valid)
        np.savez(prefix + "_timestamp.npz", np.array(ms, np.int64))
      names.append(sid)
    _write_json(os.path.join(out, split, "labels2.json"), labels)
  return names


# ---------------------------------------------------------------------------------------------
# S2NAIP-Urban. Land covers: built-up, vegetation, water, bare soil.

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
  x = np.moveaxis(table[cover], -1, 0)[None] * (1 + 0.08 * _smooth(rng, h, w))
  x = x * (1 + 0.05 * rng.normal(size=(t, 1, 1, 1)))
  return x + jitter * rng.normal(size=x.shape)


def _gen_s2naip(out: str, rng: Rng, num: int) -> list[str]:
  names = []
  for split in ("train", "val"):
    table: dict[str, list] = {"name": [], "s2_dates": [], "s1_dates": [], "l8_dates": []}
    for _ in range(num):
      name = f"{int(rng.integers(10_000, 100_000))}_{int(rng.integers(10_000, 100_000))}"
      cover16 = rng.integers(4, size=8)[_parcels(rng, 16, 16, 8)]
      origin = (float(rng.integers(400, 600)) * 1000, float(rng.integers(4000, 4400)) * 1000)
      geo = {"epsg": 32610, "origin": origin}
      naip = _NAIP_RGBN[_blow_up(cover16, 32)] + 25 * _smooth(rng, 512, 512, 8)[..., None]
      naip += 8 * rng.normal(size=naip.shape)
      path = os.path.join(out, "naip", name + ".png")
      _makedirs_for(path)
      Image.fromarray(np.clip(np.rint(naip), 0, 255).astype(np.uint8), "RGBA").save(path)
      t_s2, t_s1, t_l8 = int(rng.integers(4, 7)), int(rng.integers(2, 4)), 4
      year_start = datetime.date(int(rng.integers(2019, 2022)), 1, 1)
      s2_10 = _cover_series(rng, _S2_COVER[:, _S2_10M], _blow_up(cover16, 4), t_s2, 30)
      s2_20 = _cover_series(rng, _S2_COVER[:, _S2_20M], _blow_up(cover16, 2), t_s2, 30)
      s1 = _cover_series(rng, _S1_COVER, _blow_up(cover16, 4), t_s1, 1.0)
      pan = _cover_series(rng, _L8_COVER[:, :1], _blow_up(cover16, 4), t_l8, 100)
      l8 = _cover_series(rng, _L8_COVER[:, 1:], _blow_up(cover16, 2), t_l8, 100)
      files = {("sentinel2", "_8"): (_to_uint16(s2_10), 10.0),
               ("sentinel2", "_16"): (_to_uint16(s2_20), 20.0),
               ("sentinel1", ""): (s1.astype(np.float32), 10.0),
               ("landsat", "_8"): (_to_uint16(pan), 10.0),
               ("landsat", "_16"): (_to_uint16(l8), 20.0)}
      for (folder, suffix), (x, pixel_m) in files.items():
        _write_tif(os.path.join(out, folder, f"{name}{suffix}.tif"),
                   x.reshape(-1, *x.shape[-2:]), pixel_m=pixel_m, **geo)
      table["name"].append(name)
      for key, t in (("s2_dates", t_s2), ("s1_dates", t_s1), ("l8_dates", t_l8)):
        table[key].append([_ymd(d) for d in _dates(rng, t, year_start, 365)])
      names.append(name)
    _write_json(os.path.join(out, f"{split}_dict.json"), table)
  return names


# ---------------------------------------------------------------------------------------------
# BraDD-S1TS.

BRADD_SIZE = 48


def _blobs(rng: Rng, size: int, n: int) -> np.ndarray:
  """uint8 (size, size) union of n random ellipses (clearings)."""
  yy, xx = np.mgrid[:size, :size]
  out = np.zeros((size, size), bool)
  for _ in range(n):
    cy, cx = rng.uniform(0, size, 2)
    ry, rx = rng.uniform(4, 12, 2)
    out |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  return out.astype(np.uint8)


def _gen_bradd(out: str, rng: Rng, num: int) -> list[str]:
  rows = []
  for close_set in ("train", "validation", "test"):
    for _ in range(num):
      file = f"sample_{len(rows):05d}.pt"
      t = int(rng.integers(4, 9))
      start = datetime.datetime(2019, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
      image_dates = [start + datetime.timedelta(days=12 * i) for i in range(t)]
      label_dates = [image_dates[0] - datetime.timedelta(days=int(rng.integers(0, 20))),
                     image_dates[-1] + datetime.timedelta(days=int(rng.integers(0, 20)))]
      change = _blobs(rng, BRADD_SIZE, int(rng.integers(1, 4)))
      field = 1 + 0.2 * _smooth(rng, BRADD_SIZE, BRADD_SIZE)
      base = np.array([0.12, 0.03])[None, :, None, None] * field  # Forest VV, VH.
      speckle = rng.gamma(4.0, 0.25, size=(t, 2, BRADD_SIZE, BRADD_SIZE))
      after = (np.arange(t) >= int(rng.integers(1, t)))[:, None, None, None]
      loss = np.where(after & (change == 1), np.array([0.6, 0.35])[None, :, None, None], 1.0)
      path = os.path.join(out, "Samples", file)
      _makedirs_for(path)
      save_pth(path, {
          "image": (base * speckle * loss).astype(np.float32),
          "image_dates": image_dates,
          "label_dates": label_dates,
          "label": np.stack([np.zeros_like(change), change]),
      })
      rows.append((len(rows), file, close_set))
  _write_csv(os.path.join(out, "meta.csv"), ("", "file", "close_set"), rows)
  return [os.path.splitext(r[1])[0] for r in rows]


# ---------------------------------------------------------------------------------------------
# SICKLE. Covers: 0 no crop, 1 paddy, 2 other crop.

_SICKLE_SEASONS = {"jun-sep": 6, "oct-jan": 10, "feb-may": 2}
_SICKLE_S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
_SICKLE_S2 = np.array([[600, 800, 1100, 1300, 1600, 1900, 2100, 2300, 2400, 2500, 2900, 2400],
                       [300, 450, 750, 500, 1200, 2500, 2900, 3100, 3200, 3300, 1900, 1000],
                       [350, 500, 850, 800, 1400, 2200, 2500, 2700, 2800, 2900, 2600, 1700]],
                      np.float64)
_SICKLE_S1_BANDS = ("VV", "VH", "angle")
_SICKLE_S1 = np.array([[-7, -13, 38], [-14, -22, 38], [-9, -16, 38]], np.float64)
_SICKLE_L8_BANDS = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7", "ST_B10",
                    "QA_PIXEL")
_SICKLE_L8 = np.array([[9000, 9400, 10500, 11000, 15000, 16000, 13500, 45500, 21824],
                       [8000, 8300, 9000, 8600, 17000, 13000, 10500, 43500, 21824],
                       [8200, 8600, 9400, 9300, 16500, 14500, 12000, 44500, 21824]], np.float64)


def _sickle_files(rng: Rng, folder: str, kind: str, dates: list[datetime.date], cover: np.ndarray,
                  bands: Sequence[str], table: np.ndarray, jitter: float, dtype,
                  drop_last_band: bool) -> None:
  """One npz per acquisition, one array per band, named as in the release."""
  h, w = cover.shape
  for i, d in enumerate(dates):
    day = _ymd(d)
    name = {"S2": (f"{day}T050209_{day}T050208_T44PMT" if i % 2 else f"T44PMT_{day}T050209"),
            "S1": f"S1A_IW_GRDH_1SDV_{day}T004017_{day}T004042_019980_02205D_7B02",
            "L8": f"LC08_142052_{day}"}[kind]
    growth = 1 + 0.15 * (i / max(len(dates) - 1, 1)) * (cover == 1)
    x = np.moveaxis(table[cover], -1, 0) * growth * (1 + 0.05 * _smooth(rng, h, w))
    x += jitter * rng.normal(size=x.shape)
    arrays = {b: (_to_uint16(v) if dtype == np.uint16 else v.astype(dtype))
              for b, v in zip(bands, x, strict=True)}
    if drop_last_band and i == 0:
      del arrays[bands[-1]]
    path = os.path.join(folder, name + ".npz")
    _makedirs_for(path)
    np.savez(path, **arrays)


def _gen_sickle(out: str, rng: Rng, num: int) -> list[str]:
  splits = [s for s in ("train", "val", "test") for _ in range(num)]
  uids = [1000 + 7 * i for i in range(len(splits))]
  plots = [100 + i for i in range(len(splits))]
  crop = {p: (1 if rng.uniform() < 0.5 else int(rng.integers(2, 22))) for p in plots}
  crop.update({9000 + i: int(rng.integers(1, 22)) for i in range(len(splits))})  # Not in the CSV.
  rows = []
  for i, (uid, plot, split) in enumerate(zip(uids, plots, splits, strict=True)):
    season = list(_SICKLE_SEASONS)[i % len(_SICKLE_SEASONS)]
    year = 2018 + i % 3
    start = datetime.date(year, _SICKLE_SEASONS[season], 1)
    sowing, transplanting, harvesting = (int(rng.integers(5, 25)), int(rng.integers(30, 50)),
                                         int(rng.integers(110, 150)))
    rows.append((uid, plot, split, year, season, sowing, transplanting, harvesting))
    # Parcel 0 is the sample's plot; 1 background; 2 a plot of another split; 3 an unknown plot.
    h, w = (int(v) for v in rng.integers(28, 41, 2))
    parcels = _parcels(rng, h, w, 6)
    other = plots[(i + num) % len(plots)]
    owners = [plot, 0, other, 9000 + i] + [int(rng.choice([0, plot, other])) for _ in range(2)]
    plot_map = np.array(owners)[parcels]
    crop_map = np.vectorize(lambda p: crop.get(p, 0))(plot_map)
    on_plot = plot_map > 0
    mask = np.stack([plot_map, crop_map, on_plot * sowing, on_plot * transplanting,
                     on_plot * harvesting, on_plot * rng.uniform(1500, 3000)]).astype(np.float32)
    origin = (float(rng.integers(300, 400)) * 1000, float(rng.integers(1200, 1300)) * 1000)
    _write_tif(os.path.join(out, "masks", "10m", f"{uid}.tif"), mask, pixel_m=10.0, epsg=32644,
               origin=origin)
    cover = np.minimum(crop_map, 2)
    images = os.path.join(out, "images")
    _sickle_files(rng, os.path.join(images, "S2", "npy", str(uid)), "S2",
                  _dates(rng, int(rng.integers(4, 7)), start, 150), cover, _SICKLE_S2_BANDS,
                  _SICKLE_S2, 40, np.uint16, drop_last_band=i == 0)
    _sickle_files(rng, os.path.join(images, "S1", "npy", str(uid)), "S1",
                  _dates(rng, int(rng.integers(3, 6)), start, 150), cover, _SICKLE_S1_BANDS,
                  _SICKLE_S1, 1.0, np.float32, drop_last_band=False)
    _sickle_files(rng, os.path.join(images, "L8", "npy", str(uid)), "L8",
                  _dates(rng, int(rng.integers(2, 5)), start, 150), cover[::3, ::3],
                  _SICKLE_L8_BANDS, _SICKLE_L8, 100, np.uint16, drop_last_band=False)
  _write_csv(os.path.join(out, "sickle_dataset_tabular.csv"),
             ("UNIQUE_ID", "PLOT_ID", "SPLIT", "YEAR", "STANDARD_SEASON", "SOWING_DAY",
              "TRANSPLANTING_DAY", "HARVESTING_DAY"), rows)
  return [str(u) for u in uids]


# ---------------------------------------------------------------------------------------------
# TimeSen2Crop.

TS2C_CLASSES = 16
TS2C_TILES = ("32TNT", "33UWP", "33TWN", "33UVP", "2019_33UVP")
TS2C_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B11", "B12")
_TS2C_BASE = np.array([400, 700, 500, 1100, 2300, 2700, 3000, 1800, 900], np.float64)


def _gen_timesen2crop(out: str, rng: Rng, num: int) -> list[str]:
  signature = rng.uniform(-1, 1, (TS2C_CLASSES, len(TS2C_BANDS)))
  phase = rng.uniform(0, 365, TS2C_CLASSES)  # Day of peak greenness per class.
  nir = np.isin(TS2C_BANDS, ("B6", "B7", "B8A"))
  names = []
  for tile in TS2C_TILES:
    start = datetime.date(2019, 1, 1) if tile.startswith("2019") else datetime.date(2017, 9, 1)
    dates = _dates(rng, int(rng.integers(5, 9)), start, 365)
    _write_csv(os.path.join(out, tile, "dates.csv"), ("acquisition_date",),
               [(_ymd(d),) for d in dates])
    doy = np.array([d.timetuple().tm_yday for d in dates])
    counts = [0] * TS2C_CLASSES
    for _ in range(num):
      c = int(rng.integers(TS2C_CLASSES))
      season = np.cos(2 * np.pi * (doy - phase[c]) / 365)[:, None]
      x = _TS2C_BASE * (1 + 0.3 * signature[c]) * (1 + 0.4 * season * nir)
      x = x * (1 + 0.03 * rng.normal(size=x.shape))
      flag = np.where(rng.uniform(size=len(dates)) < 0.15, rng.integers(1, 4, len(dates)), 0)
      x[flag == 1] += 3000
      x[flag == 2] *= 0.5
      x[flag == 3] += 5000 * ~nir
      rows = np.concatenate([np.clip(np.rint(x), 0, None), flag[:, None]], 1).astype(np.int64)
      _write_csv(os.path.join(out, tile, str(c), f"{counts[c]}.csv"), TS2C_BANDS + ("Flag",),
                 rows.tolist())
      names.append(f"{tile}_{c}_{counts[c]}")
      counts[c] += 1
  return names


# ---------------------------------------------------------------------------------------------
# PASTIS-HD SPOT-6 images.

SPOT_DIR = os.path.join("DATA_SPOT", "PASTIS_SPOT6_RVB_1M00_2019")
SPOT_PER_S2 = 10  # SPOT pixels per S2 pixel (1 m vs 10 m): the spot projector's conv cell.
PASTIS_TILE_M = 1280.0


def _gen_pastis_hd_spot(out: str, rng: Rng, num: int) -> list[str]:
  """SPOT images for the PASTIS root in ``out`` (patch grid from its S2), else fresh ones."""
  meta_path = os.path.join(out, "metadata.geojson")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      ids = [str(feat["properties"]["ID_PATCH"]) for feat in json.load(f)["features"]]
  else:
    ids = [str(10_000 + i) for i in rng.choice(40_000, num, replace=False)]
  colours = rng.uniform(40, 220, (20, 3))  # One per PASTIS class 0-19.
  for pid in ids:
    s2_path = os.path.join(out, "DATA_S2", f"S2_{pid}.npy")
    target_path = os.path.join(out, "ANNOTATIONS", f"TARGET_{pid}.npy")
    if os.path.exists(target_path):
      classes = np.load(target_path)[0].astype(np.int64)
    else:
      side = np.load(s2_path, mmap_mode="r").shape[-1] if os.path.exists(s2_path) else 128
      classes = rng.integers(20, size=12)[_parcels(rng, side, side, 12)]
    h, w = classes.shape
    rgb = colours[_blow_up(classes, SPOT_PER_S2)]
    rgb += 20 * _smooth(rng, h * SPOT_PER_S2, w * SPOT_PER_S2, 8)[..., None]
    rgb += 6 * rng.normal(size=rgb.shape)
    origin = (float(rng.integers(600, 900)) * 1000, float(rng.integers(6200, 6900)) * 1000)
    _write_tif(os.path.join(out, SPOT_DIR, f"SPOT6_RVB_1M00_2019_{pid}.tif"),
               np.clip(np.rint(rgb), 0, 255).astype(np.uint8),
               pixel_m=PASTIS_TILE_M / (w * SPOT_PER_S2), epsg=2154, origin=origin, rgb=True)
  return ids


# ---------------------------------------------------------------------------------------------

GENERATORS: dict[str, tuple[Callable[[str, Rng, int], list[str]], int]] = {
    "planted": (_gen_planted, 3),
    "s2naip_urban": (_gen_s2naip, 2),
    "bradd_s1ts": (_gen_bradd, 3),
    "sickle": (_gen_sickle, 3),
    "timesen2crop": (_gen_timesen2crop, 6),
    "pastis_hd_spot": (_gen_pastis_hd_spot, 2),
}


def generate(dataset: str, out_dir: str, seed: int = 0, num: int | None = None) -> list[str]:
  """Writes the fake ``dataset`` under ``out_dir``; returns the example ids written.

  ``num``: examples per split, pixels per tile (timesen2crop) or images (pastis_hd_spot without
  a PASTIS root); None = the dataset's default (see the module docstring).
  """
  if dataset not in GENERATORS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(GENERATORS)}")
  fn, default_num = GENERATORS[dataset]
  os.makedirs(out_dir, exist_ok=True)
  return fn(out_dir, np.random.default_rng(seed), default_num if num is None else num)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dataset", choices=tuple(GENERATORS))
  parser.add_argument("out_dir")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num", type=int, default=None)
  args = parser.parse_args(argv)
  ids = generate(args.dataset, args.out_dir, seed=args.seed, num=args.num)
  print(f"{args.dataset}: wrote {len(ids)} examples under {args.out_dir}")


if __name__ == "__main__":
  main()
