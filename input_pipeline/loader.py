"""Grain pipelines of one dataset: static-shape batches of normalised, bucketed examples.

Per dataset (``dataset_pipeline``)::

  grain.MapDataset.source(split)[shard_index::shard_count]
    → EpochShuffle (seeded, reshuffled every epoch) → repeat        (training only)
    → map: decode → validate → normalise → temporal dropout → crop → bucket   (per example)
    → to_iter_dataset (reader threads) → batch of the per-process batch size
    → thread prefetch of whole batches

Every batch of a dataset has one fixed set of keys, shapes and dtypes:

- ``<mod>`` float32: images (B, C, H, W), time series (B, T_b, C, H, W) (normalised);
- ``<mod>_dates`` int32 (B, T_b): day of year 1..366 as the readers give it, 0 on padding;
- ``<mod>_mask`` float32 (B, T_b): 1 = real date, 0 = padding;
- ``<mod>_valid`` uint8, shape of ``<mod>`` (datasets whose reader yields it): 0 = missing value;
- ``label`` (if the dataset has one): multilabel float32 (B, K), multiclass int32 (B,),
  segmentation int32 (B, H, W) (cropped with its modality when they share H and W);
- ``name`` object (B,) of str, the example ids (host only: drop it before ``device_put``);
- evaluation only: ``example_mask`` float32 (B,), 0 for the rows that pad the last batches.

``model_inputs(batch)`` keeps what the encoder takes. Bad data (NaN/inf, a shape that differs
from the dataset's, a missing modality, dates outside 0..366) raises a ``DataError`` naming the
dataset, the example id and the problem; with ``skip_bad`` such examples are skipped and
counted (``skipped(iterator)``, also in the iterator state). The reference shapes are those of
the split's first example (the same on every process).

Training batches are infinite (shuffle per epoch, ``repeat``; only full batches). Evaluation is
one pass in order, no random transform, the last batch padded with copies of the split's first
example (``example_mask`` 0), and the same number of batches on every process.

Processes: each JAX process reads the disjoint shard ``shard_index::shard_count`` (default
``jax.process_index()`` / ``jax.process_count()``) and gets ``batch_size / shard_count``
examples per batch.

Configuration (an ``ml_collections.ConfigDict``; ``default_dataset_config`` gives the official
per-dataset values)::

  config.data_dir          where the prepared datasets are (``prepare`` / ``ensure_prepared``)
  config.seed              int; shuffles, random transforms and the mixture derive from it
  config.skip_bad          bool (default False): skip and count bad examples instead of raising
  config.read_threads      int (default 4): reader threads per dataset
  config.prefetch_batches  int (default 2): batches prepared ahead per dataset
  config.datasets.<name>   one entry per registry dataset (``datasets.registry``):
    modalities        tuple of modality names read and batched
    split             "train", "val" or "test"
    batch_size        global batch size (divisible by the process count)
    patch_sizes       tuple of patch sizes in metres (mixture: one drawn per step, uniformly)
    weight            sampling weight in the mixture
    buckets           {time-series modality: T_b}, every time-series modality needs one
    crop              {modality: side in pixels} (random at training, centred at evaluation);
                      an image smaller than its crop is left whole, with a warning
    temporal_dropout  fraction p of dates dropped at training (keep floor(T (1 - p))); a float
                      for every series or {modality: p}
    max_dates         count-style dropout at training: keep this many dates if T is larger
                      (PASTIS: 20); None for none
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from anysat_jax.core import modalities as mods
from input_pipeline import builders, normalization, transforms
from input_pipeline.dataset_spec import DataError, Example
from input_pipeline.datasets import registry

NON_INPUT_KEYS = ("label", "name", "example_mask")
MAX_DAY = 366

# GeoPlex (spec A.3, C.12): per-device batch sizes of the original, used as global batch sizes.
GEOPLEX = ("treesatai_ts", "pastis_hd", "flair", "planted", "s2naip_urban")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "treesatai_ts": dict(modalities=("aerial", "s2", "s1-asc"), batch_size=128,
                         patch_sizes=(10, 20), weight=1.0, buckets={"s2": 160, "s1-asc": 64},
                         crop={"aerial": 300}),
    "pastis_hd": dict(modalities=("spot", "s2", "s1"), batch_size=1, patch_sizes=(40, 80, 160),
                      weight=1.0, buckets={"s2": 20, "s1": 20}, max_dates=20),
    "flair": dict(modalities=("aerial-flair", "s2"), batch_size=32, patch_sizes=(10, 20),
                  weight=1.0, buckets={"s2": 120}, crop={"aerial-flair": 500}),
    "planted": dict(modalities=("s2", "s1", "l7", "alos", "modis"), batch_size=256,
                    patch_sizes=(30,), weight=2.0,
                    buckets={"s2": 8, "s1": 8, "l7": 20, "alos": 4, "modis": 60}),
    "s2naip_urban": dict(modalities=("naip", "l8", "s2", "s1"), batch_size=2,
                         patch_sizes=(40, 80, 160), weight=4.0,
                         buckets={"l8": 4, "s2": 32, "s1": 8}),
    # Downstream datasets: fine-tuning batch sizes, patch sizes and dropouts (spec B.7, C.1).
    "pastis_hd_cls": dict(modalities=("spot", "s2", "s1"), batch_size=4, patch_sizes=(40,),
                          buckets={"s2": 20, "s1": 20}, max_dates=20),
    "sen1floods11": dict(modalities=("s2", "s1"), batch_size=4, patch_sizes=(80,),
                         buckets={"s2": 1, "s1": 1}),
    "bradd_s1ts": dict(modalities=("s1",), batch_size=8, patch_sizes=(40,), buckets={"s1": 66},
                       temporal_dropout=0.5),
    "sickle": dict(modalities=("s2", "s1", "l8"), batch_size=12, patch_sizes=(10,),
                   buckets={"s2": 64, "s1": 64, "l8": 32}, temporal_dropout=0.2),
    "timesen2crop": dict(modalities=("s2",), batch_size=2048, patch_sizes=(10,),
                         buckets={"s2": 40}, temporal_dropout=0.3),
}


def default_dataset_config(name: str) -> ml_collections.ConfigDict:
  """The official settings of dataset ``name`` (fields: see the module docstring).

  GeoPlex datasets (``GEOPLEX``): modalities, batch sizes, patch sizes and weights of the
  original pretraining (its per-device batch sizes, here global), no temporal dropout except
  PASTIS's 20 dates, crops of TreeSatAI ``aerial`` (300 px) and FLAIR ``aerial-flair`` (500 px).
  Others: their fine-tuning settings (spec B.7, C.1). Bucket lengths: the longest series the
  spec reports (C.3-C.12; FLAIR s2 114 rounded up to 120; PASTIS 20 = its count-style dropout,
  so longer evaluation series are sub-sampled to 20), and our choices where it gives none:
  TreeSatAI s2 160 / s1-asc 64 (the demo tile has 146 / 60 dates), SICKLE 64 / 64 / 32,
  TimeSen2Crop 40 (paper: 29).
  """
  if name not in _DEFAULTS:
    raise ValueError(f"no default configuration for {name!r}; known: {', '.join(_DEFAULTS)}")
  d = dict(split="train", weight=1.0, crop={}, temporal_dropout=0.0, max_dates=None)
  d.update(_DEFAULTS[name])
  return ml_collections.ConfigDict(d)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The encoder's inputs of a batch: modalities with their dates, masks and valid masks."""
  return {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}


