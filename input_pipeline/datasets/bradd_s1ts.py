"""BraDD-S1TS: 480 m tiles of the Brazilian Amazon, Sentinel-1 series, deforestation maps.

Source: Karaman et al., ISPRS Annals X-1/W1 (2023). As AnySat's ``src/data/BraDD.py`` reads
it. Layout under ``manual_dir``::

  meta.csv          index column, ``file``, ``close_set`` (``train`` / ``validation`` / ``test``)
  Samples/<file>    ``torch.save`` of a dict: ``image`` (T, 2, 48, 48) VV, VH at 10 m;
                    ``image_dates`` (T ``datetime``s); ``label_dates`` (2 ``datetime``s);
                    ``label`` (2, 48, 48), entry 1 = the deforestation map

Example ``<file stem>``:

- ``s1`` float32 (T, 3, 48, 48): VV, VH and VV / (VH + 1e-6) clipped to [-1e4, 1e4];
- ``s1_dates`` int32 (T,): day of year (1-based) of ``image_dates``. Deviation: AnySat feeds the
  days since the earliest of the sample's image and label dates, plus one (1 to ~800 for long
  series, past the 366-day period of the date encoding); the day of year is the convention of
  every other dataset here. ``label_dates`` are not used;
- ``label`` int32 (48, 48): ``label[1]``, 0 no change, 1 deforestation.

Dates may be ``datetime.date``/``datetime`` objects (what the release and the synthetic sample
store; ``anysat_jax.io.torch_pickle`` loads them), ISO strings (``YYYY-MM-DD...``) or ``YYYYMMDD``
integers/strings.

Splits: ``close_set`` (``val`` reads ``validation``), examples in ``meta.csv`` order.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence

import numpy as np

from anysat_jax.core.dates import day_of_year
from anysat_jax.io.torch_pickle.reader import load_pth
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec, check_label
from input_pipeline.datasets import _common

RATIO_EPS = 1e-6
RATIO_CLIP = 1e4
SIZE = 48
_CLOSE_SETS = {"train": "train", "val": "validation", "test": "test"}
_MODALITIES = {"s1": (SIZE, SIZE)}


def _load(root: str, file: str, modalities: tuple[str, ...]) -> Example:
  key = os.path.splitext(file)[0]
  path = os.path.join(root, "Samples", file)
  with _common.guard(path, key):
    sample = load_pth(path)
    image = np.asarray(sample["image"])
    label = np.asarray(sample["label"])
    dates = np.array([day_of_year(d) for d in sample["image_dates"]], np.int32)
  if image.ndim != 4 or image.shape[1:] != (2, SIZE, SIZE):
    raise DataError(f"image of shape {image.shape}, expected (T, 2, {SIZE}, {SIZE})", path=path,
                    example_id=key)
  if label.ndim != 3 or label.shape[0] < 2 or label.shape[1:] != (SIZE, SIZE):
    raise DataError(f"label of shape {label.shape}, expected (2, {SIZE}, {SIZE})", path=path,
                    example_id=key)
  image, label = (_common.real_numbers(a, path, key) for a in (image, label))
  check_label(SPEC.label, label[1], path, key)
  ex: Example = {"name": key, "label": label[1].astype(np.int32)}
  if "s1" in modalities:
    x = image.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      ratio = np.clip(x[:, :1] / (x[:, 1:] + np.float32(RATIO_EPS)), -RATIO_CLIP, RATIO_CLIP)
    ex["s1"] = np.concatenate([x, ratio], 1)
    ex["s1_dates"] = dates
    _common.check_length(ex["s1"], dates, "s1", path, key)
  return ex


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(file stem, example)`` for the ``meta.csv`` rows of the split, in file order."""
  chosen = _common.select(modalities, _MODALITIES)
  path = os.path.join(manual_dir, "meta.csv")
  with _common.guard(path, None), open(path, newline="") as f:
    files = [row["file"] for row in csv.DictReader(f) if row["close_set"] == _CLOSE_SETS[split]]
  by_key = {os.path.splitext(file)[0]: file for file in files}
  if len(by_key) != len(files):
    raise DataError("duplicate file names", path=path)
  load = lambda key: _load(manual_dir, by_key[key], chosen)  # noqa: E731
  yield from _common.iter_examples(by_key, load, on_error)


SPEC = DatasetSpec(
    name="bradd_s1ts",
    modalities=dict(_MODALITIES),
    splits=tuple(_CLOSE_SETS),
    label=LabelSpec("segmentation", num_classes=2, resolution_m=10.0,
                    class_names=("no change", "deforestation")),
    tile_m=480.0,
    patch_sizes_m=(40,),
    read=read,
    description=__doc__,
)
