"""What every dataset reader provides: the contract between readers, builders and loaders.

A reader turns a dataset's published on-disk layout into examples in the encoder's layout:

- single-date image ``<mod>``: float32 (C, H, W), raw values (not normalised);
- time series ``<mod>``: float32 (T, C, H, W), raw values, T = the example's real length;
- ``<mod>_dates``: int32 (T,), day of year, 1-based (1 January = 1), as the official loaders
  feed the L-TAE (see ``docs/datasets.md`` for per-dataset notes);
- optional ``<mod>_valid``: uint8 with the shape of ``<mod>`` (1 = measured value, 0 = missing,
  replaced by the projector's learned pad value);
- ``label``: per ``LabelSpec``;
- ``name``: str, the example id (file stem or sample id).

Channels are in the order of ``anysat_jax.core.modalities.MODALITIES[mod].bands``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from anysat_jax.core import modalities as mods

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """The target of a dataset.

  kind: ``"multilabel"`` (float32 multi-hot (K,)), ``"multiclass"`` (int32 scalar),
    ``"segmentation"`` (int32 (H, W) map at ``resolution_m``), or ``"none"``.
  num_classes: K.
  ignore_index: label value excluded from losses and metrics (None if no such value).
  resolution_m: metres per label pixel (segmentation only).
  class_names: K names.
  """

  kind: str
  num_classes: int = 0
  ignore_index: int | None = None
  resolution_m: float | None = None
  class_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset as the pipeline sees it.

  name: registry / TFDS name (snake_case).
  modalities: modality name -> (H, W) in pixels as stored (time-series T varies per example).
  splits: split names the reader accepts.
  label: the target.
  tile_m: side of a tile in metres.
  patch_sizes_m: GeoPlex patch sizes in metres.
  read: ``read(manual_dir, split) -> iterator of (key, example)``; raises ``DataError`` naming
    the file and example id on a corrupt, truncated or missing file.
  description: where the data comes from and the folder layout ``read`` expects.
  """

  name: str
  modalities: dict[str, tuple[int, int]]
  splits: tuple[str, ...]
  label: LabelSpec
  tile_m: float
  patch_sizes_m: tuple[int, ...]
  read: Callable[[str, str], Iterator[tuple[str, Example]]]
  description: str = ""


class DataError(ValueError):
  """A bad file or example; the message names the file and the example id."""

  def __init__(self, message: str, *, path: str | None = None, example_id: str | None = None):
    parts = [message]
    if example_id is not None:
      parts.append(f"example {example_id!r}")
    if path is not None:
      parts.append(f"file {path}")
    super().__init__("; ".join(parts))
    self.path = path
    self.example_id = example_id


def check_example(spec: DatasetSpec, key: str, ex: Example, path: str | None = None) -> None:
  """Validates an example against the contract; raises ``DataError`` naming the problem."""
  for m in spec.modalities:
    if m not in ex:
      raise DataError(f"modality {m!r} missing", path=path, example_id=key)
    x = ex[m]
    info = mods.get(m)
    want_rank = 4 if info.temporal else 3
    if x.ndim != want_rank or x.shape[-3] != info.channels:
      raise DataError(f"{m}: shape {x.shape}, expected rank {want_rank} with {info.channels} "
                      "channels", path=path, example_id=key)
    if not np.all(np.isfinite(x)):
      raise DataError(f"{m}: contains NaN or inf", path=path, example_id=key)
    if info.temporal:
      d = ex.get(m + mods.DATES_SUFFIX)
      if d is None or d.shape != (x.shape[0],):
        raise DataError(f"{m}: dates missing or of the wrong shape", path=path, example_id=key)
