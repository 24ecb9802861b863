"""FLAIR #2: 102.4 m aerial patches of France (5 bands, 0.2 m) + a Sentinel-2 series, 13 classes.

As AnySat's ``src/data/FLAIR.py`` reads it. Layout under ``manual_dir`` (``<s>`` is ``train`` for
the train and val splits, ``2_..._test`` for test: ``flair_2_aerial_test`` ...)::

  splits.json                             {"train": [domain, ...], "val": [...], "test": [...]}
  flair-2_centroids_sp_to_patch.json      {"IMG_<n>.tif": [row, col], ...} in the S2 super-area
  flair_aerial_<s>/<domain>/<zone>/img/IMG_<n>.tif   5 x 512 x 512 uint8: R, G, B, NIR, nDSM
  flair_labels_<s>/<domain>/<zone>/msk/MSK_<n>.tif   1 band, class codes 1-19
  flair_sen_<s>/<domain>/<zone>/sen/*data.npy        (T, 10, H_sp, W_sp) uint16 super-area
  flair_sen_<s>/<domain>/<zone>/sen/*products.txt    one S2 product name per line

Example ``IMG_<n>``:

- ``aerial-flair`` float32 (5, H, W) as stored (512 x 512 at 0.2 m in FLAIR; never resized);
- ``s2`` float32 (T, 10, 10, 10): rows/cols ``[c - 5, c + 5)`` of the super-area around the
  patch centroid ``c``; a window that leaves the super-area is a ``DataError``; ``s2_dates`` =
  day of year of characters 11-18 of each product line;
- ``label`` int32 (H, W) at 0.2 m: codes > 13 set to 13, minus 1 → 0-12 (12 = "other", which
  AnySat gives weight 0 and drops from the IoU, hence ``ignore_index`` 12).

``read(..., modalities=("aerial-flair",))`` reads aerial + labels only (no S2 files needed).
The shipped torchgeo fake FLAIR-2 sample has 32 x 32 aerial patches at 1 m, not 512 x 512 at
0.2 m; the reader returns them as they are.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from anysat_jax.core.dates import day_of_year
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, LabelSpec
from input_pipeline.datasets import _common

CLASSES = ("building", "pervious surface", "impervious surface", "bare soil", "water",
           "coniferous", "deciduous", "brushwood", "vineyard", "herbaceous vegetation",
           "agricultural land", "plowed land", "other")
S2_WINDOW = 10
CENTROIDS_FILE = "flair-2_centroids_sp_to_patch.json"
_MODALITIES = {"aerial-flair": (512, 512), "s2": (S2_WINDOW, S2_WINDOW)}
_ROOTS = {"train": ("flair_aerial_train", "flair_labels_train", "flair_sen_train"),
          "val": ("flair_aerial_train", "flair_labels_train", "flair_sen_train"),
          "test": ("flair_2_aerial_test", "flair_2_labels_test", "flair_2_sen_test")}


def labels_from_codes(codes: np.ndarray) -> np.ndarray:
  """FLAIR class codes 1-19 → int32 classes 0-12 (codes > 13 merged into 12, "other")."""
  return np.minimum(codes.astype(np.int32), len(CLASSES)) - 1


def _s2(sen_dir: pathlib.Path, centroid: Sequence[int], name: str) -> tuple[np.ndarray, np.ndarray]:
  """The (T, 10, 10, 10) window around ``centroid`` and its (T,) dates."""
  found = {}
  for suffix in ("data.npy", "products.txt"):
    paths = sorted(sen_dir.glob("*" + suffix))
    if len(paths) != 1:
      raise DataError(f"expected one *{suffix}, found {len(paths)}", path=str(sen_dir),
                      example_id=name)
    found[suffix] = paths[0]
  data = _common.read_npy(found["data.npy"], name, mmap=True)
  r, c = (int(v) for v in centroid)
  h = S2_WINDOW // 2
  if data.ndim != 4 or not (h <= r <= data.shape[2] - h and h <= c <= data.shape[3] - h):
    raise DataError(f"S2 window around ({r}, {c}) leaves the super-area of shape {data.shape}",
                    path=str(found["data.npy"]), example_id=name)
  with _common.guard(found["data.npy"], name):
    window = np.asarray(data[:, :, r - h:r + h, c - h:c + h], np.float32)
  lines = _common.read_lines(found["products.txt"])
  with _common.guard(found["products.txt"], name):
    dates = np.array([day_of_year(line[11:19]) for line in lines], np.int32)
  _common.check_length(window, dates, "s2", found["data.npy"], name)
  return window, dates


def _load(root: pathlib.Path, split: str, img: pathlib.Path, domain: str,
          centroids: dict | None, modalities: tuple[str, ...]) -> Example:
  aerial_root, labels_root, sen_root = _ROOTS[split]
  name = img.stem
  zone = img.parent.parent.relative_to(root / aerial_root / domain)
  ex: Example = {"name": name}
  if "aerial-flair" in modalities:
    ex["aerial-flair"] = _common.read_tif(img, name).astype(np.float32)
  if "s2" in modalities:
    if img.name not in centroids:
      raise DataError("patch has no centroid", path=str(root / CENTROIDS_FILE), example_id=name)
    ex["s2"], ex["s2_dates"] = _s2(root / sen_root / domain / zone / "sen", centroids[img.name],
                                   name)
  msk = root / labels_root / domain / zone / "msk" / ("MSK_" + name.removeprefix("IMG_") + ".tif")
  codes = _common.read_tif(msk, name)[0]
  if codes.min(initial=1) < 1:  # Code 0 is not a FLAIR class; it would become -1.
    raise DataError(f"class code {codes.min()} below 1 (codes are 1-19)", path=str(msk),
                    example_id=name)
  ex["label"] = labels_from_codes(codes)
  return ex


def _id_number(path: pathlib.Path) -> int:
  return int(path.stem.rsplit("_", 1)[-1])


def read(manual_dir: str, split: str, *, modalities: Sequence[str] | None = None,
         on_error: _common.OnError | None = None) -> Iterator[tuple[str, Example]]:
  """Yields ``(IMG_<n>, example)`` for the domains of ``split``, each sorted by patch number."""
  chosen = _common.select(modalities, _MODALITIES)
  root = pathlib.Path(manual_dir)
  splits = _common.read_json(root / "splits.json")
  centroids = _common.read_json(root / CENTROIDS_FILE) if "s2" in chosen else None
  with _common.guard(root / "splits.json", None):
    domains = list(splits[split])
  images = {}
  for domain in domains:
    domain_dir = root / _ROOTS[split][0] / domain
    if not domain_dir.is_dir():
      raise DataError(f"domain {domain} of split {split!r} is missing", path=str(domain_dir))
    for img in sorted(domain_dir.rglob("IMG_*.tif"), key=_id_number):
      if img.stem in images:
        raise DataError("patch appears twice", path=str(img), example_id=img.stem)
      images[img.stem] = (img, domain)
  load = lambda name: _load(root, split, *images[name], centroids, chosen)
  yield from _common.iter_examples(images, load, on_error)


SPEC = DatasetSpec(
    name="flair",
    modalities=dict(_MODALITIES),
    splits=tuple(_ROOTS),
    label=LabelSpec("segmentation", num_classes=len(CLASSES), ignore_index=len(CLASSES) - 1,
                    resolution_m=0.2, class_names=CLASSES),
    tile_m=100.0,
    patch_sizes_m=(10, 20),
    read=read,
    description=__doc__,
)
