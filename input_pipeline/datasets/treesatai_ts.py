"""TreeSatAI-TS: 60 m forest tiles in Germany, aerial + Sentinel-2 + Sentinel-1 ascending.

As AnySat's ``src/data/TreeSAT.py`` reads it. Layout under ``manual_dir``::

  {train,val,test}_filenames.lst   one aerial file name ``<name>.tif`` per line
  aerial/<name>.tif                GeoTIFF 4 x 304 x 304 uint8, 0.2 m
  sentinel/<name>.h5               ``sen-2-data`` (T, 10, 6, 6) float32, ``sen-2-products``,
                                   ``sen-1-asc-products`` (product names, one per date)
  s1-asc/<name>.pth                ``torch.save`` of a (T, 3, 6, 6) tensor: VV, VH, VV/VH
  labels/TreeSatBA_v9_60m_multi_labels.json   ``{"<name>.tif": [[genus, fraction], ...]}``

Example ``<name>`` (file stem):

- ``aerial`` float32 (4, 304, 304), 8-bit digital numbers in file band order (not reordered);
- ``s2`` float32 (T, 10, 6, 6), L2A reflectance x 1e4; ``s2_dates`` from field 2 of the product
  name (``S2A_MSIL2A_20200102T...`` → 2);
- ``s1-asc`` float32 (T, 2, 6, 6), channels 0-1 (VV, VH, linear) of the ``.pth``;
  ``s1-asc_dates`` from field 4 of ``sen-1-asc-products``;
- ``label`` float32 (15,): multi-hot of the genera whose area fraction is > 0.07.

As in AnySat, a tile with no genus above 0.07 is dropped (with a logged warning); ``sen-2-masks``
is not read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import h5py
import numpy as np

from anysat_jax.core.dates import day_of_year
from anysat_jax.io.torch_pickle.reader import load_pth
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec
from input_pipeline.datasets import _common

GENERA = ("Abies", "Acer", "Alnus", "Betula", "Cleared", "Fagus", "Fraxinus", "Larix", "Picea",
          "Pinus", "Populus", "Prunus", "Pseudotsuga", "Quercus", "Tilia")
MIN_FRACTION = 0.07
LABELS_FILE = os.path.join("labels", "TreeSatBA_v9_60m_multi_labels.json")
_MODALITIES = {"aerial": (304, 304), "s2": (6, 6), "s1-asc": (6, 6)}


def multi_hot(genera: Sequence[Sequence], min_fraction: float = MIN_FRACTION) -> np.ndarray:
  """``[[genus, fraction], ...]`` → float32 (15,) multi-hot of genera with fraction > min.

  Raises ``ValueError`` on an unknown genus or a fraction that is not a number in [0, 1].
  """
  y = np.zeros(len(GENERA), np.float32)
  for genus, fraction in genera:
    # A NaN fraction compares False and would silently drop the genus.
    if not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
      raise ValueError(f"genus {genus!r}: area fraction {fraction!r} is not a number in [0, 1]")
    if genus not in GENERA:
      raise ValueError(f"unknown genus {genus!r}")
    if fraction > min_fraction:
      y[GENERA.index(genus)] = 1.0
  return y


def _product_dates(names: np.ndarray, field: int) -> np.ndarray:
  """Day of year of each product name: first 8 characters of ``name.split('_')[field]``."""
  return np.array([day_of_year(n.decode().split("_")[field][:8]) for n in names], np.int32)


def _load(root: str, name: str, label: np.ndarray, modalities: tuple[str, ...]) -> Example:
  ex: Example = {"name": name, "label": label}
  if "aerial" in modalities:
    ex["aerial"] = _common.read_tif(os.path.join(root, "aerial", name + ".tif"), name).astype(
        np.float32)
  h5_path = os.path.join(root, "sentinel", name + ".h5")
  if "s2" in modalities:
    with _common.guard(h5_path, name), h5py.File(h5_path, "r") as f:
      ex["s2"] = _common.real_numbers(f["sen-2-data"][()], h5_path, name).astype(np.float32)
      ex["s2_dates"] = _product_dates(f["sen-2-products"][()], 2)
    _common.check_length(ex["s2"], ex["s2_dates"], "s2", h5_path, name)
  if "s1-asc" in modalities:
    pth_path = os.path.join(root, "s1-asc", name + ".pth")
    with _common.guard(pth_path, name):
      s1 = _common.real_numbers(np.asarray(load_pth(pth_path)), pth_path, name)
      if s1.ndim != 4 or s1.shape[1] < 2:
        raise ValueError(f"expected a (T, 3, H, W) tensor, got shape {s1.shape}")
      ex["s1-asc"] = s1[:, :2].astype(np.float32)
    with _common.guard(h5_path, name), h5py.File(h5_path, "r") as f:
      ex["s1-asc_dates"] = _product_dates(f["sen-1-asc-products"][()], 4)
    _common.check_length(ex["s1-asc"], ex["s1-asc_dates"], "s1-asc", pth_path, name)
  return ex


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(name, example)`` for the tiles of ``{split}_filenames.lst``, in list order."""
  chosen = _common.select(modalities, _MODALITIES)
  files = _common.read_lines(os.path.join(manual_dir, f"{split}_filenames.lst"))
  labels_path = os.path.join(manual_dir, LABELS_FILE)
  labels = _common.read_json(labels_path)
  targets = {}
  for file in files:
    name = os.path.splitext(file)[0]
    try:
      if file not in labels:
        raise DataError("tile has no label entry", path=labels_path, example_id=name)
      with _common.guard(labels_path, name):
        y = multi_hot(labels[file])
    except DataError as e:
      _common.report(e, on_error)
      continue
    if not y.any():
      logging.getLogger(__name__).warning(
          "TreeSatAI-TS %s: dropping %s, no genus above %s (as AnySat)", split, name, MIN_FRACTION)
      continue
    targets[name] = y
  load = lambda name: _load(manual_dir, name, targets[name], chosen)
  yield from _common.iter_examples(targets, load, on_error)


SPEC = DatasetSpec(
    name="treesatai_ts",
    modalities=dict(_MODALITIES),
    splits=("train", "val", "test"),
    label=LabelSpec("multilabel", num_classes=len(GENERA), class_names=GENERA),
    tile_m=60.0,
    patch_sizes_m=(10, 20),
    read=read,
    description=__doc__,
)
