"""Dataset name → reader ``DatasetSpec``; reader modules are imported only when asked for.

Readers may accept two optional keyword arguments besides ``read(manual_dir, split)``:

- ``modalities``: the subset of ``spec.modalities`` to read (see ``with_modalities``);
- ``on_error``: a callable that receives each per-example ``DataError`` instead of the reader
  raising it; the reader then skips that example (used by ``prepare --skip_bad``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import types
from collections.abc import Sequence

from input_pipeline.dataset_spec import DatasetSpec

# name -> "module:attribute" of its DatasetSpec.
DATASETS: types.MappingProxyType[str, str] = types.MappingProxyType({
    "treesatai_ts": "input_pipeline.datasets.treesatai_ts:SPEC",
    "pastis_hd": "input_pipeline.datasets.pastis_hd:SPEC",
    "pastis_hd_cls": "input_pipeline.datasets.pastis_hd:SPEC_CLS",
    "flair": "input_pipeline.datasets.flair:SPEC",
    "sen1floods11": "input_pipeline.datasets.sen1floods11:SPEC",
    "planted": "input_pipeline.datasets.planted:SPEC",
    "s2naip_urban": "input_pipeline.datasets.s2naip_urban:SPEC",
    "bradd_s1ts": "input_pipeline.datasets.bradd_s1ts:SPEC",
    "sickle": "input_pipeline.datasets.sickle:SPEC",
    "timesen2crop": "input_pipeline.datasets.timesen2crop:SPEC",
})


def names() -> tuple[str, ...]:
  """All registered dataset names (their modules may not all be importable)."""
  return tuple(DATASETS)


def get_spec(name: str, modalities: Sequence[str] | None = None) -> DatasetSpec:
  """The ``DatasetSpec`` registered as ``name``, restricted to ``modalities`` if given."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
  module_name, attr = DATASETS[name].split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    raise ValueError(f"dataset {name!r}: reader module {module_name} does not exist") from e
  spec = getattr(module, attr)
  return spec if modalities is None else with_modalities(spec, modalities)


def reader_accepts(spec: DatasetSpec, keyword: str) -> bool:
  """Whether ``spec.read`` takes the optional keyword argument ``keyword``."""
  return keyword in inspect.signature(spec.read).parameters


def with_modalities(spec: DatasetSpec, modalities: Sequence[str]) -> DatasetSpec:
  """The same dataset reading only ``modalities``, named ``<name>_<mod>_<mod>...``.

  E.g. ``flair`` with ``("aerial-flair",)`` → ``flair_aerial_flair``. Needs a reader that takes
  ``modalities``. The full set, in spec order, returns ``spec`` itself.
  """
  modalities = tuple(modalities)
  if modalities == tuple(spec.modalities):
    return spec
  unknown = [m for m in modalities if m not in spec.modalities]
  if unknown or not modalities or len(set(modalities)) != len(modalities):
    raise ValueError(f"{spec.name}: modalities {modalities} must be distinct and among "
                     f"{tuple(spec.modalities)}")
  if not reader_accepts(spec, "modalities"):
    raise ValueError(f"{spec.name}: its reader cannot read a subset of modalities")
  suffix = "_".join(m.replace("-", "_") for m in modalities)
  return dataclasses.replace(
      spec, name=f"{spec.name}_{suffix}",
      modalities={m: spec.modalities[m] for m in modalities},
      read=functools.partial(spec.read, modalities=modalities))
