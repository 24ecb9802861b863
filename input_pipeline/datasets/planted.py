"""PLANTED: 120 m tiles of planted forests worldwide, five satellites, 40 tree species.

Source: Pazos-Outón et al. 2024, ``gs://forest_typology/planted-public`` (CC-BY 4.0). As
AnySat's ``src/data/Planted.py`` reads it. Layout under ``manual_dir``::

  <split>/labels2.json                  ``{"<id>": class index 0-39}``
  <split>/<id>/<id>_<m>.npz             ``arr_0`` (T, H, W, C) as stored
  <split>/<id>/<id>_<m>_mask.npz        ``arr_0`` (T, H, W, C) or (T, H, W, 1), 1 = valid
  <split>/<id>/<id>_<m>_timestamp.npz   ``arr_0`` (T,) milliseconds since the Unix epoch

for ``m`` in s2 (T 8, 12 x 12 px at 10 m, 10 bands), s1 (8, 12 x 12, VV, VH, ...), l7 (20,
4 x 4 at 30 m, 6 bands), alos (4, 4 x 4 at 30 m, HH, HV, ...), modis (60, 1 x 1 at 250 m, 7).

Example ``<id>``:

- ``s2`` float32 (8, 10, 12, 12) B2-B8A, B11, B12 (L2A reflectance x 1e4), ``l7`` (20, 6, 4, 4)
  B1-B5, B7, ``modis`` (60, 7, 1, 1) B1-B7: values as stored;
- ``s1`` (8, 3, 12, 12) and ``alos`` (4, 3, 4, 4): the first two stored bands and
  band0 / (band1 + 1e-10) clipped to [-1e4, 1e4]; further stored bands are dropped. (AnySat
  divides band 0 by all stored bands from 1 on, ``x[:, 1:]``, which gives its projectors' 3
  channels only when exactly 2 bands are stored);
- ``<m>_dates`` int32 (T,): day of year (1-based) of the timestamp in UTC. AnySat converts with
  the machine's local time zone, which can move a date by one day;
- ``<m>_valid`` uint8 (T, C, H, W) from the mask file (the zeros of invalid pixels become the
  projector's pad value). The ratio channel is valid where both of its bands are; AnySat used the
  mask of stored band 2 there;
- ``label`` int32: species index 0-39 (AnySat one-hots it; multiclass cross-entropy).

Splits: the ``train``, ``val`` and ``test`` folders, examples in ``labels2.json`` order. The
training loader's density sampling and temporal dropout are sampling choices, not applied here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from anysat_jax.core.dates import utc_day_of_year
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec
from input_pipeline.datasets import _common

NUM_CLASSES = 40
RATIO_EPS = 1e-10
RATIO_CLIP = 1e4
RATIO_MODALITIES = ("s1", "alos")
_MODALITIES = {"s2": (12, 12), "s1": (12, 12), "l7": (4, 4), "alos": (4, 4), "modis": (1, 1)}
_STORED_CHANNELS = {"s2": 10, "s1": 2, "l7": 6, "alos": 2, "modis": 7}  # At least.


def ratio_channels(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(T, C>=2, H, W) data and validity → float32 (T, 3, H, W) band0, band1, ratio; uint8 valid."""
  b0, b1 = x[:, :1].astype(np.float32), x[:, 1:2].astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    ratio = np.clip(b0 / (b1 + np.float32(RATIO_EPS)), -RATIO_CLIP, RATIO_CLIP)
  v = valid[:, :2]
  return np.concatenate([b0, b1, ratio], 1), np.concatenate([v, v[:, :1] & v[:, 1:2]], 1)


def _arr0(path: str, sid: str) -> np.ndarray:
  with _common.guard(path, sid), np.load(path, allow_pickle=False) as z:
    x = z["arr_0"]
  return _common.real_numbers(x, path, sid)


def _load_modality(folder: str, sid: str, mod: str) -> dict[str, np.ndarray]:
  prefix = os.path.join(folder, f"{sid}_{mod}")
  path = prefix + ".npz"
  x = _arr0(path, sid)
  if x.ndim != 4 or x.shape[-1] < _STORED_CHANNELS[mod]:
    raise DataError(f"{mod}: shape {x.shape}, expected (T, H, W, C>={_STORED_CHANNELS[mod]})",
                    path=path, example_id=sid)
  mask_path = prefix + "_mask.npz"
  mask = _arr0(mask_path, sid)
  if mask.shape not in (x.shape, x.shape[:3] + (1,)):
    raise DataError(f"{mod}: mask shape {mask.shape} does not match data {x.shape}",
                    path=mask_path, example_id=sid)
  x = np.moveaxis(x, -1, 1)
  valid = np.broadcast_to(np.moveaxis(mask != 0, -1, 1), x.shape).astype(np.uint8)
  if mod in RATIO_MODALITIES:
    x, valid = ratio_channels(x, valid)
  ts_path = prefix + "_timestamp.npz"
  ts = _arr0(ts_path, sid)
  with _common.guard(ts_path, sid):
    dates = utc_day_of_year(ts.reshape(-1))
  _common.check_length(x, dates, mod, ts_path, sid)
  return {mod: x.astype(np.float32), mod + "_dates": dates, mod + "_valid": valid}


def _load(folder: str, sid: str, label: int, modalities: tuple[str, ...]) -> Example:
  ex: Example = {"name": sid, "label": np.int32(label)}
  for mod in modalities:
    ex.update(_load_modality(os.path.join(folder, sid), sid, mod))
  return ex


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(id, example)`` for the ids of ``<split>/labels2.json``, in file order."""
  chosen = _common.select(modalities, _MODALITIES)
  folder = os.path.join(manual_dir, split)
  labels_path = os.path.join(folder, "labels2.json")
  labels = {}
  for sid, c in _common.read_json(labels_path).items():
    if not (isinstance(c, int) and 0 <= c < NUM_CLASSES):
      _common.report(DataError(f"label {c!r} is not a class index 0-{NUM_CLASSES - 1}",
                               path=labels_path, example_id=sid), on_error)
      continue
    labels[sid] = c
  load = lambda sid: _load(folder, sid, labels[sid], chosen)  # noqa: E731
  yield from _common.iter_examples(labels, load, on_error)


SPEC = DatasetSpec(
    name="planted",
    modalities=dict(_MODALITIES),
    splits=("train", "val", "test"),
    label=LabelSpec("multiclass", num_classes=NUM_CLASSES),
    tile_m=120.0,
    patch_sizes_m=(30,),
    read=read,
    description=__doc__,
)
