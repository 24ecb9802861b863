"""Per-example processing of the input pipeline: decode → validate → normalise → temporal
dropout → crop → bucket (``ExampleProcessor``), built from a dataset's config and its first
example (``build_processor``).

Processed example (one row of a batch, see ``loader``): ``<mod>`` float32 normalised, images
(C, H, W), series (T_b, C, H, W); ``<mod>_dates`` int32 (T_b,) day of year, 0 on padding;
``<mod>_mask`` float32 (T_b,) 1 = real date; ``<mod>_valid`` uint8 (if the reader yields it);
``label``; ``name`` str.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from anysat_jax.core import modalities as mods
from input_pipeline import normalization, transforms
from input_pipeline.dataset_spec import DataError, Example, LabelSpec, label_problem
from input_pipeline.datasets import registry

MAX_DAY = 366


def _per_modality(value: Any, modalities: Sequence[str]) -> dict[str, float]:
  """A float for every modality, or a {modality: float} mapping (missing ones: 0)."""
  if isinstance(value, Mapping | ml_collections.ConfigDict):
    return {m: float(value.get(m, 0.0)) for m in modalities}
  return {m: float(value or 0.0) for m in modalities}


@dataclasses.dataclass(frozen=True)
class ExampleProcessor:
  """decode → validate → normalise → temporal dropout → crop → bucket, for one example.

  Returns the processed example, or the ``DataError`` of a bad one (raised or counted by the
  batching iterator, so that ``skip_bad`` can skip it). ``rng`` None = evaluation.
  """

  dataset: str
  modalities: tuple[str, ...]
  shapes: Mapping[str, tuple[int, int, int]]   # (C, H, W) per modality.
  label_shape: tuple[int, ...] | None
  label: LabelSpec                             # Values are checked against it.
  stats: Mapping[str, normalization.Stats]
  buckets: Mapping[str, int]
  crop: Mapping[str, int]
  dropout: Mapping[str, float]
  max_dates: int | None

  def decode(self, raw: Mapping[str, Any]) -> Example:
    """The keys the pipeline uses; ``name`` as str."""
    name = raw["name"]
    ex: Example = {"name": name.decode() if isinstance(name, bytes) else str(name)}
    for m in self.modalities:
      for key in (m, m + mods.DATES_SUFFIX, m + mods.VALID_SUFFIX):
        if key in raw:
          ex[key] = np.asarray(raw[key])
    if "label" in raw:
      label = np.asarray(raw["label"])
      ex["label"] = label.astype(np.float32 if label.dtype.kind == "f" else np.int32)
    return ex

  def problem(self, ex: Example) -> str | None:
    """What is wrong with a decoded example, or None."""
    for m in self.modalities:
      if m not in ex:
        return f"modality {m!r} missing"
      x = ex[m]
      temporal = mods.get(m).temporal
      if x.ndim != 3 + temporal or x.shape[-3:] != self.shapes[m]:
        want = ("T",) * temporal + self.shapes[m]
        return f"{m}: shape {x.shape}, expected {want} (C, H, W as the dataset's first example)"
      if not np.isfinite(x).all():
        return f"{m}: contains NaN or inf"
      valid = ex.get(m + mods.VALID_SUFFIX)
      if valid is not None and valid.shape != x.shape:
        return f"{m}{mods.VALID_SUFFIX}: shape {valid.shape} differs from {m}'s {x.shape}"
      if temporal:
        dates = ex.get(m + mods.DATES_SUFFIX)
        if x.shape[0] == 0:
          return f"{m}: no dates (T = 0)"
        if dates is None or dates.shape != (x.shape[0],):
          return f"{m}: dates missing or not of shape ({x.shape[0]},)"
        if dates.min() < 0 or dates.max() > MAX_DAY:
          return f"{m}: dates {dates.min()}..{dates.max()} outside 0..{MAX_DAY}"
    if self.label_shape is not None:
      if "label" not in ex:
        return "label missing"
      if ex["label"].shape != self.label_shape:
        return f"label: shape {ex['label'].shape}, expected {self.label_shape}"
      return label_problem(self.label, ex["label"])
    return None

  def __call__(self, raw: Mapping[str, Any],
               rng: np.random.Generator | None = None) -> Example | DataError:
    ex = self.decode(raw)
    problem = self.problem(ex)
    if problem is not None:
      return DataError(f"{self.dataset}: {problem}", example_id=ex["name"])
    for m in self.modalities:
      ex[m] = transforms.normalize(ex[m], self.stats[m].mean, self.stats[m].std)
    if rng is not None:
      for m in self.buckets:
        ex = transforms.temporal_dropout(ex, m, rng, p=self.dropout[m], max_dates=self.max_dates)
    for m, side in self.crop.items():
      ex = transforms.crop(ex, m, side, rng)
    for m, length in self.buckets.items():
      ex = transforms.to_bucket(ex, m, length, rng)
    return ex


def build_processor(name: str, dcfg: ml_collections.ConfigDict, first: Mapping[str, Any],
               stats_path: str) -> ExampleProcessor:
  """The example processor of dataset ``name`` (config ``dcfg``, fields: see ``loader``), with
  reference shapes from ``first``, its split's first raw example; statistics from ``stats_path``
  (``normalization.load_stats``). Raises ``ValueError`` naming the dataset on a bad config, bad
  statistics (``normalization.Stats.from_json``) or statistics of another channel count."""
  modalities = tuple(dcfg.modalities)
  buckets = {m: int(t) for m, t in dict(dcfg.buckets).items()}
  for m in modalities:
    if mods.get(m).temporal and m not in buckets:
      raise ValueError(f"{name}: time series {m!r} has no bucket length (config buckets)")
  unknown = set(buckets) - {m for m in modalities if mods.get(m).temporal}
  if unknown:
    raise ValueError(f"{name}: buckets {sorted(unknown)} are not time series of {modalities}")
  missing = [m for m in modalities if m not in first]
  if missing:
    raise ValueError(f"{name}: the prepared data has no {missing}")
  shapes = {m: tuple(int(s) for s in np.shape(first[m])[-3:]) for m in modalities}
  crop = {}
  for m, side in dict(dcfg.get("crop") or {}).items():
    if m not in modalities:
      raise ValueError(f"{name}: crop of {m!r}, which is not among {modalities}")
    if side > min(shapes[m][1:]):
      logging.getLogger(__name__).warning(
          "%s: %s is %s px, smaller than its %d px crop; not cropped", name, m, shapes[m][1:],
          side)
      continue
    crop[m] = int(side)
  label_shape = tuple(np.shape(first["label"])) if "label" in first else None
  if label_shape is not None and len(label_shape) == 2:
    for m in crop:
      if label_shape != shapes[m][1:]:
        logging.getLogger(__name__).warning(
            "%s: label map %s differs from %s's %s, so it is not cropped with it", name,
            label_shape, m, shapes[m][1:])
  stats = {m: normalization.load_stats(name, m, stats_path) for m in modalities}
  for m, st in stats.items():
    if st.mean.shape != (shapes[m][0],):
      raise ValueError(f"{name}/{m}: normalisation statistics ({st.source}; {stats_path} or "
                       f"{normalization.PACKAGE_FILE}) have {st.mean.size} channels, the data "
                       f"{shapes[m][0]}")
  return ExampleProcessor(
      dataset=name, modalities=modalities, shapes=shapes, label_shape=label_shape,
      label=registry.get_spec(name).label, stats=stats,
      buckets=buckets, crop=crop,
      dropout=_per_modality(dcfg.get("temporal_dropout", 0.0), list(buckets)),
      max_dates=dcfg.get("max_dates"))
