"""Evaluation metrics accumulated over a whole split as exact count state.

A ``Metric`` is a bundle of pure functions::

  metric = metric_for("pastis_hd")
  state = metric.init()                                 # fresh state = reset
  update = jax.jit(metric.update)
  for batch in eval_batches:
    state = update(state, logits, batch["label"], batch["example_mask"])
  results = metric.compute(state)                       # {"mIoU": ..., "acc": ..., ...}
  best = results[metric.monitor]                        # the experiment's monitored value

``update(state, logits, labels, mask)`` is jittable; ``compute`` runs on the host in float64
and returns scalars as Python floats and per-class results as NumPy arrays. Logits are
channels-last, (B, K) or (B, H, W, K); ``mask`` (B,) is 0 for padded rows, which never count.

Counts are kept as two uint32 words (exact up to 2^64), since a split's pixel count overflows
int32 (FLAIR test: ~4e9 labelled pixels) and float32 (2^24).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Counts(NamedTuple):
  """Exact counts: value = hi * 2^32 + lo, elementwise (uint32 arrays of one shape)."""

  lo: jax.Array
  hi: jax.Array


class Metric(NamedTuple):
  """Pure functions over a ``Counts`` state.

  name: the reference metric class it reproduces.
  num_classes: K.
  monitor: the key of ``compute``'s dict that the experiment selects checkpoints on (max).
  init: () -> fresh state.
  update: (state, logits, labels, mask=None) -> state; jittable.
  compute: state -> dict of results.
  """

  name: str
  num_classes: int
  monitor: str
  init: Callable[[], Counts]
  update: Callable[..., Counts]
  compute: Callable[[Counts], dict[str, Any]]


def zeros(shape: tuple[int, ...]) -> Counts:
  """A zero count state."""
  return Counts(jnp.zeros(shape, jnp.uint32), jnp.zeros(shape, jnp.uint32))


def add(counts: Counts, n: jax.Array) -> Counts:
  """counts + n for n in [0, 2^32) (one batch), with carry into ``hi``."""
  lo = counts.lo + n.astype(jnp.uint32)
  return Counts(lo, counts.hi + (lo < counts.lo).astype(jnp.uint32))


def value(counts: Counts) -> np.ndarray:
  """The counts as int64 (host)."""
  hi = np.asarray(counts.hi).astype(np.int64)
  return (hi << 32) + np.asarray(counts.lo).astype(np.int64)


def _valid(labels: jax.Array, mask: jax.Array | None) -> jax.Array:
  """bool (labels.shape): the example is not padding."""
  if mask is None:
    return jnp.ones(labels.shape, bool)
  mask = jnp.asarray(mask) > 0
  return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (labels.ndim - 1)), labels.shape)


def confusion_counts(pred: jax.Array, labels: jax.Array, valid: jax.Array,
                     num_classes: int) -> jax.Array:
  """uint32 (K, K) confusion matrix, rows = truth, cols = prediction, over ``valid`` entries
  whose label is in [0, K) (other labels never count)."""
  valid = valid & (labels >= 0) & (labels < num_classes)
  idx = jnp.where(valid, labels * num_classes + pred, 0).reshape(-1)
  counts = jnp.zeros((num_classes * num_classes,), jnp.uint32)
  counts = counts.at[idx].add(valid.reshape(-1).astype(jnp.uint32))
  return counts.reshape(num_classes, num_classes)


def _divide(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
  """num / den elementwise (float64), ``empty`` where den == 0."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def _nanmean(x: np.ndarray) -> float:
  """Mean of the non-NaN entries; NaN if there is none."""
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")


def f1_summary(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, Any]:
  """torchmetrics-style F1 from per-class counts (C,): per-class 2TP / (2TP + FP + FN) (0 for
  an empty class); macro = plain mean of the C values; weighted = mean weighted by support
  TP + FN; micro = F1 of the summed counts."""
  f1 = _divide(2 * tp, 2 * tp + fp + fn, 0.0)
  support = tp + fn
  return {"F1_Score_macro": float(f1.mean()),
          "F1_Score_micro": float(_divide(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum(), 0.0)),
          "F1_Score_weighted": float(_divide((f1 * support).sum(), support.sum(), 0.0)),
          "F1_per_class": f1}


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
  """Per-class IoU TP / (TP + FP + FN) from a confusion matrix (rows = truth); 0/0 -> NaN."""
  tp = np.diag(matrix)
  return _divide(tp, matrix.sum(0) + matrix.sum(1) - tp, np.nan)


