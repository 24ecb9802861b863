"""Where prepared datasets live: ``<data_dir>/<name>/<VERSION>/`` (TFDS ArrayRecord files, their
``dataset_info.json`` and ``normalization.json``), and which build serves a modality subset."""

from __future__ import annotations

import os
from collections.abc import Sequence

from input_pipeline.datasets import registry

VERSION = "1.0.0"
INFO_FILE = "dataset_info.json"


def prepared_dir(data_dir: str, name: str) -> str:
  """The folder of the prepared dataset ``name`` (a registry name or a subset build's name)."""
  return os.path.join(data_dir, name, VERSION)


def is_prepared(data_dir: str, name: str) -> bool:
  """Whether ``name`` is fully built in ``data_dir`` (its info file is written last)."""
  return os.path.exists(os.path.join(prepared_dir(data_dir, name), INFO_FILE))


def prepared_name(name: str, modalities: Sequence[str], data_dir: str) -> str:
  """The prepared dataset holding ``modalities`` of ``name``: the one built with exactly
  these modalities if present, else the full build. Raises ``FileNotFoundError`` if neither."""
  spec = registry.get_spec(name)
  candidates = [spec.name]
  if tuple(modalities) != tuple(spec.modalities):
    candidates.insert(0, registry.get_spec(name, modalities).name)
  for c in candidates:
    if is_prepared(data_dir, c):
      return c
  raise FileNotFoundError(f"{name}: not prepared in {data_dir} (looked for "
                          f"{', '.join(candidates)}); run python -m input_pipeline.prepare or "
                          "input_pipeline.prepare.ensure_prepared")
