"""Evaluators by the ``type`` names of ``config.evals`` (``core.options.EVALUATORS``).

  config.evals = {"val": dict(type="segmentation", split="val", every_steps=None,
                              num_figures=4), ...}
  config.eval.monitor = "val"     # the evaluation that selects the best step / early-stops
"""

from __future__ import annotations

import types
from typing import Any

import ml_collections

from anysat_jax.core import options
from anysat_jax.evaluators.change_detection import ChangeDetectionEvaluator
from anysat_jax.evaluators.classification import ClassificationEvaluator
from anysat_jax.evaluators.segmentation import SegmentationEvaluator
from anysat_jax.models.config import EncoderConfig

EVALUATORS: types.MappingProxyType[str, type[ClassificationEvaluator]] = types.MappingProxyType({
    "classification": ClassificationEvaluator,
    "segmentation": SegmentationEvaluator,
    "change_detection": ChangeDetectionEvaluator,
})


def build(config: ml_collections.ConfigDict, task: Any, batch_sharding: Any,
          enc_cfg: EncoderConfig) -> dict[str, ClassificationEvaluator]:
  """{name: evaluator} of ``config.evals`` (sorted by name); checks ``eval.monitor``."""
  if not config.evals:
    raise ValueError("config.evals declares no evaluation")
  if config.eval.monitor not in config.evals:
    raise ValueError(f"eval.monitor={config.eval.monitor!r} is not one of config.evals "
                     f"({', '.join(config.evals)})")
  out = {}
  for name, spec in config.evals.items():
    options.check(f"evals.{name}.type", spec.type, options.EVALUATORS)
    out[name] = EVALUATORS[spec.type](name, spec, config, task, batch_sharding, enc_cfg)
  return out
