"""Fake SICKLE: ``num`` (default 3) plots per split (train, val, test).

``sickle_dataset_tabular.csv`` (``UNIQUE_ID``, ``PLOT_ID``, ``SPLIT``, ``YEAR``,
``STANDARD_SEASON``, ``SOWING_DAY``, ``TRANSPLANTING_DAY``, ``HARVESTING_DAY``),
``images/S2/npy/<uid>/<name>.npz`` (uint16 per band B1-B12 incl. B8A, B9; names
``<date>T..._<date>T..._T44PMT`` or ``T44PMT_<date>T...``),
``images/S1/npy/<uid>/S1A_IW_GRDH_1SDV_<date>T..._....npz`` (float32 VV, VH dB, angle),
``images/L8/npy/<uid>/LC08_142052_<date>.npz`` (uint16 SR_B1-SR_B7, ST_B10, QA_PIXEL) and
``masks/10m/<uid>.tif`` (float32, 6 bands: plot id, crop type (1 paddy, 2-21 other), sowing,
transplanting, harvesting day, yield; the release's masks have several layers, of which AnySat
reads the first two). 10 m rasters are 28-40 px per side, Landsat 30 m ones a third of that
(assumed: the release's sizes vary and are not documented; readers resize to 32 x 32). One S2
file lacks ``B12``, as happens in the release. Covers: 0 no crop, 1 paddy, 2 other crop.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import numpy as np

from input_pipeline.samples.synthetic import common
from input_pipeline.samples.synthetic.common import Rng

NUM = 3
_SEASONS = {"jun-sep": 6, "oct-jan": 10, "feb-may": 2}  # Season → first month.
_S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
_S2 = np.array([[600, 800, 1100, 1300, 1600, 1900, 2100, 2300, 2400, 2500, 2900, 2400],
                [300, 450, 750, 500, 1200, 2500, 2900, 3100, 3200, 3300, 1900, 1000],
                [350, 500, 850, 800, 1400, 2200, 2500, 2700, 2800, 2900, 2600, 1700]], np.float64)
_S1_BANDS = ("VV", "VH", "angle")
_S1 = np.array([[-7, -13, 38], [-14, -22, 38], [-9, -16, 38]], np.float64)
_L8_BANDS = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7", "ST_B10", "QA_PIXEL")
_L8 = np.array([[9000, 9400, 10500, 11000, 15000, 16000, 13500, 45500, 21824],
                [8000, 8300, 9000, 8600, 17000, 13000, 10500, 43500, 21824],
                [8200, 8600, 9400, 9300, 16500, 14500, 12000, 44500, 21824]], np.float64)


def _files(rng: Rng, folder: str, kind: str, dates: list[datetime.date], cover: np.ndarray,
           bands: Sequence[str], table: np.ndarray, jitter: float, dtype,
           drop_last_band: bool) -> None:
  """One npz per acquisition, one array per band, named as in the release."""
  h, w = cover.shape
  for i, d in enumerate(dates):
    day = common.ymd(d)
    name = {"S2": (f"{day}T050209_{day}T050208_T44PMT" if i % 2 else f"T44PMT_{day}T050209"),
            "S1": f"S1A_IW_GRDH_1SDV_{day}T004017_{day}T004042_019980_02205D_7B02",
            "L8": f"LC08_142052_{day}"}[kind]
    growth = 1 + 0.15 * (i / max(len(dates) - 1, 1)) * (cover == 1)
    x = np.moveaxis(table[cover], -1, 0) * growth * (1 + 0.05 * common.smooth(rng, h, w))
    x += jitter * rng.normal(size=x.shape)
    arrays = {b: (common.to_uint16(v) if dtype == np.uint16 else v.astype(dtype))
              for b, v in zip(bands, x, strict=True)}
    if drop_last_band and i == 0:
      del arrays[bands[-1]]
    path = os.path.join(folder, name + ".npz")
    common.makedirs_for(path)
    np.savez(path, **arrays)


def write(out: str, rng: Rng, num: int) -> list[str]:
  """Writes ``num`` plots per split under ``out``; returns their unique ids."""
  splits = [s for s in ("train", "val", "test") for _ in range(num)]
  uids = [1000 + 7 * i for i in range(len(splits))]
  plots = [100 + i for i in range(len(splits))]
  crop = {p: (1 if rng.uniform() < 0.5 else int(rng.integers(2, 22))) for p in plots}
  crop.update({9000 + i: int(rng.integers(1, 22)) for i in range(len(splits))})  # Not in the CSV.
  rows = []
  for i, (uid, plot, split) in enumerate(zip(uids, plots, splits, strict=True)):
    season = list(_SEASONS)[i % len(_SEASONS)]
    year = 2018 + i % 3
    start = datetime.date(year, _SEASONS[season], 1)
    sowing, transplanting, harvesting = (int(rng.integers(5, 25)), int(rng.integers(30, 50)),
                                         int(rng.integers(110, 150)))
    rows.append((uid, plot, split, year, season, sowing, transplanting, harvesting))
    # Parcel 0 is the sample's plot; 1 background; 2 a plot of another split; 3 an unknown plot.
    h, w = (int(v) for v in rng.integers(28, 41, 2))
    parcels = common.parcels(rng, h, w, 6)
    other = plots[(i + num) % len(plots)]
    owners = [plot, 0, other, 9000 + i] + [int(rng.choice([0, plot, other])) for _ in range(2)]
    plot_map = np.array(owners)[parcels]
    crop_map = np.vectorize(lambda p: crop.get(p, 0))(plot_map)
    on_plot = plot_map > 0
    mask = np.stack([plot_map, crop_map, on_plot * sowing, on_plot * transplanting,
                     on_plot * harvesting, on_plot * rng.uniform(1500, 3000)]).astype(np.float32)
    origin = (float(rng.integers(300, 400)) * 1000, float(rng.integers(1200, 1300)) * 1000)
    common.write_tif(os.path.join(out, "masks", "10m", f"{uid}.tif"), mask, pixel_m=10.0,
                     epsg=32644, origin=origin)
    cover = np.minimum(crop_map, 2)
    images = os.path.join(out, "images")
    _files(rng, os.path.join(images, "S2", "npy", str(uid)), "S2",
           common.dates(rng, int(rng.integers(4, 7)), start, 150), cover, _S2_BANDS, _S2, 40,
           np.uint16, drop_last_band=i == 0)
    _files(rng, os.path.join(images, "S1", "npy", str(uid)), "S1",
           common.dates(rng, int(rng.integers(3, 6)), start, 150), cover, _S1_BANDS, _S1, 1.0,
           np.float32, drop_last_band=False)
    _files(rng, os.path.join(images, "L8", "npy", str(uid)), "L8",
           common.dates(rng, int(rng.integers(2, 5)), start, 150), cover[::3, ::3], _L8_BANDS,
           _L8, 100, np.uint16, drop_last_band=False)
  common.write_csv(os.path.join(out, "sickle_dataset_tabular.csv"),
                   ("UNIQUE_ID", "PLOT_ID", "SPLIT", "YEAR", "STANDARD_SEASON", "SOWING_DAY",
                    "TRANSPLANTING_DAY", "HARVESTING_DAY"), rows)
  return [str(u) for u in uids]