def _seeds(seed: int, name: str, n: int) -> list[int]:
  """``n`` 32-bit seeds derived from the config seed and the dataset name."""
  state = np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(n)
  return [int(s) for s in state]


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


def _collate(examples: Sequence[Example], pad: Example | None, batch_size: int) -> Example:
  """Stacks examples; with ``pad``, fills up to ``batch_size`` with it and adds example_mask."""
  n = len(examples)
  rows = list(examples) + [pad] * (batch_size - n) if pad is not None else list(examples)
  batch = {k: (np.array([r[k] for r in rows], dtype=object) if k == "name"
               else np.stack([r[k] for r in rows])) for k in rows[0]}
  if pad is not None:
    batch["example_mask"] = (np.arange(batch_size) < n).astype(np.float32)
  return batch


class EpochShuffle(grain.MapDataset):
  """A fresh permutation of the parent per epoch (index // len), seeded by (seed, epoch).

  Replaces ``MapDataset.shuffle``, whose ``index_shuffle`` costs about 20 ms / len per element
  (measured: 2 ms for 2 examples, 0.17 ms for 100, a few µs from ~10k), which starves the
  pipeline on the small samples. Here each epoch's permutation is drawn once (O(len)) and kept
  until another epoch is asked for.
  """

  def __init__(self, parent: grain.MapDataset, *, seed: int):
    super().__init__(parent)
    self._seed = seed
    self._epoch_perm: tuple[int, np.ndarray | None] = (-1, None)  # Swapped atomically.

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index: int | slice) -> Any:
    if isinstance(index, slice):
      return self.slice(index)
    n = len(self._parent)
    epoch, i = divmod(index, n)
    cached, perm = self._epoch_perm
    if cached != epoch:
      perm = np.random.default_rng([self._seed, epoch]).permutation(n)
      self._epoch_perm = (epoch, perm)
    return self._parent[int(perm[i]) + epoch * n]

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"


