"""S2NAIP-Urban: 640 m tiles of US towns, NAIP + Sentinel-2 + Sentinel-1 + Landsat-8 (no labels).

Source: the urban set of Hugging Face ``allenai/s2-naip``. As AnySat's ``src/data/S2Naip.py``
reads it (pretraining only). Layout under ``manual_dir``::

  <split>_dict.json          lists ``name``, ``s2_dates``, ``s1_dates``, ``l8_dates`` (per sample,
                             a list of YYYYMMDD dates)
  naip/<name>.png            512 x 512 x 4 uint8 (R, G, B, NIR stored as RGBA), 1.25 m
  sentinel2/<name>_8.tif     T*4 bands 64 x 64 (10 m): B2, B3, B4, B8
  sentinel2/<name>_16.tif    T*6 bands 32 x 32 (20 m): B5, B6, B7, B8A, B11, B12
  sentinel1/<name>.tif       T*2 bands 64 x 64: VV, VH
  landsat/<name>_8.tif       T bands 64 x 64: B8 (panchromatic)
  landsat/<name>_16.tif      T*10 bands 32 x 32: B1-B7, B9, B10, B11

Bands are date-major (all bands of the first date, then the next date). Example ``<name>``:

- ``naip`` float32 (4, 512, 512), channels as stored;
- ``s2`` float32 (T, 10, 64, 64): the 10 m bands and the 20 m bands upsampled 32 → 64, reordered
  (0, 1, 2, 4, 5, 6, 3, 7, 8, 9) to B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12;
- ``l8`` float32 (T, 11, 64, 64): the pan band and the other ten upsampled 32 → 64, i.e. B8, B1-B7,
  B9, B10, B11;
- ``s1`` float32 (T, 3, 64, 64): VV, VH and VV / (VH + 1e-10) clipped to [-1e4, 1e4];
- ``<m>_dates`` int32 (T,): day of year (1-based) of the dict's dates.

Upsampling is bilinear with half-pixel centres and clamped edges, i.e. torch's
``interpolate(mode="bilinear", align_corners=False)``. ``label`` is absent: the OSM rasters of
``openstreetmap/`` are unused by AnySat and not read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from anysat_jax.core.dates import day_of_year
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec
from input_pipeline.datasets import _common

S2_ORDER = (0, 1, 2, 4, 5, 6, 3, 7, 8, 9)
RATIO_EPS = 1e-10
RATIO_CLIP = 1e4
SIZE = 64
_MODALITIES = {"naip": (512, 512), "s2": (SIZE, SIZE), "l8": (SIZE, SIZE), "s1": (SIZE, SIZE)}
# modality -> [(folder, file suffix, bands per date, pixels per side)].
_FILES = {
    "s2": [("sentinel2", "_8", 4, SIZE), ("sentinel2", "_16", 6, SIZE // 2)],
    "l8": [("landsat", "_8", 1, SIZE), ("landsat", "_16", 10, SIZE // 2)],
    "s1": [("sentinel1", "", 2, SIZE)],
}


def upsample_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """(..., h, w) → float32 (..., size, size), bilinear with ``align_corners=False``."""

  def taps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = np.maximum((np.arange(size) + 0.5) * n / size - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), n - 1)
    return i0, np.minimum(i0 + 1, n - 1), (src - i0).astype(np.float32)

  y0, y1, fy = taps(x.shape[-2])
  x0, x1, fx = taps(x.shape[-1])
  x = x.astype(np.float32)
  rows = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]
  return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def _series(root: str, name: str, folder: str, suffix: str, bands: int, size: int,
            t: int) -> np.ndarray:
  """A date-major multi-band GeoTIFF as float32 (T, bands, size, size), upsampled to 64 px."""
  path = os.path.join(root, folder, name + suffix + ".tif")
  x = _common.read_tif(path, name)
  if x.shape != (t * bands, size, size):
    raise DataError(f"{x.shape[0]} bands of {x.shape[1:]} px, expected {t} dates x {bands} "
                    f"bands of {size} x {size} px", path=path, example_id=name)
  x = x.reshape(t, bands, size, size)
  return x.astype(np.float32) if size == SIZE else upsample_bilinear(x, SIZE)


def _load(root: str, name: str, dates: dict[str, np.ndarray],
          modalities: tuple[str, ...]) -> Example:
  ex: Example = {"name": name}
  if "naip" in modalities:
    path = os.path.join(root, "naip", name + ".png")
    with _common.guard(path, name), Image.open(path) as img:
      naip = np.asarray(img)
    if naip.shape != (512, 512, 4):
      raise DataError(f"NAIP image of shape {naip.shape}, expected (512, 512, 4)", path=path,
                      example_id=name)
    ex["naip"] = np.moveaxis(naip, -1, 0).astype(np.float32)
  for mod in ("s2", "l8", "s1"):
    if mod not in modalities:
      continue
    x = np.concatenate([_series(root, name, *f, len(dates[mod])) for f in _FILES[mod]], 1)
    if mod == "s2":
      x = x[:, list(S2_ORDER)]
    if mod == "s1":
      with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.clip(x[:, :1] / (x[:, 1:2] + np.float32(RATIO_EPS)), -RATIO_CLIP, RATIO_CLIP)
      x = np.concatenate([x, ratio], 1)
    ex[mod] = x
    ex[mod + "_dates"] = dates[mod]
  return ex


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(name, example)`` for the samples of ``<split>_dict.json``, in list order."""
  chosen = _common.select(modalities, _MODALITIES)
  path = os.path.join(manual_dir, f"{split}_dict.json")
  table = _common.read_json(path)
  with _common.guard(path, None):
    names = [str(n) for n in table["name"]]
    columns = {m: table[m + "_dates"] for m in ("s2", "s1", "l8")}
    if any(len(c) != len(names) for c in columns.values()):
      raise ValueError("the date lists and the name list differ in length")
  dates = {}
  for i, name in enumerate(names):
    try:
      with _common.guard(path, name):
        dates[name] = {m: np.array([day_of_year(d) for d in c[i]], np.int32)
                       for m, c in columns.items()}
    except DataError as e:
      _common.report(e, on_error)
  load = lambda name: _load(manual_dir, name, dates[name], chosen)  # noqa: E731
  yield from _common.iter_examples(dates, load, on_error)


SPEC = DatasetSpec(
    name="s2naip_urban",
    modalities=dict(_MODALITIES),
    splits=("train", "val"),
    label=LabelSpec("none"),
    tile_m=640.0,
    patch_sizes_m=(40, 80, 160),
    read=read,
    description=__doc__,
)
