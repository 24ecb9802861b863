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
REAL_KINDS = "biuf"  # numpy dtype kinds of real numbers: bool, int, uint, float.


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


def array_problem(what: str, x: np.ndarray) -> str | None:
  """Why ``x`` cannot be a pipeline array (not real numbers: complex, str, object), or None."""
  if np.asarray(x).dtype.kind not in REAL_KINDS:
    return f"{what}: dtype {np.asarray(x).dtype}, expected real numbers (bool, int or float)"
  return None


def label_problem(label: LabelSpec, y: Any) -> str | None:
  """Why ``y`` is not a valid label of ``label``, or None.

  multilabel: finite multi-hot, every entry 0 or 1 (a NaN class fraction must not become a
  silent 0); multiclass / segmentation: integer values in [0, num_classes) or the ignore index.
  """
  if label.kind == "none":
    return None
  y = np.asarray(y)
  problem = array_problem("label", y)
  if problem is not None:
    return problem
  finite = np.isfinite(y) if y.dtype.kind == "f" else np.ones(y.shape, bool)
  if not finite.all():
    return f"label: {int((~finite).sum())} NaN or inf values"
  if label.kind == "multilabel":
    bad = (y != 0) & (y != 1)
    if bad.any():
      return f"label: {int(bad.sum())} multi-hot entries not 0 or 1 (e.g. {y[bad][:3].tolist()})"
    return None
  if y.dtype.kind == "f" and (y != np.round(y)).any():
    return "label: non-integer class values"
  bad = (y < 0) | (y >= label.num_classes)
  if label.ignore_index is not None:
    bad &= y != label.ignore_index
  if bad.any():
    ignore = f" or the ignore index {label.ignore_index}" if label.ignore_index is not None else ""
    return (f"label: {int(bad.sum())} values outside [0, {label.num_classes}){ignore} (e.g. "
            f"{np.unique(y[bad])[:5].tolist()})")
  return None


def check_label(label: LabelSpec, y: Any, path: str | None, example_id: str | None) -> None:
  """Raises ``DataError`` naming ``path`` and ``example_id`` if ``label_problem`` finds one."""
  problem = label_problem(label, y)
  if problem is not None:
    raise DataError(problem, path=path, example_id=example_id)


def check_example(spec: DatasetSpec, key: str, ex: Example, path: str | None = None) -> None:
  """Validates an example against the contract; raises ``DataError`` naming the dataset, the
  problem (modality, dtype, shape, label values) and the example."""
  def fail(problem: str) -> None:
    raise DataError(f"{spec.name}: {problem}", path=path, example_id=key)

  for m in spec.modalities:
    if m not in ex:
      fail(f"modality {m!r} missing")
    x = ex[m]
    info = mods.get(m)
    for k in (m, m + mods.VALID_SUFFIX, m + mods.DATES_SUFFIX):
      if k in ex and (problem := array_problem(k, ex[k])) is not None:
        fail(problem)
    want_rank = 4 if info.temporal else 3
    if x.ndim != want_rank or x.shape[-3] != info.channels:
      fail(f"{m}: shape {x.shape}, expected rank {want_rank} with {info.channels} channels")
    if not np.all(np.isfinite(x)):
      fail(f"{m}: contains NaN or inf")
    if info.temporal:
      d = ex.get(m + mods.DATES_SUFFIX)
      if d is None or d.shape != (x.shape[0],):
        fail(f"{m}: dates missing or of the wrong shape")
  if spec.label.kind != "none":
    if "label" not in ex:
      fail("label missing")
    problem = label_problem(spec.label, ex["label"])
    if problem is not None:
      fail(problem)