def _confusion_metric(name: str, num_classes: int, monitor: str,
                      summarize: Callable[[np.ndarray], dict[str, Any]],
                      ignore_index: int | None = None) -> Metric:
  """A metric over a (K, K) confusion matrix of argmax predictions.

  Labels (..,) int, or one-hot (.., K) (reduced by argmax); predictions argmax(logits, -1).
  """
  def update(state: Counts, logits: jax.Array, labels: jax.Array,
             mask: jax.Array | None = None) -> Counts:
    if labels.ndim == logits.ndim:
      labels = jnp.argmax(labels, axis=-1)
    valid = _valid(labels, mask)
    if ignore_index is not None:
      valid = valid & (labels != ignore_index)
    pred = jnp.argmax(logits, axis=-1)
    return add(state, confusion_counts(pred, labels, valid, num_classes))

  return Metric(name, num_classes, monitor, lambda: zeros((num_classes, num_classes)), update,
                lambda state: summarize(value(state)))


def multilabel_f1(num_classes: int, monitor: str = "F1_Score_macro") -> Metric:
  """``MetricsMonoModal`` (multilabel): prediction = logit > 0 (sigmoid > 0.5), target = label
  > 0.5; F1 from TP/FP/FN accumulated per class. Labels float (B, K) multi-hot.

  Keys: F1_Score_macro, F1_Score_micro, F1_Score_weighted, F1_per_class.
  """
  def update(state: Counts, logits: jax.Array, labels: jax.Array,
             mask: jax.Array | None = None) -> Counts:
    pred, truth = logits > 0, labels > 0.5
    valid = _valid(labels, mask)
    count = lambda x: jnp.sum(x & valid, axis=0, dtype=jnp.uint32)
    return add(state, jnp.stack([count(pred & truth), count(pred & ~truth),
                                 count(~pred & truth)]))

  def compute(state: Counts) -> dict[str, Any]:
    tp, fp, fn = value(state)
    return f1_summary(tp, fp, fn)

  return Metric("MetricsMonoModal(multilabel)", num_classes, monitor,
                lambda: zeros((3, num_classes)), update, compute)


def multiclass_f1(num_classes: int, monitor: str = "F1_Score_macro",
                  ignore_index: int | None = None) -> Metric:
  """``MetricsMonoModal`` (multiclass) and ``MetricsAccuracy``: argmax prediction vs int
  label (B,) or one-hot (B, K); F1 averages as ``multilabel_f1`` (micro F1 = OA) and ``OA`` =
  fraction of samples correct. Keys: F1_Score_{macro,micro,weighted}, F1_per_class, OA."""
  def summarize(m: np.ndarray) -> dict[str, Any]:
    tp = np.diag(m)
    out = f1_summary(tp, m.sum(0) - tp, m.sum(1) - tp)
    out["OA"] = float(_divide(tp.sum(), m.sum(), np.nan))
    return out

  return _confusion_metric("MetricsMonoModal(multiclass)+MetricsAccuracy", num_classes, monitor,
                           summarize, ignore_index)


def segmentation_iou(num_classes: int, drop_last_class: bool = True,
                     ignore_index: int | None = None) -> Metric:
  """``IoU`` (PASTIS, FLAIR): confusion matrix over labelled pixels; with ``drop_last_class``
  (the reference's ``ignore_index=-1`` as a Python index) the last class's row and column are
  zeroed, so its pixels and every prediction of it vanish. Per-class IoU with 0/0 -> NaN
  (always NaN for a dropped class); ``mIoU`` = nan-mean in [0, 1]; ``acc`` = trace / total in
  [0, 1].
  Keys: mIoU, acc, IoU_per_class, confusion (the int64 (K, K) matrix, before dropping).
  """
  def summarize(m: np.ndarray) -> dict[str, Any]:
    full = m
    if drop_last_class:
      m = m.copy()
      m[-1, :] = 0
      m[:, -1] = 0
    iou = iou_per_class(m)
    return {"mIoU": _nanmean(iou), "acc": float(_divide(np.trace(m), m.sum(), np.nan)),
            "IoU_per_class": iou, "confusion": full}

  return _confusion_metric("IoU", num_classes, "mIoU", summarize, ignore_index)


def change_iou(ignore_index: int | None = None) -> Metric:
  """``MetricsSemSeg`` (BraDD), port default: ``IoU`` of class 1 (change) accumulated over the
  split, TP / (TP + FP + FN) (NaN if class 1 never occurs in truth or prediction). Not the
  reference's library-version-dependent per-batch average (spec B.5). Keys: IoU,
  IoU_per_class."""
  def summarize(m: np.ndarray) -> dict[str, Any]:
    iou = iou_per_class(m)
    return {"IoU": float(iou[1]), "IoU_per_class": iou}

  return _confusion_metric("MetricsSemSeg", 2, "IoU", summarize, ignore_index)


