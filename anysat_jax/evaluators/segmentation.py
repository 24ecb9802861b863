"""Semantic segmentation: the classification evaluator's metric and confusion matrix, plus
input / prediction / truth panels of the first ``num_figures`` tiles of the split."""

from __future__ import annotations

import os

import numpy as np

from anysat_jax.core import modalities as mods
from anysat_jax.evaluators import figures
from anysat_jax.evaluators.classification import ClassificationEvaluator, Evaluation


def rgb_bands(modality: str) -> tuple[int, int, int]:
  """Red, green, blue channel indices of a modality (false colour from its first channels)."""
  bands = mods.get(modality).bands
  for trio in (("B4", "B3", "B2"), ("R", "G", "B")):
    if all(b in bands for b in trio):
      return tuple(bands.index(b) for b in trio)
  return tuple(i % len(bands) for i in range(3))


class SegmentationEvaluator(ClassificationEvaluator):
  """Dense labels; panels show the head's modality (the first date of a time series)."""

  collects_tiles = True
  date_index = 0

  def write_figures(self, directory: str, evaluation: Evaluation) -> list[str]:
    written = super().write_figures(directory, evaluation)
    m = self._task.model.dense_modality
    label = self._task.label
    for i, tile in enumerate(evaluation.tiles):
      x = np.asarray(tile[m])
      if mods.get(m).temporal:
        x = x[self.date_index if self.date_index >= 0 else _last_date(tile, m)]
      path = os.path.join(directory, f"{self.name}_tile{i}_{tile['name']}.png")
      figures.save_segmentation_panel(path, figures.rgb_from_bands(x, rgb_bands(m)),
                                      tile["pred"], tile["label"], self.class_names(),
                                      figures.COLORMAPS[self._config.dataset],
                                      label.ignore_index)
      written.append(path)
    return written


def _last_date(tile: dict[str, np.ndarray], modality: str) -> int:
  """Index of the last real date of a time series (``<mod>_mask``, else the last one)."""
  mask = tile.get(modality + mods.MASK_SUFFIX)
  if mask is None:
    return len(tile[modality]) - 1
  return int(np.flatnonzero(np.asarray(mask))[-1])
