"""Fake PLANTED: ``num`` (default 3) examples per split.

``<split>/labels2.json`` (``{id: class 0-39}``) and ``<split>/<id>/<id>_<m>.npz`` (``arr_0``
float32 (T, H, W, C)), ``<id>_<m>_mask.npz`` (uint8 0/1, same shape) and
``<id>_<m>_timestamp.npz`` (int64 (T,), ms since the Unix epoch) for ``m`` in s2 (8, 12, 12, 10),
s1 (8, 12, 12, 3: VV, VH dB, incidence angle), l7 (20, 4, 4, 6), alos (4, 4, 4, 3: HH, HV DN,
incidence angle), modis (60, 1, 1, 7): the real fixed shapes.
"""

from __future__ import annotations

import datetime
import os

import numpy as np

from input_pipeline.samples.synthetic import common
from input_pipeline.samples.synthetic.common import Rng

NUM = 3
CLASSES = 40
# modality -> (T, H, W, per-channel typical value); channels as stored.
_MODALITIES = {
    "s2": (8, 12, 12, (400, 700, 500, 1100, 2300, 2700, 2900, 3000, 1800, 900)),
    "s1": (8, 12, 12, (-11.0, -17.0, 38.0)),
    "l7": (20, 4, 4, (400, 700, 600, 2800, 1800, 900)),
    "alos": (4, 4, 4, (5000.0, 2200.0, 35.0)),
    "modis": (60, 1, 1, (500, 2800, 300, 600, 2600, 1700, 800)),
}


def _dates(rng: Rng, mod: str, t: int) -> list[datetime.date]:
  if mod == "alos":  # Yearly mosaics.
    return [datetime.date(2017 + i, 7, 1) for i in range(t)]
  if mod == "modis":  # 8-day composites.
    start = datetime.date(2018, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
    return [start + datetime.timedelta(days=8 * i) for i in range(t)]
  return common.dates(rng, t, datetime.date(2018, 1, 1), 3 * 365)


def _valid(rng: Rng, mod: str, shape: tuple[int, ...]) -> np.ndarray:
  """uint8 (T, H, W, C) validity: cloudy S2 dates, Landsat-7 SLC-off stripes, random gaps."""
  t, h, w, c = shape
  valid = rng.uniform(size=(t, h, w, 1)) > 0.03
  if mod in ("s2", "modis"):
    valid &= (rng.uniform(size=(t, 1, 1, 1)) > 0.25)
  if mod == "l7":
    stripes = (np.arange(h)[:, None] + np.arange(w)[None, :]) % 3 == 0
    valid &= ~(stripes[None, :, :, None] & (np.arange(t) % 2 == 1)[:, None, None, None])
  return np.broadcast_to(valid, shape).astype(np.uint8)


def write(out: str, rng: Rng, num: int) -> list[str]:
  """Writes ``num`` examples per split under ``out``; returns their ids."""
  signature = {m: rng.uniform(-1, 1, (CLASSES, len(v[3]))) for m, v in _MODALITIES.items()}
  ids = [str(1_000_000 + i) for i in rng.choice(9_000_000, 3 * num, replace=False)]
  names = []
  for s, split in enumerate(("train", "val", "test")):
    labels = {}
    for sid in ids[s * num:(s + 1) * num]:
      c = int(rng.integers(CLASSES))
      labels[sid] = c
      for mod, (t, h, w, base) in _MODALITIES.items():
        shape = (t, h, w, len(base))
        field = common.smooth(rng, h, w)[None, :, :, None]
        gain = 1 + 0.25 * signature[mod][c] + 0.08 * field + 0.05 * rng.normal(size=shape)
        x = (np.asarray(base, np.float64) * gain).astype(np.float32)
        valid = _valid(rng, mod, shape)
        x[valid == 0] = 0
        ms = [(d - datetime.date(1970, 1, 1)).days * 86_400_000 + int(rng.integers(86_400_000))
              for d in _dates(rng, mod, t)]
        prefix = os.path.join(out, split, sid, f"{sid}_{mod}")
        common.makedirs_for(prefix)
        np.savez(prefix + ".npz", x)
        np.savez(prefix + "_mask.npz", valid)
        np.savez(prefix + "_timestamp.npz", np.array(ms, np.int64))
      names.append(sid)
    common.write_json(os.path.join(out, split, "labels2.json"), labels)
  return names
