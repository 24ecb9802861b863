"""TimeSen2Crop: single-pixel Sentinel-2 series of crop fields in Slovenia, 16 crop classes.

Source: Weikmann et al. 2021, zenodo.org/records/4715631. As AnySat's
``src/data/TimeSen2Crop.py`` reads it. Layout under ``manual_dir``::

  <tile>/dates.csv            column ``acquisition_date`` (YYYYMMDD), one row per date
  <tile>/<class id>/<k>.csv   one pixel: a header row, then one row per date with the columns
                              B2, B3, B4, B5, B6, B7, B8A, B11, B12 (L2A reflectance x 1e4), Flag

Example ``<tile>_<class id>_<k>``:

- ``s2`` float32 (T, 10, 1, 1) in the S2 projector's order B2, B3, B4, B5, B6, B7, B8, B8A, B11,
  B12: the nine CSV bands, and zeros for B8, which the dataset lacks. Deviation: AnySat takes the
  CSV columns (0, 1, 2, 3, 4, 5, 6, 9, 7, 8), i.e. B8A in the B8 slot and the Flag column in the
  (masked) B8A slot; here B8A is in its own slot and the B8 slot is the masked one;
- ``s2_valid`` uint8 (T, 10, 1, 1): 1, except 0 in the B8 slot (→ the projector's pad value);
- ``s2_dates`` int32 (T,): day of year (1-based) of ``dates.csv``;
- ``label`` int32: the class id of the folder, 0-15.

The Flag column (cloud, shadow, snow) is not used: flagged dates are fed as they are, as in
AnySat. Splits by tile: ``val`` = 33TWN, ``test`` = 33UVP, ``train`` = every other tile folder
except 2019_33UVP. Examples are sorted by tile, class id and pixel number.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence

import numpy as np

from anysat_jax.core.dates import day_of_year
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec
from input_pipeline.datasets import _common

NUM_CLASSES = 16
CSV_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B11", "B12")
# Projector slot of each CSV band column (slot 6, B8, stays empty).
SLOTS = (0, 1, 2, 3, 4, 5, 7, 8, 9)
MISSING_SLOT = 6
VAL_TILES, TEST_TILES, UNUSED_TILES = ("33TWN",), ("33UVP",), ("2019_33UVP",)
_MODALITIES = {"s2": (1, 1)}


def _tiles(root: str, split: str) -> list[str]:
  try:
    tiles = sorted(t for t in os.listdir(root)
                   if os.path.isfile(os.path.join(root, t, "dates.csv")))
  except OSError as e:
    raise DataError(f"cannot list the tiles ({e})", path=root) from e
  if split == "val":
    return [t for t in tiles if t in VAL_TILES]
  if split == "test":
    return [t for t in tiles if t in TEST_TILES]
  return [t for t in tiles if t not in VAL_TILES + TEST_TILES + UNUSED_TILES]


def _tile_dates(root: str, tile: str) -> np.ndarray:
  path = os.path.join(root, tile, "dates.csv")
  with _common.guard(path, None), open(path, newline="") as f:
    return np.array([day_of_year(row["acquisition_date"].strip())
                     for row in csv.DictReader(f)], np.int32)


def _numbered(folder: str, suffix: str, dirs: bool) -> list[tuple[int, str]]:
  """``(n, name)`` of the folders (``dirs``) or files ``<n><suffix>`` in ``folder``, by n."""
  names = [n.removesuffix(suffix) for n in os.listdir(folder) if n.endswith(suffix)
           and os.path.isdir(os.path.join(folder, n)) == dirs]
  return sorted((int(n), n + suffix) for n in names if n.isdigit())


def _load(key: str, path: str, label: int, dates: np.ndarray) -> Example:
  with _common.guard(path, key):
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float32)
  if table.shape[1] < len(CSV_BANDS):
    raise DataError(f"{table.shape[1]} columns, expected the {len(CSV_BANDS)} bands and Flag",
                    path=path, example_id=key)
  if table.shape[0] != dates.shape[0]:
    raise DataError(f"{table.shape[0]} rows but {dates.shape[0]} dates in dates.csv", path=path,
                    example_id=key)
  s2 = np.zeros((table.shape[0], 10), np.float32)
  s2[:, list(SLOTS)] = table[:, :len(CSV_BANDS)]
  valid = np.ones_like(s2, np.uint8)
  valid[:, MISSING_SLOT] = 0
  return {"name": key, "s2": s2[..., None, None], "s2_valid": valid[..., None, None],
          "s2_dates": dates, "label": np.int32(label)}


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(<tile>_<class>_<k>, example)`` for the pixels of the split's tiles."""
  _common.select(modalities, _MODALITIES)
  pixels: dict[str, tuple[str, int, np.ndarray]] = {}
  for tile in _tiles(manual_dir, split):
    dates = _tile_dates(manual_dir, tile)
    folder = os.path.join(manual_dir, tile)
    for label, class_dir in _numbered(folder, "", dirs=True):
      if label >= NUM_CLASSES:
        raise DataError(f"class folder {class_dir} is not a class id 0-{NUM_CLASSES - 1}",
                        path=os.path.join(folder, class_dir))
      for k, file in _numbered(os.path.join(folder, class_dir), ".csv", dirs=False):
        pixels[f"{tile}_{label}_{k}"] = (os.path.join(folder, class_dir, file), label, dates)
  load = lambda key: _load(key, *pixels[key])  # noqa: E731
  yield from _common.iter_examples(pixels, load, on_error)


SPEC = DatasetSpec(
    name="timesen2crop",
    modalities=dict(_MODALITIES),
    splits=("train", "val", "test"),
    label=LabelSpec("multiclass", num_classes=NUM_CLASSES),
    tile_m=10.0,
    patch_sizes_m=(10,),
    read=read,
    description=__doc__,
)
