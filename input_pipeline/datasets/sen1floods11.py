"""Sen1Floods11 (hand-labelled): 512 x 512 chips of flood events, Sentinel-2 + Sentinel-1, water.

As AnySat's ``src/data/Sen1floods11.py`` reads it. Layout under ``manual_dir`` (the ``v1.1``
bucket folder, i.e. ``manual_dir/v1.1/...``)::

  v1.1/splits/flood_handlabeled/flood_{train,valid,test}_data.csv   rows ``<S1 file>,<label file>``
  v1.1/data/flood_events/HandLabeled/S1Hand/<loc>_<n>_S1Hand.tif    VV, VH float32 (dB)
  v1.1/data/flood_events/HandLabeled/S2Hand/<loc>_<n>_S2Hand.tif    13 bands B1-B12 int16
  v1.1/data/flood_events/HandLabeled/LabelHand/<loc>_<n>_LabelHand.tif   -1 / 0 / 1
  v1.1/Sen1Floods11_Metadata.geojson     per event: ``location``, ``s1_date``, ``s2_date``

Example ``<loc>_<n>``:

- ``s2`` float32 (1, 10, 512, 512): bands 1-8, 11, 12 (B2, B3, B4, B5, B6, B7, B8, B8A, B11,
  B12), TOA reflectance x 1e4; ``s2_dates`` (1,) = day of year of the event's ``s2_date``;
- ``s1`` float32 (1, 3, 512, 512): VV, VH (NaN → 0) and VV / (VH + 1e-10) clipped to
  [-1e4, 1e4] (a ratio of dB values, as AnySat computes it); ``s1_dates`` from ``s1_date``;
- ``label`` int32 (512, 512): 0 dry, 1 water, -1 no data (ignored).

Dates are looked up by the location prefix of the file name; as in AnySat, a location that
matches no single event (e.g. ``Mekong``, whose event is listed as ``Cambodia``) gets
1 January 1998, i.e. day 1.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence

import numpy as np

from anysat_jax.core.dates import day_of_year
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec, check_label
from input_pipeline.datasets import _common

S2_BANDS = (1, 2, 3, 4, 5, 6, 7, 8, 11, 12)
RATIO_EPS = 1e-10
RATIO_CLIP = 1e4
FALLBACK_DATE = "19980101"
_SPLIT_FILES = {"train": "train", "val": "valid", "test": "test"}
_MODALITIES = {"s2": (512, 512), "s1": (512, 512)}
_HAND = os.path.join("v1.1", "data", "flood_events", "HandLabeled")


def s1_channels(vv_vh: np.ndarray) -> np.ndarray:
  """(2, H, W) VV, VH → float32 (3, H, W) VV, VH, VV / (VH + 1e-10) clipped, NaN → 0."""
  vv, vh = np.nan_to_num(vv_vh.astype(np.float32), nan=0.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.clip(vv / (vh + np.float32(RATIO_EPS)), -RATIO_CLIP, RATIO_CLIP)
  return np.stack([vv, vh, ratio])


def _event_dates(metadata_path: str) -> dict[str, dict[str, int]]:
  """location → {"s1": day, "s2": day} for the locations with exactly one event."""
  meta = _common.read_json(metadata_path)
  with _common.guard(metadata_path, None):
    props = [f["properties"] for f in meta["features"]]
    locations = [p["location"] for p in props]
    return {p["location"]: {s: day_of_year(p[s + "_date"].replace("/", ""))
                            for s in ("s1", "s2")}
            for p in props if locations.count(p["location"]) == 1}


def _load(root: str, chip: str, label_file: str, dates: dict[str, dict[str, int]],
          modalities: tuple[str, ...]) -> Example:
  fallback = day_of_year(FALLBACK_DATE)
  day = dates.get(chip.split("_")[0], {"s1": fallback, "s2": fallback})
  ex: Example = {"name": chip}
  if "s2" in modalities:
    path = os.path.join(root, _HAND, "S2Hand", chip + "_S2Hand.tif")
    s2 = _common.read_tif(path, chip)
    if s2.shape[0] != 13:
      raise DataError(f"S2Hand has {s2.shape[0]} bands, expected 13", path=path, example_id=chip)
    ex["s2"] = s2[list(S2_BANDS)].astype(np.float32)[None]
    ex["s2_dates"] = np.array([day["s2"]], np.int32)
  if "s1" in modalities:
    path = os.path.join(root, _HAND, "S1Hand", chip + "_S1Hand.tif")
    s1 = _common.read_tif(path, chip)
    if s1.shape[0] != 2:
      raise DataError(f"S1Hand has {s1.shape[0]} bands, expected 2", path=path, example_id=chip)
    ex["s1"] = s1_channels(s1)[None]
    ex["s1_dates"] = np.array([day["s1"]], np.int32)
  path = os.path.join(root, _HAND, "LabelHand", label_file)
  label = _common.read_tif(path, chip)[0]
  check_label(SPEC.label, label, path, chip)  # Before the cast, which would wrap values.
  ex["label"] = label.astype(np.int32)
  return ex


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(chip, example)`` for the rows of the split's CSV, in file order."""
  chosen = _common.select(modalities, _MODALITIES)
  path = os.path.join(manual_dir, "v1.1", "splits", "flood_handlabeled",
                      f"flood_{_SPLIT_FILES[split]}_data.csv")
  with _common.guard(path, None), open(path, newline="") as f:
    rows = [row for row in csv.reader(f) if row]
  chips = {}
  for row in rows:
    if len(row) != 2 or not row[0].endswith("_S1Hand.tif"):
      raise DataError(f"bad split row {row}", path=path)
    chips[row[0].removesuffix("_S1Hand.tif")] = row[1].strip()
  dates = _event_dates(os.path.join(manual_dir, "v1.1", "Sen1Floods11_Metadata.geojson"))
  load = lambda chip: _load(manual_dir, chip, chips[chip], dates, chosen)
  yield from _common.iter_examples(chips, load, on_error)


SPEC = DatasetSpec(
    name="sen1floods11",
    modalities=dict(_MODALITIES),
    splits=tuple(_SPLIT_FILES),
    label=LabelSpec("segmentation", num_classes=2, ignore_index=-1, resolution_m=10.0,
                    class_names=("dry", "water")),
    tile_m=5120.0,
    patch_sizes_m=(80,),
    read=read,
    description=__doc__,
)