class BatchIterator(grain.DatasetIterator):
  """Batches processed examples; raises or (``skip_bad``) skips and counts bad ones.

  State: ``{"parent": ..., "skipped": int, "batches": int}``.
  """

  def __init__(self, parent: grain.DatasetIterator, *, dataset: str, batch_size: int,
               skip_bad: bool, shard_length: int, pad: Example | None,
               num_batches: int | None):
    super().__init__(parent)
    self._dataset = dataset
    self._batch_size = batch_size
    self._skip_bad = skip_bad
    self._shard_length = shard_length
    self._pad = pad
    self._num_batches = num_batches
    self._skipped = 0
    self._batches = 0

  def __next__(self) -> Example:
    if self._num_batches is not None and self._batches >= self._num_batches:
      raise StopIteration
    examples: list[Example] = []
    bad_in_a_row = 0
    while len(examples) < self._batch_size:
      try:
        ex = next(self._parent)
      except StopIteration:
        if self._pad is None:
          raise
        break
      if isinstance(ex, DataError):
        if not self._skip_bad:
          raise ex
        self._skipped += 1
        bad_in_a_row += 1
        logging.getLogger(__name__).warning("skipping a bad example: %s", ex)
        if bad_in_a_row > self._shard_length:
          raise DataError(f"{self._dataset}: every example of this process's shard is bad "
                          f"({self._skipped} skipped)")
        continue
      bad_in_a_row = 0
      examples.append(ex)
    self._batches += 1
    return _collate(examples, self._pad, self._batch_size)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skipped": self._skipped,
            "batches": self._batches}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._skipped = int(state["skipped"])
    self._batches = int(state["batches"])


class Batched(grain.IterDataset):
  """``BatchIterator`` over a dataset of processed examples (see ``BatchIterator``)."""

  def __init__(self, parent: grain.IterDataset, **kwargs: Any):
    super().__init__(parent)
    self._kwargs = kwargs

  def __iter__(self) -> BatchIterator:
    return BatchIterator(self._parent.__iter__(), **self._kwargs)


def skipped(iterator: grain.DatasetIterator) -> int:
  """How many bad examples a dataset iterator (or a state of one) has skipped so far."""
  state = iterator if isinstance(iterator, Mapping) else iterator.get_state()
  return int(state["skipped"])


def prepared_name(name: str, modalities: Sequence[str], data_dir: str) -> str:
  """The prepared dataset holding ``modalities`` of ``name``: the one built with exactly
  these modalities if present, else the full build."""
  spec = registry.get_spec(name)
  candidates = [spec.name]
  if tuple(modalities) != tuple(spec.modalities):
    candidates.insert(0, registry.get_spec(name, modalities).name)
  for c in candidates:
    if os.path.exists(os.path.join(data_dir, c, builders.VERSION, "dataset_info.json")):
      return c
  raise FileNotFoundError(f"{name}: not prepared in {data_dir} (looked for "
                          f"{', '.join(candidates)}); run python -m input_pipeline.prepare or "
                          "input_pipeline.prepare.ensure_prepared")


def _processor(name: str, dcfg: ml_collections.ConfigDict, first: Mapping[str, Any],
               stats_path: str) -> ExampleProcessor:
  """The example processor of a dataset, with reference shapes from its first example."""
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
  return ExampleProcessor(
      dataset=name, modalities=modalities, shapes=shapes, label_shape=label_shape,
      stats={m: normalization.load_stats(name, m, stats_path) for m in modalities},
      buckets=buckets, crop=crop,
      dropout=_per_modality(dcfg.get("temporal_dropout", 0.0), list(buckets)),
      max_dates=dcfg.get("max_dates"))


def dataset_pipeline(config: ml_collections.ConfigDict, name: str, *, training: bool = True,
                     shard_index: int | None = None,
                     shard_count: int | None = None) -> grain.IterDataset:
  """The batched pipeline of ``config.datasets[name]`` for this process (see the module doc).

  Iterating gives ``BatchIterator`` batches (behind a thread prefetch); training iterators are
  infinite, evaluation ones yield ``ceil(ceil(N / shard_count) / per-process batch)`` batches.
  """
  if shard_index is None or shard_count is None:
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard index {shard_index} not in [0, {shard_count})")
  dcfg = config.datasets[name]
  if dcfg.batch_size % shard_count:
    raise ValueError(f"{name}: batch size {dcfg.batch_size} is not divisible by the "
                     f"{shard_count} processes")
  per_process = dcfg.batch_size // shard_count
  built = prepared_name(name, dcfg.modalities, config.data_dir)
  splits = builders.data_sources(built, config.data_dir)
  if dcfg.split not in splits:
    raise ValueError(f"{name}: split {dcfg.split!r} is empty or missing (have {sorted(splits)})")
  source = splits[dcfg.split]
  process = _processor(name, dcfg, source[0],
                       normalization.stats_file(config.data_dir, built))
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"{name}: shard {shard_index} of {shard_count} is empty "
                     f"({len(source)} examples in split {dcfg.split!r})")
  if training:
    shuffle_seed, map_seed = _seeds(config.seed, name, 2)
    ds = EpochShuffle(ds, seed=shuffle_seed).repeat().random_map(process, seed=map_seed)
    pad, num_batches = None, None
  else:
    ds = ds.map(functools.partial(process, rng=None))
    pad = process(source[0])
    if isinstance(pad, DataError):
      raise pad
    num_batches = math.ceil(math.ceil(len(source) / shard_count) / per_process)
  threads = config.get("read_threads", 4)
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(per_process, threads))
  batched = Batched(ds.to_iter_dataset(read), dataset=name, batch_size=per_process,
                    skip_bad=bool(config.get("skip_bad", False)), shard_length=len(ds),
                    pad=pad, num_batches=num_batches)
  return grain.experimental.ThreadPrefetchIterDataset(
      batched, prefetch_buffer_size=config.get("prefetch_batches", 2))
