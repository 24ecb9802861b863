"""Fake BraDD-S1TS: ``num`` (default 3) examples per split (train, validation, test).

``meta.csv`` (index, ``file``, ``close_set``) and ``Samples/<file>``, a ``torch.save`` zip archive
(written without torch by ``anysat_jax.io.torch_pickle.writer.save_pth``) of a dict ``image``
float32 (T, 2, 48, 48) (VV, VH linear power), ``image_dates`` / ``label_dates`` (lists of
``datetime.datetime``) and ``label`` uint8 (2, 48, 48) (entry 0 zeros, entry 1 the
deforestation map). T 4-8.
"""

from __future__ import annotations

import datetime
import os

import numpy as np

from anysat_jax.io.torch_pickle.writer import save_pth
from input_pipeline.samples.synthetic import common
from input_pipeline.samples.synthetic.common import Rng

NUM = 3
SIZE = 48


def _blobs(rng: Rng, size: int, n: int) -> np.ndarray:
  """uint8 (size, size) union of n random ellipses (clearings)."""
  yy, xx = np.mgrid[:size, :size]
  out = np.zeros((size, size), bool)
  for _ in range(n):
    cy, cx = rng.uniform(0, size, 2)
    ry, rx = rng.uniform(4, 12, 2)
    out |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  return out.astype(np.uint8)


def write(out: str, rng: Rng, num: int) -> list[str]:
  """Writes ``num`` examples per split under ``out``; returns their file stems."""
  rows = []
  for close_set in ("train", "validation", "test"):
    for _ in range(num):
      file = f"sample_{len(rows):05d}.pt"
      t = int(rng.integers(4, 9))
      start = datetime.datetime(2019, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
      image_dates = [start + datetime.timedelta(days=12 * i) for i in range(t)]
      label_dates = [image_dates[0] - datetime.timedelta(days=int(rng.integers(0, 20))),
                     image_dates[-1] + datetime.timedelta(days=int(rng.integers(0, 20)))]
      change = _blobs(rng, SIZE, int(rng.integers(1, 4)))
      field = 1 + 0.2 * common.smooth(rng, SIZE, SIZE)
      base = np.array([0.12, 0.03])[None, :, None, None] * field  # Forest VV, VH.
      speckle = rng.gamma(4.0, 0.25, size=(t, 2, SIZE, SIZE))
      after = (np.arange(t) >= int(rng.integers(1, t)))[:, None, None, None]
      loss = np.where(after & (change == 1), np.array([0.6, 0.35])[None, :, None, None], 1.0)
      path = os.path.join(out, "Samples", file)
      common.makedirs_for(path)
      save_pth(path, {
          "image": (base * speckle * loss).astype(np.float32),
          "image_dates": image_dates,
          "label_dates": label_dates,
          "label": np.stack([np.zeros_like(change), change]),
      })
      rows.append((len(rows), file, close_set))
  common.write_csv(os.path.join(out, "meta.csv"), ("", "file", "close_set"), rows)
  return [os.path.splitext(r[1])[0] for r in rows]
