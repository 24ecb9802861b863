"""SICKLE: paddy plots of the Cauvery Delta (India), Sentinel-2, Sentinel-1 and Landsat-8 series.

Source: Sani et al., WACV 2024 (github.com/Depanshu-Sani/SICKLE). As AnySat's
``src/data/Sickle.py`` reads it. Layout under ``manual_dir``::

  sickle_dataset_tabular.csv          one row per sample: ``UNIQUE_ID``, ``PLOT_ID``, ``SPLIT``, ...
  images/{S2,S1,L8}/npy/<uid>/*.npz   one file per acquisition, one 2-D array per band name
  masks/10m/<uid>.tif                 band 0 plot ids (0 = no plot), band 1 crop type (1 = paddy,
                                      0 = none); further bands unused

The acquisition date is in the file name: S2 ``<YYYYMMDD>T..._...`` or, for names starting with
``T``, the second ``_`` field (``T44PMT_<YYYYMMDD>T...``); S1 the fifth field
(``S1A_IW_GRDH_1SDV_<YYYYMMDD>T..._...``); L8 the third (``LC08_<path-row>_<YYYYMMDD>``).

As in the official pipeline (``img_size`` 32), every band and the label map are resized to
32 x 32 px with nearest-neighbour sampling (OpenCV ``INTER_NEAREST``: source index
floor(i * n / 32)): the rasters come in varying sizes, the result is a 320 m tile at a nominal
10 m. Example ``<uid>``:

- ``s2`` float32 (T, 10, 32, 32): B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12, the S2 projector's
  order. Deviation: AnySat's band list has B8A before B8, so it fed B8A to the pretrained B8 slot
  and B8 to the B8A slot; here each band is in its own slot. A band missing from a file is zeros,
  as in AnySat;
- ``s1`` float32 (T, 3, 32, 32): VV, VH and VV / (VH + 1e-6) clipped to [-1e4, 1e4];
- ``l8`` float32 (T, 11, 32, 32) in the l8 projector's order B8, B1-B7, B9, B10, B11, filled from
  (none, SR_B1-SR_B7, none, ST_B10, none); ``l8_valid`` uint8 (T, 11, 32, 32) is 0 for the three
  missing slots (and a band missing from a file), whose values are zeros;
- ``<m>_dates`` int32 (T,): day of year (1-based). Acquisitions are sorted by date (AnySat took
  the unsorted glob order; the date-encoded L-TAE does not depend on it);
- ``label`` int32 (32, 32): crop type - 1, then values > 1 → 1 and < -1 → 0: 0 paddy,
  1 non-paddy, -1 unlabelled (ignored). Pixels of plots whose id is not among the split's
  ``PLOT_ID`` values are set to -1 before resizing. AnySat checks the plots of
  ``np.unique(plot_mask)[1:]``, which skips the smallest plot id of a mask without background
  pixels; here every plot is checked.

Splits: the ``SPLIT`` column; ``test`` reads the ``val`` rows, as AnySat does (the test labels are
not released).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterator, Sequence

import numpy as np

from anysat_jax.core.dates import day_of_year
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec
from input_pipeline.datasets import _common

SIZE = 32
RATIO_EPS = 1e-6
RATIO_CLIP = 1e4
S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
S1_BANDS = ("VV", "VH")
L8_BANDS = (None, "SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B6", "SR_B7", None, "ST_B10",
            None)
_SPLIT_ROWS = {"train": "train", "val": "val", "test": "val"}
_MODALITIES = {"s2": (SIZE, SIZE), "s1": (SIZE, SIZE), "l8": (SIZE, SIZE)}
# modality -> (folder, bands, index of the date field in the file name).
_SENSORS = {"s2": ("S2", S2_BANDS, 0), "s1": ("S1", S1_BANDS, 4), "l8": ("L8", L8_BANDS, 2)}


def resize_nearest(x: np.ndarray, size: int = SIZE) -> np.ndarray:
  """(..., h, w) → (..., size, size) with OpenCV ``INTER_NEAREST`` sampling."""
  h, w = x.shape[-2:]
  rows = np.minimum(np.arange(size) * h // size, h - 1)
  cols = np.minimum(np.arange(size) * w // size, w - 1)
  return x[..., rows[:, None], cols[None, :]]


def file_date(mod: str, file_name: str) -> str:
  """YYYYMMDD of an acquisition from its base file name (see the module docstring)."""
  field = 1 if mod == "s2" and file_name.startswith("T") else _SENSORS[mod][2]
  return file_name.split("_")[field][:8]


def crop_label(mask: np.ndarray, split_plots: set[int]) -> np.ndarray:
  """Mask (>=2, H, W) → int32 (H, W) label: 0 paddy, 1 non-paddy, -1 ignored (see above)."""
  plots = np.rint(mask[0]).astype(np.int64)
  label = np.rint(mask[1]).astype(np.int64) - 1
  label[label > 1] = 1
  label[label < -1] = 0
  for plot in np.unique(plots):
    if plot != 0 and int(plot) not in split_plots:
      label[plots == plot] = -1
  return label.astype(np.int32)


def _series(root: str, uid: str, mod: str) -> dict[str, np.ndarray]:
  folder, bands, _ = _SENSORS[mod]
  pattern = os.path.join(root, "images", folder, "npy", uid, "*.npz")
  files = glob.glob(pattern)
  if not files:
    raise DataError(f"{mod}: no acquisitions", path=pattern, example_id=uid)
  dated = []
  for path in files:
    with _common.guard(path, uid):
      day = file_date(mod, os.path.basename(path))
      dated.append((day, day_of_year(day), path))
  dated.sort()
  images, valid = [], []
  for _, _, path in dated:
    with _common.guard(path, uid), np.load(path, allow_pickle=False) as z:
      arrays = {b: resize_nearest(_common.real_numbers(z[b], path, uid))
                for b in bands if b is not None and b in z.files}
    if any(a.shape != (SIZE, SIZE) for a in arrays.values()):
      raise DataError(f"{mod}: bands must be 2-D arrays", path=path, example_id=uid)
    images.append([arrays.get(b, np.zeros((SIZE, SIZE))) for b in bands])
    valid.append([b in arrays for b in bands])
  x = np.array(images, np.float32)
  out = {mod: x, mod + "_dates": np.array([doy for _, doy, _ in dated], np.int32)}
  if mod == "s1":
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      ratio = np.clip(x[:, :1] / (x[:, 1:] + np.float32(RATIO_EPS)), -RATIO_CLIP, RATIO_CLIP)
    out[mod] = np.concatenate([x, ratio], 1)
  if mod == "l8":
    out[mod + "_valid"] = np.broadcast_to(
        np.array(valid, np.uint8)[:, :, None, None], x.shape).copy()
  return out


def _load(root: str, uid: str, split_plots: set[int], modalities: tuple[str, ...]) -> Example:
  path = os.path.join(root, "masks", "10m", f"{uid}.tif")
  mask = _common.read_tif(path, uid)
  if mask.shape[0] < 2:
    raise DataError(f"mask has {mask.shape[0]} band(s), expected >= 2", path=path,
                    example_id=uid)
  ex: Example = {"name": uid, "label": resize_nearest(crop_label(mask, split_plots))}
  for mod in modalities:
    ex.update(_series(root, uid, mod))
  return ex


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(uid, example)`` for the CSV rows of the split, in file order."""
  chosen = _common.select(modalities, _MODALITIES)
  path = os.path.join(manual_dir, "sickle_dataset_tabular.csv")
  with _common.guard(path, None), open(path, newline="") as f:
    rows = [(str(int(float(r["UNIQUE_ID"]))), int(float(r["PLOT_ID"])))
            for r in csv.DictReader(f) if r["SPLIT"] == _SPLIT_ROWS[split]]
  split_plots = {plot for _, plot in rows}
  uids = list(dict.fromkeys(uid for uid, _ in rows))
  load = lambda uid: _load(manual_dir, uid, split_plots, chosen)  # noqa: E731
  yield from _common.iter_examples(uids, load, on_error)


SPEC = DatasetSpec(
    name="sickle",
    modalities=dict(_MODALITIES),
    splits=tuple(_SPLIT_ROWS),
    label=LabelSpec("segmentation", num_classes=2, ignore_index=-1, resolution_m=10.0,
                    class_names=("paddy", "non-paddy")),
    tile_m=320.0,
    patch_sizes_m=(10,),
    read=read,
    description=__doc__,
)
