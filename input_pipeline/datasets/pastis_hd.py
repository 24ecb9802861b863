"""PASTIS-HD: 1.28 km agricultural patches in France, SPOT-6 + Sentinel-2 + Sentinel-1 ascending.

As AnySat's ``src/data/Pastis.py`` reads it. Layout under ``manual_dir``::

  metadata.geojson        features with properties ``ID_PATCH``, ``Fold`` (1-5), ``dates-S2``,
                          ``dates-S1A`` (``{"0": YYYYMMDD, ...}``, a dict or its JSON string)
  DATA_S2/S2_<id>.npy     (T, 10, 128, 128) int16, L2A reflectance x 1e4
  DATA_S1A/S1A_<id>.npy   (T, 3, 128, 128): VV, VH, VV/VH (dB)
  DATA_SPOT/PASTIS_SPOT6_RVB_1M00_2019/SPOT6_RVB_1M00_2019_<id>.tif   3 x 1280 x 1280 uint8, 1 m
  ANNOTATIONS/TARGET_<id>.npy   (3, 128, 128) uint8, channel 0 = class 0-19

Example ``<id>``: ``spot`` float32 (3, H, W); ``s2`` float32 (T, 10, H, W) + ``s2_dates``; ``s1``
float32 (T, 3, H, W) + ``s1_dates`` (from ``DATA_S1A``); ``label`` per task:

- ``pastis_hd`` (segmentation): int32 (H, W), channel 0 of TARGET: 0 background, 1-18 crops,
  19 void (ignored);
- ``pastis_hd_cls`` (classification): float32 (18,) multi-hot of the classes present, background
  and void removed (class c → index c - 1).

Splits by ``Fold``: train 1-3, val 4, test 5. ``read(..., modalities=("s2", "s1"))`` skips SPOT
(the public PASTIS-R release and the shipped sample have no ``DATA_SPOT``).

Dates deviate from AnySat: it fed days since 2018-09-01 (0 to ~430); the model takes 0-366, so
here dates are the 1-based day of year like every other dataset. The series run from September
2018 to late 2019, so the day of year wraps on 1 January and dates a year apart coincide.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from anysat_jax.core.dates import day_of_year
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec, check_label
from input_pipeline.datasets import _common

CLASSES = ("Background", "Meadow", "Soft winter wheat", "Corn", "Winter barley",
           "Winter rapeseed", "Spring barley", "Sunflower", "Grapevine", "Beet",
           "Winter triticale", "Winter durum wheat", "Fruits, vegetables, flowers", "Potatoes",
           "Leguminous fodder", "Soybeans", "Orchard", "Mixed cereal", "Sorghum", "Void label")
VOID = 19
FOLDS = {"train": (1, 2, 3), "val": (4,), "test": (5,)}
SPOT_DIR = os.path.join("DATA_SPOT", "PASTIS_SPOT6_RVB_1M00_2019")
_MODALITIES = {"spot": (1280, 1280), "s2": (128, 128), "s1": (128, 128)}
# modality -> (folder, file prefix, metadata date column)
_SERIES = {"s2": ("DATA_S2", "S2", "dates-S2"), "s1": ("DATA_S1A", "S1A", "dates-S1A")}


def class_multi_hot(target: np.ndarray) -> np.ndarray:
  """Class map (H, W) → float32 (18,) multi-hot of the crop classes 1-18 present."""
  y = np.zeros(len(CLASSES) - 2, np.float32)
  present = np.unique(target)
  crops = present[(present > 0) & (present < VOID)]
  y[crops.astype(np.int64) - 1] = 1.0
  return y


def _dates(props: dict, column: str) -> np.ndarray:
  table = props[column]
  if isinstance(table, str):
    table = json.loads(table)
  return np.array([day_of_year(table[k]) for k in sorted(table, key=int)], np.int32)


def _load(root: str, props: dict, task: str, modalities: tuple[str, ...]) -> Example:
  pid = str(props["ID_PATCH"])
  ex: Example = {"name": pid}
  for mod in modalities:
    if mod == "spot":
      path = os.path.join(root, SPOT_DIR, f"SPOT6_RVB_1M00_2019_{pid}.tif")
      ex[mod] = _common.read_tif(path, pid).astype(np.float32)
      continue
    folder, prefix, column = _SERIES[mod]
    path = os.path.join(root, folder, f"{prefix}_{pid}.npy")
    ex[mod] = _common.read_npy(path, pid).astype(np.float32)
    with _common.guard(os.path.join(root, "metadata.geojson"), pid):
      ex[mod + "_dates"] = _dates(props, column)
    _common.check_length(ex[mod], ex[mod + "_dates"], mod, path, pid)
  path = os.path.join(root, "ANNOTATIONS", f"TARGET_{pid}.npy")
  target = _common.read_npy(path, pid)
  if target.ndim != 3:
    raise DataError(f"TARGET has shape {target.shape}, expected (3, H, W)", path=path,
                    example_id=pid)
  check_label(SPEC.label, target[0], path, pid)  # The class map, before any cast.
  ex["label"] = (target[0].astype(np.int32) if task == "segmentation"
                 else class_multi_hot(target[0]))
  return ex


def read(manual_dir: str, split: str, *, task: str = "segmentation",
         modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(id, example)`` for the patches whose ``Fold`` belongs to ``split``."""
  chosen = _common.select(modalities, _MODALITIES)
  meta_path = os.path.join(manual_dir, "metadata.geojson")
  meta = _common.read_json(meta_path)
  with _common.guard(meta_path, None):
    props = [f["properties"] for f in meta["features"]]
    props = [p for p in props if int(p["Fold"]) in FOLDS[split]]
  patches = {str(p["ID_PATCH"]): p for p in props}
  if len(patches) != len(props):
    raise DataError("duplicate ID_PATCH", path=meta_path)
  load = lambda pid: _load(manual_dir, patches[pid], task, chosen)
  yield from _common.iter_examples(patches, load, on_error)


def _spec(task: str) -> DatasetSpec:
  if task == "segmentation":
    name, label = "pastis_hd", LabelSpec("segmentation", num_classes=len(CLASSES),
                                         ignore_index=VOID, resolution_m=10.0,
                                         class_names=CLASSES)
  else:
    name, label = "pastis_hd_cls", LabelSpec("multilabel", num_classes=len(CLASSES) - 2,
                                             class_names=CLASSES[1:VOID])
  return DatasetSpec(name=name, modalities=dict(_MODALITIES), splits=tuple(FOLDS), label=label,
                     tile_m=1280.0, patch_sizes_m=(40, 80, 160),
                     read=functools.partial(read, task=task), description=__doc__)


SPEC = _spec("segmentation")
SPEC_CLS = _spec("classification")
