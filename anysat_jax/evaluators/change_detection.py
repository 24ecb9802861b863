"""Change detection (e.g. BraDD deforestation): dense binary change labels scored like
segmentation (``metrics.change_iou``); the panels show the last real date of the input time
series, the state after the change."""

from __future__ import annotations

from anysat_jax.evaluators.segmentation import SegmentationEvaluator


class ChangeDetectionEvaluator(SegmentationEvaluator):
  date_index = -1      # the last real date (``segmentation._last_date``)
