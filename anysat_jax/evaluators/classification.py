"""Evaluation of a fine-tuning task on one split: tile classification (multilabel or
multiclass), the base of the dense evaluators.

An evaluator is declared in the config (``config.evals[name]``: ``type``, ``split``,
``every_steps``, ``num_figures``) and built by ``evaluators.registry``. ``evaluate(params)``
makes one pass over the split with a fresh metric state (compiled once per batch signature)
and returns an ``Evaluation``; ``write_figures`` draws its PNGs. The task is duck-typed:
``eval_step``, ``metric``, ``label``, ``model``, ``patch_size`` (``tasks.finetune``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from anysat_jax import sharding
from anysat_jax.evaluators import figures, metrics
from anysat_jax.models import xla_options
from anysat_jax.models.config import EncoderConfig
from anysat_jax.models.validation import validate_inputs
from input_pipeline import loader


@dataclasses.dataclass
class Evaluation:
  """results: {name: float or per-class array} incl. ``loss``; counts: the metric state;
  tiles: up to ``num_figures`` host examples (inputs, ``label``, ``pred``, ``name``)."""

  results: dict[str, Any]
  counts: metrics.Counts
  tiles: list[dict[str, np.ndarray]]


def split_data_config(config: ml_collections.ConfigDict, split: str,
                      batch_size: int | None = None) -> ml_collections.ConfigDict:
  """``config.data`` reading ``split`` of the run's dataset (at ``batch_size`` if set)."""
  data = config.data.copy_and_resolve_references()
  d = data.datasets[config.dataset]
  d.split = split
  d.batch_size = batch_size or d.batch_size
  return data


def scalars(prefix: str, results: Mapping[str, Any]) -> dict[str, float]:
  """The scalar results as ``{prefix/name: float}``."""
  return {f"{prefix}/{k}": float(v) for k, v in results.items() if np.ndim(v) == 0}


class ClassificationEvaluator:
  """Metric and loss over a split, and its confusion matrix (multiclass) as a figure."""

  collects_tiles = False

  def __init__(self, name: str, spec: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, task: Any, batch_sharding: Any,
               enc_cfg: EncoderConfig):
    self.name, self.split = name, spec.split
    self.every_steps = spec.get("every_steps")
    self.num_figures = int(spec.get("num_figures", 0)) if self.collects_tiles else 0
    self._config, self._task, self._sharding, self._enc_cfg = config, task, batch_sharding, enc_cfg
    self._step = jax.jit(task.eval_step,
                         compiler_options=xla_options.forward(enc_cfg.dtype))
    self._validated: set = set()

  def due(self, step: int, total: int, per_epoch: int) -> bool:
    """Periodic evaluation after ``step``: every ``every_steps`` (None: once per epoch; 0:
    never, only the final evaluation) and at the last step."""
    every = per_epoch if self.every_steps is None else int(self.every_steps)
    return every > 0 and (step % every == 0 or step == total)

  def evaluate(self, params: Any) -> Evaluation:
    config, task = self._config, self._task
    data = split_data_config(config, self.split, config.eval.batch_size)
    counts, loss_sum, count, tiles = task.metric.init(), 0.0, 0.0, []
    for batch in loader.dataset_pipeline(
        data, config.dataset, training=False, shard_index=jax.process_index(),
        shard_count=jax.process_count()):
      signature = tuple((k, v.shape) for k, v in batch.items())
      if signature not in self._validated:
        validate_inputs(loader.model_inputs(batch), task.patch_size, self._enc_cfg,
                        task.model.output, task.model.dense_modality)
        self._validated.add(signature)
      device_batch = sharding.global_batch({k: v for k, v in batch.items() if k != "name"},
                                           self._sharding)
      counts, loss, pred = self._step(counts, params, device_batch)
      n = float(batch["example_mask"].sum())
      loss_sum, count = loss_sum + float(loss) * n, count + n
      if len(tiles) < self.num_figures:
        pred = np.asarray(multihost_utils.process_allgather(pred, tiled=True))
        for i in np.flatnonzero(batch["example_mask"])[:self.num_figures - len(tiles)]:
          tiles.append({**{k: v[i] for k, v in batch.items()}, "pred": pred[i]})
    results = task.metric.compute(counts)
    results["loss"] = loss_sum / max(count, 1.0)
    return Evaluation(results, counts, tiles)

  def class_names(self) -> tuple[str, ...]:
    label = self._task.label
    return label.class_names or tuple(str(i) for i in range(label.num_classes))

  def write_figures(self, directory: str, evaluation: Evaluation) -> list[str]:
    """The confusion matrix (not for multilabel tasks); returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    label = self._task.label
    if label.kind == "multilabel":
      return []
    k = label.num_classes
    path = os.path.join(directory, f"{self.name}_confusion.png")
    figures.save_confusion_matrix(path, metrics.value(evaluation.counts).reshape(k, k),
                                  self.class_names())
    return [path]