def jaccard_macro(num_classes: int = 2, ignore_index: int | None = -1) -> Metric:
  """``MetricsSemSegJ`` (SICKLE): torchmetrics ``JaccardIndex(task="multiclass", average=
  "macro", ignore_index=-1)``: mean IoU over the classes present in truth or prediction
  (torchmetrics >= 1.0 gives absent classes weight 0), ignored pixels excluded.
  Keys: IoU, IoU_per_class."""
  def summarize(m: np.ndarray) -> dict[str, Any]:
    iou = iou_per_class(m)
    return {"IoU": _nanmean(iou), "IoU_per_class": iou}

  return _confusion_metric("MetricsSemSegJ", num_classes, "IoU", summarize, ignore_index)


def seg_pangaea(num_classes: int, ignore_index: int | None = -1) -> Metric:
  """``SegPangaea`` (Sen1Floods11): confusion matrix over pixels with label != ignore_index;
  IoU = inter / (union + 1e-6), precision / recall = inter / (count + 1e-6),
  F1 = 2 P R / (P + R + 1e-6), all per class; ``mIoU``, ``mF1`` = plain means over all classes
  (an absent class counts 0); ``mAcc`` = overall pixel accuracy inter.sum / (total + 1e-6), in
  [0, 1]. Keys: mIoU, mF1, mAcc, IoU_per_class, F1_per_class."""
  def summarize(m: np.ndarray) -> dict[str, Any]:
    m = m.astype(np.float64)
    inter = np.diag(m)
    iou = inter / (m.sum(0) + m.sum(1) - inter + 1e-6)
    precision = inter / (m.sum(0) + 1e-6)
    recall = inter / (m.sum(1) + 1e-6)
    f1 = 2 * precision * recall / (precision + recall + 1e-6)
    return {"mIoU": float(iou.mean()), "mF1": float(f1.mean()),
            "mAcc": float(inter.sum() / (m.sum() + 1e-6)), "IoU_per_class": iou,
            "F1_per_class": f1}

  return _confusion_metric("SegPangaea", num_classes, "mIoU", summarize, ignore_index)


# Dataset (``input_pipeline.datasets.registry`` name) -> metric of the paper's experiments
# (spec B.5 / B.7); class counts as in the datasets' ``LabelSpec``.
TASKS: types.MappingProxyType[str, Callable[[], Metric]] = types.MappingProxyType({
    "treesatai_ts": lambda: multilabel_f1(15, monitor="F1_Score_weighted"),
    "pastis_hd_cls": lambda: multilabel_f1(18, monitor="F1_Score_macro"),
    "pastis_hd": lambda: segmentation_iou(20, drop_last_class=True),
    "flair": lambda: segmentation_iou(13, drop_last_class=True),
    "planted": lambda: multiclass_f1(40, monitor="F1_Score_macro"),
    "bradd_s1ts": change_iou,
    "sickle": lambda: jaccard_macro(2, ignore_index=-1),
    "timesen2crop": lambda: multiclass_f1(16, monitor="OA"),
    "sen1floods11": lambda: seg_pangaea(2, ignore_index=-1),
})

# Experiment config names (cfg:exp/*) -> dataset task.
EXPERIMENTS: types.MappingProxyType[str, str] = types.MappingProxyType({
    "TSAITS_AnySat_FT": "treesatai_ts",
    "Pastis_AnySat_FT": "pastis_hd_cls",
    "Pastis_AnySat_FT_SemSeg": "pastis_hd",
    "Pastis_AnySat_LP_SemSeg": "pastis_hd",
    "Pastis_AnySat_FT_SemSeg_naive": "pastis_hd",
    "FLAIR_AnySat_FT_SemSeg": "flair",
    "Planted_AnySat_FT": "planted",
    "BraDD_AnySat_FT": "bradd_s1ts",
    "BraDD_AnySat_LP": "bradd_s1ts",
    "Sickle_AnySat_FT": "sickle",
    "Sickle_AnySat_LP": "sickle",
    "TS2C_AnySat_FT": "timesen2crop",
    "TS2C_AnySat_LP": "timesen2crop",
    "Sen1Floods_AnySat_LP": "sen1floods11",
})


def metric_for(task_name: str) -> Metric:
  """The metric of a dataset task (``TASKS`` key) or paper experiment (``EXPERIMENTS`` key)."""
  task = EXPERIMENTS.get(task_name, task_name)
  if task not in TASKS:
    raise ValueError(f"no metric for {task_name!r}; known: {', '.join((*TASKS, *EXPERIMENTS))}")
  return TASKS[task]()
