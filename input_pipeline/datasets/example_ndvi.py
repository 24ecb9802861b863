"""NDVI fields: the worked example of ``docs/adding_a_dataset.md`` (a toy dataset, not a release).

120 m field tiles, each with a Sentinel-2 series (10 m) and a SPOT-6 RGB image (1 m), labelled
1 ("vegetated") when the tile's mean NDVI over its dates is above 0.4, else 0 ("bare").
``write_sample(manual_dir)`` generates it (random values, deterministic given ``seed``); nothing
is downloaded. Layout under ``manual_dir``::

  fields.csv          header ``id,split,label``; one row per tile, split train / val / test,
                      label 0 or 1
  s2/<id>.npy         (T, 10, 12, 12) uint16, B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12,
                      L2A reflectance x 1e4, 10 m pixels
  s2/<id>_dates.txt   T lines, the acquisition dates as YYYY-MM-DD, in the order of the .npy
  spot/<id>.npy       (3, 120, 120) uint8, R, G, B, 1 m pixels

Example ``<id>``:

- ``s2`` float32 (T, 10, 12, 12), raw values; ``s2_dates`` int32 (T,), day of year (1-based);
- ``spot`` float32 (3, 120, 120), raw values;
- ``label`` int32 scalar: 0 bare, 1 vegetated.

Splits: the ``split`` column; examples in file order.
"""

from __future__ import annotations

import csv
import datetime
import os
from collections.abc import Iterator, Sequence

import numpy as np

from anysat_jax.core.dates import day_of_year
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec
from input_pipeline.datasets import _common

CLASSES = ("bare", "vegetated")
NDVI_THRESHOLD = 0.4
S2_PX, SPOT_PX = 12, 120                         # 120 m at 10 m and at 1 m
_MODALITIES = {"s2": (S2_PX, S2_PX), "spot": (SPOT_PX, SPOT_PX)}
_B4, _B8 = 2, 6                                  # Red and NIR in the s2 band order


def ndvi(s2: np.ndarray) -> np.ndarray:
  """(T, 10, H, W) reflectance -> (T, H, W) NDVI = (B8 - B4) / (B8 + B4)."""
  red, nir = s2[:, _B4].astype(np.float64), s2[:, _B8].astype(np.float64)
  return (nir - red) / np.maximum(nir + red, 1.0)


def _load(root: str, tile_id: str, label: str, modalities: tuple[str, ...]) -> Example:
  index = os.path.join(root, "fields.csv")
  with _common.guard(index, tile_id):
    y = int(label)
    if y not in (0, 1):
      raise ValueError(f"label {label!r} is not 0 or 1")
  ex: Example = {"name": tile_id, "label": np.int32(y)}
  if "s2" in modalities:
    path = os.path.join(root, "s2", f"{tile_id}.npy")
    ex["s2"] = _common.read_npy(path, tile_id).astype(np.float32)
    dates_path = os.path.join(root, "s2", f"{tile_id}_dates.txt")
    lines = _common.read_lines(dates_path)
    with _common.guard(dates_path, tile_id):
      ex["s2_dates"] = np.array([day_of_year(line) for line in lines], np.int32)
    _common.check_length(ex["s2"], ex["s2_dates"], "s2", path, tile_id)
  if "spot" in modalities:
    path = os.path.join(root, "spot", f"{tile_id}.npy")
    ex["spot"] = _common.read_npy(path, tile_id).astype(np.float32)
  for m in modalities:  # Shapes are checked by the builder; a clear message here helps.
    want = _MODALITIES[m]
    if ex[m].shape[-2:] != want:
      raise DataError(f"{m}: {ex[m].shape[-2:]} px, expected {want}", example_id=tile_id,
                      path=os.path.join(root, m, f"{tile_id}.npy"))
  return ex


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(id, example)`` for the rows of ``fields.csv`` whose split is ``split``."""
  chosen = _common.select(modalities, _MODALITIES)
  index = os.path.join(manual_dir, "fields.csv")
  with _common.guard(index, None), open(index, newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["split"] == split]
  labels = {r["id"]: r["label"] for r in rows}
  if len(labels) != len(rows):
    raise DataError("duplicate tile id", path=index)
  load = lambda tile_id: _load(manual_dir, tile_id, labels[tile_id], chosen)  # noqa: E731
  yield from _common.iter_examples(labels, load, on_error)


SPEC = DatasetSpec(
    name="example_ndvi",
    modalities=dict(_MODALITIES),
    splits=("train", "val", "test"),
    label=LabelSpec("multiclass", num_classes=len(CLASSES), class_names=CLASSES),
    tile_m=120.0,
    patch_sizes_m=(20, 40),
    read=read,
    description=__doc__,
)

# Typical L2A reflectance x 1e4 of bare soil and of green vegetation, B2 ... B12.
_BARE = np.array([900, 1100, 1300, 1500, 1700, 1800, 1900, 2000, 2600, 2200], np.float64)
_GREEN = np.array([300, 600, 400, 1000, 2600, 3100, 3400, 3500, 1900, 900], np.float64)


def write_sample(manual_dir: str, *, num: Sequence[int] = (4, 2, 2), seed: int = 0) -> list[str]:
  """Writes a toy NDVI-fields folder (the layout above) with ``num`` tiles per split (train,
  val, test); returns the tile ids. Each tile has a random vegetation cover and 3 to 6 dates
  in 2021; the label follows from the written values."""
  rng = np.random.default_rng(seed)
  for sub in ("s2", "spot"):
    os.makedirs(os.path.join(manual_dir, sub), exist_ok=True)
  rows, ids = [], []
  for split, count in zip(("train", "val", "test"), num, strict=True):
    for k in range(count):
      tile_id = f"field_{split}_{k:03d}"
      t = int(rng.integers(3, 7))
      days = np.sort(rng.choice(np.arange(60, 300), size=t, replace=False))
      cover = rng.uniform(0.0, 1.0) * np.clip(
          rng.normal(1.0, 0.15, (S2_PX, S2_PX)), 0.0, 1.0)            # vegetation fraction
      season = np.sin(np.pi * (days - 30) / 300.0)[:, None, None, None]  # greener in summer
      mix = cover[None, None] * season
      s2 = (1 - mix) * _BARE[None, :, None, None] + mix * _GREEN[None, :, None, None]
      s2 = np.clip(s2 + rng.normal(0, 50, s2.shape), 1, 10000).astype(np.uint16)
      np.save(os.path.join(manual_dir, "s2", f"{tile_id}.npy"), s2)
      start = datetime.date(2021, 1, 1)
      with open(os.path.join(manual_dir, "s2", f"{tile_id}_dates.txt"), "w") as f:
        f.writelines(f"{start + datetime.timedelta(days=int(d) - 1)}\n" for d in days)
      green = np.repeat(np.repeat(cover, 10, 0), 10, 1)                # 1 m from 10 m
      rgb = (1 - green)[None] * np.array([150, 130, 110])[:, None, None] \
          + green[None] * np.array([60, 110, 50])[:, None, None]
      spot = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
      np.save(os.path.join(manual_dir, "spot", f"{tile_id}.npy"), spot)
      label = int(ndvi(s2).mean() > NDVI_THRESHOLD)
      rows.append((tile_id, split, label))
      ids.append(tile_id)
  with open(os.path.join(manual_dir, "fields.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("id", "split", "label"))
    writer.writerows(rows)
  return ids
