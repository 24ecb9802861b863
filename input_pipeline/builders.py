"""TFDS ArrayRecord datasets made from a ``DatasetSpec``; built and read without TensorFlow.

Stored features (raw ``tfds.features.Tensor``, no image codec; arrays zlib-compressed):

- time series ``<mod>``: float32 (None, C, None, None) and ``<mod>_dates`` int32 (None,);
- single-date ``<mod>``: float32 (C, None, None);
- ``<mod>_valid`` (only if the reader yields it): uint8 of the shape of ``<mod>``;
- ``label``: multilabel float32 (K,), multiclass int32 (), segmentation int32 (None, None);
- ``name``: text (read back as ``bytes``).

H and W are left dynamic: the shipped samples are smaller than the real tiles (PASTIS 32 x 32,
fake FLAIR 32 x 32); ``check_example`` checks ranks and channels. The on-disk order is TFDS's
hash-of-key shuffle, the same on every build.

Build, then read random-access numpy dicts::

  report = builders.build(registry.get_spec("pastis_hd", ["s2", "s1"]), manual_dir, data_dir)
  sources = builders.data_sources(report.name, data_dir)  # {"train": ..., "val": ...}
  example = sources["train"][0]
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from anysat_jax.core import modalities as mods
from input_pipeline.dataset_spec import DataError, DatasetSpec, Example, check_example
from input_pipeline.datasets import registry
from input_pipeline.naming import VERSION, prepared_dir

_TFDS_VERSION = tfds.core.Version(VERSION)
_ZLIB = tfds.features.Encoding.ZLIB
_LABEL_FEATURES = {
    "multilabel": lambda k: tfds.features.Tensor(shape=(k,), dtype=np.float32),
    "multiclass": lambda k: tfds.features.Tensor(shape=(), dtype=np.int32),
    "segmentation": lambda k: tfds.features.Tensor(shape=(None, None), dtype=np.int32,
                                                   encoding=_ZLIB),
}


def features(spec: DatasetSpec, valid: tuple[str, ...] = ()) -> tfds.features.FeaturesDict:
  """The TFDS features of ``spec``; ``valid``: modalities that come with ``<mod>_valid``."""
  feats: dict[str, tfds.features.FeatureConnector] = {"name": tfds.features.Text()}
  for m in spec.modalities:
    info = mods.get(m)
    shape = ((None,) if info.temporal else ()) + (info.channels, None, None)
    feats[m] = tfds.features.Tensor(shape=shape, dtype=np.float32, encoding=_ZLIB)
    if info.temporal:
      feats[m + mods.DATES_SUFFIX] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    if m in valid:
      feats[m + mods.VALID_SUFFIX] = tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                                          encoding=_ZLIB)
  if spec.label.kind != "none":
    feats["label"] = _LABEL_FEATURES[spec.label.kind](spec.label.num_classes)
  return tfds.features.FeaturesDict(feats)


def _dtype_errors(feats: tfds.features.FeaturesDict, ex: Example) -> list[str]:
  """Keys, dtypes and ranks of ``ex`` that do not match ``feats``."""
  if set(ex) != set(feats.keys()):
    return [f"keys {sorted(ex)} != features {sorted(feats.keys())}"]
  errors = []
  for k, f in feats.items():
    if isinstance(f, tfds.features.Text):
      if not isinstance(ex[k], str):
        errors.append(f"{k}: {type(ex[k]).__name__}, expected str")
      continue
    x = np.asarray(ex[k])
    if x.dtype != f.np_dtype or x.ndim != len(f.shape) or any(
        want is not None and got != want for got, want in zip(x.shape, f.shape, strict=True)):
      errors.append(f"{k}: {x.dtype}{x.shape}, expected {np.dtype(f.np_dtype)}{f.shape}")
  return errors


class _LocalInfo(tfds.core.DatasetInfo):
  """``DatasetInfo`` without TFDS's look-up of precomputed metadata in its GCS bucket, which a
  new builder makes: these datasets are not published there, and the look-up leaves an empty
  ``tmp*tfds`` directory in the system temp folder on every build."""

  def initialize_from_bucket(self) -> None:
    pass


def _builder_class(spec: DatasetSpec, feats: tfds.features.FeaturesDict) -> type:
  """An unregistered ``GeneratorBasedBuilder`` writing the given example streams."""

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = spec.name
    VERSION = _TFDS_VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = spec.description

    def __init__(self, *, streams: dict[str, Iterator[tuple[str, Example]]], **kwargs):
      self._streams = streams
      super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
      return _LocalInfo(builder=self, description=spec.description, features=feats)

    def _split_generators(self, dl_manager):
      del dl_manager  # The streams already read ``manual_dir``.
      return {split: self._generate_examples(stream) for split, stream in self._streams.items()}

    def _generate_examples(self, stream):
      yield from stream

  return Builder


def _with_progress(stream: Iterator[tuple[str, Example]],
                   desc: str) -> Iterator[tuple[str, Example]]:
  """``stream`` with a tqdm bar that appears when the writer starts consuming it."""
  with tqdm.tqdm(desc=desc, unit=" examples") as bar:
    for item in stream:
      yield item
      bar.update()


@dataclasses.dataclass
class BuildReport:
  """What ``build`` wrote: per-split example counts (0: split empty, not written), skips."""

  name: str
  path: str
  counts: dict[str, int]
  skipped: list[DataError]


def build(spec: DatasetSpec, manual_dir: str, data_dir: str, *, skip_bad: bool = False,
          overwrite: bool = False, progress: bool = False) -> BuildReport:
  """Reads every split of ``spec`` from ``manual_dir`` into ``data_dir/<name>/<VERSION>``.

  Every example is checked (``check_example``, keys, dtypes, shapes). A ``DataError`` stops
  the build, or with ``skip_bad`` the example is skipped and listed in the report (the reader
  must take ``on_error``). Empty splits are not written.
  """
  path = prepared_dir(data_dir, spec.name)
  if os.path.exists(path):
    if not overwrite:
      raise FileExistsError(f"{path} exists; delete it or pass overwrite=True")
    shutil.rmtree(path)
  if skip_bad and not registry.reader_accepts(spec, "on_error"):
    raise ValueError(f"{spec.name}: its reader cannot skip bad examples (no on_error argument)")
  skipped: list[DataError] = []

  def on_error(e: DataError) -> None:
    logging.getLogger(__name__).warning("skipping a bad example: %s", e)
    skipped.append(e)

  def checked(split: str) -> Iterator[tuple[str, Example]]:
    kwargs = {"on_error": on_error} if skip_bad else {}
    for key, ex in spec.read(manual_dir, split, **kwargs):
      try:
        check_example(spec, key, ex)
        errors = _dtype_errors(feats, ex) if feats is not None else []
        if errors:
          raise DataError("; ".join(errors), example_id=key)
      except DataError as e:
        if not skip_bad:
          raise
        on_error(e)
        continue
      yield key, ex

  # Peek at each split: empty ones are left out (TFDS cannot write them), and the first example
  # tells whether the reader yields ``<mod>_valid`` masks.
  feats = None
  streams = {}
  for split in spec.splits:
    stream = checked(split)
    first = next(stream, None)
    if first is None:
      continue
    if feats is None:
      valid = tuple(m for m in spec.modalities if m + mods.VALID_SUFFIX in first[1])
      feats = features(spec, valid)
      errors = _dtype_errors(feats, first[1])
      if errors:
        raise DataError("; ".join(errors), example_id=first[0])
    stream = itertools.chain([first], stream)
    if progress:
      stream = _with_progress(stream, f"{spec.name}/{split}")
    streams[split] = stream
  if not streams:
    raise DataError(f"{spec.name}: no examples in any split of {spec.splits}", path=manual_dir)
  builder = _builder_class(spec, feats)(streams=streams, data_dir=data_dir,
                                        file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  counts = {s: builder.info.splits[s].num_examples if s in streams else 0 for s in spec.splits}
  return BuildReport(spec.name, path, counts, skipped)


def data_sources(name: str, data_dir: str) -> dict[str, Sequence[Example]]:
  """Random-access sources of a built dataset, by split; items are dicts of numpy arrays."""
  return tfds.builder_from_directory(prepared_dir(data_dir, name)).as_data_source()
